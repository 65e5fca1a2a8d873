"""Sparkplug B input (agent/transport/sparkplug.py): births and aliases, sequence numbers, deaths, rebirth requests, and the
bytes over a real broker. Payloads are built with the generated protobuf code by a simulated edge node."""

from __future__ import annotations

import random
import re

import pytest
from bundles import PUMP_FEATURES
from conftest import REPO, wait_until

from agent.transport import sparkplug_b_pb2 as pb
from agent.core.events import REJECTION_REASONS, Sample
from agent.transport.ingest import DEVICE_NAME as INGEST_DEVICE_NAME
from agent.transport.sparkplug import DEVICE_NAME, REBIRTH_METRIC, SPARKPLUG_REJECTION_REASONS, SparkplugInput, SparkplugResult
from agent.config.sparkplug import SparkplugSettings

NOW = 1_763_737_200.0  # 2025-11-21T15:00:00Z
NOW_MS = int(NOW * 1000)
DT = pb.DataType
# alias, name, datatype of the simulated pump's metrics
PUMP_METRICS = [
    (10, "bearing_temp", DT.Double),
    (11, "vibration_rms", DT.Float),
    (12, "motor_current", DT.Double),
    (13, "outlet_pressure", DT.Double),
    (14, "Status/Running", DT.Boolean),
    (15, "Serial", DT.String),
]
GOOD = {"bearing_temp": 55.0, "vibration_rms": 2.5, "motor_current": 30.0, "outlet_pressure": 4.0}


def set_value(metric, datatype: int, value) -> None:
    if datatype == DT.Boolean:
        metric.boolean_value = bool(value)
    elif datatype == DT.String:
        metric.string_value = str(value)
    elif datatype == DT.Float:
        metric.float_value = value
    elif datatype == DT.Double:
        metric.double_value = value
    elif datatype in (DT.Int64, DT.UInt64, DT.DateTime):
        metric.long_value = value
    else:
        metric.int_value = value


class EdgeNode:
    """A simulated Sparkplug B edge node: the payloads a real one publishes, with seq (0..255) and bdSeq."""

    def __init__(self, group: str = "plant", node: str = "line1", devices: tuple[str, ...] = ("pump-01",), bdseq: int = 0):
        self.group, self.node, self.devices, self.bdseq = group, node, devices, bdseq
        self.seq = 0

    def topic(self, kind: str, device: str | None = None) -> str:
        return f"spBv1.0/{self.group}/{kind}/{self.node}" + (f"/{device}" if device else "")

    def payload(self, metrics: list[tuple], ts_ms: int = NOW_MS, seq: bool = True) -> bytes:
        """metrics: (name or None, alias or None, datatype or None, value[, metric ts_ms])"""
        message = pb.Payload(timestamp=ts_ms)
        if seq:
            message.seq = self.seq
            self.seq = (self.seq + 1) % 256
        for name, alias, datatype, value, *ts in metrics:
            metric = message.metrics.add()
            if name is not None:
                metric.name = name
            if alias is not None:
                metric.alias = alias
            if datatype is not None:
                metric.datatype = datatype
            if ts:
                metric.timestamp = ts[0]
            set_value(metric, datatype if datatype is not None else DT.Double, value)
        return message.SerializeToString()

    def births(self, values: dict[str, float] | None = None) -> list[tuple[str, bytes]]:
        """NBIRTH (seq restarts at 0, bdSeq, the rebirth control) then a DBIRTH per device with names, aliases, values."""
        self.seq = 0
        nbirth = self.payload([("bdSeq", None, DT.UInt64, self.bdseq), (REBIRTH_METRIC, 1, DT.Boolean, False)])
        out = [(self.topic("NBIRTH"), nbirth)]
        values = {**GOOD, **(values or {})}
        for device in self.devices:
            metrics = [(name, alias, datatype, values.get(name, True if datatype == DT.Boolean else "SN-1"))
                       for alias, name, datatype in PUMP_METRICS]
            out.append((self.topic("DBIRTH", device), self.payload(metrics)))
        return out

    def ddata(self, device: str, values: dict[str, float], ts_ms: int = NOW_MS) -> tuple[str, bytes]:
        """DDATA by alias (no names, no datatypes), as edge nodes send it after the birth."""
        aliases = {name: alias for alias, name, _ in PUMP_METRICS}
        metrics = [(None, aliases[name], None, value, ts_ms) for name, value in values.items()]
        return self.topic("DDATA", device), self.payload(metrics, ts_ms)

    def ddeath(self, device: str) -> tuple[str, bytes]:
        return self.topic("DDEATH", device), self.payload([])

    def ndeath(self, bdseq: int | None = None) -> tuple[str, bytes]:
        """The node's will: bdSeq, no seq."""
        return self.topic("NDEATH"), self.payload([("bdSeq", None, DT.UInt64, self.bdseq if bdseq is None else bdseq)], seq=False)

    def on_command(self, topic: str, payload: bytes) -> list[tuple[str, bytes]]:
        """Answer an NCMD Node Control/Rebirth = true with new births (same bdSeq: the same MQTT session)."""
        assert topic == self.topic("NCMD")
        message = pb.Payload.FromString(payload)
        if any(m.name == REBIRTH_METRIC and m.boolean_value for m in message.metrics):
            return self.births()
        return []


def make_input(features=PUMP_FEATURES, limits=None, **settings) -> SparkplugInput:
    return SparkplugInput(SparkplugSettings(**settings), features, limits)


def feed(spb: SparkplugInput, messages, now: float = NOW) -> SparkplugResult:
    """handle() each message; the results merged in order."""
    total = SparkplugResult()
    for topic, payload in messages:
        result = spb.handle(topic, payload, now)
        total.samples += result.samples
        total.gaps += result.gaps
        total.rejections += result.rejections
        total.commands += result.commands
    return total


def reasons(result: SparkplugResult) -> list[str]:
    return [reason for reason, _, _ in result.rejections]


def is_rebirth(command: tuple[str, bytes], node: EdgeNode) -> bool:
    topic, payload = command
    message = pb.Payload.FromString(payload)
    [metric] = message.metrics
    return topic == node.topic("NCMD") and metric.name == REBIRTH_METRIC and metric.datatype == DT.Boolean and metric.boolean_value


@pytest.fixture
def node() -> EdgeNode:
    return EdgeNode()


@pytest.fixture
def born(node):
    """A SparkplugInput that has seen the node's births."""
    spb = make_input()
    result = feed(spb, node.births())
    assert not result.rejections and not result.commands
    return spb


# -- births and data ------------------------------------------------------------------------------------------


def test_subscriptions_cover_configured_groups_or_all():
    """Without groups the input subscribes to spBv1.0/+/#; with groups to spBv1.0/<group>/# each."""
    assert make_input().subscriptions() == ["spBv1.0/+/#"]
    assert make_input(groups=["plant", "Site B"]).subscriptions() == ["spBv1.0/plant/#", "spBv1.0/Site B/#"]


def test_birth_values_and_data_by_alias_become_samples(node):
    """A DBIRTH's values are read, and DDATA sent by alias alone maps back to the features learned at birth."""
    spb = make_input()
    result = feed(spb, node.births())
    assert result.samples == [Sample("line1.pump-01", NOW, GOOD, NOW)]
    topic, payload = node.ddata("pump-01", {"bearing_temp": 61.5, "motor_current": 31.0}, ts_ms=NOW_MS + 60_000)
    result = spb.handle(topic, payload, NOW + 61)
    assert result == SparkplugResult(samples=[Sample("line1.pump-01", NOW + 60, {"bearing_temp": 61.5, "motor_current": 31.0}, NOW + 61)])


def test_timestamp_is_the_metrics_then_the_payloads_then_now(node, born):
    """A metric's own timestamp (ms) wins, else the payload's, else the arrival time."""
    message = pb.Payload(seq=node.seq)
    node.seq += 1
    message.metrics.add(alias=10, double_value=50.0, timestamp=NOW_MS - 30_000)
    message.metrics.add(alias=11, float_value=2.0)
    result = born.handle(node.topic("DDATA", "pump-01"), message.SerializeToString(), NOW)
    assert [(s.ts, s.values) for s in result.samples] == [(NOW - 30, {"bearing_temp": 50.0}), (NOW, {"vibration_rms": 2.0})]
    message.timestamp = NOW_MS - 10_000
    message.seq = node.seq
    node.seq += 1
    result = born.handle(node.topic("DDATA", "pump-01"), message.SerializeToString(), NOW)
    assert [(s.ts, s.values) for s in result.samples] == [(NOW - 30, {"bearing_temp": 50.0}), (NOW - 10, {"vibration_rms": 2.0})]


def test_metric_map_booleans_and_non_features():
    """metric_map renames metrics to features; unmapped Booleans, strings and non-features are ignored, not rejected."""
    node = EdgeNode(devices=())
    spb = make_input(features=["bearing_temp", "running", "Serial"], metric_map={"Sensors/Bearing Temp": "bearing_temp", "Status/Running": "running"})
    [nbirth] = node.births()
    dbirth = node.topic("DBIRTH", "pump-01"), node.payload([
        ("Sensors/Bearing Temp", 1, DT.Double, 70.0),
        ("bearing_temp", 2, DT.Double, 99.0),  # metric_map gives the feature to the other metric
        ("Status/Running", 3, DT.Boolean, True),
        ("Serial", 4, DT.String, "SN-7"),  # a feature's name, but not a number
        ("Door/Open", 5, DT.Boolean, True),  # a Boolean not in metric_map
        ("Other", 6, DT.Double, 1.0),
    ])
    result = feed(spb, [nbirth, dbirth])
    assert result.rejections == []
    assert result.samples == [Sample("line1.pump-01", NOW, {"bearing_temp": 70.0, "running": 1.0}, NOW)]


def test_a_boolean_named_after_a_feature_is_not_read_unless_mapped(node):
    """A Boolean metric is not turned into a number just because its name is a feature."""
    spb = make_input(features=["Status/Running"])
    result = feed(spb, node.births())
    assert result.samples == [] and result.rejections == []


@pytest.mark.parametrize(
    "datatype, field, raw, expected",
    [
        (DT.Int8, "int_value", 251, -5.0),  # 8-bit two's complement
        (DT.Int8, "int_value", 2**32 - 5, -5.0),  # sign-extended to 32 bits (Tahu's Java)
        (DT.Int16, "int_value", 2**16 - 300, -300.0),
        (DT.Int32, "int_value", 2**32 - 7, -7.0),
        (DT.Int64, "long_value", 2**64 - 9, -9.0),
        (DT.UInt32, "int_value", 2**32 - 1, float(2**32 - 1)),
        (DT.UInt64, "long_value", 2**40, float(2**40)),
        (DT.Float, "float_value", 1.5, 1.5),
    ],
)
def test_integer_types_decode_with_their_sign(node, datatype, field, raw, expected):
    """Signed integers stored two's complement in the unsigned fields read back negative; unsigned ones stay positive."""
    spb = make_input(features=["level"])
    birth = pb.Payload(timestamp=NOW_MS, seq=0)
    metric = birth.metrics.add(name="level", alias=1, datatype=datatype)
    setattr(metric, field, raw)
    result = spb.handle(node.topic("NBIRTH"), birth.SerializeToString(), NOW)
    assert result.rejections == [] and [s.values for s in result.samples] == [{"level": expected}]


def test_datetime_metrics_are_not_readings(node):
    """A DateTime metric (ms in long_value) is not a number of the model even when named like a feature."""
    spb = make_input(features=["last_service"])
    birth = pb.Payload(timestamp=NOW_MS, seq=0)
    birth.metrics.add(name="last_service", alias=1, datatype=DT.DateTime, long_value=NOW_MS)
    result = spb.handle(node.topic("NBIRTH"), birth.SerializeToString(), NOW)
    assert result.samples == [] and result.rejections == []


@pytest.mark.parametrize("value, reason", [(float("nan"), "non_finite"), (float("inf"), "non_finite"), (1e30, "out_of_range")])
def test_impossible_values_are_rejected_with_a_reason_and_the_rest_kept(node, value, reason):
    """NaN/inf are non_finite and values outside the plausible limits out_of_range; the message's other metrics stay."""
    spb = make_input(limits={"bearing_temp": (-40.0, 250.0)})
    feed(spb, node.births())
    result = feed(spb, [node.ddata("pump-01", {"bearing_temp": value, "motor_current": 30.0})])
    assert [(r, d) for r, d, _ in result.rejections] == [(reason, "line1.pump-01")]
    assert [s.values for s in result.samples] == [{"motor_current": 30.0}]


def test_timestamps_far_from_the_agent_clock_are_rejected(node, born):
    """A metric timestamp older than ingest.max_age_s or further ahead than max_future_s is timestamp_out_of_range."""
    old = node.ddata("pump-01", {"bearing_temp": 50.0}, ts_ms=NOW_MS - 8 * 86400 * 1000)
    ahead = node.ddata("pump-01", {"bearing_temp": 50.0}, ts_ms=NOW_MS + 3600 * 1000)
    result = feed(born, [old, ahead])
    assert reasons(result) == ["timestamp_out_of_range"] * 2 and result.samples == []


def test_wrong_value_field_for_a_numeric_type_is_wrong_type(node, born):
    """A Double metric that carries a string is rejected as wrong_type."""
    topic, payload = node.topic("DDATA", "pump-01"), node.payload([(None, 10, DT.String, "hot")])
    result = born.handle(topic, payload, NOW)
    assert reasons(result) == ["wrong_type"] and result.samples == []


def test_node_level_metrics_are_a_device_named_after_the_edge_node(node):
    """NBIRTH/NDATA metrics become samples of the device named by node_template (default: the edge node ID)."""
    spb = make_input(features=["ambient_temp"])
    birth = node.topic("NBIRTH"), node.payload([("bdSeq", None, DT.UInt64, 0), ("ambient_temp", 7, DT.Double, 21.0)])
    data = node.topic("NDATA"), node.payload([(None, 7, None, 22.5)])
    result = feed(spb, [birth, data])
    assert [(s.device, s.values) for s in result.samples] == [("line1", {"ambient_temp": 21.0}), ("line1", {"ambient_temp": 22.5})]
    spb = make_input(features=["ambient_temp"], node_template="")
    assert feed(spb, [birth, data]).samples == []


def test_device_names_follow_the_template_and_lose_characters_a_name_may_not_hold():
    """Spaces and other characters of Sparkplug IDs become '_', so the name is one of ours (and one topic level)."""
    node = EdgeNode(group="Site B", node="Edge Node 1", devices=("Pump 7",))
    result = feed(make_input(), node.births())
    assert {s.device for s in result.samples} == {"Edge_Node_1.Pump_7"}
    result = feed(make_input(device_template="{group}:{edge_node}:{device}"), EdgeNode(devices=("p1",)).births())
    assert {s.device for s in result.samples} == {"plant:line1:p1"}


def test_device_name_rule_is_the_ingest_rule():
    """The Sparkplug input allows exactly the device names agent/transport/ingest.py allows."""
    assert DEVICE_NAME.pattern == INGEST_DEVICE_NAME.pattern


# -- sequence numbers, deaths and rebirth -------------------------------------------------------------------------


def test_data_before_any_birth_is_dropped_and_a_rebirth_requested_at_most_every_interval(node):
    """NDATA/DDATA before the NBIRTH: sparkplug_no_birth, no samples, and one NCMD rebirth per rebirth_min_interval_s."""
    spb = make_input()
    node.seq = 17
    first = feed(spb, [node.ddata("pump-01", GOOD)], NOW)
    assert reasons(first) == ["sparkplug_no_birth"] and first.samples == []
    assert len(first.commands) == 1 and is_rebirth(first.commands[0], node)
    again = feed(spb, [node.ddata("pump-01", GOOD), (node.topic("NDATA"), node.payload([]))], NOW + 4.9)
    assert reasons(again) == ["sparkplug_no_birth"] * 2 and again.commands == []
    later = feed(spb, [node.ddata("pump-01", GOOD)], NOW + 5.0)
    assert len(later.commands) == 1
    assert spb.stats()["rebirths_requested"] == 2


def test_rebirth_requests_can_be_switched_off(node):
    """With sparkplug.rebirth = false, data without a birth is still rejected but no NCMD is produced."""
    spb = make_input(rebirth=False)
    result = feed(spb, [node.ddata("pump-01", GOOD)])
    assert reasons(result) == ["sparkplug_no_birth"] and result.commands == []


def test_the_node_answers_the_ncmd_with_births_and_data_flows(node):
    """After the rebirth NCMD, the node's new NBIRTH/DBIRTH teach the aliases and its DDATA becomes samples."""
    spb = make_input()
    result = feed(spb, [node.ddata("pump-01", GOOD)])
    [command] = result.commands
    result = feed(spb, node.on_command(*command) + [node.ddata("pump-01", {"vibration_rms": 3.5})])
    assert result.rejections == [] and result.samples[-1].values == {"vibration_rms": 3.5}


def test_seq_gap_restarts_every_device_of_the_node_and_requests_a_rebirth():
    """A jump in seq is counted as sparkplug_seq_gap, gaps every device of the node, asks for a rebirth, keeps the data."""
    node = EdgeNode(devices=("pump-01", "pump-02"))
    spb = make_input()
    feed(spb, node.births())
    feed(spb, [node.ddata("pump-01", GOOD)])
    node.ddata("pump-02", GOOD)  # published, never received
    result = feed(spb, [node.ddata("pump-01", {"bearing_temp": 56.0})])
    assert [(r, d) for r, d, _ in result.rejections] == [("sparkplug_seq_gap", "line1")]
    assert "expected" in result.rejections[0][2]
    assert result.gaps == ["line1", "line1.pump-01", "line1.pump-02"]
    assert len(result.commands) == 1 and is_rebirth(result.commands[0], node)
    assert [s.values for s in result.samples] == [{"bearing_temp": 56.0}]
    result = feed(spb, [node.ddata("pump-02", GOOD)])  # the sequence continues from the message after the gap
    assert result.rejections == [] and result.gaps == []


def test_seq_wraps_around_modulo_256(node, born):
    """seq goes 254, 255, 0, 1 ... over NDATA/DDATA without a gap."""
    result = feed(born, [node.ddata("pump-01", {"bearing_temp": 50.0 + i % 7}) for i in range(600)])
    assert result.rejections == [] and result.gaps == [] and len(result.samples) == 600


def test_unknown_alias_is_rejected_and_a_rebirth_requested(node, born):
    """DDATA with an alias its DBIRTH did not announce: sparkplug_unknown_alias, rebirth; known aliases still read."""
    topic, payload = node.topic("DDATA", "pump-01"), node.payload([(None, 99, None, 1.0), (None, 10, None, 57.0)])
    result = born.handle(topic, payload, NOW)
    assert reasons(result) == ["sparkplug_unknown_alias"] and len(result.commands) == 1
    assert [s.values for s in result.samples] == [{"bearing_temp": 57.0}]


def test_ddeath_restarts_the_device_and_its_data_then_needs_a_new_dbirth(node, born):
    """DDEATH gaps the device (never data); DDATA after it is sparkplug_no_birth until the device's next DBIRTH."""
    result = feed(born, [node.ddeath("pump-01")])
    assert result == SparkplugResult(gaps=["line1.pump-01"])
    result = feed(born, [node.ddata("pump-01", GOOD)])
    assert reasons(result) == ["sparkplug_no_birth"] and len(result.commands) == 1
    result = feed(born, node.on_command(*result.commands[0]) + [node.ddata("pump-01", GOOD)])
    assert result.rejections == [] and result.samples[-1].values == GOOD


def test_ndeath_with_the_births_bdseq_restarts_all_devices_of_the_node():
    """NDEATH whose bdSeq matches the NBIRTH's gaps the node and all its devices; data after it waits for a birth."""
    node = EdgeNode(devices=("pump-01", "pump-02"), bdseq=4)
    spb = make_input()
    feed(spb, node.births())
    result = feed(spb, [node.ndeath()])
    assert result == SparkplugResult(gaps=["line1", "line1.pump-01", "line1.pump-02"])
    assert spb.stats()["edge_nodes"] == 0
    result = feed(spb, [node.ddata("pump-01", GOOD)])
    assert reasons(result) == ["sparkplug_no_birth"] and result.samples == []


def test_a_stale_ndeath_is_ignored():
    """An NDEATH with an older session's bdSeq (a late will) changes nothing."""
    node = EdgeNode(bdseq=5)
    spb = make_input()
    feed(spb, node.births())
    assert feed(spb, [node.ndeath(bdseq=4)]) == SparkplugResult()
    result = feed(spb, [node.ddata("pump-01", GOOD)])
    assert result.rejections == [] and len(result.samples) == 1


def test_connection_lost_gaps_every_device_and_resyncs_with_one_rebirth(node, born):
    """After a lost connection every known device restarts; the next message continues the sequence, asking one rebirth."""
    assert born.connection_lost() == ["line1", "line1.pump-01"]
    node.seq = 200  # messages were missed meanwhile
    result = feed(born, [node.ddata("pump-01", GOOD), node.ddata("pump-01", GOOD)])
    assert result.rejections == [] and len(result.samples) == 2 and len(result.commands) == 1


def test_state_and_commands_are_not_data(node, born):
    """STATE (host applications), NCMD and DCMD messages yield nothing."""
    for topic in ("spBv1.0/STATE/scada-1", node.topic("NCMD"), node.topic("DCMD", "pump-01")):
        assert born.handle(topic, b'{"online": true}', NOW) == SparkplugResult()


def test_groups_not_configured_and_malformed_topics_are_unknown_topic(node):
    """Topics outside sparkplug.groups, unknown message types or missing levels are rejected as unknown_topic."""
    spb = make_input(groups=["other"])
    topics = [node.topic("NBIRTH"), "spBv1.0/other/NDATA", "spBv1.0/other/DDATA/line1", "spBv1.0/other/NDATA/line1/x",
              "spBv1.0/other/XDATA/line1", "spBv1.0/other//line1", "spAv1.0/other/NDATA/line1"]
    for topic in topics:
        assert reasons(spb.handle(topic, b"", NOW)) == ["unknown_topic"], topic


def test_limits_on_edge_nodes_and_devices(node):
    """Births beyond sparkplug.max_devices / max_edge_nodes are device_limit; a dead node's place is reused."""
    spb = make_input(max_devices=1)
    two = EdgeNode(devices=("pump-01", "pump-02"))
    assert reasons(feed(spb, two.births())) == ["device_limit"]
    spb = make_input(max_edge_nodes=1)
    feed(spb, node.births())
    other = EdgeNode(node="line2")
    assert reasons(feed(spb, other.births()[:1])) == ["device_limit"]
    feed(spb, [node.ndeath()])
    assert feed(spb, other.births()).rejections == []


def test_data_of_a_device_whose_birth_was_refused_is_dropped_quietly():
    """A DBIRTH refused (device_limit, or a name not allowed) is counted once; its DDATA neither counts nor asks rebirth."""
    node = EdgeNode(devices=("pump-01", "pump-02"))
    spb = make_input(max_devices=1)
    assert reasons(feed(spb, node.births())) == ["device_limit"]
    result = feed(spb, [node.ddata("pump-02", GOOD), node.ddata("pump-01", GOOD)])
    assert result.rejections == [] and result.commands == [] and [s.device for s in result.samples] == ["line1.pump-01"]


def test_an_edge_node_name_that_cannot_be_a_device_still_has_its_devices_read():
    """When node_template gives no valid name (here: too long) the node's own metrics are skipped, its devices are read."""
    node = EdgeNode(node="n" * 130, devices=("p1",))
    spb = make_input(device_template="x.{device}")
    result = feed(spb, node.births())
    assert reasons(result) == ["unknown_topic"] and {s.device for s in result.samples} == {"x.p1"}


def test_runs_on_the_frozen_settings_the_daemon_uses(node):
    """SparkplugInput takes the section's Snapshot (agent.config.freeze) as well as the pydantic model."""
    from agent.config.settings import freeze

    spb = SparkplugInput(freeze(SparkplugSettings(metric_map={"Temp": "bearing_temp"}, groups=["plant"])), PUMP_FEATURES)
    assert spb.subscriptions() == ["spBv1.0/plant/#"]
    assert feed(spb, node.births()).samples == [Sample("line1.pump-01", NOW, {k: v for k, v in GOOD.items() if k != "bearing_temp"}, NOW)]


def test_bad_payloads_become_rejections_never_exceptions(node):
    """Random bytes, truncations, oversized payloads and seq > 255 are rejections from the documented vocabulary."""
    spb = make_input(max_payload_bytes=1024)
    feed(spb, node.births())
    allowed = set(REJECTION_REASONS) | set(SPARKPLUG_REJECTION_REASONS)
    rng = random.Random(7)
    good = node.ddata("pump-01", GOOD)[1]
    cases = [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))) for _ in range(300)]
    cases += [good[:cut] for cut in range(1, len(good))] + [b"\x00" * 2000, pb.Payload(seq=300).SerializeToString()]
    seen = set()
    for payload in cases:
        for kind, device in (("DDATA", "pump-01"), ("NDATA", None), ("NBIRTH", None), ("DBIRTH", "pump-02"), ("NDEATH", None)):
            result = spb.handle(node.topic(kind, device), payload, NOW)
            seen.update(reasons(result))
            assert set(reasons(result)) <= allowed
    assert {"sparkplug_decode", "oversized_payload"} <= seen


def test_new_reasons_are_named_for_the_counters():
    """The reasons Sparkplug adds are prefixed sparkplug_ and part of the one vocabulary (counters, errors topic)."""
    assert set(SPARKPLUG_REJECTION_REASONS) <= set(REJECTION_REASONS)
    assert all(r.startswith("sparkplug_") for r in SPARKPLUG_REJECTION_REASONS)


# -- settings and the schema ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"device_template": "{edge_node}/{device}"}, "join the parts with '.'"),
        ({"device_template": "{edge_node}"}, "must contain {device}"),
        ({"device_template": "{node}.{device}"}, "unknown placeholder {node}"),
        ({"node_template": "{edge_node}.{device}"}, "not {device}"),
        ({"metric_map": {"A": "bearing_temp", "B": "bearing_temp"}}, "map one metric per feature"),
        ({"groups": ["plant", "plant"]}, "twice"),
        ({"groups": ["plant/x"]}, "pattern"),
        ({"rebirth_min_interval_s": True}, "not a boolean"),
        ({"unknown": 1}, "Extra inputs"),
    ],
)
def test_settings_refuse_unusable_values_with_an_actionable_message(settings, message):
    """Bad templates, duplicate mappings, wildcard groups, booleans for numbers and unknown keys fail validation."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=re.escape(message)):
        SparkplugSettings(**settings)


def test_settings_defaults_are_off_and_valid():
    """The section validates with defaults: disabled, every group, '{edge_node}.{device}' names, 5 s between rebirths."""
    s = SparkplugSettings()
    assert (s.enabled, s.groups, s.device_template, s.node_template, s.rebirth_min_interval_s) == (False, [], "{edge_node}.{device}", "{edge_node}", 5.0)
    for name, info in SparkplugSettings.model_fields.items():
        assert info.description, name


def test_generated_code_matches_the_proto_beside_it():
    """agent/transport/sparkplug_b_pb2.py is the code of agent/sparkplug_b.proto: same package, fields and numbers, DataType values."""
    text = (REPO / "agent" / "transport" / "sparkplug_b.proto").read_text()
    text = re.sub(r"//[^\n]*", "", text)
    fields_in_proto = set(re.findall(r"(\w+)\s*=\s*(\d+)\s*;", text))  # fields and enum values
    assert "package org.eclipse.tahu.protobuf;" in text

    def walk(descriptor):
        for f in descriptor.fields:
            yield f.name, str(f.number)
        for nested in descriptor.nested_types:
            yield from walk(nested)

    generated = set(walk(pb.Payload.DESCRIPTOR)) | {(v.name, str(v.number)) for v in pb.DataType.DESCRIPTOR.values}
    assert pb.DESCRIPTOR.package == "org.eclipse.tahu.protobuf"
    assert generated == fields_in_proto


# -- over a real broker -----------------------------------------------------------------------------------------


@pytest.mark.mqtt
def test_over_mosquitto_rebirth_ncmd_reaches_the_node_and_its_births_and_data_decode(make_probe):
    """Bytes published by an edge node over paho decode in handle(); our rebirth NCMD reaches the node, which
    answers with a new NBIRTH/DBIRTH, after which its DDATA by alias become samples."""
    spb = make_input()
    node = EdgeNode()
    host = make_probe(subscribe=spb.subscriptions(), client_id="edgecast-host")
    edge = make_probe(subscribe=node.topic("NCMD"), client_id="edge-node")

    def receive(kind: str) -> SparkplugResult:
        """The host's next message of that type, through handle(); commands it yields are published (QoS 0)."""
        msg = host.expect(node.topic(kind, None if kind[0] == "N" else "pump-01"), timeout=10)
        result = spb.handle(msg.topic, msg.payload, NOW)
        for topic, payload in result.commands:
            host.publish(topic, payload, qos=0, retain=False)
        return result

    # The node was born before we subscribed: its data arrives without a birth.
    node.births()
    edge.publish(*node.ddata("pump-01", GOOD))
    result = receive("DDATA")
    assert reasons(result) == ["sparkplug_no_birth"] and len(result.commands) == 1
    ncmd = edge.expect(node.topic("NCMD"), timeout=10)
    assert (ncmd.qos, ncmd.retain) == (0, False)
    for topic, payload in node.on_command(ncmd.topic, ncmd.payload):
        edge.publish(topic, payload)
    assert receive("NBIRTH") == SparkplugResult()
    assert receive("DBIRTH").samples == [Sample("line1.pump-01", NOW, GOOD, NOW)]
    edge.publish(*node.ddata("pump-01", {"bearing_temp": 63.25, "vibration_rms": 2.75}))
    result = receive("DDATA")
    assert result.rejections == [] and [s.values for s in result.samples] == [{"bearing_temp": 63.25, "vibration_rms": 2.75}]
    edge.publish(*node.ndeath())
    assert receive("NDEATH").gaps == ["line1", "line1.pump-01"]


def test_a_sparkplug_device_gets_forecasts_and_an_alert_from_the_daemon(start_agent, make_probe, model_path):
    """The daemon with `[sparkplug] enabled`: a simulated edge node's births and DDATA by alias give forecasts and,
    on a fault, an alert, as JSON input does; a sequence gap is counted and answered with a rebirth NCMD; a DDEATH
    restarts the device's window (forecasts resume only after a full window again)."""
    import json

    from conftest import healthy_rows

    agent = start_agent(sparkplug={"enabled": True})
    lookback = json.loads((model_path / "manifest.json").read_text())["lookback"]
    device = "line1.pump-00"
    watcher = make_probe(subscribe=f"edgecast/{device}/#")
    edge = make_probe(subscribe="spBv1.0/plant/NCMD/line1", client_id="edge-line1")
    node = EdgeNode(devices=("pump-00",))
    for topic, payload in node.births():
        edge.publish(topic, payload, qos=0)
    rows = healthy_rows(devices=1, rows=150, seed=8, faults="spikes:pump-00@1.5+2")
    for _, ts, values in rows:
        edge.publish(*node.ddata("pump-00", values, ts_ms=ts * 1000), qos=0)
    new = watcher.expect(f"edgecast/{device}/alert", lambda m: m.json()["state"] == "new", timeout=60)
    assert new.json()["device"] == device and new.json()["started_at"] >= rows[0][1] + 90 * 60
    forecasts = watcher.collect(f"edgecast/{device}/forecast", len(rows) - lookback + 1, timeout=60)
    # The DBIRTH's own values (GOOD, at NOW) came before the rows: every row after the first full window forecasts.
    assert [m.json()["ts"] for m in forecasts][-1] == rows[-1][1]
    # A lost message (seq jumps): counted, and the node is asked to rebirth.
    node.seq = (node.seq + 3) % 256
    later = rows[-1][1] + 60
    edge.publish(*node.ddata("pump-00", rows[-1][2], ts_ms=later * 1000), qos=0)
    ncmd = edge.expect("spBv1.0/plant/NCMD/line1", timeout=20)
    assert any(m.name == REBIRTH_METRIC and m.boolean_value for m in pb.Payload.FromString(ncmd.payload).metrics)
    wait_until(lambda: agent.stats()["rejected"]["sparkplug_seq_gap"] == 1, timeout=10, message="the seq gap counted")
    # A DDEATH: the window starts over; the next readings make no forecast until a full window has come again.
    edge.publish(*node.ddeath("pump-00"), qos=0)
    for topic, payload in node.births():
        edge.publish(topic, payload, qos=0)
    before = len([m for m in watcher.history if m.topic.endswith("/forecast")])
    for k in range(5):
        edge.publish(*node.ddata("pump-00", rows[-1][2], ts_ms=(later + 60 * (k + 1)) * 1000), qos=0)
    wait_until(lambda: agent.stats()["pipeline"]["input_gaps"] >= 1, timeout=20, message="the death as a window restart")
    watcher.quiet("#", 1.0)
    assert len([m for m in watcher.history if m.topic.endswith("/forecast")]) == before
    assert agent.stats()["sparkplug"]["edge_nodes"] == 1
