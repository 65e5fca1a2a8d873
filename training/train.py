"""The training loop: Adam, gradient clipping, cosine learning rate, early stopping on validation loss."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from training.data import Prepared
from training.model import LSTMForecaster


@dataclass
class TrainConfig:
    lookback: int = 60
    horizon: int = 10
    hidden_size: int = 64
    num_layers: int = 2
    dropout: float = 0.1
    batch_size: int = 256
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    epochs: int = 14
    patience: int = 3  # epochs without validation improvement before stopping
    grad_clip: float = 1.0
    train_stride: int = 3  # use every n-th training window per epoch (random offset each epoch)
    val_stride: int = 2
    seed: int = 0
    threads: int = 2

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    model: LSTMForecaster
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    history: list[dict]
    seconds: float


def set_seed(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, prepared: Prepared) -> LSTMForecaster:
    return LSTMForecaster(len(prepared.features), cfg.horizon, prepared.target_index.tolist(),
                          cfg.hidden_size, cfg.num_layers, cfg.dropout)


@torch.no_grad()
def evaluate_loss(model: LSTMForecaster, prepared: Prepared, starts: np.ndarray, batch_size: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size * 4):
        x, y = prepared.windows(starts[i : i + batch_size * 4])  # (B, L, F), (B, H, T)
        pred = model(torch.from_numpy(x))
        total += float(torch.nn.functional.mse_loss(pred, torch.from_numpy(y), reduction="sum"))
        count += y.size
    return total / max(count, 1)


def fit(prepared: Prepared, cfg: TrainConfig, log=print) -> TrainResult:
    if (cfg.lookback, cfg.horizon) != (prepared.lookback, prepared.horizon):
        raise ValueError("TrainConfig lookback/horizon differ from the prepared data")
    torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = build_model(cfg, prepared)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1), eta_min=cfg.learning_rate * 0.05)
    train_starts = prepared.starts["train"]
    val_starts = prepared.starts["val"][:: cfg.val_stride]
    best_loss, best_state, best_epoch, stale = float("inf"), copy.deepcopy(model.state_dict()), 0, 0
    history = []
    began = time.perf_counter()
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        offset = int(rng.integers(cfg.train_stride))
        order = rng.permutation(train_starts[offset :: cfg.train_stride])  # shuffles windows within train only
        running, batches = 0.0, 0
        for i in range(0, len(order), cfg.batch_size):
            x, y = prepared.windows(order[i : i + cfg.batch_size])  # (B, L, F), (B, H, T)
            loss = torch.nn.functional.mse_loss(model(torch.from_numpy(x)), torch.from_numpy(y))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            running += loss.item()
            batches += 1
        schedule.step()
        val_loss = evaluate_loss(model, prepared, val_starts, cfg.batch_size)
        history.append({"epoch": epoch, "train_loss": running / max(batches, 1), "val_loss": val_loss})
        log(f"epoch {epoch:2d}  train {running / max(batches, 1):.5f}  val {val_loss:.5f}  "
            f"({time.perf_counter() - began:.0f} s)")
        if val_loss < best_loss - 1e-6:
            best_loss, best_state, best_epoch, stale = val_loss, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                log(f"early stop: no validation improvement for {cfg.patience} epochs")
                break
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model, epoch, best_epoch, best_loss, history, time.perf_counter() - began)
