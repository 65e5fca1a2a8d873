"""JSON Schemas (draft 2020-12) of every payload the agent reads and publishes; shipped as package data.

`load_schema("forecast")` returns one as a dict; `list_schemas()` lists (name, title). The tests validate what
a running daemon really publishes against them; integrators can validate their own producers and consumers
(`edgecast-agent schemas NAME` prints one).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib.resources import files

# name -> the topic it describes (README, "Topics and payloads")
SCHEMAS = {
    "telemetry": "in: sensors/{device}/telemetry",
    "sensor": "in: sensors/{device}/{sensor}",
    "forecast": "out: {prefix}/{device}/forecast",
    "alert": "out: {prefix}/{device}/alert",
    "alerts_active": "out: {prefix}/{device}/alerts/active (retained)",
    "status": "out: {prefix}/agent/{agent_id}/status (retained, last will)",
    "error": "out: {prefix}/agent/{agent_id}/errors",
    "hass_discovery": "out: homeassistant/{component}/{node_id}/{object_id}/config (retained)",
    "model_descriptor": "in/out: the model rollout topic's descriptor (retained)",
    "command": "in: {prefix}/{device}/command (operator commands)",
    "command_result": "out: {prefix}/{device}/command/result",
}


@lru_cache(maxsize=None)
def load_schema(name: str) -> dict:
    if name not in SCHEMAS:
        raise KeyError(name)
    return json.loads((files(__name__) / f"{name}.json").read_text(encoding="utf-8"))


def list_schemas() -> list[tuple[str, str]]:
    return [(name, f"{load_schema(name).get('title', '')} ({topic})") for name, topic in SCHEMAS.items()]
