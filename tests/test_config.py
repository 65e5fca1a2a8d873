"""Configuration and the CLI around it: check-config output, masking, field paths, env vars, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bundles import PUMP_BUNDLE, REPO_ROOT

from agent import __version__
from agent.__main__ import main
from agent.config.settings import UnknownEnvironmentVariable, check_environment, load_settings

SECRET = "hunter2-do-not-print"


pytestmark = pytest.mark.usefixtures("clean_edgecast_environment")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_check_config_prints_effective_config_with_password_masked(tmp_path, capsys):
    """check-config prints the merged configuration as JSON, the password masked, and exits 0."""
    config = write(tmp_path / "agent.toml", f'[mqtt]\nhost = "broker.local"\npassword = "{SECRET}"\n[mqtt.tls]\nenabled = true\n'
                                            f'[model]\npath = "{PUMP_BUNDLE}"\n')
    assert main(["check-config", "--config", str(config)]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["mqtt"]["host"] == "broker.local"
    assert data["mqtt"]["password"] == "**********"
    assert SECRET not in out + err
    assert "model bundle OK" in err


def test_check_config_reports_field_paths_and_exits_1(tmp_path, capsys):
    """Invalid values are listed with their dotted field paths; a bad secret's value is not echoed."""
    config = write(tmp_path / "bad.toml", f'[mqtt]\nport = 70000\npassword = "{SECRET}"\npassword_file = "/x"\n[window]\nmin_completeness = 2\n')
    assert main(["check-config", "--config", str(config), "--no-model"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "mqtt.port" in err and "window.min_completeness" in err
    assert SECRET not in err


def test_unknown_keys_in_file_are_errors(tmp_path, capsys):
    """A misspelt key in the TOML file is an error naming its path."""
    config = write(tmp_path / "typo.toml", "[mqtt]\nhots = 'x'\n")
    assert main(["check-config", "--config", str(config), "--no-model"]) == 1
    assert "mqtt.hots" in capsys.readouterr().err


@pytest.mark.parametrize("variable", ["EDGECAST_MQTT_HOST", "EDGECAST_FOO", "EDGECAST_MQTT__TLS__CAFILE", "EDGECAST_AGENT_ID__X"])
def test_unknown_environment_variables_are_errors(monkeypatch, capsys, variable):
    """An EDGECAST_* variable that names no setting is an error naming the variable (not silently ignored)."""
    monkeypatch.setenv(variable, "1")
    with pytest.raises(UnknownEnvironmentVariable, match=variable):
        check_environment()
    assert main(["check-config", "--no-model"]) == 1
    assert variable in capsys.readouterr().err


def test_environment_wins_over_file(tmp_path, monkeypatch):
    """EDGECAST_MQTT__PORT overrides mqtt.port from the file; other file values stay."""
    config = write(tmp_path / "agent.toml", "[mqtt]\nhost = 'from-file'\nport = 1000\n")
    monkeypatch.setenv("EDGECAST_MQTT__PORT", "2000")
    settings = load_settings(config)
    assert (settings.mqtt.host, settings.mqtt.port) == ("from-file", 2000)


def test_missing_config_file_is_a_clear_error(tmp_path, capsys):
    """A --config path that does not exist exits 1 naming the file, for check-config and run alike."""
    missing = tmp_path / "nope.toml"
    assert main(["check-config", "--config", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err
    assert main(["run", "--config", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err


def test_check_config_refuses_a_bad_bundle(tmp_path, capsys):
    """check-config also verifies the model bundle and exits 1 with the reason when it is unusable."""
    config = write(tmp_path / "agent.toml", f"[model]\npath = '{tmp_path / 'no-bundle'}'\n")
    assert main(["check-config", "--config", str(config)]) == 1
    assert "no-bundle" in capsys.readouterr().err


def test_version_and_usage_errors():
    """--version prints the package version (exit 0); an unknown command is a usage error (exit 2)."""
    version = subprocess.run([sys.executable, "-m", "agent", "--version"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert version.returncode == 0 and __version__ in version.stdout
    usage = subprocess.run([sys.executable, "-m", "agent", "frobnicate"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert usage.returncode == 2 and "usage" in usage.stderr
    missing = subprocess.run([sys.executable, "-m", "agent", "replay", "--model", "x"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert missing.returncode == 2 and "--data" in missing.stderr


def test_booleans_are_refused_where_a_number_is_meant(tmp_path, monkeypatch, capsys):
    """`port = true` is refused naming mqtt.port (not read as port 1), in every section; "1883" from the environment still works."""
    from pydantic import ValidationError

    config = write(tmp_path / "bool.toml", "[mqtt]\nport = true\nreconnect_min_s = false\n[errors]\nmax_per_minute = true\n"
                   "[inference]\nmodel_cpu = true\n[detect]\nenabled = false\n")
    assert main(["check-config", "--config", str(config), "--no-model"]) == 1
    err = capsys.readouterr().err
    for path in ("mqtt.port", "mqtt.reconnect_min_s", "errors.max_per_minute", "inference.model_cpu"):
        assert f"{path}: Value error, expected a number, not a boolean" in err, err
    assert "detect.enabled" not in err, "real switches still take true/false"
    monkeypatch.setenv("EDGECAST_MQTT__PORT", "1883")
    settings = load_settings(write(tmp_path / "good.toml", "[detect]\nenabled = false\n[mqtt]\nreconnect_min_s = 2\n"))
    assert settings.mqtt.port == 1883 and type(settings.mqtt.port) is int
    assert settings.detect.enabled is False and settings.mqtt.reconnect_min_s == 2.0
    with pytest.raises(ValidationError, match="not a boolean"):
        settings.metrics.port = True
