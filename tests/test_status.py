"""The retained status topic and the daemon's lifecycle: online, clean offline on SIGTERM, last will on SIGKILL."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest
from conftest import AGENT_ID, PREFIX, healthy_rows

pytestmark = pytest.mark.mqtt

STATUS = f"{PREFIX}/agent/{AGENT_ID}/status"


def retained_status(make_probe) -> dict:
    """What a subscriber arriving now gets on the status topic (must be a retained message)."""
    late = make_probe(subscribe=None)
    late.subscribe(STATUS)
    msg = late.expect(STATUS, timeout=5)
    assert msg.retain, "the status must be retained"
    return msg.json()


def test_online_status_is_retained_with_version_and_model(start_daemon, make_probe, model_path):
    """A running agent's retained status says online with its version and the model's name, version and sha256."""
    manifest = json.loads((model_path / "manifest.json").read_text())
    daemon = start_daemon()
    daemon.wait_online(make_probe())
    status = retained_status(make_probe)
    assert set(status) == {"state", "agent_id", "version", "model", "ts", "outbox"}
    assert status["outbox"] == {"queued": 0, "sent": 0, "dropped": 0}, "a fresh agent has an empty outbox"
    assert status["state"] == "online"
    assert status["agent_id"] == AGENT_ID
    assert isinstance(status["version"], str) and status["version"]
    assert status["model"] == {"name": manifest["name"], "version": manifest["version"], "sha256": manifest["onnx"]["sha256"]}
    assert abs(status["ts"] - time.time()) < 60


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_publishes_offline_and_exits_zero(start_daemon, make_probe, sig):
    """SIGTERM/SIGINT: the retained status becomes offline (no last-will reason) and the process exits 0 quickly."""
    daemon = start_daemon()
    probe = make_probe()
    daemon.wait_online(probe)
    started = time.monotonic()
    daemon.signal(sig)
    assert daemon.wait(10) == 0, daemon.log()
    assert time.monotonic() - started < 8, "clean stop took too long"
    status = retained_status(make_probe)
    assert status["state"] == "offline"
    assert "reason" not in status, "a clean stop is not a lost connection"


def test_sigkill_leaves_the_last_will(start_daemon, make_probe):
    """SIGKILL: the broker publishes the retained last will: offline, reason "connection lost"."""
    daemon = start_daemon()
    probe = make_probe()
    daemon.wait_online(probe)
    daemon.signal(signal.SIGKILL)
    daemon.wait(10)
    will = probe.expect(STATUS, lambda m: m.json()["state"] == "offline", timeout=10).json()
    assert will["reason"] == "connection lost"
    assert will["agent_id"] == AGENT_ID
    assert retained_status(make_probe) == will


def test_sigterm_publishes_queued_work_before_offline(start_daemon, make_probe):
    """SIGTERM with samples still queued: every accepted sample is processed and its forecasts precede `offline`."""
    daemon = start_daemon(env={"EDGECAST_INFERENCE__MAX_BATCH": "1"})  # one model call per window: a slower worker
    probe = make_probe()
    daemon.wait_online(probe)
    rows = healthy_rows(devices=8, rows=200, seed=3)
    infos = [probe.publish(f"sensors/{d}/telemetry", {"ts": ts, "values": v}, wait=False) for d, ts, v in rows]
    infos[len(infos) // 2].wait_for_publish(10)
    daemon.signal(signal.SIGTERM)  # while input still streams in: the queue is rarely empty now
    assert daemon.wait(30) == 0, daemon.log()
    log = daemon.log()
    queued = int(re.search(r"stopping: (\d+) samples not processed yet", log).group(1))
    stopped = re.search(r"stopped: (\d+) samples accepted, (\d+) processed, (\d+) forecasts", log)
    assert stopped, log
    accepted, processed, forecasts = map(int, stopped.groups())
    assert accepted > 0 and processed == accepted, log
    offline = probe.expect(STATUS, lambda m: m.json()["state"] == "offline", timeout=10)
    before_offline = [m for m in probe.history[: probe.history.index(offline)] if m.topic.endswith("/forecast")]
    assert len(before_offline) == forecasts, f"{forecasts} forecasts made, {len(before_offline)} published before offline"
    assert forecasts > 0
    # Per device: forecasts for consecutive slots from the first full window on, none skipped.
    lookback = 60
    for device in sorted({d for d, _, _ in rows}):
        got = [m.json()["ts"] for m in before_offline if m.json()["device"] == device]
        want = [ts for d, ts, _ in rows if d == device][lookback - 1 :][: len(got)]
        assert got == want, device
    if queued == 0:
        pytest.skip("the worker kept up with the input, so nothing was queued at SIGTERM (rule not exercised)")
