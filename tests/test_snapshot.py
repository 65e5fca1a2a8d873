"""The daemon's settings snapshot: validated in a forked child, the same values as pydantic's, read-only, and no
pydantic in the running daemon's process."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from conftest import PREFIX, healthy_rows, publish_rows

from agent.__main__ import _load_settings
from agent.config.settings import Settings, freeze, load_settings
from agent.config.snapshot import ModelSnapshot, MqttSnapshot, Secret, Snapshot, load_in_child

PASSWORD = "s3cret-never-shown"
KEY_HEX = "ab" * 32


pytestmark = pytest.mark.usefixtures("clean_edgecast_environment")


def full_config(tmp_path: Path) -> Path:
    """A configuration that sets a field of every kind: secret, paths, literals, unions, nested sections."""
    path = tmp_path / "agent.toml"
    path.write_text(
        'agent_id = "gw-7"\n'
        f'[mqtt]\nhost = "broker.local"\nport = 8883\nusername = "edge"\npassword = "{PASSWORD}"\n'
        'plaintext_password = "allow"\n'
        '[mqtt.tls]\nenabled = true\nca_file = "/etc/ssl/ca.pem"\n'
        f'[model]\npublic_key = "{KEY_HEX}"\nrequire_signature = true\nintra_op_threads = 2\n'
        '[inference]\nstride = 4\nmodel_cpu = 1\n'
        f'[state]\ndirectory = "{tmp_path / "state"}"\n'
        '[detect]\nthreshold_mode = "dynamic"\n'
    )
    return path


def assert_same(snapshot, model, where: str = "settings") -> None:
    for name in type(model).model_fields:
        value, copied = getattr(model, name), getattr(snapshot, name)
        if hasattr(type(value), "model_fields"):
            assert isinstance(copied, Snapshot), where + "." + name
            assert_same(copied, value, where + "." + name)
        elif hasattr(value, "get_secret_value"):
            assert isinstance(copied, Secret) and copied.get_secret_value() == value.get_secret_value(), where + "." + name
        else:
            assert copied == value and type(copied) is type(value), (where + "." + name, copied, value)


def test_snapshot_has_every_validated_value_with_its_type(tmp_path):
    """A snapshot (pickled, as it crosses the pipe) holds every field of the validated settings, same value and type."""
    settings = load_settings(full_config(tmp_path))
    snapshot = pickle.loads(pickle.dumps(freeze(settings)))
    assert_same(snapshot, settings)
    assert isinstance(snapshot.mqtt, MqttSnapshot) and isinstance(snapshot.model, ModelSnapshot)
    assert isinstance(snapshot.state.directory, Path) and snapshot.inference.model_cpu == 1


def test_snapshot_keeps_secrets_out_of_reprs(tmp_path):
    """The broker password never shows in a snapshot's repr (logs, tracebacks)."""
    snapshot = freeze(load_settings(full_config(tmp_path)))
    assert PASSWORD not in repr(snapshot) and PASSWORD not in repr(snapshot.mqtt)
    assert snapshot.mqtt.resolved_password() == PASSWORD


def test_snapshot_is_read_only_and_model_copy_replaces_fields(tmp_path):
    """Assigning to a snapshot raises; model_copy(update=...) returns a changed copy and refuses unknown names."""
    snapshot = freeze(Settings())
    with pytest.raises(AttributeError, match="read-only"):
        snapshot.mqtt.port = 1
    changed = snapshot.model.model_copy(update={"path": tmp_path, "require_signature": True})
    assert (changed.path, changed.require_signature) == (tmp_path, True)
    assert snapshot.model.require_signature is False and isinstance(changed, ModelSnapshot)
    with pytest.raises(AttributeError, match="no settings"):
        snapshot.model.model_copy(update={"pth": tmp_path})


def test_snapshot_helpers_read_credentials_like_the_settings(tmp_path, monkeypatch):
    """Password files, systemd credentials, the plaintext-password rule and the public key work on snapshots."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "broker-password").write_text(PASSWORD + "\n")
    (creds / "bundle-key").write_text(KEY_HEX + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = Settings(mqtt={"host": "broker.local", "password_file": "broker-password"}, model={"public_key_file": "bundle-key"})
    snapshot = freeze(settings)
    assert snapshot.mqtt.resolved_password() == settings.mqtt.resolved_password() == PASSWORD
    assert snapshot.mqtt.plaintext_password_problem() == settings.mqtt.plaintext_password_problem() is not None
    assert snapshot.model.resolved_public_key() == settings.model.resolved_public_key() == bytes.fromhex(KEY_HEX)


def test_load_in_child_returns_the_snapshot_and_relays_errors(tmp_path, capsys):
    """The forked check gives back the snapshot; a bad configuration gives its exit code and message here."""
    snapshot, code = load_in_child(lambda: _load_settings(str(full_config(tmp_path))))
    assert code is None and snapshot.agent_id == "gw-7" and snapshot.mqtt.port == 8883
    bad = tmp_path / "bad.toml"
    bad.write_text("[inference]\nstride = 0\n")
    snapshot, code = load_in_child(lambda: _load_settings(str(bad)))
    assert snapshot is None and code == 1
    assert "inference.stride" in capsys.readouterr().err


def test_load_in_child_reports_a_crash_in_the_check(capsys):
    """An exception in the child's check is printed with its traceback and gives a failure code, not a hang."""

    def broken():
        raise RuntimeError("boom in the check")

    snapshot, code = load_in_child(broken)
    assert snapshot is None and code not in (None, 0)
    assert "boom in the check" in capsys.readouterr().err


@pytest.mark.mqtt
def test_running_daemon_never_loads_pydantic(start_daemon, subscriber, model_path):
    """`python -m agent run` forecasts while pydantic's native library is not even mapped into its process."""
    daemon = start_daemon()
    daemon.wait_online(subscriber)
    lookback = json.loads((model_path / "manifest.json").read_text())["lookback"]
    publish_rows(subscriber, healthy_rows(devices=1, rows=lookback, seed=3))
    subscriber.expect(f"{PREFIX}/pump-00/forecast", timeout=20)
    maps = Path(f"/proc/{daemon.pid}/maps").read_text()
    assert "_pydantic_core" not in maps and "onnxruntime" in maps
