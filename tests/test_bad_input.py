"""Bad input: each kind is rejected with its reason on the errors topic, counted, rate-limited, and harmless."""

from __future__ import annotations

import json
import time

import pytest
from conftest import AGENT_ID, PREFIX, healthy_rows, publish_rows, wait_until

from agent.transport.errors import ErrorReporter
from agent.core.events import REJECTION_REASONS

ERRORS = f"{PREFIX}/agent/{AGENT_ID}/errors"
ERROR_KEYS = {"ts", "topic", "device", "reason", "detail", "suppressed"}
GOOD = {"bearing_temp": 55.0, "vibration_rms": 2.5, "motor_current": 30.0, "outlet_pressure": 4.0}


def telemetry(values: dict | None = None, ts: object = "now", **extra) -> bytes:
    body = {"ts": int(time.time()) if ts == "now" else ts, "values": GOOD if values is None else values, **extra}
    return json.dumps(body).encode()


def now_ts() -> int:
    return int(time.time())


# (reason, topic, payload factory, device named in the error); payloads are built at send time (fresh ts).
CASES = {
    "malformed_json": ("sensors/pump-07/telemetry", lambda: b'{"ts": 1, "values": ', "pump-07"),
    "invalid_utf8": ("sensors/pump-07/telemetry", lambda: b'{"ts": 1, "values": "\xff\xfe"}', "pump-07"),
    "wrong_type": ("sensors/pump-07/telemetry", lambda: telemetry({**GOOD, "bearing_temp": "hot"}), "pump-07"),
    "wrong_type_values_list": ("sensors/pump-07/telemetry", lambda: telemetry([55.0, 2.5, 30.0, 4.0]), "pump-07"),
    "missing_feature": ("sensors/pump-07/telemetry", lambda: telemetry({k: v for k, v in GOOD.items() if k != "outlet_pressure"}), "pump-07"),
    "unknown_feature": ("sensors/pump-07/telemetry", lambda: telemetry({**GOOD, "humidity": 40.0}), "pump-07"),
    "unknown_feature_sensor_topic": ("sensors/pump-07/humidity", lambda: json.dumps({"ts": now_ts(), "value": 40.0}).encode(), "pump-07"),
    "non_finite": ("sensors/pump-07/telemetry", lambda: telemetry().replace(b"55.0", b"NaN"), "pump-07"),
    "non_finite_inf": ("sensors/pump-07/telemetry", lambda: telemetry().replace(b"55.0", b"1e999"), "pump-07"),
    "bad_timestamp": ("sensors/pump-07/telemetry", lambda: telemetry(ts="yesterday"), "pump-07"),
    "timestamp_out_of_range": ("sensors/pump-07/telemetry", lambda: telemetry(ts=10**12), "pump-07"),
    "oversized_payload": ("sensors/pump-07/telemetry", lambda: telemetry(pad="x" * 20000), "pump-07"),
    "unknown_topic": ("sensors/-not-a-device-/telemetry", lambda: telemetry(), None),
}


def reason_of(case: str) -> str:
    return next(r for r in REJECTION_REASONS if case.startswith(r))


@pytest.mark.mqtt
@pytest.mark.parametrize("case", sorted(CASES))
def test_each_kind_of_bad_input_is_reported_and_counted(start_agent, subscriber, case):
    """Each kind of bad input yields one errors-topic message with its reason, and its counter goes up by one."""
    agent = start_agent()
    reason = reason_of(case)
    topic, payload, device = CASES[case]
    subscriber.publish(topic, payload())
    msg = subscriber.expect(ERRORS, timeout=10)
    body = msg.json()
    assert set(body) == ERROR_KEYS
    assert body["reason"] == reason, body
    assert body["topic"] == topic
    assert body["device"] == device
    assert body["suppressed"] == 0
    assert body["detail"]
    assert msg.qos == 0 and not msg.retain
    wait_until(lambda: agent.stats()["rejected"][reason] == 1, timeout=5, message=f"counter {reason}")
    assert sum(agent.stats()["rejected"].values()) == 1
    assert agent.stats()["accepted"] == 0


@pytest.mark.mqtt
def test_topic_under_the_filter_that_misses_the_template_is_unknown_topic(start_agent, subscriber):
    """A topic the subscription delivers but the template does not fit (literal part of a level) is unknown_topic."""
    agent = start_agent(topics={"telemetry": "plant/dev-{device}/telemetry", "sensor": None})
    subscriber.publish("plant/pump-00/telemetry", telemetry())  # matches 'plant/+/telemetry', not 'dev-{device}'
    body = subscriber.expect(ERRORS, timeout=10).json()
    assert body["reason"] == "unknown_topic" and body["topic"] == "plant/pump-00/telemetry"
    subscriber.publish("plant/dev-pump-00/telemetry", telemetry())
    wait_until(lambda: agent.stats()["accepted"] == 1, timeout=5, message="the matching topic to be accepted")
    assert agent.stats()["rejected"]["unknown_topic"] == 1


@pytest.mark.mqtt
def test_late_sample_is_reported(start_agent, subscriber):
    """A sample older than the reordering tolerance (window.max_lateness_periods) is refused as late_sample."""
    agent = start_agent(window={"max_lateness_periods": 2})
    rows = healthy_rows(devices=1, rows=5, seed=6)  # rows[1] is 3 periods older than the newest
    publish_rows(subscriber, rows)
    device, ts, values = rows[1]
    subscriber.publish(f"sensors/{device}/telemetry", {"ts": ts, "values": values})
    body = subscriber.expect(ERRORS, timeout=10).json()
    assert body["reason"] == "late_sample" and body["device"] == device
    wait_until(lambda: agent.stats()["rejected"]["late_sample"] == 1, timeout=5, message="late_sample counter")


@pytest.mark.mqtt
def test_healthy_device_is_served_through_a_burst_of_bad_input(start_agent, subscriber, model_path):
    """Bad input interleaved with a healthy stream (same device too) loses none of the healthy samples' forecasts."""
    manifest = json.loads((model_path / "manifest.json").read_text())
    agent = start_agent()
    rows = healthy_rows(devices=1, rows=manifest["lookback"] + 9, seed=7)
    bad = [(topic.replace("pump-07", "pump-00"), make) for topic, make, _ in CASES.values()]
    for i, (device, ts, values) in enumerate(rows):
        for k in range(3):  # three kinds of bad input before every healthy sample, rotating
            topic, make = bad[(3 * i + k) % len(bad)]
            subscriber.publish(topic, make(), wait=False)
        subscriber.publish(f"sensors/{device}/telemetry", {"ts": ts, "values": values}, wait=False)
    forecasts = subscriber.collect(f"{PREFIX}/pump-00/forecast", 10, timeout=30)
    assert [m.json()["ts"] for m in forecasts] == [ts for _, ts, _ in rows[manifest["lookback"] - 1 :]]
    assert all(m.json()["completeness"] == 1.0 for m in forecasts)
    wait_until(lambda: agent.stats()["accepted"] == len(rows), timeout=10, message="all healthy rows accepted")
    assert sum(agent.stats()["rejected"].values()) > len(rows)


@pytest.mark.mqtt
def test_errors_topic_is_rate_limited(start_agent, subscriber):
    """500 bad messages give at most half of `errors.max_per_minute` at once (+ refill) whose 1 + suppressed sum to 500."""
    limit = 60
    agent = start_agent(errors={"max_per_minute": limit})
    started = time.monotonic()
    for i in range(500):
        subscriber.publish("sensors/pump-01/telemetry", b"not json %d" % i, wait=False, qos=0 if i % 2 else 1)
    wait_until(lambda: agent.stats()["rejected"]["malformed_json"] == 500, timeout=20, message="500 rejections counted")
    burst_s = time.monotonic() - started
    # Half the allowance goes out at once; the remainder is reported once the limiter allows (one every 60/limit = 1 s).
    bodies: list[dict] = []
    deadline = time.monotonic() + 15
    while sum(1 + b["suppressed"] for b in bodies) < 500:
        bodies.append(subscriber.expect(ERRORS, timeout=max(0.1, deadline - time.monotonic())).json())
    bodies += [m.json() for m in subscriber.quiet(ERRORS, 0.5)]
    assert all(b["reason"] == "malformed_json" for b in bodies)
    assert len(bodies) <= limit // 2 + burst_s * limit / 60 + 2
    assert sum(1 + b["suppressed"] for b in bodies) == 500
    assert agent.stats()["errors_published"] == len(bodies)


def test_reporter_token_bucket_and_suppressed_counts():
    """The reporter publishes at most half the per-minute limit at once, then one summary per refill; counts add up."""
    clock = [1000.0]
    sent: list[dict] = []
    reporter = ErrorReporter(lambda body: sent.append(json.loads(body)), max_per_minute=6, monotonic=lambda: clock[0])
    for i in range(100):
        reporter.report("wrong_type", f"bad {i}", topic="sensors/a/telemetry", device="a")
    assert len(sent) == 3 and all(b["suppressed"] == 0 for b in sent)
    reporter.flush()
    assert len(sent) == 3, "no token yet: the remainder waits"
    clock[0] += 10.0  # one token per 10 s at 6 per minute
    reporter.flush()
    assert len(sent) == 4 and sent[-1]["suppressed"] == 96 and sent[-1]["detail"] == "bad 99"
    reporter.flush(force=True)
    assert len(sent) == 4, "nothing left to report"
    assert reporter.snapshot()["wrong_type"] == 100
    assert sum(1 + b["suppressed"] for b in sent) == 100


@pytest.mark.parametrize("limit", [1, 6, 60])
def test_errors_limit_holds_over_every_60s_window(limit):
    """No 60 s window, the first minute included, holds more than errors.max_per_minute errors-topic messages."""
    clock = [5000.0]
    sent: list[tuple[float, dict]] = []
    reporter = ErrorReporter(lambda body: sent.append((clock[0], json.loads(body))), max_per_minute=limit,
                             monotonic=lambda: clock[0])
    for step in range(3000):  # a 300 s flood, 10 rejections a second, flushed every second as the daemon does
        clock[0] = 5000.0 + step * 0.1
        reporter.report("wrong_type", f"bad {step}")
        if step % 10 == 9:
            reporter.flush()
    times = [at for at, _ in sent]
    worst = max(sum(1 for other in times if at <= other < at + 60.0) for at in times)
    assert worst <= limit, f"{worst} messages within 60 s (limit {limit})"
    assert len(times) >= 4 * limit, "the allowance is still used: about `limit` a minute over 5 minutes"
    reporter.flush(force=True)  # shutdown: the remainder, so the counts add up
    assert sum(1 + body["suppressed"] for _, body in sent) == 3000


def test_reporter_with_zero_rate_only_counts():
    """errors.max_per_minute = 0 publishes nothing, not even at shutdown, but still counts."""
    sent: list[bytes] = []
    reporter = ErrorReporter(sent.append, max_per_minute=0)
    for _ in range(10):
        reporter.report("queue_full", "full")
    reporter.flush(force=True)
    assert sent == [] and reporter.snapshot()["queue_full"] == 10
