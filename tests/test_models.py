"""Several models in one daemon ([[models]]): routing by device, one connection, each model reloaded on its own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from bundles import PUMP_BUNDLE, healthy_series, univariate_bundle
from conftest import AGENT_ID, PREFIX, healthy_rows, publish_rows, wait_until
from pydantic import ValidationError

from agent.config.models import model_plans, patterns_overlap
from agent.config.settings import Settings

STATUS = f"{PREFIX}/agent/{AGENT_ID}/status"
ERRORS = f"{PREFIX}/agent/{AGENT_ID}/errors"


# -- configuration ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("first, second, overlap", [
    ("pump-*", "fan-*", False), ("*", "fan-*", True), ("pump-??", "pump-1*", True), ("a*b", "*c", False),
    ("*-01", "pump-*", True), ("x?y", "xy", False), ("pump-0?", "pump-1?", False), ("*", "*", True),
])
def test_device_patterns_overlap_exactly_when_one_name_matches_both(first, second, overlap):
    """Two device patterns overlap when some device name matches both, whichever order they are given in."""
    assert patterns_overlap(first, second) is overlap and patterns_overlap(second, first) is overlap


def test_two_models_that_could_claim_one_device_are_a_configuration_error():
    """Overlapping device patterns on overlapping topics are refused, naming both models and both patterns."""
    with pytest.raises(ValidationError, match=r"models 'pumps' and 'any' can both claim one device.*'pump-\*' and '\*-01'"):
        Settings(models=[{"name": "pumps", "devices": ["pump-*"]}, {"name": "any", "devices": ["*-01"]}])


def test_models_on_separate_topics_may_use_the_same_device_patterns():
    """Patterns may overlap when the models' input topics never do (each model reads its own topics)."""
    settings = Settings(models=[{"name": "a", "telemetry": "site-a/{device}/telemetry", "sensor": ""},
                                {"name": "b", "telemetry": "site-b/{device}/telemetry", "sensor": ""}])
    assert [plan.name for plan in model_plans(settings)] == ["a", "b"]


@pytest.mark.parametrize("config, message", [
    ({"model": {"reload_poll_s": 5}, "models": [{"name": "a"}]}, "set either \\[model\\] .* or \\[\\[models\\]\\]"),
    ({"models": [{"name": "a", "devices": ["a*"]}, {"name": "a", "devices": ["b*"]}]}, "names must be unique"),
    ({"models": [{"name": "bad name"}]}, "name"),
    ({"models": [{"name": "a", "devices": ["pump/+"]}]}, "devices"),
    ({"models": [{"name": "a", "devices": ["a*"], "sparkplug_x": 1}]}, "sparkplug_x"),
])
def test_bad_models_configurations_are_refused_with_the_setting_named(config, message):
    """Both [model] and [[models]], duplicate names, bad names or patterns and unknown keys are refused."""
    with pytest.raises(ValidationError, match=message):
        Settings(**config)


def test_each_model_gets_its_own_sections_and_the_single_model_is_unchanged():
    """[models.detect] replaces [detect] for that model only; without [[models]] the one plan is the settings themselves."""
    settings = Settings(detect={"threshold_scale": 1.5}, models=[
        {"name": "pumps", "devices": ["pump-*"]},
        {"name": "fans", "devices": ["fan-*"], "detect": {"threshold_scale": 3.0}, "reload_poll_s": 0},
    ])
    pumps, fans = model_plans(settings)
    assert pumps.settings.detect.threshold_scale == 1.5 and fans.settings.detect.threshold_scale == 3.0
    assert fans.settings.model.reload_poll_s == 0 and pumps.settings.model.reload_poll_s == 10.0
    assert pumps.serves("pump-07") and not pumps.serves("fan-01") and fans.serves("fan-01")
    assert pumps.rollout_topic != fans.rollout_topic
    single = Settings()
    (plan,) = model_plans(single)
    assert plan.single and plan.settings is single and plan.serves("anything")


# -- the daemon ---------------------------------------------------------------------------------------------------


def meter_rows(device: str, n: int, end_ts: int, jump_at: int | None = None) -> list[tuple[str, int, dict[str, float]]]:
    """A second machine type: one sensor `value` (the univariate test bundle), one row a minute, a jump of +8 from
    `jump_at` on (eight standard deviations of its training data)."""
    series = healthy_series(n, seed=3)
    rows = []
    for k, value in enumerate(series):
        shifted = value + (8.0 if jump_at is not None and k >= jump_at else 0.0)
        rows.append((device, end_ts - (n - 1 - k) * 60, {"value": round(float(shifted), 4)}))
    return rows


@pytest.fixture
def manifest(model_path) -> dict:
    return json.loads((model_path / "manifest.json").read_text())


@pytest.fixture
def two_models(tmp_path, model_path):
    """A pump model (a copy of the shipped bundle, to be replaced) for pump-*, and a meter model for meter-*."""
    pumps = tmp_path / "pumps"
    shutil.copytree(model_path, pumps)
    return [
        {"name": "pumps", "path": str(pumps), "devices": ["pump-*"], "reload_poll_s": 0},
        {"name": "meters", "path": str(univariate_bundle()), "devices": ["meter-*"], "reload_poll_s": 0},
    ]


@pytest.mark.mqtt
@pytest.mark.training
def test_two_models_serve_their_devices_on_one_connection_and_reload_apart(start_agent, subscriber, two_models, manifest):
    """Two device types on one daemon: each gets forecasts and alerts from its own model, a device of neither is
    reported once as no_model, and a hot reload of one model leaves the other serving throughout."""
    agent = start_agent(models=two_models, metrics={"enabled": True, "port": 0})
    status = subscriber.expect(STATUS, lambda m: m.json()["state"] == "online", timeout=10).json()
    assert [m["model"] for m in status["models"]] == ["pumps", "meters"]
    assert [m["sha256"] for m in status["models"]] == [agent.runtime("pumps").bundle.sha256, agent.runtime("meters").bundle.sha256]
    pump_rows = healthy_rows(devices=1, rows=150, seed=8, faults="spikes:pump-00@1.5+2")
    meters = meter_rows("meter-00", 80, end_ts=pump_rows[-1][1], jump_at=50)
    publish_rows(subscriber, sorted(pump_rows + meters, key=lambda row: row[1]))

    pump_alert = subscriber.expect(f"{PREFIX}/pump-00/alert", lambda m: m.json()["state"] == "new", timeout=30).json()
    meter_alert = subscriber.expect(f"{PREFIX}/meter-00/alert", lambda m: m.json()["state"] == "new", timeout=30).json()
    assert pump_alert["model"]["name"] == manifest["name"]
    meter_manifest = json.loads((univariate_bundle() / "manifest.json").read_text())
    assert meter_alert["model"]["name"] == meter_manifest["name"] and meter_alert["started_at"] >= meters[50][1]
    exposition = agent.metrics.render().decode()
    assert 'edgecast_model_info{model="meters",name="%s"' % meter_manifest["name"] in exposition
    assert 'edgecast_model_devices{model="pumps"} 1.0' in exposition and 'edgecast_model_devices{model="meters"} 1.0' in exposition
    meter_forecast = subscriber.expect(f"{PREFIX}/meter-00/forecast", timeout=10).json()
    pump_forecast = subscriber.expect(f"{PREFIX}/pump-00/forecast", timeout=10).json()
    assert set(meter_forecast["forecast"]) == {"value"} and set(pump_forecast["forecast"]) == set(manifest["targets"])

    # A device no model serves: rejected as no_model, reported once however often it sends.
    publish_rows(subscriber, [("fan-09", pump_rows[-1][1] - k, {"value": 1.0}) for k in range(5)])
    report = subscriber.expect(ERRORS, lambda m: m.json()["reason"] == "no_model", timeout=10).json()
    assert report["device"] == "fan-09"
    wait_until(lambda: agent.stats()["rejected"]["no_model"] == 5, timeout=10, message="every no_model message counted")
    subscriber.quiet(ERRORS, 0.5)
    assert sum(1 for m in subscriber.history if m.topic == ERRORS and m.json()["reason"] == "no_model") == 1

    # Hot reload of the pump model; the meters keep getting forecasts from theirs, before, during and after.
    pumps_dir = Path(two_models[0]["path"])
    manifest_path = pumps_dir / "manifest.json"
    edited = json.loads(manifest_path.read_text())
    edited["version"] = "9.9.9-hot"
    manifest_path.write_text(json.dumps(edited))
    forecasts_before = agent.stats()["forecasts"]
    agent.request_reload()
    later = pump_rows[-1][1] + 60
    publish_rows(subscriber, meter_rows("meter-01", 40, end_ts=later))
    subscriber.expect(STATUS, lambda m: [x.get("version") for x in m.json().get("models", [])][:1] == ["9.9.9-hot"], timeout=20)
    meter_after = subscriber.collect(f"{PREFIX}/meter-01/forecast", 40 - meter_manifest["lookback"] + 1, timeout=20)
    assert all(m.json()["model"]["version"] == meter_manifest["version"] for m in meter_after)
    assert agent.runtime("pumps").bundle.version == "9.9.9-hot" and agent.runtime("meters").swaps == 0
    assert agent.stats()["forecasts"] > forecasts_before
    publish_rows(subscriber, healthy_rows(devices=1, rows=61, seed=2, end_ts=later))
    after = subscriber.expect(f"{PREFIX}/pump-00/forecast", lambda m: m.json()["model"]["version"] == "9.9.9-hot", timeout=20)
    assert after.json()["model"]["name"] == manifest["name"]


@pytest.mark.mqtt
@pytest.mark.training
def test_each_model_keeps_its_own_state_files(start_agent, subscriber, two_models, tmp_path):
    """Open alerts are saved per model at stop (open-alerts.<name>.json), so a restart resumes each model's own."""
    agent = start_agent(models=two_models)
    end = healthy_rows(devices=1, rows=2, seed=1)[-1][1]
    publish_rows(subscriber, meter_rows("meter-00", 60, end_ts=end, jump_at=40))
    subscriber.expect(f"{PREFIX}/meter-00/alert", lambda m: m.json()["state"] == "new", timeout=30)
    agent.stop()
    state = Path(agent.settings.state.directory)
    meters = json.loads((state / "open-alerts.meters.json").read_text())
    pumps = json.loads((state / "open-alerts.pumps.json").read_text())
    assert "meter-00" in json.dumps(meters) and "meter-00" not in json.dumps(pumps)


# -- the tools ----------------------------------------------------------------------------------------------------


def _two_model_config(tmp_path: Path, meters_detect: str = "") -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[[models]]\nname = "pumps"\npath = "{PUMP_BUNDLE}"\ndevices = ["pump-*"]\n'
        f'[[models]]\nname = "meters"\npath = "{univariate_bundle()}"\ndevices = ["meter-*"]\n{meters_detect}'
    )
    return config


def _meter_csv(path: Path) -> Path:
    rows = meter_rows("meter-00", 80, end_ts=1_767_571_200, jump_at=50)
    path.write_text("ts,device,value\n" + "".join(f"{ts},{device},{values['value']}\n" for device, ts, values in rows))
    return path


def _alerts(out: Path) -> int:
    lines = out.read_text().splitlines()
    column = lines[0].split(",").index("alert")
    return sum(1 for line in lines[1:] if line.split(",")[column] == "1")


@pytest.mark.training
def test_replay_by_model_name_uses_that_models_bundle_and_sections(tmp_path, capsys):
    """`replay --model NAME --config FILE` replays with that [[models]] entry's bundle and its own [detect]."""
    from agent.__main__ import main as agent_main

    data = _meter_csv(tmp_path / "meters.csv")
    plain = _two_model_config(tmp_path)
    assert agent_main(["replay", "--model", "meters", "--config", str(plain), "--data", str(data), "--out", str(tmp_path / "a.csv")]) == 0
    assert _alerts(tmp_path / "a.csv") > 0, "the jump opens an alert under the meters model's default thresholds"
    deaf = _two_model_config(tmp_path, "[models.detect]\nthreshold_scale = 100.0\n")
    assert agent_main(["replay", "--model", "meters", "--config", str(deaf), "--data", str(data), "--out", str(tmp_path / "b.csv")]) == 0
    assert _alerts(tmp_path / "b.csv") == 0, "the entry's own [detect] section applies"
    assert agent_main(["replay", "--model", "fans", "--config", str(plain), "--data", str(data), "--out", str(tmp_path / "c.csv")]) == 1
    assert "'fans'" in capsys.readouterr().err


@pytest.mark.training
def test_models_verify_checks_every_configured_bundle(tmp_path, capsys):
    """`models verify --config FILE` verifies each model's bundle and names it; --model picks one; a bad one exits 1."""
    from agent.__main__ import main as agent_main

    config = _two_model_config(tmp_path)
    assert agent_main(["models", "verify", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "model pumps:" in out and "model meters:" in out and out.count(": OK") == 2
    assert agent_main(["models", "verify", "--config", str(config), "--model", "meters", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "meters"
    broken = tmp_path / "broken"
    shutil.copytree(univariate_bundle(), broken)
    (broken / "model.onnx").write_bytes(b"not a model")
    config.write_text(config.read_text().replace(str(univariate_bundle()), str(broken)))
    assert agent_main(["models", "verify", "--config", str(config)]) == 1


@pytest.mark.mqtt
@pytest.mark.training
def test_a_rollout_reaches_only_the_model_whose_topic_it_was_published_on(start_agent, subscriber, mosquitto, two_models, model_path, tmp_path):
    """Each model has its own rollout topic: a bundle published for the pumps replaces the pump model only, and is kept
    in that model's own folder of state/models."""
    from agent.core import signing
    from training.publish_model import publish_bundle

    secret = signing.generate_secret()
    (tmp_path / "key").write_text(secret.hex())
    key = signing.public_key(secret).hex()
    models = [{**entry, "public_key": key} for entry in two_models]
    agent = start_agent(models=models, rollout={"enabled": True, "topic": "edgecast/models/site"})
    subscriber.expect(STATUS, lambda m: m.json()["state"] == "online", timeout=10)
    new = tmp_path / "pumps-v2"
    shutil.copytree(model_path, new)
    manifest = json.loads((new / "manifest.json").read_text())
    manifest["version"] = "2.0.0-rolled"
    (new / "manifest.json").write_text(json.dumps(manifest))
    publish_bundle(new, "edgecast/models/site/pumps", mosquitto.host, mosquitto.port, key_file=tmp_path / "key", release=1,
                   expires="2999-01-01T00:00:00Z")
    status = subscriber.expect(STATUS, lambda m: [x["version"] for x in m.json().get("models", [])][:1] == ["2.0.0-rolled"],
                               timeout=30).json()
    assert status["models"][0]["reload"]["state"] == "ok" and "reload" not in status["models"][1]
    assert agent.runtime("pumps").bundle.version == "2.0.0-rolled" and agent.runtime("meters").swaps == 0
    state = Path(agent.settings.state.directory)
    assert (state / "models" / "pumps" / "active").is_file() and not (state / "models" / "meters").exists()


@pytest.mark.training
def test_the_router_sends_each_device_to_its_model_and_refuses_what_no_model_reads(tmp_path, model_path):
    """Readings go to the model whose patterns name their device; other devices are no_model, other topics unknown_topic."""
    import time

    from agent.app import Agent
    from agent.core.events import Rejected
    from agent.transport.router import Router

    settings = Settings(state={"directory": str(tmp_path)}, models=[
        {"name": "pumps", "path": str(model_path), "devices": ["pump-*"]},
        {"name": "meters", "path": str(univariate_bundle()), "devices": ["meter-*"]},
    ])
    agent = Agent(settings)
    for runtime in agent.runtimes:
        runtime.load()
    router = Router(agent.runtimes, agent.errors)
    now = time.time()
    meter = router.parse("sensors/meter-01/telemetry", json.dumps({"ts": now, "values": {"value": 10.0}}).encode(), now)
    pump_values = {name: 50.0 for name in agent.runtime("pumps").bundle.features}
    pump = router.parse("sensors/pump-01/telemetry", json.dumps({"ts": now, "values": pump_values}).encode(), now)
    assert [s.model for s in meter] == [1] and [s.model for s in pump] == [0]
    for _ in range(3):
        assert router.parse("sensors/fan-01/telemetry", b'{"ts": 1, "values": {}}', now) == []
    assert agent.errors.snapshot()["no_model"] == 3
    with pytest.raises(Rejected, match="matches none of"):
        router.parse("elsewhere/pump-01/telemetry", b"{}", now)
    with pytest.raises(Rejected, match="not allowed"):
        router.parse("sensors/pump 01!/telemetry", b"{}", now)
