"""Residual scoring and the alert state machine.

`ResidualScorer` is the single definition of the anomaly score (docs/contracts.md); training's calibration
runs the same class over validation data so the thresholds mean the same thing on the device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from agent.events import AlertEvent, FeatureDeviation


class ResidualScorer:
    """Per-device EWMA of squared normalized one-step residuals; score = sqrt(max over targets)."""

    def __init__(self, residual_mean: np.ndarray, residual_std: np.ndarray, scale: np.ndarray, alpha: float):
        # residual_mean / residual_std: (H, T) in scaled units; only step 0 (one step ahead) is used here.
        self.mean0 = np.asarray(residual_mean, dtype=np.float64)[0]  # (T,)
        self.std0 = np.maximum(np.asarray(residual_std, dtype=np.float64)[0], 1e-6)  # (T,)
        self.scale = np.asarray(scale, dtype=np.float64)  # (T,) original units per scaled unit
        self.alpha = float(alpha)

    def initial_state(self, n_devices: int = 1) -> np.ndarray:
        return np.ones((n_devices, self.mean0.shape[0]), dtype=np.float64)  # (D, T)

    def z(self, observed: np.ndarray, forecast: np.ndarray) -> np.ndarray:
        """Normalized residuals; observed and forecast in original units, (..., T)."""
        return ((observed - forecast) / self.scale - self.mean0) / self.std0

    def update(self, state: np.ndarray, z: np.ndarray) -> np.ndarray:
        """One EWMA step in place; state (D, T) or (T,), z the same shape. Returns the score(s)."""
        state *= 1.0 - self.alpha
        state += self.alpha * np.square(z)
        return np.sqrt(state.max(axis=-1))

    def score_series(self, observed: np.ndarray, forecast: np.ndarray) -> np.ndarray:
        """Scores of one device's consecutive samples, (N, T) each -> (N,); the offline twin of `update`."""
        zs = self.z(observed, forecast)  # (N, T)
        state = self.initial_state(1)[0]  # (T,)
        out = np.empty(zs.shape[0], dtype=np.float64)
        for i in range(zs.shape[0]):
            out[i] = self.update(state, zs[i])
        return out


def anomaly_score(score: float | np.ndarray, warning: float) -> float | np.ndarray:
    """Map an unbounded score to [0, 1): 0.5 exactly at the warning threshold."""
    return score / (score + warning)


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
    """Per-device residual score plus the alert state machine of docs/contracts.md.

    Devices are dense indices (the pipeline's window store indices). State per device is a few numbers in
    shared arrays; only open alerts have an object.
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
        self.salt = salt
        self.open: dict[int, _OpenAlert] = {}
        self.capacity = 0
        self.ensure_capacity(capacity)

    @classmethod
    def from_settings(cls, scorer: ResidualScorer, thresholds: dict, targets: list[str], detect, salt: str = "") -> "AlertDetector":
        """Build from a config.DetectConfig section."""
        return cls(
            scorer,
            thresholds,
            targets,
            enabled=detect.enabled,
            min_samples_over=detect.min_samples_over,
            min_samples_under=detect.min_samples_under,
            cooldown_samples=detect.cooldown_samples,
            update_every_samples=detect.update_every_samples,
            threshold_scale=detect.threshold_scale,
            salt=salt,
        )

    def ensure_capacity(self, n: int) -> None:
        if n <= self.capacity:
            return
        capacity = max(n, 2 * self.capacity, 16)
        fresh = {
            "ewma": self.scorer.initial_state(capacity),  # (D, T) EWMA of squared z
            "score": np.zeros(capacity, dtype=np.float64),  # latest score; 0 before the first
            "over": np.zeros(capacity, dtype=np.int32),  # consecutive scored samples >= warning
            "under": np.zeros(capacity, dtype=np.int32),  # consecutive scored samples < exit (while open)
            "cooldown": np.zeros(capacity, dtype=np.int32),  # scored samples left before a new alert may open
            "first_over_ts": np.zeros(capacity, dtype=np.float64),
            "first_under_ts": np.zeros(capacity, dtype=np.float64),
            # Per target, the sample that deviated most since the last event (or the start of the run): the
            # attribution reports it, because a one-step forecaster catches up within a few samples.
            "peak_z": np.zeros((capacity, len(self.targets)), dtype=np.float64),
            "peak_expected": np.zeros((capacity, len(self.targets)), dtype=np.float64),
            "peak_observed": np.zeros((capacity, len(self.targets)), dtype=np.float64),
        }
        for key, array in fresh.items():
            if self.capacity:
                array[: self.capacity] = getattr(self, key)
            setattr(self, key, array)
        self.capacity = capacity

    def anomaly_score(self, d: int) -> float:
        return float(anomaly_score(self.score[d], self.warning))

    def active(self, d: int) -> AlertEvent | None:
        alert = self.open.get(d)
        return alert.last_event if alert is not None else None

    def observe(self, d: int, device: str, ts: float, observed: np.ndarray, expected: np.ndarray, z: np.ndarray | None = None) -> tuple[float, AlertEvent | None]:
        """Score one observed sample against its one-step forecast (both (T,), original units); maybe an event.

        `z` may be passed when the caller computed scorer.z for many samples at once.
        """
        if z is None:
            z = self.scorer.z(observed, expected)  # (T,)
        score = float(self.scorer.update(self.ewma[d], z))
        self.score[d] = score
        if not self.enabled:
            return score, None
        if score >= self.warning or d in self.open:  # only runs over warning and open alerts report peaks
            self._track_peaks(d, z, observed, expected)
        event = self._step(d, device, ts, score)
        if event is not None or (d not in self.open and self.over[d] == 0):
            self.peak_z[d] = 0.0  # the next event reports deviations from here on
        return score, event

    def _track_peaks(self, d: int, z, observed, expected) -> None:
        larger = np.abs(z) > np.abs(self.peak_z[d])  # (T,)
        if larger.any():
            self.peak_z[d][larger] = np.asarray(z)[larger]
            self.peak_expected[d][larger] = np.asarray(expected)[larger]
            self.peak_observed[d][larger] = np.asarray(observed)[larger]

    def _step(self, d: int, device: str, ts: float, score: float) -> AlertEvent | None:
        alert = self.open.get(d)
        if alert is None:
            if self.cooldown[d] > 0:
                self.cooldown[d] -= 1
                return None
            if score < self.warning:
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
            severity = "critical" if score >= self.critical else "warning"
            event = self._event(d, device, ts, score, alert_id_for(device, started_at, self.salt), "new", severity, started_at, None)
            self.open[d] = _OpenAlert(event.alert_id, started_at, severity, 0, event)
            return event

        alert.since_event += 1
        if score < self.exit:
            if self.under[d] == 0:
                self.first_under_ts[d] = ts
            self.under[d] += 1
            if self.under[d] >= self.min_under:
                self.under[d] = 0
                self.cooldown[d] = self.cooldown_samples
                del self.open[d]
                return self._event(d, device, ts, score, alert.alert_id, "end", alert.severity, alert.started_at, float(self.first_under_ts[d]))
        else:
            self.under[d] = 0
        severity = "critical" if score >= self.critical else "warning"
        escalated = severity == "critical" and alert.severity == "warning"
        if not escalated and alert.since_event < self.update_every:
            return None
        event = self._event(d, device, ts, score, alert.alert_id, "update", severity, alert.started_at, None)
        alert.severity, alert.since_event, alert.last_event = severity, 0, event
        return event

    def _event(self, d: int, device: str, ts: float, score: float, alert_id: str, state: str, severity: str, started_at: float, ended_at: float | None) -> AlertEvent:
        return AlertEvent(
            alert_id=alert_id,
            device=device,
            state=state,
            severity=severity,
            anomaly_score=float(anomaly_score(score, self.warning)),
            score=score,
            threshold=self.warning,
            ts=float(ts),
            started_at=float(started_at),
            ended_at=ended_at,
            features=self.attribution(d),
        )

    def attribution(self, d: int) -> list[FeatureDeviation]:
        """Targets whose smoothed |z| (sqrt of their EWMA) reaches the exit threshold, largest first (at least
        one), each with expected, observed (original units) and z of its largest deviation since the last event."""
        smoothed = np.sqrt(self.ewma[d])  # (T,)
        order = np.argsort(-smoothed, kind="stable")
        chosen = [int(j) for j in order if smoothed[j] >= self.exit] or [int(order[0])]
        return [
            FeatureDeviation(self.targets[j], float(self.peak_expected[d, j]), float(self.peak_observed[d, j]), float(self.peak_z[d, j]))
            for j in chosen
        ]
