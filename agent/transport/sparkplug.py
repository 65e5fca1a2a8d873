"""Sparkplug B input: spBv1.0 topics with protobuf payloads -> Samples, window gaps, rejections, rebirth requests.

The agent reads Sparkplug as a non-primary host application (it publishes no STATE and ignores others' STATE):

* NBIRTH / DBIRTH announce an edge node's / device's metrics with names, aliases and datatypes (and carry their
  current values, read like data); NDATA / DDATA then send values by alias (or by name).
* Every message of an edge node but NDEATH carries `seq`, which goes up by one, modulo 256, over NBIRTH, DBIRTH,
  NDATA, DDATA and DDEATH. A jump means messages were lost: it is counted (sparkplug_seq_gap), every device of the
  node gets a gap (its window restarts) and a rebirth is requested; the message's own data is kept and the
  sequence continues from it.
* Data from a node or device whose birth we have not seen (we started after it, it died, or its metric alias is
  unknown) is dropped and counted, and a rebirth is requested: an NCMD to the edge node with the Boolean metric
  `Node Control/Rebirth` = true, at most one per node every `rebirth_min_interval_s` (the caller publishes
  `result.commands`, QoS 0, not retained).
* DDEATH restarts the device's window; NDEATH (the node's MQTT will) those of the node and all its devices, but
  only when its `bdSeq` metric equals the one of the node's NBIRTH: an older session's late will is ignored.

Nothing here raises on input: a payload that does not decode, or an impossible value, becomes a rejection
`(reason, device or None, detail)`. Not thread-safe: one thread (the MQTT network thread) calls `handle`.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError

from agent.transport import sparkplug_b_pb2 as pb
from agent.core.events import Sample

if TYPE_CHECKING:
    from agent.config.sparkplug import SparkplugSettings  # the daemon runs on a Snapshot of it (no pydantic)

log = logging.getLogger(__name__)

NAMESPACE = "spBv1.0"
REBIRTH_METRIC = "Node Control/Rebirth"
BDSEQ_METRIC = "bdSeq"

# Reasons this input adds to agent.events.REJECTION_REASONS (it also uses unknown_topic, oversized_payload,
# wrong_type, non_finite, out_of_range, timestamp_out_of_range and device_limit, with their usual meaning).
SPARKPLUG_REJECTION_REASONS = (
    "sparkplug_decode",  # the payload is not a Sparkplug B protobuf Payload
    "sparkplug_no_birth",  # data from an edge node or device whose birth certificate we do not have
    "sparkplug_unknown_alias",  # a metric alias (or name) its birth certificate did not announce
    "sparkplug_seq_gap",  # the edge node's sequence number jumped: messages were lost or reordered
)

# A device name of ours (agent/transport/ingest.py DEVICE_NAME): other characters of Sparkplug IDs become '_'.
DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
_NOT_NAME_CHARACTER = re.compile(r"[^A-Za-z0-9_.:-]+")

_DT = pb.DataType
_SIGNED_BITS = {_DT.Value("Int8"): 8, _DT.Value("Int16"): 16, _DT.Value("Int32"): 32, _DT.Value("Int64"): 64}
_UNSIGNED = frozenset(_DT.Value(n) for n in ("UInt8", "UInt16", "UInt32", "UInt64"))
_FLOATS = frozenset((_DT.Value("Float"), _DT.Value("Double")))
_BOOLEAN = _DT.Value("Boolean")
_UNKNOWN_TYPE = _DT.Value("Unknown")
_NUMERIC_FIELDS = frozenset(("int_value", "long_value", "float_value", "double_value"))
_KINDS = frozenset(("NBIRTH", "NDATA", "NDEATH", "NCMD", "DBIRTH", "DDATA", "DDEATH", "DCMD"))
_MAX_SEQ = 255
_MAX_REFUSED = 4096  # per edge node


@dataclass(slots=True)
class SparkplugResult:
    """What one message means for the pipeline; apply `gaps` before `samples` (a restart, then the new data)."""

    samples: list[Sample] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)  # devices whose window must restart
    rejections: list[tuple[str, str | None, str]] = field(default_factory=list)  # (reason, device or None, detail)
    commands: list[tuple[str, bytes]] = field(default_factory=list)  # (topic, payload): publish QoS 0, not retained


@dataclass(slots=True)
class _Metric:
    """A metric announced in a birth certificate: the feature it feeds (None: not read) and its datatype."""

    name: str
    feature: str | None
    datatype: int


@dataclass(slots=True)
class _Device:
    name: str  # our device name
    aliases: dict[int, _Metric] = field(default_factory=dict)
    by_name: dict[str, _Metric] = field(default_factory=dict)


@dataclass(slots=True)
class _Node:
    group: str
    edge_node: str
    device: _Device | None  # the node's own metrics (None: sparkplug.node_template is empty)
    bdseq: int | None
    seq: int | None  # the last sequence number seen; None: unknown (no seq yet, or the connection was lost)
    devices: dict[str, _Device] = field(default_factory=dict)  # Sparkplug device ID -> its birth
    refused: set[str] = field(default_factory=set)  # device IDs whose DBIRTH was rejected: their data is dropped quietly
    alive: bool = True
    resync: bool = False  # the connection was lost since the birth: ask for a rebirth at the next message

    def device_names(self) -> list[str]:
        names = [self.device.name] if self.device is not None else []
        return names + [d.name for d in self.devices.values()]


def rebirth_payload(now: float) -> bytes:
    """The NCMD payload asking an edge node to publish its NBIRTH and DBIRTHs again."""
    payload = pb.Payload(timestamp=int(now * 1000))
    metric = payload.metrics.add(name=REBIRTH_METRIC, datatype=_BOOLEAN)
    metric.timestamp = payload.timestamp
    metric.boolean_value = True
    return payload.SerializeToString()


def _render(template: str, group: str, edge_node: str, device: str = "") -> str:
    """A device-name template filled in, with characters a device name may not hold replaced by '_'."""
    text = template.replace("{group}", group).replace("{edge_node}", edge_node).replace("{device}", device)
    return _NOT_NAME_CHARACTER.sub("_", text)


def _signed(raw: int, bits: int) -> int:
    """A signed Sparkplug integer from its unsigned field: 64-bit two's complement in long_value, 32-bit in int_value
    (Tahu's Java sign-extends Int8/Int16 to 32 bits), or N-bit for the implementations that store it in N bits."""
    if raw >= 1 << 63:
        return raw - (1 << 64)
    if bits < 64 and (1 << 31) <= raw < (1 << 32):
        return raw - (1 << 32)
    if bits < 32 and (1 << (bits - 1)) <= raw < (1 << bits):
        return raw - (1 << bits)
    return raw


class SparkplugInput:
    """Turns (topic, payload) on spBv1.0 topics into a SparkplugResult; keeps each edge node's births and sequence."""

    def __init__(
        self,
        settings: SparkplugSettings,
        features: Iterable[str],
        limits: dict[str, tuple[float, float]] | None = None,
        ingest: Any = None,
    ):
        """`settings`: the [sparkplug] section (or its Snapshot); `features`: the model's; `limits`: per feature the
        [low, high] readings accepted (agent.ingest.plausible_limits); `ingest`: the [ingest] section, for
        max_future_s and max_age_s (defaults 300 s and 7 days without it)."""
        self.settings = settings
        self.features = list(features)
        self.max_future_s = float(getattr(ingest, "max_future_s", 300.0))
        self.max_age_s = float(getattr(ingest, "max_age_s", 7 * 86400.0))
        self._feature_set = frozenset(self.features)
        self._mapped = dict(settings.metric_map)
        self._mapped_features = frozenset(self._mapped.values())
        self.set_limits(limits or {})
        unused = sorted(f for f in self._mapped_features if f not in self._feature_set)
        if unused:
            log.warning("sparkplug.metric_map names %s, which are no features of the model %s: those metrics are ignored", unused, self.features)
        self.groups = frozenset(settings.groups)
        self._nodes: dict[tuple[str, str], _Node] = {}
        self._device_count = 0
        self._last_rebirth: dict[tuple[str, str], float] = {}
        self.rebirths_requested = 0  # NCMDs handed out in results (a counter for the status / metrics)

    # -- configuration -----------------------------------------------------------------------------------------

    def set_limits(self, limits: dict[str, tuple[float, float]]) -> None:
        """The [low, high] range accepted per feature; features not named: any finite float."""
        self._bounds = {name: tuple(limits.get(name, (-sys.float_info.max, sys.float_info.max))) for name in self.features}

    def subscriptions(self) -> list[str]:
        """MQTT filters: spBv1.0/<group>/# per configured group, else spBv1.0/+/# (STATE messages are ignored)."""
        if not self.settings.groups:
            return [f"{NAMESPACE}/+/#"]
        return [f"{NAMESPACE}/{group}/#" for group in self.settings.groups]

    def feature_of(self, metric_name: str, datatype: int) -> str | None:
        """The feature a metric feeds, or None when it is not read (no feature; a Boolean not named in metric_map)."""
        mapped = self._mapped.get(metric_name)
        if mapped is not None:
            return mapped if mapped in self._feature_set else None
        if datatype == _BOOLEAN or metric_name in self._mapped_features:
            return None  # Booleans only when mapped; a feature that metric_map gives to another metric is not read by name
        return metric_name if metric_name in self._feature_set else None

    # -- state -------------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Edge nodes alive, devices with a birth, rebirth requests made."""
        return {
            "edge_nodes": sum(1 for n in self._nodes.values() if n.alive),
            "devices": self._device_count,
            "rebirths_requested": self.rebirths_requested,
        }

    def connection_lost(self) -> list[str]:
        """Call when the MQTT connection dropped: messages may be lost, so every known device gets a gap (returned),
        and each node's next message, unless its NBIRTH, continues its sequence and asks for a rebirth."""
        gaps: list[str] = []
        for node in self._nodes.values():
            if node.alive:
                gaps += node.device_names()
                node.seq = None
                node.resync = True
        return gaps

    # -- input -------------------------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes, now: float) -> SparkplugResult:
        """What one message on a spBv1.0 topic means; never raises on bad input."""
        result = SparkplugResult()
        try:
            self._handle(topic, payload, now, result)
        except Exception as exc:  # a bug here must cost one message, not the MQTT thread
            log.exception("sparkplug: unexpected error on %s", topic[:200])
            result.rejections.append(("sparkplug_decode", None, f"could not process the message: {type(exc).__name__}: {str(exc)[:160]}"))
        return result

    def _handle(self, topic: str, payload: bytes, now: float, result: SparkplugResult) -> None:
        levels = topic.split("/")
        if len(levels) == 3 and levels[0] == NAMESPACE and levels[1] == "STATE":
            return  # a host application's STATE: we are not a primary host
        if not (4 <= len(levels) <= 5) or levels[0] != NAMESPACE or levels[2] not in _KINDS or not all(levels[1:]):
            result.rejections.append(("unknown_topic", None, f"topic {topic[:200]!r} is not spBv1.0/<group>/<N|D message type>/<edge node>[/<device>]"))
            return
        group, kind, edge_node = levels[1], levels[2], levels[3]
        device_id = levels[4] if len(levels) == 5 else None
        if kind.endswith("CMD"):
            return  # commands to edge nodes (ours included): not data
        if (kind[0] == "D") != (device_id is not None):
            result.rejections.append(("unknown_topic", None, f"{kind} topic {topic[:200]!r} {'needs' if kind[0] == 'D' else 'has no'} a device level"))
            return
        if self.groups and group not in self.groups:
            result.rejections.append(("unknown_topic", None, f"group {group[:80]!r} is not in sparkplug.groups {sorted(self.groups)}"))
            return
        key = (group, edge_node)
        node = self._nodes.get(key)
        where = self._name_for(node, group, edge_node, device_id)
        if len(payload) > self.settings.max_payload_bytes:
            result.rejections.append(("oversized_payload", where, f"{len(payload)} bytes > sparkplug.max_payload_bytes={self.settings.max_payload_bytes}"))
            return
        try:
            message = pb.Payload.FromString(bytes(payload))
        except (DecodeError, ValueError, RuntimeError) as exc:
            result.rejections.append(("sparkplug_decode", where, f"{kind} payload is not a Sparkplug B protobuf: {str(exc)[:120]}"))
            return
        if message.HasField("seq") and message.seq > _MAX_SEQ:
            result.rejections.append(("sparkplug_decode", where, f"{kind} seq {message.seq} is outside 0..255"))
            return

        if kind == "NBIRTH":
            self._nbirth(key, message, now, result)
        elif kind == "NDEATH":
            self._ndeath(node, message, result)
        elif node is None or not node.alive:
            if kind == "DDEATH":
                return  # the node's devices are gone already (NDEATH) or were never known
            state = "no NBIRTH seen" if node is None else "it died (NDEATH) since its NBIRTH"
            result.rejections.append(("sparkplug_no_birth", where, f"{kind} from edge node {group}/{edge_node}: {state}; rebirth requested"))
            self._rebirth(key, now, result)
        else:
            self._node_message(node, kind, device_id, message, now, result)

    def _name_for(self, node: _Node | None, group: str, edge_node: str, device_id: str | None) -> str | None:
        """Our device name for a message's rejections (None when it cannot be one)."""
        if device_id is not None:
            if node is not None and device_id in node.devices:
                return node.devices[device_id].name
            name = _render(self.settings.device_template, group, edge_node, device_id)
        elif node is not None and node.device is not None:
            return node.device.name
        elif self.settings.node_template:
            name = _render(self.settings.node_template, group, edge_node)
        else:
            return None
        return name if DEVICE_NAME.fullmatch(name) else None

    def _nbirth(self, key: tuple[str, str], message: Any, now: float, result: SparkplugResult) -> None:
        group, edge_node = key
        old = self._nodes.get(key)
        if old is None and len(self._nodes) >= self.settings.max_edge_nodes and not self._evict_dead_node():
            result.rejections.append(("device_limit", None, f"NBIRTH of {group}/{edge_node}: sparkplug.max_edge_nodes={self.settings.max_edge_nodes} edge nodes are alive"))
            return
        device = None
        if self.settings.node_template:
            name = _render(self.settings.node_template, group, edge_node)
            if DEVICE_NAME.fullmatch(name):
                device = _Device(name)
            else:  # the node's devices are still read; its own metrics are not
                result.rejections.append(("unknown_topic", None, f"device name {name[:80]!r} from sparkplug.node_template is not allowed (letters, digits, _.:- ; at most 128)"))
        if old is not None:
            self._device_count -= len(old.devices) if old.alive else 0
        bdseq = None
        for metric in message.metrics:
            if metric.name == BDSEQ_METRIC:
                kind = metric.WhichOneof("value")
                bdseq = int(getattr(metric, kind)) if kind in ("int_value", "long_value") else None
        node = _Node(group, edge_node, device, bdseq, message.seq if message.HasField("seq") else None)
        self._nodes[key] = node
        log.debug("sparkplug: NBIRTH of %s/%s (bdSeq %s, seq %s)", group, edge_node, bdseq, node.seq)
        if device is not None:
            self._birth(device, message, now, result)

    def _evict_dead_node(self) -> bool:
        for key, node in self._nodes.items():
            if not node.alive:
                del self._nodes[key]
                return True
        return False

    def _ndeath(self, node: _Node | None, message: Any, result: SparkplugResult) -> None:
        if node is None or not node.alive:
            return
        bdseq = None
        for metric in message.metrics:
            if metric.name == BDSEQ_METRIC:
                kind = metric.WhichOneof("value")
                bdseq = int(getattr(metric, kind)) if kind in ("int_value", "long_value") else None
        if bdseq != node.bdseq:
            log.debug("sparkplug: stale NDEATH of %s/%s ignored (bdSeq %s, the NBIRTH's %s)", node.group, node.edge_node, bdseq, node.bdseq)
            return
        result.gaps += node.device_names()
        self._device_count -= len(node.devices)
        node.devices.clear()
        node.alive = False
        node.seq = None

    def _node_message(self, node: _Node, kind: str, device_id: str | None, message: Any, now: float, result: SparkplugResult) -> None:
        """DBIRTH, NDATA, DDATA, DDEATH of a node whose NBIRTH we have."""
        key = (node.group, node.edge_node)
        if message.HasField("seq"):
            expected = None if node.seq is None else (node.seq + 1) % (_MAX_SEQ + 1)
            node.seq = message.seq
            if expected is not None and message.seq != expected:
                where = node.device.name if node.device is not None else None
                result.rejections.append(("sparkplug_seq_gap", where, f"{kind} of edge node {node.group}/{node.edge_node} has seq {message.seq}, expected {expected}: messages were lost; rebirth requested"))
                result.gaps += node.device_names()
                self._rebirth(key, now, result)
        if node.resync:
            node.resync = False
            self._rebirth(key, now, result)
        if kind == "NDATA":
            if node.device is not None:
                self._data(node, node.device, message, now, result)
            return
        assert device_id is not None
        if kind == "DBIRTH":
            old = node.devices.pop(device_id, None)
            if old is not None:
                self._device_count -= 1
            node.refused.discard(device_id)
            name = _render(self.settings.device_template, node.group, node.edge_node, device_id)
            problem = None
            if self._device_count >= self.settings.max_devices:
                problem = ("device_limit", f"DBIRTH of {node.group}/{node.edge_node}/{device_id}: sparkplug.max_devices={self.settings.max_devices} devices have a birth")
            elif not DEVICE_NAME.fullmatch(name):
                problem = ("unknown_topic", f"device name {name[:80]!r} from sparkplug.device_template is not allowed (letters, digits, _.:- ; at most 128)")
            if problem is not None:
                result.rejections.append((problem[0], None, problem[1]))
                if len(node.refused) < _MAX_REFUSED:
                    node.refused.add(device_id)  # counted once here, not again with each DDATA (and no rebirth storm)
                return
            device = _Device(name)
            node.devices[device_id] = device
            self._device_count += 1
            self._birth(device, message, now, result)
            return
        device = node.devices.get(device_id)
        if kind == "DDEATH":
            node.refused.discard(device_id)
            if device is not None:
                del node.devices[device_id]
                self._device_count -= 1
                result.gaps.append(device.name)
            return
        if device is None:  # DDATA
            if device_id in node.refused:
                return
            where = self._name_for(node, node.group, node.edge_node, device_id)
            result.rejections.append(("sparkplug_no_birth", where, f"DDATA of {node.group}/{node.edge_node}/{device_id}: no DBIRTH seen since the node's NBIRTH; rebirth requested"))
            self._rebirth(key, now, result)
            return
        self._data(node, device, message, now, result)

    # -- metrics -----------------------------------------------------------------------------------------------

    def _birth(self, device: _Device, message: Any, now: float, result: SparkplugResult) -> None:
        """Learn a birth certificate's metrics (name, alias, datatype), then read its values like data."""
        for metric in message.metrics:
            if not metric.name:
                continue
            datatype = metric.datatype if metric.HasField("datatype") else _UNKNOWN_TYPE
            known = _Metric(metric.name, self.feature_of(metric.name, datatype), datatype)
            device.by_name[metric.name] = known
            if metric.HasField("alias"):
                device.aliases[metric.alias] = known
        self._read(device, message, now, result, birth=True)

    def _data(self, node: _Node, device: _Device, message: Any, now: float, result: SparkplugResult) -> None:
        self._read(device, message, now, result, birth=False, node=node)

    def _read(self, device: _Device, message: Any, now: float, result: SparkplugResult, birth: bool, node: _Node | None = None) -> None:
        default_ts = message.timestamp / 1000.0 if message.HasField("timestamp") else now
        rows: dict[float, dict[str, float]] = {}
        unknown: list[str] = []
        for metric in message.metrics:
            if metric.HasField("name") and metric.name:
                known = device.by_name.get(metric.name)
                if known is None:
                    # Not announced at birth: read it all the same when it is a feature whose type shows.
                    datatype = metric.datatype if metric.HasField("datatype") else _UNKNOWN_TYPE
                    known = _Metric(metric.name, self.feature_of(metric.name, datatype), datatype)
            elif metric.HasField("alias"):
                known = device.aliases.get(metric.alias)
                if known is None:
                    unknown.append(str(metric.alias))
                    continue
            else:
                continue  # neither name nor alias: nothing to go by
            if known.feature is None or metric.is_null:
                continue
            value = self._value(device.name, known, metric, result)
            if value is None:
                continue
            ts = metric.timestamp / 1000.0 if metric.HasField("timestamp") else default_ts
            if ts < now - self.max_age_s:
                result.rejections.append(("timestamp_out_of_range", device.name, f"{known.name}: timestamp {ts:.0f} is {now - ts:.0f} s old (ingest.max_age_s={self.max_age_s:.0f})"))
                continue
            if ts > now + self.max_future_s:
                result.rejections.append(("timestamp_out_of_range", device.name, f"{known.name}: timestamp {ts:.0f} is {ts - now:.0f} s ahead of the agent clock (ingest.max_future_s={self.max_future_s:.0f})"))
                continue
            rows.setdefault(ts, {})[known.feature] = value
        if unknown:
            result.rejections.append((
                "sparkplug_unknown_alias", device.name,
                f"{len(unknown)} metric alias(es) not in the birth certificate ({', '.join(unknown[:8])}); rebirth requested",
            ))
            if node is not None:
                self._rebirth((node.group, node.edge_node), now, result)
        for ts in sorted(rows):
            result.samples.append(Sample(device.name, ts, rows[ts], now))

    def _value(self, device: str, known: _Metric, metric: Any, result: SparkplugResult) -> float | None:
        """The metric's reading as a float; None when it is not read (rejections are added to `result`)."""
        kind = metric.WhichOneof("value")
        datatype = known.datatype
        if datatype == _UNKNOWN_TYPE and metric.HasField("datatype"):
            datatype = metric.datatype
        if kind is None:
            return None
        if kind == "boolean_value":
            if datatype not in (_BOOLEAN, _UNKNOWN_TYPE) or known.name not in self._mapped:
                return None  # a Boolean is a reading only where metric_map names it
            number = 1.0 if metric.boolean_value else 0.0
        elif kind in _NUMERIC_FIELDS:
            if datatype not in _SIGNED_BITS and datatype not in _UNSIGNED and datatype not in _FLOATS and datatype != _UNKNOWN_TYPE:
                return None  # DateTime (ms in long_value) and other non-numeric types
            raw = getattr(metric, kind)
            if kind in ("float_value", "double_value"):
                number = float(raw)
            else:
                number = float(_signed(raw, _SIGNED_BITS[datatype]) if datatype in _SIGNED_BITS else raw)
        else:
            if datatype in _SIGNED_BITS or datatype in _UNSIGNED or datatype in _FLOATS:
                result.rejections.append(("wrong_type", device, f"{known.name}: a {pb.DataType.Name(datatype)} metric carries {kind}"))
            return None
        if not math.isfinite(number):
            result.rejections.append(("non_finite", device, f"{known.name}: {number!r} is not finite"))
            return None
        low, high = self._bounds[known.feature]
        if not low <= number <= high:
            result.rejections.append(("out_of_range", device, f"{known.name}: {number:.6g} is outside the plausible range [{low:.6g}, {high:.6g}] (ingest.value_limits, ingest.plausible_range_stds)"))
            return None
        return number

    # -- rebirth -----------------------------------------------------------------------------------------------

    def _rebirth(self, key: tuple[str, str], now: float, result: SparkplugResult) -> None:
        """Add an NCMD Node Control/Rebirth for the edge node, unless one went out less than rebirth_min_interval_s ago."""
        if not self.settings.rebirth:
            return
        interval = self.settings.rebirth_min_interval_s
        last = self._last_rebirth.get(key)
        if last is not None and last <= now < last + interval:
            return
        if last is None and len(self._last_rebirth) >= 2 * self.settings.max_edge_nodes:
            self._last_rebirth = {k: t for k, t in self._last_rebirth.items() if t <= now < t + interval}
            if len(self._last_rebirth) >= 2 * self.settings.max_edge_nodes:
                return  # a flood of node names: no more commands until it passes
        self._last_rebirth[key] = now
        group, edge_node = key
        self.rebirths_requested += 1
        log.info("sparkplug: asking edge node %s/%s to rebirth", group, edge_node)
        result.commands.append((f"{NAMESPACE}/{group}/NCMD/{edge_node}", rebirth_payload(now)))
