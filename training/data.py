"""Data preparation (numpy; pandas only to read CSV/Parquet): per-device fixed grid, gap filling, temporal
splits, a scaler fitted on training rows, sliding windows (lookback L -> next H steps).

Rules (docs/contracts.md): splits are by time per device (default 70/15/15, or explicit row/time borders; never
shuffled across splits), a window lies entirely inside one split, the scaler is fitted on training rows only,
and training/validation windows never overlap a labeled fault or a gap longer than `max_fill_periods`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simulation.synth import FEATURES

SPLITS = ("train", "val", "test")
FILL_METHODS = ("ffill", "linear")
SCALER_TYPES = ("standard", "minmax")


@dataclass
class DeviceSeries:
    """One device on a regular grid: rows the device did not send are filled when the gap is short."""

    name: str
    ts: np.ndarray  # (N,) int unix seconds on the grid
    values: np.ndarray  # (N, F) original units; NaN where not filled
    observed: np.ndarray  # (N,) bool: the device sent this row
    valid: np.ndarray  # (N,) bool: observed or filled from a short gap
    healthy: np.ndarray  # (N,) bool: no fault label on this row
    bounds: dict[str, tuple[int, int]]  # split -> [lo, hi) row range


# ------------------------------------------------------------------------------------------------ scalers
# Both scalers expose scaled = (x - offset) / scale. `mean`/`std` are the same two arrays under the names
# older code (calibration) uses, so every consumer works with either scaler.


class _AffineScaler:
    """scaled = (x - offset) / scale; subclasses say what offset and scale are."""

    offset: np.ndarray
    scale: np.ndarray

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.offset) / self.scale

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return x * self.scale + self.offset


@dataclass
class StandardScaler(_AffineScaler):
    mean: np.ndarray  # (F,)
    std: np.ndarray  # (F,)
    type = "standard"

    @classmethod
    def fit(cls, rows: np.ndarray) -> "StandardScaler":
        if rows.shape[0] < 2:
            raise ValueError("need at least 2 training rows to fit the scaler")
        std = rows.std(axis=0)
        return cls(mean=rows.mean(axis=0), std=np.where(std > 1e-9, std, 1.0))

    @property
    def offset(self) -> np.ndarray:
        return self.mean

    @property
    def scale(self) -> np.ndarray:
        return self.std

    def manifest(self, features: list[str]) -> dict:
        return {"type": "standard",
                "params": {f: {"mean": float(m), "std": float(s)} for f, m, s in zip(features, self.mean, self.std)}}


@dataclass
class MinMaxScaler(_AffineScaler):
    min: np.ndarray  # (F,)
    max: np.ndarray  # (F,)
    type = "minmax"

    @classmethod
    def fit(cls, rows: np.ndarray) -> "MinMaxScaler":
        if rows.shape[0] < 2:
            raise ValueError("need at least 2 training rows to fit the scaler")
        lo, hi = rows.min(axis=0), rows.max(axis=0)
        return cls(min=lo, max=np.where(hi - lo > 1e-9, hi, lo + 1.0))

    @property
    def offset(self) -> np.ndarray:
        return self.min

    @property
    def scale(self) -> np.ndarray:
        return self.max - self.min

    mean = offset  # aliases: see the note above
    std = scale

    def manifest(self, features: list[str]) -> dict:
        return {"type": "minmax",
                "params": {f: {"min": float(a), "max": float(b)} for f, a, b in zip(features, self.min, self.max)}}


# ------------------------------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class Split:
    """How each device's grid is cut into train / val / test, in time order.

    `fractions` (default 70/15/15), or `rows` = (train_end, val_end) grid-row borders, or `times` =
    (t_val, t_test) unix seconds (train < t_val <= val < t_test <= test). `train_start` (a fraction of the
    series) drops the oldest rows from training: the sliding-window form of time-series cross-validation.
    """

    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    rows: tuple[int, int] | None = None
    times: tuple[float, float] | None = None
    train_start: float = 0.0

    def bounds(self, grid_ts: np.ndarray) -> dict[str, tuple[int, int]]:
        n = len(grid_ts)
        if self.rows is not None:
            cut1, cut2 = (min(max(int(r), 0), n) for r in self.rows)
        elif self.times is not None:
            cut1, cut2 = (int(np.searchsorted(grid_ts, t, side="left")) for t in self.times)
        else:
            if abs(sum(self.fractions) - 1.0) > 1e-9 or min(self.fractions) < 0:
                raise ValueError(f"split fractions must be >= 0 and sum to 1, got {self.fractions}")
            cut1 = int(round(n * self.fractions[0]))
            cut2 = int(round(n * (self.fractions[0] + self.fractions[1])))
        if not 0 <= cut1 <= cut2 <= n:
            raise ValueError(f"split borders must be increasing, got {cut1}, {cut2} for {n} rows")
        start = min(int(round(n * self.train_start)), cut1)
        return {"train": (start, cut1), "val": (cut1, cut2), "test": (cut2, n)}


# ------------------------------------------------------------------------------------------------ loading


def load_table(path: str | Path, timestamp: str | None = None, device: str | None = "device",
               features: list[str] | None = None, label: str = "label") -> tuple[dict[str, np.ndarray], list[str]]:
    """Read a CSV or Parquet file into columns: `ts` (unix seconds), `device`, the features, `label`.

    The timestamp column is `timestamp` (--ts-column), or when None the first column named ts, timestamp, time,
    datetime or date, any case (agent.tools.replay.find_ts_column, the rule of every command).
    Timestamps may be numbers (unix seconds) or date strings (ISO-8601, UTC unless they say otherwise).
    Without a device column the whole file is one series named "series". Features default to every numeric
    column other than the timestamp, device and label.
    """
    import pandas as pd

    path = Path(path)
    try:
        frame = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from None
    return rows_from_frame(frame, str(path), timestamp, device, features, label)


def rows_from_frame(frame, source: str, timestamp: str | None = None, device: str | None = "device",
                    features: list[str] | None = None, label: str = "label") -> tuple[dict[str, np.ndarray], list[str]]:
    """load_table's columns from a pandas DataFrame already read (`source` names it in errors); the streaming
    reader (training.stream) hands each device's Parquet rows through here, so both paths parse alike."""
    import pandas as pd

    from agent.tools.replay import find_ts_column

    timestamp = find_ts_column([str(c) for c in frame.columns], timestamp, source)  # a ValueError naming the columns
    stamps = frame[timestamp]
    if pd.api.types.is_numeric_dtype(stamps):
        ts = stamps.to_numpy(dtype=np.float64)
    else:
        try:
            parsed = pd.to_datetime(stamps, utc=True)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{source}: column {timestamp!r} holds unreadable timestamps: {exc}") from None
        ts = (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
    if not np.isfinite(ts).all():
        raise ValueError(f"{source}: column {timestamp!r} has empty or non-finite timestamps")
    skip = {timestamp, label, "fault"} | ({device} if device else set())
    if features is None:
        features = [c for c in frame.columns if c not in skip and pd.api.types.is_numeric_dtype(frame[c])]
    missing = [f for f in features if f not in frame.columns]
    if missing or not features:
        raise ValueError(f"{source}: missing feature column(s) {missing or '(none numeric)'}")
    rows: dict[str, np.ndarray] = {"ts": np.round(ts).astype(np.int64)}
    has_device = bool(device) and device in frame.columns
    rows["device"] = frame[device].astype(str).to_numpy(dtype=object) if has_device else np.full(len(frame), "series", dtype=object)
    for f in features:
        rows[f] = pd.to_numeric(frame[f], errors="coerce").to_numpy(dtype=np.float64)
    rows["label"] = frame[label].fillna(0).to_numpy(dtype=np.int64) if label in frame.columns else np.zeros(len(frame), np.int64)
    return rows, list(features)


# ----------------------------------------------------------------------------------------- grid and gaps


def _fill_gaps(values: np.ndarray, observed: np.ndarray, healthy: np.ndarray, max_fill: int, method: str) -> np.ndarray:
    """Fill runs of at most `max_fill` missing rows between two observed rows in place; return `valid`."""
    valid = observed.copy()
    idx = np.flatnonzero(observed)
    for a, b in zip(idx[:-1], idx[1:]):
        gap = b - a - 1
        if 0 < gap <= max_fill:
            if method == "linear":
                w = (np.arange(1, gap + 1) / (gap + 1))[:, None]  # (gap, 1)
                values[a + 1 : b] = values[a] * (1 - w) + values[b] * w
            else:
                values[a + 1 : b] = values[a]
            valid[a + 1 : b] = True
            healthy[a + 1 : b] = healthy[a] and healthy[b]
    return valid


def to_device_series(rows: dict[str, np.ndarray], period_s: int = 60, max_fill_periods: int = 10,
                     features: list[str] = FEATURES, split_fractions=(0.7, 0.15, 0.15), fill: str = "ffill",
                     split: Split | None = None) -> list[DeviceSeries]:
    """Put every device on its own regular grid (rows in one slot, repeated timestamps included, are averaged),
    fill short gaps, split by time.

    Rows that are missing or hold a non-finite value count as not observed; a gap longer than
    `max_fill_periods` stays NaN so no window spans it.
    """
    if fill not in FILL_METHODS:
        raise ValueError(f"fill must be one of {FILL_METHODS}, got {fill!r}")
    split = split or Split(fractions=tuple(split_fractions))
    if split.rows is None and split.times is None:
        split.bounds(np.zeros(1))  # validates the fractions up front
    out = []
    for name in sorted(set(rows["device"].tolist())):
        mask = rows["device"] == name
        ts = rows["ts"][mask].astype(np.int64)
        order = np.argsort(ts, kind="stable")
        ts = ts[order]  # repeated timestamps are accepted: like any rows in one slot they are averaged (replay takes them too)
        raw = np.stack([rows[f][mask][order] for f in features], axis=1).astype(np.float64)  # (n_rows, F)
        finite = np.isfinite(raw).all(axis=1)
        slot = (ts - ts[0]) // period_s  # resample: rows off the grid fall into their slot, averaged
        n = int(slot[-1]) + 1
        sums = np.zeros((n, len(features)))
        counts = np.zeros(n)
        np.add.at(sums, slot[finite], raw[finite])
        np.add.at(counts, slot[finite], 1)
        observed = counts > 0
        values = np.full((n, len(features)), np.nan)
        values[observed] = sums[observed] / counts[observed][:, None]
        healthy = np.ones(n, dtype=bool)
        if "label" in rows:
            labels = rows["label"][mask][order]
            np.logical_and.at(healthy, slot, labels == 0)
        valid = _fill_gaps(values, observed, healthy, max_fill_periods, fill)
        grid_ts = ts[0] + np.arange(n, dtype=np.int64) * period_s
        out.append(DeviceSeries(name, grid_ts, values, observed, valid, healthy, split.bounds(grid_ts)))
    return out


def gap_report(series: list[DeviceSeries], max_fill_periods: int = 10) -> dict:
    """Per device: grid rows, observed rows, filled rows, gaps by length, and rows lost to long gaps."""
    report = {}
    for s in series:
        missing = np.concatenate([[0], (~s.observed).astype(np.int8), [0]])
        edges = np.flatnonzero(np.diff(missing))
        lengths = edges[1::2] - edges[::2]  # length of each run of missing rows
        report[s.name] = {
            "rows": int(len(s.ts)), "observed": int(s.observed.sum()), "filled": int((s.valid & ~s.observed).sum()),
            "gaps": int(len(lengths)), "longest_gap": int(lengths.max()) if len(lengths) else 0,
            "long_gaps": int((lengths > max_fill_periods).sum()), "rows_in_long_gaps": int(lengths[lengths > max_fill_periods].sum()),
        }
    return report


def fit_scaler(series: list[DeviceSeries], kind: str = "standard"):
    """Fit on observed, healthy rows of the training split only."""
    if kind not in SCALER_TYPES:
        raise ValueError(f"scaler must be one of {SCALER_TYPES}, got {kind!r}")
    parts = []
    for s in series:
        lo, hi = s.bounds["train"]
        keep = s.observed[lo:hi] & s.healthy[lo:hi]
        parts.append(s.values[lo:hi][keep])
    return (StandardScaler if kind == "standard" else MinMaxScaler).fit(np.concatenate(parts))


class ScalerAccumulator:
    """fit_scaler in one pass over blocks of training rows (one device at a time, one rank's devices): counts,
    means and summed squared deviations merged pairwise (Chan, Golub & LeVeque), plus min and max. The result
    equals fit_scaler on all the rows at once up to float64 rounding, and memory is one block, not the fleet.
    `to_array` / `from_array` carry the state between ranks; merging in rank order gives every rank one scaler."""

    def __init__(self, n_features: int):
        self.n = 0
        self.mean = np.zeros(n_features)
        self.m2 = np.zeros(n_features)
        self.min = np.full(n_features, np.inf)
        self.max = np.full(n_features, -np.inf)

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        if rows.shape[0]:
            other = ScalerAccumulator(rows.shape[1])
            other.n, other.mean = rows.shape[0], rows.mean(axis=0)
            other.m2 = ((rows - other.mean) ** 2).sum(axis=0)
            other.min, other.max = rows.min(axis=0), rows.max(axis=0)
            self.merge(other)

    def merge(self, other: "ScalerAccumulator") -> None:
        if other.n == 0:
            return
        total = self.n + other.n
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.n / total)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.n * other.n / total)
        self.n = total
        self.min, self.max = np.minimum(self.min, other.min), np.maximum(self.max, other.max)

    def to_array(self) -> np.ndarray:
        return np.concatenate([[float(self.n)], self.mean, self.m2, self.min, self.max])

    @classmethod
    def from_array(cls, array: np.ndarray) -> "ScalerAccumulator":
        f = (len(array) - 1) // 4
        acc = cls(f)
        acc.n = int(round(array[0]))
        acc.mean, acc.m2, acc.min, acc.max = (np.array(array[1 + i * f : 1 + (i + 1) * f]) for i in range(4))
        return acc

    def scaler(self, kind: str = "standard"):
        """The fitted scaler, with fit_scaler's rules (at least 2 rows, a constant feature gets scale 1)."""
        if kind not in SCALER_TYPES:
            raise ValueError(f"scaler must be one of {SCALER_TYPES}, got {kind!r}")
        if self.n < 2:
            raise ValueError("need at least 2 training rows to fit the scaler")
        if kind == "standard":
            std = np.sqrt(np.maximum(self.m2, 0.0) / self.n)
            return StandardScaler(mean=self.mean.copy(), std=np.where(std > 1e-9, std, 1.0))
        lo, hi = self.min.copy(), self.max.copy()
        return MinMaxScaler(min=lo, max=np.where(hi - lo > 1e-9, hi, lo + 1.0))


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
    scaler: StandardScaler | MinMaxScaler
    series: list[DeviceSeries]
    scaled: np.ndarray  # (M, F) float32, devices concatenated; NaN rows never enter a window
    offsets: list[int]  # first row of each device in `scaled`
    starts: dict[str, np.ndarray]  # split -> (W,) global start rows
    rows_per_split: dict[str, int]  # observed healthy rows per split

    @property
    def target_index(self) -> np.ndarray:
        return np.array([self.features.index(t) for t in self.targets])

    def window_view(self) -> np.ndarray:
        """Every window as a zero-copy strided view (M - L - H + 1, L + H, F); indexing it copies one batch."""
        view = np.lib.stride_tricks.sliding_window_view(self.scaled, self.lookback + self.horizon, axis=0)
        return view.transpose(0, 2, 1)  # (W, L+H, F)

    def windows(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gather inputs (W, L, F) and targets (W, H, T), scaled, float32."""
        block = self.window_view()[starts]  # (W, L+H, F), a copy of just these windows
        return np.ascontiguousarray(block[:, : self.lookback]), np.ascontiguousarray(block[:, self.lookback :][:, :, self.target_index])


def prepare(rows: dict[str, np.ndarray], lookback: int = 60, horizon: int = 10, period_s: int = 60,
            features: list[str] = FEATURES, targets: list[str] | None = None, max_fill_periods: int = 10,
            scaler: str = "standard", fill: str = "ffill", split: Split | None = None,
            required_splits: tuple[str, ...] = SPLITS, fitted_scaler=None) -> Prepared:
    """Grid, fill, split, scale and index the windows. `fitted_scaler` reuses a scaler (fine-tuning a bundle
    keeps the bundle's own scaling) instead of fitting one on the training rows."""
    targets = list(features if targets is None else targets)
    unknown = [t for t in targets if t not in features]
    if unknown or not targets:
        raise ValueError(f"targets {unknown or targets} must be a non-empty subset of the features {list(features)}")
    series = to_device_series(rows, period_s, max_fill_periods, features, fill=fill, split=split)
    fitted = fitted_scaler if fitted_scaler is not None else fit_scaler(series, scaler)
    offsets, parts, starts = [], [], {k: [] for k in SPLITS}
    rows_per_split = {k: 0 for k in SPLITS}
    total = 0
    for s in series:
        offsets.append(total)
        parts.append(fitted.transform(s.values).astype(np.float32))
        for name in SPLITS:
            starts[name].append(window_starts(s, name, lookback, horizon) + total)
            lo, hi = s.bounds[name]
            rows_per_split[name] += int((s.observed[lo:hi] & s.healthy[lo:hi]).sum())
        total += s.values.shape[0]
    merged = {k: np.concatenate(v).astype(np.int64) for k, v in starts.items()}
    for name in required_splits:
        if merged[name].size == 0:
            raise ValueError(_too_short(series, name, lookback, horizon, required_splits))
    return Prepared(list(features), targets, lookback, horizon, period_s, fitted, series,
                    np.concatenate(parts), offsets, merged, rows_per_split)


def _longest_usable_run(s: DeviceSeries, split: str) -> int:
    """Longest run of observed, healthy rows inside the split: any lookback + horizon up to it has a window."""
    lo, hi = s.bounds[split]
    good = np.concatenate([[0], (s.observed[lo:hi] & s.healthy[lo:hi]).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(good))
    return int((edges[1::2] - edges[::2]).max()) if edges.size else 0


def _too_short(series: list[DeviceSeries], split: str, lookback: int, horizon: int, required_splits) -> str:
    """The "no healthy windows" message: the split's rows per device and a lookback / horizon that fits."""
    sizes = [s.bounds[split][1] - s.bounds[split][0] for s in series]
    rows = f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)} to {max(sizes)}"
    longest = max(_longest_usable_run(s, split) for s in series)
    # what fits every required split: per split the best device, then the tightest split
    fits = min(max(_longest_usable_run(s, name) for s in series) for name in required_splits)
    text = (f"no healthy {split} windows: the data is too short for lookback {lookback} + horizon {horizon} "
            f"(the {split} split has {rows} rows per device; longest stretch without a gap or labeled fault: {longest})")
    more = f"more rows per device (a larger --rows or time range) or the {split} split a larger share (--split)"
    if fits < 2:
        return f"{text}; no window of any size fits: give {more}"
    span = max(2, fits // 2)  # half the limit leaves several windows, not just one
    h = horizon if horizon < span else max(1, round(span * horizon / (lookback + horizon)))
    h = min(h, span - 1)
    return (f"{text}; lookback + horizon must be at most {fits}: try --lookback {span - h} --horizon {h}, or {more}")
