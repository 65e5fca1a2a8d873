"""Anomaly calibration from validation data, with the daemon's own score (agent.detect.ResidualScorer).

1. residual_mean / residual_std per horizon step and target (scaled units) on validation windows;
2. the one-step-ahead score over each validation device in time order (fresh state after a long gap, imputed
   samples not scored, as in the daemon); warning = margin x the highest healthy level, critical = 2 x warning,
   exit = 0.7 x warning;
3. an alert check with the daemon's rule (enter after `min_over` samples >= warning, leave after `min_under`
   samples < exit) on healthy and faulty series, for the report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from agent.detect import ResidualScorer
from training.data import DeviceSeries, Prepared, StandardScaler

EWMA_ALPHA = 0.2
MIN_SAMPLES_OVER = 3
MIN_SAMPLES_UNDER = 5


def residual_stats(prepared: Prepared, predict) -> tuple[np.ndarray, np.ndarray]:
    x, y = prepared.windows(prepared.starts["val"])  # (W, L, F), (W, H, T)
    resid = y - predict(x)  # (W, H, T) observed - forecast, scaled
    return resid.mean(axis=0), np.maximum(resid.std(axis=0), 1e-6)  # (H, T) each


@dataclass
class ScoredRun:
    """Consecutive scored samples of one device (no long gap inside)."""

    device: str
    ts: np.ndarray  # (N,)
    score: np.ndarray  # (N,)


def score_device(series: DeviceSeries, scaler: StandardScaler, target_index: np.ndarray, predict,
                 scorer: ResidualScorer, lookback: int, lo: int, hi: int, healthy_only: bool) -> list[ScoredRun]:
    """One-step-ahead scores for rows [lo + lookback, hi) of one device, in time order."""
    scaled = scaler.transform(series.values).astype(np.float32)  # (N, F), NaN in long gaps
    window_rows = series.valid & (series.healthy if healthy_only else True)
    target_rows = series.observed & (series.healthy if healthy_only else True)
    bad = np.concatenate([[0], np.cumsum(~window_rows)])
    t = np.arange(lo + lookback, hi)
    window_ok = bad[t] - bad[t - lookback] == 0  # rows t-L .. t-1 usable
    runs = []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], window_ok.astype(np.int8), [0]])))
    for begin, end in zip(edges[::2], edges[1::2]):
        points = t[begin:end]
        points = points[target_rows[points]]  # imputed samples are not scored
        if points.size == 0:
            continue
        idx = points[:, None] - lookback + np.arange(lookback)  # (N, L)
        step0 = predict(scaled[idx])[:, 0, :]  # (N, T) scaled one-step forecasts
        forecast = step0 * scaler.std[target_index] + scaler.mean[target_index]
        observed = series.values[points][:, target_index]
        runs.append(ScoredRun(series.name, series.ts[points], scorer.score_series(observed, forecast)))
    return runs


def alert_intervals(run: ScoredRun, warning: float, exit_level: float, min_over: int = MIN_SAMPLES_OVER,
                    min_under: int = MIN_SAMPLES_UNDER) -> list[tuple[int, int | None]]:
    """(start_ts, end_ts or None) of the alerts the daemon's rule would raise on this run."""
    out, over, under, open_since = [], 0, 0, None
    for ts, score in zip(run.ts, run.score):
        if open_since is None:
            over = over + 1 if score >= warning else 0
            if over >= min_over:
                open_since, under = int(ts), 0
        else:
            under = under + 1 if score < exit_level else 0
            if under >= min_under:
                out.append((open_since, int(ts)))
                open_since, over = None, 0
    if open_since is not None:
        out.append((open_since, None))
    return out


def sustained_peak(score: np.ndarray, length: int = MIN_SAMPLES_OVER) -> float:
    """The highest level the score held for `length` consecutive samples."""
    if score.size < length:
        return 0.0
    view = np.lib.stride_tricks.sliding_window_view(score, length)  # (N-length+1, length)
    return float(view.min(axis=1).max())


def calibrate(prepared: Prepared, predict, margin: float = 1.3, floor: float = 2.0) -> tuple[dict, ResidualScorer, list[ScoredRun]]:
    mean, std = residual_stats(prepared, predict)
    t_idx = prepared.target_index
    scorer = ResidualScorer(mean, std, prepared.scaler.std[t_idx], EWMA_ALPHA)
    runs = []
    for s in prepared.series:
        lo, hi = s.bounds["val"]
        runs += score_device(s, prepared.scaler, t_idx, predict, scorer, prepared.lookback, lo, hi, healthy_only=True)
    scores = np.concatenate([r.score for r in runs])
    peak = max(sustained_peak(r.score) for r in runs)
    q999 = float(np.quantile(scores, 0.999))
    # The alert rule needs 3 samples in a row, so the healthy level that matters is the sustained peak.
    warning = round(max(floor, margin * max(peak, q999)), 3)
    calibration = {
        "residual_mean": mean.round(6).tolist(), "residual_std": std.round(6).tolist(),
        "ewma_alpha": EWMA_ALPHA,
        "thresholds": {"warning": warning, "critical": 2 * warning, "exit": 0.7 * warning},
        "min_samples_over": MIN_SAMPLES_OVER,
        "validation_score_quantiles": {"0.5": float(np.quantile(scores, 0.5)), "0.99": float(np.quantile(scores, 0.99)),
                                       "0.999": q999, "max": float(scores.max()), "sustained_max": peak},
        "validation_scored_samples": int(scores.size),
    }
    scorer.warning = warning
    return calibration, scorer, runs


def healthy_alert_check(prepared: Prepared, predict, scorer: ResidualScorer, thresholds: dict, split: str = "test") -> dict:
    """Alerts on the healthy rows of `split` (any alert here is a false alert)."""
    t_idx = prepared.target_index
    per_device, samples = {}, 0
    for s in prepared.series:
        lo, hi = s.bounds[split]
        runs = score_device(s, prepared.scaler, t_idx, predict, scorer, prepared.lookback, lo, hi, healthy_only=True)
        alerts = sum(len(alert_intervals(r, thresholds["warning"], thresholds["exit"])) for r in runs)
        samples += sum(r.ts.size for r in runs)
        peak = max((float(r.score.max()) for r in runs), default=0.0)
        per_device[s.name] = {"alerts": alerts, "max_score": round(peak, 3), "samples": int(sum(r.ts.size for r in runs))}
    hours = samples * prepared.period_s / 3600.0
    return {"split": split, "alerts": sum(d["alerts"] for d in per_device.values()), "scored_samples": samples,
            "device_hours": round(hours, 1), "per_device": per_device}


def fault_detection_check(series: list[DeviceSeries], schedule: list[dict], prepared: Prepared, predict,
                          scorer: ResidualScorer, thresholds: dict, grace_s: int = 1800) -> dict:
    """Detection delay per scheduled fault (alert opened while it lasts) and alerts outside any fault (+ grace:
    the return to normal at a fault's end is itself a surprise to the forecaster)."""
    t_idx = prepared.target_index
    faults, false_alerts, samples = [], 0, 0
    for s in series:
        runs = score_device(s, prepared.scaler, t_idx, predict, scorer, prepared.lookback, 0, len(s.ts), healthy_only=False)
        samples += sum(r.ts.size for r in runs)
        alerts = [a for r in runs for a in alert_intervals(r, thresholds["warning"], thresholds["exit"])]
        mine = [f for f in schedule if f["device"] == s.name]
        for fault in mine:
            hits = [a[0] for a in alerts if fault["start_ts"] <= a[0] <= fault["end_ts"]]
            delay = (min(hits) - fault["start_ts"]) / 60.0 if hits else None
            faults.append({"device": s.name, "kind": fault["kind"], "duration_min": (fault["end_ts"] - fault["start_ts"]) / 60.0,
                           "detected": bool(hits), "delay_min": delay})
        false_alerts += sum(1 for a in alerts
                            if not any(f["start_ts"] <= a[0] <= f["end_ts"] + grace_s for f in mine))
    return {"faults": faults, "false_alerts": false_alerts,
            "device_hours": round(samples * prepared.period_s / 3600.0, 1)}
