"""Data preparation (numpy only): per-device 60 s grid, short-gap forward fill, temporal split, scaler, windows.

Rules (docs/contracts.md): splits are by time per device (70/15/15, never shuffled across splits), a window
lies entirely inside one split, the scaler is fitted on training rows only, and training/validation windows
never overlap a labeled fault.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.synth import FEATURES

SPLITS = ("train", "val", "test")


@dataclass
class DeviceSeries:
    """One device on a regular grid: rows the device did not send are forward-filled when the gap is short."""

    name: str
    ts: np.ndarray  # (N,) int unix seconds on the grid
    values: np.ndarray  # (N, F) original units; NaN where not filled
    observed: np.ndarray  # (N,) bool: the device sent this row
    valid: np.ndarray  # (N,) bool: observed or filled from a short gap
    healthy: np.ndarray  # (N,) bool: no fault label on this row
    bounds: dict[str, tuple[int, int]]  # split -> [lo, hi) row range


@dataclass
class StandardScaler:
    mean: np.ndarray  # (F,)
    std: np.ndarray  # (F,)

    @classmethod
    def fit(cls, rows: np.ndarray) -> "StandardScaler":
        if rows.shape[0] < 2:
            raise ValueError("need at least 2 training rows to fit the scaler")
        std = rows.std(axis=0)
        return cls(mean=rows.mean(axis=0), std=np.where(std > 1e-9, std, 1.0))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return x * self.std + self.mean

    def manifest(self, features: list[str]) -> dict:
        return {"type": "standard",
                "params": {f: {"mean": float(m), "std": float(s)} for f, m, s in zip(features, self.mean, self.std)}}


def to_device_series(rows: dict[str, np.ndarray], period_s: int = 60, max_fill_periods: int = 10,
                     features: list[str] = FEATURES, split_fractions=(0.7, 0.15, 0.15)) -> list[DeviceSeries]:
    """Put every device on its own regular grid and split it by time."""
    if abs(sum(split_fractions) - 1.0) > 1e-9:
        raise ValueError("split fractions must sum to 1")
    out = []
    for name in sorted(set(rows["device"].tolist())):
        mask = rows["device"] == name
        ts = rows["ts"][mask].astype(np.int64)
        order = np.argsort(ts, kind="stable")
        ts = ts[order]
        if np.any(np.diff(ts) == 0):
            raise ValueError(f"device {name}: duplicate timestamps")
        slot = (ts - ts[0]) // period_s  # rows off the grid snap to their slot
        n = int(slot[-1]) + 1
        values = np.full((n, len(features)), np.nan)
        values[slot] = np.stack([rows[f][mask][order] for f in features], axis=1).astype(np.float64)
        observed = np.zeros(n, dtype=bool)
        observed[slot] = True
        healthy = np.ones(n, dtype=bool)
        if "label" in rows:
            healthy[slot] = rows["label"][mask][order] == 0
        valid = observed.copy()
        last, gap = -1, 0
        for i in range(n):  # forward-fill gaps of at most max_fill_periods rows
            if observed[i]:
                if 0 < gap <= max_fill_periods and last >= 0:
                    values[last + 1 : i] = values[last]
                    valid[last + 1 : i] = True
                    healthy[last + 1 : i] = healthy[last] and healthy[i]
                last, gap = i, 0
            else:
                gap += 1
        cut1 = int(round(n * split_fractions[0]))
        cut2 = int(round(n * (split_fractions[0] + split_fractions[1])))
        bounds = {"train": (0, cut1), "val": (cut1, cut2), "test": (cut2, n)}
        grid_ts = ts[0] + np.arange(n, dtype=np.int64) * period_s
        out.append(DeviceSeries(name, grid_ts, values, observed, valid, healthy, bounds))
    return out


def fit_scaler(series: list[DeviceSeries]) -> StandardScaler:
    """Fit on observed, healthy rows of the training split only."""
    parts = []
    for s in series:
        lo, hi = s.bounds["train"]
        keep = s.observed[lo:hi] & s.healthy[lo:hi]
        parts.append(s.values[lo:hi][keep])
    return StandardScaler.fit(np.concatenate(parts))


def window_starts(s: DeviceSeries, split: str, lookback: int, horizon: int, healthy_only: bool = True) -> np.ndarray:
    """Start rows of the windows lying entirely inside `split`: valid inputs, observed targets, no fault."""
    lo, hi = s.bounds[split]
    span = lookback + horizon
    if hi - lo < span:
        return np.zeros(0, dtype=np.int64)
    good_input = s.valid & (s.healthy if healthy_only else True)
    good_target = s.observed & (s.healthy if healthy_only else True)
    bad_in = np.concatenate([[0], np.cumsum(~good_input)])  # prefix counts: O(1) range checks
    bad_out = np.concatenate([[0], np.cumsum(~good_target)])
    starts = np.arange(lo, hi - span + 1)
    ok = (bad_in[starts + lookback] - bad_in[starts] == 0) & (bad_out[starts + span] - bad_out[starts + lookback] == 0)
    return starts[ok]


@dataclass
class Prepared:
    """All devices' scaled rows in one array plus global window start indices per split."""

    features: list[str]
    targets: list[str]
    lookback: int
    horizon: int
    period_s: int
    scaler: StandardScaler
    series: list[DeviceSeries]
    scaled: np.ndarray  # (M, F) float32, devices concatenated; NaN rows never enter a window
    offsets: list[int]  # first row of each device in `scaled`
    starts: dict[str, np.ndarray]  # split -> (W,) global start rows
    rows_per_split: dict[str, int]  # observed healthy rows per split

    @property
    def target_index(self) -> np.ndarray:
        return np.array([self.features.index(t) for t in self.targets])

    def windows(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gather inputs (W, L, F) and targets (W, H, T), scaled, float32."""
        idx = starts[:, None] + np.arange(self.lookback + self.horizon)  # (W, L+H)
        block = self.scaled[idx]  # (W, L+H, F)
        return block[:, : self.lookback], block[:, self.lookback :][:, :, self.target_index]


def prepare(rows: dict[str, np.ndarray], lookback: int = 60, horizon: int = 10, period_s: int = 60,
            features: list[str] = FEATURES, targets: list[str] | None = None, max_fill_periods: int = 10) -> Prepared:
    targets = list(features if targets is None else targets)
    series = to_device_series(rows, period_s, max_fill_periods, features)
    scaler = fit_scaler(series)
    offsets, parts, starts = [], [], {k: [] for k in SPLITS}
    rows_per_split = {k: 0 for k in SPLITS}
    total = 0
    for s in series:
        offsets.append(total)
        parts.append(scaler.transform(s.values).astype(np.float32))
        for split in SPLITS:
            starts[split].append(window_starts(s, split, lookback, horizon) + total)
            lo, hi = s.bounds[split]
            rows_per_split[split] += int((s.observed[lo:hi] & s.healthy[lo:hi]).sum())
        total += s.values.shape[0]
    merged = {k: np.concatenate(v).astype(np.int64) for k, v in starts.items()}
    for split in SPLITS:
        if merged[split].size == 0:
            raise ValueError(f"no healthy {split} windows: the data is too short for lookback {lookback} + horizon {horizon}")
    return Prepared(list(features), targets, lookback, horizon, period_s, scaler, series,
                    np.concatenate(parts), offsets, merged, rows_per_split)
