"""Rejected input: counters per reason and a rate-limited report on `{prefix}/agent/{agent_id}/errors`.

Every rejection is counted; only as many are published as the RateLimiter allows: at most
`errors.max_per_minute` in any 60 s window (the first minute included), at most half of them back to back.
The rest are summed in the next message's `suppressed` field, so a flood of bad input never becomes a flood
of error messages, and `sum(1 + suppressed)` over the messages equals the number of rejections. `flush()`
(called periodically and at shutdown) reports a suppressed remainder once the limiter allows a message, so a
burst's total is not held back until the next rejection; only the forced flush at shutdown (one message, so
the counts add up) may go beyond the limit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from agent.transport import payloads
from agent.core.events import REJECTION_REASONS, Rejected, Rejection

log = logging.getLogger(__name__)

# Publishes one errors-topic payload (QoS 0, not retained).
Sink = Callable[[bytes], None]

# Faults of the agent itself (not rejected input): same errors-topic payload, not rate-limited, not counted as
# rejections, delivered durably (through the outbox) because they are rare and someone must act on them.
FAULT_REASONS = ("outbox_corrupt", "model_reload_failed")


class RateLimiter:
    """At most `per_minute` passes in any 60 s window, and at most half of them (rounded up) back to back.

    The window is exact: the times of the last `per_minute` passes are kept, and another passes only once the
    oldest of them is WINDOW_S old, so no 60 s window (the first minute included) ever holds more. A token bucket
    (capacity `per_minute` / 2, refilled at `per_minute` per minute) spreads them out: after a burst the rest of
    the minute's allowance comes back at one per 60 / `per_minute` s, and a summary of what was suppressed goes
    out within seconds rather than a minute later.
    """

    WINDOW_S = 60.0

    def __init__(self, per_minute: int, monotonic: Callable[[], float] = time.monotonic):
        self.per_minute = int(per_minute)
        self._monotonic = monotonic
        self._sent: deque[float] = deque(maxlen=max(1, self.per_minute))  # times of the last `per_minute` passes
        self._capacity = float(max(1, -(-self.per_minute // 2)))
        self._rate_per_s = self.per_minute / self.WINDOW_S
        self._tokens = self._capacity
        self._last = monotonic()

    def take(self) -> bool:
        if self.per_minute <= 0:
            return False
        now = self._monotonic()
        self._tokens = min(self._capacity, self._tokens + max(0.0, now - self._last) * self._rate_per_s)
        self._last = now
        if self._tokens < 1.0:
            return False
        if len(self._sent) >= self.per_minute and now - self._sent[0] < self.WINDOW_S:
            return False
        self._tokens -= 1.0
        self._sent.append(now)  # the deque's maxlen drops the oldest
        return True


class ErrorReporter:
    """Counts rejections by reason and publishes a bounded number of them; thread-safe."""

    def __init__(
        self,
        sink: Sink | None,
        max_per_minute: int,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self._sink = sink
        self._clock = clock
        self._limiter = RateLimiter(max_per_minute, monotonic)
        self._enabled = max_per_minute > 0  # 0: count only, never publish
        self._lock = threading.Lock()
        self.counts: dict[str, int] = dict.fromkeys(REJECTION_REASONS, 0)
        self.faults: dict[str, int] = dict.fromkeys(FAULT_REASONS, 0)
        self._fault_sink: Sink | None = None
        self._waiting_faults: list[bytes] = []
        self.published = 0
        self._suppressed = 0
        self._last_suppressed: tuple[str, str, str | None, str | None] | None = None

    def set_sink(self, sink: Sink | None) -> None:
        self._sink = sink

    def set_fault_sink(self, sink: Sink) -> None:
        """Where fault reports go; faults reported before this are sent now, in order."""
        with self._lock:
            self._fault_sink = sink
            waiting, self._waiting_faults = self._waiting_faults, []
        for body in waiting:
            sink(body)

    def fault(self, reason: str, detail: str) -> None:
        """Report a fault of the agent (FAULT_REASONS) on the errors topic; logged at ERROR."""
        if reason not in FAULT_REASONS:
            raise ValueError(f"unknown fault reason {reason!r}")
        log.error("%s: %s", reason, detail)
        body = payloads.error(self._clock(), None, None, reason, detail, 0)
        with self._lock:
            self.faults[reason] += 1
            sink = self._fault_sink
            if sink is None:
                self._waiting_faults.append(body)
                return
        try:
            sink(body)
        except Exception:
            log.exception("could not queue a fault report")

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counts)

    @property
    def suppressed(self) -> int:
        with self._lock:
            return self._suppressed

    def rejected(self, error: Rejected, topic: str | None) -> None:
        self.report(error.reason, error.detail, topic=topic, device=error.device)

    def rejection(self, event: Rejection) -> None:
        self.report(event.reason, event.detail, topic=event.topic, device=event.device)

    def count(self, reason: str) -> None:
        """Count a rejection without reporting it again (one already reported for the same device and cause)."""
        with self._lock:
            self.counts[reason] += 1

    def report(self, reason: str, detail: str, topic: str | None = None, device: str | None = None) -> None:
        if reason not in self.counts:
            raise ValueError(f"unknown rejection reason {reason!r}")
        with self._lock:
            self.counts[reason] += 1
            if self._sink is None or not self._limiter.take():
                self._suppressed += 1
                self._last_suppressed = (reason, detail, topic, device)
                return
            suppressed, self._suppressed, self._last_suppressed = self._suppressed, 0, None
            self.published += 1
        log.warning("rejected input on %s: %s: %s", topic, reason, detail)
        self._send(reason, detail, topic, device, suppressed)

    def flush(self, force: bool = False) -> None:
        """Report the suppressed remainder (its latest rejection, carrying the rest as `suppressed`).

        Needs the limiter to allow one more message unless `force` (shutdown: one last message so the counts add up).
        """
        with self._lock:
            if self._last_suppressed is None or self._sink is None or not self._enabled:
                return
            if not force and not self._limiter.take():
                return
            reason, detail, topic, device = self._last_suppressed
            suppressed, self._suppressed, self._last_suppressed = self._suppressed - 1, 0, None
            self.published += 1
        log.warning("rejected input on %s: %s: %s (%d more not reported)", topic, reason, detail, suppressed)
        self._send(reason, detail, topic, device, suppressed)

    def _send(self, reason: str, detail: str, topic: str | None, device: str | None, suppressed: int) -> None:
        sink = self._sink
        if sink is None:
            return
        try:
            sink(payloads.error(self._clock(), topic, device, reason, detail, suppressed))
        except Exception:  # reporting must never take the caller (the network thread) down
            log.exception("could not publish an errors-topic message")
