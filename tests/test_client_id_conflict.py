"""Two clients with the agent's client id take the connection from each other: the agent says so in an ERROR."""

from __future__ import annotations

import contextlib
import logging
import queue

import paho.mqtt.client as paho
import pytest
from conftest import AGENT_ID, Broker, wait_until
from paho.mqtt.enums import CallbackAPIVersion

from agent.transport.mqtt import _TakeoverWatch


def intrude(broker: Broker, client_id: str) -> paho.Client:
    """Connect a plain client (no network thread, so it never reconnects by itself) and wait for its CONNACK."""
    connacks: queue.Queue = queue.Queue()
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    client.on_connect = lambda c, userdata, flags, reason_code, properties: connacks.put(reason_code)

    def answered() -> bool:
        client.loop(timeout=0.05)
        return not connacks.empty()

    client.connect(broker.host, broker.port, keepalive=30)
    wait_until(answered, timeout=10, message=f"a CONNACK for {client_id}")
    assert not connacks.get().is_failure
    return client


def conflicts(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.__dict__.get("event") == "mqtt_client_id_conflict"]


@pytest.mark.mqtt
def test_repeated_takeovers_by_a_client_with_the_agent_id_are_logged_as_an_error(start_agent, mosquitto, caplog):
    """Another client connecting with the agent_id again and again is logged at ERROR naming the id; one takeover is not."""
    with caplog.at_level(logging.INFO, logger="agent.transport.mqtt"):
        agent = start_agent()
        for kick in range(1, 4):
            wait_until(agent.link.connected.is_set, timeout=10, message="the agent (re)connected")
            intruder = intrude(mosquitto, AGENT_ID)  # mosquitto (MQTT 3.1.1) closes the agent's connection
            wait_until(lambda: agent.link.disconnects == kick, timeout=10, message=f"takeover #{kick} of the agent's connection")
            with contextlib.suppress(Exception):
                intruder.disconnect()
            if kick == 1:
                assert not conflicts(caplog), "a single lost connection is an ordinary reconnect"
        found = wait_until(lambda: conflicts(caplog), timeout=10, message="the client id conflict error")
        wait_until(agent.link.connected.is_set, timeout=10, message="the agent reconnected")
    assert len(found) == 1 and found[0].levelno == logging.ERROR
    text = found[0].getMessage()
    assert AGENT_ID in text and "same client id" in text and "own agent_id" in text


def test_takeover_watch_reason_142_short_connections_and_ordinary_reconnects():
    """Reason code 142 or 3 connections lost within 5 s of connecting inside a minute are a takeover; sparse or long-lived losses are not."""
    clock = [100.0]
    watch = _TakeoverWatch(monotonic=lambda: clock[0])
    assert watch.lost(3600.0, 142) is not None, "Session taken over says so outright"

    watch = _TakeoverWatch(monotonic=lambda: clock[0])
    for _ in range(5):  # a broker restarting every 30 s, the agent connected for 30 s each time
        clock[0] += 30.0
        assert watch.lost(30.0, 128) is None
    for _ in range(4):  # one short connection every 40 s: never 3 within a minute
        clock[0] += 40.0
        assert watch.lost(0.5, 128) is None
    clock[0] += 40.0
    assert watch.lost(0.5, 128) is None
    clock[0] += 1.0
    assert watch.lost(0.5, 128) is not None, "the third short connection within 60 s"
    clock[0] += 1.0
    assert watch.lost(0.5, 128) is None, "reported at most once a minute"
    clock[0] += 60.0
    for _ in range(2):
        clock[0] += 1.0
        watch.lost(0.5, 128)
    assert watch.lost(0.5, 128) is not None, "still fighting a minute later: reported again"
