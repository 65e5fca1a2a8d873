"""Prediction intervals from a bundle's manifest (numpy only; docs/contracts.md, "Prediction intervals").

`manifest.calibration.intervals` holds, per nominal level, the lower and upper quantiles of the out-of-sample
residuals (observed - forecast) per horizon step and target, in the model's scaled units. A forecast yhat in
physical units then has the band

    lower_k = yhat + lower[k] * spread,   upper_k = yhat + upper[k] * spread

where `spread` is the target's scaler spread (std for `standard`, max - min for `minmax`): the fixed
(split-conformal) band, the same width for every forecast.

With `"method": "normalized"` the table also holds a `normalized` member: quantiles of the residuals divided by a
scale of the forecast's own input window (`WindowScale`: per step h and target, the root mean square of the lag-h
differences of the target over the window, floored, to a per-target exponent), and the band is

    lower_k = yhat + normalized.lower[k] * sigma(x),   upper_k = yhat + normalized.upper[k] * sigma(x)

with sigma(x) in physical units (the scale in the model's units times the target's spread): calm windows get narrow
bands, volatile ones wide. The fixed `lower` / `upper` stay in the table (a daemon that predates the method reads
them and publishes the fixed band); a `normalized` member under another method is a record only. Usage:

    table = load_intervals(manifest)          # None for bundles without intervals (old bundles keep working)
    if table is not None:
        sigma = table.physical_scale(x_targets_scaled, spread) if table.normalized else None  # (B, H, T)
        lo, hi = table.bounds(yhat, sigma)    # yhat (B, H, T) -> lo, hi (K, B, H, T), K = len(table.levels)

With an `adaptive` member (`{"method": "quantile_tracking", "eta": ...}`), each device's band then follows the coverage
it has actually had (online adaptive conformal, `AdaptiveBands`): per level, horizon step and target a multiplier
m = exp(g) of the band's half-width around its centre, and every time a reading settles whether it fell inside
the band issued h steps earlier, g += eta / sqrt(h) * (miss - (1 - level)). A band that covers too often narrows, one that
misses too often widens, so the long-run coverage is the nominal one even when the months after calibration are
calmer or rougher than the calibration months. State: g per device, and the bands issued in the last `horizon`
slots (to check them); it starts at m = 1 with the daemon.

`bounds` without a scale gives the fixed band (also for a normalized table). `interval_bounds(manifest, yhat)`
does load + bounds in one call (None without intervals). Loading validates the table once; `bounds` is broadcast
arithmetic (no Python loop over forecasts, levels, steps or targets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agent.core import arrays

NORMALIZED = "normalized"
SCALE_KIND = "lag_diff_rms"
NORMALIZED_VERSION = 1
ADAPTIVE = "quantile_tracking"
ADAPTIVE_VERSION = 1
MAX_LOG_MULTIPLIER = 3.0  # |g| <= 3: the band between 1/20 and 20 times its calibrated half-width (a flat or wild input cannot run it away)
NO_BAND = -(1 << 62)  # issued_slot of a position with no band
DIRECT_LAGS = 32  # up to this many distinct lags the scale is summed lag by lag, beyond it by FFT (the same values)


class IntervalError(ValueError):
    """The manifest's interval table is malformed (the message names the field)."""


def scale_lags(horizon: int, window: int) -> list[int]:
    """The lag of each horizon step's scale: the step itself, capped at half the window (so that every lag has at
    least window // 2 differences): step h of a forecast is compared with the window's own h-step changes."""
    cap = max(1, window // 2)
    return [min(h, cap) for h in range(1, horizon + 1)]


@dataclass(frozen=True)
class WindowScale:
    """sigma[b, h, t] = max(floor[h, t], sqrt(mean_i (x[b, i + lag_h, t] - x[b, i, t]) ** 2)) ** exponent[t] over the
    last `window` rows of each input window x (model units): the size of the target's lag-h changes in the window
    the forecast is made from, i.e. the error scale of repeating the last value h steps ahead, measured locally.
    The exponent (chosen on validation data by training) says how far the band follows it: 1 fully, 0 not at all
    (sigma = 1: the fixed band)."""

    window: int
    lags: np.ndarray  # (H,) int, each in [1, window - 1]
    floor: np.ndarray  # (H, T) float64 > 0, model units
    exponent: np.ndarray | None = None  # (T,) float64 in [0, 1]; None: 1 for every target

    def __post_init__(self) -> None:
        distinct, which = np.unique(self.lags, return_inverse=True)  # (U,), (H,)
        object.__setattr__(self, "_distinct", [(u, float(self.window - u)) for u in distinct.tolist()])
        object.__setattr__(self, "_which", which.reshape(-1))
        powered = self.exponent is not None and not bool((np.asarray(self.exponent) == 1.0).all())
        object.__setattr__(self, "_powered", powered)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (B, L, T) targets in model units, L >= window -> sigma (B, H, T) float64."""
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[1] < self.window or x.shape[2] != self.floor.shape[1]:
            raise ValueError(f"scale input shape {x.shape} is not (batch, >= {self.window}, {self.floor.shape[1]})")
        seg = x[:, x.shape[1] - self.window :, :].astype(np.float64)  # (B, W, T)
        n = self.window
        distinct = self._distinct
        if len(distinct) <= DIRECT_LAGS:  # a few lags: each one's differences directly
            mean_sq = np.empty((seg.shape[0], len(distinct), seg.shape[2]))  # (B, U, T)
            for i, (u, count) in enumerate(distinct):
                d = seg[:, u:] - seg[:, :-u]  # (B, W - u, T)
                d *= d
                np.sum(d, axis=1, out=mean_sq[:, i])
                mean_sq[:, i] /= count
            mean_sq = mean_sq[:, self._which]  # (B, H, T)
        else:
            # Many lags: sum_i (x[i + u] - x[i])^2 = sum_{i >= u} x^2 + sum_{i < n - u} x^2 - 2 sum_i x[i] x[i + u],
            # every lag at once from prefix sums of squares and the autocorrelation by FFT (centred first: the
            # differences do not change and the sums stay small).
            seg = seg.transpose(0, 2, 1)  # (B, T, W)
            seg = seg - seg.mean(axis=2, keepdims=True)
            sq = np.zeros(seg.shape[:2] + (n + 1,))  # (B, T, W + 1)
            np.cumsum(seg * seg, axis=2, out=sq[:, :, 1:])
            size = 1 << (2 * n - 1).bit_length()
            spec = np.fft.rfft(seg, n=size, axis=2)
            auto = np.fft.irfft(spec.real**2 + spec.imag**2, n=size, axis=2)[:, :, :n]  # (B, T, W): sum_i x[i] x[i + u]
            u = self.lags  # (H,)
            total = (sq[:, :, n:] - sq[:, :, u]) + sq[:, :, n - u] - 2.0 * auto[:, :, u]  # (B, T, H)
            mean_sq = (np.maximum(total, 0.0) / (n - u)).transpose(0, 2, 1)  # (B, H, T)
        sigma = np.maximum(np.sqrt(mean_sq), self.floor)  # (B, H, T)
        return sigma**self.exponent if self._powered else sigma

    def with_exponent(self, exponent) -> "WindowScale":
        return WindowScale(self.window, self.lags, self.floor, np.asarray(exponent, dtype=np.float64))

    def to_manifest(self, floor_fraction: float | None = None) -> dict:
        out = {"kind": SCALE_KIND, "window": int(self.window), "lags": [int(v) for v in self.lags],
               "floor": np.round(self.floor, 8).tolist()}
        if self.exponent is not None:
            out["exponent"] = [float(v) for v in self.exponent]
        if floor_fraction is not None:
            out["floor_fraction"] = floor_fraction
        return out


@dataclass(frozen=True)
class IntervalTable:
    levels: tuple[float, ...]  # nominal coverages, increasing, each in (0, 1)
    lower: np.ndarray  # (K, H, T) float32, physical units, added to the forecast (the fixed band)
    upper: np.ndarray  # (K, H, T) float32, physical units, added to the forecast
    method: str = "split_conformal"
    scale: WindowScale | None = None  # the normalized method's window scale (None: fixed bands only)
    norm_lower: np.ndarray | None = None  # (K, H, T) float32, unit-free, times sigma(x) (physical)
    norm_upper: np.ndarray | None = None
    adaptive_eta: float | None = None  # the online update's step (AdaptiveBands); None: the calibrated band as it is

    @property
    def horizon(self) -> int:
        return int(self.lower.shape[1])

    @property
    def n_targets(self) -> int:
        return int(self.lower.shape[2])

    @property
    def normalized(self) -> bool:
        """Whether the bands follow the window's volatility (the forecast needs its scale, `physical_scale`)."""
        return self.scale is not None

    def physical_scale(self, x_targets: np.ndarray, spread) -> np.ndarray:
        """sigma in original units (B, H, T) float32 from the input windows' target columns in model units
        (B, L, T) and the targets' spread ((T,), or (B, T) per window: a device's own scaling)."""
        sigma = self.scale(x_targets)  # (B, H, T) model units
        spread = np.asarray(spread, dtype=np.float64)
        return (sigma * (spread[:, None, :] if spread.ndim == 2 else spread)).astype(np.float32)

    @property
    def adaptive(self) -> bool:
        """Whether each device's band follows its own coverage online (AdaptiveBands; the forecast needs its multiplier)."""
        return self.adaptive_eta is not None

    def bounds(self, yhat: np.ndarray, scale: np.ndarray | None = None,
               multiplier: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """yhat (..., H, T) physical -> (lower, upper), each (K, ..., H, T) float32: level k's band. `scale`
        (..., H, T), the forecasts' sigma in original units (`physical_scale`), gives the normalized band of a
        normalized table; without it (or for a fixed table) the fixed band. `multiplier` (K, ..., H, T), the
        adaptive method's, widens (> 1) or narrows each band around its centre."""
        y = np.asarray(yhat, dtype=np.float32)
        if y.ndim < 2 or y.shape[-2:] != self.lower.shape[1:]:
            raise ValueError(f"forecast shape {y.shape} does not end in (horizon, targets) = {self.lower.shape[1:]}")
        shape = (len(self.levels),) + (1,) * (y.ndim - 2) + self.lower.shape[1:]
        if scale is None or self.scale is None:
            lower, upper = y + self.lower.reshape(shape), y + self.upper.reshape(shape)
        else:
            s = np.asarray(scale, dtype=np.float32)
            if s.shape != y.shape:
                raise ValueError(f"interval scale shape {s.shape} differs from the forecast's {y.shape}")
            lower, upper = y + self.norm_lower.reshape(shape) * s, y + self.norm_upper.reshape(shape) * s
        if multiplier is None:
            return lower, upper
        m = np.asarray(multiplier, dtype=np.float32)
        if m.shape != lower.shape:
            raise ValueError(f"interval multiplier shape {m.shape} differs from the bands' {lower.shape}")
        centre = (lower + upper) * np.float32(0.5)
        half = (upper - lower) * np.float32(0.5) * m
        return centre - half, centre + half

    def level_names(self) -> list[str]:
        """Payload keys of the levels: 0.8 -> "80", 0.95 -> "95", 0.975 -> "97.5"."""
        return [f"{100 * lv:g}" for lv in self.levels]


def _target_spread(manifest: dict) -> np.ndarray:
    """(T,) scaler spread of each target: std (standard) or max - min (minmax)."""
    scaler = manifest.get("scaler") or {}
    params = scaler.get("params") or {}
    kind = scaler.get("type", "standard")
    out = []
    for name in manifest.get("targets") or []:
        p = params.get(name)
        if not isinstance(p, dict):
            raise IntervalError(f"manifest.scaler.params lacks target {name!r}")
        spread = float(p["std"]) if kind == "standard" else float(p["max"]) - float(p["min"])
        if not (math.isfinite(spread) and spread > 0):
            raise IntervalError(f"manifest.scaler.params.{name} has no positive spread")
        out.append(spread)
    return np.asarray(out, dtype=np.float64)


def _quantile_pair(section: dict, where: str, expected: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    try:
        lower = np.asarray(section["lower"], dtype=np.float64)
        upper = np.asarray(section["upper"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise IntervalError(f"{where} needs lower and upper: {exc}") from None
    for name, a in (("lower", lower), ("upper", upper)):
        if a.shape != expected:
            raise IntervalError(f"{where}.{name} has shape {a.shape}, expected (levels, horizon, targets) = {expected}")
        if not np.isfinite(a).all():
            raise IntervalError(f"{where}.{name} holds non-finite values")
    if (lower > upper).any():
        raise IntervalError(f"{where} has lower > upper")
    return lower, upper


def _window_scale(spec, lookback: int, horizon: int, n_targets: int) -> WindowScale:
    where = "manifest.calibration.intervals.normalized.scale"
    if not isinstance(spec, dict):
        raise IntervalError(f"{where} must be an object")
    if spec.get("kind") != SCALE_KIND:
        raise IntervalError(f"{where}.kind must be {SCALE_KIND!r}, got {spec.get('kind')!r}")
    window = spec.get("window")
    if not isinstance(window, int) or isinstance(window, bool) or not 3 <= window <= lookback:
        raise IntervalError(f"{where}.window must be an integer in [3, lookback {lookback}], got {window!r}")
    try:
        lags = np.asarray(spec["lags"])
        floor = np.asarray(spec["floor"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise IntervalError(f"{where} needs lags and floor: {exc}") from None
    if lags.shape != (horizon,) or not np.issubdtype(lags.dtype, np.integer) or lags.min() < 1 or lags.max() >= window:
        raise IntervalError(f"{where}.lags must be {horizon} integers in [1, window - 1]")
    if floor.shape != (horizon, n_targets) or not (np.isfinite(floor).all() and (floor > 0).all()):
        raise IntervalError(f"{where}.floor must be (horizon, targets) = {(horizon, n_targets)} positive numbers")
    exponent = None
    if spec.get("exponent") is not None:
        try:
            exponent = np.asarray(spec["exponent"], dtype=np.float64)
        except (TypeError, ValueError):
            exponent = np.full(0, np.nan)
        if exponent.shape != (n_targets,) or not (np.isfinite(exponent).all() and (exponent >= 0).all() and (exponent <= 1).all()):
            raise IntervalError(f"{where}.exponent must be {n_targets} numbers in [0, 1]")
    return WindowScale(window, lags.astype(np.intp), floor, exponent)


def load_intervals(manifest: dict) -> IntervalTable | None:
    """The bundle's interval table in physical units, or None when its calibration has no `intervals`."""
    section = (manifest.get("calibration") or {}).get("intervals")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise IntervalError("manifest.calibration.intervals must be an object")
    units = section.get("units", "scaled")
    if units not in ("scaled", "physical"):
        raise IntervalError(f"manifest.calibration.intervals.units must be 'scaled' or 'physical', got {units!r}")
    try:
        levels = tuple(float(v) for v in section["levels"])
    except (KeyError, TypeError, ValueError) as exc:
        raise IntervalError(f"manifest.calibration.intervals needs levels, lower and upper: {exc}") from None
    horizon, n_targets = int(manifest.get("horizon", 0)), len(manifest.get("targets") or [])
    expected = (len(levels), horizon, n_targets)
    lower, upper = _quantile_pair(section, "manifest.calibration.intervals", expected)
    if not levels or not all(0 < lv < 1 for lv in levels) or list(levels) != sorted(set(levels)):
        raise IntervalError(f"manifest.calibration.intervals.levels must be increasing, in (0, 1), got {list(levels)}")
    spread = _target_spread(manifest) if units == "scaled" else np.ones(n_targets)
    method = section.get("method", "split_conformal")
    extra = {}
    if method == NORMALIZED:  # the window-scaled band (the fixed lower / upper are kept for older daemons)
        norm = section.get(NORMALIZED)
        if not isinstance(norm, dict):
            raise IntervalError("manifest.calibration.intervals.method is 'normalized' but the 'normalized' member is missing")
        if norm.get("version", NORMALIZED_VERSION) != NORMALIZED_VERSION:
            raise IntervalError(f"manifest.calibration.intervals.normalized.version {norm.get('version')!r} is not "
                                f"supported (this daemon reads version {NORMALIZED_VERSION})")
        if units != "scaled":
            raise IntervalError("manifest.calibration.intervals: the normalized method needs units 'scaled'")
        n_lower, n_upper = _quantile_pair(norm, "manifest.calibration.intervals.normalized", expected)
        scale = _window_scale(norm.get("scale"), int(manifest.get("lookback", 0)), horizon, n_targets)
        extra = {"scale": scale, "norm_lower": n_lower.astype(np.float32), "norm_upper": n_upper.astype(np.float32)}
    adaptive = section.get("adaptive")
    if adaptive is not None:
        where = "manifest.calibration.intervals.adaptive"
        if not isinstance(adaptive, dict) or adaptive.get("method") != ADAPTIVE:
            raise IntervalError(f"{where} must be an object with method {ADAPTIVE!r}")
        if adaptive.get("version", ADAPTIVE_VERSION) != ADAPTIVE_VERSION:
            raise IntervalError(f"{where}.version {adaptive.get('version')!r} is not supported (this daemon reads "
                                f"version {ADAPTIVE_VERSION})")
        eta = adaptive.get("eta")
        if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0 < eta <= 1:
            raise IntervalError(f"{where}.eta must be a number in (0, 1], got {eta!r}")
        extra["adaptive_eta"] = float(eta)
    return IntervalTable(levels, (lower * spread).astype(np.float32), (upper * spread).astype(np.float32),
                         method=NORMALIZED if "scale" in extra else "split_conformal", **extra)


def step_rates(eta: float, horizon: int) -> np.ndarray:
    """(H,) float32 the adaptive update's rate per horizon step: eta / sqrt(h). Step h learns whether a band was
    right only h slots after issuing it, so a fixed rate keeps pushing for h slots before it sees the effect and
    overshoots at long steps; 1 / sqrt(delay) is the usual rate for online updates with delayed feedback."""
    return (eta / np.sqrt(np.arange(1, horizon + 1, dtype=np.float64))).astype(np.float32)


class AdaptiveBands:
    """Online adaptive conformal bands per device (quantile tracking on the log of the band's half-width).

    For device d, level k, step h and target t the band issued is the table's band with its half-width times
    exp(g[d, h, k, t]). When the reading of slot s arrives, every band issued at s - h (h = 1..H) for step h is
    checked against it and g += eta / sqrt(h) * (miss - (1 - level_k)): coverage above nominal shrinks the band,
    below widens it, and the long-run miss rate is 1 - level whatever the drift since calibration. Issued bands wait
    in the cell of the slot they are due at, (due slot mod H + 1, step), so that a reading finds all of its bands in
    one contiguous row (H + 1 rows per device: a cell is taken again only after its band was due)."""

    def __init__(self, table: IntervalTable):
        if table.adaptive_eta is None:
            raise ValueError("the interval table has no adaptive member")
        self.table = table
        K, H, T = table.lower.shape
        self.shape = (K, H, T)
        self.rate = step_rates(table.adaptive_eta, H)[:, None, None]  # (H, 1, 1)
        self.miss_target = (1.0 - np.asarray(table.levels, dtype=np.float32))[None, :, None]  # (1, K, 1)
        self.rows = H + 1
        self.steps = np.arange(1, H + 1, dtype=np.int64)  # (H,)
        self.step_index = np.arange(H)  # (H,)
        self.capacity = 0
        self.grow(1)

    def grow(self, capacity: int, used: int | None = None) -> None:
        """Room for `capacity` devices (rows past `used` were never written)."""
        if capacity <= self.capacity:
            return
        K, H, T = self.shape
        R = self.rows
        fresh = {"log_multiplier": np.zeros((capacity, H, K, T), np.float32),  # g, step-major
                 "due_slot": np.full((capacity, R, H), NO_BAND, np.int64),  # the slot each waiting band is due at
                 "due_lower": np.zeros((capacity, R, H, K, T), np.float32),
                 "due_upper": np.zeros((capacity, R, H, K, T), np.float32)}
        arrays.replace(self, fresh, self.capacity if used is None else min(used, self.capacity))
        self.capacity = capacity

    def reset(self, d: int) -> None:
        """Device row d starts over (evicted, or given to another device): the calibrated band, nothing to check."""
        self.log_multiplier[d] = 0.0
        self.due_slot[d] = NO_BAND

    def observe(self, d: int, slot: int, values) -> None:
        """The reading of `slot` (its targets (T,), physical units) settles the bands issued for it."""
        r = slot % self.rows
        due = self.due_slot[d, r] == slot  # (H,) which steps have a band due now
        if not due.any():
            return
        y = np.asarray(values, dtype=np.float32)  # (T,)
        miss = (y < self.due_lower[d, r]) | (y > self.due_upper[d, r])  # (H, K, T); a NaN reading: no miss
        step = self.rate * (miss - self.miss_target)  # (H, K, T)
        if not due.all():
            step[~due] = 0.0
        finite = np.isfinite(y)
        if not finite.all():
            step[:, :, ~finite] = 0.0
        g = self.log_multiplier[d]  # (H, K, T) view
        g += step
        np.clip(g, -MAX_LOG_MULTIPLIER, MAX_LOG_MULTIPLIER, out=g)

    def issue(self, d: int, slot: int, yhat: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
        """The multiplier (K, H, T) float32 of the band of device d's forecast yhat (H, T) made at `slot` (with its
        window scale (H, T) for a normalized table); the band waits in the cells of the slots it is due at."""
        multiplier = np.exp(self.log_multiplier[d]).transpose(1, 0, 2)  # (K, H, T)
        lower, upper = self.table.bounds(yhat, scale, multiplier)  # (K, H, T) each
        due = slot + self.steps  # (H,)
        rows = due % self.rows
        self.due_slot[d, rows, self.step_index] = due
        self.due_lower[d, rows, self.step_index] = lower.transpose(1, 0, 2)  # (H, K, T)
        self.due_upper[d, rows, self.step_index] = upper.transpose(1, 0, 2)
        return multiplier

    def to_dict(self, names: list[str]) -> dict:
        """{device: g as nested lists (K, H, T)} for the devices whose band has moved (JSON-ready)."""
        n = len(names)
        moved = np.flatnonzero(np.abs(self.log_multiplier[:n]).reshape(n, -1).max(axis=1, initial=0.0) > 0) if n else []
        return {names[d]: np.round(self.log_multiplier[d].transpose(1, 0, 2), 5).tolist() for d in moved}

    def load(self, data: dict, device_row) -> int:
        """Take `to_dict`'s state (the same bundle's); device_row(name) -> its row or None. Entries of the wrong
        shape or not finite are skipped. Returns the devices restored."""
        restored = 0
        for name, g in data.items():
            try:
                g = np.asarray(g, dtype=np.float32)
            except (TypeError, ValueError):
                continue
            if g.shape != self.shape or not np.isfinite(g).all():
                continue
            d = device_row(name)
            if d is None:
                continue
            self.log_multiplier[d] = np.clip(g, -MAX_LOG_MULTIPLIER, MAX_LOG_MULTIPLIER).transpose(1, 0, 2)
            restored += 1
        return restored

    def nbytes(self) -> int:
        return self.log_multiplier.nbytes + self.due_slot.nbytes + self.due_lower.nbytes + self.due_upper.nbytes


def interval_bounds(manifest: dict | IntervalTable, yhat: np.ndarray,
                    scale: np.ndarray | None = None) -> dict[float, tuple[np.ndarray, np.ndarray]] | None:
    """{level: (lower, upper)} for yhat (..., H, T) in physical units, each (..., H, T); None without intervals.
    `scale`: the forecasts' sigma (..., H, T) in original units for a normalized table (else the fixed band)."""
    table = manifest if isinstance(manifest, IntervalTable) else load_intervals(manifest)
    if table is None:
        return None
    lo, hi = table.bounds(yhat, scale)
    return {lv: (lo[k], hi[k]) for k, lv in enumerate(table.levels)}
