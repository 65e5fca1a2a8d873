"""Logging: readable text by default, JSON lines on request, journald-friendly, connection events with reason codes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import REPO, wait_until

from agent.ops.logs import JsonFormatter, make_formatter


def record(message: str, level: int = logging.INFO, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("agent.transport.mqtt", level, __file__, 1, message, (), None)
    rec.__dict__.update(extra)
    return rec


def test_json_lines_carry_level_logger_message_and_event_fields():
    """log.format = json: one object per line with ts, level, logger, message and the extra= event fields."""
    line = JsonFormatter().format(record("reconnected after %s", event="mqtt_reconnected", reason_code=0))
    body = json.loads(line)
    assert body["level"] == "INFO" and body["logger"] == "agent.transport.mqtt" and body["event"] == "mqtt_reconnected"
    assert body["reason_code"] == 0 and body["ts"].endswith("Z") and "\n" not in line


def test_under_journald_no_timestamps_and_text_lines_carry_a_priority():
    """With JOURNAL_STREAM set the journal stamps lines itself: no ts; text lines start with <priority> for journalctl -p."""
    assert "ts" not in json.loads(make_formatter("json", journald=True).format(record("x")))
    assert make_formatter("text", journald=True).format(record("boom", logging.ERROR)) == "<3>ERROR agent.transport.mqtt: boom"
    plain = make_formatter("text", journald=False).format(record("hello"))
    assert plain[:4].isdigit() and plain.endswith("INFO agent.transport.mqtt: hello")


def test_json_format_turns_python_and_numpy_warnings_into_json_lines():
    """log.format = json: warnings.warn and numpy RuntimeWarnings come out as JSON objects, never as raw stderr lines."""
    code = (
        "import warnings, logging, numpy as np\n"
        "from agent.ops.logs import configure_logging\n"
        "configure_logging('INFO', 'json')\n"
        "np.log(np.zeros(2))\n"  # RuntimeWarning: divide by zero
        "np.float32(1e39)\n"  # RuntimeWarning: overflow (numpy >= 2) or silently inf
        "warnings.warn('plain python warning')\n"
        "logging.getLogger('agent.test').info('after the warnings')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "JOURNAL_STREAM")}
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    bodies = []
    for line in lines:
        try:
            bodies.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"a raw line in the JSON log: {line!r}\n{result.stderr}")
    warned = [b for b in bodies if b["logger"] == "py.warnings"]
    assert any("divide by zero" in b["message"] and "RuntimeWarning" in b["message"] for b in warned), bodies
    assert any("plain python warning" in b["message"] for b in warned) and all(b["level"] == "WARNING" for b in warned)
    assert bodies[-1]["message"] == "after the warnings"


@pytest.mark.mqtt
def test_daemon_writes_json_lines_with_the_connect_reason_code(start_daemon, make_probe):
    """A daemon with EDGECAST_LOG__FORMAT=json logs only JSON objects; the connect line carries reason code 0."""
    daemon = start_daemon(env={"EDGECAST_LOG__FORMAT": "json"})
    probe = make_probe("#")
    daemon.wait_online(probe)
    wait_until(lambda: "mqtt_connected" in daemon.log(), timeout=10, message="the connect log line")
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.strip()]
    connected = [line for line in lines if line.get("event") == "mqtt_connected"]
    assert connected and connected[0]["reason_code"] == 0 and "reason code 0 (Success)" in connected[0]["message"]
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)


@pytest.mark.mqtt
def test_disconnect_and_reconnect_are_logged_with_reason_codes(agent_settings, restartable_broker, caplog):
    """The broker dies and comes back: the disconnect is logged with its reason code, the reconnect with the time away."""
    from agent.app import Agent

    agent = Agent(agent_settings(mqtt={"port": restartable_broker.port}))
    with caplog.at_level(logging.INFO, logger="agent.transport.mqtt"):
        agent.start()
        try:
            assert agent.wait_connected(10)
            restartable_broker.kill()
            wait_until(lambda: agent.link.disconnects == 1, timeout=20, message="the disconnect")
            restartable_broker.start()
            wait_until(lambda: agent.link.reconnects == 1 and agent.link.connected.is_set(), timeout=20, message="a reconnect")
        finally:
            agent.stop()
    events: dict = {}
    for r in caplog.records:  # the first of each kind (the clean disconnect at stop() comes last)
        events.setdefault(r.__dict__.get("event"), r)
    disconnected = events["mqtt_disconnected"]
    assert disconnected.levelno == logging.WARNING and isinstance(disconnected.reason_code, int) and disconnected.reason_code >= 128
    assert "reason code" in disconnected.getMessage()
    reconnected = events["mqtt_reconnected"]
    assert reconnected.reason_code == 0 and "reconnect #1" in reconnected.getMessage() and reconnected.away_s > 0


@pytest.mark.mqtt
def test_a_refused_connection_is_logged_with_its_reason_code(agent_settings, tmp_path, caplog):
    """A broker that refuses anonymous clients: the log says `reason code 135 (Not authorized)`."""
    from conftest import run_mosquitto

    from agent.app import Agent

    with run_mosquitto(tmp_path / "closed-broker", "allow_anonymous false\n") as broker:
        agent = Agent(agent_settings(mqtt={"port": broker.port}))
        with caplog.at_level(logging.INFO, logger="agent.transport.mqtt"):
            agent.start()
            try:
                wait_until(lambda: agent.link.connect_failures >= 1, timeout=10, message="a refused connect")
            finally:
                agent.stop()
    refused = [r for r in caplog.records if r.__dict__.get("event") == "mqtt_connect_refused"]
    assert refused and refused[0].reason_code == 135 and "135 (Not authorized)" in refused[0].getMessage()
