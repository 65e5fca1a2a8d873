"""Home Assistant MQTT discovery (optional, `[homeassistant] enabled = true`).

For every device the agent forecasts, Home Assistant gets one device with
- a `sensor` per target: the next-step forecast (`forecast.<target>[0]` of the forecast topic), the whole
  horizon and its timestamps as attributes;
- a `binary_sensor` (device_class `problem`): on while the device has an open alert (from the retained
  `alerts/active` list), the list as attributes;
- with operator commands on (`[alarms]`): a `button` that acknowledges the device's open alerts and a `switch`
  for its maintenance mode (state from the active list), both sending commands to `<prefix>/<device>/command`;
and the agent itself appears as a device with a `connectivity` binary_sensor. Every entity's availability
follows the agent's retained status topic (`value_json.state`: online / offline, the last will included), so
entities go unavailable when the gateway drops off.

Discovery configs are retained and published again on every connect and whenever Home Assistant announces
itself (`online` on its birth topic, `homeassistant/status`), as Home Assistant's documentation asks.
Topic ids: `<discovery_prefix>/<component>/<node_id>/<object_id>/config` with node_id `edgecast_<agent_id>`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

ORIGIN_URL = "https://github.com/edgecast/edgecast"


def slug(text: str) -> str:
    """Home Assistant's node_id / object_id alphabet: [a-zA-Z0-9_-]; anything else becomes `_`."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", text)


class HassDiscovery:
    """Builds and publishes discovery configs; `publish(topic, payload)` publishes retained (QoS 1)."""

    def __init__(
        self,
        agent_id: str,
        output_prefix: str,
        status_topic: str,
        discovery_prefix: str,
        birth_topic: str,
        sw_version: str,
        publish: Callable[[str, bytes], None],
        commands: bool = False,
    ):
        self.agent_id = agent_id
        self.output_prefix = output_prefix
        self.status_topic = status_topic
        self.discovery_prefix = discovery_prefix
        self.birth_topic = birth_topic
        self.sw_version = sw_version
        self._publish = publish
        self.commands = commands  # operator commands on: an acknowledge button and a maintenance switch per device
        self.node_id = slug(f"edgecast_{agent_id}")
        self._lock = threading.Lock()
        self._devices: dict[str, tuple[list[str], str]] = {}  # device -> (targets, model label)
        self.republished = 0  # times Home Assistant's birth message made us publish everything again

    # -- what Home Assistant expects -----------------------------------------------------------------------

    def _availability(self) -> list[dict]:
        return [{
            "topic": self.status_topic,
            "value_template": "{{ value_json.state }}",
            "payload_available": "online",
            "payload_not_available": "offline",
        }]

    def _origin(self) -> dict:
        return {"name": "edgecast", "sw_version": self.sw_version, "support_url": ORIGIN_URL}

    def _agent_device(self) -> dict:
        return {
            "identifiers": [self.node_id],
            "name": f"edgecast agent {self.agent_id}",
            "manufacturer": "edgecast",
            "model": "edge agent",
            "sw_version": self.sw_version,
        }

    def _device_block(self, device: str, model: str) -> dict:
        return {
            "identifiers": [f"{self.node_id}_{slug(device)}"],
            "name": device,
            "manufacturer": "edgecast",
            "model": model,
            "via_device": self.node_id,
        }

    def config_topic(self, component: str, object_id: str) -> str:
        return f"{self.discovery_prefix}/{component}/{self.node_id}/{object_id}/config"

    def agent_configs(self) -> list[tuple[str, dict]]:
        object_id = "agent_online"
        return [(
            self.config_topic("binary_sensor", object_id),
            {
                "name": "Online",
                "unique_id": f"{self.node_id}_{object_id}",
                "device_class": "connectivity",
                "entity_category": "diagnostic",
                "state_topic": self.status_topic,
                "value_template": "{{ 'ON' if value_json.state == 'online' else 'OFF' }}",
                "json_attributes_topic": self.status_topic,
                "json_attributes_template": "{{ {'version': value_json.version, 'model': value_json.model} | tojson }}",
                "device": self._agent_device(),
                "origin": self._origin(),
            },
        )]

    def device_configs(self, device: str, targets: list[str], model: str) -> list[tuple[str, dict]]:
        """(config topic, config payload) for one device's entities."""
        device_slug = slug(device)
        block = self._device_block(device, model)
        forecast_topic = f"{self.output_prefix}/{device}/forecast"
        out = []
        for target in targets:
            object_id = f"{device_slug}_{slug(target)}_forecast"
            key = json.dumps(target)  # a JSON string literal is a valid Jinja string literal
            out.append((
                self.config_topic("sensor", object_id),
                {
                    "name": f"{target} forecast",
                    "unique_id": f"{self.node_id}_{object_id}",
                    "state_topic": forecast_topic,
                    "value_template": f"{{{{ value_json.forecast[{key}][0] }}}}",
                    "json_attributes_topic": forecast_topic,
                    "json_attributes_template": (
                        f"{{{{ {{'horizon_ts': value_json.horizon_ts, 'forecast': value_json.forecast[{key}], "
                        f"'completeness': value_json.completeness}} | tojson }}}}"
                    ),
                    "state_class": "measurement",
                    "icon": "mdi:chart-timeline-variant",
                    "availability": self._availability(),
                    "device": block,
                    "origin": self._origin(),
                },
            ))
        object_id = f"{device_slug}_alert"
        active_topic = f"{self.output_prefix}/{device}/alerts/active"
        out.append((
            self.config_topic("binary_sensor", object_id),
            {
                "name": "Anomaly alert",
                "unique_id": f"{self.node_id}_{object_id}",
                "device_class": "problem",
                "state_topic": active_topic,
                "value_template": "{{ 'ON' if value_json.alerts | length > 0 else 'OFF' }}",
                "json_attributes_topic": active_topic,
                "json_attributes_template": "{{ {'alerts': value_json.alerts} | tojson }}",
                "availability": self._availability(),
                "device": block,
                "origin": self._origin(),
            },
        ))
        if self.commands:
            out += self._command_configs(device, block, active_topic)
        return out

    def _command_configs(self, device: str, block: dict, active_topic: str) -> list[tuple[str, dict]]:
        """An acknowledge button and a maintenance switch, sending operator commands (docs/operators.md)."""
        command_topic = f"{self.output_prefix}/{device}/command"

        def command(name: str, reason: str) -> str:
            return json.dumps({"command": name, "by": "homeassistant", "reason": reason}, separators=(",", ":"))

        device_slug = slug(device)
        common = {"command_topic": command_topic, "availability": self._availability(), "device": block, "origin": self._origin()}
        return [
            (self.config_topic("button", f"{device_slug}_acknowledge"), {
                "name": "Acknowledge alerts", "unique_id": f"{self.node_id}_{device_slug}_acknowledge", "icon": "mdi:check-circle",
                "payload_press": command("acknowledge", "acknowledged in Home Assistant"), **common,
            }),
            (self.config_topic("switch", f"{device_slug}_maintenance"), {
                "name": "Maintenance", "unique_id": f"{self.node_id}_{device_slug}_maintenance", "icon": "mdi:wrench",
                "payload_on": command("maintenance", "maintenance switched on in Home Assistant"),
                "payload_off": command("end_maintenance", "maintenance switched off in Home Assistant"),
                "state_topic": active_topic, "value_template": "{{ 'ON' if value_json.maintenance is defined else 'OFF' }}",
                "state_on": "ON", "state_off": "OFF", **common,
            }),
        ]

    # -- publishing ----------------------------------------------------------------------------------------

    def _send(self, configs: list[tuple[str, dict]]) -> None:
        for topic, payload in configs:
            self._publish(topic, json.dumps(payload, separators=(",", ":")).encode("utf-8"))

    def announce_agent(self) -> None:
        self._send(self.agent_configs())

    def device_seen(self, device: str, targets: list[str], model: str) -> bool:
        """Publish the device's entities the first time it is seen (or when its model's targets change)."""
        with self._lock:
            if self._devices.get(device) == (list(targets), model):
                return False
            self._devices[device] = (list(targets), model)
        self._send(self.device_configs(device, targets, model))
        log.info("homeassistant: discovery published for device %s (%d entities)", device, len(targets) + 1)
        return True

    def on_birth(self, payload: bytes) -> None:
        """Home Assistant (re)started: it forgets non-retained state, so everything is published again."""
        if payload.strip().lower() != b"online":
            return
        with self._lock:
            devices = dict(self._devices)
        self.announce_agent()
        for device, (targets, model) in devices.items():
            self._send(self.device_configs(device, targets, model))
        self.republished += 1
        log.info("homeassistant: birth message seen; discovery published again for %d devices", len(devices))
