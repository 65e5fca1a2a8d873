"""`python -m training benchmark ett`: the standard univariate ETTh1 long-horizon benchmark, end to end.

Another file with the ETT columns (ETTh2.csv, or any CSV with an `OT` column and at least 14400 rows) runs the
same protocol under its own name: the dataset is named after the file's stem (or `--dataset NAME`), and that
name is in the results, the bundle names (`<name>-h<H>`, lower case) and the manifests. It is compared with
published figures only where the code holds them for that dataset (PUBLISHED_BY_DATASET); the file's sha256 is
checked against the published file's where that is known, and the run says plainly when it differs.

Protocol (data/README.md, as in Informer / DLinear / PatchTST): target OT, lookback 336, horizons 96, 192, 336,
720; train rows [0, 8640), validation [8640 - L, 11520), test [11520 - L, 14400); z-score fitted on the train
rows; every stride-1 test window; MSE and MAE on z-scored values over all windows and steps.

For each horizon, in one run:
1. baselines: repeat-last, and a closed-form NLinear (subtract the window's last value, ridge regression with an
   intercept from the L inputs to the H outputs, add the last value back; ridge strength chosen on validation);
2. our model, `SegmentLSTM`: the NLinear solution as a frozen linear skip path plus a segment-wise LSTM
   (SegRNN-style: the lookback cut into day-long segments, one LSTM step per segment) whose direct multi-output
   head predicts a correction, in instance-normalized units (centred on the last value, divided by the window's
   spread, so what it learns carries over to the test period's shifted level and spread);
3. hyperparameters (decoder, segment, hidden size) and the strength of the LSTM correction chosen by two selection
   folds inside rows < 11520 (`selection_folds`: the protocol's validation rows, and a held-out winter, Jan-Feb 2017,
   scored on models trained without it and early-stopped on the validation rows), seed 0; then 3 seeds trained on
   the train rows (early stopping on the validation rows) with the chosen ones;
4. every seed exported to ONNX (verified against PyTorch at batch 1, 7, 64) and evaluated through the daemon's
   own loader (agent.core.model.load_bundle, original units in, original units out) on the validation and test
   windows; the seed with the best validation MSE becomes `exported_models/etth1-h<H>` (`<name>-h<H>`);
5. the table (JSON + markdown) with the baselines, the ablation without the LSTM (the linear path alone) and
   our model, plus the spread over seeds.
The test rows are touched only by step 4's final evaluation.
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import itertools
import json
import re
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

LOOKBACK = 336
HORIZONS = (96, 192, 336, 720)
TRAIN_END, VAL_END, TEST_END = 8640, 11520, 14400
TARGET = "OT"
PERIOD_S = 3600
ETTH1_SHA256 = "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066"
DEFAULT_DATA = Path(__file__).resolve().parent.parent / "data" / "ETTh1.csv"
RIDGE_GRID = (10.0, 100.0, 1000.0, 10000.0)
PUBLISHED_SOURCE = ("Zeng et al., \"Are Transformers Effective for Time Series Forecasting?\", AAAI 2023: univariate, "
                    "OT target, L = 336")
# Published univariate results (MSE, MAE) per dataset, from PUBLISHED_SOURCE. Only ETTh1's rows are here: they
# were checked against the paper and are reproduced by the closed-form NLinear to within 0.001 (tests/test_ett.py).
# ETTh2/ETTm1/ETTm2 go here only once checked against the paper; until then such runs print "no published figures".
PUBLISHED_BY_DATASET = {
    "ETTh1": {
        "NLinear": {96: (0.053, 0.177), 192: (0.069, 0.204), 336: (0.081, 0.226), 720: (0.080, 0.226)},
        "DLinear": {96: (0.056, 0.180), 192: (0.071, 0.204), 336: (0.098, 0.244), 720: (0.189, 0.359)},
    },
}
PUBLISHED = PUBLISHED_BY_DATASET["ETTh1"]
# sha256 of the published files (ETDataset), where known: data/README.md.
PUBLISHED_SHA256 = {"ETTh1": ETTH1_SHA256}


@dataclass(frozen=True)
class EttData:
    """Which dataset a run is on: its name (results, bundle names, manifests), file and sha256."""

    name: str
    file: str  # the file name, as the manifests record it
    sha256: str | None = None

    @property
    def slug(self) -> str:
        """The name in bundle folder names: lower case, letters, digits, `.`, `_` and `-` (ETTh1 -> etth1)."""
        return re.sub(r"[^a-z0-9._-]+", "-", self.name.lower()).strip("-.") or "dataset"

    @property
    def published_sha256(self) -> str | None:
        return PUBLISHED_SHA256.get(self.name)

    @property
    def published_file(self) -> bool | None:
        """True/False: the file is/is not the published file of that name; None: no published sha256 known."""
        known = self.published_sha256
        return None if known is None or self.sha256 is None else self.sha256 == known

    @property
    def published(self) -> dict | None:
        """The published rows {model: {horizon: (mse, mae)}} of this dataset, or None when the code has none."""
        return PUBLISHED_BY_DATASET.get(self.name)


ETTH1 = EttData("ETTh1", "ETTh1.csv", ETTH1_SHA256)


def dataset_name(path: str | Path, override: str | None = None) -> str:
    """`override`, else the file's stem; spelled as in PUBLISHED_BY_DATASET when it is one of those (etth1 -> ETTh1)."""
    name = (override or Path(path).stem).strip()
    if not name:
        raise EttDataError(f"cannot name the dataset of {path!s}: use --dataset NAME")
    known = {k.lower(): k for k in (*PUBLISHED_BY_DATASET, *PUBLISHED_SHA256)}
    return known.get(name.lower(), name)


def published_rows(data: EttData, horizon: int) -> dict | None:
    """{model: {"mse", "mae"}} published for this dataset and horizon, or None."""
    table = data.published
    if not table or any(horizon not in rows for rows in table.values()):
        return None
    return {model: {"mse": rows[horizon][0], "mae": rows[horizon][1]} for model, rows in table.items()}


class EttDataError(ValueError):
    """The ETT file is missing or does not have the shape the protocol needs."""


# ----------------------------------------------------------------------------------------------------- data


def load_target(path: str | Path, target: str = TARGET) -> np.ndarray:
    """The target column as float64, checked: header, numbers, enough rows for the protocol's borders."""
    path = Path(path)
    if not path.is_file():
        raise EttDataError(f"{path} not found (an ETT CSV such as ETTh1.csv: columns date,HUFL,HULL,MUFL,MULL,LUFL,LULL,OT)")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or target not in header:
            raise EttDataError(f"{path}: no {target!r} column in the header {header}")
        column = header.index(target)
        values = []
        for line_no, row in enumerate(reader, start=2):
            try:
                values.append(float(row[column]))
            except (IndexError, ValueError):
                raise EttDataError(f"{path} line {line_no}: {target} is not a number: {row!r}") from None
    series = np.asarray(values, dtype=np.float64)
    if len(series) < TEST_END:
        raise EttDataError(f"{path} has {len(series)} rows; the protocol needs at least {TEST_END}")
    if not np.isfinite(series[:TEST_END]).all():
        raise EttDataError(f"{path}: non-finite {target} values in the first {TEST_END} rows")
    return series


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass
class EttSplits:
    """The z-scored target and the protocol's windows. `mean`/`std` are fitted on the train rows (ddof 0)."""

    raw: np.ndarray  # (N,) original units
    mean: float
    std: float
    lookback: int = LOOKBACK

    @classmethod
    def from_series(cls, raw: np.ndarray, lookback: int = LOOKBACK) -> "EttSplits":
        train = raw[:TRAIN_END]
        return cls(raw=raw, mean=float(train.mean()), std=float(train.std()), lookback=lookback)

    @property
    def scaled(self) -> np.ndarray:
        return ((self.raw - self.mean) / self.std).astype(np.float32)

    def segment(self, split: str) -> tuple[int, int]:
        """Row range [start, end) whose windows (input and output inside it) form the split."""
        return {"train": (0, TRAIN_END), "val": (TRAIN_END - self.lookback, VAL_END),
                "test": (VAL_END - self.lookback, TEST_END)}[split]

    def windows(self, split: str, horizon: int, scaled: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Every stride-1 window of the split: inputs (W, L) and targets (W, H)."""
        return self.windows_in(*self.segment(split), horizon, scaled=scaled)

    def windows_in(self, start: int, end: int, horizon: int, scaled: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Every stride-1 window whose inputs and targets lie in rows [start, end): (W, L) and (W, H)."""
        series = (self.scaled if scaled else self.raw.astype(np.float32))[start:end]
        count = len(series) - self.lookback - horizon + 1
        if count < 1:
            raise ValueError(f"rows [{start}, {end}) hold no window of {self.lookback} + {horizon}")
        index = np.arange(count)[:, None] + np.arange(self.lookback + horizon)[None, :]  # (W, L + H)
        both = series[index]
        return both[:, : self.lookback], both[:, self.lookback :]

    def fold_windows(self, ranges, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """The windows of several row ranges, concatenated (no window crosses from one range to the next)."""
        parts = [self.windows_in(start, end, horizon) for start, end in ranges]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ------------------------------------------------------------------------------------------ selection folds

# Rows 4416 and 5832 are 2017-01-01 00:00 and 2017-03-01 00:00: the second half of the training year's winter.
WINTER_BLOCK = (4416, 5832)


@dataclass(frozen=True)
class Fold:
    """A selection fold, all inside rows < VAL_END (the test rows are never read by the selection).

    fit: row ranges whose windows train the fold's models (NLinear and LSTM); stop: the rows whose windows early
    stopping watches, or None: train as many epochs as the official fold's early stopping kept for the same grid
    point (no early stopping); score: the rows whose windows the fold's figure is measured on. No fit window overlaps
    a score window (inputs and targets included)."""

    name: str
    fit: tuple[tuple[int, int], ...]
    stop: tuple[int, int] | None
    score: tuple[int, int]


def selection_folds(lookback: int = LOOKBACK) -> tuple[Fold, ...]:
    """official: the protocol (train on the train rows, early stopping and score on the validation rows);
    winter: the train rows without Jan - Feb 2017 and the 336 h before it (the held-out windows' inputs) train, for
    as many epochs as the official fold's early stopping kept, scored on every window whose inputs and targets lie in
    [2017-01-01 - 336 h, 2017-03-01): what a model trained as long as the protocol's early stopping says does on
    winter weeks it has not seen (it has seen Nov - Dec 2016, as the final models have seen a winter before the
    test winter). The official fold comes first: the winter fold needs its epoch counts."""
    val = (TRAIN_END - lookback, VAL_END)
    start, end = WINTER_BLOCK
    return (Fold("official", ((0, TRAIN_END),), val, val),
            Fold("winter", ((0, start - lookback), (end, TRAIN_END)), None, (start - lookback, end)))


def mse_mae(pred: np.ndarray, obs: np.ndarray) -> dict:
    err = np.asarray(pred, np.float64) - np.asarray(obs, np.float64)
    return {"mse": float(np.mean(err**2)), "mae": float(np.mean(np.abs(err)))}


# ---------------------------------------------------------------------------------------- closed-form NLinear


@dataclass
class NLinear:
    """y = last + (x - last) @ weight + bias: the NLinear forecaster as ridge regression (intercept unpenalized)."""

    weight: np.ndarray  # (L, H)
    bias: np.ndarray  # (H,)
    ridge: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, ridge: float) -> "NLinear":
        last = x[:, -1:]  # (W, 1)
        design = np.hstack([x - last, np.ones((len(x), 1))]).astype(np.float64)  # (W, L + 1)
        target = (y - last).astype(np.float64)  # (W, H)
        penalty = ridge * np.eye(design.shape[1])
        penalty[-1, -1] = 0.0
        solution = np.linalg.solve(design.T @ design + penalty, design.T @ target)  # (L + 1, H)
        return cls(weight=solution[:-1], bias=solution[-1], ridge=ridge)

    def predict(self, x: np.ndarray) -> np.ndarray:
        last = x[:, -1:].astype(np.float64)
        return (x - last) @ self.weight + self.bias + last


def select_nlinear(splits: EttSplits, horizon: int, grid=RIDGE_GRID) -> tuple[NLinear, dict]:
    """Closed-form NLinear with the ridge strength of lowest validation MSE."""
    x_train, y_train = splits.windows("train", horizon)
    x_val, y_val = splits.windows("val", horizon)
    scores = {}
    best = None
    for ridge in grid:
        model = NLinear.fit(x_train, y_train, ridge)
        scores[ridge] = mse_mae(model.predict(x_val), y_val)["mse"]
        if best is None or scores[ridge] < scores[best.ridge]:
            best = model
    return best, {str(k): v for k, v in scores.items()}


# ------------------------------------------------------------------------------------------------ our model


@dataclass
class EttConfig:
    horizon: int = 96
    lookback: int = LOOKBACK
    segment: int = 24  # hours per LSTM step: 336 h = 14 day-long segments
    hidden_size: int = 32
    num_layers: int = 1
    decoder: str = "last"  # last: a direct head on the last LSTM state; pmr: SegRNN's parallel multi-step decoding
    dropout: float = 0.3
    learning_rate: float = 3e-4
    weight_decay: float = 0.01
    batch_size: int = 128
    epochs: int = 30
    patience: int = 10  # epochs without a validation improvement before stopping (the first ones often add noise)
    members: int = 3  # independently trained LSTM branches whose corrections are averaged (variance reduction)
    strength: float = 1.0  # the forecast is linear path + strength x the LSTM correction (set after training)
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1  # the model is small: a second thread costs more in synchronisation than it saves


def _torch():
    import torch  # the training extra; kept out of module import so `--help` and the data checks need no torch

    return torch


def build_model(cfg: EttConfig, linear: NLinear):
    torch = _torch()
    nn = torch.nn

    class SegmentLSTM(nn.Module):
        """(B, L, 1) z-scored history -> (B, H, 1) z-scored forecast: frozen NLinear path + LSTM correction."""

        strategy = "mimo"

        def __init__(self) -> None:
            super().__init__()
            if cfg.lookback % cfg.segment:
                raise ValueError(f"lookback {cfg.lookback} must be a multiple of segment {cfg.segment}")
            self.segments = cfg.lookback // cfg.segment
            self.linear = nn.Linear(cfg.lookback, cfg.horizon)
            with torch.no_grad():
                self.linear.weight.copy_(torch.from_numpy(linear.weight.T.astype(np.float32)))  # (H, L)
                self.linear.bias.copy_(torch.from_numpy(linear.bias.astype(np.float32)))
            self.linear.requires_grad_(False)  # the closed-form optimum of the linear path stays as it is
            if not 0.0 < cfg.strength <= 1.0:
                raise ValueError(f"strength must be in (0, 1], got {cfg.strength}")
            self.register_buffer("strength", torch.tensor(float(cfg.strength)))  # exported with the graph
            self.embed = nn.Linear(cfg.segment, cfg.hidden_size)
            self.lstm = nn.LSTM(cfg.hidden_size, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True,
                                dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
            self.dropout = nn.Dropout(cfg.dropout)
            if cfg.decoder == "pmr":
                # One more LSTM step per output segment, all in parallel, each from the encoder's state with a
                # learned position embedding as input; the head maps each step to its segment of the horizon.
                self.out_segments = -(-cfg.horizon // cfg.segment)
                self.position = nn.Parameter(0.1 * torch.randn(self.out_segments, cfg.hidden_size))
                self.head = nn.Linear(cfg.hidden_size, cfg.segment)
            elif cfg.decoder == "last":
                self.head = nn.Linear(cfg.hidden_size, cfg.horizon)
            else:
                raise ValueError(f"decoder must be 'last' or 'pmr', got {cfg.decoder!r}")
            nn.init.zeros_(self.head.weight)  # training starts from the linear path alone
            nn.init.zeros_(self.head.bias)

        def forward(self, x):
            series = x[:, :, 0]  # (B, L)
            last = series[:, -1:]  # (B, 1)
            centred = series - last  # (B, L)
            spread = torch.sqrt(((centred - centred.mean(dim=1, keepdim=True)) ** 2).mean(dim=1, keepdim=True)) + 1e-3  # (B, 1)
            segments = (centred / spread).reshape(-1, self.segments, cfg.segment)  # (B, N, S)
            embedded = self.dropout(torch.relu(self.embed(segments)))  # (B, N, D)
            _, (hidden, cell) = self.lstm(embedded)  # hidden, cell: (layers, B, D)
            if cfg.decoder == "pmr":
                batch, m = series.shape[0], self.out_segments
                steps = self.position.unsqueeze(0).expand(batch, -1, -1).reshape(batch * m, 1, -1)  # (B*M, 1, D)
                state = (hidden.repeat_interleave(m, dim=1), cell.repeat_interleave(m, dim=1))  # (layers, B*M, D) each
                decoded, _ = self.lstm(steps, state)  # (B*M, 1, D)
                correction = self.head(self.dropout(decoded)).reshape(batch, m * cfg.segment)[:, : cfg.horizon]  # (B, H)
            else:
                correction = self.head(self.dropout(hidden[-1]))  # (B, H)
            correction = correction * spread * self.strength  # back from instance-normalized units, scaled
            forecast = last + self.linear(centred) + correction  # (B, H)
            return forecast.unsqueeze(-1)  # (B, H, 1)

        def describe(self) -> dict:
            return {"type": "segment_lstm", "segment": cfg.segment, "hidden_size": cfg.hidden_size, "decoder": cfg.decoder,
                    "strength": float(self.strength), "num_layers": cfg.num_layers, "dropout": cfg.dropout,
                    "head": ("direct multi-output head on the last LSTM state" if cfg.decoder == "last" else
                             "SegRNN parallel multi-step decoding") + ", in instance-normalized units, times strength",
                    "skip": f"frozen closed-form NLinear path (ridge {linear.ridge:g})",
                    "normalization": "subtract the last value; LSTM branch divided by the window's spread"}

    return SegmentLSTM()


def _mse(model, x, y) -> float:
    torch = _torch()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(x[i : i + 1024]) for i in range(0, len(x), 1024)])
    return float(((pred - y) ** 2).mean())


def train(cfg: EttConfig, splits: EttSplits, linear: NLinear, log=print, fold: Fold | None = None) -> tuple[object, list[dict]]:
    """Adam(W) on the LSTM branch, MSE, clipping, early stopping on validation MSE; returns the best model.

    fold: train on its fit rows and early-stop on its stop rows (default: the protocol's train and validation rows);
    a fold without stop rows trains exactly cfg.epochs epochs and keeps the last state (best_val is then NaN)."""
    torch = _torch()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)
    model = build_model(cfg, linear)
    fold = fold or selection_folds(cfg.lookback)[0]
    x_train, y_train = (torch.from_numpy(a[..., None]) for a in splits.fold_windows(fold.fit, cfg.horizon))  # (W, L, 1), (W, H, 1)
    if fold.stop is not None:
        x_val, y_val = (torch.from_numpy(a[..., None]) for a in splits.windows_in(*fold.stop, cfg.horizon))
    evaluate = (lambda: _mse(model, x_val, y_val)) if fold.stop is not None else (lambda: float("nan"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    best_val = evaluate()  # epoch 0 = the linear path alone
    best_state, best_epoch, stale = copy.deepcopy(model.state_dict()), 0, 0
    history = [{"epoch": 0, "val_mse": best_val}]
    for epoch in range(1, cfg.epochs + 1):
        began = time.perf_counter()
        model.train()
        order = torch.from_numpy(np_rng.permutation(len(x_train)))
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            batch = order[i : i + cfg.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(x_train[batch]), y_train[batch])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            optimizer.step()
            total += float(loss.detach()) * len(batch)
        val = evaluate()
        history.append({"epoch": epoch, "train_mse": total / len(order), "val_mse": val,
                        "seconds": round(time.perf_counter() - began, 2)})
        if val < best_val or (fold.stop is None and epoch == cfg.epochs):  # fixed length: the last epoch's state
            best_val, best_state, best_epoch, stale = val, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
        log(f"  H={cfg.horizon} seed {cfg.seed} epoch {epoch}: train {total / len(order):.4f} val {val:.5f}"
            f"{' *' if best_epoch == epoch else ''}")
        if stale >= cfg.patience and fold.stop is not None:
            break
    model.load_state_dict(best_state)
    model.eval()
    model.best_epoch, model.best_val = best_epoch, best_val
    return model, history


def build_average(members: list):
    """One module averaging members that share the linear path: linear path + the mean of their corrections."""
    torch = _torch()

    class AveragedSegmentLSTM(torch.nn.Module):
        strategy = "mimo"

        def __init__(self) -> None:
            super().__init__()
            self.members = torch.nn.ModuleList(members)

        def forward(self, x):
            return torch.stack([member(x) for member in self.members]).mean(dim=0)  # (B, H, 1)

        def describe(self) -> dict:
            return {**members[0].describe(), "members": len(members),
                    "ensemble": "mean of independently trained members (seeds seed*100 + k)"}

    return AveragedSegmentLSTM().eval()


def train_ensemble(cfg: EttConfig, splits: EttSplits, linear: NLinear, log=print) -> tuple[object, list[dict]]:
    """`cfg.members` models with seeds cfg.seed*100 + k, averaged; the history of each member, tagged."""
    if cfg.members == 1:
        return train(cfg, splits, linear, log=log)
    members, history = [], []
    for k in range(cfg.members):
        member, member_history = train(replace(cfg, seed=cfg.seed * 100 + k), splits, linear, log=log)
        members.append(member)
        history += [{"member": k, **h} for h in member_history]
    model = build_average(members)
    x_val, y_val = (_torch().from_numpy(a[..., None]) for a in splits.windows("val", cfg.horizon))
    model.best_epoch = [m.best_epoch for m in members]
    model.best_val = _mse(model, x_val, y_val)
    return model, history


# ---------------------------------------------------------------------------------------- bundle and loader


def write_ett_bundle(model, cfg: EttConfig, splits: EttSplits, out_dir: str | Path, *, command: str,
                     history: list[dict], extra: dict, data: EttData = ETTH1) -> dict:
    """Export (verified against PyTorch), measure the exported model through the daemon's loader, write the bundle."""
    from training.bundle import DEFAULT_THRESHOLDS, EWMA_ALPHA
    from training.export import OnnxPredictor, export_onnx, utc_now, write_bundle

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        onnx_info = export_onnx(model, onnx_path, cfg.lookback, 1, cfg.seed)
        x_val, y_val = splits.windows("val", cfg.horizon)
        residual = y_val - OnnxPredictor(onnx_path, threads=cfg.threads)(x_val[..., None])[..., 0]  # (W, H)
        manifest = {
            "schema_version": 1, "name": f"{data.slug}-h{cfg.horizon}", "version": "1.0.0", "created_at": utc_now(),
            "features": [TARGET], "targets": [TARGET], "lookback": cfg.lookback, "horizon": cfg.horizon,
            "sampling_period_s": PERIOD_S,
            "scaler": {"type": "standard", "params": {TARGET: {"mean": splits.mean, "std": splits.std}},
                       "fitted_on": f"train rows [0, {TRAIN_END}) (ddof 0)"},
            "strategy": "mimo",
            "architecture": model.describe(),
            "preprocessing": {"difference": False, "in_graph": True},
            "training": {"command": command, "config": asdict(cfg), "seed": cfg.seed, "best_epoch": model.best_epoch,
                         "train_rows": TRAIN_END, "val_rows": VAL_END - TRAIN_END, "test_rows": TEST_END - VAL_END,
                         "train_windows": int(TRAIN_END - cfg.lookback - cfg.horizon + 1),
                         "data": {"dataset": data.name, "file": data.file, "sha256": data.sha256,
                                  "published_file": data.published_file, "target": TARGET,
                                  "protocol": "Informer/DLinear long-horizon, L=336"},
                         "history": history},
            "onnx": onnx_info,
            "metrics": {},
            "calibration": {"residual_mean": residual.mean(axis=0)[:, None].tolist(),
                            "residual_std": np.maximum(residual.std(axis=0), 1e-6)[:, None].tolist(),
                            "ewma_alpha": EWMA_ALPHA, "thresholds": dict(DEFAULT_THRESHOLDS),
                            "source": "validation residual statistics, default thresholds",
                            # prediction intervals from the same validation residuals (training/intervals.py)
                            "intervals": ett_interval_table(residual, x_val)},
        }
        staged = Path(tmp) / "bundle"
        write_bundle(staged, onnx_path, manifest)
        metrics = evaluate_bundle(staged, splits, threads=cfg.threads)
        metrics["test"]["interval_coverage"] = interval_coverage(staged, splits, threads=cfg.threads)
        manifest["metrics"] = {**metrics, **extra}
        write_bundle(out_dir, onnx_path, manifest)
    return manifest


def ett_interval_table(residual: np.ndarray, x_val: np.ndarray) -> dict:
    """`calibration.intervals` from the validation residuals (W, H) and their input windows (W, L), z-scored:
    split-conformal, and normalized by the window's scale where the validation blocks choose it
    (training.intervals.interval_table)."""
    from training.intervals import interval_table

    return interval_table(np.asarray(residual, np.float64)[..., None], inputs=np.asarray(x_val, np.float64)[..., None])


def interval_coverage(folder: str | Path, splits: EttSplits, split: str = "test", threads: int = 2) -> dict | None:
    """The bundle's interval coverage on the windows of `split` (both methods; training.intervals.coverage_arrays),
    forecasts through the daemon's loader in original units."""
    from agent.core.model import load_bundle
    from training.intervals import coverage_arrays

    bundle = load_bundle(folder, intra_op_threads=threads)
    x_raw, y_raw = splits.windows(split, bundle.horizon, scaled=False)
    x_scaled, _ = splits.windows(split, bundle.horizon)
    forecast = np.concatenate([bundle.predict(x_raw[i : i + 512, :, None]) for i in range(0, len(x_raw), 512)])  # (W, H, 1)
    return coverage_arrays(bundle.manifest, x_scaled[..., None], forecast.astype(np.float64),
                           y_raw[..., None].astype(np.float64), bundle.targets, split)


def add_intervals(folder: str | Path, splits: EttSplits, threads: int = 2) -> dict:
    """Fit the interval table of an existing bundle (model, forecasts and their metrics unchanged) from its validation
    residuals, as write_ett_bundle does for a new one, and add it and its test coverage to the manifest."""
    from agent.core.model import load_bundle

    folder = Path(folder)
    bundle = load_bundle(folder, intra_op_threads=threads)
    x_val, y_val = splits.windows("val", bundle.horizon)  # (W, L), (W, H) z-scored
    forecast = np.concatenate([bundle.run_scaled(np.ascontiguousarray(x_val[i : i + 512, :, None]))
                               for i in range(0, len(x_val), 512)])[..., 0]  # (W, H) the ONNX on z-scored inputs
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    manifest["calibration"]["intervals"] = ett_interval_table(y_val - forecast, x_val)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    manifest["metrics"]["test"]["interval_coverage"] = interval_coverage(folder, splits, threads=threads)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def evaluate_bundle(folder: str | Path, splits: EttSplits, threads: int = 2) -> dict:
    """MSE/MAE of a bundle on the validation and test windows through agent.core.model.load_bundle (original units)."""
    from agent.core.model import load_bundle

    bundle = load_bundle(folder, intra_op_threads=threads)
    out = {}
    for split in ("val", "test"):
        x_raw, _ = splits.windows(split, bundle.horizon, scaled=False)
        _, y_scaled = splits.windows(split, bundle.horizon)
        forecast = np.concatenate([bundle.predict(x_raw[i : i + 512, :, None]) for i in range(0, len(x_raw), 512)])  # (W, H, 1)
        forecast_scaled = (forecast[..., 0].astype(np.float64) - splits.mean) / splits.std  # (W, H)
        out[split] = {**mse_mae(forecast_scaled, y_scaled), "windows": int(len(x_raw))}
    return {"validation": out["val"], "test": out["test"]}


# ------------------------------------------------------------------------------------------------ benchmark


SEARCH_SPACE = {"decoder": ("last", "pmr"), "segment": (24, 48), "hidden_size": (32, 64)}
STRENGTHS = (1.0, 0.5, 0.25)  # how strongly the LSTM correction acts: chosen by the folds with the grid point


def set_strength(model, strength: float) -> None:
    """Scale the LSTM correction of a trained model (every member of an average) by `strength`."""
    for name, buffer in model.named_buffers():
        if name.split(".")[-1] == "strength":
            buffer.fill_(float(strength))


def _predict(model, x: np.ndarray) -> np.ndarray:
    torch = _torch()
    model.eval()
    with torch.no_grad():
        pred = [model(torch.from_numpy(x[i : i + 1024, :, None]))[..., 0] for i in range(0, len(x), 1024)]
    return torch.cat(pred).numpy().astype(np.float64)  # (W, H)


def select_by_folds(splits: EttSplits, base: EttConfig, nlinear: NLinear, seed: int, log=print) -> tuple[EttConfig, list[dict]]:
    """The second final run's selection: every grid point (one member, `seed`) trained on each fold (the winter fold
    for as many epochs as the official fold's early stopping kept); the strength applied afterwards; score = mean over the folds of (fold MSE / the fold's linear-path MSE); the choice is the
    lowest score among the (point, strength) pairs whose official-fold model kept an LSTM correction (best epoch > 0)
    and that lower the MSE in every fold; if there is none, among those that kept a correction.

    Each fold's linear path is the closed-form NLinear with the horizon's ridge (chosen on the validation rows as
    before), fitted on that fold's fit rows. Returns the chosen config (strength included) and every trial."""
    folds = selection_folds(base.lookback)
    scored = {}
    for fold in folds:
        linear = nlinear if fold.fit == ((0, TRAIN_END),) else NLinear.fit(*splits.fold_windows(fold.fit, base.horizon), nlinear.ridge)
        x, y = splits.windows_in(*fold.score, base.horizon)
        linear_pred = linear.predict(x)
        scored[fold.name] = (fold, linear, x, y, linear_pred, mse_mae(linear_pred, y)["mse"])
    trials = []
    for values in itertools.product(*SEARCH_SPACE.values()):
        point = dict(zip(SEARCH_SPACE, values))
        cfg = replace(base, seed=seed, members=1, strength=1.0, **point)
        per_fold = {}
        for name, (fold, linear, x, y, linear_pred, linear_mse) in scored.items():
            if fold.stop is not None:
                model, _ = train(cfg, splits, linear, log=lambda *_: None, fold=fold)
                correction = _predict(model, x) - linear_pred  # (W, H)
            elif per_fold["official"]["best_epoch"] > 0:  # as many epochs as the official fold kept
                model, _ = train(replace(cfg, epochs=per_fold["official"]["best_epoch"]), splits, linear, log=lambda *_: None, fold=fold)
                correction = _predict(model, x) - linear_pred
            else:  # the official fold kept no correction: neither does this one (and the point is not eligible)
                model, correction = None, np.zeros_like(linear_pred)
            per_fold[name] = {"best_epoch": model.best_epoch if model is not None else 0, "linear_mse": linear_mse,
                              "mse": {a: mse_mae(linear_pred + a * correction, y)["mse"] for a in STRENGTHS}}
        for a in STRENGTHS:
            ratios = {name: f["mse"][a] / f["linear_mse"] for name, f in per_fold.items()}
            trials.append({**point, "strength": a, "score": float(np.mean(list(ratios.values()))), "fold_ratio": ratios,
                           "fold_mse": {name: f["mse"][a] for name, f in per_fold.items()},
                           "fold_linear_mse": {name: f["linear_mse"] for name, f in per_fold.items()},
                           "best_epoch": {name: f["best_epoch"] for name, f in per_fold.items()},
                           "has_lstm": per_fold["official"]["best_epoch"] > 0,
                           "improves_every_fold": all(r < 1.0 - 1e-6 for r in ratios.values())})
        log(f"  folds H={base.horizon} {point}: " + "; ".join(
            f"{name} {f['linear_mse']:.5f} -> " + "/".join(f"{f['mse'][a]:.5f}" for a in STRENGTHS) + f" (epoch {f['best_epoch']})"
            for name, f in per_fold.items()) + f"  [strength {'/'.join(f'{a:g}' for a in STRENGTHS)}]")
    eligible = ([t for t in trials if t["has_lstm"] and t["improves_every_fold"]]
                or [t for t in trials if t["has_lstm"]] or trials)
    best = min(eligible, key=lambda t: t["score"])
    chosen = replace(base, strength=best["strength"], **{k: best[k] for k in SEARCH_SPACE})
    log(f"  chosen H={base.horizon}: {', '.join(f'{k}={best[k]}' for k in SEARCH_SPACE)}, strength {best['strength']:g}; "
        f"mean fold ratio {best['score']:.4f} (" + ", ".join(f"{k} {v:.4f}" for k, v in best["fold_ratio"].items()) + ")")
    return chosen, trials


def run_horizon(splits: EttSplits, horizon: int, seeds: list[int], models_dir: Path, command: str, *,
                search: bool = True, base: EttConfig | None = None, log=print, data: EttData = ETTH1) -> dict:
    began = time.perf_counter()
    base = replace(base or EttConfig(), horizon=horizon)
    x_val, y_val = splits.windows("val", horizon)
    x_test, y_test = splits.windows("test", horizon)
    repeat_last = {"validation": mse_mae(np.repeat(x_val[:, -1:], horizon, 1), y_val),
                   "test": mse_mae(np.repeat(x_test[:, -1:], horizon, 1), y_test)}
    nlinear, ridge_scores = select_nlinear(splits, horizon)
    closed_form = {"validation": mse_mae(nlinear.predict(x_val), y_val), "test": mse_mae(nlinear.predict(x_test), y_test),
                   "ridge": nlinear.ridge, "ridge_validation_mse": ridge_scores}
    log(f"H={horizon}: repeat-last val {repeat_last['validation']['mse']:.4f}; NLinear (closed form, ridge "
        f"{nlinear.ridge:g}) val {closed_form['validation']['mse']:.4f}")

    # Hyperparameters and strength: the selection folds (rows < 11520 only; the test rows are not looked at).
    trials = []
    chosen = base
    if search:
        chosen, trials = select_by_folds(splits, base, nlinear, seeds[0], log=log)

    runs = []
    for seed in seeds:
        cfg = replace(chosen, seed=seed)
        model, history = train_ensemble(replace(cfg, strength=1.0), splits, nlinear, log=log)  # trained at full strength
        set_strength(model, cfg.strength)  # then scaled as the folds chose
        model.best_val = _mse(model, *(_torch().from_numpy(a[..., None]) for a in splits.windows("val", horizon)))
        folder = models_dir / f".{data.slug}-h{horizon}-seed{seed}"
        extra = {"repeat_last": repeat_last, "nlinear_closed_form": closed_form, "published": published_rows(data, horizon)}
        manifest = write_ett_bundle(model, cfg, splits, folder, command=command, history=history, extra=extra, data=data)
        m = manifest["metrics"]
        runs.append({"seed": seed, "folder": folder, "best_epoch": model.best_epoch, "torch_val_mse": model.best_val,
                     "validation": m["validation"], "test": m["test"], "onnx_max_abs_diff": manifest["onnx"]["verified"]["max_abs_diff"]})
        log(f"H={horizon} seed {seed}: exported model (daemon loader) val {m['validation']['mse']:.5f} "
            f"test {m['test']['mse']:.5f} (best epoch {model.best_epoch})")

    chosen_run = min(runs, key=lambda r: r["validation"]["mse"])  # the shipped bundle: best validation
    final = models_dir / f"{data.slug}-h{horizon}"
    import shutil

    if final.exists():
        shutil.rmtree(final)
    chosen_run["folder"].rename(final)
    for r in runs:
        if r is not chosen_run and r["folder"].exists():
            shutil.rmtree(r["folder"])
        r["folder"] = str(final) if r is chosen_run else None
    chosen_trial = next((t for t in trials if t["strength"] == chosen.strength
                         and all(t[k] == getattr(chosen, k) for k in SEARCH_SPACE)), None)
    test_mse = np.array([r["test"]["mse"] for r in runs])
    test_mae = np.array([r["test"]["mae"] for r in runs])
    val_mse = np.array([r["validation"]["mse"] for r in runs])
    return {
        "dataset": data.name, "horizon": horizon, "windows": {"validation": int(len(x_val)), "test": int(len(x_test))},
        "repeat_last": repeat_last, "nlinear_closed_form": closed_form,
        "published": published_rows(data, horizon),  # None: no published figures for this dataset
        "search": trials, "config": asdict(chosen),
        "chosen_trial": chosen_trial,
        "seeds": [{k: v for k, v in r.items()} for r in runs],
        "model": {"bundle": str(final), "seed": chosen_run["seed"], "validation": chosen_run["validation"], "test": chosen_run["test"],
                  "test_mse_mean": float(test_mse.mean()), "test_mse_std": float(test_mse.std()),
                  "test_mae_mean": float(test_mae.mean()), "test_mae_std": float(test_mae.std()),
                  "val_mse_mean": float(val_mse.mean()), "val_mse_std": float(val_mse.std())},
        "ablation": {"linear_path_alone_val_mse": closed_form["validation"]["mse"],
                     "with_lstm_val_mse_per_seed": [r["validation"]["mse"] for r in runs],
                     # per seed: did the LSTM branch lower validation MSE beyond float32 noise? (all-zero heads, i.e.
                     # early stopping at epoch 0 in every member, give the linear path's figure to ~1e-6)
                     "lstm_improves_validation": [bool(v < closed_form["validation"]["mse"] - 1e-5) for v in val_mse],
                     "selection_folds": None if not trials else {
                         name: {"linear_path_mse": chosen_trial["fold_linear_mse"][name], "with_lstm_mse": chosen_trial["fold_mse"][name],
                                "lstm_improves": bool(chosen_trial["fold_mse"][name] < chosen_trial["fold_linear_mse"][name] - 1e-6)}
                         for name in chosen_trial["fold_mse"]}},
        "seconds": round(time.perf_counter() - began, 1),
    }


def markdown_table(results: list[dict], meta: dict) -> str:
    name = meta.get("dataset", "ETTh1")
    lines = [f"{name}, univariate (OT), lookback {LOOKBACK}; MSE / MAE on z-scored values over every stride-1 test window.",
             data_line(meta),
             f"Our model: the exported ONNX bundle run through the daemon's loader; the bundle is the seed with the best "
             f"validation MSE of seeds {meta['seeds']}; mean ± std over those seeds below it.",
             f"`{meta['command']}`: {meta['seconds'] / 60:.1f} min on {meta['machine']}.", "",
             "| model | " + " | ".join(f"H={r['horizon']}" for r in results) + " |",
             "|---|" + "---:|" * len(results)]

    def row(label, cells):
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("repeat last value", [f"{r['repeat_last']['test']['mse']:.4f} / {r['repeat_last']['test']['mae']:.4f}" for r in results])
    published_models = list(dict.fromkeys(m for r in results for m in (r.get("published") or {})))
    for model in published_models:
        row(f"{model} (published)", [f"{r['published'][model]['mse']:.3f} / {r['published'][model]['mae']:.3f}"
                                     if (r.get("published") or {}).get(model) else "-" for r in results])
    row("NLinear, closed form (ours; = ablation: linear path alone)",
        [f"{r['nlinear_closed_form']['test']['mse']:.4f} / {r['nlinear_closed_form']['test']['mae']:.4f}" for r in results])
    row("**SegmentLSTM (ours), the bundle**", [f"**{r['model']['test']['mse']:.4f}** / {r['model']['test']['mae']:.4f}" for r in results])
    row("SegmentLSTM, mean ± std over seeds",
        [f"{r['model']['test_mse_mean']:.4f} ± {r['model']['test_mse_std']:.4f}" for r in results])
    if "NLinear" in published_models:
        label = "met: bundle MSE <= NLinear published"
        if meta.get("published_file") is False:
            label += f" (but the data file is not the published {name} file)"
        row(label, ["yes" if r["model"]["test"]["mse"] <= r["published"]["NLinear"]["mse"] else "NO"
                    if (r.get("published") or {}).get("NLinear") else "-" for r in results])
    else:
        lines += ["", f"No published figures for {name} in this code (training/ett.py PUBLISHED_BY_DATASET): "
                      "nothing to compare with."]
    lines += ["", "Validation MSE (model selection; the ablation):", "",
              "| | " + " | ".join(f"H={r['horizon']}" for r in results) + " |", "|---|" + "---:|" * len(results)]
    row("repeat last value", [f"{r['repeat_last']['validation']['mse']:.4f}" for r in results])
    row("linear path alone (closed-form NLinear)", [f"{r['nlinear_closed_form']['validation']['mse']:.5f}" for r in results])
    row("with the LSTM, per seed", [", ".join(f"{v:.5f}" for v in r["ablation"]["with_lstm_val_mse_per_seed"]) for r in results])
    row("chosen (decoder, segment, hidden, strength)",
        [f"{r['config']['decoder']}, {r['config']['segment']}, {r['config']['hidden_size']}, {r['config']['strength']:g}" for r in results])
    for fold in ("official", "winter"):
        row(f"selection fold {fold}: linear path -> with the LSTM (seed {meta['seeds'][0]}, one member)",
            [f"{r['chosen_trial']['fold_linear_mse'][fold]:.5f} -> {r['chosen_trial']['fold_mse'][fold]:.5f}"
             if r.get("chosen_trial") else "-" for r in results])
    return "\n".join(lines) + "\n"


def data_line(meta: dict) -> str:
    """Which file the table is about, and whether it is the published one."""
    name, sha = meta.get("dataset", "ETTh1"), meta.get("data_sha256")
    head = f"Data: `{meta.get('data_file', name + '.csv')}`, sha256 {sha}"
    published = meta.get("published_file")
    if published is True:
        return f"{head}: the published {name} file."
    if published is False:
        return f"{head}: NOT the published {name} file (sha256 {PUBLISHED_SHA256.get(name)}); not comparable with its published figures."
    return f"{head}: no published sha256 known for {name}, so the file cannot be checked."


def sha256_report(data: EttData) -> tuple[str, bool]:
    """(the sentence about the file's sha256, whether it is a warning)."""
    if data.published_file is True:
        return f"{data.file}: sha256 matches the published {data.name} file", False
    if data.published_file is False:
        return (f"warning: {data.file} is NOT the published {data.name} file: sha256 {data.sha256}, the published file's is "
                f"{data.published_sha256}; the figures of this file are not comparable with the published ones"), True
    same_as = next((name for name, known in PUBLISHED_SHA256.items() if known == data.sha256), None)
    if same_as is not None:
        return (f"note: no published sha256 for {data.name}, but {data.file} is byte for byte the published {same_as} file "
                f"(sha256 {data.sha256}); pass --dataset {same_as} to name it so"), True
    return f"note: no published sha256 for {data.name}: {data.file} (sha256 {data.sha256}) cannot be checked", True


def machine_line() -> str:
    import os
    import platform

    import onnxruntime

    torch = _torch()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__.split('+')[0]}, onnxruntime {onnxruntime.__version__}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=("ett",), help="the benchmark: ett = ETT univariate long-horizon (ETTh1 by default)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="an ETT CSV (default: data/ETTh1.csv)")
    parser.add_argument("--dataset", help="the dataset's name in results, bundle names and manifests, and whose published "
                                          "figures to compare with (default: the file's stem, e.g. ETTh2)")
    parser.add_argument("--horizons", type=int, nargs="+", default=list(HORIZONS), choices=HORIZONS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models-dir", default="exported_models", help="where the <dataset>-h<H> bundles go (etth1-h96, ...)")
    parser.add_argument("--out", default="runs/ett", help="folder for results.json and results.md")
    parser.add_argument("--no-search", action="store_true", help="skip the validation grid; use the defaults")
    parser.add_argument("--epochs", type=int, default=EttConfig.epochs)
    parser.add_argument("--members", type=int, default=EttConfig.members, help="LSTM branches averaged per model")
    parser.add_argument("--threads", type=int, default=EttConfig.threads)
    parser.add_argument("--intervals-only", action="store_true",
                        help="train nothing: fit the prediction-interval tables of the existing <dataset>-h<H> bundles in "
                             "--models-dir from their validation residuals (models and forecasts unchanged) and print "
                             "their test coverage")


def run_intervals_only(args: argparse.Namespace, splits: EttSplits, data: EttData) -> int:
    """`--intervals-only`: add_intervals on each existing bundle, its coverage printed (both methods)."""
    from training.intervals import format_coverage

    done = 0
    for horizon in args.horizons:
        folder = Path(args.models_dir) / f"{data.slug}-h{horizon}"
        if not (folder / "manifest.json").is_file():
            print(f"H={horizon}: no bundle at {folder}; skipped")
            continue
        manifest = add_intervals(folder, splits, threads=args.threads)
        print(f"H={horizon} ({folder}): " + format_coverage(manifest["metrics"]["test"]["interval_coverage"]))
        done += 1
    return 0 if done else 2


def run(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    try:
        raw = load_target(args.data)
    except EttDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        data = EttData(dataset_name(args.data, getattr(args, "dataset", None)), Path(args.data).name, file_sha256(args.data))
    except EttDataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report, warn = sha256_report(data)
    print(report, file=sys.stderr if warn else sys.stdout)
    if data.published is None:
        print(f"no published figures for {data.name}: the results are not compared with published ones "
              f"(known: {', '.join(PUBLISHED_BY_DATASET)})")
    if data.name.lower().startswith("ettm"):
        print(f"note: {data.name} looks like a 15-minute ETT file; this benchmark applies the hourly protocol's row "
              f"borders ({TRAIN_END}/{VAL_END}/{TEST_END}) and a {PERIOD_S} s sampling period, not the 15-minute "
              f"protocol's (4 x the rows)", file=sys.stderr)
    splits = EttSplits.from_series(raw)
    print(f"{data.name} {args.data}: {len(raw)} rows; train z-score mean {splits.mean:.6f} std {splits.std:.6f}")
    if getattr(args, "intervals_only", False):
        return run_intervals_only(args, splits, data)
    command = "python -m training benchmark " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["benchmark"] else sys.argv[1:])
    models_dir = Path(args.models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    if args.members < 1 or args.epochs < 1:
        print("error: --members and --epochs must be at least 1", file=sys.stderr)
        return 2
    base = EttConfig(epochs=args.epochs, threads=args.threads, members=args.members)
    results = [run_horizon(splits, h, args.seeds, models_dir, command, search=not args.no_search, base=base, data=data)
               for h in args.horizons]
    meta = {"command": command, "dataset": data.name, "data_file": data.file, "data_sha256": data.sha256,
            "published_file": data.published_file, "published_source": PUBLISHED_SOURCE if data.published else None,
            "seeds": args.seeds, "machine": machine_line(),
            "seconds": round(time.perf_counter() - began, 1), "train_mean": splits.mean, "train_std": splits.std}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, meta)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(table, encoding="utf-8")
    print()
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}; bundles in {models_dir}/{data.slug}-h*")
    return 0
