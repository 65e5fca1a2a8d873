"""The second machine type: simulated ventilation fans (simulation/fans.py) and their shipped bundle, fan-lstm."""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from simulation import fans, synth
from simulation.synth import FaultSpec, FleetConfig, read_csv, write_csv

FAN_BUNDLE = REPO / "exported_models" / "fan-lstm"


def fan_fleet(**overrides) -> synth.Fleet:
    cfg = dict(devices=4, hours=36.0, seed=5, faults="auto")
    cfg.update(overrides)
    return fans.generate_fleet(FleetConfig(**cfg))


def one_fan(kind: str | None, start_h: float = 10.0, hours: float = 4.0, seed: int = 2) -> np.ndarray:
    """fan-00's rows over 20 h (no dropouts), with one fault of `kind` or healthy; (N, 4) in FEATURES order."""
    faults = [FaultSpec(kind, "fan-00", start_h, hours)] if kind else []
    fleet = fans.generate_fleet(FleetConfig(devices=1, hours=20.0, seed=seed, faults=faults, dropout_rate=0.0, dropout_burst_rate=0.0))
    return np.stack([fleet.rows[f] for f in fans.FEATURES], axis=1)


def test_same_seed_same_fans_other_seed_differs():
    """A seed fully determines the fan fleet (rows and schedule); another seed gives other data."""
    a, b, c = fan_fleet(), fan_fleet(), fan_fleet(seed=6)
    for column in ["ts", "device", *fans.FEATURES, "label", "fault"]:
        assert np.array_equal(a.rows[column], b.rows[column]), column
    assert a.schedule == b.schedule and a.schedule
    assert not np.array_equal(a.rows["airflow"][:100], c.rows["airflow"][:100])


def test_fans_have_their_own_sensors_names_and_csv_columns(tmp_path):
    """Fan rows carry the fan sensors (not the pump's) under fan-NN names; the CSV reads back with them."""
    fleet = fan_fleet(devices=3, hours=6.0, faults="none")
    assert fleet.features == fans.FEATURES and not set(fans.FEATURES) & set(synth.FEATURES)
    assert sorted(set(fleet.rows["device"])) == ["fan-00", "fan-01", "fan-02"]
    path = tmp_path / "fans.csv"
    write_csv(fleet, path)
    assert path.read_text().splitlines()[0] == ",".join(["ts", "device", *fans.FEATURES, "label", "fault"])
    back = read_csv(path, fans.FEATURES)
    for feature in fans.FEATURES:
        assert np.allclose(back[feature], fleet.rows[feature], atol=1e-4)
    with pytest.raises(ValueError, match="missing column"):
        read_csv(path)  # the pump's columns are not there


def test_healthy_fans_follow_the_fan_laws():
    """Healthy magnitudes are those of a ~10 kW ventilation fan, and power grows with airflow faster than linearly (P ~ Q^3)."""
    rows = fan_fleet(devices=4, hours=72.0, faults="none").rows
    for feature, (low, high) in {"motor_temp": (15, 75), "fan_vibration": (0.4, 3.5), "airflow": (0.8, 5.2), "power_kw": (0.3, 13)}.items():
        assert low < rows[feature].min() and rows[feature].max() < high, feature
    flow, power = rows["airflow"], rows["power_kw"]
    assert np.corrcoef(flow, power)[0, 1] > 0.9
    low_flow, high_flow = power[flow < np.quantile(flow, 0.2)].mean(), power[flow > np.quantile(flow, 0.8)].mean()
    assert high_flow / low_flow > 4  # airflow doubles or more between the two groups: power grows by far more


def test_auto_faults_cover_every_fan_fault_kind():
    """`auto` on 8 fans injects every fan fault kind, and the labels match the schedule."""
    fleet = fan_fleet(devices=8, hours=72.0)
    assert {f["kind"] for f in fleet.schedule} == set(fans.FAULT_KINDS)
    rows = fleet.rows
    for f in fleet.schedule:
        inside = (rows["device"] == f["device"]) & (rows["ts"] >= f["start_ts"]) & (rows["ts"] < f["end_ts"])
        assert (rows["label"][inside] == 1).all() and set(rows["fault"][inside]) == {f["kind"]}
    assert (rows["label"] == 1).sum() == sum(((rows["device"] == f["device"]) & (rows["ts"] >= f["start_ts"]) &
                                              (rows["ts"] < f["end_ts"])).sum() for f in fleet.schedule)


def test_imbalance_raises_vibration_with_speed_and_nothing_else():
    """An imbalance lifts only the vibration, by > 1.5 mm/s even at night's speed and by more the faster the fan turns."""
    healthy, faulty = one_fan(None, start_h=2.0, hours=16.0), one_fan("imbalance", start_h=2.0, hours=16.0)  # night into day
    inside = slice(2 * 60 + 10, 18 * 60)  # after the few minutes of onset
    rise = faulty[inside, fans.VIBRATION] - healthy[inside, fans.VIBRATION]
    assert rise.min() > 1.5
    assert np.corrcoef(rise, healthy[inside, fans.AIRFLOW])[0, 1] > 0.9  # airflow follows the fan's speed
    assert np.array_equal(np.delete(faulty, fans.VIBRATION, axis=1), np.delete(healthy, fans.VIBRATION, axis=1))
    assert np.array_equal(faulty[18 * 60 :], healthy[18 * 60 :])


def test_overheating_heats_the_motor_fast():
    """Overheating adds >= 12 degC to the motor temperature within 30 min and a little power; vibration and airflow stay."""
    healthy, faulty = one_fan(None), one_fan("overheating")
    rise = faulty[:, fans.TEMP] - healthy[:, fans.TEMP]
    assert np.all(rise[: 10 * 60] == 0) and rise[10 * 60 + 30] > 12
    assert 1.0 < (faulty[10 * 60 + 60 :, fans.POWER] / healthy[10 * 60 + 60 :, fans.POWER])[: 3 * 60].mean() < 1.05
    for column in (fans.VIBRATION, fans.AIRFLOW):
        assert np.array_equal(faulty[:, column], healthy[:, column])


def test_belt_slip_loses_airflow_and_power_in_episodes_and_flutters():
    """A slipping belt costs airflow and power in episodes that grow with wear, and makes the vibration erratic."""
    healthy, faulty = one_fan(None, hours=6.0), one_fan("belt_slip", hours=6.0)
    late = slice(10 * 60 + 180, 16 * 60)  # the worn second half
    ratio = faulty[late, fans.AIRFLOW] / healthy[late, fans.AIRFLOW]
    assert ratio.min() < 0.85 and np.mean(ratio < 0.95) > 0.1  # deep slips, on a good share of the minutes
    assert (faulty[late, fans.POWER] <= healthy[late, fans.POWER]).all() and (faulty[late, fans.POWER] < healthy[late, fans.POWER] - 0.3).any()
    assert np.std(faulty[late, fans.VIBRATION] - healthy[late, fans.VIBRATION]) > 0.1
    assert np.array_equal(faulty[: 10 * 60], healthy[: 10 * 60])


def test_stuck_sensor_repeats_one_value():
    """A stuck sensor repeats its last healthy value exactly for the whole fault; the other sensors keep moving."""
    faulty = one_fan("stuck_sensor")
    inside = faulty[10 * 60 : 14 * 60]
    stuck = [j for j in range(4) if np.all(inside[:, j] == inside[0, j])]
    assert len(stuck) == 1 and inside[0, stuck[0]] == faulty[10 * 60 - 1, stuck[0]]


def test_synth_cli_machine_fan_and_pump_default(tmp_path, capsys):
    """`synth --machine fan` writes fans with fan faults; pump fault kinds are refused for fans; the default stays pumps."""
    from training.__main__ import main

    out = tmp_path / "fans.csv"
    assert main(["synth", "--machine", "fan", "--devices", "2", "--hours", "3", "--faults", "imbalance:fan-01@1+1",
                 "--out", str(out)]) == 0
    rows = read_csv(out, fans.FEATURES)
    assert set(rows["device"]) == {"fan-00", "fan-01"} and set(rows["fault"]) == {"", "imbalance"}
    assert main(["synth", "--machine", "fan", "--hours", "3", "--faults", "bearing_wear:fan-01@1+1", "--out", str(out)]) == 2
    assert "imbalance, belt_slip, overheating, stuck_sensor" in capsys.readouterr().err
    pumps = tmp_path / "pumps.csv"
    assert main(["synth", "--devices", "2", "--hours", "3", "--out", str(pumps)]) == 0
    assert pumps.read_text().splitlines()[0] == ",".join(synth.COLUMNS)


def test_shipped_fan_bundle_loads_with_the_fan_sensors():
    """exported_models/fan-lstm verifies with the daemon's loader and forecasts the four fan sensors."""
    from agent.core.model import load_bundle

    bundle = load_bundle(FAN_BUNDLE)
    assert bundle.name == "fan-lstm" and bundle.features == fans.FEATURES and bundle.targets == fans.FEATURES
    rows = fan_fleet(devices=1, hours=3.0, faults="none", dropout_rate=0.0, dropout_burst_rate=0.0).rows
    window = np.stack([rows[f] for f in fans.FEATURES], axis=1)[-bundle.lookback:][None].astype(np.float32)
    forecast = bundle.predict(window)  # (1, H, 4)
    assert forecast.shape == (1, bundle.horizon, 4) and np.isfinite(forecast).all()
    # One step ahead of a healthy fan, within a few of each sensor's healthy spreads of the last reading.
    assert np.all(np.abs(forecast[0, 0] - window[0, -1]) < 4 * bundle.scale)


def test_shipped_fan_bundle_alerts_on_each_fault_and_not_on_a_healthy_fan(tmp_path):
    """Replayed through the daemon's pipeline, fan-lstm opens an alert during every kind of fan fault, none on a healthy fan."""
    from agent.config.settings import Settings
    from agent.tools.replay import replay

    specs = [FaultSpec(kind, fans.device_name(i + 1), 8.0, hours)
             for i, (kind, hours) in enumerate([("imbalance", 3.0), ("belt_slip", 6.0), ("overheating", 2.0), ("stuck_sensor", 2.0)])]
    fleet = fans.generate_fleet(FleetConfig(devices=5, hours=16.0, seed=2031, faults=specs, start_ts=synth.DEFAULT_START_TS + 60 * 86400))
    data, out = tmp_path / "fans.csv", tmp_path / "scored.csv"
    write_csv(fleet, data)
    replay(FAN_BUNDLE, data, out, settings=Settings(model={"path": FAN_BUNDLE}))
    with open(out, newline="") as f:
        alerting = [(r["device"], int(float(r["ts"]))) for r in csv.DictReader(f) if r["alert"] == "1"]
    assert not [ts for device, ts in alerting if device == "fan-00"], "alerts on the healthy fan"
    for fault in fleet.schedule:
        assert any(d == fault["device"] and fault["start_ts"] <= ts < fault["end_ts"] for d, ts in alerting), fault


def test_fan_bundle_ships_in_the_edge_install():
    """pyproject's package data lists fan-lstm's model.onnx and manifest.json beside pump-lstm's (the edge install carries both)."""
    import tomllib

    shipped = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["agent.shipped_models"]
    assert {"fan-lstm/model.onnx", "fan-lstm/manifest.json"} <= set(shipped)
    manifest = json.loads((FAN_BUNDLE / "manifest.json").read_text())
    assert manifest["training"]["command"] == "python -m training build-shipped --machine fan"


@pytest.mark.training
def test_build_shipped_fan_recipe_and_options():
    """build-shipped --machine fan trains the fan recipe (2 x 32) unless an option says otherwise; pump keeps the default."""
    from training import cli
    from training.__main__ import COMMANDS

    parser = argparse.ArgumentParser()
    COMMANDS["build-shipped"][1](parser)
    fan = parser.parse_args(["--machine", "fan"])
    assert (cli._train_config(fan, recipe=cli.SHIPPED["fan"][4]).hidden_size, fan.out) == (32, None)
    wider = parser.parse_args(["--machine", "fan", "--hidden-size", "48"])
    assert cli._train_config(wider, recipe=cli.SHIPPED["fan"][4]).hidden_size == 48
    pump = parser.parse_args([])
    assert cli._train_config(pump, recipe=cli.SHIPPED[pump.machine][4]).hidden_size == 64


def test_fan_synth_does_not_import_torch(tmp_path):
    """The fan simulator is numpy only: `synth --machine fan` runs on the edge install (the demo's)."""
    code = ("import sys; from training.__main__ import main; "
            f"rc = main(['synth', '--machine', 'fan', '--hours', '2', '--out', {str(tmp_path / 'f.csv')!r}]); "
            "sys.exit(rc or ('torch' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60).returncode == 0
