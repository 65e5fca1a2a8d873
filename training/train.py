"""The training loop: Adam, gradient clipping, learning rate on a cosine or on-plateau schedule, early stopping on
validation loss, dropout and weight decay, MSE / MAE / Huber loss, seeds, checkpoints with resume, a progress bar.

Lean on purpose (the speed target is >= 900 windows/s at lookback 336 in < 400 MiB on 2 cores): batches are
sliced from one strided view of the scaled data (no window is copied until its batch is built), and Adam is a
few lines here because constructing torch.optim.Adam imports torch._dynamo (sympy, ~75 MiB resident).

A batch runs as chunks of `micro_batch` windows whose gradients add up to the batch's: activation memory follows
the chunk. With `threads` > 1 the chunks run in that many worker threads, one core each: oneDNN splitting every
small LSTM step across the cores waits on a barrier per step (bf16 at lookback 336: 973 windows/s against 1402
for chunks per core; 15 against 245 while other processes share the cores), while chunks meet once
per batch. Each chunk draws its dropout from its own seeded generator (training.architectures.random_stream),
so the result does not depend on which thread ran it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.architectures import random_stream
from training.data import Prepared
from training.model import LSTMForecaster

# Backpropagating through a long window shrinks the early steps' gradients into the denormal range, where x86
# arithmetic is ~100x slower: oneDNN's float32 LSTM backward at lookback 336 took 8.1 s per 256 windows instead
# of 0.58 s. Flushing them to zero changes no result measurably. Only while training, on the threads that train
# (the calling thread and the chunk workers, see _single_core_worker): the flag is processor state, and other
# code in the same process (hypothesis, numerical libraries) relies on denormals.


def _flushing() -> bool:
    return (torch.tensor([1e-30]) * torch.tensor([1e-10])).item() == 0.0


@contextlib.contextmanager
def denormals_flushed():
    """Flush denormal floats to zero on this thread inside the block; restore the previous mode after it."""
    before = _flushing()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)

LOSSES = ("mse", "mae", "huber")
PRECISIONS = ("auto", "fp32", "bf16")
LEGACY_ARCHITECTURE = "lstm"  # the original LSTMForecaster (MIMO, shipped bundle)


@dataclass
class TrainConfig:
    lookback: int = 60
    horizon: int = 10
    hidden_size: int = 64
    num_layers: int = 2
    dropout: float = 0.1
    batch_size: int = 256
    micro_batch: int = 32  # windows per forward/backward pass: a batch's gradients are summed over chunks this big, so
    # activation memory follows the chunk, not the batch (0 = the whole batch at once)
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    epochs: int = 14
    patience: int = 3  # epochs without validation improvement before stopping
    grad_clip: float = 1.0
    train_stride: int = 3  # use every n-th training window per epoch (random offset each epoch)
    val_stride: int = 2
    seed: int = 0
    threads: int = 2
    # the toolbox (defaults reproduce the shipped bundle's training)
    architecture: str = LEGACY_ARCHITECTURE  # or one of training.architectures.ARCHITECTURES
    strategy: str = "mimo"  # mimo | recursive | direct | dirrec
    difference: bool = False  # first differences in the graph, inverted in the graph
    loss: str = "mse"  # mse | mae | huber
    huber_delta: float = 1.0
    lr_schedule: str = "cosine"  # cosine | plateau | constant
    plateau_factor: float = 0.5
    plateau_patience: int = 1
    min_learning_rate: float = 1e-5
    teacher_forcing: float = 1.0  # encoder_decoder
    conv_channels: int = 32  # cnn_lstm
    tbptt: int = 0  # many_to_one: truncate backpropagation to the last n steps (0 = full)
    precision: str = "auto"  # fp32 | bf16 (autocast) | auto: bf16 where the CPU computes it natively (AMX, AVX512-BF16)
    max_batches: int = 0  # per epoch, 0 = all (benchmarks)
    progress: bool = False  # tqdm bar with the live losses
    checkpoint: str = ""  # file written after every epoch ("" = none)
    resume: bool = False  # continue from `checkpoint` if it exists

    def to_dict(self) -> dict:
        return {**asdict(self), "precision_used": resolve_precision(self.precision)}  # what "auto" meant on this CPU


@dataclass
class TrainResult:
    model: torch.nn.Module
    epochs_run: int
    best_epoch: int
    best_val_loss: float
    history: list[dict]
    seconds: float
    train_windows_per_s: float = 0.0
    epoch_seconds: list[float] = field(default_factory=list)


def resolve_precision(precision: str) -> str:
    """"auto" -> bf16 on CPUs with native bfloat16 arithmetic, where oneDNN's LSTM runs on AMX/AVX512-BF16 at about
    twice the float32 speed with half the activation memory (the loss curve matches float32 within seed noise:
    the weights, the optimizer and the loss stay float32); fp32 elsewhere, where bf16 would be emulated."""
    if precision == "bf16" and not bf16_lstm_available():
        raise ValueError("precision=bf16: this CPU's oneDNN has no bfloat16 LSTM (it needs AVX-512 or AMX); "
                         "use precision=fp32, or auto (bf16 only where the CPU computes it natively)")
    if precision != "auto":
        return precision
    def probe(name: str) -> bool:  # private torch helpers: a torch without them means no native bf16 to us
        return bool(getattr(torch.cpu, name, lambda: False)())

    native = probe("_is_amx_tile_supported") or probe("_is_avx512_bf16_supported")
    return "bf16" if native else "fp32"


@functools.lru_cache(maxsize=None)
def bf16_lstm_available() -> bool:
    """Whether an LSTM step runs under bfloat16 autocast here: oneDNN emulates bf16 on AVX-512 CPUs, and on CPUs
    without AVX-512 it has no bf16 LSTM primitive at all (a RuntimeError deep in the first training step)."""
    lstm = torch.nn.LSTM(2, 2, batch_first=True)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(torch.zeros(1, 2, 2))  # (B, L, F)
    except RuntimeError:
        return False
    return True


def sized_for_data(cfg: TrainConfig, train_windows: int, min_steps: int) -> TrainConfig:
    """A floor on optimizer steps, not on epochs: small data gets every window in every epoch, smaller batches
    (at least 8 a epoch) and as many epochs as `min_steps` needs; early stopping waits as many more epochs.

    Why: batch 256 with stride 3 is one step an epoch on 400 rows, and early stopping then ends a model that
    never left repeat-last. Large data is unchanged (its epochs already hold more than `min_steps` steps)."""
    cfg = copy.copy(cfg)
    if train_windows <= 0 or min_steps <= 0:
        return cfg
    if train_windows < 8 * cfg.batch_size * cfg.train_stride:
        cfg.train_stride = 1
    cfg.batch_size = int(min(cfg.batch_size, max(16, train_windows // 8)))
    per_epoch = math.ceil(math.ceil(train_windows / cfg.train_stride) / cfg.batch_size)
    needed = math.ceil(min_steps / per_epoch)
    if needed > cfg.epochs:
        cfg.patience = max(cfg.patience, math.ceil(cfg.patience * needed / cfg.epochs))
        cfg.epochs = needed
    return cfg


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: TrainConfig, prepared: Prepared) -> torch.nn.Module:
    if cfg.architecture == LEGACY_ARCHITECTURE:
        if cfg.strategy != "mimo" or cfg.difference:
            raise ValueError("architecture 'lstm' (the shipped model) is MIMO on levels; use many_to_one for other strategies")
        return LSTMForecaster(len(prepared.features), cfg.horizon, prepared.target_index.tolist(),
                              cfg.hidden_size, cfg.num_layers, cfg.dropout)
    from training.architectures import CoreConfig
    from training.strategies import Forecaster

    core = CoreConfig(hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, dropout=cfg.dropout,
                      conv_channels=cfg.conv_channels, teacher_forcing=cfg.teacher_forcing, tbptt=cfg.tbptt)
    return Forecaster(cfg.architecture, cfg.strategy, len(prepared.features), prepared.target_index.tolist(),
                      cfg.horizon, core, cfg.difference)


def loss_fn(name: str, huber_delta: float = 1.0):
    if name == "mse":
        return torch.nn.functional.mse_loss
    if name == "mae":
        return torch.nn.functional.l1_loss
    if name == "huber":
        return lambda pred, target, reduction="mean": torch.nn.functional.huber_loss(pred, target, reduction=reduction, delta=huber_delta)
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")


class WindowBatches:
    """Batches of (x (B, L, F), y (B, H, T)) cut from one strided view of the scaled rows."""

    def __init__(self, prepared: Prepared):
        self.lookback = prepared.lookback
        data = torch.from_numpy(np.ascontiguousarray(prepared.scaled))  # (M, F), shared with numpy
        self.view = data.unfold(0, prepared.lookback + prepared.horizon, 1)  # (M-L-H+1, F, L+H), no copy
        self.target_index = torch.from_numpy(prepared.target_index.astype(np.int64))

    def __call__(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.view.index_select(0, torch.from_numpy(np.asarray(starts, dtype=np.int64)))  # (B, F, L+H) copy
        block = block.transpose(1, 2)  # (B, L+H, F)
        x = block[:, : self.lookback].contiguous()  # (B, L, F)
        y = block[:, self.lookback :].index_select(2, self.target_index)  # (B, H, T)
        return x, y


class LeanAdam:
    """Adam (Kingma & Ba) with L2 weight decay, exactly as torch.optim.Adam(foreach=False) computes it."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.step_count = 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.step_count, 1 - b2**self.step_count
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(c2)).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / c1)

    def state_dict(self) -> dict:
        return {"lr": self.lr, "step_count": self.step_count, "m": self.m, "v": self.v}

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.step_count = state["lr"], state["step_count"]
        for dst, src in zip(self.m + self.v, state["m"] + state["v"]):
            dst.copy_(src)


def _single_core_worker() -> None:
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)


def _draws_from_random_streams(model: torch.nn.Module) -> bool:
    """Whether the model is built from training.architectures / training.model, whose random draws all come from
    random_stream: only then can its chunks run in threads and still follow the seed."""
    from training.architectures import Core, Dropout

    modules = list(model.modules())
    return any(isinstance(m, (Core, LSTMForecaster)) for m in modules) and not any(
        isinstance(m, torch.nn.Dropout) and not isinstance(m, Dropout) for m in modules)


def _chunk_gradients(model: torch.nn.Module, batches: WindowBatches, starts: np.ndarray, share: float, seed: int,
                     params: list[torch.Tensor], criterion, bf16: bool) -> tuple[float, tuple]:
    """Forward and backward of one chunk: (its share of the batch's loss, the gradients of that share)."""
    x, y = batches(starts)  # (C, L, F), (C, H, T)
    with random_stream(torch.Generator().manual_seed(seed)), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        pred, target = model.fit_outputs(x, y) if hasattr(model, "fit_outputs") else (model(x), y)
    loss = criterion(pred.float(), target) * share
    return loss.item(), torch.autograd.grad(loss, params, allow_unused=True)


def _clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    total = torch.sqrt(sum((g.detach().float() ** 2).sum() for g in grads))
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(factor)


def _learning_rate(cfg: TrainConfig, epoch: int) -> float:
    """Cosine schedule: the rate for `epoch` (1-based)."""
    floor = cfg.learning_rate * 0.05
    return floor + (cfg.learning_rate - floor) * (1 + math.cos(math.pi * (epoch - 1) / max(cfg.epochs, 1))) / 2


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, prepared: Prepared, starts: np.ndarray, batch_size: int,
                  loss: str = "mse", huber_delta: float = 1.0) -> float:
    """Mean loss of the full-horizon forecast (the exported behaviour) over the windows at `starts`."""
    model.eval()
    batches = WindowBatches(prepared)
    fn = loss_fn(loss, huber_delta)
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):  # training-sized chunks keep the peak memory down
        x, y = batches(starts[i : i + batch_size])  # (B, L, F), (B, H, T)
        total += float(fn(model(x), y, reduction="sum"))
        count += y.numel()
    return total / max(count, 1)


def _return_freed_memory_to_os() -> None:
    """Pin glibc's mmap threshold (128 KiB): batch-sized buffers are then mmapped and go back to the OS when
    freed, instead of the dynamic threshold moving them onto a heap that never shrinks (lower peak RSS)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _save_checkpoint(path: str, state: dict) -> None:
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a torn checkpoint


def _no_improvement(cfg: TrainConfig, optimizer, stale: int, plateau_stale: int, log) -> tuple[int, int, bool]:
    """An epoch without a better validation loss: on a plateau the learning rate drops; after `patience` such epochs
    training stops. Returns (stale, plateau_stale, stop)."""
    stale += 1
    plateau_stale += 1
    if cfg.lr_schedule == "plateau" and plateau_stale > cfg.plateau_patience:
        optimizer.lr = max(optimizer.lr * cfg.plateau_factor, min(cfg.min_learning_rate, optimizer.lr))
        plateau_stale = 0
        log(f"validation loss on a plateau: learning rate -> {optimizer.lr:.2e}")
    if stale >= cfg.patience:
        log(f"early stop: no validation improvement for {cfg.patience} epochs")
        return stale, plateau_stale, True
    return stale, plateau_stale, False


def fit(prepared: Prepared, cfg: TrainConfig, log=print, model: torch.nn.Module | None = None) -> TrainResult:
    """Train (a fresh model, or `model` to fine-tune) and return the best-validation weights."""
    with denormals_flushed():
        return _fit(prepared, cfg, log, model)


def _fit(prepared: Prepared, cfg: TrainConfig, log, model: torch.nn.Module | None) -> TrainResult:
    if (cfg.lookback, cfg.horizon) != (prepared.lookback, prepared.horizon):
        raise ValueError("TrainConfig lookback/horizon differ from the prepared data")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    torch.set_num_threads(cfg.threads)
    _return_freed_memory_to_os()
    set_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    batches = WindowBatches(prepared)
    fine_tuning = model is not None
    model = model if fine_tuning else build_model(cfg, prepared)
    train_starts = prepared.starts["train"]
    val_starts = prepared.starts["val"][:: cfg.val_stride]
    if getattr(model, "difference", False):
        sample = train_starts[np.linspace(0, len(train_starts) - 1, min(len(train_starts), 2048)).astype(int)]
        model.fit_difference_scale(batches(sample)[0])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = LeanAdam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    criterion = loss_fn(cfg.loss, cfg.huber_delta)
    chunk = cfg.micro_batch if 0 < cfg.micro_batch < cfg.batch_size else cfg.batch_size
    best_loss, best_state, best_epoch, stale, plateau_stale = float("inf"), copy.deepcopy(model.state_dict()), 0, 0, 0
    history: list[dict] = []
    first_epoch = 1
    if fine_tuning:  # the starting weights are a candidate too: fine-tuning never returns something worse on validation
        best_loss = evaluate_loss(model, prepared, val_starts, cfg.batch_size, cfg.loss, cfg.huber_delta)
    if cfg.resume and cfg.checkpoint and Path(cfg.checkpoint).exists():
        ck = torch.load(cfg.checkpoint, weights_only=False)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        best_loss, best_state, best_epoch, stale, plateau_stale = ck["best_loss"], ck["best_state"], ck["best_epoch"], ck["stale"], ck["plateau_stale"]
        history, first_epoch = ck["history"], ck["epoch"] + 1
        rng.bit_generator.state = ck["numpy_rng"]
        torch.set_rng_state(ck["torch_rng"])
        log(f"resumed from {cfg.checkpoint} after epoch {ck['epoch']}")
    progress = None
    if cfg.progress:
        from tqdm import tqdm

        progress = tqdm
    began = time.perf_counter()
    train_seconds, train_windows, epoch_seconds = 0.0, 0, []
    epoch = first_epoch - 1
    stopped = stale >= cfg.patience  # a resumed run that had already stopped early
    work = functools.partial(_chunk_gradients, model, batches, params=params, criterion=criterion,
                             bf16=resolve_precision(cfg.precision) == "bf16")
    parallel = cfg.threads > 1 and chunk < cfg.batch_size and _draws_from_random_streams(model)
    workers = ThreadPoolExecutor(cfg.threads, initializer=_single_core_worker) if parallel else None
    try:
        for epoch in range(first_epoch, cfg.epochs + 1 if not stopped else first_epoch):
            if cfg.lr_schedule == "cosine":
                optimizer.lr = _learning_rate(cfg, epoch)
            model.train()
            offset = int(rng.integers(cfg.train_stride))
            order = rng.permutation(train_starts[offset :: cfg.train_stride])  # shuffles windows within train only
            n_batches = math.ceil(len(order) / cfg.batch_size)
            if cfg.max_batches:
                n_batches = min(n_batches, cfg.max_batches)
            bar = progress(total=n_batches, desc=f"epoch {epoch}", leave=False, unit="batch") if progress else None
            running, seen = 0.0, 0
            epoch_began, epoch_cpu_began = time.perf_counter(), time.process_time()
            for b in range(n_batches):
                batch = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
                chunks = [batch[c : c + chunk] for c in range(0, len(batch), chunk)]
                seeds = rng.integers(np.iinfo(np.int64).max, size=len(chunks))
                shares = [len(c) / len(batch) for c in chunks]
                runner = workers.map if workers is not None and len(chunks) > 1 else map
                results = list(runner(work, chunks, shares, seeds.tolist()))  # in chunk order, whatever thread ran it
                for i, p in enumerate(params):
                    grads = [g[i] for _, g in results if g[i] is not None]
                    p.grad = functools.reduce(torch.add, grads) if grads else None
                batch_loss = sum(loss for loss, _ in results)
                _clip_grad_norm(params, cfg.grad_clip)
                optimizer.step()
                running += batch_loss * len(batch)
                seen += len(batch)
                if bar is not None:
                    bar.update()
                    bar.set_postfix(train=f"{running / seen:.5f}", lr=f"{optimizer.lr:.2e}")
            if bar is not None:
                bar.close()
            spent, cpu_spent = time.perf_counter() - epoch_began, time.process_time() - epoch_cpu_began
            train_seconds += spent
            train_windows += seen
            epoch_seconds.append(spent)
            val_loss = evaluate_loss(model, prepared, val_starts, cfg.batch_size, cfg.loss, cfg.huber_delta)
            train_loss = running / max(seen, 1)
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": optimizer.lr,
                            "seconds": round(spent, 3), "cpu_seconds": round(cpu_spent, 3),
                            "windows_per_s": round(seen / max(spent, 1e-9), 1)})
            log(f"epoch {epoch:2d}  train {train_loss:.5f}  val {val_loss:.5f}  lr {optimizer.lr:.2e}  "
                f"{seen / max(spent, 1e-9):.0f} windows/s  ({time.perf_counter() - began:.0f} s)")
            if val_loss < best_loss - 1e-6:
                best_loss, best_state, best_epoch, stale, plateau_stale = val_loss, copy.deepcopy(model.state_dict()), epoch, 0, 0
            else:
                stale, plateau_stale, give_up = _no_improvement(cfg, optimizer, stale, plateau_stale, log)
                stopped = stopped or give_up
            if cfg.checkpoint:
                _save_checkpoint(cfg.checkpoint, {
                    "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "best_loss": best_loss, "best_state": best_state, "best_epoch": best_epoch, "stale": stale,
                    "plateau_stale": plateau_stale, "history": history, "numpy_rng": rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(), "config": cfg.to_dict()})
            if stopped:
                break
    finally:
        if workers is not None:
            workers.shutdown()
            torch.set_num_threads(cfg.threads)  # the workers' setting is process-wide for threads started later
    model.load_state_dict(best_state)
    model.eval()
    rate = train_windows / train_seconds if train_seconds > 0 else 0.0
    return TrainResult(model, epoch, best_epoch, best_loss, history, time.perf_counter() - began, rate, epoch_seconds)


# ------------------------------------------------------------------------------- streaming and data-parallel


class _TrainingOutputs(torch.nn.Module):
    """forward(x, y) = the model's training outputs (fit_outputs where it has one): DistributedDataParallel
    averages gradients only of what runs through its own forward."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return self.model.fit_outputs(x, y) if hasattr(self.model, "fit_outputs") else (self.model(x), y)


def _has_unused_parameters(net: torch.nn.Module, data, cfg: TrainConfig) -> bool:
    """Whether a training step leaves some parameter without a gradient (DDP must then look for them every step;
    without, it skips that traversal of the graph). Probed on two zero windows; the gradients are dropped."""
    x = torch.zeros(2, cfg.lookback, len(data.features))
    y = torch.zeros(2, cfg.horizon, len(data.targets))
    with torch.random.fork_rng():
        pred, target = net(x, y)
        torch.autograd.backward(pred.float().sum() + 0 * target.sum())
    unused = any(p.grad is None for p in net.parameters() if p.requires_grad)
    for p in net.parameters():
        p.grad = None
    return unused


def fit_stream(data, cfg: TrainConfig, log=print, dist=None, buffer_windows: int = 65536, live_devices: int = 64,
               max_val_batches: int = 0) -> TrainResult:
    """Train from a training.stream.StreamData: batches from its bounded shuffle buffer, validation streamed.

    With a training.distributed.Dist of several ranks the model is wrapped in DistributedDataParallel: each rank
    draws `batch_size / world` windows of its own devices per step and DDP averages the gradients, so a step is
    one step over the global batch and every rank keeps identical weights. Every rank runs the same number of
    batches (the fewest any rank can fill), the validation loss is summed over ranks, rank 0's early-stopping
    decision is broadcast; only rank 0 logs, shows the bar and writes the checkpoint."""
    from training.distributed import Dist

    with denormals_flushed():
        return _fit_stream(data, cfg, log, dist or Dist(), buffer_windows, live_devices, max_val_batches)


def _fit_stream(data, cfg: TrainConfig, log, d, buffer_windows: int, live_devices: int, max_val_batches: int) -> TrainResult:
    if (cfg.lookback, cfg.horizon) != (data.lookback, data.horizon):
        raise ValueError("TrainConfig lookback/horizon differ from the prepared data")
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    if cfg.batch_size % d.world:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the number of ranks ({d.world})")
    torch.set_num_threads(cfg.threads)
    _return_freed_memory_to_os()
    set_seed(cfg.seed)
    model = build_model(cfg, data)
    if getattr(model, "difference", False):
        model.fit_difference_scale(data.sample_inputs(2048))  # rank 0's value reaches every rank with the weights
    net: torch.nn.Module = _TrainingOutputs(model)
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(net, find_unused_parameters=_has_unused_parameters(net, data, cfg))  # broadcasts rank 0's weights and buffers
    local_batch = cfg.batch_size // d.world
    n_batches = d.min_int(data.train_window_floor(cfg.train_stride) // local_batch)
    if cfg.max_batches:
        n_batches = min(n_batches, cfg.max_batches)
    if n_batches < 1:
        raise ValueError(f"fewer training windows than one batch of {local_batch} on some rank: a smaller "
                         f"--batch-size or --train-stride, or more devices per rank")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = LeanAdam(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    criterion = loss_fn(cfg.loss, cfg.huber_delta)
    bf16 = resolve_precision(cfg.precision) == "bf16"
    chunk = cfg.micro_batch if 0 < cfg.micro_batch < local_batch else local_batch
    best_loss, best_state, best_epoch, stale, plateau_stale = float("inf"), copy.deepcopy(model.state_dict()), 0, 0, 0
    history: list[dict] = []
    first_epoch = 1
    found = int(d.sum([1.0 if cfg.resume and cfg.checkpoint and Path(cfg.checkpoint).exists() else 0.0])[0])
    if 0 < found < d.world:
        raise ValueError(f"--resume: {cfg.checkpoint} is visible to {found} of {d.world} ranks: put it in a folder all machines share")
    if found:  # every rank reads it, so the weights and the optimizer state stay identical
        ck = torch.load(cfg.checkpoint, weights_only=False)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        best_loss, best_state, best_epoch, stale, plateau_stale = ck["best_loss"], ck["best_state"], ck["best_epoch"], ck["stale"], ck["plateau_stale"]
        history, first_epoch = ck["history"], ck["epoch"] + 1
        log(f"resumed from {cfg.checkpoint} after epoch {ck['epoch']}")
    progress = None
    if cfg.progress and d.main:
        from tqdm import tqdm

        progress = tqdm
    began = time.perf_counter()
    train_seconds, train_windows, epoch_seconds = 0.0, 0, []
    epoch = first_epoch - 1
    stopped = stale >= cfg.patience
    for epoch in range(first_epoch, cfg.epochs + 1 if not stopped else first_epoch):
        if cfg.lr_schedule == "cosine":
            optimizer.lr = _learning_rate(cfg, epoch)
        model.train()
        rng = np.random.default_rng([cfg.seed, d.rank, epoch])  # a function of the epoch: resume needs no state
        bar = progress(total=n_batches, desc=f"epoch {epoch}", leave=False, unit="batch") if progress else None
        running, seen = 0.0, 0
        epoch_began, epoch_cpu_began = time.perf_counter(), time.process_time()
        for x, y in data.train_batches(rng, local_batch, cfg.train_stride, n_batches, buffer_windows, live_devices):
            optimizer.zero_grad()
            cuts = list(range(0, len(x), chunk))
            seeds = rng.integers(np.iinfo(np.int64).max, size=len(cuts))
            batch_loss = 0.0
            for i, c in enumerate(cuts):
                share = len(x[c : c + chunk]) / len(x)
                last = i == len(cuts) - 1
                sync = contextlib.nullcontext() if last or not d.enabled else net.no_sync()  # gradients meet once per batch
                with sync:
                    with random_stream(torch.Generator().manual_seed(int(seeds[i]))), \
                            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        pred, target = net(x[c : c + chunk], y[c : c + chunk])
                    loss = criterion(pred.float(), target) * share
                    loss.backward()
                batch_loss += loss.item()
            _clip_grad_norm(params, cfg.grad_clip)
            optimizer.step()
            running += batch_loss * len(x)
            seen += len(x)
            if bar is not None:
                bar.update()
                bar.set_postfix(train=f"{running / seen:.5f}", lr=f"{optimizer.lr:.2e}")
        if bar is not None:
            bar.close()
        spent, cpu_spent = time.perf_counter() - epoch_began, time.process_time() - epoch_cpu_began
        loss_sum, loss_count = data.val_totals(model, local_batch, cfg.loss, cfg.huber_delta, cfg.val_stride, max_val_batches)
        running, seen, loss_sum, loss_count, spent = d.sum([running, seen, loss_sum, loss_count, spent]).tolist()
        spent /= d.world  # the ranks' mean wall time
        seen = int(seen)
        train_seconds += spent
        train_windows += seen
        epoch_seconds.append(spent)
        val_loss = loss_sum / max(loss_count, 1)
        train_loss = running / max(seen, 1)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "lr": optimizer.lr,
                        "seconds": round(spent, 3), "cpu_seconds": round(cpu_spent, 3),
                        "windows_per_s": round(seen / max(spent, 1e-9), 1), "ranks": d.world})
        log(f"epoch {epoch:2d}  train {train_loss:.5f}  val {val_loss:.5f}  lr {optimizer.lr:.2e}  "
            f"{seen / max(spent, 1e-9):.0f} windows/s over {d.world} rank(s)  ({time.perf_counter() - began:.0f} s)")
        if val_loss < best_loss - 1e-6:
            best_loss, best_state, best_epoch, stale, plateau_stale = val_loss, copy.deepcopy(model.state_dict()), epoch, 0, 0
        else:
            stale, plateau_stale, give_up = _no_improvement(cfg, optimizer, stale, plateau_stale, log)
            stopped = stopped or give_up
        stopped = d.broadcast_flag(stopped)  # rank 0 decides (all ranks computed the same loss anyway)
        if cfg.checkpoint and d.main:
            _save_checkpoint(cfg.checkpoint, {
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "best_loss": best_loss, "best_state": best_state, "best_epoch": best_epoch, "stale": stale,
                "plateau_stale": plateau_stale, "history": history, "config": cfg.to_dict(), "ranks": d.world})
        if stopped:
            break
    d.barrier()  # a rank resuming later must find the checkpoint of the last epoch
    model.load_state_dict(best_state)
    model.eval()
    rate = train_windows / train_seconds if train_seconds > 0 else 0.0
    return TrainResult(model, epoch, best_epoch, best_loss, history, time.perf_counter() - began, rate, epoch_seconds)
