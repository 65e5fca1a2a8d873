"""Nothing lost: alerts raised while the broker is down, a SIGKILLed daemon, a corrupt outbox file (real broker).

Every test counts exactly: the alerts the daemon's own pipeline makes from the published rows (computed again
here, offline, with the same code) must all arrive, each (alert id, state, ts) at least once; a repeat is only
ever an exact duplicate of one already received (QoS 1 "at least once").
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    AGENT_ID, PREFIX, PYTHON, REPO, Daemon, MqttProbe, agent_env, healthy_rows, publish_rows, wait_until,
)

pytestmark = pytest.mark.mqtt

FAULT_ROWS = dict(devices=1, rows=150, seed=8, faults="spikes:pump-00@1.5+2")
ALERTS = f"{PREFIX}/+/alert"
STATUS = f"{PREFIX}/agent/{AGENT_ID}/status"


def make_settings(broker, model_path: Path, state_dir: Path, **overrides):
    from agent.config.settings import Settings

    base = {
        "agent_id": AGENT_ID,
        "mqtt": {"host": broker.host, "port": broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "model": {"path": str(model_path)},
        "state": {"directory": str(state_dir)},
        **overrides,
    }
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("EDGECAST_")}
    try:
        return Settings(**base)
    finally:
        os.environ.update(saved)


def expected_alerts(model_path: Path, settings, rows) -> list[tuple[str, str, float]]:
    """The alert events the daemon's pipeline makes from `rows`, computed offline with the same code."""
    from agent.core.events import AlertEvent, Sample
    from agent.core.model import load_bundle
    from agent.core.pipeline import Pipeline

    now = time.time()
    events = Pipeline(load_bundle(model_path), settings).process([Sample(d, float(ts), dict(v), now) for d, ts, v in rows], now)
    return [(e.alert_id, e.state, float(e.ts)) for e in events if isinstance(e, AlertEvent)]


def alert_key(msg) -> tuple[str, str, float]:
    body = msg.json()
    return body["alert_id"], body["state"], float(body["ts"])


def check_delivery(watcher: MqttProbe, expected: list[tuple], timeout: float = 30.0) -> dict:
    """All expected alerts arrive in order; repeats are exact duplicates only. Returns the counts."""
    received = watcher.collect(ALERTS, len(expected), timeout=timeout)
    all_in = time.monotonic()
    received += watcher.quiet(ALERTS, 1.0)  # late duplicates, if any
    keys = [alert_key(m) for m in received]
    first_seen = list(dict.fromkeys(keys))
    assert first_seen == expected, "every alert once, in order (duplicates aside)"
    return {"expected": len(expected), "received": len(keys), "duplicates": len(keys) - len(first_seen), "lost": 0, "all_in": all_in}


def persistent_watcher(rb) -> MqttProbe:
    """A probe with a persistent session: the broker keeps its subscription (and queues for it) across a SIGKILL."""
    watcher = MqttProbe(rb.broker, "alert-watcher", subscribe=None, clean_session=False)
    watcher.subscribe([ALERTS, STATUS])
    wait_until(lambda: rb.db.exists(), timeout=10, message="mosquitto to save the watcher's session")
    return watcher


def test_alerts_raised_while_the_broker_is_down_arrive_after_it_restarts(restartable_broker, model_path, tmp_path):
    """Broker SIGKILLed mid-stream: every alert made during the outage arrives after the restart; input works again."""
    from agent.app import Agent

    rb = restartable_broker
    watcher = persistent_watcher(rb)
    settings = make_settings(rb.broker, model_path, tmp_path / "state")
    agent = Agent(settings)
    agent.start()
    try:
        assert agent.wait_connected(10)
        release = __import__("threading").Event()
        agent.engine.inline_allowed = False  # every batch through the worker (a light load's batches run on the MQTT thread)
        real_prepare = agent.pipeline.prepare

        def held(samples):  # fault injection: the worker is behind when the broker dies
            release.wait(30)
            return real_prepare(samples)

        agent.pipeline.prepare = held
        rows = healthy_rows(**FAULT_ROWS)
        expected = expected_alerts(model_path, settings, rows)
        assert len(expected) >= 2, "the fault must raise alerts for this test to mean anything"
        publisher = MqttProbe(rb.broker, "publisher", subscribe=None)
        publish_rows(publisher, rows)
        wait_until(lambda: agent.stats()["accepted"] == len(rows), timeout=20, message="every row accepted")

        rb.kill()
        wait_until(lambda: not agent.link.connected.is_set(), timeout=10, message="the agent to notice the outage")
        release.set()
        wait_until(lambda: agent.stats()["processed"] == len(rows), timeout=30, message="every row processed")
        wait_until(lambda: agent.stats()["outbox"]["queued"] >= len(expected), timeout=10, message="the alerts stored")
        outbox = agent.stats()["outbox"]
        assert agent.stats()["alerts"] == len(expected)
        assert outbox["queued"] == len(expected) and outbox["sent"] == 0, outbox

        restarted_at = rb.start()
        wait_until(lambda: agent.link.connected.is_set(), timeout=20, message="the agent to reconnect")
        reconnect_s = agent.link.connected_at - restarted_at
        counts = check_delivery(watcher, expected)
        delivered_s = counts.pop("all_in") - restarted_at
        wait_until(lambda: agent.stats()["outbox"]["queued"] == 0, timeout=10, message="the outbox to empty")
        outbox = agent.stats()["outbox"]
        assert outbox["sent"] == len(expected) and outbox["dropped"] == 0, outbox
        print(f"\nbroker outage: {counts}; reconnected {reconnect_s:.2f}s after the broker was back, all alerts in {delivered_s:.2f}s")

        # Subscriptions were restored: new input gives forecasts again.
        reader = MqttProbe(rb.broker, "reader", subscribe=f"{PREFIX}/pump-01/forecast")
        more = healthy_rows(devices=2, rows=60, seed=11)
        publish_rows(publisher, [r for r in more if r[0] == "pump-01"])
        reader.expect(f"{PREFIX}/pump-01/forecast", timeout=20)
        for probe in (reader, publisher):
            probe.close()
    finally:
        agent.stop()
        watcher.close()


def read_stats(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def test_alerts_queued_at_sigkill_are_delivered_after_restart(restartable_broker, model_path, tmp_path):
    """Daemon SIGKILLed with alerts in its outbox (broker down): the next start delivers every one of them."""
    rb = restartable_broker
    watcher = persistent_watcher(rb)
    state = tmp_path / "state"
    settings = make_settings(rb.broker, model_path, state)
    rows = healthy_rows(**FAULT_ROWS)
    expected = expected_alerts(model_path, settings, rows)
    assert len(expected) >= 2
    env = agent_env(rb.broker, model_path, EDGECAST_STATE__DIRECTORY=str(state), EDGECAST_MQTT__RECONNECT_MAX_S="1")
    stats_path = tmp_path / "stats.json"
    with open(tmp_path / "gated.log", "wb") as log:
        gated = subprocess.Popen([PYTHON, str(REPO / "tests" / "gated_agent.py"), str(stats_path)], cwd=REPO, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
    daemon = None
    try:
        wait_until(lambda: read_stats(stats_path).get("connected"), timeout=30, message="the gated agent to connect")
        publisher = MqttProbe(rb.broker, "publisher", subscribe=None)
        publish_rows(publisher, rows)
        publisher.close()
        wait_until(lambda: read_stats(stats_path).get("accepted") == len(rows), timeout=20, message="every row accepted")
        rb.kill()
        gated.send_signal(signal.SIGUSR1)
        wait_until(lambda: read_stats(stats_path).get("outbox", {}).get("queued") == len(expected), timeout=30,
                   message=f"{len(expected)} alerts in the outbox")
        assert read_stats(stats_path)["processed"] == len(rows)
        gated.kill()  # SIGKILL: no drain, no goodbye
        gated.wait(10)
        with sqlite3.connect(state / "outbox.sqlite") as db:
            assert db.execute("SELECT COUNT(*) FROM messages WHERE kind = 'alert'").fetchone()[0] == len(expected)

        rb.start()
        daemon = Daemon(env, [], tmp_path / "daemon.log")
        counts = check_delivery(watcher, expected)
        counts.pop("all_in")
        print(f"\nSIGKILL with {len(expected)} alerts queued: {counts}")
        log_text = daemon.log()
        assert f"outbox holds {len(expected)} undelivered messages" in log_text, log_text

        def outbox_empty() -> bool:
            with sqlite3.connect(state / "outbox.sqlite") as db:
                return db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0

        wait_until(outbox_empty, timeout=10, message="the outbox to empty once acknowledged")
    finally:
        if gated.poll() is None:
            gated.kill()
        if daemon is not None:
            daemon.close()
        watcher.close()


def corrupt_outbox(path: Path, how: str) -> None:
    from agent.transport.outbox import Message, Outbox

    if how == "garbage":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x00power loss\xff" * 700)
        return
    box = Outbox(path.parent)
    box.put_many([Message("alert", f"{PREFIX}/pump-09/alert", b'{"x":%d}' % i + b" " * 300, "pump-09") for i in range(200)])
    box.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        if how == "truncated":
            f.truncate(size // 3)
        else:  # "scrambled": a torn write in the middle of the b-tree pages
            f.seek(4096 + 100)
            f.write(os.urandom(8192))


@pytest.mark.parametrize("how", ["garbage", "truncated", "scrambled"])
def test_corrupt_outbox_is_moved_aside_reported_and_the_daemon_keeps_working(start_daemon, subscriber, tmp_path, how):
    """An unreadable outbox file at start is renamed with a timestamp, reported (log + errors topic), replaced."""
    state = tmp_path / "state"
    corrupt_outbox(state / "outbox.sqlite", how)
    daemon = start_daemon(env={"EDGECAST_STATE__DIRECTORY": str(state)})
    daemon.wait_online(subscriber)
    report = subscriber.expect(f"{PREFIX}/agent/{AGENT_ID}/errors", lambda m: m.json()["reason"] == "outbox_corrupt", timeout=15).json()
    assert "moved aside" in report["detail"] and report["suppressed"] == 0
    aside = sorted(state.glob("outbox.sqlite.corrupt-*"))
    assert [p.name for p in aside if not p.name.endswith(("-wal", "-shm"))], list(state.iterdir())
    assert "moved it aside" in daemon.log()
    # Keeps working: a fault still raises an alert, delivered through the fresh outbox.
    publish_rows(subscriber, healthy_rows(**FAULT_ROWS))
    subscriber.expect(f"{PREFIX}/pump-00/alert", lambda m: m.json()["state"] == "new", timeout=30)
    with sqlite3.connect(state / "outbox.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
