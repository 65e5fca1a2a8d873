"""Forecast prediction intervals: split-conformal quantiles of out-of-sample residuals, and their test coverage.

One residual definition for detection and intervals: `calibration.residual_mean` / `residual_std` (the
detector's normalization) and `calibration.intervals` are both computed from the same array,
`validation_residuals` = observed - forecast on the validation windows (scaled units), which the forecaster
never trained on. Per level (e.g. 0.8) and per (horizon step, target), the interval is
[yhat + q_lo, yhat + q_hi] with q_lo, q_hi the (1 - level) / 2 and (1 + level) / 2 empirical quantiles of those
residuals, with the split-conformal finite-sample correction (rank ceil((n + 1) p) of n). Asymmetric on
purpose: skewed residuals (a temperature that rises faster than it falls) keep their shape.

The daemon side is `agent/core/intervals.py` (numpy only): it turns the table into bounds for any forecast.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_LEVELS = (0.8, 0.95)
METHOD = "split_conformal"


def validation_residuals(prepared, predict, split: str = "val") -> np.ndarray:
    """(W, H, T) observed - forecast on the windows of `split`, scaled units."""
    x, y = prepared.windows(prepared.starts[split])  # (W, L, F), (W, H, T)
    return (y - predict(x)).astype(np.float64)


def _conformal_quantile(sorted_resid: np.ndarray, p: float) -> np.ndarray:
    """The split-conformal p-quantile along axis 0 of sorted residuals (N, ...): rank ceil((n + 1) p) (upper
    tail) or floor((n + 1) p) (lower tail), clipped to the sample."""
    n = sorted_resid.shape[0]
    rank = math.ceil((n + 1) * p) if p >= 0.5 else math.floor((n + 1) * p)
    return sorted_resid[min(max(rank, 1), n) - 1]


def interval_table(resid: np.ndarray, levels=DEFAULT_LEVELS, source: str = "validation") -> dict:
    """`calibration.intervals` from out-of-sample residuals (W, H, T), scaled units."""
    levels = sorted({float(lv) for lv in levels})
    if not levels or not all(0 < lv < 1 for lv in levels):
        raise ValueError(f"interval levels must lie in (0, 1), got {levels}")
    resid = np.asarray(resid, dtype=np.float64)
    if resid.ndim != 3 or resid.shape[0] < 2:
        raise ValueError(f"need at least 2 residual windows (W, H, T) for intervals, got shape {resid.shape}")
    ordered = np.sort(resid, axis=0)
    lower, upper = [], []
    for lv in levels:
        lo = _conformal_quantile(ordered, (1.0 - lv) / 2.0)  # (H, T)
        hi = _conformal_quantile(ordered, (1.0 + lv) / 2.0)
        lower.append(np.minimum(lo, hi))
        upper.append(np.maximum(lo, hi))
    return {"method": METHOD, "units": "scaled", "source": f"{source} windows: observed - forecast",
            "windows": int(resid.shape[0]), "levels": levels,
            "lower": np.round(np.stack(lower), 6).tolist(), "upper": np.round(np.stack(upper), 6).tolist()}


def coverage(manifest: dict, prepared, predict, split: str = "test") -> dict | None:
    """Empirical coverage of the manifest's intervals on the windows of `split`, next to the nominal level:
    overall, per horizon step and per target, with the mean band width (physical units) per step. Bounds come
    from agent.core.intervals (the daemon's code). None without intervals."""
    from agent.core.intervals import load_intervals

    table = load_intervals(manifest)
    if table is None:
        return None
    starts = prepared.starts[split]
    if len(starts) == 0:
        return {"split": split, "windows": 0, "levels": {}}
    x, y = prepared.windows(starts)  # (W, L, F), (W, H, T)
    t_idx = prepared.target_index
    scale, offset = prepared.scaler.scale[t_idx], prepared.scaler.offset[t_idx]
    yhat = predict(x).astype(np.float64) * scale + offset  # (W, H, T) physical
    obs = y.astype(np.float64) * scale + offset
    lo, hi = table.bounds(yhat.astype(np.float32))  # (K, W, H, T)
    inside = (obs[None] >= lo) & (obs[None] <= hi)  # (K, W, H, T)
    out = {"split": split, "windows": int(len(starts)), "method": manifest["calibration"]["intervals"].get("method"),
           "levels": {}}
    for k, lv in enumerate(table.levels):
        out["levels"][f"{lv:g}"] = {
            "nominal": lv, "coverage": round(float(inside[k].mean()), 4),
            "per_step": np.round(inside[k].mean(axis=(0, 2)), 4).tolist(),
            "per_target": {t: round(float(inside[k][..., j].mean()), 4) for j, t in enumerate(prepared.targets)},
            "mean_width_per_step": np.round((hi[k] - lo[k]).mean(axis=(0, 2)), 4).tolist(),
        }
    return out


def format_coverage(cov: dict | None) -> str:
    """A printable table: per level, nominal vs empirical coverage overall and per horizon step."""
    if not cov or not cov.get("levels"):
        return "interval coverage: no intervals" if cov is None else f"interval coverage: no {cov['split']} windows"
    lines = [f"interval coverage on the {cov['split']} split ({cov['windows']} windows), nominal vs empirical, per step:"]
    for name, c in cov["levels"].items():
        steps = " ".join(f"{v:.3f}" for v in c["per_step"])
        lines.append(f"  {100 * c['nominal']:g} %: overall {c['coverage']:.3f} (gap {100 * (c['coverage'] - c['nominal']):+.1f} "
                     f"points); steps {steps}")
    return "\n".join(lines)


def coverage_markdown(cov: dict | None) -> list[str]:
    """report.md lines: one row per horizon step, one column pair per level."""
    if not cov or not cov.get("levels"):
        return []
    names = list(cov["levels"])
    head = "| step | " + " | ".join(f"{100 * cov['levels'][n]['nominal']:g} % coverage | width" for n in names) + " |"
    lines = [f"Prediction intervals ({cov.get('method')}), coverage on the {cov['split']} split ({cov['windows']} windows):",
             "", head, "|---|" + "---|---|" * len(names)]
    steps = len(cov["levels"][names[0]]["per_step"])
    for h in range(steps):
        cells = " | ".join(f"{cov['levels'][n]['per_step'][h]:.3f} | {cov['levels'][n]['mean_width_per_step'][h]:.4g}" for n in names)
        lines.append(f"| {h + 1} | {cells} |")
    cells = " | ".join(f"**{cov['levels'][n]['coverage']:.3f}** |" for n in names)
    lines.append(f"| all | {cells} |")
    return lines
