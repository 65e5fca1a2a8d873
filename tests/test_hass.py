"""Home Assistant MQTT discovery: entities per device, availability from the status topic, republished on HA's birth."""

from __future__ import annotations

import json

import pytest
from conftest import AGENT_ID, FEATURES, PREFIX, healthy_rows, publish_rows

pytestmark = pytest.mark.mqtt
import jinja2  # noqa: E402  (dev extra)
import jsonschema  # noqa: E402  (dev extra)

NODE = f"edgecast_{AGENT_ID}"
DISCOVERY = f"homeassistant/+/{NODE}/+/config"


def render(template: str, payload: dict) -> str:
    """Render a value_template the way Home Assistant does for MQTT entities (value_json = the parsed payload)."""
    return jinja2.Environment().from_string(template).render(value_json=payload, value=json.dumps(payload)).strip()


def discovery_configs(probe, count: int) -> dict[str, dict]:
    messages = probe.collect(DISCOVERY, count, timeout=30)
    assert all(m.retain or m.qos == 1 for m in messages)
    return {m.topic: m.json() for m in messages}


def test_discovery_describes_each_device_as_home_assistant_expects(start_agent, subscriber):
    """Per device: a forecast sensor per target and a problem binary_sensor; templates render the real payloads."""
    from agent.schemas import load_schema

    start_agent(homeassistant={"enabled": True})
    status = subscriber.expect(f"{PREFIX}/agent/{AGENT_ID}/status", lambda m: m.json()["state"] == "online").json()
    publish_rows(subscriber, healthy_rows(devices=1, rows=61, seed=5))
    forecast = subscriber.expect(f"{PREFIX}/pump-00/forecast", timeout=30).json()
    active = subscriber.expect(f"{PREFIX}/pump-00/alerts/active", timeout=10)
    assert active.json()["alerts"] == []  # the alert entity has a state from the start

    # + the alert binary_sensor, the acknowledge button and the maintenance switch, + the agent's connectivity
    configs = discovery_configs(subscriber, len(FEATURES) + 4)
    schema = load_schema("hass_discovery")
    for topic, config in configs.items():
        jsonschema.validate(config, schema)
        for availability in config.get("availability", []):
            assert availability["topic"] == f"{PREFIX}/agent/{AGENT_ID}/status"
            assert render(availability["value_template"], status) == availability["payload_available"] == "online"
    assert len({c["unique_id"] for c in configs.values()}) == len(configs)

    for target in FEATURES:
        config = configs[f"homeassistant/sensor/{NODE}/pump-00_{target}_forecast/config"]
        assert config["state_topic"] == f"{PREFIX}/pump-00/forecast"
        assert float(render(config["value_template"], forecast)) == pytest.approx(forecast["forecast"][target][0])
        attributes = json.loads(render(config["json_attributes_template"], forecast))
        assert attributes["forecast"] == forecast["forecast"][target] and attributes["horizon_ts"] == forecast["horizon_ts"]
        assert config["device"]["identifiers"] == [f"{NODE}_pump-00"] and config["device"]["via_device"] == NODE

    alert = configs[f"homeassistant/binary_sensor/{NODE}/pump-00_alert/config"]
    assert alert["device_class"] == "problem" and alert["state_topic"] == f"{PREFIX}/pump-00/alerts/active"
    assert render(alert["value_template"], active.json()) == "OFF"
    one_open = {"device": "pump-00", "ts": 1, "alerts": [{"alert_id": "pump-00-1-abcdef", "severity": "warning", "started_at": 1, "score": 9.0}]}
    assert render(alert["value_template"], one_open) == "ON"

    connectivity = configs[f"homeassistant/binary_sensor/{NODE}/agent_online/config"]
    assert connectivity["device_class"] == "connectivity"
    assert render(connectivity["value_template"], status) == "ON"
    assert render(connectivity["value_template"], {**status, "state": "offline"}) == "OFF"


def test_discovery_is_published_again_when_home_assistant_comes_online(start_agent, subscriber):
    """`online` on homeassistant/status makes the agent publish every discovery config again; other payloads do not."""
    agent = start_agent(homeassistant={"enabled": True})
    publish_rows(subscriber, healthy_rows(devices=2, rows=61, seed=6))
    first = discovery_configs(subscriber, 2 * (len(FEATURES) + 3) + 1)
    subscriber.drain()

    subscriber.publish("homeassistant/status", "offline")
    assert subscriber.quiet(DISCOVERY, 0.5) == []
    subscriber.publish("homeassistant/status", "online")
    again = discovery_configs(subscriber, len(first))
    assert again == first
    assert agent.hass.republished == 1


def test_discovery_is_off_by_default(start_agent, subscriber):
    """Without homeassistant.enabled nothing is published under homeassistant/."""
    start_agent()
    publish_rows(subscriber, healthy_rows(devices=1, rows=61, seed=7))
    subscriber.expect(f"{PREFIX}/pump-00/forecast", timeout=30)
    subscriber.publish("homeassistant/status", "online")
    subscriber.quiet("#", 0.5)
    assert not [m.topic for m in subscriber.history if m.topic.endswith("/config")]
