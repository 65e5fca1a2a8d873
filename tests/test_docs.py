"""Documentation and operator tooling stay true to the code: config reference, Grafana dashboard, CLI help."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, SHIPPED_MODEL

from agent.ops.metrics import METRICS, exposed_names


def agent_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EDGECAST_")}
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=REPO, capture_output=True, text=True, env={**base, **(env or {})}, timeout=120)


def test_configuration_reference_is_generated_from_the_settings_model():
    """docs/configuration.md equals `python -m agent config-reference`; regenerate it when agent/config/settings.py changes."""
    from agent.config.reference import generate

    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == generate(), "docs/configuration.md is stale: run `python -m agent config-reference > docs/configuration.md`"


def test_configuration_reference_names_every_setting_and_its_environment_variable():
    """Every field of every section appears with its EDGECAST_* variable (the generator walks the whole model)."""
    from pydantic import BaseModel

    from agent.config.settings import Settings
    from agent.config.reference import generate

    text = generate()

    def walk(model, prefix):
        for name, info in model.model_fields.items():
            path = f"{prefix}{name}"
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                yield from walk(info.annotation, path + ".")
            else:
                yield path

    paths = list(walk(Settings, ""))
    assert len(paths) > 60
    for path in paths:
        assert f"`EDGECAST_{path.upper().replace('.', '__')}`" in text, path


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((REPO / "grafana" / "edgecast-dashboard.json").read_text())
    exprs = []
    for panel in dashboard["panels"]:
        exprs += [target["expr"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable.get("definition"):
            exprs.append(variable["definition"])
    return exprs


PROCESS_METRICS = {"process_resident_memory_bytes", "process_virtual_memory_bytes", "process_cpu_seconds_total",
                   "process_open_fds", "process_max_fds", "process_start_time_seconds"}


def test_grafana_dashboard_uses_only_metrics_the_agent_exports():
    """Every metric name in grafana/edgecast-dashboard.json is one the agent exposes; every agent metric has a panel."""
    names = set()
    for expr in dashboard_exprs():
        names |= set(re.findall(r"\b((?:edgecast|process)_[a-z_]+)\b", expr))
    unknown = names - exposed_names() - PROCESS_METRICS
    assert not unknown, f"the dashboard queries metrics the agent does not export: {sorted(unknown)}"
    families_used = {name for name in METRICS if any(n == name or n.startswith(name + "_") for n in names)}
    assert families_used == set(METRICS), f"metrics without a panel: {sorted(set(METRICS) - families_used)}"


def test_metric_names_in_the_registry_match_the_declared_list():
    """A scrape exposes exactly the declared families (so the dashboard check above is checking the real names)."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from prometheus_client.parser import text_string_to_metric_families

    from agent.config.settings import Settings
    from agent.app import Agent
    from agent.ops.metrics import AgentMetrics

    agent = Agent(Settings(model={"path": SHIPPED_MODEL}, outbox={"enabled": False}))
    agent.runtimes[0].load()  # the bundle and its pipeline, as start() loads them
    metrics = AgentMetrics(agent)
    metrics.observe_inference(3, 0.002)
    families = {f.name for f in text_string_to_metric_families(metrics.render().decode())}
    edgecast = {f for f in families if f.startswith("edgecast_")}
    # The link does not exist before start(): the mqtt families are the only ones missing here.
    assert edgecast == {n for n in METRICS if not n.startswith("edgecast_mqtt_") and not n.startswith("edgecast_outbox_")}
    assert prometheus_client is not None


def test_help_shows_examples_and_every_command():
    """`--help` lists the commands with examples and exit codes; `--version` names the version."""
    out = agent_cli("--help")
    assert out.returncode == 0
    for command in ("run", "check-config", "replay", "models", "config-reference", "schemas"):
        assert command in out.stdout
    assert "examples:" in out.stdout and "exit codes" in out.stdout
    verify_help = agent_cli("models", "verify", "--help")
    assert "exit codes: 0" in verify_help.stdout and "--public-key" in verify_help.stdout
    from agent import __version__

    assert agent_cli("--version").stdout.startswith(f"edgecast-agent {__version__}")


def test_models_verify_exit_codes(tmp_path):
    """models verify: 0 for a good bundle (signature checked with the key), 1 naming the failed check, 2 on usage errors."""
    import shutil

    from agent.core import signing

    folder = tmp_path / "bundle"
    shutil.copytree(SHIPPED_MODEL, folder)
    good = agent_cli("models", "verify", str(folder))
    assert good.returncode == 0 and "OK" in good.stdout and "sha256" in good.stdout

    secret = signing.generate_secret()
    (folder / signing.SIGNATURE_FILE).write_text(signing.sign(secret, (folder / "manifest.json").read_bytes()).hex())
    public = signing.public_key(secret).hex()
    signed = agent_cli("models", "verify", str(folder), "--public-key", public, "--require-signature", "--json")
    assert signed.returncode == 0 and json.loads(signed.stdout)["signature"].startswith("verified")
    stranger = signing.public_key(signing.generate_secret()).hex()
    wrong_key = agent_cli("models", "verify", str(folder), "--public-key", stranger)
    assert wrong_key.returncode == 1 and "signature" in wrong_key.stderr

    data = bytearray((folder / "model.onnx").read_bytes())
    data[100] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    tampered = agent_cli("models", "verify", str(folder))
    assert tampered.returncode == 1 and "sha256" in tampered.stderr

    assert agent_cli("models", "verify").returncode == 2
    assert agent_cli("models", "verify", str(folder), "--require-signature").returncode == 1


def test_check_config_reports_errors_with_their_paths():
    """check-config prints every invalid setting with its dotted path and exits 1; new sections are validated too."""
    out = agent_cli("check-config", "--no-model", env={"EDGECAST_METRICS__PORT": "70000", "EDGECAST_HOMEASSISTANT__BIRTH_TOPIC": "ha/#"})
    assert out.returncode == 1
    assert "metrics.port" in out.stderr and "homeassistant" in out.stderr and "wildcards" in out.stderr
    unsigned_rollout = agent_cli("check-config", "--no-model", env={"EDGECAST_ROLLOUT__ENABLED": "true"})
    assert unsigned_rollout.returncode == 1 and "rollout.enabled needs model.public_key" in unsigned_rollout.stderr
    ok = agent_cli("check-config", "--no-model", env={"EDGECAST_METRICS__ENABLED": "true", "EDGECAST_LOG__FORMAT": "json"})
    assert ok.returncode == 0 and json.loads(ok.stdout)["metrics"]["enabled"] is True
