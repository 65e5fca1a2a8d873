"""What the daemon tells about itself: the retained status topic, systemd's watchdog and STATUS=, the periodic jobs.

With several models the status names each, with its bundle's version and sha256 (`models`); `model` stays the
first one's. With one model it is what it always was. The watchdog is fed only after a real liveness check (`health`), so a stuck worker
or MQTT loop gets the daemon restarted. Periodic jobs wait on the stop event, never sleep.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.transport import payloads

if TYPE_CHECKING:
    from agent.app import Agent

log = logging.getLogger(__name__)

ERRORS_FLUSH_EVERY_S = 1.0
STATS_LOG_EVERY_S = 60.0
STATUS_EVERY_S = 5.0  # sd_notify STATUS= refresh when no watchdog is configured


class StatusReporter:
    """Builds and publishes the status payload; runs the periodic jobs and the watchdog loops."""

    def __init__(self, agent: Agent):
        self.agent = agent
        prefix = agent.settings.topics.output_prefix
        self.topic = f"{prefix}/agent/{agent.settings.agent_id}/status"

    def payload(self, state: str, reason: str | None = None) -> bytes:
        agent = self.agent
        runtimes = agent.runtimes
        first = runtimes[0].bundle
        extra: dict = {}
        if state == "online":
            if agent.outbox is not None:
                o = agent.outbox.stats()
                extra["outbox"] = {"queued": o["queued"], "sent": o["sent"], "dropped": o["dropped"]}
            if len(runtimes) == 1 and runtimes[0].reload_outcome is not None:
                extra["model_reload"] = runtimes[0].reload_outcome
        models = []
        for runtime in runtimes if len(runtimes) > 1 else []:  # one model: `model` says it all, as always
            entry = {"model": runtime.name, "name": runtime.bundle.name, "version": runtime.bundle.version, "sha256": runtime.bundle.sha256}
            if state == "online" and runtime.reload_outcome is not None:
                entry["reload"] = runtime.reload_outcome
            models.append(entry)
        if models:
            extra["models"] = models
        if state == "online" and agent.alarms is not None:
            summary = agent.alarms.summary()
            if any(summary.values()):  # nothing to say until an operator acted
                extra["alarms"] = summary
        return payloads.status(state, agent.settings.agent_id, payloads.agent_version(), first.name, first.version, first.sha256,
                               agent.clock(), reason=reason, extra=extra)

    def publish(self) -> None:
        link = self.agent.link
        if link is not None and link.connected.is_set():
            link.publish(self.topic, self.payload("online"), qos=1, retain=True)

    def line(self, connected: bool) -> str:
        agent = self.agent
        c = agent.counters
        state = "connected" if connected else "broker unreachable, reconnecting"
        queued = agent.outbox.count if agent.outbox is not None else 0
        return f"{state}; {c.processed} samples processed, queue {agent.engine.queue.qsize()}, outbox {queued}"

    def outbox_line(self) -> str:
        outbox = self.agent.outbox
        if outbox is None:
            return ""
        o = outbox.stats()
        return f"; outbox: {o['queued']} queued, {o['sent']} sent, {o['dropped']} dropped"

    def periodic_jobs(self, stop: threading.Event) -> None:
        """Flush suppressed error reports, save learned normals that changed, time out rollouts; log the counters
        once a minute when they changed."""
        agent = self.agent
        next_log = time.monotonic() + STATS_LOG_EVERY_S
        last_line = ""
        while not stop.wait(ERRORS_FLUSH_EVERY_S):
            agent.errors.flush()
            for runtime in agent.runtimes:
                if runtime.pipeline is not None and runtime.pipeline.learning.changed:
                    runtime.save_learned()
                if runtime.rollout is not None:
                    runtime.rollout.check_timeout()
            if agent.alarms is not None and agent.engine is not None:
                agent.operators.expire()
                agent.alarms.save_if_changed()
            if time.monotonic() >= next_log:
                next_log = time.monotonic() + STATS_LOG_EVERY_S
                c = agent.counters
                line = (
                    f"{c.accepted} samples accepted, {c.processed} processed, {agent.errors.total} rejected, "
                    f"{c.backpressure_waits} backpressure waits{self.outbox_line()}"
                )
                if line != last_line:
                    log.info("stats: %s", line)
                    last_line = line

    def feed_watchdog(self, stop: threading.Event, health: Callable[[], tuple[bool, str]]) -> None:
        """WATCHDOG=1 only after a real liveness check; STATUS= says what the agent is doing."""
        notifier = self.agent.notifier
        interval = notifier.watchdog_s or STATUS_EVERY_S
        reported_unhealthy = False
        while not stop.wait(interval):
            healthy, why = health()
            if healthy:
                reported_unhealthy = False
                link = self.agent.link
                connected = link is not None and link.connected.is_set()
                fields = [f"STATUS={self.line(connected)}"]
                if notifier.watchdog_s:
                    fields.insert(0, "WATCHDOG=1")
                notifier.notify(*fields)
            else:
                if not reported_unhealthy:
                    log.error("unhealthy: %s; not feeding the systemd watchdog", why)
                    reported_unhealthy = True
                notifier.notify(f"STATUS=unhealthy: {why}")
