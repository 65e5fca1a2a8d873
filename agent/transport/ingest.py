"""Topic matching, payload decoding and validation: MQTT message -> Sample, or events.Rejected with a reason.

Cheap checks run first (topic, size) so that hostile or broken input costs little; nothing here touches
the windows, so a rejected message never changes state that was already accepted.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.core.events import Rejected, Sample
from agent.transport.partition import PartitionFilter

if TYPE_CHECKING:
    from agent.config.settings import Settings  # the daemon runs on a Snapshot of it (agent/config/snapshot.py)

DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
PLACEHOLDER = re.compile(r"\{(device|sensor)\}")
_NUMBER = (int, float)
_EXACT_INT = 2**53  # ints below this convert to float exactly


@dataclass(frozen=True, slots=True)
class Route:
    """One input topic template, compiled: `kind` is "telemetry" or "sensor"."""

    kind: str
    template: str
    pattern: re.Pattern
    subscription: str


def compile_template(template: str, kind: str) -> Route:
    """`sensors/{device}/telemetry` -> regex with one group per placeholder (each inside one topic level)."""
    parts, pos = [], 0
    for match in PLACEHOLDER.finditer(template):
        parts.append(re.escape(template[pos : match.start()]))
        parts.append(f"(?P<{match.group(1)}>[^/]+)")
        pos = match.end()
    parts.append(re.escape(template[pos:]))
    pattern = re.compile("".join(parts))
    # A level holding a placeholder becomes '+'; the regex then checks the level's literal part, if any.
    levels = ["+" if PLACEHOLDER.search(level) else level for level in template.split("/")]
    return Route(kind, template, pattern, "/".join(levels))


def _covers(broad: str, narrow: str) -> bool:
    """True when every topic matching filter `narrow` also matches filter `broad` ('+' levels only)."""
    a, b = broad.split("/"), narrow.split("/")
    return len(a) == len(b) and all(x == y or x == "+" for x, y in zip(a, b))


def parse_timestamp(value: object) -> float:
    """Unix seconds (int/float) or ISO-8601 (with Z or an offset; naive means UTC) -> float unix seconds."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"timestamp must be unix seconds or an ISO-8601 string, got {value!r}")
    if isinstance(value, _NUMBER):
        try:
            ts = float(value)
        except OverflowError:
            raise ValueError(f"timestamp {value!r} is out of range") from None
        if not math.isfinite(ts):
            raise ValueError(f"timestamp {value!r} is not finite")
        return ts
    if isinstance(value, str):
        text = value.strip()
        if not text or len(text) > 64:
            raise ValueError(f"timestamp {value[:64]!r} is not ISO-8601")
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"timestamp {text!r} is not ISO-8601 (e.g. 2026-11-21T15:00:00Z)") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()
    raise ValueError(f"timestamp must be unix seconds or an ISO-8601 string, got {type(value).__name__}")


def plausible_limits(features: list[str], offset, scale, ingest) -> dict[str, tuple[float, float]]:
    """Per feature, the readings accepted: ingest.value_limits where given, else the bundle scaler's offset +-
    ingest.plausible_range_stds x its scale (a standard scaler's training mean and standard deviation). Far wider
    than any fault; what it keeps out are values no sensor reads (1e30 overflows the model's float32)."""
    k = ingest.plausible_range_stds
    limits = {}
    for name, center, spread in zip(features, offset, scale):
        given = ingest.value_limits.get(name)
        limits[name] = (float(given[0]), float(given[1])) if given else (float(center - k * spread), float(center + k * spread))
    return limits


class Ingest:
    """Turns (topic, payload) into validated Samples for the model's features; raises events.Rejected."""

    def __init__(self, settings: Settings, features: list[str], limits: dict[str, tuple[float, float]] | None = None):
        self.features = list(features)
        # Each message's JSON keys are new strings: samples waiting in the ingest queue key their values by these
        # shared ones instead (~240 bytes less per queued reading of four features).
        self._feature_names = {name: name for name in self.features}
        self.set_limits(limits or {})
        self.max_payload_bytes = settings.ingest.max_payload_bytes
        self.max_future_s = settings.ingest.max_future_s
        self.max_age_s = settings.ingest.max_age_s
        self.ignore_unknown = settings.ingest.unknown_features == "ignore"
        # The telemetry template is tried first: `sensors/x/telemetry` also fits `sensors/{device}/{sensor}`.
        self.routes = [compile_template(settings.topics.telemetry, "telemetry")]
        if settings.topics.sensor:
            self.routes.append(compile_template(settings.topics.sensor, "sensor"))
        self.partition = PartitionFilter(settings.partition.count, settings.partition.index)
        # (device, now) -> whether the device can have a row (the pipeline's `admits`); None: no limit checked here
        self.device_gate: Callable[[str, float], bool] | None = None
        self.device_limit_detail: Callable[[], str] = lambda: "device table full"

    def set_limits(self, limits: dict[str, tuple[float, float]]) -> None:
        """The [low, high] range accepted per feature (plausible_limits); features not named: any finite float."""
        self._bounds = {name: tuple(limits.get(name, (-sys.float_info.max, sys.float_info.max))) for name in self.features}

    def subscriptions(self) -> list[str]:
        """MQTT filters for the templates; a filter covered by another is dropped (no duplicate deliveries)."""
        filters = list(dict.fromkeys(r.subscription for r in self.routes))
        return [f for f in filters if not any(g != f and _covers(g, f) for g in filters)]

    def match(self, topic: str) -> tuple[Route, str, str | None]:
        """(route, device, sensor) of a topic; Rejected('unknown_topic') when no template fits."""
        found = self.try_match(topic)
        if found is None:
            raise Rejected("unknown_topic", f"topic {topic[:200]!r} matches none of {[r.template for r in self.routes]}")
        return found

    def try_match(self, topic: str) -> tuple[Route, str, str | None] | None:
        """`match`, with None when no template fits (the router asks each model's ingest in turn)."""
        for route in self.routes:
            m = route.pattern.fullmatch(topic)
            if m is None:
                continue
            device = m.group("device")
            if not DEVICE_NAME.fullmatch(device):
                raise Rejected("unknown_topic", f"device name {device[:80]!r} in topic is not allowed (letters, digits, _.:- ; at most 128)")
            sensor = m.group("sensor") if route.kind == "sensor" else None
            return route, sys.intern(device), sensor  # one string per device, not one per queued reading
        return None

    def parse(self, topic: str, payload: bytes, now: float) -> list[Sample]:
        """Samples of one message; [] for a device another partition owns (dropped before decoding)."""
        route, device, sensor = self.match(topic)
        if self.partition.active and not self.partition.owns(device):
            return []
        if self.device_gate is not None and not self.device_gate(device, now):
            raise Rejected("device_limit", self.device_limit_detail(), device)
        if len(payload) > self.max_payload_bytes:
            raise Rejected("oversized_payload", f"{len(payload)} bytes > ingest.max_payload_bytes={self.max_payload_bytes}", device)
        try:
            text = bytes(payload).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Rejected("invalid_utf8", f"payload is not UTF-8 ({exc.reason} at byte {exc.start})", device) from None
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise Rejected("malformed_json", f"payload is not JSON: {str(exc)[:120]}", device) from None
        if route.kind == "telemetry":
            return [self._telemetry(device, data, now)]
        return self._sensor(device, sensor, data, now)

    def _telemetry(self, device: str, data: object, now: float) -> Sample:
        if not isinstance(data, dict):
            raise Rejected("wrong_type", f'telemetry payload must be an object {{"ts", "values"}}, got {type(data).__name__}', device)
        if "ts" not in data:
            raise Rejected("bad_timestamp", 'telemetry payload lacks "ts"', device)
        ts = self._timestamp(device, data["ts"], now)
        raw = data.get("values")
        if not isinstance(raw, dict):
            raise Rejected("wrong_type", f'"values" must be an object of feature -> number, got {type(raw).__name__}', device)
        values: dict[str, float] = {}
        bounds = self._bounds
        feature_names = self._feature_names
        for name, value in raw.items():
            shared = feature_names.get(name)
            if shared is None:
                if self.ignore_unknown:
                    continue
                raise Rejected("unknown_feature", f"{str(name)[:80]!r} is not a model feature {self.features}", device)
            # The usual value, a float in its plausible range (so finite), without the full check's call
            low, high = bounds[shared]
            values[shared] = value if type(value) is float and low <= value <= high else self._number(device, shared, value)
        if len(values) != len(self.features):
            missing = [f for f in self.features if f not in values]
            raise Rejected("missing_feature", f"telemetry lacks {missing}", device)
        return Sample(device, ts, values, now)

    def _sensor(self, device: str, sensor: str | None, data: object, now: float) -> list[Sample]:
        assert sensor is not None
        shared = self._feature_names.get(sensor)  # the shared name, not this topic's copy
        if shared is None:
            if self.ignore_unknown:
                return []
            raise Rejected("unknown_feature", f"sensor {sensor[:80]!r} is not a model feature {self.features}", device)
        sensor = shared
        if isinstance(data, dict):
            if "value" not in data:
                raise Rejected("wrong_type", 'per-sensor object payload needs "value" (and optionally "ts")', device)
            ts = self._timestamp(device, data["ts"], now) if "ts" in data else now
            value = self._number(device, sensor, data["value"])
        else:
            ts, value = now, self._number(device, sensor, data)
        return [Sample(device, ts, {sensor: value}, now)]

    def _number(self, device: str, name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, _NUMBER):
            raise Rejected("wrong_type", f"{name}: expected a number, got {type(value).__name__}", device)
        try:
            number = float(value)
        except OverflowError:
            raise Rejected("non_finite", f"{name}: {str(value)[:40]} overflows a float", device) from None
        if not math.isfinite(number):
            raise Rejected("non_finite", f"{name}: {value!r} is not finite", device)
        low, high = self._bounds[name]
        if not low <= number <= high:
            raise Rejected("out_of_range", f"{name}: {number:.6g} is outside the plausible range [{low:.6g}, {high:.6g}] "
                           "(ingest.value_limits, ingest.plausible_range_stds)", device)
        return number

    def _timestamp(self, device: str, value: object, now: float) -> float:
        if type(value) is int and -_EXACT_INT < value < _EXACT_INT:  # the usual unix seconds, without the full parse
            ts = float(value)
        else:
            try:
                ts = parse_timestamp(value)
            except (ValueError, OverflowError) as exc:
                raise Rejected("bad_timestamp", str(exc), device) from None
        if ts < now - self.max_age_s:
            raise Rejected("timestamp_out_of_range", f"ts {ts:.0f} is {now - ts:.0f} s old (ingest.max_age_s={self.max_age_s:.0f})", device)
        if ts > now + self.max_future_s:
            raise Rejected("timestamp_out_of_range", f"ts {ts:.0f} is {ts - now:.0f} s ahead of the agent clock (ingest.max_future_s={self.max_future_s:.0f})", device)
        return ts
