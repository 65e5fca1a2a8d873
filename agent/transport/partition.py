"""Device-hash partitioning: run the daemon as N processes, each owning the devices whose hash is its index.

Every process subscribes to the full input filter and drops the messages of foreign devices right after the
topic match, before the payload is decoded (the cheapest point: one regex and one crc32). MQTT 5 shared
subscriptions are not used because brokers spread them per message, not per device, and a device's window
must live in exactly one process.

The hash is crc32 of the device name's UTF-8 bytes: stable across processes, restarts, machines and Python
versions (unlike the built-in `hash`, which is salted per process).

Run N processes with the same configuration plus, per process i in 0..N-1:
    EDGECAST_PARTITION__COUNT=N  EDGECAST_PARTITION__INDEX=i
    EDGECAST_AGENT_ID=<name>-<i>   (MQTT client ids and status topics must differ)
    EDGECAST_STATE__DIRECTORY=<dir>/<i>   (each process has its own outbox)
"""

from __future__ import annotations

import zlib


def partition_of(device: str, count: int) -> int:
    """The partition (0..count-1) that owns `device`."""
    if count <= 1:
        return 0
    return zlib.crc32(device.encode("utf-8")) % count


class PartitionFilter:
    """`owns(device)`: True for this process's devices; remembers the verdict per device name (names repeat)."""

    def __init__(self, count: int = 1, index: int = 0):
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"partition index {index} must lie in 0..{count - 1}")
        self.count, self.index = count, index
        self.foreign = 0  # messages dropped because another process owns their device
        self._verdicts: dict[str, bool] = {}

    @property
    def active(self) -> bool:
        return self.count > 1

    def owns(self, device: str) -> bool:
        verdict = self._verdicts.get(device)
        if verdict is None:
            verdict = partition_of(device, self.count) == self.index
            if len(self._verdicts) < 1_000_000:  # bounded: hostile topics cannot grow it without limit
                self._verdicts[device] = verdict
        if not verdict:
            self.foreign += 1
        return verdict
