"""End to end: simulator -> real broker -> `python -m agent run` (shipped model) -> a subscriber; and the demo."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import PREFIX, REPO, wait_until

SPEED = 1800  # simulated seconds per wall second: 30 samples per device per second
HOURS = 4.0
WARMUP_ROWS = 70
FAULT_DEVICE = "pump-01"
FAULT_KIND, FAULT_START_H, FAULT_HOURS = "overheating", 2.0, 1.5
ALERT_ID = re.compile(r"^(?P<device>[\w.-]+)-(?P<started>\d+(\.\d+)?)-[0-9a-f]{6}$")


def run_synth(port: int, schedule: Path, timeout: float = 60.0) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "training", "synth", "--publish", "--devices", "3", "--hours", str(HOURS), "--seed", "3",
        "--faults", f"{FAULT_KIND}:{FAULT_DEVICE}@{FAULT_START_H}+{FAULT_HOURS}", "--host", "127.0.0.1", "--port", str(port),
        "--speed", str(SPEED), "--warmup-rows", str(WARMUP_ROWS), "--schedule-out", str(schedule),
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.mqtt
def test_simulated_fleet_flows_through_the_daemon_to_forecasts_and_alerts(mosquitto, subscriber, start_daemon, model_path, tmp_path):
    """Every published sample yields well-formed forecasts; the faulty pump alerts during its fault, the healthy ones never."""
    manifest = json.loads((model_path / "manifest.json").read_text())
    horizon, period, targets = manifest["horizon"], manifest["sampling_period_s"], manifest["targets"]
    daemon = start_daemon()
    daemon.wait_online(subscriber)

    schedule_path = tmp_path / "faults.json"
    result = run_synth(mosquitto.port, schedule_path)
    assert result.returncode == 0, result.stdout + result.stderr
    [fault] = json.loads(schedule_path.read_text())
    assert (fault["device"], fault["kind"]) == (FAULT_DEVICE, FAULT_KIND)

    # What the simulator actually published (the subscriber sees the sensor topics too).
    published: dict[str, set[int]] = defaultdict(set)

    def take_telemetry() -> None:
        for msg in subscriber.history:
            if msg.topic.startswith("sensors/") and msg.topic.endswith("/telemetry"):
                published[msg.topic.split("/")[1]].add(int(msg.json()["ts"]))

    def forecasts_for_last_samples() -> bool:
        subscriber.quiet("#", 0.2)  # pull what arrived into history
        take_telemetry()
        seen = {m.json()["ts"] for m in subscriber.history if m.topic.endswith("/forecast")}
        return bool(published) and all(max(ts_set) in seen for ts_set in published.values())

    wait_until(forecasts_for_last_samples, timeout=30, message="forecasts for every device's last sample")
    assert sorted(published) == ["pump-00", "pump-01", "pump-02"]
    total_published = sum(len(s) for s in published.values())
    assert total_published >= 3 * HOURS * 60 * 0.95  # dropouts are rare

    forecasts = [m for m in subscriber.history if m.topic.endswith("/forecast")]
    per_device: dict[str, list[dict]] = defaultdict(list)
    for msg in forecasts:
        body = msg.json()
        device = msg.topic.split("/")[1]
        assert msg.topic == f"{PREFIX}/{device}/forecast" and body["device"] == device
        assert body["model"] == {"name": manifest["name"], "version": manifest["version"]}
        assert body["ts"] in published[device], f"forecast ts {body['ts']} is not a sample {device} published"
        assert body["period_s"] == period
        assert body["horizon_ts"] == [body["ts"] + k * period for k in range(1, horizon + 1)]
        assert sorted(body["forecast"]) == sorted(targets)
        for target, values in body["forecast"].items():
            assert len(values) == horizon and all(isinstance(v, (int, float)) for v in values), target
        assert 0.0 <= body["completeness"] <= 1.0 and body["staleness_s"] >= 0
        per_device[device].append(body)
    for device, samples in published.items():
        # After the window fills, (almost) every sample produces a forecast.
        assert len(per_device[device]) >= 0.8 * (len(samples) - manifest["lookback"]), device

    alerts = [m for m in subscriber.history if m.topic.endswith("/alert")]
    by_device: dict[str, list[dict]] = defaultdict(list)
    for msg in alerts:
        by_device[msg.topic.split("/")[1]].append(msg.json())
    assert set(by_device) <= {FAULT_DEVICE}, f"healthy pumps alerted: { {d: [a['alert_id'] for a in v] for d, v in by_device.items() if d != FAULT_DEVICE} }"

    new_events = [a for a in by_device[FAULT_DEVICE] if a["state"] == "new"]
    assert new_events, f"{FAULT_DEVICE} had {FAULT_KIND} but raised no alert"
    first = new_events[0]
    assert fault["start_ts"] <= first["ts"] <= fault["end_ts"], (first, fault)  # while the fault is present
    match = ALERT_ID.match(first["alert_id"])
    assert match and match["device"] == FAULT_DEVICE and float(match["started"]) == first["started_at"]
    assert first["severity"] in ("warning", "critical") and first["score"] >= first["threshold"]
    assert first["features"] and {"name", "expected", "observed", "z"} <= set(first["features"][0])
    assert {f["name"] for f in first["features"]} <= set(targets)
    assert "bearing_temp" in {f["name"] for f in first["features"]}, first["features"]  # the overheating bearing
    # The alert keeps its id for its whole life: every later event names an alert that opened with `new`.
    opened = {a["alert_id"] for a in new_events}
    assert all(a["alert_id"] in opened for a in by_device[FAULT_DEVICE])

    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0


@pytest.mark.amqtt
def test_demo_runs_end_to_end_on_the_embedded_broker(model_path, tmp_path):
    """`python -m training demo --broker embedded` finds the injected fault, prints its summary and exits 0."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "training", "demo", "--broker", "embedded", "--duration", "25", "--speed", "900",
         "--workdir", str(tmp_path / "demo")],
        cwd=REPO, capture_output=True, text=True, timeout=90,
    )
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "broker: embedded" in output
    assert re.search(r"pump-01\s+overheating .*detected after \d+ simulated min", output), output
    assert "False alerts on healthy pumps: 0" in output
    assert "went offline" in output and "peak resident memory" in output
    assert "\x1b[" not in result.stdout  # no ANSI colours when stdout is not a terminal
    assert elapsed < 45


@pytest.mark.amqtt
def test_demo_runs_pumps_and_fans_through_one_daemon_with_two_models(model_path, tmp_path):
    """`demo --machines pumps,fans`: one daemon, a [[models]] entry per type, both types' faults found, no healthy one alerts."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "training", "demo", "--machines", "pumps,fans", "--broker", "embedded", "--duration", "30",
         "--speed", "900", "--workdir", str(tmp_path / "demo")],
        cwd=REPO, capture_output=True, text=True, timeout=90,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    config = (tmp_path / "demo" / "agent.toml").read_text()
    assert config.count("[[models]]") == 2 and 'devices = ["pump-*"]' in config and 'devices = ["fan-*"]' in config
    assert len(re.findall(r"agent demo-gateway is online", output)) == 1  # one daemon
    assert "models pumps: pump-lstm" in output and "fans: fan-lstm" in output
    assert re.search(r"pump-01\s+overheating .*detected after \d+ simulated min", output), output
    assert re.search(r"fan-01\s+imbalance .*detected after \d+ simulated min", output), output
    assert re.search(r" fan-00\s+\d+\s+[\d.]+", output)  # the fans' rows in the live view, with forecasts
    assert "False alerts on healthy pumps: 0" in output and "False alerts on healthy fans: 0" in output
    assert re.search(r"pumps\s+pump-lstm\s+4 devices: \d fault\(s\) injected, \d detected", output)
    assert re.search(r"fans\s+fan-lstm\s+3 devices: 1 fault\(s\) injected, 1 detected after \d+ simulated min", output)
    assert "PASS: every injected fault was detected and no healthy machine alerted" in output
    assert time.monotonic() - started < 50


# `python -m training ...` with mosquitto hidden from the demo's lookup (PATH and /usr/sbin): what a machine without
# mosquitto looks like to it.
WITHOUT_MOSQUITTO = """
import shutil, sys
which = shutil.which
shutil.which = lambda name, *args, **kwargs: None if name == "mosquitto" else which(name, *args, **kwargs)
from training.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.amqtt
def test_demo_falls_back_to_the_embedded_broker_without_mosquitto(model_path, tmp_path):
    """The default `--broker auto` on a machine without mosquitto says so, runs on the embedded broker (amqtt),
    finds the fault and exits 0."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_MOSQUITTO, "demo", "--duration", "25", "--speed", "900", "--workdir", str(tmp_path / "demo")],
        cwd=REPO, capture_output=True, text=True, timeout=90,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "mosquitto is not installed: using the embedded broker (amqtt)" in output
    assert "broker: embedded" in output and "broker embedded" in output
    assert not (tmp_path / "demo" / "mosquitto.conf").exists()
    assert re.search(r"pump-01\s+overheating .*detected after \d+ simulated min", output), output
    assert "False alerts on healthy pumps: 0" in output
    assert "retained status went offline" in output
    assert "Traceback" not in output and "ERROR" not in result.stderr  # amqtt's own log stays out of the demo's output
    assert time.monotonic() - started < 45


def test_demo_without_mosquitto_or_amqtt_says_what_to_install(model_path, tmp_path):
    """No mosquitto and no amqtt (the edge install alone): the demo stops at once, naming both ways out."""
    hide_amqtt = WITHOUT_MOSQUITTO.replace("from training.__main__", "sys.modules['amqtt'] = None\nfrom training.__main__")
    result = subprocess.run([sys.executable, "-c", hide_amqtt, "demo", "--duration", "25"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 1, f"exit code {result.returncode}:\n{output}"
    assert "no MQTT broker: install mosquitto (apt-get install mosquitto)" in output
    assert "pip install 'edgecast[demo]'" in output
    assert "Traceback" not in output
