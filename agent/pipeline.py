"""The one code path from validated samples to forecasts and alerts, shared by the daemon and `replay`.

process(samples) runs in three phases so that every model call is batched, even when one call carries
several slots of the same device (a backlog after a reconnect, or a replay chunk):
1. windows: each sample is merged into its device's window; every committed slot is logged, and a device whose
   full window advanced (and whose stride allows) has its window copied into the batch buffer;
2. inference: one predict() per `inference.max_batch` windows;
3. in log order: each observed slot is scored against the one-step forecast made from the window that ended one
   period earlier (docs/contracts.md), then the forecasts made at that slot are emitted.
The result is identical however the samples are split into calls.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from agent.config import Settings
from agent.detect import AlertDetector, ResidualScorer
from agent.events import AlertEvent, Forecast, Rejected, Rejection, Sample
from agent.model import Bundle
from agent.window import NO_SLOT, WindowStore

Event = Forecast | AlertEvent | Rejection

_COMMIT, _FORECAST, _REJECT = 0, 1, 2
_NO_FORECAST, _STORED = -2, -1  # forecast source of a commit; >= 0: a batch row of the same call


class Trace(Protocol):
    """Optional per-sample observer (replay uses it to write one output row per input row)."""

    def on_slot(self, i: int, d: int, expected: np.ndarray | None, alert_open: bool) -> None:
        """Sample i committed a slot of device d (already scored, if it could be); `expected` is its one-step forecast."""

    def on_forecast(self, i: int, d: int, forecast: np.ndarray) -> None:
        """A forecast (H, T) was made from device d's window right after sample i."""


class Pipeline:
    def __init__(self, bundle: Bundle, settings: Settings):
        self.bundle = bundle
        self.settings = settings
        self.lookback, self.horizon = bundle.lookback, bundle.horizon
        self.period_s = bundle.period_s
        self.targets = bundle.targets
        self.target_index = bundle.target_index
        self.target_list = bundle.target_index.tolist()
        self.stride = settings.inference.stride
        self.max_batch = settings.inference.max_batch
        self.min_completeness = settings.window.min_completeness
        self.max_devices = settings.ingest.max_devices
        self.windows = WindowStore(bundle.features, bundle.lookback, bundle.period_s, settings.window.max_gap_periods, on_commit=self._on_commit)
        calibration = bundle.calibration
        scorer = ResidualScorer(calibration["residual_mean"], calibration["residual_std"], bundle.target_scale, calibration["ewma_alpha"])
        self.detector = AlertDetector.from_settings(scorer, calibration["thresholds"], bundle.targets, settings.detect, salt=bundle.sha256[:16])
        self._capacity = 0
        self._grow(self.windows.capacity)
        self._horizon_steps = np.arange(1, self.horizon + 1, dtype=np.float64) * self.period_s  # (H,)
        # Phase-1 log and batch buffer, reused across calls.
        self._log: list[tuple] = []
        self._batch = np.empty((max(1, min(self.max_batch, 64)), bundle.lookback, bundle.n_features), dtype=np.float32)  # (N, L, F)
        self._n_batch = 0
        self._current = 0
        self._call_forecasts: dict[int, tuple[int, int, float]] = {}  # device -> (slot, batch row, completeness)
        self.counters = {"samples": 0, "slots": 0, "late_samples": 0, "inferences": 0, "batches": 0, "scored": 0, "alerts_opened": 0, "rejected_devices": 0}

    # -- per-device arrays beside the window store --------------------------------------------------------------
    def _grow(self, capacity: int) -> None:
        T = self.bundle.n_targets
        fresh = {
            "expected": np.zeros((capacity, T), dtype=np.float32),  # one-step forecast of the next slot
            "expected_slot": np.full(capacity, NO_SLOT, dtype=np.int64),  # the slot `expected` was made at
            "expected_completeness": np.zeros(capacity, dtype=np.float32),
        }
        for key, array in fresh.items():
            if self._capacity:
                array[: self._capacity] = getattr(self, key)
            setattr(self, key, array)
        self._capacity = capacity
        self.detector.ensure_capacity(capacity)

    def _device(self, name: str) -> int | None:
        d = self.windows.index.get(name)
        if d is None:
            if len(self.windows) >= self.max_devices:
                return None
            d = self.windows.device(name)
            if self.windows.capacity > self._capacity:
                self._grow(self.windows.capacity)
        return d

    # -- phase 1 callback ---------------------------------------------------------------------------------------
    def _on_commit(self, d: int, slot: int, observed: bool, values) -> None:
        # Which forecast predicted this slot: one made earlier in this call (its batch row) or the stored one.
        source, completeness = _NO_FORECAST, 0.0
        in_call = self._call_forecasts.get(d)
        if in_call is not None:
            if in_call[0] == slot - 1:
                source, completeness = in_call[1], in_call[2]
        elif self.expected_slot[d] == slot - 1:
            source, completeness = _STORED, float(self.expected_completeness[d])
        if source != _NO_FORECAST:
            targets = [values[j] for j in self.target_list]
            self._log.append((_COMMIT, self._current, d, slot, observed and completeness >= self.min_completeness, source, targets))
        else:
            self._log.append((_COMMIT, self._current, d, slot, False, _NO_FORECAST, None))
        commits = self.windows.commits[d]
        if commits < self.lookback or (commits - self.lookback) % self.stride:
            return
        n = self._n_batch
        if n == self._batch.shape[0]:
            bigger = np.empty((2 * n,) + self._batch.shape[1:], dtype=np.float32)
            bigger[:n] = self._batch
            self._batch = bigger
        self._batch[n] = self.windows.window(d)
        self._n_batch = n + 1
        completeness = self.windows.completeness(d)
        self._call_forecasts[d] = (slot, n, completeness)
        self._log.append((_FORECAST, self._current, d, slot, n, completeness))

    # -- the entry point ------------------------------------------------------------------------------------------
    def process(self, samples: list[Sample], now: float, trace: Trace | None = None) -> list[Event]:
        """Samples in arrival order -> events in the same order (per sample: rejection | score alerts, forecast)."""
        log = self._log
        log.clear()
        self._call_forecasts.clear()
        self._n_batch = 0
        windows = self.windows
        for i, sample in enumerate(samples):
            d = self._device(sample.device)
            if d is None:
                self.counters["rejected_devices"] += 1
                log.append((_REJECT, i, Rejection("queue_full", f"device table is full (ingest.max_devices={self.max_devices})", sample.device)))
                continue
            self._current = i
            try:
                windows.update(d, sample.ts, sample.values)
            except Rejected as exc:
                self.counters["late_samples"] += 1
                log.append((_REJECT, i, Rejection(exc.reason, exc.detail, exc.device)))
        self.counters["samples"] += len(samples)
        try:
            forecasts = self._infer(self._n_batch)
            return self._emit(log, forecasts, now, trace)
        finally:
            log.clear()
            self._call_forecasts.clear()

    def _infer(self, n: int) -> np.ndarray | None:
        if n == 0:
            return None
        out = np.empty((n, self.horizon, self.bundle.n_targets), dtype=np.float32)  # (N, H, T)
        for start in range(0, n, self.max_batch):
            stop = min(n, start + self.max_batch)
            out[start:stop] = self.bundle.predict(self._batch[start:stop])
            self.counters["batches"] += 1
        self.counters["inferences"] += n
        return out

    def _expected_matrix(self, log: list[tuple], forecasts: np.ndarray | None):
        """(E, Z): one-step forecasts (K, T) and their normalized residuals (K, T), one row per commit with a source."""
        rows = [entry for entry in log if entry[0] == _COMMIT and entry[5] != _NO_FORECAST]
        if not rows:
            return None, None
        observed = np.array([entry[6] for entry in rows], dtype=np.float64)  # (K, T)
        sources = np.fromiter((entry[5] for entry in rows), dtype=np.int64, count=len(rows))
        devices = np.fromiter((entry[2] for entry in rows), dtype=np.int64, count=len(rows))
        expected = np.empty_like(observed)  # (K, T)
        stored = sources == _STORED
        expected[stored] = self.expected[devices[stored]]
        if forecasts is not None and not stored.all():
            expected[~stored] = forecasts[sources[~stored], 0]
        return expected, self.detector.scorer.z(observed, expected)

    def _emit(self, log: list[tuple], forecasts: np.ndarray | None, now: float, trace: Trace | None) -> list[Event]:
        events: list[Event] = []
        names = self.windows.names
        detector = self.detector
        period = self.period_s
        expected_rows, z_rows = self._expected_matrix(log, forecasts)
        # Python lists once per call: per-forecast numpy -> list conversions dominate otherwise.
        forecast_lists = forecasts.transpose(0, 2, 1).tolist() if forecasts is not None else None  # [N][T][H]
        steps = self._horizon_steps.tolist()
        k = 0  # next row of expected_rows / z_rows
        scored = 0
        for entry in log:
            kind = entry[0]
            if kind == _COMMIT:
                _, i, d, slot, scorable, source, observed = entry
                expected = None
                if source != _NO_FORECAST:
                    expected = expected_rows[k]
                    if scorable:
                        scored += 1
                        _, event = detector.observe(d, names[d], slot * period, observed, expected, z_rows[k])
                        if event is not None:
                            if event.state == "new":
                                self.counters["alerts_opened"] += 1
                            events.append(event)
                    k += 1
                if trace is not None:
                    trace.on_slot(i, d, expected, d in detector.open)
            elif kind == _FORECAST:
                _, i, d, slot, n, completeness = entry
                ts = slot * period
                events.append(
                    Forecast(
                        device=names[d],
                        ts=ts,
                        period_s=period,
                        horizon_ts=[ts + step for step in steps],
                        values=dict(zip(self.targets, forecast_lists[n])),
                        completeness=completeness,
                        staleness_s=now - ts,
                    )
                )
                if trace is not None:
                    trace.on_forecast(i, d, forecasts[n])
            else:
                events.append(entry[2])
        if self._call_forecasts:
            # Keep each device's newest one-step forecast for the next call (the loop above used expected_rows).
            latest = np.array([(d, slot, n) for d, (slot, n, _) in self._call_forecasts.items()], dtype=np.int64)  # (K, 3)
            self.expected[latest[:, 0]] = forecasts[latest[:, 2], 0]
            self.expected_slot[latest[:, 0]] = latest[:, 1]
            self.expected_completeness[latest[:, 0]] = [c for _, _, c in self._call_forecasts.values()]
        commits = sum(1 for entry in log if entry[0] == _COMMIT)
        self.counters["slots"] += commits
        self.counters["scored"] += scored
        return events

    # -- queries ------------------------------------------------------------------------------------------------
    def active_alerts(self, device: str) -> list[AlertEvent]:
        """The device's open alerts, each as its last event (new or update)."""
        d = self.windows.index.get(device)
        if d is None:
            return []
        event = self.detector.active(d)
        return [event] if event is not None else []

    def devices(self) -> list[str]:
        return list(self.windows.names)

    def stats(self) -> dict:
        return {
            "devices": len(self.windows),
            "open_alerts": len(self.detector.open),
            "state_bytes": self.state_bytes(),
            **self.counters,
        }

    def state_bytes(self) -> int:
        """Memory held by per-device state (numpy arrays; open alerts and name index not counted)."""
        own = self.expected.nbytes + self.expected_slot.nbytes + self.expected_completeness.nbytes
        det = sum(getattr(self.detector, k).nbytes for k in ("ewma", "score", "over", "under", "cooldown", "first_over_ts", "first_under_ts"))
        return self.windows.nbytes() + own + det
