"""Residual scoring, thresholds and the alert state machine.

`ResidualScorer` is the single definition of the anomaly score (docs/contracts.md); training's calibration
replays validation data through the same pipeline and detector, so the thresholds mean the same thing on the
device.

Score of one arriving sample, per device:
1. channels = (horizon step k in `steps`) x (target j): z = ((observed - forecast made k periods ago for this
   slot) / scale - residual_mean[k-1]) / residual_std[k-1]; a channel whose forecast is missing (gap, restart,
   forecast made from a window that ended in an imputed slot) is NaN and leaves its smoothed value unchanged;
2. per channel, EWMA of squares (starts at 1); residual score = sqrt(max over channels);
3. flat line (optional, calibrated per target): a target that repeats exactly the same value for
   `flatline_repeats[j]` consecutive samples raises the score to the warning level, growing with the run
   (capped at FLATLINE_CAP x warning: a stuck sensor is a data-quality warning, not by itself critical);
4. score = max(residual score, flat-line score); anomaly_score = score / (score + warning) in [0, 1).
Optional slow channels (`slow_alpha`, `slow_gain`, `slow_recent_alpha`): see ResidualScorer. Without the optional
calibration keys (`score_steps`, `slow_alpha`, `flatline_repeats`) this is the one-step score of the first version.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np

from agent.core import arrays
from agent.core.events import AlertEvent, FeatureDeviation
from agent.core.state import NormalState

FLATLINE_CAP = 1.5  # flat-line score at most 1.5 x warning (below the default critical = 2 x warning)


class ResidualScorer:
    """Per-device EWMA of squared normalized residuals over (step, target) channels; score = sqrt(max).

    Optional slow channels (`slow_alpha`): per target, a long EWMA of the squared residual of the first scored
    step, clipped to +-`slow_clip`. They see a sustained rise of the residual variance (bearing wear makes vibration erratic) long before
    it reaches the fast channels' threshold; `slow_gain` (calibrated so that both kinds peak alike on healthy
    data) puts them on the fast channels' scale.

    With `slow_recent_alpha`, each target's slow level is the smaller of that long EWMA and a shorter one (the
    same clipped residuals): a variance rise counts only while the recent residuals still show it. The long
    memory alone holds the score over the warning for hours after a fault has ended (on the synthetic fleet,
    most false-positive rows were such tails); the shorter one lets it fall within a few tens of samples.
    """

    def __init__(self, residual_mean: np.ndarray, residual_std: np.ndarray, scale: np.ndarray, alpha: float,
                 steps: list[int] | tuple[int, ...] = (1,), slow_alpha: float | None = None, slow_gain: float = 1.0,
                 slow_clip: float = 3.0, slow_recent_alpha: float | None = None, fast_gain: float = 1.0,
                 state: NormalState | None = None, state_alpha: float = 1.0, state_gains: tuple[float, float] = (1.0, 1.0)):
        mean = np.asarray(residual_mean, dtype=np.float64)  # (H, T) scaled units
        std = np.maximum(np.asarray(residual_std, dtype=np.float64), 1e-6)  # (H, T)
        self.steps = sorted(int(k) for k in steps)
        if not self.steps or min(self.steps) < 1 or max(self.steps) > mean.shape[0]:
            raise ValueError(f"score steps {self.steps} must lie in 1..horizon ({mean.shape[0]})")
        if slow_alpha is not None and not 0 < slow_alpha <= 1:
            raise ValueError(f"slow_alpha must be in (0, 1], got {slow_alpha!r}")
        if not slow_gain >= 0:
            raise ValueError(f"slow_gain must be >= 0, got {slow_gain!r}")
        if slow_recent_alpha is not None and (slow_alpha is None or not 0 < slow_recent_alpha <= 1):
            raise ValueError(f"slow_recent_alpha must be in (0, 1] and needs slow_alpha, got {slow_recent_alpha!r}")
        if not fast_gain > 0:
            raise ValueError(f"fast_gain must be > 0, got {fast_gain!r}")
        if state is not None and (not 0 < state_alpha <= 1 or len(state_gains) != 2 or min(state_gains) < 0):
            raise ValueError(f"state_alpha must be in (0, 1] and state_gains two numbers >= 0, got {state_alpha!r}, {state_gains!r}")
        index = np.array(self.steps) - 1
        self.mean = mean[index]  # (S, T)
        self.std = std[index]  # (S, T)
        self.mean0, self.std0 = mean[0], std[0]  # (T,) one step ahead
        self.scale = np.asarray(scale, dtype=np.float64)  # (T,) original units per scaled unit
        self.alpha = float(alpha)
        self.slow_clip = float(slow_clip)
        self.n_targets = T = mean.shape[1]
        self.n_fast = len(self.steps) * T
        self.slow = slow_alpha is not None
        self.recent = slow_recent_alpha is not None
        # Channels: fast (S*T, step-major), then per target the long slow EWMA (T), then the recent one (T).
        slow_alphas = ([float(slow_alpha)] * T if self.slow else []) + ([float(slow_recent_alpha)] * T if self.recent else [])
        self.n_slow_copies = len(slow_alphas) // T if T else 0
        # Then the state channels (T^2, SPE of agent.state), when the bundle has a state model.
        self.state = state
        self.n_state = 2 if state is not None else 0
        state_alphas = [float(state_alpha)] * self.n_state
        self.n_channels = self.n_fast + len(slow_alphas) + self.n_state
        self.alphas = np.array([self.alpha] * self.n_fast + slow_alphas + state_alphas)  # (C,) EWMA weight per channel
        # Each family's gain puts its own warning level at 1 (calibrations before the state model: fast gain 1).
        self.fast_weight = float(fast_gain) ** 2
        self.slow_weight = float(slow_gain) ** 2
        self.state_weights = np.square(np.asarray(state_gains, dtype=np.float64)) if state is not None else np.zeros(0)  # (2,)
        self.weights = np.array([self.fast_weight] * self.n_fast + [self.slow_weight] * len(slow_alphas)
                                + self.state_weights.tolist())  # (C,) weight in the max
        self._plain = self.fast_weight == 1.0 and state is None  # the first version's arithmetic, kept exactly
        end_slow = self.n_fast + len(slow_alphas)
        self._fast, self._long = slice(0, self.n_fast), slice(self.n_fast, self.n_fast + T)
        self._recent, self._state = slice(self.n_fast + T, end_slow), slice(end_slow, self.n_channels)
        self._decay = 1.0 - self.alphas

    @classmethod
    def from_calibration(cls, calibration: dict, target_scale: np.ndarray) -> "ResidualScorer":
        """The scorer a bundle's manifest.calibration describes (docs/contracts.md, "Anomaly score")."""
        section = calibration.get("state")
        state = NormalState.from_manifest(section) if section is not None else None
        return cls(calibration["residual_mean"], calibration["residual_std"], target_scale, calibration["ewma_alpha"],
                   calibration.get("score_steps", [1]), calibration.get("slow_alpha"), calibration.get("slow_gain", 1.0),
                   calibration.get("slow_clip", 3.0), calibration.get("slow_recent_alpha"), calibration.get("fast_gain", 1.0),
                   state, (section or {}).get("alpha", 1.0), tuple((section or {}).get("gains", (1.0, 1.0))))

    def initial_state(self, n_devices: int = 1) -> np.ndarray:
        return np.ones((n_devices, self.n_channels), dtype=np.float64)  # (D, C)

    def z(self, observed: np.ndarray, forecast: np.ndarray) -> np.ndarray:
        """One-step normalized residuals; observed and forecast in original units, (..., T)."""
        return ((observed - forecast) / self.scale - self.mean0) / self.std0

    def z_steps(self, observed: np.ndarray, forecasts: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
        """Normalized residuals of every step: observed (..., T), forecasts (..., S, T) (NaN where missing);
        `scale` (..., T): per-sample units per scaled unit (devices with a learned normal), else the bundle's."""
        per_unit = self.scale if scale is None else scale[..., None, :]
        resid = (observed[..., None, :] - forecasts) / per_unit  # (..., S, T) scaled units
        return (resid - self.mean) / self.std  # (..., S, T)

    def channels(self, z: np.ndarray) -> np.ndarray:
        """Per-channel residuals (C,) from one sample's z: (S, T) or, for a one-step scorer, (T,)."""
        flat = np.ravel(z)
        if not self.slow and not self.n_state:
            return flat
        # Slow channels: the first scored step, clipped so that a few huge residuals (a spike, a step) cannot
        # hold them up for their whole long memory; they are meant to see many moderately larger residuals.
        clipped = [np.clip(flat[: self.n_targets], -self.slow_clip, self.slow_clip)] * self.n_slow_copies
        return np.concatenate([flat, *clipped, np.full(self.n_state, np.nan)])  # no state statistics: they keep their value

    def slow_levels(self, state: np.ndarray) -> np.ndarray:
        """Unweighted slow level per target (..., T) of states (..., C): the long EWMA, or with recent channels
        the smaller of long and recent."""
        long = state[..., self._long]
        return np.minimum(long, state[..., self._recent]) if self.recent else long

    def _score(self, state: np.ndarray) -> float:
        if not self._plain:  # `_scores` of one row, on the 1-D row (fewer array operations; the same values)
            best = state[self._fast].max() * self.fast_weight
            if self.slow:
                best = np.maximum(best, self.slow_weight * self.slow_levels(state).max())
            if self.n_state:
                best = np.maximum(best, (state[self._state] * self.state_weights).max())
            return float(np.sqrt(best))
        if not self.slow:
            return float(np.sqrt(state.max()))
        if not self.recent:
            return float(np.sqrt((state * self.weights).max()))
        fast = state[self._fast].max()
        if self.n_targets == 1:  # plain floats: replay's per-sample cost matters most for small models
            long, recent = state[self.n_fast], state[self.n_fast + 1]
            slow = self.slow_weight * (long if long < recent else recent)
        else:
            slow = self.slow_weight * np.minimum(state[self._long], state[self._recent]).max()
        return float(np.sqrt(fast if fast > slow else slow))

    def update(self, state: np.ndarray, z: np.ndarray) -> np.ndarray:
        """One EWMA step in place for one device: state (C,), z (S, T) or (T,); NaN channels keep their
        value. Returns the score."""
        z = self.channels(z)
        missing = np.isnan(z)
        if missing.any():
            fresh = (1.0 - self.alphas) * state + self.alphas * np.square(z)
            np.copyto(state, fresh, where=~missing)
        else:
            state *= 1.0 - self.alphas
            state += self.alphas * (z * z)
        return self._score(state)

    def prepare(self, z: np.ndarray, scaled: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Many samples' z (K, S, T) (and, for the state channels, their scaled feature rows (K, F)) ->
        (alpha * z**2 per channel (K, C), rows with a missing channel (K,)), so that `update_prepared` does the
        least per-sample work."""
        K = z.shape[0]
        flat = z.reshape(K, -1)  # (K, S*T)
        if self.slow:
            # np.clip's values, without its Python wrapper (a few us, most of a one-sample call's clip)
            clipped = np.minimum(np.maximum(flat[:, : self.n_targets], -self.slow_clip), self.slow_clip)
            flat = np.concatenate([flat] + [clipped] * self.n_slow_copies, axis=1)  # (K, C - n_state)
        squares = flat * flat
        if self.n_state:
            stats = self.state.statistics(scaled) if scaled is not None else np.full((K, 2), np.nan)  # (K, 2), already squares
            squares = np.concatenate([squares, stats], axis=1)  # (K, C)
        return self.alphas * squares, np.isnan(squares).any(axis=1)

    def update_prepared(self, state: np.ndarray, weighted_sq: np.ndarray, missing: bool) -> float:
        """`update` for one row of `prepare`'s output."""
        if missing:
            fresh = (1.0 - self.alphas) * state + weighted_sq
            np.copyto(state, fresh, where=~np.isnan(fresh))
        else:
            state *= self._decay
            state += weighted_sq
        return self._score(state)

    def update_rows(self, states: np.ndarray, weighted_sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`update_prepared` for many devices at once: states (N, C) of distinct devices, rows of `prepare`
        (N, C) -> (new states (N, C), scores (N,)); the same floating-point operations, so the same results."""
        fresh = states * self._decay + weighted_sq  # (N, C)
        new = np.where(np.isnan(fresh), states, fresh)  # a missing channel keeps its value
        return new, self._scores(new)

    def _scores(self, states: np.ndarray) -> np.ndarray:
        """`_score` of each row of states (N, C) -> (N,)."""
        if not self._plain:
            best = states[:, self._fast].max(axis=1) * self.fast_weight  # (N,)
            if self.slow:
                best = np.maximum(best, self.slow_weight * self.slow_levels(states).max(axis=1))
            if self.n_state:
                best = np.maximum(best, (states[:, self._state] * self.state_weights).max(axis=1))
            return np.sqrt(best)
        if not self.slow:
            return np.sqrt(states.max(axis=1))
        if not self.recent:
            return np.sqrt((states * self.weights).max(axis=1))
        fast = states[:, self._fast].max(axis=1)
        long, recent = states[:, self._long], states[:, self._recent]  # (N, T) each
        if self.n_targets == 1:
            slow = self.slow_weight * np.where(long < recent, long, recent)[:, 0]
        else:
            slow = self.slow_weight * np.minimum(long, recent).max(axis=1)
        return np.sqrt(np.where(fast > slow, fast, slow))

    def split_scores(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(fast score, unweighted slow score) of states (..., C); the slow one is 0 without slow channels."""
        fast = np.sqrt(state[..., : self.n_fast].max(axis=-1))
        slow = np.sqrt(self.slow_levels(state).max(axis=-1)) if self.slow else np.zeros_like(fast)
        return fast, slow

    def score_series(self, observed: np.ndarray, forecast: np.ndarray) -> np.ndarray:
        """Scores of one device's consecutive samples (one-step scorer): (N, T) each -> (N,)."""
        zs = self.z(observed, forecast)  # (N, T)
        state = self.initial_state(1)[0]  # (C,)
        out = np.empty(zs.shape[0], dtype=np.float64)
        for i in range(zs.shape[0]):
            out[i] = self.update(state, zs[i])
        return out

    def target_levels(self, state: np.ndarray) -> np.ndarray:
        """Per target, sqrt of its largest weighted channel (T,): how much each target deviates."""
        T = self.n_targets
        fast = state[: self.n_fast].reshape(-1, T).max(axis=0) * self.fast_weight
        if self.slow:
            fast = np.maximum(fast, self.slow_weight * self.slow_levels(state))
        return np.sqrt(fast)


def anomaly_score(score: float | np.ndarray, warning: float | np.ndarray) -> float | np.ndarray:
    """Map an unbounded score to [0, 1): 0.5 exactly at the warning threshold."""
    return score / (score + warning)


def dynamic_threshold(scores: np.ndarray, z_candidates: np.ndarray) -> float:
    """Nonparametric threshold of Hundman et al. (2018) over a window of smoothed scores.

    For each candidate eps = mean + z * std, the objective is (dmean/mean + dstd/std) / (n_above + n_runs**2):
    the threshold whose removal of the points above it shrinks mean and spread the most, per point and
    contiguous run it flags. Returns the best eps (the largest candidate when nothing lies above any).
    """
    s = np.asarray(scores, dtype=np.float64)  # (W,)
    mean, std = s.mean(), s.std()
    if std <= 1e-12:
        return float(mean + z_candidates[-1] * max(std, 1e-6))
    eps = mean + z_candidates[:, None] * std  # (Z, 1)
    below = s[None, :] < eps  # (Z, W)
    n_below = below.sum(axis=1)
    n_above = s.size - n_below
    mean_below = (s * below).sum(axis=1) / np.maximum(n_below, 1)
    var_below = (np.square(s - mean_below[:, None]) * below).sum(axis=1) / np.maximum(n_below, 1)
    starts = np.diff(np.concatenate([np.zeros((len(z_candidates), 1), bool), ~below], axis=1).astype(np.int8), axis=1) == 1
    n_runs = starts.sum(axis=1)
    gain = (mean - mean_below) / max(mean, 1e-12) + (std - np.sqrt(var_below)) / std
    objective = np.where(n_above > 0, gain / np.maximum(n_above + n_runs**2, 1), -np.inf)
    if not np.isfinite(objective).any():
        return float(eps[-1, 0])
    return float(eps[int(np.argmax(objective)), 0])


# -- alert state machine ----------------------------------------------------------------------------------------


def alert_id_for(device: str, started_at: float, salt: str = "") -> str:
    """`{device}-{started_at}-{6 hex}`: deterministic, so a replay of the same data names alerts the same."""
    digest = hashlib.blake2s(f"{device}|{started_at!r}|{salt}".encode(), digest_size=3).hexdigest()
    return f"{device}-{int(started_at)}-{digest}"


@dataclass(slots=True)
class _OpenAlert:
    alert_id: str
    started_at: float
    severity: str  # as last reported
    since_event: int  # scored samples since the last new/update event
    last_event: AlertEvent


class AlertDetector:
    """Per-device score plus the alert state machine of docs/contracts.md.

    Devices are dense indices (the pipeline's window store indices). State per device is a few numbers in
    shared arrays; only open alerts have an object.

    Thresholds: `threshold_mode="fixed"` uses the calibrated warning/critical/exit; "dynamic" recomputes each
    device's warning every `dynamic_every` scored samples from its last `dynamic_window` scores
    (`dynamic_threshold`), never below `dynamic_floor` x the calibrated warning; critical and exit keep
    their calibrated ratios to the warning.
    """

    def __init__(
        self,
        scorer: ResidualScorer,
        thresholds: dict,
        targets: list[str],
        *,
        enabled: bool = True,
        min_samples_over: int = 3,
        min_samples_under: int = 5,
        cooldown_samples: int = 10,
        update_every_samples: int = 10,
        threshold_scale: float = 1.0,
        flatline_repeats: list[int] | None = None,
        flap_window_samples: int = 0,
        flap_max_alerts: int = 3,
        threshold_mode: str = "fixed",
        dynamic_window: int = 720,
        dynamic_every: int = 30,
        dynamic_floor: float = 1.0,
        dynamic_z: tuple[float, float, float] = (2.0, 10.0, 0.5),
        salt: str = "",
        capacity: int = 64,
    ):
        self.scorer = scorer
        self.targets = list(targets)
        self.warning = float(thresholds["warning"]) * threshold_scale
        self.critical = float(thresholds["critical"]) * threshold_scale
        self.exit = float(thresholds["exit"]) * threshold_scale
        self.enabled = enabled
        self.min_over = min_samples_over
        self.min_under = min_samples_under
        self.cooldown_samples = cooldown_samples
        self.update_every = update_every_samples
        repeats = np.asarray(flatline_repeats if flatline_repeats is not None else [0] * len(self.targets), dtype=np.float64)
        self.flatline_repeats = np.where(repeats > 0, repeats, np.inf)  # (T,) inf: check off for that target
        self.flatline_on = bool(np.isfinite(self.flatline_repeats).any())
        self.flatline_min = float(self.flatline_repeats.min())
        self.flap_window = flap_window_samples
        self.flap_max = flap_max_alerts
        self.dynamic = threshold_mode == "dynamic"
        self.dynamic_window = dynamic_window
        self.dynamic_every = dynamic_every
        self.dynamic_floor = dynamic_floor
        self.dynamic_z = np.arange(dynamic_z[0], dynamic_z[1] + 1e-9, dynamic_z[2])
        self.salt = salt
        self.vectorize_quiet = True  # observe_quiet() on; False sends every sample through observe() (tests compare)
        self.open: dict[int, _OpenAlert] = {}
        self.counters = {"flap_suppressed": 0, "flatline_runs": 0}
        self.capacity = 0
        self.ensure_capacity(capacity)

    @classmethod
    def from_settings(cls, scorer: ResidualScorer, calibration: dict, targets: list[str], detect, salt: str = "") -> "AlertDetector":
        """Build from the bundle's calibration and a config.DetectConfig section."""
        return cls(
            scorer,
            calibration["thresholds"],
            targets,
            enabled=detect.enabled,
            min_samples_over=detect.min_samples_over,
            min_samples_under=detect.min_samples_under,
            cooldown_samples=detect.cooldown_samples,
            update_every_samples=detect.update_every_samples,
            threshold_scale=detect.threshold_scale,
            flatline_repeats=calibration.get("flatline_repeats") if detect.flatline else None,
            flap_window_samples=detect.flap_window_samples,
            flap_max_alerts=detect.flap_max_alerts,
            threshold_mode=detect.threshold_mode,
            dynamic_window=detect.dynamic_window_samples,
            dynamic_every=detect.dynamic_every_samples,
            dynamic_floor=detect.dynamic_floor,
            salt=salt,
        )

    def ensure_capacity(self, n: int, used: int | None = None) -> None:
        """Room for n devices; `used`: rows written so far (the rest need no copying), all of them when None."""
        if n <= self.capacity:
            return
        capacity = max(n, self.capacity + self.capacity // 2, 16)
        T = len(self.targets)
        ewma = arrays.zeros((capacity, self.scorer.n_channels), np.float64)  # (D, C) EWMA of squared z per channel
        ewma[:] = self.scorer.initial_state(1)
        fresh = {
            "ewma": ewma,
            "score": arrays.zeros(capacity, np.float64),  # latest score; 0 before the first
            "warn": arrays.full(capacity, self.warning, np.float64),  # per-device warning (dynamic mode)
            "scored": arrays.zeros(capacity, np.int64),  # scored samples so far
            "over": arrays.zeros(capacity, np.int32),  # consecutive scored samples >= warning
            "under": arrays.zeros(capacity, np.int32),  # consecutive scored samples < exit (while open)
            "cooldown": arrays.zeros(capacity, np.int32),  # scored samples left before a new alert may open
            "first_over_ts": arrays.zeros(capacity, np.float64),
            "first_under_ts": arrays.zeros(capacity, np.float64),
            "last_value": arrays.full((capacity, T), np.nan, np.float64),  # flat-line check
            "repeats": arrays.zeros((capacity, T), np.int32),  # consecutive exact repeats per target
            "opens": arrays.full((capacity, max(self.flap_max, 1)), -(2**62), np.int64),  # scored index of recent opens
            # Per target, the sample that deviated most since the last event (or the start of the run): the
            # attribution reports it, because the forecaster catches up within a few samples.
            "peak_z": arrays.zeros((capacity, T), np.float64),
            "peak_expected": arrays.zeros((capacity, T), np.float64),
            "peak_observed": arrays.zeros((capacity, T), np.float64),
        }
        if self.dynamic:
            fresh["history"] = arrays.zeros((capacity, self.dynamic_window), np.float32)  # (D, W) recent scores
        arrays.replace(self, fresh, self.capacity if used is None else min(used, self.capacity))
        self.capacity = capacity

    def open_state(self, d: int) -> dict | None:
        """Device d's open alert and the detector state that decides its end (JSON-ready), or None."""
        alert = self.open.get(d)
        if alert is None:
            return None
        return {"event": dataclasses.asdict(alert.last_event), "started_at": alert.started_at, "severity": alert.severity,
                "since_event": alert.since_event, "ewma": self.ewma[d].tolist(), "score": float(self.score[d]),
                "under": int(self.under[d]), "first_under_ts": float(self.first_under_ts[d])}

    def restore_open(self, d: int, state: dict) -> AlertEvent:
        """Reopen an alert saved by `open_state` on device row d (same model); returns its last event."""
        event = dict(state["event"])
        event["features"] = [FeatureDeviation(**f) for f in event.get("features") or []]
        last = AlertEvent(**event)
        ewma = np.asarray(state["ewma"], dtype=np.float64)
        if ewma.shape == self.ewma[d].shape:
            self.ewma[d] = ewma
        self.score[d] = float(state.get("score", 0.0))
        self.under[d] = int(state.get("under", 0))
        self.first_under_ts[d] = float(state.get("first_under_ts", 0.0))
        self.open[d] = _OpenAlert(last.alert_id, float(state["started_at"]), str(state["severity"]), int(state.get("since_event", 0)), last)
        return last

    def reset(self, d: int) -> None:
        """Device row d starts over (its device was evicted and the row given to another); no open alert."""
        self.open.pop(d, None)
        self.ewma[d] = self.scorer.initial_state(1)[0]
        self.warn[d] = self.warning
        for key in ("score", "scored", "over", "under", "cooldown", "first_over_ts", "first_under_ts", "repeats",
                    "peak_z", "peak_expected", "peak_observed"):
            getattr(self, key)[d] = 0
        self.last_value[d] = np.nan
        self.opens[d] = -(2**62)
        if self.dynamic:
            self.history[d] = 0

    def state_bytes(self) -> int:
        keys = ["ewma", "score", "warn", "scored", "over", "under", "cooldown", "first_over_ts", "first_under_ts",
                "last_value", "repeats", "opens", "peak_z", "peak_expected", "peak_observed"]
        return sum(getattr(self, k).nbytes for k in keys + (["history"] if self.dynamic else []))

    def anomaly_score(self, d: int) -> float:
        return float(anomaly_score(self.score[d], self.warn[d]))

    def active(self, d: int) -> AlertEvent | None:
        alert = self.open.get(d)
        return alert.last_event if alert is not None else None

    def observe(self, d: int, device: str, ts: float, observed: np.ndarray, expected: np.ndarray, z: np.ndarray | None = None,
                prepared: tuple[np.ndarray, bool] | None = None) -> tuple[float, AlertEvent | None]:
        """Score one observed sample (T,) against its forecasts, original units; maybe an alert event.

        `expected` is the one-step forecast (T,) or the forecasts of every scored step (S, T), NaN where
        missing; `z` (and `prepared`, a row of scorer.prepare) may be passed when the caller computed them for
        many samples at once.
        """
        if z is None:
            expected = np.asarray(expected, dtype=np.float64)
            z = self.scorer.z(observed, expected) if expected.ndim == 1 else self.scorer.z_steps(observed, expected)
        if prepared is None:
            score = self.scorer.update(self.ewma[d], z)
        else:
            score = self.scorer.update_prepared(self.ewma[d], prepared[0], prepared[1])
        if self.flatline_on:
            score = max(score, self._flatline(d, observed))
        self.score[d] = score
        self.scored[d] += 1
        if self.dynamic:
            self._dynamic(d, score)
        if not self.enabled:
            return score, None
        if score >= self.warn[d] or d in self.open:  # only runs over warning and open alerts report peaks
            self._track_peaks(d, z, observed, expected)
        event = self._step(d, device, ts, score)
        if event is not None or (d not in self.open and self.over[d] == 0):
            self.peak_z[d] = 0.0  # the next event reports deviations from here on
        return score, event

    def observe_quiet(self, devices: np.ndarray, weighted_sq: np.ndarray, observed: np.ndarray) -> np.ndarray:
        """`observe()` of many scored samples at once (in order; a device may come more than once) for the
        devices that stay quiet: no open alert, no cooldown, no run over the warning before, and every new score
        under its warning. Those devices' state is updated here, exactly as `observe()` one sample at a time
        would (same operations); the others' is left untouched and their samples must go through `observe()`,
        in order. Returns which samples were handled (K,).

        devices (K,) int, weighted_sq (K, C) rows of scorer.prepare, observed (K, T) original units. Most
        samples of a healthy fleet take this path, which costs a fraction of the per-sample Python.
        """
        K = len(devices)
        if not self.vectorize_quiet or not self.enabled or self.dynamic or K == 0:
            return np.zeros(K, dtype=bool)
        order = np.argsort(devices, kind="stable")
        sorted_devices = devices[order]
        first = np.empty(K, dtype=bool)
        first[0] = True
        np.not_equal(sorted_devices[1:], sorted_devices[:-1], out=first[1:])
        unique = sorted_devices[first]  # (U,)
        group = np.cumsum(first) - 1  # (K,) in sorted order
        inverse = np.empty(K, dtype=np.int64)
        inverse[order] = group  # (K,) row -> its device's position in `unique`
        rank = np.empty(K, dtype=np.int64)
        rank[order] = np.arange(K) - np.flatnonzero(first)[group]  # (K,) how many earlier rows of its device
        ewma = self.ewma[unique]  # (U, C) working copies, committed only for quiet devices
        if self.flatline_on:
            last_value, repeats = self.last_value[unique], self.repeats[unique]  # (U, T) each
        last_score = np.empty(len(unique), dtype=np.float64)
        warn = self.warn[devices]  # (K,)
        hot = np.zeros(K, dtype=bool)
        for r in range(int(rank.max()) + 1):
            rows = np.flatnonzero(rank == r)  # distinct devices
            u = inverse[rows]
            ewma[u], score = self.scorer.update_rows(ewma[u], weighted_sq[rows])
            if self.flatline_on:
                values = observed[rows]  # (R, T)
                run = np.where(values == last_value[u], repeats[u] + 1, 0)  # NaN never equals: a gap ends a run
                repeats[u], last_value[u] = run, values
                ratio = (run / self.flatline_repeats).max(axis=1)
                flat = np.where((run.max(axis=1) >= self.flatline_min) & (ratio >= 1.0),
                                warn[rows] * np.minimum(ratio, FLATLINE_CAP), 0.0)
                score = np.where(flat > score, flat, score)
            last_score[u] = score
            hot[rows] = ~(score < warn[rows])  # NaN counts as over, as in _step
        busy = (self.over[unique] != 0) | (self.cooldown[unique] != 0)
        if self.open:
            busy |= np.isin(unique, np.fromiter(self.open, dtype=np.int64, count=len(self.open)))
        busy[inverse[hot]] = True
        quiet = ~busy
        done = unique[quiet]
        self.ewma[done] = ewma[quiet]
        if self.flatline_on:
            self.last_value[done] = last_value[quiet]
            self.repeats[done] = repeats[quiet]
        self.score[done] = last_score[quiet]
        self.scored[done] += np.bincount(inverse, minlength=len(unique))[quiet]
        self.peak_z[done] = 0.0
        return quiet[inverse]

    def _flatline(self, d: int, observed) -> float:
        run = self.repeats[d]  # (T,) consecutive exact repeats, updated in place
        last = self.last_value[d]
        longest = 0
        # element by element: for the few targets of a sample this is several times cheaper than numpy ufuncs
        for t, value in enumerate(observed.tolist() if isinstance(observed, np.ndarray) else list(observed)):
            count = int(run[t]) + 1 if value == last[t] else 0  # NaN never equals: a gap ends the run
            run[t] = count
            last[t] = value
            if count > longest:
                longest = count
        if longest < self.flatline_min:
            return 0.0
        if (run == self.flatline_repeats).any():
            self.counters["flatline_runs"] += 1
        ratio = float((run / self.flatline_repeats).max())
        return self.warn[d] * min(ratio, FLATLINE_CAP) if ratio >= 1.0 else 0.0

    def _dynamic(self, d: int, score: float) -> None:
        n = int(self.scored[d])
        self.history[d, (n - 1) % self.dynamic_window] = score
        if n >= self.dynamic_window // 2 and n % self.dynamic_every == 0:
            window = self.history[d, : min(n, self.dynamic_window)]
            eps = dynamic_threshold(window, self.dynamic_z)
            self.warn[d] = max(eps, self.dynamic_floor * self.warning)

    def _track_peaks(self, d: int, z, observed, expected) -> None:
        z = np.asarray(z, dtype=np.float64).reshape(-1, len(self.targets))  # (S, T)
        expected = np.asarray(expected, dtype=np.float64).reshape(-1, len(self.targets))  # (S, T)
        absz = np.where(np.isnan(z), -1.0, np.abs(z))
        best = absz.argmax(axis=0)  # (T,) step with the largest deviation per target
        cols = np.arange(len(self.targets))
        zbest, ebest = z[best, cols], expected[best, cols]
        larger = absz[best, cols] > np.abs(self.peak_z[d])  # (T,)
        if larger.any():
            self.peak_z[d][larger] = zbest[larger]
            self.peak_expected[d][larger] = ebest[larger]
            self.peak_observed[d][larger] = np.asarray(observed)[larger]

    def _step(self, d: int, device: str, ts: float, score: float) -> AlertEvent | None:
        alert = self.open.get(d)
        warning = self.warn[d]
        critical = warning * self.critical / self.warning
        exit_level = warning * self.exit / self.warning
        if alert is None:
            if self.cooldown[d] > 0:
                self.cooldown[d] -= 1
                return None
            if score < warning:
                self.over[d] = 0
                return None
            if self.over[d] == 0:
                self.first_over_ts[d] = ts
            self.over[d] += 1
            if self.over[d] < self.min_over:
                return None
            self.over[d] = 0
            self.under[d] = 0
            started_at = float(self.first_over_ts[d])
            severity = "critical" if score >= critical else "warning"
            event = self._event(d, device, ts, score, alert_id_for(device, started_at, self.salt), "new", severity, started_at, None)
            self.open[d] = _OpenAlert(event.alert_id, started_at, severity, 0, event)
            opens = self.opens[d]
            opens[:-1] = opens[1:].copy()
            opens[-1] = self.scored[d]
            return event

        alert.since_event += 1
        if score < exit_level:
            if self.under[d] == 0:
                self.first_under_ts[d] = ts
            self.under[d] += 1
            if self.under[d] >= self.min_under:
                self.under[d] = 0
                self.cooldown[d] = self.cooldown_samples
                if self.flap_window and self.scored[d] - self.opens[d, 0] <= self.flap_window:
                    # flap_max alerts opened within the flap window: hold new ones back for a whole window
                    self.cooldown[d] = max(self.cooldown_samples, self.flap_window)
                    self.counters["flap_suppressed"] += 1
                del self.open[d]
                return self._event(d, device, ts, score, alert.alert_id, "end", alert.severity, alert.started_at, float(self.first_under_ts[d]))
        else:
            self.under[d] = 0
        severity = "critical" if score >= critical else "warning"
        escalated = severity == "critical" and alert.severity == "warning"
        if not escalated and alert.since_event < self.update_every:
            return None
        event = self._event(d, device, ts, score, alert.alert_id, "update", severity, alert.started_at, None)
        alert.severity, alert.since_event, alert.last_event = severity, 0, event
        return event

    def _event(self, d: int, device: str, ts: float, score: float, alert_id: str, state: str, severity: str, started_at: float, ended_at: float | None) -> AlertEvent:
        warning = float(self.warn[d])
        return AlertEvent(
            alert_id=alert_id,
            device=device,
            state=state,
            severity=severity,
            anomaly_score=float(anomaly_score(score, warning)),
            score=score,
            threshold=warning,
            ts=float(ts),
            started_at=float(started_at),
            ended_at=ended_at,
            features=self.attribution(d),
        )

    def attribution(self, d: int) -> list[FeatureDeviation]:
        """Targets whose smoothed |z| (sqrt of their largest channel EWMA) reaches the exit threshold, or that
        are flat-lining, largest first (at least one), each with expected, observed (original units) and z of
        its largest deviation since the last event."""
        smoothed = self.scorer.target_levels(self.ewma[d])  # (T,)
        if self.flatline_on:
            flat = self.repeats[d] >= self.flatline_repeats
            smoothed = np.where(flat, np.maximum(smoothed, self.score[d]), smoothed)
        order = np.argsort(-smoothed, kind="stable")
        chosen = [int(j) for j in order if smoothed[j] >= self.exit] or [int(order[0])]
        return [
            FeatureDeviation(self.targets[j], float(self.peak_expected[d, j]), float(self.peak_observed[d, j]), float(self.peak_z[d, j]))
            for j in chosen
        ]
