"""The embedded MQTT broker (simulation/broker.py: amqtt in a background thread), exercised with real paho
clients, the mosquitto command-line clients and the daemon itself. No mosquitto broker is needed."""

from __future__ import annotations

import queue
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

from conftest import PREFIX, REPO, Broker, healthy_rows, publish_rows
from simulation.broker import EmbeddedBroker

pytestmark = pytest.mark.amqtt
TIMEOUT = 5.0


@pytest.fixture
def broker():
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def mosquitto(broker):
    """conftest's broker fixture, overridden: its probes and daemons (subscriber, start_daemon) use amqtt here."""
    yield Broker("127.0.0.1", broker.port)


class Client:
    """A paho client on its own network thread; received messages and acks land in queues."""

    def __init__(self, port: int, will: tuple[str, bytes, int, bool] | None = None, keepalive: int = 30,
                 client_id: str | None = None, clean_session: bool = True):
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subscribed: queue.Queue[list] = queue.Queue()
        self.connected: queue.Queue = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
                                  clean_session=clean_session, protocol=mqtt.MQTTv311)
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos=qos, retain=retain)
        self.client.on_connect = lambda c, u, flags, rc, props: self.connected.put((flags.session_present, rc))
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.subscribed.put(rcs)
        self.client.connect_async("127.0.0.1", port, keepalive=keepalive)
        self.client.loop_start()
        self.session_present, rc = self.connected.get(timeout=TIMEOUT)
        assert not rc.is_failure, rc

    def subscribe(self, topic_filter: str, qos: int = 0) -> list:
        self.client.subscribe(topic_filter, qos)
        return self.subscribed.get(timeout=TIMEOUT)

    def next_message(self, timeout: float = TIMEOUT) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def assert_silent(self, wait: float = 0.3) -> None:
        with pytest.raises(queue.Empty):
            message = self.messages.get(timeout=wait)
            pytest.fail(f"unexpected message on {message.topic}: {message.payload!r}")

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


def test_start_binds_a_free_port_accepts_connections_and_stop_frees_it():
    """start() returns once the port accepts TCP connections; stop() disconnects clients and closes the port."""
    running = EmbeddedBroker().start()
    port = running.port
    assert port > 0
    client = Client(port)
    lost: queue.Queue = queue.Queue()
    client.client.on_disconnect = lambda c, u, flags, rc, props: lost.put(rc)
    running.stop()
    lost.get(timeout=TIMEOUT)
    client.client.loop_stop()
    assert not running.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    running.stop()  # a second stop is harmless


def test_a_port_in_use_is_reported_as_oserror(broker):
    """Binding a port another broker holds fails with OSError (not a hang, not amqtt's own error type)."""
    with pytest.raises(OSError):
        EmbeddedBroker("127.0.0.1", broker.port).start()


def test_wildcard_subscriptions_receive_matching_publishes_only(clients):
    """`+` matches one level, `#` the level and below (the parent included), in order, with their payloads."""
    subscriber = clients()
    assert [rc.value for rc in subscriber.subscribe("sensors/+/telemetry")] == [0]
    assert [rc.value for rc in subscriber.subscribe("edgecast/#")] == [0]
    publisher = clients()
    publisher.client.publish("sensors/pump-01/telemetry", b"one")
    publisher.client.publish("sensors/pump-01/other", b"not matched")
    publisher.client.publish("sensors/pump-01/x/telemetry", b"not matched either")
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
    """After UNSUBSCRIBE (and its UNSUBACK, which the daemon waits for) the filter no longer delivers."""
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


def test_a_connecting_client_gets_no_retained_messages_of_other_clients_subscriptions(clients):
    """Unpatched amqtt 0.12.1 sends a connecting client the retained messages matching *any* client's filters;
    the wrapper limits that to the client's own subscriptions."""
    publisher = clients()
    publisher.client.publish("edgecast/pump-01/alerts/active", b'{"alerts":[]}', qos=1, retain=True).wait_for_publish(TIMEOUT)
    watcher = clients()
    watcher.subscribe("edgecast/#", qos=1)
    assert watcher.next_message().retain
    newcomer = clients()  # connects while watcher holds `edgecast/#`
    newcomer.subscribe("other/topic", qos=1)
    newcomer.assert_silent(0.5)


def test_will_is_published_and_retained_when_the_socket_closes_abruptly(broker, clients):
    """Closing the TCP connection without DISCONNECT publishes the client's (retained) last will."""
    watcher = clients()
    watcher.subscribe("edgecast/agent/+/status", qos=1)
    dying = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dying")
    dying.will_set("edgecast/agent/dying/status", b'{"state":"offline"}', qos=1, retain=True)
    connected: list = []
    dying.on_connect = lambda c, u, flags, rc, props: connected.append(rc)
    dying.connect("127.0.0.1", broker.port, keepalive=30)
    deadline = time.monotonic() + TIMEOUT
    while not connected and time.monotonic() < deadline:
        dying.loop(timeout=0.05)
    assert connected and not connected[0].is_failure
    dying.socket().close()  # abrupt: no DISCONNECT packet

    will = watcher.next_message()
    assert (will.topic, will.payload, will.qos) == ("edgecast/agent/dying/status", b'{"state":"offline"}', 1)
    late = clients()
    late.subscribe("edgecast/agent/dying/status")
    retained = late.next_message()
    assert retained.retain and retained.payload == b'{"state":"offline"}'


def test_clean_disconnect_does_not_publish_the_will(clients):
    """A client that sends DISCONNECT leaves without its will being published."""
    watcher = clients()
    watcher.subscribe("wills/#")
    leaving = clients(will=("wills/leaving", b"gone", 0, False))
    leaving.close()
    watcher.assert_silent(0.5)


def test_will_is_published_when_keepalive_expires(broker, clients):
    """A client silent for 1.5 x its keepalive is dropped by the broker and its will published (amqtt alone never drops it)."""
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
        raw.sendall(bytes([0x10, len(body)]) + body)
        assert raw.recv(4) == b"\x20\x02\x00\x00"
        started = time.monotonic()
        message = watcher.next_message()  # the broker, not the client, ends this connection
        assert (message.topic, message.payload) == ("wills/silent", b"expired")
        assert 1.4 <= time.monotonic() - started < 5.0  # 1.5 x the keepalive, in whole seconds: 2 s
        assert raw.recv(1) == b""  # connection closed by the broker


def test_qos1_publish_is_acknowledged_and_delivered(clients):
    """QoS 1 publishes get a PUBACK; a QoS 1 subscriber gets them at QoS 1, a QoS 0 subscriber at QoS 0."""
    at_most_once = clients()
    assert [rc.value for rc in at_most_once.subscribe("q/#", qos=0)] == [0]
    at_least_once = clients()
    assert [rc.value for rc in at_least_once.subscribe("q/#", qos=1)] == [1]
    publisher = clients()
    info = publisher.client.publish("q/x", b"payload", qos=1)
    info.wait_for_publish(TIMEOUT)  # returns only once the broker's PUBACK arrived
    assert info.is_published()
    assert at_most_once.next_message().qos == 0
    assert at_least_once.next_message().qos == 1


def test_many_qos1_messages_arrive_in_order(clients):
    """A burst of QoS 1 readings (the simulator's warm-up burst) arrives complete and in order."""
    subscriber = clients()
    subscriber.subscribe("sensors/+/telemetry", qos=1)
    publisher = clients()
    infos = [publisher.client.publish("sensors/pump-00/telemetry", str(i).encode(), qos=1) for i in range(500)]
    for info in infos:
        info.wait_for_publish(TIMEOUT)
    assert [int(subscriber.next_message().payload) for _ in range(500)] == list(range(500))


def test_large_payload_crosses_the_broker_intact(clients):
    """A 100 KB payload (3-byte remaining length) arrives byte for byte."""
    subscriber = clients()
    subscriber.subscribe("big", qos=1)
    payload = bytes(range(256)) * 400  # 102,400 bytes
    clients().client.publish("big", payload, qos=1)
    assert subscriber.next_message().payload == payload


def test_persistent_session_keeps_subscriptions_and_queues_qos1_while_away(clients):
    """clean_session=False (the daemon's mqtt.at_least_once): the session survives a disconnect, and QoS 1
    messages published meanwhile are delivered on reconnect."""
    first = clients(client_id="persistent-agent", clean_session=False)
    assert first.session_present is False
    first.subscribe("sensors/+/telemetry", qos=1)
    first.close()
    publisher = clients()
    time.sleep(1.5)  # amqtt's session monitor runs every second: the session must outlive it
    publisher.client.publish("sensors/pump-00/telemetry", b"while away", qos=1).wait_for_publish(TIMEOUT)
    again = clients(client_id="persistent-agent", clean_session=False)
    assert again.session_present is True
    message = again.next_message()
    assert (message.topic, message.payload, message.qos) == ("sensors/pump-00/telemetry", b"while away", 1)


@pytest.mark.skipif(not (shutil.which("mosquitto_pub") and shutil.which("mosquitto_sub")), reason="mosquitto-clients not installed")
def test_mosquitto_command_line_clients_work_against_it(broker):
    """mosquitto_sub receives what mosquitto_pub publishes (QoS 1), and a retained message."""
    port = str(broker.port)
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-t", "cli/retained", "-m", "kept", "-r", "-q", "1"],
                   check=True, timeout=TIMEOUT)
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-t", "cli/#", "-q", "1", "-v", "-C", "2"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:  # until the subscription exists (its retained message proves it), publish again
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-t", "cli/live", "-m", "hello", "-q", "1"],
                           check=True, timeout=TIMEOUT)
            try:
                out, _ = sub.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                assert time.monotonic() < deadline, "mosquitto_sub received nothing"
        lines = out.splitlines()
        assert lines[0] == "cli/retained kept" and lines[1] == "cli/live hello", out
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()


def test_cli_serves_until_sigterm():
    """`python -m training broker --port 0` says which port it got, relays messages and exits 0 on SIGTERM."""
    process = subprocess.Popen([sys.executable, "-m", "training", "broker", "--port", "0"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = process.stdout.readline()
        listening = re.search(r"listening on 127\.0\.0\.1:(\d+) ", first)
        assert listening, first + (process.stdout.read() if process.poll() is not None else "")
        client = Client(int(listening[1]))
        client.subscribe("cli/#")
        client.client.publish("cli/test", b"relayed")
        assert client.next_message().payload == b"relayed"
        client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_daemon_runs_on_it_forecasts_alerts_retained_status_and_last_will(start_daemon, subscriber, make_probe):
    """`python -m agent run` on amqtt: online status (retained), forecasts, an alert for a fault, and on a kill the
    last will (retained `offline`)."""
    daemon = start_daemon()
    daemon.wait_online(subscriber)
    status_topic = f"{PREFIX}/agent/test-agent/status"
    late = make_probe(subscribe=status_topic)
    retained = late.expect(status_topic, timeout=10)
    assert retained.retain and retained.json()["state"] == "online"

    rows = healthy_rows(devices=1, rows=150, seed=8, faults="spikes:pump-00@1.5+2")
    publish_rows(subscriber, rows)
    forecast = subscriber.expect(f"{PREFIX}/pump-00/forecast", timeout=20).json()
    assert forecast["device"] == "pump-00" and forecast["forecast"]
    alert = subscriber.expect(f"{PREFIX}/pump-00/alert", lambda m: m.json()["state"] == "new", timeout=30)
    assert alert.qos == 1 and alert.json()["device"] == "pump-00"
    active = make_probe(subscribe=f"{PREFIX}/pump-00/alerts/active").expect(f"{PREFIX}/pump-00/alerts/active", timeout=10)
    assert active.retain and active.json()["device"] == "pump-00"
    assert not [m.topic for m in subscriber.history if m.topic.startswith(f"{PREFIX}/agent/") and m.topic.endswith("/errors")]

    daemon.signal(signal.SIGKILL)  # no goodbye: the broker publishes the will
    will = subscriber.expect(status_topic, lambda m: m.json()["state"] == "offline", timeout=10)
    assert will.qos == 1
    after = make_probe(subscribe=status_topic).expect(status_topic, timeout=10)
    assert after.retain and after.json()["state"] == "offline"


def test_the_daemon_says_offline_on_sigterm_with_at_least_once(start_daemon, subscriber):
    """With mqtt.at_least_once (persistent session, manual acks) the daemon serves forecasts on amqtt, and a
    SIGTERM leaves the retained status `offline` (a clean stop, exit code 0)."""
    daemon = start_daemon(env={"EDGECAST_MQTT__AT_LEAST_ONCE": "true"})
    daemon.wait_online(subscriber)
    publish_rows(subscriber, healthy_rows(devices=1, rows=65, seed=3))
    subscriber.expect(f"{PREFIX}/pump-00/forecast", timeout=20)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0
    subscriber.expect(f"{PREFIX}/agent/test-agent/status", lambda m: m.json()["state"] == "offline", timeout=10)
