"""The daemon end to end on a real broker: forecasts from both input forms, start-up refusals, exit codes."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import threading

import pytest
from conftest import AGENT_ID, PREFIX, healthy_rows, publish_rows, wait_until

pytestmark = pytest.mark.mqtt

FORECAST_KEYS = {"device", "model", "ts", "period_s", "horizon_ts", "forecast", "completeness", "staleness_s"}


def check_forecast(msg, manifest: dict, rows_by_ts: dict[int, dict[str, float]]) -> None:
    body = msg.json()
    horizon, period = manifest["horizon"], manifest["sampling_period_s"]
    assert set(body) == FORECAST_KEYS
    assert body["model"] == {"name": manifest["name"], "version": manifest["version"]}
    assert body["period_s"] == period
    assert body["horizon_ts"] == [body["ts"] + k * period for k in range(1, horizon + 1)]
    assert set(body["forecast"]) == set(manifest["targets"])
    assert body["completeness"] == 1.0
    assert 0 <= msg.at - body["ts"] - body["staleness_s"] < 5, "staleness = agent clock at publish - ts"
    last = rows_by_ts[body["ts"]]
    for target, values in body["forecast"].items():
        assert len(values) == horizon and all(isinstance(v, float) and math.isfinite(v) for v in values)
        std = manifest["scaler"]["params"][target].get("std", 1.0)
        # A working model's next-step forecast stays near the last observation on healthy data.
        assert abs(values[0] - last[target]) < 4 * std, (target, values[0], last[target])


@pytest.fixture
def manifest(model_path) -> dict:
    return json.loads((model_path / "manifest.json").read_text())


def test_telemetry_yields_forecasts(start_agent, subscriber, manifest):
    """Consecutive telemetry samples give one forecast per sample once the window is full, per the contract."""
    agent = start_agent()
    lookback = manifest["lookback"]
    rows = healthy_rows(devices=1, rows=lookback + 10, seed=1)
    publish_rows(subscriber, rows)
    forecasts = subscriber.collect(f"{PREFIX}/pump-00/forecast", 11, timeout=30)
    rows_by_ts = {ts: values for _, ts, values in rows}
    assert [m.json()["ts"] for m in forecasts] == [ts for _, ts, _ in rows[lookback - 1 :]]
    for msg in forecasts:
        assert msg.qos == 0 and not msg.retain
        check_forecast(msg, manifest, rows_by_ts)
    stats = agent.stats()
    assert stats["accepted"] == len(rows)
    assert stats["forecasts"] == 11
    assert sum(stats["rejected"].values()) == 0
    assert stats["queue_depth"] == 0


def test_per_sensor_messages_yield_forecasts(start_agent, subscriber, manifest):
    """Four per-sensor messages per slot are merged into one sample; complete windows give forecasts."""
    start_agent()
    lookback = manifest["lookback"]
    rows = healthy_rows(devices=2, rows=lookback + 5, seed=2)
    publish_rows(subscriber, rows, form="sensor")
    rows_by_device = {d: {ts: v for dev, ts, v in rows if dev == d} for d in ("pump-00", "pump-01")}
    for device, by_ts in rows_by_device.items():
        # The newest slot may wait for the next slot to start before it is closed; the ones before may not.
        forecasts = subscriber.collect(f"{PREFIX}/{device}/forecast", 5, timeout=30)
        expected_ts = sorted(by_ts)[lookback - 1 : lookback - 1 + 5]
        assert [m.json()["ts"] for m in forecasts] == expected_ts
        for msg in forecasts:
            check_forecast(msg, manifest, by_ts)


def test_forecast_payloads_stay_small(start_agent, subscriber, manifest):
    """Forecast payloads are compact JSON (rounded floats, no spaces): well under 1 KiB for 4 targets x 10 steps."""
    start_agent()
    rows = healthy_rows(devices=1, rows=manifest["lookback"], seed=4)
    publish_rows(subscriber, rows)
    msg = subscriber.expect(f"{PREFIX}/pump-00/forecast", timeout=20)
    assert len(msg.payload) < 1024, len(msg.payload)
    assert b" " not in msg.payload


def test_unknown_config_key_exits_1_with_the_field_path(start_daemon):
    """`python -m agent run --config FILE` with an unknown key exits 1 and names the key's path."""
    daemon = start_daemon(config="[mqtt]\nhots = \"broker.local\"\n")
    assert daemon.wait(30) == 1
    assert "mqtt.hots" in daemon.log(), daemon.log()


def test_missing_model_bundle_exits_1_with_a_clear_message(start_daemon, tmp_path):
    """A model path without a bundle makes the daemon exit 1 and say which path is wrong."""
    missing = tmp_path / "no-such-model"
    daemon = start_daemon(env={"EDGECAST_MODEL__PATH": str(missing)})
    assert daemon.wait(30) == 1
    assert str(missing) in daemon.log(), daemon.log()
    assert "Traceback" not in daemon.log()


def test_tampered_model_bundle_exits_1_naming_the_checksum(start_daemon, model_path, tmp_path):
    """A bundle whose model.onnx does not match the manifest's sha256 is refused at start (exit 1)."""
    copy = tmp_path / "pump-lstm"
    shutil.copytree(model_path, copy)
    onnx = copy / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    daemon = start_daemon(env={"EDGECAST_MODEL__PATH": str(copy)})
    assert daemon.wait(30) == 1
    assert "sha256" in daemon.log(), daemon.log()


def test_agent_reconnects_and_restores_online(start_agent, subscriber, mosquitto, manifest):
    """After the broker drops the agent's connection, the agent reconnects, re-subscribes and is online again."""
    agent = start_agent()
    status_topic = f"{PREFIX}/agent/{agent.settings.agent_id}/status"
    subscriber.expect(status_topic, lambda m: m.json()["state"] == "online", timeout=10)
    # Take over the agent's client id: the broker disconnects the agent (a session take-over).
    from conftest import MqttProbe

    thief = MqttProbe(mosquitto, agent.settings.agent_id, subscribe=None)
    thief.close()
    subscriber.expect(status_topic, lambda m: m.json()["state"] == "online", timeout=15)
    assert agent.wait_connected(15)
    rows = healthy_rows(devices=1, rows=manifest["lookback"], seed=5)
    publish_rows(subscriber, rows)
    subscriber.expect(f"{PREFIX}/pump-00/forecast", timeout=20)
    assert agent.link.connects >= 2


ALERT_KEYS = {"alert_id", "device", "state", "severity", "anomaly_score", "score", "threshold", "ts", "started_at", "ended_at", "features", "model"}


def test_fault_publishes_alert_and_retained_active_list(start_agent, subscriber, make_probe, manifest):
    """A fault episode opens an alert (QoS 1, contract fields) and the retained active list names it."""
    start_agent()
    rows = healthy_rows(devices=1, rows=150, seed=8, faults="spikes:pump-00@1.5+2")
    publish_rows(subscriber, rows)
    new = subscriber.expect(f"{PREFIX}/pump-00/alert", lambda m: m.json()["state"] == "new", timeout=30)
    alert = new.json()
    assert new.qos == 1
    assert set(alert) == ALERT_KEYS
    assert alert["device"] == "pump-00" and alert["ended_at"] is None
    assert alert["model"] == {"name": manifest["name"], "version": manifest["version"]}
    assert alert["alert_id"].startswith(f"pump-00-{alert['started_at']}-")
    assert alert["score"] >= alert["threshold"] and 0.5 <= alert["anomaly_score"] < 1
    assert alert["started_at"] >= rows[0][1] + 90 * 60, "no alert before the fault begins"
    assert alert["features"] and all(set(f) == {"name", "expected", "observed", "z"} for f in alert["features"])
    live = subscriber.expect(f"{PREFIX}/pump-00/alerts/active", timeout=10).json()
    assert set(live) == {"device", "ts", "alerts"} and live["device"] == "pump-00"
    assert [a["alert_id"] for a in live["alerts"]] == [alert["alert_id"]]
    assert set(live["alerts"][0]) == {"alert_id", "severity", "started_at", "score"}
    subscriber.collect(f"{PREFIX}/pump-00/forecast", len(rows) - manifest["lookback"] + 1, timeout=30)
    subscriber.quiet("#", 0.5)  # active lists follow the forecasts of their batch
    alerts = [m.json() for m in subscriber.history if m.topic.endswith("/alert")]
    lists = [m.json() for m in subscriber.history if m.topic.endswith("/alerts/active")]
    assert len(lists) == len(alerts), "one active-list update per alert event"
    for event, listed in zip(alerts, lists):
        assert (event["alert_id"] in [a["alert_id"] for a in listed["alerts"]]) == (event["state"] != "end")
    last_live = [m for m in subscriber.history if m.topic.endswith("/alerts/active")][-1]
    # A subscriber arriving later gets the latest list, retained.
    late = make_probe(subscribe=None)
    late.subscribe(f"{PREFIX}/pump-00/alerts/active")
    retained = late.expect(f"{PREFIX}/pump-00/alerts/active", timeout=10)
    assert retained.retain and retained.json() == last_live.json()


def test_worker_exception_is_logged_and_the_daemon_carries_on(start_agent, subscriber, manifest, caplog):
    """An exception in the worker is logged with its traceback and counted; later samples are still served."""
    agent = start_agent()
    real_prepare = agent.pipeline.prepare
    calls = {"n": 0}

    def fail_once(samples):  # fault injection: the first batch hits a bug
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected bug")
        return real_prepare(samples)

    agent.pipeline.prepare = fail_once
    rows = healthy_rows(devices=1, rows=manifest["lookback"] + 3, seed=9)
    with caplog.at_level(logging.ERROR, logger="agent.core.engine"):
        publish_rows(subscriber, rows[:1])
        wait_until(lambda: agent.stats()["worker_errors"] == 1, timeout=10, message="the worker error to be counted")
        publish_rows(subscriber, rows[1:])
        forecasts = subscriber.collect(f"{PREFIX}/pump-00/forecast", 3, timeout=20)
    assert [m.json()["ts"] for m in forecasts] == [ts for _, ts, _ in rows[-3:]]
    failures = [r for r in caplog.records if r.name == "agent.core.engine" and r.exc_info]
    assert failures and "injected bug" in str(failures[0].exc_info[1])
    agent.counters.worker_errors = 0  # injected on purpose; the fixture's teardown checks for unexpected ones


def test_full_queue_pushes_back_then_rejects_as_queue_full(start_agent, subscriber, manifest):
    """With the worker stuck and the ingest queue full, the MQTT thread waits (bounded), then rejects as queue_full."""
    agent = start_agent(ingest={"queue_size": 10, "full_wait_s": 0.5})
    agent.engine.inline_allowed = False  # every batch through the worker (a light load's batches run on the MQTT thread)
    real_prepare = agent.pipeline.prepare
    release = threading.Event()
    entered = threading.Event()

    def stuck(samples):  # fault injection: a worker that is slow for a while
        entered.set()
        release.wait(30)
        return real_prepare(samples)

    agent.pipeline.prepare = stuck
    rows = healthy_rows(devices=1, rows=14, seed=10)
    publish_rows(subscriber, rows[:1])
    assert entered.wait(10), "the worker never took the first sample"
    publish_rows(subscriber, rows[1:])  # 10 fill the queue, 3 wait ingest.full_wait_s each and are refused
    # The MQTT thread reports a rejection before it adds up its wait: wait for both.
    wait_until(lambda: agent.stats()["rejected"]["queue_full"] == 3 and agent.stats()["backpressure"]["waits"] == 3, timeout=15,
               message="3 queue_full rejections, each after a wait")
    backpressure = agent.stats()["backpressure"]
    assert backpressure["waits"] == 3 and backpressure["seconds"] >= 3 * 0.5 * 0.9, backpressure
    body = subscriber.expect(f"{PREFIX}/agent/{AGENT_ID}/errors", timeout=5).json()
    assert body["reason"] == "queue_full" and body["device"] == "pump-00"
    assert agent.stats()["accepted"] == 11
    release.set()
    wait_until(lambda: agent.stats()["processed"] == 11, timeout=10, message="the queued samples to be processed")


def test_a_light_loads_batch_runs_on_the_mqtt_thread_and_a_stuck_one_is_unhealthy(start_agent, subscriber, manifest):
    """At a trickle the MQTT thread runs a read's batch itself (no hand-off to the worker); one stuck there longer
    than health.max_stall_s makes the daemon unhealthy (the systemd watchdog stops being fed), and the daemon
    carries on once it is released."""
    agent = start_agent(health={"max_stall_s": 1.0})
    real_prepare = agent.pipeline.prepare
    release = threading.Event()
    threads: list[str] = []

    def stuck(samples):
        threads.append(threading.current_thread().name)
        if len(threads) == 1:
            release.wait(30)
        return real_prepare(samples)

    agent.pipeline.prepare = stuck
    rows = healthy_rows(devices=1, rows=manifest["lookback"] + 2, seed=11)
    publish_rows(subscriber, rows[:1])
    wait_until(lambda: not agent.health()[0], timeout=10, message="unhealthy while the batch is stuck")
    assert "MQTT network thread" in agent.health()[1]
    assert threads[0] != "edgecast-worker", threads
    release.set()
    publish_rows(subscriber, rows[1:])
    wait_until(lambda: agent.health()[0] and agent.stats()["processed"] == len(rows), timeout=10, message="healthy again")
    subscriber.expect(f"{PREFIX}/pump-00/forecast", timeout=10)


@pytest.mark.parametrize("journal", [True, False])
def test_log_lines_carry_timestamps_only_outside_systemd(start_daemon, tmp_path, journal):
    """Under systemd (JOURNAL_STREAM set) log lines have no timestamp (the journal adds one); otherwise they do."""
    env = {"EDGECAST_MODEL__PATH": str(tmp_path / "missing")}
    if journal:
        env["JOURNAL_STREAM"] = "8:12345"
    daemon = start_daemon(env=env)
    assert daemon.wait(30) == 1
    lines = [line for line in daemon.log().splitlines() if "agent.app" in line]
    assert lines, daemon.log()
    stamped = [bool(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", line)) for line in lines]
    assert all(stamped) != journal and any(stamped) != journal, lines


def test_broker_password_from_a_credentials_file(agent_settings, tmp_path, monkeypatch, caplog):
    """The password comes from a file in $CREDENTIALS_DIRECTORY; a wrong one is refused and never logged."""
    import subprocess

    from conftest import run_mosquitto

    from agent.app import Agent

    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "edge", "s3cret-right"], check=True, capture_output=True)
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    with run_mosquitto(tmp_path / "auth-broker", f"allow_anonymous false\npassword_file {passwd}\n") as broker:
        for password, should_connect in (("s3cret-wrong", False), ("s3cret-right", True)):
            (creds / "broker-pass").write_text(password + "\n")
            settings = agent_settings(mqtt={"port": broker.port, "username": "edge", "password_file": "broker-pass", "plaintext_password": "loopback"})
            agent = Agent(settings)
            with caplog.at_level(logging.INFO):
                agent.start()
                try:
                    assert agent.wait_connected(1.5 if not should_connect else 10) == should_connect
                finally:
                    agent.stop()
            assert "s3cret" not in caplog.text
        assert "refused the connection" in caplog.text


def test_slow_worker_slows_reads_and_loses_nothing(start_agent, subscriber, manifest):
    """Backpressure: with a full queue the MQTT thread stops reading (bounded wait); QoS 1 input waits, none dropped."""
    agent = start_agent(ingest={"queue_size": 10, "full_wait_s": 10})
    agent.engine.inline_allowed = False  # every batch through the worker (a light load's batches run on the MQTT thread)
    real_prepare = agent.pipeline.prepare
    release = threading.Event()
    entered = threading.Event()

    def slow(samples):  # fault injection: inference falls behind for a while
        entered.set()
        release.wait(30)
        return real_prepare(samples)

    agent.pipeline.prepare = slow
    rows = healthy_rows(devices=1, rows=manifest["lookback"] + 20, seed=12)
    publish_rows(subscriber, rows[:1])
    assert entered.wait(10)
    for _, ts, values in rows[1:]:  # the broker takes them all; the agent reads only as fast as it can queue
        subscriber.publish("sensors/pump-00/telemetry", {"ts": ts, "values": values}, wait=False)
    wait_until(lambda: agent.stats()["accepted"] == 11, timeout=10, message="the queue to fill (1 in the worker + 10)")
    subscriber.quiet(f"{PREFIX}/#", 1.0)  # a second later: still not reading, nothing refused
    assert agent.stats()["accepted"] == 11 and agent.stats()["rejected"]["queue_full"] == 0
    release.set()
    forecasts = subscriber.collect(f"{PREFIX}/pump-00/forecast", 21, timeout=30)
    assert [m.json()["ts"] for m in forecasts] == [ts for _, ts, _ in rows[manifest["lookback"] - 1 :]]
    stats = agent.stats()
    assert stats["accepted"] == len(rows) and stats["rejected"]["queue_full"] == 0
    assert stats["backpressure"]["waits"] >= 1, "the network thread waited for room instead of dropping"


def test_readings_that_trickle_in_share_one_model_call(start_agent, subscriber, manifest):
    """inference.batch_wait_ms: readings arriving one by one within the wait are run in one model call, not one each."""
    agent = start_agent(inference={"batch_wait_ms": 800})
    lookback = manifest["lookback"]
    rows = healthy_rows(devices=4, rows=lookback + 1, seed=21)
    filling = [row for row in rows if row[1] < rows[-1][1]]
    publish_rows(subscriber, filling)
    subscriber.collect(f"{PREFIX}/+/forecast", 4, timeout=30)  # every window full, one forecast each
    real_infer = agent.pipeline.infer
    windows_per_call: list[int] = []

    def counting(prepared):
        windows_per_call.append(prepared.n_windows)
        return real_infer(prepared)

    agent.pipeline.infer = counting
    last = [row for row in rows if row[1] == rows[-1][1]]
    assert len(last) == 4
    for device, ts, values in last:  # acknowledged by the broker one at a time: they reach the agent apart
        subscriber.publish(f"sensors/{device}/telemetry", {"ts": ts, "values": values}, qos=1)
    forecasts = subscriber.collect(f"{PREFIX}/+/forecast", 4, timeout=30)
    assert sorted(m.json()["device"] for m in forecasts) == sorted(device for device, _, _ in last)
    assert windows_per_call == [4], windows_per_call
