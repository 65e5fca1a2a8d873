"""A batch's events out: forecasts, alerts and each device's retained list of open alerts, in order.

Alerts (and, by configuration, forecasts) go into the outbox in one transaction per batch and leave it only
when the broker acknowledged them; without an outbox they are published at QoS 1. QoS 0 forecasts are written
together, before the alert that follows them. A device's retained `alerts/active` list follows every alert
change and is published after the alerts are safe on disk. One Publisher serves every model: each event is
named with the model that made it, and the open alerts are kept per model (a swap ends only its model's).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.core.events import AlertEvent, Forecast, Rejection
from agent.transport import payloads
from agent.transport.mqtt import Retained
from agent.transport.outbox import Message

if TYPE_CHECKING:
    from agent.core.runtime import ModelRuntime

log = logging.getLogger(__name__)


class Publisher:
    """Encodes and sends (or stores) events; runs on one thread at a time (the publisher, or a batch run inline)."""

    def __init__(self, settings, counters, errors, runtimes: list[ModelRuntime], link: Callable[[], object | None],
                 outbox=None, wake_forwarder: Callable[[], None] = lambda: None, hass=None):
        self.prefix = settings.topics.output_prefix
        self.counters = counters
        self.errors = errors
        self.runtimes = runtimes
        self._link = link  # the MqttLink, once started (None before)
        self.outbox = outbox
        self.durable_forecasts = outbox is not None and settings.outbox.forecasts
        self._wake_forwarder = wake_forwarder
        self.hass = hass
        self.alarms = None  # agent.core.alarms.AlarmBook when operator commands are on (alarms.enabled)
        self.active_by_severity: dict[str, int] = {"warning": 0, "critical": 0}  # replaced after every alert event

    def publish(self, events: list, runtime: ModelRuntime, bundle=None) -> None:
        """Publish (or store) a batch's events in order; `bundle` is the model that made them (the running one)."""
        bundle = bundle or runtime.bundle
        name, version = bundle.name, bundle.version
        prefix = self.prefix
        link = self._link()
        stored: list[Message] = []  # one outbox transaction per batch
        active: list[Retained] = []
        bodies = iter(self._encode_forecasts([e for e in events if isinstance(e, Forecast)], name, version,
                                             getattr(bundle, "intervals", None)))  # encoded together
        published: list[tuple[str, bytes]] = []  # QoS 0 forecasts, written together (before an alert, or after the loop)
        forecasts_sent = 0
        open_by_device = runtime.open_alerts
        alarms = self.alarms
        out_of_service = alarms.maintenance if alarms is not None else None  # read only here (changed between batches)
        for event in events:
            if isinstance(event, Forecast):
                if self.hass is not None and self.hass.device_seen(event.device, list(event.values), f"{name} {version}"):
                    if event.device not in open_by_device:  # the alert entity needs a state from the start
                        active.append(Retained(f"{prefix}/{event.device}/alerts/active", payloads.active_alerts(event.device, event.ts, [])))
                topic, body = f"{prefix}/{event.device}/forecast", next(bodies)
                if body is None:
                    continue  # could not be encoded: logged and counted; the other devices' events go on
                if out_of_service and event.device in out_of_service:
                    body = body[:-1] + b',"maintenance":true}'  # a forecast of a machine under maintenance says so
                if self.durable_forecasts:
                    stored.append(Message("forecast", topic, body, event.device))
                else:
                    published.append((topic, body))
            elif isinstance(event, AlertEvent):
                operator = alarms.annotation(event.alert_id, event.device) if alarms is not None else None  # before admit:
                shown = alarms is None or alarms.admit(event)  # an end still says who acknowledged; shelved/out of service: kept back
                try:
                    topic, body = f"{prefix}/{event.device}/alert", payloads.alert(event, name, version, operator)
                except (ValueError, TypeError, OverflowError):
                    self.counters.add("encode_errors")
                    log.exception("alert %s %s on %s could not be encoded; the batch's other events go on",
                                  event.alert_id, event.state, event.device)
                    continue
                if not shown:
                    pass
                elif self.outbox is not None:
                    stored.append(Message("alert", topic, body, event.device))
                elif link is not None:
                    if published:  # the forecasts before it leave before it
                        link.publish_many(published)
                        forecasts_sent += len(published)
                        published = []
                    link.publish(topic, body, qos=1)
                if shown:
                    self.counters.add("alerts")
                elif out_of_service and event.device in out_of_service:
                    continue  # a machine under maintenance has no alerts, not even in its active list
                log.info(
                    "alert %s %s on %s: %s, score %.2f", event.alert_id, event.state, event.device, event.severity, event.score,
                    extra={"event": "alert", "alert_id": event.alert_id, "state": event.state, "device": event.device, "severity": event.severity},
                )
                # The retained list follows every change, not just the state at the end of a batch.
                open_alerts = open_by_device.setdefault(event.device, {})
                if event.state == "end":
                    open_alerts.pop(event.alert_id, None)
                else:
                    open_alerts[event.alert_id] = event
                body = payloads.active_alerts(event.device, event.ts, list(open_alerts.values()), alarms)
                if not open_alerts:
                    del open_by_device[event.device]
                active.append(Retained(f"{prefix}/{event.device}/alerts/active", body))
                self._count_open()
            elif isinstance(event, Rejection):
                self.errors.rejection(event)
        if published and link is not None:
            link.publish_many(published)
        forecasts = forecasts_sent + len(published) + sum(1 for m in stored if m.kind == "forecast")
        if forecasts:
            self.counters.add("forecasts", forecasts)
        if stored:
            self.store(stored)
        if link is not None:
            for message in active:  # after the alerts are safe on disk; republished on every connect
                link.set_retained(message)

    def device_changed(self, runtime: ModelRuntime, device: str, now: float, events: list[AlertEvent] = ()) -> None:
        """An operator changed a device or its alerts (between batches): `events` out as any batch's, then the
        device's retained active list with its new operator state."""
        if events:
            self.publish(list(events), runtime)
        open_alerts = runtime.open_alerts.get(device, {})
        body = payloads.active_alerts(device, now, list(open_alerts.values()), self.alarms)
        link = self._link()
        if link is not None:
            link.set_retained(Retained(f"{self.prefix}/{device}/alerts/active", body))

    def store(self, messages: list[Message]) -> None:
        assert self.outbox is not None
        self.outbox.put_many(messages)
        self._wake_forwarder()

    def _count_open(self) -> None:
        counts = {"warning": 0, "critical": 0}
        for runtime in self.runtimes:
            for alerts in runtime.open_alerts.values():
                for open_event in alerts.values():
                    counts[open_event.severity] = counts.get(open_event.severity, 0) + 1
        self.active_by_severity = counts

    def _encode_forecasts(self, forecasts: list[Forecast], name: str, version: str, intervals=None) -> list[bytes | None]:
        """The batch's forecast payloads; when the batch fails to encode, one by one, None for each that fails, so
        that one device's unencodable forecast never takes the other devices' events down with it."""
        try:
            return payloads.forecasts(forecasts, name, version, intervals)
        except (ValueError, TypeError, OverflowError):
            bodies: list[bytes | None] = []
            for fc in forecasts:
                try:
                    bodies.append(payloads.forecast(fc, name, version, intervals))
                except (ValueError, TypeError, OverflowError):
                    self.counters.add("encode_errors")
                    log.error("forecast of %s at %s could not be encoded (non-finite values?); dropped", fc.device, fc.ts)
                    bodies.append(None)
            return bodies
