"""A learning period per device: a bundle trained on other machines adapts to this machine's normal level.

Rule: while a device is learning (its first `detect.learning_hours` of data, and at least `min_samples`
observed samples) it raises no alert; its observed values are summed. Then its normal mean and spread
replace, for its own inputs and outputs, those the bundle learned from the training machines: the device's
normal is mapped onto the training normal (x' = m_train + (x - m_device) * s_train / s_device), so the model,
the residuals and the state channels see this machine's normal where they saw the fleet's.

Why: two pumps of one type differ by offsets and gains (a sensor mounted elsewhere, a different load); a
bundle trained on one flags the other's normal level as a fault for ever. What was learned is kept across
restarts (`to_dict` / `load`, a JSON file in the state directory written by agent.app).
"""

from __future__ import annotations

import numpy as np

from agent.core import arrays

MIN_SPREAD = 1e-3  # a device's spread never below this share of the training spread (a constant sensor)


class DeviceLearning:
    """Per-device sums while learning, then per-device input offset and scale in the bundle's terms."""

    def __init__(self, features: list[str], offset: np.ndarray, scale: np.ndarray, period_s: float, hours: float,
                 min_samples: int, train_mean: np.ndarray | None = None, train_std: np.ndarray | None = None):
        self.features = list(features)
        self.offset, self.scale = np.asarray(offset, np.float64), np.asarray(scale, np.float64)  # (F,) the bundle's
        # The training rows' normal in original units (a standard scaler's own mean and std where not given).
        self.train_mean = np.asarray(train_mean if train_mean is not None else offset, np.float64)  # (F,)
        self.train_std = np.asarray(train_std if train_std is not None else scale, np.float64)  # (F,)
        self.enabled = hours > 0
        self.span_slots = hours * 3600.0 / period_s  # slots of data a device learns from
        self.min_samples = int(min_samples)
        self.capacity = 0
        self.changed = False  # a device finished learning since the last to_dict()
        self.ensure_capacity(64)

    def ensure_capacity(self, n: int) -> None:
        if n <= self.capacity:
            return
        if not self.enabled:  # nothing to learn: no per-device arrays (~130 bytes a device with four features)
            self.capacity = n
            return
        capacity = max(n, self.capacity + self.capacity // 2)
        F = len(self.features)
        fresh = {
            "count": arrays.zeros(capacity, np.int64),
            "total": arrays.zeros((capacity, F), np.float64),
            "squares": arrays.zeros((capacity, F), np.float64),
            "first_slot": arrays.full(capacity, -1, np.int64),
            "learning": arrays.full(capacity, self.enabled, bool),  # True until the device's normal is known
            "device_offset": arrays.zeros((capacity, F), np.float64),  # (D, F) what scaling subtracts, per device
            "device_scale": arrays.zeros((capacity, F), np.float64),  # (D, F) what it divides by
        }
        fresh["device_offset"][:] = self.offset
        fresh["device_scale"][:] = self.scale
        arrays.replace(self, fresh, self.capacity)
        self.capacity = capacity

    def reset(self, d: int) -> None:
        """Device row d starts over: nothing learned (its device was evicted and the row given to another)."""
        if not self.enabled:
            return
        self.count[d], self.first_slot[d], self.learning[d] = 0, -1, self.enabled
        self.total[d] = self.squares[d] = 0.0
        self.device_offset[d], self.device_scale[d] = self.offset, self.scale

    def observe(self, devices: np.ndarray, slots: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """Observed samples (K,) of learning devices, in time order per device (values (K, F), original units) ->
        (which samples the learning took (K,): a device's samples after the one that completes its learning are
        scored as usual, the devices that finished learning with them)."""
        taken = np.zeros(len(devices), dtype=bool)
        finished = []
        for d in np.unique(devices).tolist():
            rows = np.flatnonzero(devices == d)  # (R,) in time order
            first = int(self.first_slot[d]) if self.first_slot[d] >= 0 else int(slots[rows[0]])
            count = self.count[d] + np.arange(1, len(rows) + 1)  # (R,) samples learned once each row is added
            done = (count >= self.min_samples) & (slots[rows] - first >= self.span_slots)
            if done.any():
                rows = rows[: int(np.argmax(done)) + 1]
            taken[rows] = True
            self.first_slot[d] = first
            self.count[d] += len(rows)
            self.total[d] += values[rows].sum(axis=0)
            self.squares[d] += np.square(values[rows]).sum(axis=0)
            if done.any():
                self._finish(d)
                finished.append(d)
        return taken, finished

    def _finish(self, d: int) -> None:
        n = float(self.count[d])
        mean = self.total[d] / n
        std = np.sqrt(np.maximum(self.squares[d] / n - mean * mean, 0.0))
        std = np.maximum(std, MIN_SPREAD * self.train_std)
        # scaled = (x' - offset) / scale with x' = m_train + (x - mean) * s_train / std
        ratio = std / self.train_std  # (F,)
        self.device_offset[d] = mean - (self.train_mean - self.offset) * ratio
        self.device_scale[d] = self.scale * ratio
        self.learning[d] = False
        self.changed = True

    def to_dict(self, names: list[str]) -> dict:
        """What was learned and what is being learned, by device name (JSON-ready)."""
        self.changed = False
        devices = {}
        for d, name in enumerate(names):
            if self.count[d] == 0:
                continue
            devices[name] = {"count": int(self.count[d]), "first_slot": int(self.first_slot[d]), "learning": bool(self.learning[d]),
                             "total": self.total[d].tolist(), "squares": self.squares[d].tolist()}
        return {"features": self.features, "devices": devices}

    def load(self, data: dict, index) -> int:
        """Take what `to_dict` wrote for the devices it names (`index(name)` -> device row); returns how many.
        Data learned on other features is ignored."""
        if not isinstance(data, dict) or data.get("features") != self.features:
            return 0
        loaded = 0
        for name, entry in (data.get("devices") or {}).items():
            try:
                total = np.asarray(entry["total"], np.float64)
                squares = np.asarray(entry["squares"], np.float64)
                count, first_slot, learning = int(entry["count"]), int(entry["first_slot"]), bool(entry["learning"])
            except (KeyError, TypeError, ValueError):
                continue
            if total.shape != (len(self.features),) or squares.shape != total.shape or count < 1:
                continue
            d = index(name)
            if d is None:
                continue
            self.ensure_capacity(d + 1)
            self.count[d], self.first_slot[d] = count, first_slot
            self.total[d], self.squares[d] = total, squares
            if not learning:
                self._finish(d)
            loaded += 1
        self.changed = False
        return loaded
