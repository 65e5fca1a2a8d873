"""The one code path from validated samples to forecasts and alerts, shared by the daemon and `replay`.

process(samples) runs in three phases so that every model call is batched, even when one call carries
several slots of the same device (a backlog after a reconnect, or a replay chunk):
1. windows: each sample is merged into its device's window; every committed slot is logged, and a device whose
   full window advanced (and whose stride allows) has its window copied into the batch buffer;
2. inference: one predict() per `inference.max_batch` windows;
3. in log order: each observed slot is scored against the forecasts made for it 1..k periods earlier (the
   calibration's `score_steps`; docs/contracts.md), then the forecasts made at that slot are emitted.
The result is identical however the samples are split into calls.

The daemon runs the phases on three threads (`prepare`, `infer`, `finish`: worker, model, publisher), each a
different call at a time: phase 1 touches only the windows and the call's own batch array, phase 2 only that
array and the model, phase 3 only the detector and the ring of past forecasts; phases 1 and 3 meet only when new
devices grow the per-device arrays, under a lock. `process` runs all three (replay, tests).
"""

from __future__ import annotations

import dataclasses
import operator
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from agent.core import arrays
from agent.core.detect import AlertDetector, ResidualScorer
from agent.core.events import AlertEvent, FeatureDeviation, Forecast, ForecastValues, Rejected, Rejection, Sample
from agent.core.intervals import AdaptiveBands
from agent.core.learning import DeviceLearning
from agent.core.model import Bundle, BundleError
from agent.core.window import NO_SLOT, WindowStore

if TYPE_CHECKING:
    from agent.config.settings import Settings  # the daemon runs on a Snapshot of it (agent/config/snapshot.py)

Event = Forecast | AlertEvent | Rejection

_COMMIT, _FORECAST, _REJECT = 0, 1, 2
SCALAR_LOOKUPS = 30  # commits x looked-up steps up to which past forecasts are looked up one by one (_past_forecasts_few)
QUIET_BATCH_MIN = 5  # fewer commits are scored one by one: observe_quiet's fixed cost (~100 us) is more than theirs
LEARNING_CALL = 64  # samples per call in process() while learning periods are on (replay, calibration)
SPARE_BATCHES = 2  # prepare, infer and finish overlap by at most one call each
_KEY_SPAN = 1 << 34  # (device, slot) -> one int64 key: device * span + slot (slots are < 2**34)


@dataclass
class Prepared:
    """One call after phase 1: its log, the forecasts it is due (device, slot, batch row, usable for scoring)
    and their windows."""

    log: list[tuple]
    call_forecasts: list[tuple[int, int, int, bool]]
    windows: np.ndarray | None  # (>= n_windows, L, F) in the model's input units (scaled by prepare); None after infer
    n_windows: int
    # Per batch row, the target offset and scale that turn the model's outputs back into the device's units
    # ((N, T) each), when devices have learned their own normal; None: the bundle's for every row.
    target_offset: np.ndarray | None = None
    target_scale: np.ndarray | None = None
    # (N, H, T) float32 per batch row, the window's scale in original units for normalized prediction intervals
    # (agent/core/intervals.py); None: the bundle has none (no cost then).
    interval_scale: np.ndarray | None = None


class Trace(Protocol):
    """Optional per-sample observer (replay uses it to write one output row per input row)."""

    def on_slot(self, i: int, d: int, expected: np.ndarray | None, alert_open: bool) -> None:
        """Sample i committed a slot of device d (already scored, if it could be); `expected` is its one-step forecast."""

    def on_forecast(self, i: int, d: int, forecast: np.ndarray) -> None:
        """A forecast (H, T) was made from device d's window right after sample i."""

    # Optional; False: the caller only reads the trace, so process() builds no Forecast events (replay, calibration).
    wants_forecast_events: bool = True


class Pipeline:
    def __init__(self, bundle: Bundle, settings: Settings):
        self.bundle = bundle
        self.settings = settings
        self.lookback, self.horizon = bundle.lookback, bundle.horizon
        self.period_s = bundle.period_s
        self.targets = bundle.targets
        self.target_index = bundle.target_index
        self.target_list = bundle.target_index.tolist()
        # A commit's target values (F,) -> (T,) tuple in one C call; itemgetter of a single index returns no tuple.
        first_target = self.target_list[0]
        self._target_values = operator.itemgetter(*self.target_list) if len(self.target_list) > 1 else lambda v: (v[first_target],)
        self.stride = settings.inference.stride
        self.max_batch = settings.inference.max_batch
        self.min_completeness = settings.window.min_completeness
        self.clean_periods = settings.window.clean_periods
        self.max_devices = settings.ingest.max_devices
        self.device_idle_s = settings.ingest.device_idle_s
        self._evictable_at = 0.0  # agent clock before which no device is idle enough to evict (a lower bound)
        self.windows = WindowStore(bundle.features, bundle.lookback, bundle.period_s, settings.window.max_gap_periods,
                                   on_commit=self._on_commit, max_lateness_periods=settings.window.max_lateness_periods)
        calibration = bundle.calibration
        try:
            scorer = ResidualScorer.from_calibration(calibration, bundle.target_scale)
            if scorer.state is not None and scorer.state.center.shape[0] != bundle.n_features:
                raise ValueError(f"the state model has {scorer.state.center.shape[0]} features, the bundle {bundle.n_features}")
            repeats = calibration.get("flatline_repeats")
            if repeats is not None and (len(repeats) != len(bundle.targets) or any(not isinstance(r, int) or r < 0 for r in repeats)):
                raise ValueError(f"flatline_repeats must be one non-negative integer per target, got {repeats!r}")
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            raise BundleError(f"manifest.calibration: {exc}") from None
        self._state_on = scorer.state is not None
        intervals = getattr(bundle, "intervals", None)
        self._interval_table = intervals if intervals is not None and intervals.normalized else None  # bands per window
        # Adaptive intervals: each device's band follows the coverage it has had (agent/core/intervals.py).
        self.adaptive_bands = (AdaptiveBands(intervals)
                               if intervals is not None and intervals.adaptive and settings.inference.adaptive_intervals else None)
        normal = calibration.get("normal") or {}
        detect = settings.detect
        self.learning = DeviceLearning(bundle.features, bundle.offset, bundle.scale, bundle.period_s, detect.learning_hours,
                                       max(detect.learning_min_samples, bundle.lookback), normal.get("mean"), normal.get("std"))
        self._learning_on = self.learning.enabled
        self._log_features = self._state_on or self._learning_on  # commits then log every feature, not only the targets
        self.detector = AlertDetector.from_settings(scorer, calibration, bundle.targets, settings.detect, salt=bundle.sha256[:16])
        # Past forecasts per device, for multi-step scoring (step 1 always, for the replay's `expected` column).
        # A device's forecasts are at least `spacing` = min(stride, lookback) slots apart. Which forecast was made
        # at which slot: `positions` = ceil(ring / spacing) + 1 tags, the one made at slot s at (s // spacing) %
        # positions, enough to keep apart any two needed at once. Their values are packed by step: the value of
        # step h is looked up h slots after the forecast and never again, so step h keeps only the forecasts of the
        # last h slots (`_set_ring`): 55 cells per target instead of 100 at stride 1, 20 instead of 30 at stride 8.
        self.lookup_steps = sorted({1, *scorer.steps})
        self._score_cols = np.array([self.lookup_steps.index(k) for k in scorer.steps])  # (S,)
        self._lookup_index = np.array(self.lookup_steps) - 1  # (S',) horizon index of each looked-up step
        self.ring = max(self.lookup_steps)
        self._spacing = max(1, min(self.stride, self.lookback))
        self._set_ring(min(self.ring, -(-self.ring // self._spacing) + 1))
        self._horizon_steps = np.arange(1, self.horizon + 1, dtype=np.float64) * self.period_s  # (H,)
        # Phase-1 log, batch and forecasts of the call being prepared (new ones per call: the previous call's may
        # still be in the model or finishing on another thread).
        self._log: list[tuple] = []
        self._batch = np.empty((1, bundle.lookback, bundle.n_features), dtype=np.float32)  # (N, L, F)
        self._n_batch = 0
        self._current = 0
        self._call_forecasts: list[tuple[int, int, int, bool]] = []  # (device, slot, batch row, usable for scoring)
        self._spare_batches: list[np.ndarray] = []  # batch arrays infer is done with, for the next calls
        self._state_lock = threading.Lock()  # phase 3 against the growth of the per-device arrays
        self.counters = {"samples": 0, "slots": 0, "late_samples": 0, "input_gaps": 0, "reordered": 0, "inferences": 0, "batches": 0,
                         "scored": 0, "alerts_opened": 0, "rejected_devices": 0, "devices_learned": 0, "devices_evicted": 0}

    # -- per-device arrays beside the window store --------------------------------------------------------------
    def _set_ring(self, positions: int, packed: bool = True) -> None:
        """Lay out the past forecasts: `positions` tags, and per looked-up step h the cells of its values.

        Step h's value of the forecast made at slot s is looked up at slot s + h only. Forecasts made between s and
        s + h are at least `spacing` apart, so (h + spacing - 2) // spacing + 1 cells, the forecast at s in cell
        (s // spacing) % cells, keep it until then (h cells at stride 1). `packed=False` gives every step
        `positions` cells, the unpacked ring the tests compare against. Starts the per-device arrays over."""
        spacing = self._spacing
        cells = [min(positions, (h + spacing - 2) // spacing + 1) if packed else positions for h in self.lookup_steps]
        self._positions = positions
        self._step_cells = np.array(cells, dtype=np.int64)  # (S',)
        self._step_base = np.cumsum([0, *cells[:-1]], dtype=np.int64)  # (S',) first cell of each step
        self._step_layout = list(zip(self.lookup_steps, self._step_base.tolist(), cells))  # the same, as ints
        self._n_cells = sum(cells)
        self._capacity = 0
        self._grow(self.windows.capacity)

    def _cells(self, made_at: np.ndarray) -> np.ndarray:
        """Cell of each looked-up step's value of forecasts made at slots (...,) -> (..., S')."""
        return self._step_base + (made_at[..., None] // self._spacing) % self._step_cells

    def _grow(self, capacity: int) -> None:
        T, R = self.bundle.n_targets, self._positions
        fresh = {
            "past": arrays.zeros((capacity, self._n_cells, T), np.float32),  # values by step: _set_ring
            "past_slot": arrays.full((capacity, R), NO_SLOT, np.int64),  # the slot each was made at
            "past_ok": arrays.zeros((capacity, R), bool),  # made from a window fit for scoring
            "last_seen": arrays.zeros(capacity, np.float64),  # agent clock of the device's last sample
        }
        used = min(len(self.windows), self._capacity)  # rows past it were never written: copying would only touch memory
        arrays.replace(self, fresh, used)
        self._capacity = capacity
        if self.adaptive_bands is not None:
            self.adaptive_bands.grow(capacity, used)
        self.detector.ensure_capacity(capacity, used)
        self.learning.ensure_capacity(capacity)

    def admits(self, name: str, now: float) -> bool:
        """Whether a sample of device `name` can find a row (read by the network thread before queueing, so that a
        rejected reading is counted once; the worker decides for good in `_device`)."""
        n = len(self.windows)
        if name in self.windows.index or n < self.max_devices:
            return True
        if self.device_idle_s <= 0 or now < self._evictable_at:
            return False
        oldest = float(self.last_seen[:n].min())  # read-only here; the worker writes it
        if oldest > now - self.device_idle_s:
            self._evictable_at = oldest + self.device_idle_s
            return False
        return True

    def _evict_for(self, name: str, now: float, i: int) -> int | None:
        """With the device table full: give the row of the device silent longest to `name`, if it has been silent
        for device_idle_s; its open alert ends (an `end` event in this call's log). None: nobody is idle enough."""
        if self.device_idle_s <= 0 or now < self._evictable_at:
            return None
        n = len(self.windows)
        victim = int(np.argmin(self.last_seen[:n]))
        if self.last_seen[victim] > now - self.device_idle_s:
            self._evictable_at = float(self.last_seen[victim]) + self.device_idle_s
            return None
        with self._state_lock:  # phase 3 of an earlier call may be running; it has no sample of an idle device
            ended = self._forget_scoring(victim, now)
            if ended is not None:
                self._log.append((_REJECT, i, ended))
            self.learning.reset(victim)
            self.windows.reassign(victim, name)
        self.counters["devices_evicted"] += 1
        return victim

    def _forget_scoring(self, d: int, now: float) -> AlertEvent | None:
        """Device row d's detector, past forecasts and adaptive bands start over (under the state lock); returns the
        `end` event of its open alert, if it had one."""
        alert = self.detector.open.get(d)
        ended = dataclasses.replace(alert.last_event, state="end", ts=now, ended_at=now) if alert is not None else None
        self.detector.reset(d)
        if self.adaptive_bands is not None:
            self.adaptive_bands.reset(d)
        self.past_slot[d] = NO_SLOT
        self.past_ok[d] = False
        return ended

    def restart_device(self, name: str, now: float, relearn: bool) -> list[AlertEvent]:
        """A device taken out of service or back into it: its window and detector start over and, with `relearn`, its
        learned normal too; returns the `end` event of its open alert, if any. Only between two batches (pipeline idle)."""
        d = self.windows.index.get(name)
        if d is None:
            return []
        ended = []
        with self._state_lock:
            end = self._forget_scoring(d, now)
            if end is not None:
                ended.append(end)
            self.windows.restart(d)
            if relearn:
                self.learning.reset(d)
        return ended

    def _device(self, name: str, now: float = 0.0, i: int = 0) -> int | None:
        d = self.windows.index.get(name)
        if d is None:
            if len(self.windows) >= self.max_devices:
                return self._evict_for(name, now, i)
            d = self.windows.device(name)
            if self.windows.capacity > self._capacity:
                with self._state_lock:
                    self._grow(self.windows.capacity)
        return d

    # -- phase 1 callback ---------------------------------------------------------------------------------------
    def _on_commit(self, d: int, slot: int, observed: bool, values) -> None:
        self._log.append((_COMMIT, self._current, d, slot, observed, self._target_values(values),
                          list(values) if self._log_features else None))
        windows = self.windows
        commits = windows.commits[d]
        if commits < self.lookback or (commits - self.lookback) % self.stride:
            return
        n = self._n_batch
        if n == self._batch.shape[0]:
            bigger = np.empty((2 * n,) + self._batch.shape[1:], dtype=np.float32)
            bigger[:n] = self._batch
            self._batch = bigger
        windows.copy_window(d, self._batch[n])
        self._n_batch = n + 1
        completeness = windows.completeness(d)
        # Usable for scoring: a mostly observed window whose newest `clean_periods` slots are all observed (a
        # window that ends in carried-forward values forecasts from a stale state).
        imputed = windows.last_imputed[d]
        clean = imputed is None or slot - imputed >= self.clean_periods
        # A forecast made while its device is still learning its normal used the training machines' scaling: never scored.
        learned = not self._learning_on or not self.learning.learning[d]
        self._call_forecasts.append((d, slot, n, completeness >= self.min_completeness and clean and learned))
        self._log.append((_FORECAST, self._current, d, slot, n, completeness))

    # -- the entry point ------------------------------------------------------------------------------------------
    def process(self, samples: list[Sample], now: float, trace: Trace | None = None) -> list[Event]:
        """Samples in arrival order -> events in the same order (per sample: rejection | score alerts, forecast)."""
        if self.learning.enabled and len(samples) > LEARNING_CALL:
            # Devices that finish learning switch to their own scaling from the next call on: short calls keep the
            # stretch scored with neither (the rest of the call in which a device finished) short.
            events: list[Event] = []
            for start in range(0, len(samples), LEARNING_CALL):
                prepared = self.prepare(samples[start : start + LEARNING_CALL], first_index=start)
                events += self.finish(prepared, self.infer(prepared), now, trace)
            return events
        prepared = self.prepare(samples)
        return self.finish(prepared, self.infer(prepared), now, trace)

    def prepare(self, samples: list[Sample], first_index: int = 0) -> Prepared:
        """Phase 1: the samples into the windows; the windows due for a forecast copied into a batch of their own.

        The daemon runs the phases on three threads, one call each at a time, in call order: prepare (worker),
        infer (model thread), finish (publisher). Each call gets a batch array of its own, so the next call's
        windows are copied while the model still reads this one's; infer hands it back for a later call."""
        log = self._log = []
        self._call_forecasts = []
        self._n_batch = 0
        self._batch = self._batch_for(max(1, min(len(samples), 4096)))  # (N, L, F)
        windows = self.windows
        reordered = windows.reordered
        for i, sample in enumerate(samples):
            if sample.values is None:  # a gap the input knows of: the device's window starts over
                known = windows.index.get(sample.device)
                if known is not None:
                    windows.restart(known)
                    self.counters["input_gaps"] += 1
                continue
            d = self._device(sample.device, sample.received_at, first_index + i)
            if d is None:
                self.counters["rejected_devices"] += 1
                log.append((_REJECT, first_index + i, Rejection("device_limit", self.device_limit_detail(), sample.device)))
                continue
            self.last_seen[d] = sample.received_at  # not a local: _device may have grown the array
            self._current = first_index + i
            try:
                windows.update(d, sample.ts, sample.values)
            except Rejected as exc:
                self.counters["late_samples"] += 1
                log.append((_REJECT, first_index + i, Rejection(exc.reason, exc.detail, exc.device)))
        self.counters["samples"] += len(samples)
        self.counters["reordered"] += windows.reordered - reordered
        target_offset = target_scale = None
        if self._n_batch and self.learning.enabled:
            # Each row scaled by its device's own normal once it has learned one (agent/core/learning.py).
            rows = np.fromiter((c[0] for c in self._call_forecasts), dtype=np.int64, count=self._n_batch)  # (N,) devices
            offset, scale = self.learning.device_offset[rows], self.learning.device_scale[rows]  # (N, F) each
            batch = self._batch[: self._n_batch]
            batch[...] = (batch - offset[:, None, :]) / scale[:, None, :]  # (N, L, F)
            target_offset, target_scale = offset[:, self.target_index], scale[:, self.target_index]  # (N, T) each
        elif self._n_batch:
            self.bundle.scale_inputs(self._batch[: self._n_batch])  # here, so that the model thread only runs the model
        interval_scale = None
        if self._interval_table is not None and self._n_batch:
            # Normalized intervals: each window's scale, from the model's inputs (the window's last rows, targets).
            table = self._interval_table
            x = self._batch[: self._n_batch, self.lookback - table.scale.window :, self.target_index]  # (N, W, T)
            interval_scale = table.physical_scale(x, self.bundle.target_scale if target_scale is None else target_scale)  # (N, H, T)
        return Prepared(log, self._call_forecasts, self._batch, self._n_batch, target_offset, target_scale, interval_scale)

    def _batch_for(self, rows: int) -> np.ndarray:
        """A batch array of at least `rows` windows: one that infer handed back, or a new one. A new array per call
        (~1 MiB at 1,024 windows) was mapped and faulted in page by page every time."""
        spares = self._spare_batches  # only this thread takes from it; infer appends (both atomic list operations)
        while spares:
            batch = spares.pop()
            if batch.shape[0] >= rows:
                return batch
        return np.empty((rows, self.lookback, self.bundle.n_features), dtype=np.float32)  # (N, L, F)

    def _hand_back(self, prepared: Prepared) -> None:
        if prepared.windows is not None and len(self._spare_batches) < SPARE_BATCHES:
            self._spare_batches.append(prepared.windows)
        prepared.windows = None  # from now on another call's

    def infer(self, prepared: Prepared) -> np.ndarray | None:
        """Phase 2: the model on the call's windows, `inference.max_batch` at a time -> (N, H, T) in original
        units, or None. Nothing but the model calls between them: each numpy operation here would let go of the
        GIL and wait to get it back from the other threads."""
        n = prepared.n_windows
        if n == 0:
            self._hand_back(prepared)
            return None
        bundle = self.bundle
        chunks = []
        for start in range(0, n, self.max_batch):
            began = time.perf_counter()
            chunks.append(bundle.run_scaled(prepared.windows[start : min(n, start + self.max_batch)]))  # (n_i, H, T)
            if bundle.observer is not None:
                bundle.observer(len(chunks[-1]), time.perf_counter() - began)
        scaled = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)  # (N, H, T) the model's units
        if prepared.target_scale is None:
            out = bundle.unscale_outputs(scaled)
        else:
            out = (scaled * prepared.target_scale[:, None, :] + prepared.target_offset[:, None, :]).astype(np.float32)
        self._hand_back(prepared)
        self.counters["batches"] += len(chunks)
        self.counters["inferences"] += n
        return out

    def finish(self, prepared: Prepared, forecasts: np.ndarray | None, now: float, trace: Trace | None = None) -> list[Event]:
        """Phase 3: scores, alert state, events (in the order of the call's samples)."""
        with self._state_lock:
            return self._emit(prepared.log, prepared.call_forecasts, forecasts, now, trace, prepared.interval_scale)

    def _past_forecasts(self, log: list[tuple], call_forecasts: list[tuple], forecasts: np.ndarray | None):
        """For every commit of the call: the forecasts made 1..k periods earlier for its slot.

        Returns (observed (K, T), looked-up forecasts (K, S', T) NaN where none, usable (K, S') bool, devices (K,),
        observed slot (K,) bool, every feature in the model's scaled units (K, F) or None without a state model),
        or None.
        Forecasts of this call come from `forecasts` (matched by (device, slot) with a sorted key search), older
        ones from the per-device ring.
        """
        commits = [entry for entry in log if entry[0] == _COMMIT]
        if not commits:
            return None
        K, S, T = len(commits), len(self.lookup_steps), self.bundle.n_targets
        _, _, device_column, slot_column, observed_flags, observed_column, feature_column = zip(*commits)  # log columns, transposed in C
        devices = np.array(device_column, dtype=np.int64)
        slots = np.array(slot_column, dtype=np.int64)
        observed = np.array(observed_column, dtype=np.float64)  # (K, T)
        features = np.array(feature_column, dtype=np.float64) if self._log_features else None  # (K, F) original units
        if K * S <= SCALAR_LOOKUPS:
            expected, usable = self._past_forecasts_few(device_column, slot_column, call_forecasts, forecasts)
            return observed, expected, usable, devices, np.array(observed_flags, dtype=bool), slots, features
        steps = np.array(self.lookup_steps, dtype=np.int64)  # (S',)
        want = slots[:, None] - steps  # (K, S') slot each forecast was made at
        # Older forecasts: the ring.
        pos = (want // self._spacing) % self._positions
        dev = np.broadcast_to(devices[:, None], want.shape)
        found = self.past_slot[dev, pos] == want  # (K, S')
        usable = found & self.past_ok[dev, pos]
        expected = np.full((K, S, T), np.nan, dtype=np.float64)
        cols = np.broadcast_to(np.arange(S), want.shape)
        cells = self._step_base + (want // self._spacing) % self._step_cells  # (K, S')
        expected[found] = self.past[dev[found], cells[found]]
        # Forecasts made earlier in this call (they shadow nothing: slots only grow per device).
        if call_forecasts:
            call = np.array(call_forecasts, dtype=np.int64)  # (N, 4)
            keys = call[:, 0] * _KEY_SPAN + call[:, 1]
            order = np.argsort(keys, kind="stable")
            keys = keys[order]
            wanted = dev * _KEY_SPAN + want  # (K, S')
            at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
            hit = keys[at] == wanted
            rows = call[order[at], 2]
            expected[hit] = forecasts[rows[hit], self._lookup_index[cols[hit]]]
            usable = np.where(hit, call[order[at], 3].astype(bool), usable)
        return observed, expected, usable, devices, np.array(observed_flags, dtype=bool), slots, features

    def _past_forecasts_few(self, device_column, slot_column, call_forecasts, forecasts):
        """`_past_forecasts`' (expected (K, S', T), usable (K, S')) for a few commits, one lookup at a time: the same
        values, without the ~25 array operations whose fixed cost is most of a small call's."""
        K, S, T = len(device_column), len(self.lookup_steps), self.bundle.n_targets
        expected = np.full((K, S, T), np.nan, dtype=np.float64)
        usable = np.zeros((K, S), dtype=bool)
        made_here = {(c[0], c[1]): (c[2], c[3]) for c in call_forecasts}  # (device, slot) -> (batch row, usable)
        spacing, positions, lookup_index = self._spacing, self._positions, self._lookup_index
        for k, (d, slot) in enumerate(zip(device_column, slot_column)):
            past_slot, past_ok, past = self.past_slot[d], self.past_ok[d], self.past[d]  # this device's ring (views)
            for s, (step, base, cells) in enumerate(self._step_layout):
                want = slot - step
                here = made_here.get((d, want))
                if here is not None:  # made earlier in this call
                    expected[k, s] = forecasts[here[0], lookup_index[s]]
                    usable[k, s] = here[1]
                    continue
                pos = (want // spacing) % positions
                if past_slot[pos] == want:
                    expected[k, s] = past[base + (want // spacing) % cells]
                    usable[k, s] = past_ok[pos]
        return expected, usable

    def _emit(self, log: list[tuple], call_forecasts: list[tuple], forecasts: np.ndarray | None, now: float,
              trace: Trace | None, interval_scale: np.ndarray | None = None) -> list[Event]:
        events: list[Event] = []
        names = self.windows.names
        detector = self.detector
        scorer = detector.scorer
        period = self.period_s
        looked_up = self._past_forecasts(log, call_forecasts, forecasts)
        if looked_up is not None:
            observed_rows, expected_all, usable, devices, observed_slot, slots, features = looked_up
            learning = self.learning
            offset, scale = ((learning.device_offset[devices], learning.device_scale[devices]) if learning.enabled
                             else (learning.offset, learning.scale))  # (K, F) or (F,)
            scaled_rows = (features - offset) / scale if self._state_on else None  # (K, F)
            score_expected = expected_all[:, self._score_cols]  # (K, S, T)
            score_usable = usable[:, self._score_cols]  # (K, S)
            target_scale = scale[..., self.target_index] if learning.enabled else None  # (K, T)
            z_rows = scorer.z_steps(observed_rows, np.where(score_usable[:, :, None], score_expected, np.nan), target_scale)  # (K, S, T)
            scorable_rows = score_usable.any(axis=1)  # (K,)
            if learning.enabled:
                # A device that is still learning its normal raises nothing; its observed samples are what it learns.
                learning_rows = observed_slot & learning.learning[devices]
                if learning_rows.any():
                    rows = np.flatnonzero(learning_rows)
                    taken, finished = learning.observe(devices[rows], slots[rows], features[rows])
                    self.counters["devices_learned"] += len(finished)
                    scorable_rows[rows[taken]] = False
            scorable = scorable_rows.tolist()
            weighted_sq, missing = scorer.prepare(z_rows, scaled_rows)  # (K, C), (K,)
            missing = missing.tolist()
            # Samples of devices that stay quiet are scored all at once, the rest one by one below (a trace reads
            # the detector's state after each sample, so with one they all go one by one).
            handled = np.zeros(len(devices), dtype=bool)
            if trace is None and len(devices) >= QUIET_BATCH_MIN:
                to_score = np.flatnonzero(scorable_rows & observed_slot)
                handled[to_score] = detector.observe_quiet(devices[to_score], weighted_sq[to_score], observed_rows[to_score])
            handled = handled.tolist()
            one_step = expected_all[:, 0]  # (K, T) lookup step 1
            has_one_step = ~np.isnan(one_step[:, 0])
        build_forecasts = trace is None or getattr(trace, "wants_forecast_events", True)
        # Each Forecast reads its values from this array (no per-value Python floats); float64, as the events'
        # lists of floats always were.
        by_target = forecasts.transpose(0, 2, 1).astype(np.float64) if forecasts is not None and build_forecasts else None  # (N, T, H)
        targets = tuple(self.targets)
        steps = self._horizon_steps.tolist()
        horizons: dict[float, list[float]] = {}  # one list per slot, shared by the call's forecasts made at it
        # Normalized intervals: a trace that wants each forecast's window scale (replay) is told it.
        on_scale = getattr(trace, "on_interval_scale", None) if interval_scale is not None else None
        adaptive = self.adaptive_bands
        on_multiplier = getattr(trace, "on_interval_multiplier", None) if adaptive is not None else None
        k = 0  # next commit row
        scored = 0
        for entry in log:
            kind = entry[0]
            if kind == _COMMIT:
                _, i, d, slot, observed, values, _features = entry
                if observed and adaptive is not None:
                    adaptive.observe(d, slot, values)
                if observed and scorable[k]:
                    scored += 1
                    if not handled[k]:
                        _, event = detector.observe(d, names[d], slot * period, observed_rows[k], score_expected[k], z_rows[k],
                                                    (weighted_sq[k], missing[k]))
                        if event is not None:
                            if event.state == "new":
                                self.counters["alerts_opened"] += 1
                            events.append(event)
                if trace is not None:
                    trace.on_slot(i, d, one_step[k] if has_one_step[k] else None, d in detector.open)
                k += 1
            elif kind == _FORECAST:
                _, i, d, slot, n, completeness = entry
                multiplier = (adaptive.issue(d, slot, forecasts[n], None if interval_scale is None else interval_scale[n])
                              if adaptive is not None else None)
                if build_forecasts:
                    ts = slot * period
                    horizon = horizons.get(ts)
                    if horizon is None:
                        horizon = horizons[ts] = [ts + step for step in steps]
                    events.append(
                        Forecast(
                            device=names[d],
                            ts=ts,
                            period_s=period,
                            horizon_ts=horizon,
                            values=ForecastValues(targets, by_target, n),
                            completeness=completeness,
                            staleness_s=now - ts,
                        )
                    )
                    if interval_scale is not None:  # normalized intervals: the window's scale (H, T)
                        events[-1].interval_scale = interval_scale[n]
                    if multiplier is not None:  # adaptive intervals: this device's multiplier (K, H, T)
                        events[-1].interval_multiplier = multiplier
                if trace is not None:
                    trace.on_forecast(i, d, forecasts[n])
                    if on_scale is not None:
                        on_scale(i, d, interval_scale[n])
                    if on_multiplier is not None:
                        on_multiplier(i, d, multiplier)
            else:
                events.append(entry[2])
        if call_forecasts:
            self._remember(call_forecasts, forecasts)
        self.counters["slots"] += k
        self.counters["scored"] += scored
        return events

    def _remember(self, call_forecasts: list[tuple], forecasts: np.ndarray) -> None:
        """Keep the forecasts of this call that later calls may look up (made in each device's last `ring` slots)."""
        once_each = len({entry[0] for entry in call_forecasts}) == len(call_forecasts)
        if len(call_forecasts) <= 4 and once_each:
            for d, slot, row, ok in call_forecasts:  # a few devices, once each: one by one (same values)
                made = slot // self._spacing
                self.past[d, [base + made % cells for _, base, cells in self._step_layout]] = forecasts[row][self._lookup_index]  # (S', T)
                pos = made % self._positions
                self.past_slot[d, pos] = slot
                self.past_ok[d, pos] = ok
            return
        call = np.array(call_forecasts, dtype=np.int64)  # (N, 4)
        devices = call[:, 0:1]  # (N, 1)
        cells = self._cells(call[:, 1])  # (N, S')
        values = forecasts[call[:, 2]][:, self._lookup_index]  # (N, S', T)
        if once_each:
            self.past[devices, cells] = values
        else:  # a device forecast more than once: each cell takes the newest of its forecasts, as call by call
            keys = (devices * self._n_cells + cells).ravel()  # (N * S',) in call order
            newest_first = np.unique(keys[::-1], return_index=True)[1]
            last = len(keys) - 1 - newest_first  # each key's last occurrence
            self.past[np.broadcast_to(devices, cells.shape).ravel()[last], cells.ravel()[last]] = values.reshape(-1, values.shape[-1])[last]
            newest = np.full(self._capacity, NO_SLOT, dtype=np.int64)
            np.maximum.at(newest, call[:, 0], call[:, 1])
            call = call[call[:, 1] > newest[call[:, 0]] - self.ring]  # tags: at most one per position and device
        pos = (call[:, 1] // self._spacing) % self._positions
        self.past_slot[call[:, 0], pos] = call[:, 1]
        self.past_ok[call[:, 0], pos] = call[:, 3].astype(bool)

    def open_alerts_state(self) -> dict:
        """Every open alert with the detector state that decides its end, for a restart (JSON-ready)."""
        with self._state_lock:
            alerts = {self.windows.names[d]: self.detector.open_state(d) for d in list(self.detector.open)}
            state = {"model_sha256": self.bundle.sha256, "alerts": alerts}
            if self.adaptive_bands is not None:  # each device's adaptive band, so that a restart does not reset it
                state["interval_log_multipliers"] = self.adaptive_bands.to_dict(self.windows.names)
        return state

    def restore_open_alerts(self, data: dict, now: float) -> tuple[list[AlertEvent], list[AlertEvent]]:
        """Take what `open_alerts_state` saved before a restart: (alerts resumed, as their last event; `end` events
        of alerts that cannot resume because the model changed, to publish)."""
        resumed, ended = [], []
        same_model = data.get("model_sha256") == self.bundle.sha256
        for name, state in (data.get("alerts") or {}).items():
            try:
                if same_model:
                    d = self._device(name, now)
                    if d is not None:
                        resumed.append(self.detector.restore_open(d, state))
                        continue
                event = dict(state["event"])
                event["features"] = [FeatureDeviation(**f) for f in event.get("features") or []]
                ended.append(dataclasses.replace(AlertEvent(**event), state="end", ts=now, ended_at=now))
            except (KeyError, TypeError, ValueError):
                continue
        if same_model and self.adaptive_bands is not None:
            self.adaptive_bands.load(data.get("interval_log_multipliers") or {}, lambda name: self._device(name, now))
        return resumed, ended

    def device_limit_detail(self) -> str:
        idle = f"none silent for ingest.device_idle_s={self.device_idle_s:g} s" if self.device_idle_s > 0 else "eviction off (ingest.device_idle_s=0)"
        return f"device table full (ingest.max_devices={self.max_devices}), {idle}"

    # -- learned normal per device (agent/core/learning.py) ----------------------------------------------------------
    def learned(self) -> dict:
        """What the devices learned and are learning (JSON-ready), read consistently with phase 3."""
        with self._state_lock:
            return self.learning.to_dict(self.windows.names)

    def load_learned(self, data: dict) -> int:
        """Take a `learned()` dict (a previous run's or the old pipeline's); returns the devices restored."""
        return self.learning.load(data, self._device)

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
        own = self.past.nbytes + self.past_slot.nbytes + self.past_ok.nbytes
        if self.adaptive_bands is not None:
            own += self.adaptive_bands.nbytes()
        return self.windows.nbytes() + own + self.detector.state_bytes()
