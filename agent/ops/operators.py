"""Operator commands (docs/operators.md): checked on paho's thread, applied on the worker between two batches.

A command changes alert state that the publisher owns, so it runs with the pipeline idle
(`Engine.call_between_batches`); its effects go out like any batch's events, then its result is published on
`<prefix>/<device>/command/result`. Shelves and maintenance periods that run out end the same way, from the
periodic job. The rules themselves are in agent/core/alarms.py.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from agent.core.alarms import Outcome
from agent.transport import commands

if TYPE_CHECKING:
    from agent.app import Agent
    from agent.core.runtime import ModelRuntime

log = logging.getLogger(__name__)

_REFUSED = Outcome(False)


class OperatorDesk:
    """Takes operator commands for the agent's devices and applies them to its AlarmBook, runtimes and outputs."""

    def __init__(self, agent: Agent):
        self.agent = agent

    def on_command(self, topic: str, payload: bytes) -> None:
        """paho's thread: check the command, then run it on the worker between two batches (it changes alert state)."""
        prefix = self.agent.settings.topics.output_prefix
        try:
            command = commands.parse(topic, payload, prefix)
        except commands.CommandError as error:
            device = commands.device_of(topic, prefix) or ""
            self._command_result(device, None, False, error.reason, error.detail, error.by, error.request_id)
            return
        partition = self.agent.runtimes[0].ingest.partition
        if partition.active and not partition.owns(command.device):
            return  # another partition's device: that process answers
        runtime = self.agent.runtime_for(command.device)
        if runtime is None:
            self._command_result(command.device, command, False, "no_model", f"no model of this agent serves {command.device}")
            return
        self.agent.engine.call_between_batches(lambda: self._execute(command, runtime))

    def _execute(self, command: commands.Command, runtime: ModelRuntime) -> None:
        """Worker thread, pipeline idle: apply one command, publish what it changed, answer it."""
        book, now, device = self.agent.alarms, self.agent.clock(), command.device
        open_alerts = runtime.open_alerts.get(device, {})
        events: list = []
        if command.alert_id is not None and command.command in ("acknowledge", "shelve") and command.alert_id not in open_alerts:
            outcome = dataclasses.replace(_REFUSED, reason="not_open", detail=f"alert {command.alert_id} is not open on {device}")
        elif command.command == "acknowledge":
            ids = [command.alert_id] if command.alert_id is not None else list(open_alerts)
            if not ids:
                outcome = dataclasses.replace(_REFUSED, reason="not_open", detail=f"{device} has no open alert")
            else:
                outcome = book.acknowledge(device, ids, command.by, command.reason, now)
                events = [dataclasses.replace(open_alerts[i], state="update", ts=now) for i in ids]
        elif command.command == "shelve":
            outcome = book.shelve(device, command.alert_id, command.duration_s, command.by, command.reason, now)
        elif command.command == "unshelve":
            outcome = book.unshelve(device, command.alert_id)
            if outcome.ok:
                events = self._reannounce(runtime, device, now)
        elif command.command == "maintenance":
            until = command.until if command.until is not None else (now + command.duration_s if command.duration_s else None)
            outcome = book.check_maintenance(until, now)
            if outcome.ok:
                self.agent.publisher.publish(runtime.pipeline.restart_device(device, now, relearn=False), runtime)  # open alerts end
                outcome = book.start_maintenance(device, until, command.by, command.reason, now)
        elif command.command == "end_maintenance":
            outcome = book.end_maintenance(device)
            if outcome.ok:
                self._back_in_service(runtime, device, now)
        else:
            outcome = book.give_feedback(device, command.alert_id, command.label, command.comment, command.by, now)
        if outcome.ok:
            log.info("operator command %s on %s by %s: %s (%s)", command.command, device, command.by, outcome.detail, command.reason)
            self.agent.publisher.device_changed(runtime, device, now, events)
            self.agent.status.publish()
        self._command_result(device, command, outcome.ok, outcome.reason, outcome.detail)

    def _reannounce(self, runtime: ModelRuntime, device: str, now: float) -> list:
        """Open alerts of a device that were kept off the outputs: announced again (`new` when they never were)."""
        events = []
        for alert_id, event in runtime.open_alerts.get(device, {}).items():
            known = self.agent.alarms.alerts.get(alert_id, {})
            if not known.get("announced", True):
                events.append(dataclasses.replace(event, state="new", ts=now))
        return events

    def _back_in_service(self, runtime: ModelRuntime, device: str, now: float) -> None:
        """The machine may have changed: its window and detector start over, and it learns its normal again."""
        ended = runtime.pipeline.restart_device(device, now, relearn=True)
        for event in ended:  # opened during maintenance, never published: the publisher keeps it quiet
            self.agent.alarms.admit(event)

    def expire(self) -> None:
        """Periodic: shelves and maintenance periods whose time ran out end on the worker, between batches."""
        shelves, services = self.agent.alarms.expired(self.agent.clock())
        if shelves or services:
            self.agent.engine.call_between_batches(self._apply_expiry)

    def _apply_expiry(self) -> None:
        now = self.agent.clock()
        shelves, services = self.agent.alarms.expired(now)  # again: an earlier call may have done it already
        for device, alert_id in shelves:
            runtime = self.agent.runtime_for(device) or self.agent.runtimes[0]
            self.agent.alarms.drop_shelf(device, alert_id)
            log.info("shelf of %s ran out", alert_id or device)
            self.agent.publisher.device_changed(runtime, device, now, self._reannounce(runtime, device, now))
        for device in services:
            runtime = self.agent.runtime_for(device) or self.agent.runtimes[0]
            self.agent.alarms.end_maintenance(device)
            log.info("maintenance of %s ran out: back in service", device)
            self._back_in_service(runtime, device, now)
            self.agent.publisher.device_changed(runtime, device, now)
        self.agent.status.publish()

    def _command_result(self, device: str, command, ok: bool, reason: str | None, detail: str,
                        by: str | None = None, request_id: str | None = None) -> None:
        if self.agent.alarms is not None:
            self.agent.alarms.count_command(command.command if command is not None else "invalid", ok)
        if not ok:
            log.warning("operator command refused on %s: %s: %s", device or "?", reason, detail)
        if command is not None:
            by, request_id = command.by, command.request_id
        body = commands.result(device, command.command if command is not None else None, ok, reason, detail, self.agent.clock(),
                               by, request_id)
        self.agent.publish(f"{self.agent.settings.topics.output_prefix}/{device or '_'}/command/result", body, qos=1)
