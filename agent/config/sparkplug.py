"""Settings of the Sparkplug B input (agent/transport/sparkplug.py): one section, `[sparkplug]`, in the style of agent/config/settings.py.

Kept in its own module until it is added to `Settings` (`sparkplug: SparkplugSettings = Field(default_factory=
SparkplugSettings)`); it imports nothing from agent.config at import time, so config.py can import it at its top.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# The placeholders of the device-name templates, and the characters a template may hold around them: those of a
# device name (agent/transport/ingest.py DEVICE_NAME), since the name becomes a topic level (edgecast/<device>/forecast).
TEMPLATE_PLACEHOLDERS = ("group", "edge_node", "device")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_TEMPLATE_LITERAL = re.compile(r"[A-Za-z0-9_.:-]*")
# Sparkplug IDs (group, edge node, device) are UTF-8 without the MQTT separators and wildcards.
SPARKPLUG_ID = r"^[^/+#]+$"

GroupId = Annotated[str, Field(min_length=1, max_length=128, pattern=SPARKPLUG_ID)]


class _Section(BaseModel):
    """agent.config.settings.Section, without importing agent.config here (it will import this module)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name:
            from agent.config.settings import _numeric_not_bool  # loaded by the time anything is validated

            if _numeric_not_bool(cls.model_fields[info.field_name].annotation):
                raise ValueError("expected a number, not a boolean (true/false)")
        return value


def template_problem(template: str, setting: str, required: str) -> str | None:
    """Why a device-name template is unusable, or None."""
    names = _PLACEHOLDER.findall(template)
    unknown = [n for n in names if n not in TEMPLATE_PLACEHOLDERS]
    if unknown:
        return f"sparkplug.{setting}: unknown placeholder {{{unknown[0]}}}; use {', '.join('{' + p + '}' for p in TEMPLATE_PLACEHOLDERS)}"
    if "{" + required + "}" not in template:
        return f"sparkplug.{setting} must contain {{{required}}}, e.g. {'{edge_node}.{device}' if required == 'device' else '{edge_node}'}"
    literal = _PLACEHOLDER.sub("", template)
    if not _TEMPLATE_LITERAL.fullmatch(literal):
        return (
            f"sparkplug.{setting} = {template!r}: between the placeholders only letters, digits and _.:- may stand (a device "
            "name becomes one topic level, edgecast/<device>/forecast); join the parts with '.' or ':', e.g. '{edge_node}.{device}'"
        )
    return None


class SparkplugSettings(_Section):
    enabled: bool = Field(
        False,
        description="Read Sparkplug B (spBv1.0 topics, protobuf payloads) besides the JSON topics; needs the `sparkplug` extra "
        "(protobuf). The agent is a non-primary host application: it learns metric aliases from NBIRTH/DBIRTH, follows the "
        "sequence numbers and asks an edge node to rebirth (NCMD Node Control/Rebirth) when it has lost track.",
    )
    groups: Annotated[list[GroupId], Field(max_length=256)] = Field(
        default_factory=list,
        description="Sparkplug group IDs to read (one subscription spBv1.0/<group>/# each); empty: every group (spBv1.0/+/#).",
    )
    device_template: str = Field(
        "{edge_node}.{device}", min_length=1, max_length=128,
        description="Our device name of a Sparkplug device, from {group}, {edge_node} and {device}: Sparkplug device IDs are "
        "only unique within their edge node, and a device name may not hold '/' (it becomes a topic level). Characters "
        "a device name may not hold (letters, digits, _.:- only) are replaced by '_'.",
    )
    node_template: str = Field(
        "{edge_node}", max_length=128,
        description="Our device name for an edge node's own metrics (NBIRTH/NDATA), from {group} and {edge_node}; empty: "
        "node-level metrics are not read.",
    )
    metric_map: dict[
        Annotated[str, Field(min_length=1, max_length=256)], Annotated[str, Field(min_length=1, max_length=128)]
    ] = Field(
        default_factory=dict,
        description='Sparkplug metric name -> model feature, e.g. {"Sensors/Bearing Temp" = "bearing_temp"}; a metric not '
        "named here is read as the feature of its own name. Metrics that are no model feature, and non-numeric ones, are "
        "ignored; a Boolean metric is read (as 0/1) only when named here.",
    )
    rebirth: bool = Field(
        True, description="Ask an edge node to rebirth (NCMD Node Control/Rebirth, QoS 0) when data comes without a birth, with an unknown alias or after a sequence gap."
    )
    rebirth_min_interval_s: float = Field(
        5.0, ge=0.1, le=86400.0, description="At most one rebirth request per edge node in this many seconds (a node's births take a moment to arrive)."
    )
    max_payload_bytes: int = Field(
        262_144, ge=1024, le=16 * 1024 * 1024,
        description="Larger Sparkplug payloads are rejected unread (birth certificates of nodes with many metrics are large).",
    )
    max_edge_nodes: int = Field(
        10_000, ge=1, le=1_000_000,
        description="Edge nodes whose births are kept (memory bound); a birth beyond it takes the place of a dead node, else it is rejected as device_limit.",
    )
    max_devices: int = Field(
        100_000, ge=1, le=10_000_000,
        description="Sparkplug devices whose births (metric aliases) are kept, over all edge nodes; a DBIRTH beyond it is rejected as device_limit.",
    )

    @model_validator(mode="after")
    def _check(self) -> "SparkplugSettings":
        problem = template_problem(self.device_template, "device_template", "device")
        if problem:
            raise ValueError(problem)
        if self.node_template:
            if "{device}" in self.node_template:
                raise ValueError("sparkplug.node_template names the edge node's own metrics: it may use {group} and {edge_node}, not {device}")
            problem = template_problem(self.node_template, "node_template", "edge_node")
            if problem:
                raise ValueError(problem)
            if self.node_template == self.device_template:
                raise ValueError("sparkplug.node_template must differ from sparkplug.device_template")
        if len(set(self.groups)) != len(self.groups):
            raise ValueError(f"sparkplug.groups lists a group twice: {self.groups}")
        if "STATE" in self.groups:
            raise ValueError("sparkplug.groups: STATE is the host applications' topic spBv1.0/STATE/<host_id>, not a group")
        seen: dict[str, str] = {}
        for metric, feature in self.metric_map.items():
            if feature in seen:
                raise ValueError(
                    f"sparkplug.metric_map maps both {seen[feature]!r} and {metric!r} to feature {feature!r}; map one metric per feature"
                )
            seen[feature] = metric
        return self
