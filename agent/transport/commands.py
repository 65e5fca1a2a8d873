"""Operator commands over MQTT: `{prefix}/{device}/command` in, `{prefix}/{device}/command/result` out.

A command is a JSON object (agent/schemas/command.json): `command` (acknowledge, shelve, unshelve, maintenance,
end_maintenance, feedback), `by` (who) and `reason` (why), plus what the command needs (`alert_id`, `duration_s`,
`until`, `label`, `comment`) and an optional `request_id` echoed in the result. Anything else is refused with a
reason on the result topic, never half applied. Who may send commands is the broker's business: docs/operators.md
has the ACL that limits it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from agent.core.alarms import LABELS
from agent.transport.ingest import DEVICE_NAME

COMMANDS = ("acknowledge", "shelve", "unshelve", "maintenance", "end_maintenance", "feedback")
MAX_COMMAND_BYTES = 4096
TEXT_MAX = {"by": 64, "reason": 200, "comment": 500, "alert_id": 200, "request_id": 64}
FIELDS = {"command", "by", "reason", "alert_id", "duration_s", "until", "label", "comment", "request_id"}


class CommandError(ValueError):
    """A command refused before it did anything: `reason` is a code of the result topic's vocabulary."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.request_id: str | None = None  # echoed in the result when the command carried a readable one
        self.by: str | None = None


@dataclass(frozen=True)
class Command:
    device: str
    command: str
    by: str
    reason: str
    alert_id: str | None = None
    duration_s: float | None = None
    until: float | None = None
    label: str | None = None
    comment: str = ""
    request_id: str | None = None


def command_topic_filter(prefix: str) -> str:
    return f"{prefix}/+/command"


def device_of(topic: str, prefix: str) -> str | None:
    """The device of a command topic, or None when the topic is not one."""
    parts = topic.split("/")
    head = prefix.split("/")
    if len(parts) != len(head) + 2 or parts[: len(head)] != head or parts[-1] != "command":
        return None
    return parts[len(head)]


def parse(topic: str, payload: bytes, prefix: str) -> Command:
    """The command of a message; CommandError (with its reason code) for anything malformed."""
    device = device_of(topic, prefix)
    if device is None or not DEVICE_NAME.fullmatch(device):
        raise CommandError("invalid_command", f"topic {topic[:200]!r} is not {prefix}/<device>/command")
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError("invalid_command", f"{len(payload)} bytes > {MAX_COMMAND_BYTES}")
    try:
        body = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CommandError("malformed_json", f"the command is not JSON: {str(exc)[:120]}") from None
    if not isinstance(body, dict):
        raise CommandError("invalid_command", f"a command is a JSON object, got {type(body).__name__}")
    try:
        return _command(device, body)
    except CommandError as error:
        error.request_id = _text(body.get("request_id"), TEXT_MAX["request_id"])
        error.by = _text(body.get("by"), TEXT_MAX["by"])
        raise


def _text(value: object, most: int) -> str | None:
    return value if isinstance(value, str) and len(value) <= most else None


def _command(device: str, body: dict) -> Command:
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise CommandError("invalid_command", f"unknown field(s) {unknown}; a command has {sorted(FIELDS)}")
    for name, most in TEXT_MAX.items():
        value = body.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > most):
            raise CommandError("invalid_command", f"{name} must be a string of at most {most} characters")
    command = body.get("command")
    if command not in COMMANDS:
        raise CommandError("invalid_command", f"command must be one of {list(COMMANDS)}, got {str(command)[:40]!r}")
    for name in ("by", "reason"):
        if not body.get(name):
            raise CommandError("invalid_command", f"{command} needs `{name}` (who sends it and why)")
    duration = _number(body, "duration_s", low=1.0)
    until = _number(body, "until", low=0.0)
    alert_id = body.get("alert_id")
    if command == "feedback":
        if alert_id is None:
            raise CommandError("invalid_command", "feedback needs `alert_id`")
        if body.get("label") not in LABELS:
            raise CommandError("invalid_command", f"feedback needs `label`, one of {list(LABELS)}")
    elif body.get("label") is not None or body.get("comment") is not None:
        raise CommandError("invalid_command", f"`label` and `comment` belong to feedback, not to {command}")
    if command == "shelve" and duration is None:
        raise CommandError("invalid_command", "shelve needs `duration_s` (shelving is always for a bounded time)")
    if command != "shelve" and command != "maintenance" and duration is not None:
        raise CommandError("invalid_command", f"`duration_s` belongs to shelve and maintenance, not to {command}")
    if until is not None and command != "maintenance":
        raise CommandError("invalid_command", f"`until` belongs to maintenance, not to {command}")
    if command == "maintenance" and duration is not None and until is not None:
        raise CommandError("invalid_command", "give maintenance `duration_s` or `until`, not both")
    if command in ("maintenance", "end_maintenance") and alert_id is not None:
        raise CommandError("invalid_command", f"{command} applies to the device, not to an alert")
    return Command(device, command, body["by"], body["reason"], alert_id, duration, until, body.get("label"),
                   body.get("comment") or "", body.get("request_id"))


def _number(body: dict, name: str, low: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise CommandError("invalid_command", f"{name} must be a number >= {low:g}")
    return float(value)


def result(device: str, command: str | None, ok: bool, reason: str | None, detail: str, ts: float,
           by: str | None = None, request_id: str | None = None) -> bytes:
    """The answer on `{prefix}/{device}/command/result` (agent/schemas/command_result.json)."""
    body = {"device": device, "command": command, "ok": ok, "reason": reason, "detail": detail[:300], "ts": round(ts, 3),
            "by": by, "request_id": request_id}
    return json.dumps(body, separators=(",", ":")).encode("utf-8")
