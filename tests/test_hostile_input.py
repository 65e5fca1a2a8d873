"""Nothing let in: generated hostile topics and payloads never crash the ingest path; every rejection is counted.

A property-based run (hypothesis, > 10,000 messages) goes through Ingest.parse and the daemon's ErrorReporter
directly; a smaller deterministic run goes through a real broker into a running agent and must produce exactly
the counts the direct path predicts.
"""

from __future__ import annotations

import json
import math
import random
import time

import pytest
from conftest import FEATURES, PREFIX, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config.settings import Settings
from agent.transport.errors import ErrorReporter
from agent.core.events import REJECTION_REASONS, Rejected
from agent.transport.ingest import Ingest

NOW = 1_800_000_000.0
EXAMPLES = 2600  # each example is a batch of 4 messages: > 10,000 messages in all
BATCH = 4

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)
timestamp = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([NOW, NOW - 60, NOW - 10 * 365 * 86400, NOW + 86400 * 365 * 1000, 0, -1, 2**63, "2026-11-21T15:00:00Z",
                     "9999-12-31T23:59:59Z", "0001-01-01", "yesterday", "", " " * 100, True, None, [], {}]),
    st.text(max_size=70),
)
value = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-(10**400), max_value=10**400), json_value)
feature_name = st.one_of(st.sampled_from(FEATURES), st.text(max_size=10))
telemetry_object = st.fixed_dictionaries(
    {}, optional={"ts": timestamp, "values": st.one_of(st.dictionaries(feature_name, value, max_size=6), json_value), "extra": json_value}
)
per_sensor_object = st.fixed_dictionaries({}, optional={"ts": timestamp, "value": value})


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def encode(obj: object) -> bytes:
    return json.dumps(obj, allow_nan=True, default=str).encode("utf-8", "surrogatepass")


payload = st.one_of(
    telemetry_object.map(encode),
    per_sensor_object.map(encode),
    json_value.map(encode),
    value.map(encode),
    st.binary(max_size=64),  # mostly invalid UTF-8 or not JSON
    st.integers(min_value=0, max_value=5000).map(lambda n: deep(n).encode()),  # nesting past the recursion limit
    st.integers(min_value=17_000, max_value=40_000).map(lambda n: b'{"ts": 1, "values": {}, "pad": "' + b"x" * n + b'"}'),  # oversize
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b'{"ts": NaN}', b"1e999", b"-1e999", b"\xff\xfe", b"\xc3\x28", b"", b"null",
                     b'{"ts": 1800000000, "values": {"bearing_temp": 1e999}}']),
)
device = st.one_of(st.sampled_from(["pump-00", "pump-01"]), st.text(max_size=20))
good_device = st.sampled_from(["pump-00", "pump-01", "a" * 128, "x:y.z_1-2"])
topic = st.one_of(  # mostly well-formed topics, so that the payload checks get most of the traffic
    st.just("sensors/pump-00/telemetry"),
    st.tuples(good_device).map(lambda t: f"sensors/{t[0]}/telemetry"),
    st.tuples(good_device, feature_name).map(lambda t: f"sensors/{t[0]}/{t[1]}"),
    st.tuples(device).map(lambda t: f"sensors/{t[0]}/telemetry"),
    st.tuples(device, feature_name).map(lambda t: f"sensors/{t[0]}/{t[1]}"),
    st.text(max_size=40),
    st.sampled_from(["sensors//telemetry", "sensors/+/telemetry", "sensors/#", "/", "", "sensors/a/b/c", "sensors/" + "x" * 300 + "/telemetry"]),
)


class Tally:
    def __init__(self) -> None:
        self.reporter = ErrorReporter(None, 0)  # counts only; the daemon's own counters
        self.tried = self.accepted = self.rejected = 0


TALLY = Tally()


@pytest.fixture(scope="module")
def ingest() -> Ingest:
    return Ingest(Settings(), FEATURES)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(topic, payload), min_size=BATCH, max_size=BATCH))
def test_hostile_messages_never_crash_and_every_rejection_has_a_reason(ingest, messages):
    """Any topic and payload: parse returns valid samples or raises Rejected with a known reason; nothing else."""
    for t, p in messages:
        TALLY.tried += 1
        try:
            samples = ingest.parse(t, p, NOW)
        except Rejected as error:
            assert error.reason in REJECTION_REASONS
            TALLY.rejected += 1
            TALLY.reporter.rejected(error, t)
            continue
        TALLY.accepted += 1
        for sample in samples:
            assert set(sample.values) <= set(FEATURES) and sample.values
            assert all(isinstance(v, float) and math.isfinite(v) for v in sample.values.values())
            assert NOW - 7 * 86400 <= sample.ts <= NOW + 300


def test_hostile_run_tried_enough_and_the_counts_add_up():
    """(runs after the property) > 10,000 messages tried; per-reason counts sum to the rejections, none lost."""
    if TALLY.tried == 0:
        pytest.skip("run together with the property test")
    counts = TALLY.reporter.snapshot()
    print(f"\nhostile input: {TALLY.tried} messages, {TALLY.accepted} accepted, {TALLY.rejected} rejected: "
          f"{ {k: v for k, v in counts.items() if v} }")
    assert TALLY.tried >= 10_000
    assert sum(counts.values()) == TALLY.rejected == TALLY.reporter.total
    assert TALLY.accepted + TALLY.rejected == TALLY.tried
    assert sum(1 for v in counts.values() if v) >= 8, "the generator must reach most rejection reasons"


def hostile_corpus(n: int, seed: int, now: float) -> list[tuple[str, bytes]]:
    """Deterministic hostile messages that a broker will carry (valid UTF-8 topics, no wildcards)."""
    rng = random.Random(seed)
    good = {f: 50.0 for f in FEATURES}
    makers = [
        lambda: ("sensors/pump-00/telemetry", b"\xff\xfe\xfa"),
        lambda: ("sensors/pump-00/telemetry", b"{" * rng.randint(1, 3000)),
        lambda: ("sensors/pump-00/telemetry", b"[" * 5000 + b"]" * 5000),
        lambda: ("sensors/pump-00/telemetry", b'{"ts": 1, "values": {}, "pad": "' + b"x" * 20000 + b'"}'),
        lambda: ("sensors/pump-00/telemetry", json.dumps({"ts": now, "values": {**good, "bearing_temp": float("nan")}}).encode()),
        lambda: ("sensors/pump-00/telemetry", json.dumps({"ts": now, "values": {**good, "vibration_rms": 10**400}}).encode()),
        lambda: ("sensors/pump-00/telemetry", json.dumps({"ts": now - 10**9, "values": good}).encode()),
        lambda: ("sensors/pump-00/telemetry", json.dumps({"ts": now + 10**9, "values": good}).encode()),
        lambda: ("sensors/pump-00/telemetry", json.dumps({"ts": "not a time", "values": good}).encode()),
        lambda: ("sensors/pump-00/telemetry", json.dumps({"ts": now, "values": [1, 2, 3]}).encode()),
        lambda: ("sensors/pump-00/telemetry", json.dumps({"ts": now, "values": {"bearing_temp": 1}}).encode()),
        lambda: ("sensors/pump-00/telemetry", json.dumps({"ts": now, "values": {**good, "rpm": 3}}).encode()),
        lambda: ("sensors/pump-00/motor_current", b'"fifty"'),
        lambda: ("sensors/pump-00/humidity", b"3.5"),
        lambda: ("sensors/bad device!/telemetry", b"{}"),
        lambda: ("sensors/pump-00/telemetry", bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))),
    ]
    return [makers[rng.randrange(len(makers))]() for _ in range(n)]


@pytest.mark.mqtt
def test_hostile_messages_over_a_real_broker_are_counted_exactly(start_agent, subscriber):
    """600 hostile messages through mosquitto: the agent survives and counts exactly what Ingest.parse predicts."""
    agent = start_agent(errors={"max_per_minute": 30})
    now = time.time()
    corpus = hostile_corpus(600, seed=3, now=now)
    predicted = dict.fromkeys(REJECTION_REASONS, 0)
    accepted = 0
    for t, p in corpus:
        try:
            accepted += len(agent.ingest.parse(t, p, now))
        except Rejected as error:
            predicted[error.reason] += 1
    for t, p in corpus:
        subscriber.publish(t, p, qos=1, wait=False)
    total_rejected = sum(predicted.values())
    wait_until(lambda: sum(agent.stats()["rejected"].values()) >= total_rejected and agent.stats()["accepted"] >= accepted,
               timeout=30, message="every message counted")
    stats = agent.stats()
    assert stats["rejected"] == predicted
    assert stats["accepted"] == accepted
    # The errors topic is rate-limited, yet its messages account for every rejection: sum(1 + suppressed).
    agent.errors.flush(force=True)
    reports = subscriber.quiet(f"{PREFIX}/agent/+/errors", 1.0) + [m for m in subscriber.history if "/errors" in m.topic]
    unique = {(m.at, m.payload) for m in reports}
    assert sum(1 + json.loads(p)["suppressed"] for _, p in unique) == total_rejected
    # Still serving: the broker connection and the worker are alive.
    assert agent.link.connected.is_set() and agent.health()[0]
