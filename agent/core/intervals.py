"""Prediction intervals from a bundle's manifest (numpy only; docs/contracts.md, "Prediction intervals").

`manifest.calibration.intervals` holds, per nominal level, the lower and upper quantiles of the out-of-sample
residuals (observed - forecast) per horizon step and target, in the model's scaled units. A forecast yhat in
physical units then has the band

    lower_k = yhat + lower[k] * spread,   upper_k = yhat + upper[k] * spread

where `spread` is the target's scaler spread (std for `standard`, max - min for `minmax`). Usage:

    table = load_intervals(manifest)          # None for bundles without intervals (old bundles keep working)
    if table is not None:
        lo, hi = table.bounds(yhat)           # yhat (B, H, T) -> lo, hi (K, B, H, T), K = len(table.levels)

`interval_bounds(manifest, yhat)` does both in one call (None without intervals). Loading validates the table
once; `bounds` is two broadcast additions (no Python loop over forecasts, levels, steps or targets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class IntervalError(ValueError):
    """The manifest's interval table is malformed (the message names the field)."""


@dataclass(frozen=True)
class IntervalTable:
    levels: tuple[float, ...]  # nominal coverages, increasing, each in (0, 1)
    lower: np.ndarray  # (K, H, T) float32, physical units, added to the forecast
    upper: np.ndarray  # (K, H, T) float32, physical units, added to the forecast

    @property
    def horizon(self) -> int:
        return int(self.lower.shape[1])

    @property
    def n_targets(self) -> int:
        return int(self.lower.shape[2])

    def bounds(self, yhat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """yhat (..., H, T) physical -> (lower, upper), each (K, ..., H, T) float32: level k's band."""
        y = np.asarray(yhat, dtype=np.float32)
        if y.ndim < 2 or y.shape[-2:] != self.lower.shape[1:]:
            raise ValueError(f"forecast shape {y.shape} does not end in (horizon, targets) = {self.lower.shape[1:]}")
        shape = (len(self.levels),) + (1,) * (y.ndim - 2) + self.lower.shape[1:]
        return y + self.lower.reshape(shape), y + self.upper.reshape(shape)

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
        lower = np.asarray(section["lower"], dtype=np.float64)
        upper = np.asarray(section["upper"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as exc:
        raise IntervalError(f"manifest.calibration.intervals needs levels, lower and upper: {exc}") from None
    horizon, n_targets = int(manifest.get("horizon", 0)), len(manifest.get("targets") or [])
    expected = (len(levels), horizon, n_targets)
    for name, a in (("lower", lower), ("upper", upper)):
        if a.shape != expected:
            raise IntervalError(f"manifest.calibration.intervals.{name} has shape {a.shape}, expected "
                                f"(levels, horizon, targets) = {expected}")
        if not np.isfinite(a).all():
            raise IntervalError(f"manifest.calibration.intervals.{name} holds non-finite values")
    if not levels or not all(0 < lv < 1 for lv in levels) or list(levels) != sorted(set(levels)):
        raise IntervalError(f"manifest.calibration.intervals.levels must be increasing, in (0, 1), got {list(levels)}")
    if (lower > upper).any():
        raise IntervalError("manifest.calibration.intervals has lower > upper")
    spread = _target_spread(manifest) if units == "scaled" else np.ones(n_targets)
    return IntervalTable(levels, (lower * spread).astype(np.float32), (upper * spread).astype(np.float32))


def interval_bounds(manifest: dict | IntervalTable, yhat: np.ndarray) -> dict[float, tuple[np.ndarray, np.ndarray]] | None:
    """{level: (lower, upper)} for yhat (..., H, T) in physical units, each (..., H, T); None without intervals."""
    table = manifest if isinstance(manifest, IntervalTable) else load_intervals(manifest)
    if table is None:
        return None
    lo, hi = table.bounds(yhat)
    return {lv: (lo[k], hi[k]) for k, lv in enumerate(table.levels)}
