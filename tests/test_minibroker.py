"""The embedded MQTT broker (training/minibroker.py), exercised with real paho clients over TCP."""

from __future__ import annotations

import queue
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from training.minibroker import (
    EmbeddedBroker,
    ProtocolError,
    decode_remaining_length,
    encode_remaining_length,
    topic_matches,
    valid_topic_filter,
)

TIMEOUT = 5.0


@pytest.fixture
def broker():
    with EmbeddedBroker() as running:
        yield running


class Client:
    """A paho client on its own network thread; received messages and acks land in queues."""

    def __init__(self, port: int, will: tuple[str, bytes, int, bool] | None = None, keepalive: int = 30):
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.published: queue.Queue[int] = queue.Queue()
        self.subscribed: queue.Queue[list] = queue.Queue()
        self.connected: queue.Queue = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}")
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos=qos, retain=retain)
        self.client.on_connect = lambda c, u, flags, rc, props: self.connected.put(rc)
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.client.on_publish = lambda c, u, mid, rc, props: self.published.put(mid)
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.subscribed.put(rcs)
        self.client.connect_async("127.0.0.1", port, keepalive=keepalive)
        self.client.loop_start()
        rc = self.connected.get(timeout=TIMEOUT)
        assert not rc.is_failure, rc

    def subscribe(self, topic_filter: str, qos: int = 0) -> list:
        self.client.subscribe(topic_filter, qos)
        return self.subscribed.get(timeout=TIMEOUT)

    def next_message(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def assert_silent(self, wait: float = 0.3) -> None:
        with pytest.raises(queue.Empty):
            self.messages.get(timeout=wait)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients(broker):
    made: list[Client] = []

    def make(**kwargs) -> Client:
        made.append(Client(broker.port, **kwargs))
        return made[-1]

    yield make
    for client in made:
        client.close()


def test_remaining_length_round_trips_at_every_size_boundary():
    """Remaining lengths use 1-4 bytes with the continuation bit and decode to the same value."""
    for length, size in [(0, 1), (127, 1), (128, 2), (16_383, 2), (16_384, 3), (2_097_151, 3), (2_097_152, 4), (268_435_455, 4)]:
        encoded = encode_remaining_length(length)
        assert len(encoded) == size
        assert decode_remaining_length(encoded) == (length, size)
    with pytest.raises(ValueError):
        encode_remaining_length(268_435_456)
    with pytest.raises(ProtocolError):
        decode_remaining_length(b"\xff\xff\xff\xff\x01")


def test_topic_matching_follows_wildcard_and_dollar_rules():
    """`+` matches one level, `#` the level and below (parent included); wildcards do not open `$` topics."""
    assert topic_matches("sensors/+/telemetry", "sensors/pump-01/telemetry")
    assert not topic_matches("sensors/+/telemetry", "sensors/pump-01/x/telemetry")
    assert topic_matches("edgecast/#", "edgecast/pump-01/alerts/active")
    assert topic_matches("edgecast/#", "edgecast")
    assert topic_matches("#", "a/b")
    assert not topic_matches("#", "$SYS/uptime")
    assert not topic_matches("+/uptime", "$SYS/uptime")
    assert topic_matches("$SYS/#", "$SYS/uptime")
    assert not valid_topic_filter("a/#/b") and not valid_topic_filter("a/b+") and valid_topic_filter("+/+/#")


def test_wildcard_subscriptions_receive_matching_publishes_only(clients):
    """A subscriber gets exactly the publishes its `+` / `#` filters match, in order, with their payloads."""
    subscriber = clients()
    assert [rc.value for rc in subscriber.subscribe("sensors/+/telemetry")] == [0]
    assert [rc.value for rc in subscriber.subscribe("edgecast/#")] == [0]
    publisher = clients()
    publisher.client.publish("sensors/pump-01/telemetry", b"one")
    publisher.client.publish("sensors/pump-01/other", b"not matched")
    publisher.client.publish("edgecast/pump-02/alerts/active", b"two")
    publisher.client.publish("edgecast", b"three")
    received = [subscriber.next_message() for _ in range(3)]
    assert [(m.topic, m.payload) for m in received] == [
        ("sensors/pump-01/telemetry", b"one"),
        ("edgecast/pump-02/alerts/active", b"two"),
        ("edgecast", b"three"),
    ]
    subscriber.assert_silent()


def test_unsubscribe_stops_delivery(clients):
    """After UNSUBSCRIBE the filter no longer delivers."""
    subscriber = clients()
    subscriber.subscribe("a/#")
    publisher = clients()
    publisher.client.publish("a/b", b"1")
    assert subscriber.next_message().payload == b"1"
    done: queue.Queue = queue.Queue()
    subscriber.client.on_unsubscribe = lambda c, u, mid, rcs, props: done.put(mid)
    subscriber.client.unsubscribe("a/#")
    done.get(timeout=TIMEOUT)
    publisher.client.publish("a/b", b"2")
    subscriber.assert_silent()


def test_retained_message_reaches_late_subscriber_and_empty_payload_clears_it(clients):
    """A retained publish is delivered (retain flag set) to later subscribers; an empty retained payload clears it."""
    publisher = clients()
    publisher.client.publish("edgecast/agent/a1/status", b'{"state":"online"}', qos=1, retain=True).wait_for_publish(TIMEOUT)
    late = clients()
    late.subscribe("edgecast/agent/+/status", qos=1)
    message = late.next_message()
    assert (message.topic, message.payload, message.retain, message.qos) == ("edgecast/agent/a1/status", b'{"state":"online"}', True, 1)

    # Live delivery to an existing subscriber carries retain = 0.
    publisher.client.publish("edgecast/agent/a1/status", b'{"state":"busy"}', qos=1, retain=True)
    live = late.next_message()
    assert (live.payload, live.retain) == (b'{"state":"busy"}', False)

    publisher.client.publish("edgecast/agent/a1/status", b"", qos=1, retain=True).wait_for_publish(TIMEOUT)
    assert late.next_message().payload == b""
    after_clear = clients()
    after_clear.subscribe("edgecast/#")
    after_clear.assert_silent()


def test_will_is_published_and_retained_when_the_socket_closes_abruptly(broker, clients):
    """Closing the TCP connection without DISCONNECT publishes the client's (retained) last will."""
    watcher = clients()
    watcher.subscribe("edgecast/agent/+/status", qos=1)
    dying = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dying")
    dying.will_set("edgecast/agent/dying/status", b'{"state":"offline"}', qos=1, retain=True)
    dying.connect("127.0.0.1", broker.port, keepalive=30)
    connected: list = []
    dying.on_connect = lambda c, u, flags, rc, props: connected.append(rc)
    deadline = time.monotonic() + TIMEOUT
    while not connected and time.monotonic() < deadline:
        dying.loop(timeout=0.05)
    assert connected and not connected[0].is_failure
    dying.socket().close()  # abrupt: no DISCONNECT packet

    will = watcher.next_message()
    assert (will.topic, will.payload, will.qos) == ("edgecast/agent/dying/status", b'{"state":"offline"}', 1)
    late = clients()
    late.subscribe("edgecast/agent/dying/status")
    assert late.next_message().retain


def test_clean_disconnect_does_not_publish_the_will(clients):
    """A client that sends DISCONNECT leaves without its will being published."""
    watcher = clients()
    watcher.subscribe("wills/#")
    leaving = clients(will=("wills/leaving", b"gone", 0, False))
    leaving.close()
    watcher.assert_silent(0.5)


def test_will_is_published_when_keepalive_expires(broker, clients):
    """A client silent for 1.5 x its keepalive is dropped and its will published."""
    watcher = clients()
    watcher.subscribe("wills/#")
    will_topic, will_payload = b"wills/silent", b"expired"
    flags = 0x02 | 0x04  # clean session, will (QoS 0, not retained)
    body = (
        struct.pack("!H", 4) + b"MQTT" + bytes([4, flags]) + struct.pack("!H", 1)  # keepalive 1 s
        + struct.pack("!H", 6) + b"silent"
        + struct.pack("!H", len(will_topic)) + will_topic + struct.pack("!H", len(will_payload)) + will_payload
    )
    with socket.create_connection(("127.0.0.1", broker.port), timeout=TIMEOUT) as raw:
        raw.sendall(bytes([0x10]) + encode_remaining_length(len(body)) + body)
        assert raw.recv(4) == b"\x20\x02\x00\x00"
        started = time.monotonic()
        message = watcher.next_message()  # the broker, not the client, ends this connection
        assert (message.topic, message.payload) == ("wills/silent", b"expired")
        assert 1.4 <= time.monotonic() - started < 3.0
        assert raw.recv(1) == b""  # connection closed by the broker


def test_qos1_publish_is_acknowledged_and_delivered_at_granted_qos(clients):
    """QoS 1 publishes get a PUBACK; delivery uses min(publish qos, granted qos); QoS 2 requests are granted 1."""
    at_most_once = clients()
    assert [rc.value for rc in at_most_once.subscribe("q/#", qos=0)] == [0]
    at_least_once = clients()
    assert [rc.value for rc in at_least_once.subscribe("q/#", qos=2)] == [1]
    publisher = clients()
    info = publisher.client.publish("q/x", b"payload", qos=1)
    info.wait_for_publish(TIMEOUT)  # returns only once the broker's PUBACK arrived
    assert info.is_published()
    assert at_most_once.next_message().qos == 0
    assert at_least_once.next_message().qos == 1
    qos2 = publisher.client.publish("q/y", b"exactly once", qos=2)
    qos2.wait_for_publish(TIMEOUT)  # PUBREC / PUBREL / PUBCOMP completed
    message = at_least_once.next_message()
    assert (message.payload, message.qos) == (b"exactly once", 1)
    at_least_once.assert_silent()


def test_large_payload_crosses_the_broker_intact(clients):
    """A 100 KB payload (3-byte remaining length) arrives byte for byte."""
    subscriber = clients()
    subscriber.subscribe("big", qos=1)
    payload = bytes(range(256)) * 400  # 102,400 bytes
    clients().client.publish("big", payload, qos=1)
    assert subscriber.next_message().payload == payload


def test_packet_over_the_size_limit_closes_the_connection():
    """A packet larger than max_packet_size is refused by closing the connection, and the broker keeps serving."""
    with EmbeddedBroker(max_packet_size=1024) as small:
        with socket.create_connection(("127.0.0.1", small.port), timeout=TIMEOUT) as raw:
            raw.sendall(bytes([0x10]) + encode_remaining_length(10_000))
            assert raw.recv(1) == b""
        survivor = Client(small.port)
        survivor.subscribe("ok")
        survivor.client.publish("ok", b"x" * 500)
        assert survivor.next_message().payload == b"x" * 500
        survivor.close()


def test_unsupported_protocol_level_is_refused_with_connack_code_1(broker):
    """A CONNECT with an unknown protocol level gets CONNACK 'unacceptable protocol version'."""
    body = struct.pack("!H", 4) + b"MQTT" + bytes([5, 0x02]) + struct.pack("!H", 30) + struct.pack("!H", 1) + b"x"
    with socket.create_connection(("127.0.0.1", broker.port), timeout=TIMEOUT) as raw:
        raw.sendall(bytes([0x10]) + encode_remaining_length(len(body)) + body)
        assert raw.recv(4) == b"\x20\x02\x00\x01"


def test_mqtt_31_clients_are_accepted(broker):
    """Protocol level 3 (MQIsdp) clients connect and exchange messages."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv31, client_id="old-client")
    got: queue.Queue = queue.Queue()
    client.on_connect = lambda c, u, flags, rc, props: c.subscribe("old/#")
    client.on_subscribe = lambda c, u, mid, rcs, props: c.publish("old/topic", b"hello")
    client.on_message = lambda c, u, msg: got.put(msg.payload)
    client.connect_async("127.0.0.1", broker.port)
    client.loop_start()
    try:
        assert got.get(timeout=TIMEOUT) == b"hello"
    finally:
        client.disconnect()
        client.loop_stop()


def test_stop_closes_client_connections_and_frees_the_port():
    """stop() disconnects clients and closes the listening socket."""
    running = EmbeddedBroker().start()
    port = running.port
    client = Client(port)
    lost: queue.Queue = queue.Queue()
    client.client.on_disconnect = lambda c, u, flags, rc, props: lost.put(rc)
    running.stop()
    lost.get(timeout=TIMEOUT)
    client.client.loop_stop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def test_persistent_session_request_is_served_as_a_clean_session(broker):
    """clean_session=False is accepted but answered with session present = 0 (nothing is kept between connections)."""
    flags_seen: queue.Queue = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="wants-persistence", clean_session=False)
    client.on_connect = lambda c, u, flags, rc, props: flags_seen.put((flags.session_present, rc))
    client.connect_async("127.0.0.1", broker.port)
    client.loop_start()
    try:
        session_present, rc = flags_seen.get(timeout=TIMEOUT)
        assert not rc.is_failure and session_present is False
    finally:
        client.disconnect()
        client.loop_stop()


def test_cli_serves_until_sigterm(tmp_path):
    """`python -m training broker --port N` relays messages and exits 0 on SIGTERM."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    repo = Path(__file__).resolve().parent.parent
    process = subprocess.Popen([sys.executable, "-m", "training", "broker", "--port", str(port)], cwd=repo,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "listening on 127.0.0.1:%d" % port in process.stdout.readline()
        client = Client(port)
        client.subscribe("cli/#")
        client.client.publish("cli/test", b"relayed")
        assert client.next_message().payload == b"relayed"
        client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(TIMEOUT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
