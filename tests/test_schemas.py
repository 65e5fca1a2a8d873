"""The JSON Schemas shipped in agent/schemas validate everything a running daemon really reads and publishes."""

from __future__ import annotations

import json
import shutil

import paho.mqtt.client as paho
import pytest
from conftest import AGENT_ID, PREFIX, healthy_rows, publish_rows, wait_until

pytestmark = pytest.mark.mqtt
import jsonschema  # noqa: E402  (dev extra)
try:
    import prometheus_client
except ImportError:  # the metrics part of the test needs the metrics extra
    prometheus_client = None

from agent.schemas import SCHEMAS, load_schema  # noqa: E402

ROLLOUT_TOPIC = "edgecast/models/schema-test"
BROKEN = b"{broken"  # the one input sent on purpose against its schema
TOPIC_SCHEMAS = [  # most specific first
    (f"{PREFIX}/+/command/result", "command_result"),
    (f"{PREFIX}/+/command", "command"),
    (f"{PREFIX}/agent/+/status", "status"),
    (f"{PREFIX}/agent/+/errors", "error"),
    (f"{PREFIX}/+/forecast", "forecast"),
    (f"{PREFIX}/+/alert", "alert"),
    (f"{PREFIX}/+/alerts/active", "alerts_active"),
    ("sensors/+/telemetry", "telemetry"),
    ("sensors/+/+", "sensor"),
    ("homeassistant/+/+/+/config", "hass_discovery"),
    (ROLLOUT_TOPIC, "model_descriptor"),
]


def schema_for(topic: str) -> str | None:
    return next((name for pattern, name in TOPIC_SCHEMAS if paho.topic_matches_sub(pattern, topic)), None)


def validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema(name), format_checker=jsonschema.FormatChecker())


def test_every_schema_is_valid_draft_2020_12_and_shipped_as_package_data():
    """Each schema file parses and is itself a valid JSON Schema; pyproject ships agent/schemas/*.json."""
    for name in SCHEMAS:
        jsonschema.Draft202012Validator.check_schema(load_schema(name))
    from conftest import REPO

    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"agent.schemas" = ["*.json"]' in pyproject and '"agent.schemas"' in pyproject.split("packages =")[1].splitlines()[0]


def test_schemas_reject_what_the_contract_forbids():
    """The schemas are not vacuous: a missing field, a wrong enum or a wrong type fails validation."""
    assert not validator("forecast").is_valid({"device": "d", "ts": 1})
    alert = {"alert_id": "d-1-abcdef", "device": "d", "state": "new", "severity": "warning", "anomaly_score": 0.6, "score": 4.0,
             "threshold": 3.0, "ts": 2, "started_at": 1, "ended_at": None, "features": [], "model": {"name": "m", "version": "1"}}
    assert validator("alert").is_valid(alert)
    assert not validator("alert").is_valid({**alert, "state": "open"})
    assert not validator("alert").is_valid({**alert, "state": "end"})  # an end carries ended_at
    assert not validator("status").is_valid({"state": "online", "agent_id": "a", "version": "1", "ts": 1, "model": {"name": "m", "version": "1", "sha256": "xyz"}})
    assert not validator("error").is_valid({"ts": 1, "topic": None, "device": None, "reason": "oops", "detail": "", "suppressed": 0})
    assert not validator("telemetry").is_valid({"ts": 1, "values": {"a": "1"}})


def test_live_traffic_of_a_running_daemon_matches_the_schemas(start_agent, subscriber, mosquitto, model_path, tmp_path):
    """Input, forecasts, alerts, active lists, status (online, swap, failed reload, last will), errors, discovery and the
    rollout descriptor, as they cross the broker, all validate against their schemas."""
    from agent.core import signing
    from training.publish_model import publish_bundle

    secret = signing.generate_secret()
    (tmp_path / "key").write_text(secret.hex())
    folder = tmp_path / "model"
    shutil.copytree(model_path, folder)
    agent = start_agent(
        model={"path": str(folder), "reload_poll_s": 0, "public_key": signing.public_key(secret).hex()},
        homeassistant={"enabled": True},
        rollout={"enabled": True, "topic": ROLLOUT_TOPIC},
        metrics={"enabled": prometheus_client is not None, "port": 0},
    )
    rows = healthy_rows(devices=1, rows=150, seed=8, faults="stuck_sensor:pump-00@1.5+2")  # stays open to the last row
    publish_rows(subscriber, rows[:-5])
    publish_rows(subscriber, rows[-5:], form="sensor")
    new = subscriber.expect(f"{PREFIX}/pump-00/alert", lambda m: m.json()["state"] == "new", timeout=30).json()
    if prometheus_client is not None:  # the open alert shows in the metrics, by severity
        from test_metrics import scrape, value

        samples = scrape(agent.metrics.address[1])
        assert value(samples, "edgecast_active_alerts", severity=new["severity"]) >= 1
        assert value(samples, "edgecast_alert_events_total") >= 1
    subscriber.publish("sensors/pump-01/telemetry", BROKEN)  # a rejection on the errors topic
    subscriber.expect(f"{PREFIX}/agent/{AGENT_ID}/errors", timeout=10)

    (folder / "model.onnx").write_bytes(b"not a model")  # a failed reload: a fault and a status with model_reload
    agent.request_reload()
    subscriber.expect(f"{PREFIX}/agent/{AGENT_ID}/errors", lambda m: m.json()["reason"] == "model_reload_failed", timeout=20)
    shutil.rmtree(folder)
    shutil.copytree(model_path, folder)

    good = tmp_path / "v2"
    shutil.copytree(model_path, good)
    manifest = json.loads((good / "manifest.json").read_text())
    manifest["version"] = "1.0.1-schema"
    (good / "manifest.json").write_text(json.dumps(manifest))
    publish_bundle(good, ROLLOUT_TOPIC, mosquitto.host, mosquitto.port, key_file=tmp_path / "key", release=1, expires="2999-01-01T00:00:00Z")
    subscriber.expect(f"{PREFIX}/agent/{AGENT_ID}/status", lambda m: m.json()["model"]["version"] == "1.0.1-schema", timeout=30)

    subscriber.publish(f"{PREFIX}/pump-00/command", {"command": "maintenance", "by": "schema-test", "reason": "r", "duration_s": 60})
    subscriber.expect(f"{PREFIX}/pump-00/command/result", timeout=10)

    agent.link._client._sock.close()  # the connection drops: the broker publishes the last will
    subscriber.expect(f"{PREFIX}/agent/{AGENT_ID}/status", lambda m: m.json().get("reason") == "connection lost", timeout=20)
    wait_until(lambda: agent.link.connected.is_set(), timeout=20, message="the reconnect")
    subscriber.quiet("#", 0.5)

    seen: dict[str, int] = {}
    for message in subscriber.history:
        name = schema_for(message.topic)
        if name is None or not message.payload or message.payload == BROKEN or "/chunks/" in message.topic:
            continue
        payload = json.loads(message.payload)
        errors = sorted(validator(name).iter_errors(payload), key=str)
        assert not errors, f"{message.topic} does not match schema {name}: {errors[0].message}\n{payload}"
        seen[name] = seen.get(name, 0) + 1
    assert set(seen) == set(SCHEMAS), f"schemas not exercised: {set(SCHEMAS) - set(seen)}"
    states = {json.loads(m.payload).get("state") for m in subscriber.history if m.topic.endswith("/alert")}
    assert "new" in states
