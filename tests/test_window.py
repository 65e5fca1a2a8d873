"""Window store: sampling grid, per-sensor merge, imputation, gaps, late samples, ring buffer wrap-around."""

from __future__ import annotations

import numpy as np
import pytest

from agent.core.events import Rejected
from agent.core.window import WindowStore, slot_of

P = 60.0
FEATURES = ["a", "b"]
T0 = 1_763_737_200.0  # a multiple of 60


class Recorder:
    """Collects on_commit calls as (slot, observed, values)."""

    def __init__(self):
        self.commits: list[tuple[int, bool, list[float]]] = []

    def __call__(self, d, slot, observed, values):
        self.commits.append((slot - slot_of(T0, P), observed, [float(v) for v in values]))


def make_store(lookback: int = 4, max_gap: int = 3) -> tuple[WindowStore, Recorder, int]:
    recorder = Recorder()
    store = WindowStore(FEATURES, lookback, P, max_gap, on_commit=recorder)
    return store, recorder, store.device("dev")


def full(store: WindowStore, d: int, k: int, a: float, b: float | None = None) -> None:
    store.update(d, T0 + k * P, {"a": a, "b": a if b is None else b})


def test_slot_is_the_nearest_grid_point():
    """slot = round(ts / period): a sample 29 s after a grid point belongs to it, 31 s after to the next."""
    assert slot_of(T0 + 29, P) == slot_of(T0, P)
    assert slot_of(T0 + 31, P) == slot_of(T0, P) + 1
    assert slot_of(T0 - 29, P) == slot_of(T0, P)


def test_per_sensor_values_of_one_slot_merge_into_one_observed_slot():
    """Values of the same slot merge; the slot is committed (observed) once every feature is present."""
    store, rec, d = make_store()
    store.update(d, T0 + 2, {"a": 1.0})
    assert rec.commits == []
    store.update(d, T0 - 5, {"b": 2.0})
    assert rec.commits == [(0, True, [1.0, 2.0])]
    assert store.last_values(d).tolist() == [1.0, 2.0]


def test_incomplete_slot_is_finalized_with_carried_values_when_a_later_slot_starts():
    """A pending slot missing a feature is committed as imputed, the missing value carried forward."""
    store, rec, d = make_store()
    full(store, d, 0, 1.0, 10.0)
    store.update(d, T0 + P, {"a": 2.0})  # b never arrives for slot 1
    store.update(d, T0 + 2 * P, {"a": 3.0})
    assert rec.commits[1] == (1, False, [2.0, 10.0])
    store.update(d, T0 + 2 * P, {"b": 30.0})
    assert rec.commits[2] == (2, True, [3.0, 30.0])


def test_incomplete_first_slot_without_history_is_dropped():
    """With nothing to carry forward from, an incomplete first slot is not committed."""
    store, rec, d = make_store()
    store.update(d, T0, {"a": 1.0})
    full(store, d, 1, 2.0)
    assert rec.commits == [(1, True, [2.0, 2.0])]
    assert store.count[d] == 1


def test_short_gap_is_filled_forward_and_lowers_completeness():
    """A gap of <= max_gap_periods slots is filled with the last values and counts as imputed."""
    store, rec, d = make_store(lookback=6, max_gap=3)
    full(store, d, 0, 1.0)
    full(store, d, 1, 2.0)
    full(store, d, 5, 5.0)  # slots 2, 3, 4 missing: a gap of 3
    assert store.is_full(d)
    assert store.window(d)[:, 0].tolist() == [1.0, 2.0, 2.0, 2.0, 2.0, 5.0]
    assert store.observed[d].sum() == 3
    assert store.completeness(d) == pytest.approx(3 / 6)


def test_long_gap_restarts_the_window():
    """A gap longer than max_gap_periods forgets the old window; the new one starts with the new slot."""
    store, rec, d = make_store(lookback=4, max_gap=3)
    for k in range(4):
        full(store, d, k, float(k))
    assert store.is_full(d)
    full(store, d, 8, 8.0)  # slots 4..7 missing: a gap of 4 > 3
    assert store.count[d] == 1
    assert not store.is_full(d)
    assert store.last_values(d).tolist() == [8.0, 8.0]
    assert store.completeness(d) == pytest.approx(1 / 4)


def test_older_slot_is_a_late_sample_and_changes_nothing():
    """A sample for a slot older than the newest is refused as late_sample; the window is unchanged."""
    store, rec, d = make_store()
    full(store, d, 0, 1.0)
    full(store, d, 1, 2.0)
    before = store.window(d).copy()
    with pytest.raises(Rejected) as caught:
        full(store, d, 0, 9.0)
    assert caught.value.reason == "late_sample"
    assert caught.value.device == "dev"
    np.testing.assert_array_equal(store.window(d), before)
    assert len(rec.commits) == 2


def test_sample_older_than_a_pending_slot_is_late():
    """With slot 3 pending, a value for slot 2 (never committed) is late as well."""
    store, rec, d = make_store()
    full(store, d, 0, 1.0)
    store.update(d, T0 + 3 * P, {"a": 3.0})
    with pytest.raises(Rejected) as caught:
        store.update(d, T0 + 2 * P, {"a": 2.0})
    assert caught.value.reason == "late_sample"


def test_duplicate_of_newest_slot_merges_without_a_new_commit():
    """A repeated message for the newest slot (QoS 1 redelivery) overwrites it and does not advance."""
    store, rec, d = make_store()
    full(store, d, 0, 1.0)
    full(store, d, 0, 1.5)
    assert len(rec.commits) == 1
    assert store.last_values(d).tolist() == [1.5, 1.5]


class NaiveWindow:
    """Reference: a Python list of every slot since the last restart, same rules, no ring arithmetic."""

    def __init__(self, lookback: int, max_gap: int):
        self.lookback, self.max_gap = lookback, max_gap
        self.slots: list[tuple[list[float], bool]] = []
        self.last: int | None = None

    def add(self, slot: int, values: list[float]) -> None:
        if self.last is not None and slot - self.last - 1 > self.max_gap:
            self.slots, self.last = [], None
        if self.last is not None:
            self.slots += [(self.slots[-1][0], False)] * (slot - self.last - 1)
        self.slots.append((values, True))
        self.last = slot

    def window(self) -> tuple[np.ndarray, float] | None:
        if len(self.slots) < self.lookback:
            return None
        recent = self.slots[-self.lookback :]
        return np.array([v for v, _ in recent], dtype=np.float32), sum(o for _, o in recent) / self.lookback


@pytest.mark.parametrize("seed", range(5))
def test_ring_buffer_matches_naive_reference_through_wraparound(seed):
    """Over thousands of slots with random gaps and restarts, the ring's window equals a naive list's."""
    rng = np.random.default_rng(seed)
    lookback, max_gap = 7, 3
    store, _, d = make_store(lookback=lookback, max_gap=max_gap)
    naive = NaiveWindow(lookback, max_gap)
    slot = 0
    for _ in range(3000):
        slot += int(rng.choice([1, 1, 1, 1, 2, 3, 4, 5, 9]))
        values = rng.normal(size=2).astype(np.float32).tolist()
        store.update(d, T0 + slot * P, dict(zip(FEATURES, values)))
        naive.add(slot, values)
        expected = naive.window()
        assert store.is_full(d) == (expected is not None)
        if expected is not None:
            np.testing.assert_array_equal(store.window(d), expected[0])
            assert store.completeness(d) == pytest.approx(expected[1])


def test_many_devices_grow_storage_without_mixing_windows():
    """Adding devices beyond the initial capacity keeps every device's own window."""
    store = WindowStore(FEATURES, 3, P, 3, capacity=2)
    devices = [store.device(f"d{k}") for k in range(50)]
    for k in range(3):
        for d in devices:
            store.update(d, T0 + k * P, {"a": float(d), "b": float(k)})
    assert store.capacity >= 50
    for d in devices:
        assert store.window(d)[:, 0].tolist() == [float(d)] * 3
        assert store.window(d)[:, 1].tolist() == [0.0, 1.0, 2.0]


def make_tolerant_store(lookback: int = 6, max_gap: int = 3, lateness: int = 2) -> tuple[WindowStore, Recorder, int]:
    recorder = Recorder()
    store = WindowStore(FEATURES, lookback, P, max_gap, on_commit=recorder, max_lateness_periods=lateness)
    return store, recorder, store.device("dev")


def test_late_sample_within_tolerance_fills_its_imputed_slot_in_place():
    """Reordering: a sample for a filled-forward slot within max_lateness_periods replaces it and counts as observed."""
    store, rec, d = make_tolerant_store()
    full(store, d, 0, 1.0)
    full(store, d, 2, 3.0)  # slot 1 filled forward with 1.0
    assert store.completeness(d) == pytest.approx(2 / 6)
    full(store, d, 1, 2.0)  # arrives late, 1 period behind the newest slot
    assert store.window(d)[-3:, 0].tolist() == [1.0, 2.0, 3.0]
    assert store.completeness(d) == pytest.approx(3 / 6)
    assert store.reordered == 1
    assert [c[0] for c in rec.commits] == [0, 2]  # no new commit: forecasts already made are not revised


def test_late_sample_beyond_tolerance_is_rejected_and_changes_nothing():
    """A sample more than max_lateness_periods behind the newest slot is a late_sample; the window is unchanged."""
    store, rec, d = make_tolerant_store(lateness=2)
    for k in range(5):
        full(store, d, k, float(k))
    before = store.window(d).copy()
    with pytest.raises(Rejected) as caught:
        full(store, d, 1, 9.0)  # 3 periods behind
    assert caught.value.reason == "late_sample" and "tolerance 2" in caught.value.detail
    np.testing.assert_array_equal(store.window(d), before)


def test_late_sample_between_the_newest_and_a_pending_slot_is_committed_first():
    """With slot 3 pending, a complete sample for slot 2 within tolerance is committed before it (not rejected)."""
    store, rec, d = make_tolerant_store()
    full(store, d, 0, 1.0)
    full(store, d, 1, 1.5)
    store.update(d, T0 + 3 * P, {"a": 3.0})  # pending
    full(store, d, 2, 2.0)
    assert [(c[0], c[1]) for c in rec.commits] == [(0, True), (1, True), (2, True)]
    store.update(d, T0 + 3 * P, {"b": 3.0})
    assert [(c[0], c[1]) for c in rec.commits][-1] == (3, True)
    assert store.window(d)[-4:, 0].tolist() == [1.0, 1.5, 2.0, 3.0]


def _resident_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_state_arrays_are_resident_only_where_written_and_freed_back_to_the_system():
    """Per-device state arrays (agent.core.arrays) take memory only for the rows written, and a grown-out array's memory
    goes back to the system when it is freed (malloc kept freed arrays in the heap)."""
    from agent.core import arrays

    np.ones(30 << 20, dtype=np.uint8)  # a large temporary freed: from now on malloc serves up to 30 MiB from its heap
    base = _resident_mib()
    ring = arrays.zeros((65536, 60, 4), np.float32)  # 60 MiB of room
    assert ring.shape == (65536, 60, 4) and ring.dtype == np.float32 and not ring.any()
    assert _resident_mib() - base < 4
    ring[:32768] = 1.5  # half of the rows written
    assert 26 < _resident_mib() - base < 36
    del ring
    assert _resident_mib() - base < 4
    grown = arrays.zeros((8192, 60, 4), np.float32)  # 7.5 MiB, written in full, then replaced by a larger one
    grown[:] = 2.0
    del grown
    assert _resident_mib() - base < 4
    filled = arrays.full((1000, 3), -7, np.int64)
    assert filled.shape == (1000, 3) and (filled == -7).all()
    assert arrays.zeros((4, 2), bool).dtype == bool  # small ones come from numpy as usual
