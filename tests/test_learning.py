"""The learning period: a bundle trained on other machines adapts to a new device's normal level and spread."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import healthy_rows, publish_rows, wait_until

from agent.config.settings import Settings
from agent.core.learning import DeviceLearning

FEATURES = ["bearing_temp", "vibration_rms", "motor_current", "outlet_pressure"]


def _offset_pump_csv(path, faults="none"):
    """A synthetic pump whose sensors sit elsewhere than the training fleet's: +20 degC, current x 1.6."""
    rows = healthy_rows(devices=1, rows=36 * 60, seed=11, end_ts=1_800_000_000, faults=faults)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ts", "device", *FEATURES])
        for device, ts, values in rows:
            shifted = dict(values, bearing_temp=values["bearing_temp"] + 20.0, motor_current=values["motor_current"] * 1.6)
            writer.writerow([ts, device] + [f"{shifted[name]:.4f}" for name in FEATURES])
    return rows


def _replay_alerts(tmp_path, data, **detect):
    from agent.config.settings import shipped_model_path
    from agent.tools.replay import replay

    model = shipped_model_path()
    out = tmp_path / f"scored-{len(detect)}.csv"
    replay(model, data, out, settings=Settings(model={"path": model}, detect=detect))
    with open(out, newline="", encoding="utf-8") as f:
        return np.array([int(r["alert"]) for r in csv.DictReader(f)])


@pytest.mark.training
def test_a_device_unlike_the_training_fleet_alerts_without_learning_and_not_after_it(tmp_path):
    """Without a learning period an offset pump's normal is an alert; with 6 hours of learning it raises none."""
    data = tmp_path / "offset.csv"
    _offset_pump_csv(data)
    assert _replay_alerts(tmp_path, data).mean() > 0.5
    assert _replay_alerts(tmp_path, data, learning_hours=6.0).sum() == 0


@pytest.mark.training
def test_a_fault_after_the_learning_period_is_still_detected(tmp_path):
    """Learning a device's normal does not learn its faults away: overheating 30 h in still opens an alert."""
    data = tmp_path / "offset-fault.csv"
    _offset_pump_csv(data, faults="overheating:pump-00@30+3")
    alert = _replay_alerts(tmp_path, data, learning_hours=6.0)
    assert alert[: 29 * 60].sum() == 0
    assert alert[30 * 60 : 33 * 60].mean() > 0.5


def test_learning_maps_the_device_normal_onto_the_training_normal():
    """After learning, (x - device offset) / device scale of the device's normal has the training rows' mean and spread."""
    rng = np.random.default_rng(0)
    offset, scale = np.array([50.0, 2.0]), np.array([5.0, 0.5])  # the bundle's scaler (standard: training mean, std)
    learning = DeviceLearning(["a", "b"], offset, scale, period_s=60, hours=1.0, min_samples=30)
    values = np.column_stack([rng.normal(70.0, 10.0, 120), rng.normal(1.0, 0.1, 120)])  # (N, 2) another machine
    taken, finished = learning.observe(np.zeros(120, np.int64), np.arange(120), values[:120])
    assert finished == [0] and not learning.learning[0] and taken[:61].all() and not taken[61:].any()
    values = values[:61]  # what it learned from: the first hour (slots 0..60)
    scaled = (values - learning.device_offset[0]) / learning.device_scale[0]
    np.testing.assert_allclose(scaled.mean(axis=0), 0.0, atol=1e-9)
    np.testing.assert_allclose(scaled.std(axis=0), 1.0, atol=1e-9)
    restored = DeviceLearning(["a", "b"], offset, scale, period_s=60, hours=1.0, min_samples=30)
    assert restored.load(json.loads(json.dumps(learning.to_dict(["pump-x"]))), lambda name: 0) == 1
    np.testing.assert_allclose(restored.device_offset[0], learning.device_offset[0])
    assert restored.load({"features": ["other"], "devices": {}}, lambda name: 0) == 0


def test_a_device_keeps_learning_until_both_the_hours_and_the_samples_are_there():
    """Learning ends only after learning_hours of data and min_samples observed samples."""
    learning = DeviceLearning(["a"], np.zeros(1), np.ones(1), period_s=60, hours=1.0, min_samples=30)
    assert learning.observe(np.zeros(40, np.int64), np.arange(40), np.ones((40, 1)))[1] == []  # 40 min of data
    assert learning.observe(np.zeros(1, np.int64), np.array([60]), np.ones((1, 1)))[1] == [0]


@pytest.mark.mqtt
@pytest.mark.training
def test_the_daemon_keeps_what_devices_learned_across_a_restart(start_agent, subscriber, agent_settings):
    """A device that finished learning is written to state.directory and is not learning again after a restart."""
    from agent.app import Agent

    agent = start_agent(detect={"learning_hours": 0.5, "learning_min_samples": 30})
    publish_rows(subscriber, healthy_rows(devices=1, rows=90, seed=3))
    path = agent.learned_path

    def learned() -> bool:
        if not path.is_file():
            return False
        entry = json.loads(path.read_text(encoding="utf-8"))["devices"].get("pump-00")
        return entry is not None and not entry["learning"]

    wait_until(learned, timeout=20, message="pump-00 learned and written")
    before = agent.pipeline.learning.device_offset[agent.pipeline.windows.index["pump-00"]].copy()
    agent.stop()
    again = Agent(agent_settings(detect={"learning_hours": 0.5, "learning_min_samples": 30}))
    again.start()
    try:
        d = again.pipeline.windows.index["pump-00"]
        assert not again.pipeline.learning.learning[d]
        np.testing.assert_allclose(again.pipeline.learning.device_offset[d], before)
    finally:
        again.stop()
