"""The MQTT link: a thin wrapper around paho-mqtt 2.x (the only module that imports paho).

paho runs its network loop in its own thread (`loop_start`); `on_message` only hands (topic, payload, time)
to the app's callback, which parses and enqueues. Subscriptions are made in `on_connect`, so they come back
after every reconnect. The retained status topic carries `online` while connected and the last will
(`offline`, "connection lost") when the connection dies without a clean goodbye.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from .config import Settings

log = logging.getLogger(__name__)

# (topic, payload, arrival time on the agent clock); must return quickly: it runs on paho's network thread.
MessageHandler = Callable[[str, bytes, float], None]


@dataclass(frozen=True, slots=True)
class Retained:
    """A retained message the link publishes (again) on every successful connect, e.g. the `online` status."""

    topic: str
    payload: bytes
    qos: int = 1


class MqttLink:
    """One broker connection: subscribe on connect, hand messages to `on_message`, publish, stop cleanly."""

    def __init__(
        self,
        settings: Settings,
        subscriptions: list[str],
        on_message: MessageHandler,
        will: Retained,
        on_connect_publish: Callable[[], Retained | None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self._settings = settings
        self._subscriptions = list(subscriptions)
        self._handler = on_message
        self._on_connect_publish = on_connect_publish
        self._clock = clock
        self._lock = threading.Condition()
        self._pending: set[int] = set()  # mids of QoS 1 publishes not yet acknowledged
        self._early_acks: dict[int, float] = {}  # acks that overtook publish() returning (mid -> monotonic time)
        self._unsubacks: set[int] = set()  # mids of UNSUBACKs received (one unsubscribe per life)
        self._subscribed = threading.Event()
        self.connected = threading.Event()
        self.connects = 0
        self.dropped_publishes = 0

        mqtt = settings.mqtt
        client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.agent_id,
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        paho_log = logging.getLogger("agent.mqtt.paho")
        if self._drop_socket_noise not in paho_log.filters:
            paho_log.addFilter(self._drop_socket_noise)
        client.enable_logger(paho_log)
        client.reconnect_delay_set(mqtt.reconnect_min_s, mqtt.reconnect_max_s)  # type: ignore[arg-type]
        client.max_queued_messages_set(mqtt.max_queued_messages)
        if mqtt.username is not None:
            client.username_pw_set(mqtt.username, mqtt.resolved_password())
        if mqtt.tls.enabled:
            client.tls_set(
                ca_certs=str(mqtt.tls.ca_file) if mqtt.tls.ca_file else None,
                certfile=str(mqtt.tls.cert_file) if mqtt.tls.cert_file else None,
                keyfile=str(mqtt.tls.key_file) if mqtt.tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        elif mqtt.username is not None and mqtt.resolved_password() and mqtt.host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("sending the broker password without TLS to %s; set mqtt.tls.enabled", mqtt.host)
        client.will_set(will.topic, will.payload, qos=will.qos, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self._client = client

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting with the configured back-off."""
        mqtt = self._settings.mqtt
        log.info("connecting to mqtt%s://%s:%d as %s", "s" if mqtt.tls.enabled else "", mqtt.host, mqtt.port, self._settings.agent_id)
        self._client.connect_async(mqtt.host, mqtt.port, keepalive=mqtt.keepalive_s)
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected and subscribed (for tests and start-up logging)."""
        return self.connected.wait(timeout) and self._subscribed.wait(timeout)

    def stop_input(self, timeout: float) -> bool:
        """Unsubscribe and wait (bounded) for the broker's UNSUBACK: after it, no more input arrives."""
        if not self._subscriptions or not self.connected.is_set():
            return True
        rc, mid = self._client.unsubscribe(self._subscriptions)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return False
        deadline = time.monotonic() + timeout
        with self._lock:  # the UNSUBACK may already be here: it is recorded, not matched, by the callback
            while mid not in self._unsubacks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True

    def stop(self, final: Retained | None, timeout: float) -> bool:
        """Publish `final` (e.g. the retained `offline` status), wait for pending QoS 1 acks, disconnect.

        Returns False when some QoS 1 messages were still unacknowledged at the deadline.
        """
        deadline = time.monotonic() + timeout
        if final is not None and self.connected.is_set():
            self.publish(final.topic, final.payload, qos=final.qos, retain=True)
        all_acked = self.wait_for_pending(max(0.0, deadline - time.monotonic()))
        if not all_acked:
            log.warning("%d QoS 1 messages were not acknowledged before shutdown", self.pending_count())
        self._client.disconnect()  # a clean DISCONNECT: the broker discards the last will
        self._client.loop_stop()
        return all_acked

    @staticmethod
    def _drop_socket_noise(record: logging.LogRecord) -> bool:
        # paho's loop polls a closed socket after every failed connect and after our DISCONNECT, and logs that
        # as an error; _on_connect_fail / _on_disconnect already say what happened, once and at the right level.
        return not str(record.msg).startswith("Client is not connected")

    # -- publishing ------------------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Queue a message; False when paho refused it (its outgoing queue is full, or QoS 0 while offline)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE or (qos == 0 and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS):
            self.dropped_publishes += 1
            return False
        with self._lock:
            acked_at = self._early_acks.pop(info.mid, None)
            acked_already = acked_at is not None and time.monotonic() - acked_at < 5.0  # older: a reused mid
            if qos > 0 and not acked_already:  # NO_CONN still counts: paho sends it after the reconnect
                self._pending.add(info.mid)
        return True

    def pending_count(self) -> int:
        with self._lock:
            return len(self._pending)

    def wait_for_pending(self, timeout: float) -> bool:
        """Wait until every QoS 1 publish so far is acknowledged, at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True

    def _forget_old_early_acks(self) -> None:
        # QoS 0 completions written by the network thread land here too and never match a pending mid.
        if len(self._early_acks) > 1024:
            horizon = time.monotonic() - 5.0
            for mid in [m for m, t in self._early_acks.items() if t < horizon]:
                del self._early_acks[mid]

    # -- paho callbacks (network thread) ---------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the connection: %s", reason_code)
            return
        self.connects += 1
        log.info("connected to the broker (session present: %s)", flags.session_present)
        if self._subscriptions:
            rc, _ = client.subscribe([(topic, self._settings.mqtt.qos_in) for topic in self._subscriptions])
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                log.error("subscribe failed: %s", paho.error_string(rc))
        else:
            self._subscribed.set()
        if self._on_connect_publish is not None:
            message = self._on_connect_publish()
            if message is not None:  # re-publish `online`: the will may have overwritten it while we were away
                self.publish(message.topic, message.payload, qos=message.qos, retain=True)
        self.connected.set()

    def _on_connect_fail(self, client, userdata) -> None:
        mqtt = self._settings.mqtt
        log.warning("cannot reach the broker at %s:%d; retrying (up to every %.0fs)", mqtt.host, mqtt.port, mqtt.reconnect_max_s)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self._subscribed.clear()
        if reason_code.is_failure:
            log.warning("disconnected from the broker (%s); reconnecting", reason_code)
        else:
            log.info("disconnected from the broker")

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        failed = [f"{topic}: {rc}" for topic, rc in zip(self._subscriptions, reason_code_list) if rc.is_failure]
        if failed:
            log.error("the broker refused subscriptions: %s", "; ".join(failed))
        else:
            log.info("subscribed to %s", ", ".join(self._subscriptions))
        self._subscribed.set()

    def _on_unsubscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        with self._lock:
            self._unsubacks.add(mid)
            self._lock.notify_all()

    def _on_message(self, client, userdata, message) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = message._topic.decode("utf-8", "replace")  # mosquitto refuses these; keep a readable name
        try:
            self._handler(topic, message.payload, self._clock())
        except Exception:  # an exception escaping a callback would end paho's network thread
            log.exception("message handler failed on %r", topic)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            if mid in self._pending:
                self._pending.discard(mid)
                if not self._pending:
                    self._lock.notify_all()
            else:
                self._early_acks[mid] = time.monotonic()
                self._forget_old_early_acks()
