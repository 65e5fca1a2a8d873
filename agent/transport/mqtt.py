"""The MQTT link: a thin wrapper around paho-mqtt 2.x (the only module that imports paho).

paho runs its network loop in its own thread (`loop_start`); `on_message` only hands (topic, payload, time)
to the app's callback, which parses and enqueues (it may block for a bounded time when the ingest queue is
full: paho then stops reading the socket and QoS 1 readings wait at the broker). Subscriptions are made in
`on_connect`, so they come back after every reconnect (the session is clean, so the broker never keeps them).
Retained state (the `online` status, the active-alert lists) is kept here and published again on every
connect. Reconnects back off exponentially with jitter (a fleet of gateways does not hammer a broker that
just came back in lockstep). The retained status topic carries `online` while connected and the last will
(`offline`, "connection lost") when the connection dies without a clean goodbye.

Besides the sensor input, the link carries *control* subscriptions (Home Assistant's birth topic, the model
rollout topics): they go to their own handler, survive reconnects like the input, may be added and removed
while running, and stay when the input stops. Connects, refusals, disconnects and reconnects are logged with
their MQTT reason codes (and counted for the metrics). A broker keeps one connection per client id (the
agent_id): a second client with the same id takes the connection over, and the two keep kicking each other off.
That is logged as an ERROR naming the client id (_TakeoverWatch): reason code 142 (Session taken over, MQTT 5),
or, since mosquitto with MQTT 3.1.1 just closes the older connection, connections lost again and again right
after they were made.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import paho.mqtt.client as paho
from paho.mqtt.client import _ConnectionState
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from agent.ops import affinity

if TYPE_CHECKING:
    from agent.config.settings import Settings  # the daemon runs on a Snapshot of it (agent/config/snapshot.py)


log = logging.getLogger(__name__)

# (topic, payload, arrival time on the agent clock); must return quickly: it runs on paho's network thread.
MessageHandler = Callable[[str, bytes, float], None]
# Many messages in arrival order, [(topic, payload)], and their arrival time: the same contract for a whole read.
BatchHandler = Callable[[list[tuple[str, bytes]], float], None]
ControlHandler = Callable[[str, bytes], None]


def _reason(reason_code) -> str:
    """`135 (Not authorized)`: the number operators search for and the words that explain it."""
    value = getattr(reason_code, "value", reason_code)
    return f"{value} ({reason_code})"


class _BufferedSocket:
    """paho reads every packet with 3-4 small recv calls (type byte, length bytes, body): at thousands of messages
    a second each is a syscall and a GIL hand-off that the busy worker thread delays. This wrapper reads up to
    256 KiB at once and serves the small reads from memory; `pending()` makes paho's loop skip waiting in select
    while buffered bytes remain (paho does the same for TLS sockets). Everything else goes to the socket."""

    READ_SIZE = 256 * 1024

    def __init__(self, sock) -> None:
        self._sock = sock
        self._buffer = b""
        self._pos = 0

    def recv(self, bufsize: int) -> bytes:
        if self._pos >= len(self._buffer):
            data = self._sock.recv(self.READ_SIZE)  # BlockingIOError / b"" (closed) pass through unchanged
            if len(data) <= bufsize:
                return data
            self._buffer, self._pos = data, 0
        start = self._pos
        self._pos = min(start + bufsize, len(self._buffer))
        return self._buffer[start : self._pos]

    def fill(self) -> int:
        """Read what the socket holds into the (used-up) buffer; 0 when nothing was read (would block, closed, an
        error: paho's own next read meets the same condition and handles it as usual)."""
        try:
            data = self._sock.recv(self.READ_SIZE)
        except OSError:  # BlockingIOError, TLS want-read, a reset: left to paho's read
            return 0
        self._buffer, self._pos = data, 0
        return len(data)

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._buffer) - self._pos + inner

    def buffered(self) -> int:
        return len(self._buffer) - self._pos

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class _Client(paho.Client):
    """paho's client, remembering why the last connect attempt failed (paho drops the exception), reading through
    a _BufferedSocket, and taking the QoS 0/1 PUBLISH packets that lie complete in the read buffer in one pass
    (`on_publishes`) instead of paho's per-packet reads, message objects and callback locks."""

    last_error: BaseException | None = None
    on_publishes: Callable[..., None] | None = None  # ([(topic bytes, payload)] in order[, packet ids when acks_deferred])
    _writes_from_any_thread = False  # plain TCP: queue_raw_packets writes from the calling thread
    hold_s = 0.0  # how long a read's messages may wait for company before they are handed on (see _hold)
    hold_count = 1  # ... unless this many are there already
    acks_deferred = False  # mqtt.at_least_once: QoS 1 PUBLISHes are acknowledged by MqttLink.ack_many, once processed

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Held while reconnecting: paho clears its out queue and queues CONNECT then, and raw packets queued in
        # between would reach the broker before CONNECT (which closes the connection).
        self._raw_lock = threading.Lock()
        # One writer at a time: paho's network thread, or a thread that writes its raw packets itself.
        self._write_lock = threading.Lock()
        # Messages read but not yet handed on (network thread only), their packet ids and PUBACKs; see _hold.
        self._held: list[tuple[bytes, bytes]] = []
        self._held_mids: list[int] = []
        self._held_acks: list[bytes] = []
        self._held_since = 0.0
        self._last_delivery = (0.0, 0.0)  # monotonic start and end of the last hand-over (which may run a batch)

    def _packet_write(self):  # type: ignore[override]
        with self._write_lock:
            return super()._packet_write()

    def reconnect(self):  # type: ignore[override]
        try:
            with self._raw_lock:
                result = super().reconnect()
        except OSError as exc:  # refused, unreachable, TLS handshake or certificate verification failed
            self.last_error = exc
            raise
        self.last_error = None
        if self._sock is not None and not isinstance(self._sock, _BufferedSocket):
            # An SSL object must not be read and written by two threads at once: over TLS only paho's thread writes.
            self._writes_from_any_thread = not isinstance(self._sock, ssl.SSLSocket)
            self._sock = _BufferedSocket(self._sock)  # before the loop reads anything (CONNACK included)
        return result

    READ_BURST = 256  # packets read from the buffer per select, so writes are still serviced in between

    def queue_raw_packets(self, packets: bytes, max_pending: int = 0) -> bool:
        """Hand already-encoded QoS 0 PUBLISH packets to the network thread, which writes them like paho's own
        (one send for all of them); False when not connected, or when they would take the bytes of such packets
        waiting to be written past `max_pending` (0: no bound); then they are dropped, as paho drops QoS 0 while
        offline.

        The bound can be passed by one call's packets: paho takes the packet it is writing off its queue for the
        time of the write, and a check made meanwhile does not count it.

        Queued under a command byte paho does not interpret (0), so it does no per-message bookkeeping (no mid,
        no on_publish); a reconnect discards the queue, and only after CONNACK (state CONNECTED, so after the
        CONNECT packet) is anything queued here."""
        if not self._raw_lock.acquire(blocking=False):
            return False  # a reconnect is under way: dropped like any QoS 0 message while disconnected
        try:
            if self._sock is None or self._state != _ConnectionState.MQTT_CS_CONNECTED:
                return False
            if max_pending:
                pending = self.raw_pending_bytes()
                if pending and pending + len(packets) > max_pending:  # one call's packets always pass an empty queue
                    return False
            self._out_packet.append({"command": 0, "mid": 0, "qos": 0, "pos": 0, "to_process": len(packets), "packet": packets,
                                     "info": None})  # what paho's _packet_queue would queue, without its wake-up
            if not self._write_raw_now() and self._sockpairW is not None:
                try:  # what this thread could not write: the network thread's select wakes up for it
                    self._sockpairW.send(b"0")
                except BlockingIOError:
                    pass
            return True
        finally:
            self._raw_lock.release()

    def _write_raw_now(self) -> bool:
        """Write the raw packets at the head of the out queue from the calling thread; True when the queue is empty
        afterwards. At a trickle of readings, handing each batch's forecasts to the network thread woke it once more
        per batch; writing them here costs one send. Only raw packets are written (paho's own have callbacks that
        belong on its thread); a socket that takes part of them leaves the rest to the network thread."""
        if not self._writes_from_any_thread or not self._write_lock.acquire(blocking=False):
            return False  # TLS, or the network thread is writing: it takes these too, once woken
        try:
            queue = self._out_packet
            while queue:
                packet = queue[0]
                if packet["command"] != 0:
                    return False
                try:
                    written = self._sock_send(packet["packet"][packet["pos"]:])
                except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                    return False
                except (OSError, AttributeError, ValueError):  # the connection is going: paho's thread finds out
                    return False
                packet["to_process"] -= written
                packet["pos"] += written
                if packet["to_process"] > 0:
                    return False
                queue.popleft()
            with self._msgtime_mutex:
                self._last_msg_out = paho.time_func()
            return True
        finally:
            self._write_lock.release()

    def raw_pending_bytes(self) -> int:
        """Bytes of raw packets not yet written to the socket (a few packets: one per publish_many call)."""
        waiting = list(self._out_packet)  # one C-level copy: the network thread cannot change it meanwhile
        return sum(p["to_process"] for p in waiting if p["command"] == 0)

    def loop_read(self, max_packets: int = 1):  # type: ignore[override]
        sock = self._sock
        if (isinstance(sock, _BufferedSocket) and self.on_publishes is not None and self._in_packet["command"] == 0
                and sock.buffered() == 0 and sock.fill()):
            # The one-pass reader first: when readings trickle in, each read holds one PUBLISH, and paho's own path
            # for it (3-4 reads, a message object, callback locks, a log call) would take every one of them.
            self._take_buffered_publishes(sock)
            if self._held and len(self._held) < self.hold_count:
                self._hold(sock)
            self._deliver_held()
            if sock.buffered() == 0:
                return MQTTErrorCode.MQTT_ERR_SUCCESS
        self._deliver_held()  # before anything paho reads itself: messages are delivered in order
        rc = super().loop_read(max_packets)
        burst = 0
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and burst < self.READ_BURST:
            sock = self._sock
            if not isinstance(sock, _BufferedSocket) or sock.buffered() == 0:
                break
            self._take_buffered_publishes(sock)
            self._deliver_held()
            # Back to select as soon as something waits to be written: with a backlog at the broker every read
            # refills the buffer, and the forecasts queued meanwhile would wait (in memory) until the backlog ends.
            if sock.buffered() == 0 or self._out_packet:
                break
            rc = super().loop_read(1)  # the next packet is (at least partly) in memory already: no select needed
            burst += 1
        return rc

    def _take_buffered_publishes(self, sock: _BufferedSocket) -> None:
        """Hand every complete QoS 0/1 PUBLISH at the head of the read buffer to `on_publishes` (then acknowledge
        the QoS 1 ones, as paho does after its callback); stop at anything else (another packet type, QoS 2, a
        packet not wholly read yet, a malformed one), which paho's own reading then takes, in order."""
        if self.on_publishes is None or self._in_packet["command"] != 0 or self._protocol == paho.MQTTv5:
            return  # (MQTT 5 packets carry properties this parser does not read; the link speaks 3.1.1)
        data, pos, end = sock._buffer, sock._pos, len(sock._buffer)
        messages: list[tuple[bytes, bytes]] = []
        acks: list[bytes] = []
        mids: list[int] = []  # acks_deferred: each message's packet id (0: QoS 0), acknowledged once processed
        while pos < end:
            command = data[pos]
            qos = (command >> 1) & 3
            if command & 0xF0 != 0x30 or qos == 2:
                break
            length, shift, i = 0, 0, pos + 1
            while i < end and shift <= 21:
                byte = data[i]
                length |= (byte & 127) << shift
                i += 1
                if byte < 128:
                    break
                shift += 7
            else:
                break  # length not complete in the buffer (or more than 4 bytes: left to paho to refuse)
            packet_end = i + length
            if packet_end > end or length < 2:
                break
            topic_end = i + 2 + ((data[i] << 8) | data[i + 1])
            payload_start = topic_end + (2 if qos else 0)
            if payload_start > packet_end:
                break
            messages.append((data[i + 2 : topic_end], data[payload_start:packet_end]))
            if self.acks_deferred:
                mids.append((data[topic_end] << 8) | data[topic_end + 1] if qos else 0)
            elif qos:
                acks.append(b"\x40\x02" + data[topic_end:payload_start])  # PUBACK with the message id
            pos = packet_end
        if not messages:
            return
        sock._pos = pos
        with self._msgtime_mutex:
            self._last_bytes_received = paho.time_func()
        if not self._held:
            # Messages read right after a delivery may have come while it ran: their hold counts from its start.
            now = time.monotonic()
            busy_from, busy_to = self._last_delivery
            self._held_since = busy_from if now - busy_to < 0.001 else now
        self._held += messages
        self._held_mids += mids
        self._held_acks += acks

    def _hold(self, sock: _BufferedSocket) -> None:
        """A read brought fewer messages than one model call takes: wait until the first of them is `hold_s` old,
        then take whatever came meanwhile. At a steady trickle every message woke this thread and, through the
        ingest queue, the worker; held together, a few messages cost one wake-up of each. Writes do not wait for
        this: forecasts are written by the thread that makes them (plain TCP), the rest after at most `hold_s`."""
        remaining = self._held_since + self.hold_s - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        if sock.buffered() == 0 and sock.fill():
            self._take_buffered_publishes(sock)

    def _deliver_held(self) -> None:
        """Hand the held messages to `on_publishes` (then acknowledge the QoS 1 ones, as paho does after its callback)."""
        if not self._held:
            return
        messages, mids, acks = self._held, self._held_mids, self._held_acks
        self._held, self._held_mids, self._held_acks = [], [], []
        started = time.monotonic()
        try:
            if self.acks_deferred:
                self.on_publishes(messages, mids)
                return
            self.on_publishes(messages)
            if acks:
                self._packet_queue(paho.PUBACK, b"".join(acks), 0, 0)
        finally:
            self._last_delivery = (started, time.monotonic())


def _publish_header(topic_length: int, payload_length: int) -> bytes:
    """Fixed header of a QoS 0 PUBLISH (MQTT 3.1.1 section 3.3) and the topic's 2-byte length."""
    remaining = 2 + topic_length + payload_length
    if remaining > 268_435_455:
        raise ValueError("payload too large")
    header = bytearray(b"\x30")
    while True:
        byte, remaining = remaining % 128, remaining // 128
        header.append(byte | 0x80 if remaining else byte)
        if not remaining:
            break
    header += topic_length.to_bytes(2, "big")
    return bytes(header)


class _TakeoverWatch:
    """Spots another client connected with our client id, from the connections the broker closes.

    Reason code 142 (Session taken over) says so outright; MQTT 3.1.1 brokers (mosquitto) just close the older
    connection, so COUNT connections within WINDOW_S that were each lost within SHORT_S of their connect count
    as a takeover too. An ordinary reconnect (a broker restart, a network blip) is one short connection at most.
    Says so at most once per LOG_EVERY_S: two clients fighting over an id would otherwise log every second.
    """

    SESSION_TAKEN_OVER = 142
    SHORT_S = 5.0
    WINDOW_S = 60.0
    COUNT = 3
    LOG_EVERY_S = 60.0

    def __init__(self, monotonic: Callable[[], float] = time.monotonic):
        self._monotonic = monotonic
        self._short: deque[float] = deque()  # when short-lived connections were lost, within the last WINDOW_S
        self._last_reported: float | None = None

    def lost(self, uptime_s: float | None, reason_value: int | None) -> str | None:
        """A connection was lost `uptime_s` after its connect; returns the evidence when a takeover should be reported now."""
        now = self._monotonic()
        why = None
        if reason_value == self.SESSION_TAKEN_OVER:
            why = "the broker closed the connection with reason code 142 (Session taken over)"
        elif uptime_s is not None and uptime_s <= self.SHORT_S:
            self._short.append(now)
            while self._short and now - self._short[0] > self.WINDOW_S:
                self._short.popleft()
            if len(self._short) >= self.COUNT:
                why = (f"{len(self._short)} connections within {self.WINDOW_S:.0f}s were each closed by the broker within "
                       f"{self.SHORT_S:.0f}s of connecting")
        if why is None or (self._last_reported is not None and now - self._last_reported < self.LOG_EVERY_S):
            return None
        self._last_reported = now
        return why


@dataclass(frozen=True, slots=True)
class Retained:
    """A retained message the link publishes (again) on every successful connect, e.g. the `online` status."""

    topic: str
    payload: bytes
    qos: int = 1


def _literal_heads(filters: list[str]) -> tuple[str, ...]:
    """Each filter's text before its first wildcard (a topic it matches starts with it)."""
    heads = []
    for text in filters:
        cut = min((i for i in (text.find("+"), text.find("#")) if i >= 0), default=len(text))
        heads.append(text[:cut])
    return tuple(heads)


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
        on_ack: Callable[[int], None] | None = None,
        on_connected: Callable[[], None] | None = None,
        control_subscriptions: list[str] | None = None,
        on_control: ControlHandler | None = None,
        on_messages: BatchHandler | None = None,
        hold: tuple[float, int] = (0.0, 1),
    ):
        """`hold` (seconds, count): a read that brings fewer than `count` messages waits until its first is that
        many seconds old and takes what came meanwhile, so that they reach `on_messages` together (_Client._hold)."""
        self._settings = settings
        self._subscriptions = list(subscriptions)
        self._handler = on_message
        self._batch_handler = on_messages
        self._control: list[str] = list(control_subscriptions or [])  # QoS 1, routed to on_control
        self._control_heads = _literal_heads(self._control)  # what a control topic starts with: a cheap first test
        self._control_handler = on_control
        self._sub_topics: dict[int, list[str]] = {}  # SUBSCRIBE mid -> its topics (for the SUBACK log)
        self._on_connect_publish = on_connect_publish
        self._on_ack = on_ack
        self._on_connected = on_connected
        self._clock = clock
        self._retained: dict[str, Retained] = {}  # topic -> latest retained state, republished on connect
        self._retained_lock = threading.Lock()
        self._attempt = 0  # failed connects since the last success (back-off exponent)
        self.connected_at: float | None = None  # monotonic time of the last successful connect
        self.disconnected_at: float | None = None
        self._lock = threading.Condition()
        self._pending: set[int] = set()  # mids of QoS 1 publishes not yet acknowledged
        self._early_acks: dict[int, float] = {}  # acks that overtook publish() returning (mid -> monotonic time)
        self._early_ack_limit = 1024  # next size at which old early acks are pruned (amortized: doubles with the live size)
        self._unsubacks: set[int] = set()  # mids of UNSUBACKs received (one unsubscribe per life)
        self._subscribed = threading.Event()
        self.connected = threading.Event()
        self.connects = 0  # successful connects (the first one included)
        self.disconnects = 0  # lost or closed connections
        self.connect_failures = 0  # attempts that failed (TCP/TLS error or refused by the broker)
        self.dropped_publishes = 0
        self.client_id_conflicts = 0  # takeovers by another client with our client id, as logged
        self._takeover = _TakeoverWatch()
        self._max_pending_forecast_bytes = int(settings.mqtt.max_pending_forecast_mib * 2**20)
        self._last_overflow_log = -1e9  # monotonic time of the last "forecasts dropped" warning (one per 10 s)

        mqtt = settings.mqtt
        problem = mqtt.plaintext_password_problem()
        if problem is not None:
            raise ValueError(problem)
        client = _Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.agent_id,
            protocol=paho.MQTTv311,
            clean_session=not settings.mqtt.at_least_once,  # a persistent session keeps what was not acknowledged
            manual_ack=settings.mqtt.at_least_once,
        )
        client.acks_deferred = settings.mqtt.at_least_once
        client.hold_s, client.hold_count = hold
        paho_log = logging.getLogger("agent.transport.mqtt.paho")
        if self._drop_socket_noise not in paho_log.filters:
            paho_log.addFilter(self._drop_socket_noise)
        client.enable_logger(paho_log)
        self._client = client
        self._set_next_delay()
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
        elif mqtt.has_password():
            log.warning("sending the broker password without TLS to %s (mqtt.plaintext_password = %s)", mqtt.host, mqtt.plaintext_password)
        client.will_set(will.topic, will.payload, qos=will.qos, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_message = self._on_message
        client.on_publishes = self._on_publishes
        client.on_publish = self._on_publish

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

    def network_thread(self) -> threading.Thread | None:
        """paho's network thread, once `start` has started it (the daemon places it on CPUs)."""
        return getattr(self._client, "_thread", None)

    def loop_alive(self) -> bool:
        """paho's network thread is running (it reconnects by itself; if it died, nothing would)."""
        thread = self.network_thread()
        return thread is not None and thread.is_alive()

    def _set_next_delay(self) -> None:
        """Exponential back-off with "equal jitter": half the step is fixed, half random."""
        mqtt = self._settings.mqtt
        step = min(mqtt.reconnect_max_s, mqtt.reconnect_min_s * (2 ** min(self._attempt, 30)))
        delay = step / 2 + random.uniform(0, step / 2)
        # paho waits min_delay before its next attempt when its own exponent is reset, which this call does.
        self._client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]
        self.next_delay_s = delay

    @property
    def reconnects(self) -> int:
        """Connects after the first: each one followed a lost connection."""
        return max(0, self.connects - 1)

    def add_control_subscription(self, topic: str) -> None:
        """Subscribe to `topic` (QoS 1) for the control handler, now if connected and after every reconnect."""
        with self._retained_lock:
            if topic in self._control:
                return
            self._control.append(topic)
            self._control_heads = _literal_heads(self._control)
        if self.connected.is_set():
            self._subscribe([topic], qos=1)

    def remove_control_subscription(self, topic: str) -> None:
        with self._retained_lock:
            if topic not in self._control:
                return
            self._control.remove(topic)
            self._control_heads = _literal_heads(self._control)
        if self.connected.is_set():
            self._client.unsubscribe(topic)

    def _is_control(self, topic: str) -> bool:
        # Checked per sensor message: a sensor topic fails the literal start of every control filter, no lock, no copy.
        if not self._control or not topic.startswith(self._control_heads):
            return False
        with self._retained_lock:
            filters = list(self._control)
        return any(paho.topic_matches_sub(f, topic) for f in filters)

    def _subscribe(self, topics: list[str], qos: int) -> None:
        rc, mid = self._client.subscribe([(topic, qos) for topic in topics])
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.error("subscribe to %s failed: %s", ", ".join(topics), paho.error_string(rc))
            return
        with self._lock:
            self._sub_topics[mid] = list(topics)

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

    def set_retained(self, message: Retained) -> None:
        """Remember `message` as the topic's retained state; publish it now if connected, else on connect."""
        with self._retained_lock:
            self._retained[message.topic] = message
        if self.connected.is_set():
            self.publish(message.topic, message.payload, qos=message.qos, retain=True)

    def publish_many(self, messages: list[tuple[str, bytes]]) -> int:
        """Publish QoS 0 messages (not retained) in order, written to the socket together; returns how many were
        dropped (not connected). Thousands of forecasts a second cost paho a message object, a callback and a
        send each; here each costs a few bytes of header."""
        if not messages:
            return 0
        packets = []
        for topic, payload in messages:
            encoded = topic.encode("utf-8")
            if not encoded or "+" in topic or "#" in topic or "\0" in topic or len(encoded) > 65535:
                raise ValueError(f"invalid topic {topic[:80]!r}")  # what paho's publish raises
            packets.append(_publish_header(len(encoded), len(payload)) + encoded + payload)
        if self._client.queue_raw_packets(b"".join(packets), self._max_pending_forecast_bytes):
            return 0
        self.dropped_publishes += len(messages)
        if self.connected.is_set() and time.monotonic() - self._last_overflow_log > 10.0:
            self._last_overflow_log = time.monotonic()
            log.warning("forecasts dropped: %d bytes already wait for the broker to read them (mqtt.max_pending_forecast_mib); "
                        "%d publishes dropped so far", self._client.raw_pending_bytes(), self.dropped_publishes,
                        extra={"event": "mqtt_overflow", "dropped_publishes": self.dropped_publishes})
        return len(messages)

    def publish_tracked(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        """Publish and return the message id (its ack reaches `on_ack`); None when paho refused it."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            return None
        return info.mid

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
        # QoS 0 completions written by the network thread land here too and never match a pending mid. Pruning
        # scans the whole dict, so it runs only after it doubled: O(1) per publish even at thousands per second.
        if len(self._early_acks) > self._early_ack_limit:
            horizon = time.monotonic() - 5.0
            for mid in [m for m, t in self._early_acks.items() if t < horizon]:
                del self._early_acks[mid]
            self._early_ack_limit = max(1024, 2 * len(self._early_acks))

    # -- paho callbacks (network thread) ---------------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        affinity.name_os_thread("mqtt")  # paho's network thread, as top -H shows it
        mqtt = self._settings.mqtt
        if reason_code.is_failure:
            self._attempt += 1  # back off: retrying a refused login at the shortest delay helps nobody
            self.connect_failures += 1
            log.error(
                "broker %s:%d refused the connection: reason code %s", mqtt.host, mqtt.port, _reason(reason_code),
                extra={"event": "mqtt_connect_refused", "reason_code": getattr(reason_code, "value", None)},
            )
            return
        if self.connects > 0 and self.connected.is_set():
            # paho reconnected without an on_disconnect (the socket failed inside its select): still a lost connection
            self.disconnects += 1
            self.disconnected_at = None
            log.warning(
                "the connection to the broker was lost (socket error, no reason code from the broker)",
                extra={"event": "mqtt_disconnected", "reason_code": None},
            )
            self._check_takeover(None)
        first = self.connects == 0
        self.connects += 1
        self._attempt = 0
        self._set_next_delay()
        self.connected_at = time.monotonic()
        sock = client.socket()
        if sock is not None and hasattr(sock, "setsockopt"):
            try:  # forecasts are small packets: Nagle's algorithm would hold them back for a delayed ACK (~40 ms)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        # A clean session never keeps subscriptions, and a broker that lost its state may claim none: always
        # subscribe again, whatever session_present says.
        if first:
            log.info(
                "connected to the broker %s:%d: reason code %s (session present: %s)", mqtt.host, mqtt.port, _reason(reason_code),
                flags.session_present, extra={"event": "mqtt_connected", "reason_code": reason_code.value},
            )
        else:
            away = None if self.disconnected_at is None else round(self.connected_at - self.disconnected_at, 3)
            log.info(
                "reconnected to the broker %s:%d%s (reconnect #%d): reason code %s", mqtt.host, mqtt.port,
                "" if away is None else f" after {away:.1f}s away", self.reconnects, _reason(reason_code),
                extra={"event": "mqtt_reconnected", "reason_code": reason_code.value, "away_s": away},
            )
        if self._subscriptions:
            self._subscribe(self._subscriptions, qos=mqtt.qos_in)
        else:
            self._subscribed.set()
        with self._retained_lock:
            control = list(self._control)
        if control:
            self._subscribe(control, qos=1)
        if self._on_connect_publish is not None:
            message = self._on_connect_publish()
            if message is not None:  # re-publish `online`: the will may have overwritten it while we were away
                self.publish(message.topic, message.payload, qos=message.qos, retain=True)
        with self._retained_lock:
            retained = list(self._retained.values())
        for message in retained:  # e.g. active-alert lists: a restarted broker without persistence lost them
            self.publish(message.topic, message.payload, qos=message.qos, retain=True)
        self.connected.set()
        if self._on_connected is not None:
            self._on_connected()

    def _on_connect_fail(self, client, userdata) -> None:
        mqtt = self._settings.mqtt
        self._attempt += 1
        self.connect_failures += 1
        self._set_next_delay()
        why = getattr(client, "last_error", None) or "no answer"
        log.warning(
            "cannot connect to the broker at %s:%d (%s); retrying in %.1fs", mqtt.host, mqtt.port, why, self.next_delay_s,
            extra={"event": "mqtt_connect_failed", "error": str(why), "retry_in_s": round(self.next_delay_s, 3)},
        )

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        self._subscribed.clear()
        if was_connected:  # paho also reports a failed connect attempt here; that is not a lost connection
            self.disconnects += 1
            self.disconnected_at = time.monotonic()
        self._set_next_delay()
        if reason_code.is_failure:
            log.warning(
                "disconnected from the broker: reason code %s; reconnecting in %.1fs", _reason(reason_code), self.next_delay_s,
                extra={"event": "mqtt_disconnected", "reason_code": reason_code.value, "retry_in_s": round(self.next_delay_s, 3)},
            )
            if was_connected:
                self._check_takeover(getattr(reason_code, "value", None))
        else:
            log.info(
                "disconnected from the broker: reason code %s", _reason(reason_code),
                extra={"event": "mqtt_disconnected", "reason_code": reason_code.value},
            )

    def _check_takeover(self, reason_value: int | None) -> None:
        """A connection was lost: say so when another client with our client id is probably taking it over."""
        uptime = None if self.connected_at is None else time.monotonic() - self.connected_at
        why = self._takeover.lost(uptime, reason_value)
        if why is None:
            return
        self.client_id_conflicts += 1
        mqtt = self._settings.mqtt
        client_id = self._settings.agent_id
        log.error(
            "client id %r: %s. Another client with the same client id (agent_id %r) is probably connected to the broker "
            "%s:%d; the broker keeps one connection per client id, so the two keep taking it from each other. Give "
            "each agent its own agent_id (and make sure no other program uses this one).",
            client_id, why, client_id, mqtt.host, mqtt.port,
            extra={"event": "mqtt_client_id_conflict", "client_id": client_id, "reason_code": reason_value},
        )

    def _on_subscribe(self, client, userdata, mid, reason_code_list, properties) -> None:
        with self._lock:
            topics = self._sub_topics.pop(mid, [])
        failed = [f"{topic}: reason code {_reason(rc)}" for topic, rc in zip(topics, reason_code_list) if rc.is_failure]
        if failed:
            log.error("the broker refused subscriptions: %s", "; ".join(failed), extra={"event": "mqtt_subscribe_refused"})
        else:
            log.info("subscribed to %s", ", ".join(topics))
        if not topics or any(topic in self._subscriptions for topic in topics):
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
        deferred = self._client.acks_deferred
        mid = message.mid if deferred and message.qos == 1 else 0
        try:
            if self._control_handler is not None and self._is_control(topic):
                self._control_handler(topic, message.payload)
                self.ack_many([mid])
            elif deferred:
                self._handler(topic, message.payload, self._clock(), mid)
            else:
                self._handler(topic, message.payload, self._clock())
        except Exception:  # an exception escaping a callback would end paho's network thread
            log.exception("message handler failed on %r", topic)

    def _on_publishes(self, messages: list[tuple[bytes, bytes]], mids: list[int] | None = None) -> None:
        """The messages of one read, in order: control topics to their handler, the rest to the batch handler
        (with their packet ids when acknowledgements are deferred)."""
        received_at = self._clock()
        batch: list[tuple[str, bytes]] = []
        batch_mids: list[int] | None = [] if mids is not None else None
        for k, (raw_topic, payload) in enumerate(messages):
            try:
                topic = raw_topic.decode("utf-8")
            except UnicodeDecodeError:
                topic = raw_topic.decode("utf-8", "replace")  # mosquitto refuses these; keep a readable name
            if self._control_handler is not None and self._is_control(topic):
                self._deliver(batch, received_at, batch_mids)
                batch = []
                batch_mids = [] if mids is not None else None
                try:
                    self._control_handler(topic, payload)
                except Exception:  # an exception escaping a callback would end paho's network thread
                    log.exception("message handler failed on %r", topic)
                if mids is not None:
                    self.ack_many([mids[k]])
            else:
                batch.append((topic, payload))
                if batch_mids is not None:
                    batch_mids.append(mids[k])
        self._deliver(batch, received_at, batch_mids)

    def _deliver(self, batch: list[tuple[str, bytes]], received_at: float, mids: list[int] | None = None) -> None:
        if not batch:
            return
        if self._batch_handler is not None:
            try:
                if mids is None:
                    self._batch_handler(batch, received_at)
                else:
                    self._batch_handler(batch, received_at, mids)
            except Exception:
                log.exception("message handler failed on a read of %d messages", len(batch))
            return
        for k, (topic, payload) in enumerate(batch):
            try:
                if mids is None:
                    self._handler(topic, payload, received_at)
                else:
                    self._handler(topic, payload, received_at, mids[k])
            except Exception:
                log.exception("message handler failed on %r", topic)

    def ack_many(self, mids: list[int]) -> None:
        """mqtt.at_least_once: acknowledge QoS 1 readings now that they are processed (0s are QoS 0: nothing to
        do). While disconnected nothing is sent: the broker delivers those again (at least once)."""
        packet = b"".join(b"\x40\x02" + mid.to_bytes(2, "big") for mid in mids if mid)
        if not packet or not self.connected.is_set():
            return
        self._client._packet_queue(paho.PUBACK, packet, 0, 0)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if self._on_ack is not None:
            self._on_ack(mid)
        with self._lock:
            if mid in self._pending:
                self._pending.discard(mid)
                if not self._pending:
                    self._lock.notify_all()
            else:
                self._early_acks[mid] = time.monotonic()
                self._forget_old_early_acks()
