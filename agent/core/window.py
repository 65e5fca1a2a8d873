"""Per-device rolling windows on the model's sampling grid (slot = round(ts / period)).

All devices share a few preallocated numpy arrays (grown by doubling when devices are added), so the hot
path writes into existing memory. For each device the store keeps:
- a ring of the last `lookback` committed slots, values and an observed flag per slot (`copy_window` writes
  it oldest first into the inference batch);
- one pending slot that collects per-sensor values until it is complete or a later slot starts.

Rules (docs/contracts.md): values of the same slot merge; a slot is committed when every feature is present,
or, incomplete, when a later slot starts (missing features carried forward, slot counted as imputed); a gap of
up to `max_gap_periods` missing slots is filled forward (imputed); a longer gap restarts the window.

Late and out-of-order samples (docs/contracts.md, "Gaps, late and out-of-order data"): a sample for a slot at
most `max_lateness_periods` older than the device's newest slot, and still inside the window, is put in its
place: it replaces the carried-forward values of an imputed slot (which then counts as observed when the
sample has every feature) or corrects an observed one; forecasts and scores already made are not revised.
A sample for a slot between the newest committed slot and a pending one is committed before the pending one.
Anything older is refused as `late_sample` (the pipeline reports it on the errors topic).
"""

from __future__ import annotations

import math
import sys
from typing import Callable

import numpy as np

from agent.core import arrays
from agent.core.events import Rejected

NO_SLOT = np.iinfo(np.int64).min

# on_commit(device_index, slot, observed, values): the device's window now ends at `slot`; `observed` is False
# when the slot was completed by carrying values forward; `values` are the slot's F values (a list or array
# that the callee must not keep). Called before the next write to that device's ring.
CommitCallback = Callable[[int, int, bool, object], None]


def slot_of(ts: float, period_s: float) -> int:
    """Index of the sampling slot nearest to `ts` (halves round up, the same for every caller)."""
    return math.floor(ts / period_s + 0.5)


class WindowStore:
    def __init__(
        self,
        features: list[str],
        lookback: int,
        period_s: float,
        max_gap_periods: int,
        on_commit: CommitCallback | None = None,
        capacity: int = 64,
        max_lateness_periods: int = 0,
    ):
        self.features = list(features)
        self.feature_index = {name: j for j, name in enumerate(self.features)}
        self.n_features = len(self.features)
        self.lookback = lookback
        self.period_s = float(period_s)
        self.max_gap = max_gap_periods
        self.max_lateness = max_lateness_periods
        self.reordered = 0  # late samples put in place
        self.on_commit = on_commit
        self.index: dict[str, int] = {}
        self.names: list[str] = []
        # Per-device scalars as Python lists: cheaper to touch per message than numpy scalars.
        self.head: list[int] = []  # next ring position to write, 0..L-1
        self.count: list[int] = []  # committed slots in the window, <= L
        self.n_observed: list[int] = []  # observed slots among them
        self.last_slot: list[int | None] = []  # newest committed slot
        self.pend_slot: list[int | None] = []  # slot collecting per-sensor values, None when nothing pends
        self.commits: list[int] = []  # slots committed since the window (re)started
        self.last_imputed: list[int | None] = []  # newest slot that was filled forward (None: none since restart)
        self._scratch = np.empty(self.n_features, dtype=np.float32)
        self.capacity = 0
        self._allocate(max(1, capacity))

    # -- storage ---------------------------------------------------------------------------------------------
    def _allocate(self, capacity: int) -> None:
        L, F = self.lookback, self.n_features
        fresh = {
            "ring": arrays.zeros((capacity, L, F), np.float32),  # (D, L, F) committed slots, newest at head - 1
            "observed": arrays.zeros((capacity, L), bool),  # (D, L) slot fully observed, not imputed
            "pend_vals": arrays.zeros((capacity, F), np.float32),  # (D, F)
            "pend_mask": arrays.zeros((capacity, F), bool),  # (D, F) features seen in the pending slot
        }
        arrays.replace(self, fresh, len(self.names))
        self.capacity = capacity

    def device(self, name: str) -> int:
        """Index of a device, created on first use."""
        d = self.index.get(name)
        if d is None:
            d = len(self.names)
            if d == self.capacity:
                self._allocate(self.capacity + max(64, self.capacity // 2))  # x1.5: less unused room at 10,000s of devices
            self.index[name] = d
            self.names.append(name)
            for column, initial in ((self.head, 0), (self.count, 0), (self.n_observed, 0), (self.last_slot, None), (self.pend_slot, None), (self.commits, 0), (self.last_imputed, None)):
                column.append(initial)
        return d

    def __len__(self) -> int:
        return len(self.names)

    def nbytes(self) -> int:
        """Approximate memory of the per-device state (arrays, scalar lists, names)."""
        arrays = self.ring.nbytes + self.observed.nbytes + self.pend_vals.nbytes + self.pend_mask.nbytes
        lists = 7 * 8 * len(self.names) + sum(sys.getsizeof(x) for x in self.last_slot[:1]) * len(self.names)
        names = sum(sys.getsizeof(n) for n in self.names) + 100 * len(self.names)  # + the index dict
        return arrays + lists + names

    # -- reading ---------------------------------------------------------------------------------------------
    def is_full(self, d: int) -> bool:
        return self.count[d] == self.lookback

    def completeness(self, d: int) -> float:
        """Observed share of the lookback window (imputed and not yet filled slots count as missing)."""
        return self.n_observed[d] / self.lookback

    def copy_window(self, d: int, out: np.ndarray) -> None:
        """Write the device's last `lookback` committed slots into `out` (L, F), oldest first."""
        head = self.head[d]
        tail = self.lookback - head
        out[:tail] = self.ring[d, head:]
        out[tail:] = self.ring[d, :head]

    def window(self, d: int) -> np.ndarray:
        """A copy of the device's last `lookback` committed slots, oldest first: (L, F)."""
        head = self.head[d]
        return np.concatenate([self.ring[d, head:], self.ring[d, :head]])

    def last_values(self, d: int) -> np.ndarray:
        """View of the newest committed slot (F,)."""
        return self.ring[d, self.head[d] - 1]

    # -- writing ---------------------------------------------------------------------------------------------
    def update(self, d: int, ts: float, values: dict[str, float]) -> None:
        """Merge one sample into device d's window; raises Rejected('late_sample') for an older slot."""
        slot = math.floor(ts / self.period_s + 0.5)
        pend_slot = self.pend_slot[d]
        last_slot = self.last_slot[d]
        if pend_slot is None and (last_slot is None or slot > last_slot) and len(values) == self.n_features:
            # The common case (telemetry form): a complete sample of a new slot.
            self._commit(d, slot, [values[name] for name in self.features], True)
            return
        if pend_slot is not None:
            if slot == pend_slot:
                self._merge_pending(d, values)
                return
            if slot > pend_slot:
                self._commit_pending(d)  # a later slot starts: the pending one is finalized as is
                last_slot = self.last_slot[d]
            elif last_slot is None or slot > last_slot:
                if pend_slot - slot > self.max_lateness:
                    raise Rejected("late_sample", f"slot {slot} is {pend_slot - slot} period(s) older than the pending slot {pend_slot} (tolerance {self.max_lateness})", self.names[d])
                self._commit_between(d, slot, values)
                return
        if last_slot is not None and slot <= last_slot:
            back = last_slot - slot
            if back == 0:
                self._merge_committed(d, values)  # duplicate or correction of the newest slot
                return
            if back <= self.max_lateness and back < self.count[d]:
                self._put_in_place(d, back, values)
                return
            raise Rejected(
                "late_sample",
                f"ts {ts:.0f} (slot {slot}) is {back} period(s) older than the device's newest slot "
                f"(tolerance {min(self.max_lateness, max(self.count[d] - 1, 0))})",
                self.names[d],
            )
        self.pend_slot[d] = slot
        self.pend_mask[d] = False
        self._merge_pending(d, values)

    def _merge_pending(self, d: int, values: dict[str, float]) -> None:
        vals, mask, index = self.pend_vals[d], self.pend_mask[d], self.feature_index
        for name, value in values.items():
            j = index[name]
            vals[j] = value
            mask[j] = True
        if mask.all():
            self._commit_pending(d)

    def _put_in_place(self, d: int, back: int, values: dict[str, float]) -> None:
        """A late sample `back` slots before the newest replaces that slot's values in the window."""
        L = self.lookback
        p = (self.head[d] - 1 - back) % L
        for name, value in values.items():
            j = self.feature_index[name]
            self.ring[d, p, j] = value
        if len(values) == self.n_features and not self.observed[d, p]:
            self.observed[d, p] = True
            self.n_observed[d] += 1
        self.reordered += 1

    def _commit_between(self, d: int, slot: int, values: dict[str, float]) -> None:
        """Commit a slot older than the pending one (and newer than the last committed one) first."""
        mask = np.zeros(self.n_features, dtype=bool)
        vals = np.zeros(self.n_features, dtype=np.float32)
        for name, value in values.items():
            j = self.feature_index[name]
            vals[j], mask[j] = value, True
        self._commit(d, slot, vals, bool(mask.all()), mask)
        self.reordered += 1

    def _merge_committed(self, d: int, values: dict[str, float]) -> None:
        p = (self.head[d] - 1) % self.lookback
        for name, value in values.items():
            j = self.feature_index[name]
            self.ring[d, p, j] = value

    def _commit_pending(self, d: int) -> None:
        slot = self.pend_slot[d]
        self.pend_slot[d] = None
        mask = self.pend_mask[d]
        self._commit(d, slot, self.pend_vals[d], bool(mask.all()), mask)

    def _commit(self, d: int, slot: int, values, complete: bool, mask: np.ndarray | None = None) -> None:
        last_slot = self.last_slot[d]
        if self.count[d] and slot - last_slot - 1 > self.max_gap:
            self.restart(d)
        if self.count[d]:
            gap = slot - last_slot - 1
            if gap > 0 or not complete:
                previous = self._scratch
                previous[:] = self.last_values(d)
                if not complete:
                    np.copyto(values, previous, where=~mask)  # carry the last values forward
                for _ in range(min(gap, self.lookback)):
                    self._append(d, previous, False)
                self.last_imputed[d] = slot if not complete else slot - 1
        elif not complete:
            return  # nothing to carry forward from: the incomplete first slot of a window is dropped
        self._append(d, values, complete)
        self.last_slot[d] = slot
        if self.on_commit is not None:
            self.on_commit(d, slot, complete, values)

    def _append(self, d: int, values, observed: bool) -> None:
        L = self.lookback
        p = self.head[d]
        if self.count[d] == L:
            if self.observed[d, p]:
                self.n_observed[d] -= 1  # the oldest slot leaves the window
        else:
            self.count[d] += 1
        self.ring[d, p] = values
        self.observed[d, p] = observed
        if observed:
            self.n_observed[d] += 1
        self.head[d] = p + 1 if p + 1 < L else 0
        self.commits[d] += 1

    def reassign(self, d: int, name: str) -> None:
        """Row d (an evicted device's) now holds the new device `name`, starting from nothing."""
        del self.index[self.names[d]]
        self.index[name] = d
        self.names[d] = name
        self.restart(d)
        self.pend_slot[d] = None
        self.pend_mask[d] = False
        self.observed[d] = False

    def restart(self, d: int) -> None:
        """Forget device d's window (after a long gap); a pending slot is kept."""
        self.count[d] = 0
        self.n_observed[d] = 0
        self.head[d] = 0
        self.commits[d] = 0
        self.last_slot[d] = None
        self.last_imputed[d] = None
