"""Ingest: topic templates, both payload forms, timestamps, and every rejection reason (no broker)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest
from bundles import PUMP_FEATURES

from agent.config.settings import Settings
from agent.core.events import Rejected
from agent.transport.ingest import Ingest, parse_timestamp

NOW = 1_763_737_200.0  # 2025-11-21T15:00:00Z
GOOD = {"bearing_temp": 55.0, "vibration_rms": 2.5, "motor_current": 30.0, "outlet_pressure": 4.0}
TOPIC = "sensors/pump-01/telemetry"


def make_ingest(**sections) -> Ingest:
    return Ingest(Settings(**sections), PUMP_FEATURES)


def telemetry(values=None, ts=NOW, **extra) -> bytes:
    return json.dumps({"ts": ts, "values": GOOD if values is None else values, **extra}).encode()


def rejection(ingest: Ingest, topic: str, payload: bytes) -> Rejected:
    with pytest.raises(Rejected) as caught:
        ingest.parse(topic, payload, NOW)
    return caught.value


@pytest.fixture
def ingest() -> Ingest:
    return make_ingest()


def test_telemetry_payload_becomes_one_complete_sample(ingest):
    """A valid telemetry message yields one Sample with every feature, its ts, and the arrival time."""
    [sample] = ingest.parse(TOPIC, telemetry(ts=NOW - 30), NOW)
    assert (sample.device, sample.ts, sample.values, sample.received_at) == ("pump-01", NOW - 30, GOOD, NOW)


def test_queued_samples_share_their_device_and_feature_name_strings(ingest):
    """Samples of one device share one device string and the ingest's feature names (not each message's own copies)."""
    first, second = (ingest.parse(TOPIC.encode().decode(), telemetry(ts=NOW - k), NOW)[0] for k in (20, 10))
    assert first.device is second.device
    features = {name: name for name in PUMP_FEATURES}
    for sample in (first, second):
        assert all(key is ingest._feature_names[key] for key in sample.values) and sample.values.keys() == features.keys()
    assert all(a is b for a, b in zip(first.values, second.values))
    [per_sensor] = ingest.parse("sensors/pump-01/vibration_rms", b"2.75", NOW)  # the per-sensor form too
    assert per_sensor.device is first.device and next(iter(per_sensor.values)) is ingest._feature_names["vibration_rms"]


@pytest.mark.parametrize(
    "ts, expected",
    [
        (NOW, NOW),
        (NOW - 0.25, NOW - 0.25),
        (int(NOW), NOW),
        ("2025-11-21T15:00:00Z", NOW),
        ("2025-11-21T16:00:00+01:00", NOW),
        ("2025-11-21T15:00:00", NOW),  # naive means UTC
        ("2025-11-21T14:59:59.500Z", NOW - 0.5),
    ],
)
def test_timestamps_unix_and_iso(ingest, ts, expected):
    """ts may be unix seconds (int or float) or ISO-8601 with Z, an offset, or naive (UTC)."""
    [sample] = ingest.parse(TOPIC, telemetry(ts=ts), NOW)
    assert sample.ts == pytest.approx(expected, abs=1e-6)


def test_parse_timestamp_agrees_with_datetime():
    """parse_timestamp of an ISO string equals datetime's own conversion."""
    text = "2026-03-01T12:34:56.789+05:30"
    assert parse_timestamp(text) == datetime.fromisoformat(text).astimezone(timezone.utc).timestamp()


def test_sensor_form_bare_number_is_timestamped_on_arrival(ingest):
    """A bare number on a per-sensor topic becomes a one-feature Sample stamped with the arrival time."""
    [sample] = ingest.parse("sensors/pump-02/vibration_rms", b"2.75", NOW)
    assert (sample.device, sample.ts, sample.values) == ("pump-02", NOW, {"vibration_rms": 2.75})


def test_sensor_form_object_with_ts(ingest):
    """A per-sensor {"ts", "value"} payload keeps its own timestamp."""
    payload = json.dumps({"ts": "2025-11-21T14:59:00Z", "value": 31}).encode()
    [sample] = ingest.parse("sensors/pump-02/motor_current", payload, NOW)
    assert (sample.ts, sample.values) == (NOW - 60, {"motor_current": 31.0})


def test_telemetry_template_wins_over_sensor_template(ingest):
    """`sensors/x/telemetry` fits both templates; it is parsed as telemetry, not as a sensor named telemetry."""
    [sample] = ingest.parse(TOPIC, telemetry(), NOW)
    assert sample.values == GOOD


def test_subscriptions_replace_placeholders_and_drop_covered_filters():
    """Filters use '+' for placeholders; one covered by another is not subscribed twice."""
    assert make_ingest().subscriptions() == ["sensors/+/+"]
    only_telemetry = make_ingest(topics={"sensor": None})
    assert only_telemetry.subscriptions() == ["sensors/+/telemetry"]
    custom = make_ingest(topics={"telemetry": "plant/a/{device}/rec", "sensor": "plant/b/{device}/s/{sensor}"})
    assert custom.subscriptions() == ["plant/a/+/rec", "plant/b/+/s/+"]


def test_placeholder_inside_a_level_matches_only_that_level():
    """A template like `site/pump-{device}/data` matches the literal part and subscribes to `site/+/data`."""
    ingest = make_ingest(topics={"telemetry": "site/pump-{device}/data", "sensor": None})
    assert ingest.subscriptions() == ["site/+/data"]
    [sample] = ingest.parse("site/pump-7/data", telemetry(), NOW)
    assert sample.device == "7"
    assert rejection(ingest, "site/valve-7/data", telemetry()).reason == "unknown_topic"


def test_unknown_feature_ignored_when_configured():
    """With ingest.unknown_features = "ignore" extra values are dropped and unknown sensors yield nothing."""
    ingest = make_ingest(ingest={"unknown_features": "ignore"})
    [sample] = ingest.parse(TOPIC, telemetry({**GOOD, "humidity": 40}), NOW)
    assert sample.values == GOOD
    assert ingest.parse("sensors/pump-01/humidity", b"40", NOW) == []


# -- every rejection reason ------------------------------------------------------------------------------------

REJECTIONS = [
    ("unknown_topic", "actuators/pump-01/telemetry", telemetry()),
    ("unknown_topic", "sensors/pump-01/telemetry/extra", telemetry()),
    ("oversized_payload", TOPIC, b"\xff" * 20000),  # checked before decoding: not invalid_utf8
    ("invalid_utf8", TOPIC, b'{"ts": 1, "values": "\xff\xfe"}'),
    ("malformed_json", TOPIC, b'{"ts": 1, "values": '),
    ("malformed_json", "sensors/pump-01/bearing_temp", b"hot"),
    ("wrong_type", TOPIC, telemetry({**GOOD, "bearing_temp": "55.0"})),
    ("wrong_type", TOPIC, telemetry({**GOOD, "bearing_temp": True})),
    ("wrong_type", TOPIC, telemetry({**GOOD, "bearing_temp": None})),
    ("wrong_type", TOPIC, telemetry({**GOOD, "bearing_temp": {"v": 1}})),
    ("wrong_type", TOPIC, telemetry([55.0, 2.5, 30.0, 4.0])),
    ("wrong_type", TOPIC, b"[1, 2, 3]"),
    ("wrong_type", "sensors/pump-01/bearing_temp", b"true"),
    ("wrong_type", "sensors/pump-01/bearing_temp", b'"55.2"'),
    ("wrong_type", "sensors/pump-01/bearing_temp", json.dumps({"ts": NOW}).encode()),
    ("missing_feature", TOPIC, telemetry({k: v for k, v in GOOD.items() if k != "outlet_pressure"})),
    ("unknown_feature", TOPIC, telemetry({**GOOD, "humidity": 40.0})),
    ("unknown_feature", "sensors/pump-01/humidity", b"40"),
    ("non_finite", TOPIC, telemetry().replace(b"55.0", b"NaN")),
    ("non_finite", TOPIC, telemetry().replace(b"55.0", b"-Infinity")),
    ("non_finite", TOPIC, telemetry().replace(b"55.0", b"1e999")),
    ("non_finite", TOPIC, telemetry().replace(b"55.0", b"1" + b"0" * 400)),  # an int too large for a float
    ("non_finite", "sensors/pump-01/bearing_temp", b"NaN"),
    ("bad_timestamp", TOPIC, telemetry(ts="yesterday")),
    ("bad_timestamp", TOPIC, telemetry(ts=True)),
    ("bad_timestamp", TOPIC, telemetry(ts=None)),
    ("bad_timestamp", TOPIC, json.dumps({"values": GOOD}).encode()),
    ("bad_timestamp", TOPIC, telemetry().replace(str(NOW).encode(), b"NaN")),
    ("timestamp_out_of_range", TOPIC, telemetry(ts=NOW - 8 * 86400)),  # older than max_age_s (7 days)
    ("timestamp_out_of_range", TOPIC, telemetry(ts=NOW + 3600)),  # further ahead than max_future_s (300 s)
    ("timestamp_out_of_range", TOPIC, telemetry(ts=NOW * 1000)),  # milliseconds by mistake
    ("timestamp_out_of_range", TOPIC, telemetry(ts="1999-01-01T00:00:00Z")),
]


@pytest.mark.parametrize("reason, topic, payload", REJECTIONS, ids=[f"{r}-{k}" for k, (r, _, _) in enumerate(REJECTIONS)])
def test_rejection_reasons(ingest, reason, topic, payload):
    """Each kind of bad input is refused with its fixed reason and names the device when the topic gave one."""
    rejected = rejection(ingest, topic, payload)
    assert rejected.reason == reason, rejected.detail
    assert rejected.detail
    assert rejected.device == (None if reason == "unknown_topic" else "pump-01")


@pytest.mark.parametrize("device", ["bad device", "x" * 200, "-leading-dash", "ünïcode"])
def test_bad_device_names_are_unknown_topics(ingest, device):
    """Device names must be one sane topic level (letters, digits, _.:-, at most 128 characters)."""
    assert rejection(ingest, f"sensors/{device}/telemetry", telemetry()).reason == "unknown_topic"


def test_payload_limit_is_configurable():
    """ingest.max_payload_bytes sets the size limit; a payload at the limit passes."""
    payload = telemetry()
    exact = make_ingest(ingest={"max_payload_bytes": len(payload)})
    assert exact.parse(TOPIC, payload, NOW)
    smaller = make_ingest(ingest={"max_payload_bytes": len(payload) - 1})
    assert rejection(smaller, TOPIC, payload).reason == "oversized_payload"
