"""Forecast prediction intervals: split-conformal quantiles of out-of-sample residuals, and their test coverage.

One residual definition for detection and intervals: `calibration.residual_mean` / `residual_std` (the
detector's normalization) and `calibration.intervals` are both computed from the same array,
`validation_residuals` = observed - forecast on the validation windows (scaled units), which the forecaster
never trained on. Per level (e.g. 0.8) and per (horizon step, target), the fixed interval is
[yhat + q_lo, yhat + q_hi] with q_lo, q_hi the (1 - level) / 2 and (1 + level) / 2 empirical quantiles of those
residuals, with the split-conformal finite-sample correction (rank ceil((n + 1) p) of n). Asymmetric on
purpose: skewed residuals (a temperature that rises faster than it falls) keep their shape.

Normalized (locally weighted) split conformal, `"method": "normalized"` (considered when the input windows of
those residuals are given): the same quantiles of residual / sigma(x), with sigma(x) the window scale of
agent.core.intervals.WindowScale (per step h and target: the root mean square of the lag-h changes of the target
over the input window, floored at FLOOR_FRACTION of its median on the calibration windows, to the power of a
per-target exponent), and the band yhat + q * sigma(x): it narrows in calm periods and widens in volatile ones, so
a test period calmer or rougher than the validation period is still covered near the nominal rate.

The exponent (EXPONENTS: 0 = the fixed band ... 1 = fully normalized) is the one parameter, chosen per target on
the validation windows alone (`select_exponent`): leave-one-block-out over BLOCKS contiguous blocks of them
(purged of the windows that overlap the held-out block), the exponent whose held-out per-step coverage is closest
to nominal on average over blocks, levels and steps (the smallest within SELECTION_TOLERANCE of the best: the
fixed band unless following the volatility clearly helps). Where the window's volatility does not
carry over to the residuals (a good model of a regular process), 0 wins and the band stays fixed; when every
target gets 0 the table keeps method "split_conformal" (the member is then a record of the choice only).
The window is the whole lookback and the lag of step h is h (no parameter); nothing is chosen on the test split.

Adaptive (online) conformal on top of either band, the table's `adaptive` member: in deployment each device's band
is widened or narrowed around its centre by the coverage it has actually had (quantile tracking on the log of the
half-width, step ADAPTIVE_ETA per settled reading; agent.core.intervals.AdaptiveBands). Split-conformal promises
the nominal coverage only when the months after calibration look like the calibration months; ETTh1's test months
are calmer than its validation months, and no calibrated band can know that in advance. The tracker guarantees
the long-run coverage whatever the drift, at the price of state per device. Test coverage is measured the way the
daemon runs it (`adaptive_multipliers`: windows in time order per device, each band checked when its reading
is due, state from m = 1 at the first test window), next to the static bands.

ADAPTIVE_ETA and the rate eta / sqrt(h) at step h (feedback on step h comes h slots late) were chosen on development
splits only: ETTh1's first 16 months split 8/4/4 (whose "test" months are the standard validation months) with
horizons 24 and 168, and a synthetic fleet of another seed than the documented one. A flat rate of 0.01-0.05 met
the 3-point target per step at horizon 24 but widened the horizon-168 band by 21 %; 0.1 / sqrt(h) met it at both
with the width of the static band.

The daemon side is `agent/core/intervals.py` (numpy only): it turns the table into bounds for any forecast.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_LEVELS = (0.8, 0.95)
METHOD = "split_conformal"
NORMALIZED = "normalized"
ADAPTIVE_NAME = "adaptive"  # the published method's suffix in coverage reports: "split_conformal+adaptive"
FLOOR_FRACTION = 0.1  # sigma(x) >= this fraction of its median on the calibration windows (per step and target)
EXPONENTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # how far the band follows the window's scale: the grid select_exponent tries
BLOCKS = 8  # contiguous validation blocks held out in turn by select_exponent
MIN_BLOCK_WINDOWS = 20  # fewer validation windows per block (or left to calibrate on): no selection, the fixed band
SELECTION_TOLERANCE = 0.002  # the smallest exponent whose held-out coverage error is within this of the lowest
ADAPTIVE_ETA = 0.1  # the adaptive band's rate at step 1 (eta / sqrt(h) at step h; log of the half-width); module docstring


def validation_residuals(prepared, predict, split: str = "val") -> np.ndarray:
    """(W, H, T) observed - forecast on the windows of `split`, scaled units."""
    x, y = prepared.windows(prepared.starts[split])  # (W, L, F), (W, H, T)
    return (y - predict(x)).astype(np.float64)


def target_inputs(prepared, split: str = "val") -> np.ndarray:
    """(W, L, T) the target columns of the input windows of `split` (scaled units): the windows whose residuals
    `validation_residuals` returns, in the same order (what the normalized method's scale is computed from)."""
    x, _ = prepared.windows(prepared.starts[split])  # (W, L, F)
    return np.ascontiguousarray(x[:, :, prepared.target_index])  # (W, L, T)


def _conformal_quantile(sorted_resid: np.ndarray, p: float) -> np.ndarray:
    """The split-conformal p-quantile along axis 0 of sorted residuals (N, ...): rank ceil((n + 1) p) (upper
    tail) or floor((n + 1) p) (lower tail), clipped to the sample."""
    n = sorted_resid.shape[0]
    rank = math.ceil((n + 1) * p) if p >= 0.5 else math.floor((n + 1) * p)
    return sorted_resid[min(max(rank, 1), n) - 1]


def _quantile_table(resid: np.ndarray, levels: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(K, H, T) lower and upper split-conformal quantiles of (W, H, T) scores."""
    ordered = np.sort(resid, axis=0)
    lower, upper = [], []
    for lv in levels:
        lo = _conformal_quantile(ordered, (1.0 - lv) / 2.0)  # (H, T)
        hi = _conformal_quantile(ordered, (1.0 + lv) / 2.0)
        lower.append(np.minimum(lo, hi))
        upper.append(np.maximum(lo, hi))
    return np.stack(lower), np.stack(upper)


def fit_window_scale(inputs: np.ndarray, horizon: int, floor_fraction: float = FLOOR_FRACTION):
    """The normalized method's WindowScale for windows (W, L, T) (scaled units): window = the whole lookback,
    lag of step h = min(h, L // 2), floor = floor_fraction x the median unfloored scale over these windows."""
    from agent.core.intervals import WindowScale, scale_lags

    inputs = np.asarray(inputs, dtype=np.float64)
    W, L, T = inputs.shape
    lags = np.asarray(scale_lags(horizon, L), dtype=np.intp)
    raw = WindowScale(L, lags, np.full((horizon, T), 1e-300))(inputs)  # (W, H, T) unfloored
    floor = np.maximum(floor_fraction * np.median(raw, axis=0), 1e-6)  # (H, T)
    return WindowScale(L, lags, np.round(floor, 8))


def select_exponent(resid: np.ndarray, inputs: np.ndarray, levels, floor_fraction: float = FLOOR_FRACTION,
                    exponents=EXPONENTS, blocks: int = BLOCKS) -> dict | None:
    """The normalized method's exponent per target, chosen on these (validation) windows alone, in time order:
    each of `blocks` contiguous blocks is held out in turn, the scale and quantiles are fitted on the other windows
    (minus the L + H - 1 windows on each side of the block, which share rows with it), and the held-out coverage
    per step is compared with the nominal level. Returns {"exponent": (T,), "coverage_error": (E, T) the mean
    |coverage - nominal| over blocks, levels and steps per candidate, ...}, or None when the blocks would be too
    small (MIN_BLOCK_WINDOWS)."""
    W, H, T = resid.shape
    gap = inputs.shape[1] + H - 1
    edges = np.linspace(0, W, blocks + 1).astype(int)
    if blocks < 2 or np.diff(edges).min() < MIN_BLOCK_WINDOWS:
        return None
    error = np.zeros((len(exponents), T))
    for b in range(blocks):
        lo, hi = edges[b], edges[b + 1]
        fit = np.r_[0 : max(lo - gap, 0), min(hi + gap, W) : W]
        if len(fit) < MIN_BLOCK_WINDOWS:
            return None
        scale = fit_window_scale(inputs[fit], H, floor_fraction)
        s_fit, s_held = scale(inputs[fit]), scale(inputs[lo:hi])  # (n, H, T)
        held = resid[lo:hi]
        for e, g in enumerate(exponents):
            q_lo, q_hi = _quantile_table(resid[fit] / s_fit**g, levels)  # (K, H, T)
            for k, lv in enumerate(levels):
                inside = (held >= q_lo[k] * s_held**g) & (held <= q_hi[k] * s_held**g)  # (n, H, T)
                error[e] += np.abs(inside.mean(axis=0) - lv).mean(axis=0)  # (T,) mean per-step gap
    error /= blocks * len(levels)
    best = error.min(axis=0)  # (T,)
    chosen = np.argmax(error <= best + SELECTION_TOLERANCE, axis=0)  # the first (smallest) exponent within tolerance
    return {"criterion": "leave-one-block-out on the validation windows: mean |coverage - nominal| over blocks, "
                         f"levels and steps (per target); the smallest exponent within {SELECTION_TOLERANCE} of the lowest",
            "blocks": blocks, "exponents": [float(g) for g in exponents],
            "coverage_error": np.round(error, 5).tolist(),
            "exponent": [float(exponents[i]) for i in chosen]}


def adaptive_member(eta: float = ADAPTIVE_ETA) -> dict:
    """The table's `adaptive` member: the daemon tracks each device's coverage online (agent.core.intervals)."""
    from agent.core.intervals import ADAPTIVE, ADAPTIVE_VERSION

    return {"method": ADAPTIVE, "version": ADAPTIVE_VERSION, "eta": eta,
            "update": "per device, level, step h and target: g += eta / sqrt(h) * (miss - (1 - level)); half-width x exp(g), from g = 0"}


def interval_table(resid: np.ndarray, levels=DEFAULT_LEVELS, source: str = "validation", *,
                   inputs: np.ndarray | None = None, floor_fraction: float = FLOOR_FRACTION,
                   exponent=None, adaptive_eta: float | None = ADAPTIVE_ETA) -> dict:
    """`calibration.intervals` from out-of-sample residuals (W, H, T), scaled units. With `inputs`, the target
    columns (W, L, T) of the same windows' inputs (`target_inputs`), the table also holds the normalized method:
    `normalized` with the window scale (its exponent per target from `select_exponent`, or `exponent` when given)
    and the quantiles of residual / scale; method "normalized" unless every exponent is 0. The fixed quantiles
    stay in `lower` / `upper` (what a daemon without the method reads)."""
    levels = sorted({float(lv) for lv in levels})
    if not levels or not all(0 < lv < 1 for lv in levels):
        raise ValueError(f"interval levels must lie in (0, 1), got {levels}")
    resid = np.asarray(resid, dtype=np.float64)
    if resid.ndim != 3 or resid.shape[0] < 2:
        raise ValueError(f"need at least 2 residual windows (W, H, T) for intervals, got shape {resid.shape}")
    lower, upper = _quantile_table(resid, levels)
    table = {"method": METHOD, "units": "scaled", "source": f"{source} windows: observed - forecast",
             "windows": int(resid.shape[0]), "levels": levels,
             "lower": np.round(lower, 6).tolist(), "upper": np.round(upper, 6).tolist()}
    if inputs is not None:
        inputs = np.asarray(inputs, dtype=np.float64)
        if inputs.ndim != 3 or inputs.shape[0] != resid.shape[0] or inputs.shape[2] != resid.shape[2]:
            raise ValueError(f"inputs {inputs.shape} must be the (W, L, T) windows of the residuals {resid.shape}")
        if inputs.shape[1] >= 3:  # a scale needs a few changes in the window
            from agent.core.intervals import NORMALIZED_VERSION

            if exponent is None:
                selection = select_exponent(resid, inputs, levels, floor_fraction)
                if selection is None:
                    selection = (f"not selected: fewer than {MIN_BLOCK_WINDOWS} validation windows per block of "
                                 f"{BLOCKS}; the fixed band (exponent 0)")
                    exponent = [0.0] * resid.shape[2]
                else:
                    exponent = selection["exponent"]
            else:
                selection = "exponent given"
            exponent = np.broadcast_to(np.asarray(exponent, dtype=np.float64), (resid.shape[2],))
            scale = fit_window_scale(inputs, resid.shape[1], floor_fraction).with_exponent(exponent)
            n_lower, n_upper = _quantile_table(resid / scale(inputs), levels)  # (K, H, T) unit-free
            if (exponent > 0).any():
                table["method"] = NORMALIZED
            table[NORMALIZED] = {"version": NORMALIZED_VERSION, "scale": scale.to_manifest(floor_fraction),
                                 "score": "(observed - forecast) / scale, the same windows",
                                 "lower": np.round(n_lower, 6).tolist(), "upper": np.round(n_upper, 6).tolist()}
            table[NORMALIZED]["selection"] = selection
    if adaptive_eta is not None:
        table["adaptive"] = adaptive_member(adaptive_eta)
    return table


def fit_intervals(prepared, resid: np.ndarray, levels=DEFAULT_LEVELS, split: str = "val") -> dict:
    """`interval_table` of the residuals of `split` (validation_residuals) with their input windows: the
    normalized table, from the residuals detection calibration uses."""
    source = "validation" if split == "val" else split
    return interval_table(resid, levels, source, inputs=target_inputs(prepared, split))


# ---------------------------------------------------------------------------------------------- coverage


def _level_stats(inside: np.ndarray, lo: np.ndarray, hi: np.ndarray, levels, targets) -> dict:
    out = {}
    for k, lv in enumerate(levels):
        width = hi[k] - lo[k]  # (W, H, T)
        out[f"{lv:g}"] = {
            "nominal": lv, "coverage": round(float(inside[k].mean()), 4),
            "per_step": np.round(inside[k].mean(axis=(0, 2)), 4).tolist(),
            "per_target": {t: round(float(inside[k][..., j].mean()), 4) for j, t in enumerate(targets)},
            "mean_width_per_step": np.round(width.mean(axis=(0, 2)), 4).tolist(),
            "mean_width": round(float(width.mean()), 6),
        }
    return out


def interval_bands(manifest: dict, x_targets: np.ndarray, yhat: np.ndarray, table=None) -> dict:
    """{method: (lower, upper)}, each (K, W, H, T) float32 in original units, of forecasts yhat (W, H, T) made from
    windows whose target columns in scaled units are x_targets (W, L, T): "split_conformal" (fixed) always,
    "normalized" too for a normalized table. The daemon's arithmetic (agent.core.intervals), so the same bands."""
    from agent.core.intervals import _target_spread, load_intervals

    table = table if table is not None else load_intervals(manifest)
    yhat32 = np.asarray(yhat, dtype=np.float32)
    methods = {METHOD: table.bounds(yhat32)}  # (K, W, H, T) each
    if table.normalized:
        sigma = table.physical_scale(x_targets, _target_spread(manifest))  # (W, H, T) original units
        methods[NORMALIZED] = table.bounds(yhat32, sigma)
    return methods


def adaptive_multipliers(table, yhat: np.ndarray, scale: np.ndarray | None, obs: np.ndarray,
                         devices: np.ndarray, origins: np.ndarray) -> np.ndarray:
    """(K, W, H, T) the adaptive method's multiplier of each window's band, as the daemon would have issued them:
    per device, windows in time order from the first one (state m = 1 there); before the band of the window made
    at slot `origin` is issued, every reading up to that slot has settled the bands issued for it. yhat, obs
    (W, H, T) original units; scale (W, H, T) the windows' sigma for a normalized table (else None); devices,
    origins (W,) the device and the slot of each window's last input row."""
    from agent.core.intervals import AdaptiveBands

    W, H, T = yhat.shape
    out = np.ones((len(table.levels), W, H, T), dtype=np.float32)
    codes, devices = np.unique(np.asarray(devices), return_inverse=True)
    origins = np.asarray(origins, dtype=np.int64)
    tracker = AdaptiveBands(table)
    tracker.grow(len(codes))
    yhat32 = np.asarray(yhat, dtype=np.float32)
    for d in range(len(codes)):
        rows = np.flatnonzero(devices == d)
        rows = rows[np.argsort(origins[rows], kind="stable")]
        base = int(origins[rows[0]]) + 1
        series = np.full((int(origins[rows[-1]]) + H + 1 - base, T), np.nan, dtype=np.float64)  # the device's readings
        at = origins[rows, None] - base + 1 + np.arange(H)  # (n, H) slot of each step, from base
        series[at.reshape(-1)] = np.asarray(obs, dtype=np.float64)[rows].reshape(-1, T)
        settled = base  # the next slot whose reading has not yet been fed
        for w in rows.tolist():
            origin = int(origins[w])
            for slot in range(settled, origin + 1):
                value = series[slot - base]
                if np.isfinite(value).any():
                    tracker.observe(d, slot, value)
            settled = max(settled, origin + 1)
            out[:, w] = tracker.issue(d, origin, yhat32[w], None if scale is None else scale[w])
    return out


def coverage_arrays(manifest: dict, x_targets: np.ndarray, yhat: np.ndarray, obs: np.ndarray, targets,
                    split: str = "test", devices: np.ndarray | None = None, origins: np.ndarray | None = None) -> dict | None:
    """Coverage of the manifest's intervals on windows given as arrays: x_targets (W, L, T) the inputs' target
    columns in scaled units, yhat and obs (W, H, T) in original units; devices and origins (W,) the device and
    last input slot of each window (default: one device, consecutive windows), for the adaptive method. Bounds from
    agent.core.intervals (the daemon's code). `levels` is the band the daemon publishes; with a normalized or
    adaptive table `by_method` holds every method side by side (the static bands and the adaptive one)."""
    from agent.core.intervals import _target_spread, load_intervals

    table = load_intervals(manifest)
    if table is None:
        return None
    if len(yhat) == 0:
        return {"split": split, "windows": 0, "levels": {}}
    obs = np.asarray(obs, dtype=np.float64)
    methods = interval_bands(manifest, x_targets, yhat, table)
    published = table.method
    if table.adaptive:
        W = len(yhat)
        scale = table.physical_scale(x_targets, _target_spread(manifest)) if table.normalized else None
        multiplier = adaptive_multipliers(table, np.asarray(yhat, dtype=np.float64), scale, obs,
                                          np.zeros(W, np.int64) if devices is None else devices,
                                          np.arange(W) if origins is None else origins)
        published = f"{table.method}+{ADAPTIVE_NAME}"
        methods[published] = table.bounds(np.asarray(yhat, dtype=np.float32), scale, multiplier)
    by_method = {}
    for name, (lo, hi) in methods.items():
        inside = (obs[None] >= lo) & (obs[None] <= hi)  # (K, W, H, T)
        by_method[name] = _level_stats(inside, lo, hi, table.levels, targets)
    out = {"split": split, "windows": int(len(yhat)), "method": published, "levels": by_method[published]}
    if len(by_method) > 1:
        out["by_method"] = by_method
    if table.adaptive:
        out["adaptive_eta"] = table.adaptive_eta
    member = manifest["calibration"]["intervals"].get(NORMALIZED)
    if isinstance(member, dict):  # how the normalized method's exponent was chosen (validation windows only)
        out["normalized_exponent"] = member.get("scale", {}).get("exponent")
        selection = member.get("selection")
        if isinstance(selection, dict):
            out["exponent_selection"] = {"exponents": selection.get("exponents"), "coverage_error": selection.get("coverage_error")}
    return out


def coverage(manifest: dict, prepared, predict, split: str = "test") -> dict | None:
    """Empirical coverage of the manifest's intervals on the windows of `split`, next to the nominal level:
    overall, per horizon step and per target, with the mean band width (physical units) per step; for a
    normalized table, both methods (`by_method`). Bounds come from agent.core.intervals (the daemon's code).
    None without intervals."""
    if (manifest.get("calibration") or {}).get("intervals") is None:
        return None
    starts = prepared.starts[split]
    if len(starts) == 0:
        return coverage_arrays(manifest, np.zeros((0, prepared.lookback, len(prepared.targets))),
                               np.zeros((0,)), np.zeros((0,)), prepared.targets, split)
    x, y = prepared.windows(starts)  # (W, L, F), (W, H, T)
    t_idx = prepared.target_index
    scale, offset = prepared.scaler.scale[t_idx], prepared.scaler.offset[t_idx]
    yhat = predict(x).astype(np.float64) * scale + offset  # (W, H, T) physical
    obs = y.astype(np.float64) * scale + offset
    devices = np.searchsorted(np.asarray(prepared.offsets), starts, side="right") - 1  # (W,)
    origins = np.asarray(starts, dtype=np.int64) + prepared.lookback - 1  # (W,) each window's last input row
    return coverage_arrays(manifest, x[:, :, t_idx], yhat, obs, prepared.targets, split, devices, origins)


def _summary(per_step) -> str:
    a = np.asarray(per_step)
    return f"min {a.min():.3f} mean {a.mean():.3f} max {a.max():.3f}"


def format_coverage(cov: dict | None) -> str:
    """A printable table: per level, nominal vs empirical coverage overall and per horizon step (both methods
    for a normalized table, with the normalized band's mean width relative to the fixed one)."""
    if not cov or not cov.get("levels"):
        return "interval coverage: no intervals" if cov is None else f"interval coverage: no {cov['split']} windows"
    lines = [f"interval coverage on the {cov['split']} split ({cov['windows']} windows), nominal vs empirical, per step:"]
    if cov.get("normalized_exponent") is not None:
        chosen = "/".join(f"{g:g}" for g in cov["normalized_exponent"])
        sel = cov.get("exponent_selection") or {}
        errors = ""
        if sel.get("exponents") and sel.get("coverage_error"):
            errors = "; validation coverage error by exponent " + ", ".join(
                f"{g:g}: " + "/".join(f"{e:.4f}" for e in row) for g, row in zip(sel["exponents"], sel["coverage_error"]))
        lines.append(f" normalized method: exponent {chosen} per target, chosen on validation blocks{errors}"
                     + ("" if str(cov.get("method")).startswith(NORMALIZED) else " -> the fixed band is published"))
    if cov.get("adaptive_eta") is not None:
        lines.append(f" adaptive: each device's band tracks its own coverage online (rate {cov['adaptive_eta']:g} / sqrt(step)), "
                     f"from the calibrated band at the first {cov['split']} window")
    by_method = cov.get("by_method") or {cov.get("method") or METHOD: cov["levels"]}
    for method, levels in by_method.items():
        if len(by_method) > 1:
            lines.append(f" {method}{' (published)' if method == cov.get('method') else ''}:")
        for name, c in levels.items():
            steps = " ".join(f"{v:.3f}" for v in c["per_step"])
            rel = ""
            if method != METHOD and METHOD in by_method and c.get("mean_width") and by_method[METHOD][name].get("mean_width"):
                rel = f"; width x{c['mean_width'] / by_method[METHOD][name]['mean_width']:.2f} of fixed"
            lines.append(f"  {100 * c['nominal']:g} %: overall {c['coverage']:.3f} (gap {100 * (c['coverage'] - c['nominal']):+.1f} "
                         f"points; steps {_summary(c['per_step'])}{rel}); steps {steps}")
    return "\n".join(lines)


def coverage_markdown(cov: dict | None) -> list[str]:
    """report.md lines: one row per horizon step, one column pair per level (per method and level for a
    normalized table)."""
    if not cov or not cov.get("levels"):
        return []
    by_method = cov.get("by_method")
    if by_method:
        cols = [(m, n) for m in by_method for n in by_method[m]]
        label = lambda m, n: f"{m} {100 * by_method[m][n]['nominal']:g} %"
        title = f"Prediction intervals (published: {cov.get('method')}; both methods side by side)"
    else:
        by_method = {None: cov["levels"]}
        cols = [(None, n) for n in cov["levels"]]
        label = lambda m, n: f"{100 * cov['levels'][n]['nominal']:g} %"
        title = f"Prediction intervals ({cov.get('method')})"
    head = "| step | " + " | ".join(f"{label(m, n)} coverage | width" for m, n in cols) + " |"
    lines = [f"{title}, coverage on the {cov['split']} split ({cov['windows']} windows):",
             "", head, "|---|" + "---|---|" * len(cols)]
    steps = len(by_method[cols[0][0]][cols[0][1]]["per_step"])
    for h in range(steps):
        cells = " | ".join(f"{by_method[m][n]['per_step'][h]:.3f} | {by_method[m][n]['mean_width_per_step'][h]:.4g}" for m, n in cols)
        lines.append(f"| {h + 1} | {cells} |")
    cells = " | ".join(f"**{by_method[m][n]['coverage']:.3f}** |" for m, n in cols)
    lines.append(f"| all | {cells} |")
    return lines
