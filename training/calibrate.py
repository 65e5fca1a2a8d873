"""Anomaly calibration, run through the daemon's own code (agent.core.pipeline.Pipeline); docs/contracts.md,
"Anomaly score", is the reference.

1. residual_mean / residual_std per horizon step and target (scaled units) on validation windows;
2. flat-line check: per target, the share of exact repeats between consecutive healthy observed samples;
   the repeat count at which a run this long would be expected less than FLATLINE_EVENTS_PER_YEAR times per
   device and year (0: the sensor repeats too often to tell);
3. the residual families' healthy scores: the training and validation splits' healthy stretches through
   agent.pipeline.Pipeline (windows, gaps, multi-step lookup, EWMA: the daemon's code) with an in-memory
   bundle around the same model; slow channels only where those stretches span SLOW_MIN_MEMORIES memories;
4. the state model (agent.state.NormalState) on the healthy training and validation rows, its healthy scores
   from blocked time-series folds;
5. each family's level at false_alarm_rate / families by peaks over threshold (pot_threshold), its gain = 1 /
   level: warning 1, critical 2, exit 0.7 for every bundle;
6. alert checks with the daemon's state machine on the healthy test split and on a labeled fleet (report).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from agent.config.settings import Settings
from agent.core.events import AlertEvent, Sample
from agent.core.pipeline import Pipeline
from agent.core.state import NormalState
from training.intervals import DEFAULT_LEVELS as DEFAULT_INTERVAL_LEVELS, fit_intervals, validation_residuals
from training.data import DeviceSeries, Prepared

EWMA_ALPHA = 0.4  # fast channels: ~2-sample memory; a longer one only lengthens the alert after a fault's end
SLOW_ALPHA = 0.02  # slow channels: ~50-sample memory, for variance that rises over hours
SLOW_RECENT_ALPHA = 0.1  # ... counted only while a ~10-sample EWMA of the same residuals agrees (ends fault tails)
SLOW_CLIP = 5.0  # |z| cap of the slow channels
MIN_SAMPLES_OVER = 3
MIN_SAMPLES_UNDER = 5
FLATLINE_EVENTS_PER_YEAR = 0.01  # tolerated healthy flat-line runs per device and year
FLATLINE_MIN_REPEATS = 4
FLATLINE_MAX_REPEATS = 1440
FALSE_ALARM_RATE = 3e-4  # per scored sample: the share of healthy samples over the warning, all families together
POT_INITIAL_QUANTILE = 0.9  # excesses over this quantile of the healthy scores make the tail that is fitted
POT_MIN_EXCESSES = 10
FAST_FLOOR = 2.0  # a warning never below 2 standard deviations of the one-step residuals (tiny validation sets)
SLOW_FLOOR = 1.8  # nor below a residual variance 3.2 x the healthy one (chosen on the tuning seeds 101, 102)
STATE_FLOOR = 1.2
STATE_VARIANCE = 0.9  # principal components kept: this share of the normal rows' variance
STATE_FOLDS = 5
RESIDUAL_SPLITS = ("train", "val")  # the residual families' tail: normalized on validation, tail fitted on both
SLOW_MIN_MEMORIES = 5  # slow channels only where each calibration stretch spans this many of their memories
STATE_ALPHA = 1.0  # the state statistics unsmoothed: the alert rule's run of min_samples_over samples is the filter


def default_score_steps(horizon: int) -> list[int]:
    """The steps scored by default: every horizon step (the longest catches drifts and stuck sensors)."""
    return list(range(1, horizon + 1))


def residual_stats(prepared: Prepared, predict, resid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(H, T) mean and std of the validation residuals (observed - forecast, scaled): the same residuals as the
    prediction intervals (training.intervals.validation_residuals; one definition)."""
    if resid is None:
        resid = validation_residuals(prepared, predict)  # (W, H, T)
    resid = resid.astype(np.float32)  # the arithmetic of the detector's calibration before intervals existed
    return resid.mean(axis=0), np.maximum(resid.std(axis=0), 1e-6)  # (H, T) each


def flatline_repeats(prepared: Prepared, period_s: float, splits=("train", "val")) -> tuple[list[int], list[float]]:
    """Per target: (repeats that trigger the flat-line check, 0 = off; probability of one exact repeat)."""
    t_idx = prepared.target_index
    repeats = np.zeros(len(t_idx))
    pairs = 0
    for s in prepared.series:
        for split in splits:
            lo, hi = s.bounds[split]
            ok = s.observed[lo:hi] & s.healthy[lo:hi]
            both = ok[1:] & ok[:-1]  # consecutive slots both observed and healthy
            v = s.values[lo:hi][:, t_idx]
            repeats += ((v[1:] == v[:-1]) & both[:, None]).sum(axis=0)
            pairs += int(both.sum())
    p = (repeats + 1.0) / (pairs + 2.0)  # Laplace: never exactly 0
    samples_per_year = 365 * 86400.0 / period_s
    out = []
    for pj in p:
        if pj >= 0.5:
            out.append(0)
            continue
        n = math.ceil(math.log(FLATLINE_EVENTS_PER_YEAR / samples_per_year) / math.log(pj))
        out.append(int(min(max(n, FLATLINE_MIN_REPEATS), FLATLINE_MAX_REPEATS)))
    return out, [float(x) for x in p]


class PredictorBundle:
    """The subset of agent.core.model.Bundle the pipeline uses, around a scaled-units predictor (the exported
    ONNX model's OnnxPredictor): calibration runs the daemon's pipeline without writing a bundle first."""

    def __init__(self, prepared: Prepared, predict, calibration: dict, name: str = "calibration"):
        self.name, self.version, self.sha256 = name, "0", "0" * 64
        self.features, self.targets = list(prepared.features), list(prepared.targets)
        self.lookback, self.horizon, self.period_s = prepared.lookback, prepared.horizon, float(prepared.period_s)
        self.calibration = calibration
        self.target_index = prepared.target_index.astype(np.intp)
        self.offset, self.scale = prepared.scaler.mean.astype(np.float64), prepared.scaler.std.astype(np.float64)
        self.target_offset, self.target_scale = self.offset[self.target_index], self.scale[self.target_index]
        self._predict = predict

    n_features = property(lambda self: len(self.features))
    n_targets = property(lambda self: len(self.targets))

    observer = None

    def predict(self, x_raw: np.ndarray) -> np.ndarray:
        scaled = ((x_raw - self.offset) / self.scale).astype(np.float32)  # (B, L, F)
        return self.unscale_outputs(self.run_scaled(scaled))  # (B, H, T)

    # The pipeline's three steps (the same arithmetic as predict)
    def scale_inputs(self, x: np.ndarray) -> None:
        x[...] = ((x - self.offset) / self.scale).astype(np.float32)  # (B, L, F) in place

    def run_scaled(self, x_scaled: np.ndarray) -> np.ndarray:
        return self._predict(x_scaled)

    def unscale_outputs(self, y: np.ndarray) -> np.ndarray:
        return (y * self.target_scale + self.target_offset).astype(np.float32)  # (B, H, T)


@dataclass
class ScoredRun:
    """Scored samples of one stretch of one device, in time order."""

    device: str
    ts: np.ndarray  # (N,)
    score: np.ndarray  # (N,)


class _ScoreTrace:
    """Pipeline trace that records the detector's score after every scored sample."""

    wants_forecast_events = False  # only alert events are kept

    def __init__(self, pipeline: Pipeline):
        self.detector = pipeline.detector
        self.seen: dict[int, int] = {}
        self.rows: list[tuple[int, int, float]] = []  # (sample index, device index, score)
        self.states: list[np.ndarray] = []  # the detector's channel state after each of those samples

    def on_slot(self, i, d, expected, alert_open):
        n = int(self.detector.scored[d])
        if n != self.seen.get(d, 0):
            self.seen[d] = n
            self.rows.append((i, d, float(self.detector.score[d])))
            self.states.append(self.detector.ewma[d].copy())

    def on_forecast(self, i, d, forecast):
        pass


def _settings(detect: dict | None = None) -> Settings:
    return Settings(detect={"min_samples_over": MIN_SAMPLES_OVER, "min_samples_under": MIN_SAMPLES_UNDER, **(detect or {})})


def stretches(series: DeviceSeries, lo: int, hi: int, healthy_only: bool, warmup: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, rows to feed, rows to keep scores of) per stretch of [lo, hi): healthy stretches only when asked
    (each fed as its own device, starting `warmup` rows early when those rows are healthy too)."""
    rows = np.arange(lo, hi)
    if not healthy_only:
        feed = np.arange(max(0, lo - warmup), hi)
        return [(series.name, feed[series.observed[feed]], rows)]
    out = []
    ok = series.healthy.astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], ok, [0]])))
    for k, (begin, end) in enumerate(zip(edges[::2], edges[1::2])):
        keep_lo, keep_hi = max(begin, lo), min(end, hi)
        if keep_hi - keep_lo <= 0:
            continue
        feed = np.arange(max(begin, keep_lo - warmup), keep_hi)
        out.append((f"{series.name}#{k}", feed[series.observed[feed]], np.arange(keep_lo, keep_hi)))
    return out


def run_pipeline(bundle, settings: Settings, parts: list[tuple[str, DeviceSeries, np.ndarray]], chunk: int = 8192):
    """Feed the rows of each (name, series, rows) through one Pipeline in time order.

    Returns (pipeline, per part (N, 2 + C): row, score and the detector's channel state, alert events)."""
    pipeline = Pipeline(bundle, settings)
    features = bundle.features
    samples, owner = [], []
    for p, (name, s, rows) in enumerate(parts):
        values = s.values[rows].tolist()
        for r, ts, vals in zip(rows.tolist(), s.ts[rows].tolist(), values):
            samples.append((float(ts), p, r, Sample(name, float(ts), dict(zip(features, vals)), float(ts))))
    samples.sort(key=lambda item: (item[0], item[1]))
    trace = _ScoreTrace(pipeline)
    events = []
    kept: list[tuple[int, np.ndarray]] = []  # (part, [row, score, state...])
    for start in range(0, len(samples), chunk):
        block = samples[start : start + chunk]
        trace.rows.clear()
        trace.states.clear()
        events += [e for e in pipeline.process([b[3] for b in block], now=block[-1][0], trace=trace) if isinstance(e, AlertEvent)]
        kept += [(block[i][1], np.concatenate([[block[i][2], score], state])) for (i, _, score), state in zip(trace.rows, trace.states)]
    width = 2 + pipeline.detector.scorer.n_channels
    scores = [[] for _ in parts]
    for p, row in kept:
        scores[p].append(row)
    return pipeline, [np.array(x, dtype=np.float64).reshape(-1, width) for x in scores], events


def sustained_peak(score: np.ndarray, length: int = MIN_SAMPLES_OVER) -> float:
    """The highest level the score held for `length` consecutive samples."""
    if score.size < length:
        return 0.0
    view = np.lib.stride_tricks.sliding_window_view(score, length)  # (N-length+1, length)
    return float(view.min(axis=1).max())


@dataclass
class Calibrator:
    """What the alert checks need to run the pipeline again with the final calibration."""

    prepared: Prepared
    predict: object
    calibration: dict

    def bundle(self, thresholds: dict | None = None) -> PredictorBundle:
        calibration = dict(self.calibration)
        if thresholds is not None:
            calibration["thresholds"] = thresholds
        return PredictorBundle(self.prepared, self.predict, calibration)


def pot_threshold(scores: np.ndarray, risk: float, initial_quantile: float = POT_INITIAL_QUANTILE) -> float:
    """The level that `scores` (healthy scores the model did not train on) exceed with probability `risk`, by
    peaks over threshold (the initial step of SPOT, Siffer et al., KDD 2017): a generalized Pareto law fitted
    to the excesses over the `initial_quantile` quantile (probability-weighted moments, Hosking & Wallis 1987)
    and extrapolated to `risk`.

    The shape is kept >= 0 (an exponential tail or heavier): a fitted bounded tail extrapolates a few hundred
    samples into levels that new data crosses at once. With few samples the initial quantile is lowered until
    POT_MIN_EXCESSES excesses exist."""
    x = np.asarray(scores, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 2:
        raise ValueError("too few healthy scores to set a threshold on")
    q = min(initial_quantile, 1.0 - POT_MIN_EXCESSES / x.size) if x.size > POT_MIN_EXCESSES else 0.5
    t = float(np.quantile(x, q))
    excess = np.sort(x[x > t] - t)
    if excess.size < 2 or excess.mean() <= 0:
        return float(x.max())
    n = excess.size
    a0 = excess.mean()
    a1 = float(np.mean((1.0 - (np.arange(1, n + 1) - 0.35) / n) * excess))
    denominator = a0 - 2.0 * a1
    shape = float(np.clip(2.0 - a0 / denominator, 0.0, 0.5)) if denominator > 0 else 0.0  # xi; Hosking's k = -xi
    sigma = 2.0 * a0 * a1 / denominator if shape > 0 else a0  # xi = 0: the exponential tail's scale, the mean excess
    r = min(risk * x.size / n, 1.0)  # the risk among the excesses
    level = t - sigma * math.log(r) if shape < 1e-6 else t + sigma / shape * (r ** -shape - 1.0)
    return float(max(level, x.max()))


def state_rows(prepared: Prepared, splits=("train", "val")) -> list[np.ndarray]:
    """Per device, the scaled rows of `splits` that were observed and healthy, in time order."""
    out = []
    for s, offset in zip(prepared.series, prepared.offsets):
        keep = []
        for split in splits:
            lo, hi = s.bounds[split]
            keep.append(np.arange(lo, hi)[s.observed[lo:hi] & s.healthy[lo:hi]])
        rows = np.concatenate(keep)
        out.append(prepared.scaled[offset + rows].astype(np.float64))  # (N_d, F)
    return out


def _ewma(values: np.ndarray, alpha: float) -> np.ndarray:
    """EWMA over rows (N, C) starting at 1, as the detector's channels do."""
    if alpha >= 1.0:
        return values
    out = np.empty_like(values)
    level = np.ones(values.shape[1])
    for i, row in enumerate(values):
        level = (1.0 - alpha) * level + alpha * row
        out[i] = level
    return out


def out_of_sample_state(per_device: list[np.ndarray], folds: int = STATE_FOLDS, variance: float = STATE_VARIANCE,
                        alpha: float = STATE_ALPHA) -> np.ndarray:
    """sqrt of the smoothed (T^2, SPE) of every normal row, each scored by a state model fitted without its own
    block: each device's rows are cut into `folds` blocks in time order, and fold i holds out block i of every
    device (blocked time-series cross-validation). Returns (N, 2)."""
    out = []
    for i in range(folds):
        held, kept = [], []
        for rows in per_device:
            cuts = np.linspace(0, len(rows), folds + 1).astype(int)
            held.append(rows[cuts[i] : cuts[i + 1]])
            kept.append(np.concatenate([rows[: cuts[i]], rows[cuts[i + 1] :]]))
        train = np.concatenate(kept)
        if train.shape[0] < 3:
            continue
        model = NormalState.fit(train, variance)
        for block in held:
            if len(block):
                out.append(np.sqrt(_ewma(model.statistics(block), alpha)))
    if not out:
        raise ValueError("too few normal rows to calibrate the state channels (need at least 5 per device)")
    return np.concatenate(out)


def calibrate(prepared: Prepared, predict, false_alarm_rate: float = FALSE_ALARM_RATE, score_steps: list[int] | None = None,
              alpha: float = EWMA_ALPHA, slow_alpha: float | None = SLOW_ALPHA, state: bool | None = None,
              state_variance: float = STATE_VARIANCE, interval_levels=DEFAULT_INTERVAL_LEVELS) -> tuple[dict, Calibrator, list[ScoredRun]]:
    """The bundle's anomaly calibration: every channel family's level at the target false-alarm rate.

    Families: fast residuals, slow residuals (variance that rises over hours), state T^2 and SPE. Each family's
    threshold is the level its healthy out-of-sample scores exceed with probability false_alarm_rate / (number
    of families) (pot_threshold): the residual families on the validation stretches (the forecaster never
    trained on them), the state families on blocked folds of the training and validation rows. Each family's
    gain puts that threshold at 1, so the warning is 1.0 (anomaly_score 0.5) for every bundle. `state`: None
    (default) uses the state channels with two or more features."""
    if not 0 < false_alarm_rate < 1:
        raise ValueError(f"false_alarm_rate must be in (0, 1), got {false_alarm_rate!r}")
    resid = validation_residuals(prepared, predict)  # (W, H, T): the detector's normalization and the intervals
    mean, std = residual_stats(prepared, predict, resid)
    steps = score_steps or default_score_steps(prepared.horizon)
    repeats, repeat_p = flatline_repeats(prepared, prepared.period_s)
    calibration = {
        "residual_mean": mean.round(6).tolist(), "residual_std": std.round(6).tolist(),
        "ewma_alpha": alpha,
        "thresholds": {"warning": 1e9, "critical": 2e9, "exit": 0.7e9},  # provisional: scoring only
        "score_steps": steps,
        **({"slow_alpha": slow_alpha, "slow_recent_alpha": SLOW_RECENT_ALPHA, "slow_gain": 1.0, "slow_clip": SLOW_CLIP}
           if slow_alpha else {}),  # gain provisional: measured below
        "flatline_repeats": repeats,
        "flatline_repeat_probability": [round(p, 8) for p in repeat_p],
    }
    calibrator = Calibrator(prepared, predict, calibration)
    parts = []
    warmup = prepared.lookback + prepared.horizon + 2
    for s in prepared.series:
        for split in RESIDUAL_SPLITS:
            lo, hi = s.bounds[split]
            for name, feed, keep in stretches(s, lo, hi, True, warmup):
                parts.append((f"{name}@{split}", s, feed, keep))
    if not parts:
        raise ValueError("no healthy validation rows to calibrate on: give more rows or a larger validation split")
    pipeline, scored, _ = run_pipeline(calibrator.bundle(), _settings({"enabled": False, "flatline": False}),
                                       [(n, s, f) for n, s, f, _ in parts])
    scorer = pipeline.detector.scorer
    kept = []
    for (name, s, _, keep), rows in zip(parts, scored):
        mask = np.isin(rows[:, 0].astype(np.int64), keep)
        if mask.any():
            fast, slow = scorer.split_scores(rows[mask, 2:])
            kept.append((name, s.ts[rows[mask, 0].astype(np.int64)], fast, slow))
    if not kept:
        raise ValueError(f"no validation sample could be scored: each validation stretch needs more than lookback "
                         f"{prepared.lookback} + horizon {prepared.horizon} rows; give more rows, a larger validation "
                         f"split or a shorter --lookback / --horizon")
    if slow_alpha and min(len(f) for *_, f, _ in kept) * slow_alpha < SLOW_MIN_MEMORIES:
        # The slow channels remember ~1/slow_alpha samples: stretches shorter than a few memories never show their
        # healthy level, and a threshold set on them alarms on healthy data. Off for such data.
        slow_alpha = None
        for key in ("slow_alpha", "slow_recent_alpha", "slow_gain", "slow_clip"):
            calibration.pop(key, None)
    normal_rows = np.concatenate(state_rows(prepared))  # (N, F) scaled
    raw = normal_rows * prepared.scaler.scale + prepared.scaler.offset  # (N, F) original units
    # The training machines' normal in original units: a device's learning period maps its own normal onto it.
    calibration["normal"] = {"mean": [float(v) for v in raw.mean(axis=0)], "std": [float(v) for v in np.maximum(raw.std(axis=0), 1e-9)]}
    if state is None:
        # With one feature there is no combination of features to judge, only a level: on a stream whose level
        # drifts past the training range (most real univariate series) a level limit alarms on every regime.
        state = len(prepared.features) >= 2
    state_model = NormalState.fit(normal_rows, state_variance) if state else None
    families = 1 + bool(slow_alpha) + (1 + state_model.has_spe if state_model is not None else 0)
    risk = false_alarm_rate / families
    fast_all = np.concatenate([f for *_, f, _ in kept])
    levels = {"fast": max(FAST_FLOOR, pot_threshold(fast_all, risk))}
    calibration["fast_gain"] = round(1.0 / levels["fast"], 6)
    if slow_alpha:
        levels["slow"] = max(SLOW_FLOOR, pot_threshold(np.concatenate([w for *_, w in kept]), risk))
        calibration["slow_gain"] = round(1.0 / levels["slow"], 6)
    if state_model is not None:
        oos = out_of_sample_state(state_rows(prepared), variance=state_variance)  # (N, 2)
        levels["t2"] = max(STATE_FLOOR, pot_threshold(oos[:, 0], risk))
        levels["spe"] = max(STATE_FLOOR, pot_threshold(oos[:, 1], risk)) if state_model.has_spe else 1.0
        calibration["state"] = {**state_model.to_manifest(), "alpha": STATE_ALPHA, "variance": state_variance,
                                "gains": [round(1.0 / levels["t2"], 6), round(1.0 / levels["spe"], 6) if state_model.has_spe else 0.0],
                                "out_of_sample_rows": int(oos.shape[0])}
    runs = [ScoredRun(name, ts, np.maximum(fast / levels["fast"], slow / levels.get("slow", np.inf)))
            for name, ts, fast, slow in kept]
    scores = np.concatenate([r.score for r in runs])
    calibration.update({
        "thresholds": {"warning": 1.0, "critical": 2.0, "exit": 0.7},
        "false_alarm_rate": false_alarm_rate,
        "family_levels": {k: round(v, 4) for k, v in levels.items()},
        "min_samples_over": MIN_SAMPLES_OVER,
        "validation_score_quantiles": {"0.5": float(np.quantile(scores, 0.5)), "0.99": float(np.quantile(scores, 0.99)),
                                       "0.999": float(np.quantile(scores, 0.999)), "max": float(scores.max()),
                                       "sustained_max": max(sustained_peak(r.score) for r in runs)},
        "validation_scored_samples": int(scores.size),
    })
    if interval_levels:
        calibration["intervals"] = fit_intervals(prepared, resid, interval_levels)  # prediction intervals, same residuals
    return calibration, calibrator, runs


def healthy_alert_check(prepared: Prepared, predict, calibrator: Calibrator, thresholds: dict, split: str = "test") -> dict:
    """Alerts the daemon would raise on the healthy stretches of `split` (any alert here is a false alert)."""
    parts, names = [], []
    warmup = prepared.lookback + prepared.horizon + 2
    for s in prepared.series:
        lo, hi = s.bounds[split]
        for name, feed, _ in stretches(s, lo, hi, True, warmup):
            parts.append((name, s, feed))
            names.append(s.name)
    pipeline, scored, events = run_pipeline(calibrator.bundle(thresholds), _settings(), parts)
    per_device: dict[str, dict] = {}
    for (name, _, _), device, rows_scores in zip(parts, names, scored):
        entry = per_device.setdefault(device, {"alerts": 0, "max_score": 0.0, "samples": 0})
        entry["alerts"] += sum(1 for e in events if e.device == name and e.state == "new")
        entry["samples"] += int(rows_scores.shape[0])
        if rows_scores.size:
            entry["max_score"] = round(max(entry["max_score"], float(rows_scores[:, 1].max())), 3)
    samples = sum(d["samples"] for d in per_device.values())
    return {"split": split, "alerts": sum(d["alerts"] for d in per_device.values()), "scored_samples": samples,
            "device_hours": round(samples * prepared.period_s / 3600.0, 1), "per_device": per_device}


def fault_detection_check(series: list[DeviceSeries], schedule: list[dict], prepared: Prepared, predict,
                          calibrator: Calibrator, thresholds: dict, grace_s: int = 1800) -> dict:
    """Detection delay per scheduled fault (alert opened while it lasts) and alerts outside any fault (+ grace:
    the return to normal at a fault's end is itself a surprise to the forecaster)."""
    parts = [(s.name, s, np.flatnonzero(s.observed)) for s in series]
    pipeline, scored, events = run_pipeline(calibrator.bundle(thresholds), _settings(), parts)
    opened = [(e.device, e.started_at) for e in events if e.state == "new"]
    faults, false_alerts = [], 0
    for s in series:
        mine = [f for f in schedule if f["device"] == s.name]
        starts = [t for device, t in opened if device == s.name]
        for fault in mine:
            hits = [t for t in starts if fault["start_ts"] <= t <= fault["end_ts"]]
            delay = (min(hits) - fault["start_ts"]) / 60.0 if hits else None
            faults.append({"device": s.name, "kind": fault["kind"], "duration_min": (fault["end_ts"] - fault["start_ts"]) / 60.0,
                           "detected": bool(hits), "delay_min": delay})
        false_alerts += sum(1 for t in starts if not any(f["start_ts"] <= t <= f["end_ts"] + grace_s for f in mine))
    samples = sum(x.shape[0] for x in scored)
    return {"faults": faults, "false_alerts": false_alerts, "device_hours": round(samples * prepared.period_s / 3600.0, 1)}


# -- recalibrating an existing bundle (new detection code, same model) -------------------------------------------


def recalibrate_bundle(model_dir, rows: dict, eval_rows: dict | None = None, eval_schedule: list | None = None,
                       command: str = "", log=print) -> dict:
    """Replace a bundle's calibration (and its report checks) using its own model.onnx on `rows`, the data it
    was trained on (the same temporal split gives the same validation stretches). model.onnx is unchanged."""
    import json
    import tempfile
    from pathlib import Path

    from training.cli import model_card
    from training.data import prepare, to_device_series
    from training.export import OnnxPredictor, write_bundle

    folder = Path(model_dir)
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    prepared = prepare(rows, manifest["lookback"], manifest["horizon"], int(manifest["sampling_period_s"]),
                       features=manifest["features"], targets=manifest["targets"])
    predict = OnnxPredictor(folder / manifest["onnx"]["file"], threads=2)
    calibration, calibrator, _ = calibrate(prepared, predict)
    thresholds = calibration["thresholds"]
    log(f"calibration: thresholds {thresholds}, score steps {calibration['score_steps']}, "
        f"slow gain {calibration.get('slow_gain')}, flat-line repeats {calibration['flatline_repeats']}")
    checks = {"healthy_test": healthy_alert_check(prepared, predict, calibrator, thresholds, "test")}
    log(f"healthy test split: {checks['healthy_test']['alerts']} alerts in {checks['healthy_test']['device_hours']} device-hours")
    if eval_rows is not None:
        series = to_device_series(eval_rows, prepared.period_s, features=manifest["features"])
        checks["eval_fleet"] = fault_detection_check(series, eval_schedule or [], prepared, predict, calibrator, thresholds)
        for f in checks["eval_fleet"]["faults"]:
            outcome = "not detected" if f["delay_min"] is None else "detected after %.0f min" % f["delay_min"]
            log(f"eval fleet: {f['kind']:13s} on {f['device']}: {outcome}")
    manifest["calibration"] = calibration
    if command:
        manifest["calibration"]["command"] = command
    report_path = folder / "report.json"
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    report["checks"] = checks
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "model.onnx"
        staged.write_bytes((folder / manifest["onnx"]["file"]).read_bytes())
        write_bundle(folder, staged, manifest, {"report.json": json.dumps(report, indent=2) + "\n",
                                                "README.md": model_card(manifest, checks)})
    return manifest


def add_recalibrate_arguments(parser) -> None:
    parser.add_argument("--model", default=None, help="bundle folder (default: the shipped pump-lstm, with its fixed-seed fleets)")
    parser.add_argument("--data", help="the CSV the bundle was trained on (synth columns); not needed for the shipped bundle")


def run_recalibrate(args) -> int:
    import sys

    from training.cli import SHIPPED_DIR, SHIPPED_EVAL_FLEET, SHIPPED_TRAIN_FLEET
    from simulation.synth import generate_fleet, read_csv

    model = args.model or str(SHIPPED_DIR)
    try:
        if args.data:
            recalibrate_bundle(model, read_csv(args.data), command=args.invocation)
        elif args.model is None:
            evaluation = generate_fleet(SHIPPED_EVAL_FLEET)
            recalibrate_bundle(model, generate_fleet(SHIPPED_TRAIN_FLEET).rows, evaluation.rows, evaluation.schedule,
                               command=args.invocation)
        else:
            print("recalibrate: give --data (the bundle's training CSV)", file=sys.stderr)
            return 2
    except (OSError, ValueError, KeyError) as exc:
        print(f"recalibrate: {exc}", file=sys.stderr)
        return 2
    return 0
