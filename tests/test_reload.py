"""Hot reload: a new bundle is verified and warmed up beside the running one, then swapped; a bad one changes nothing."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import pytest
from conftest import AGENT_ID, PREFIX, healthy_rows, publish_rows, wait_until

pytestmark = pytest.mark.mqtt

STATUS = f"{PREFIX}/agent/{AGENT_ID}/status"
ERRORS = f"{PREFIX}/agent/{AGENT_ID}/errors"


@pytest.fixture
def bundle_copy(model_path, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(model_path, folder)
    return folder


def edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    tmp = folder / "manifest.json.new"
    tmp.write_text(json.dumps(manifest))
    tmp.replace(folder / "manifest.json")  # atomic, as a deployment should do it


def set_version(version: str):
    return lambda m: m.__setitem__("version", version)


def test_sighup_swaps_in_a_new_version_and_status_and_forecasts_show_it(start_agent, subscriber, bundle_copy):
    """request_reload (SIGHUP): the new version is loaded, swapped in, announced on status, used for forecasts."""
    agent = start_agent(model={"path": str(bundle_copy), "reload_poll_s": 0})
    edit_manifest(bundle_copy, set_version("1.0.1-hot"))
    agent.request_reload()
    status = subscriber.expect(STATUS, lambda m: m.json()["model"]["version"] == "1.0.1-hot", timeout=20).json()
    assert status["state"] == "online" and status["model_reload"]["state"] == "ok"
    assert agent.stats()["model_swaps"] == 1
    publish_rows(subscriber, healthy_rows(devices=1, rows=60, seed=2))
    forecast = subscriber.expect(f"{PREFIX}/pump-00/forecast", timeout=20).json()
    assert forecast["model"]["version"] == "1.0.1-hot"


def test_a_change_in_the_model_folder_is_picked_up_by_polling(start_agent, subscriber, bundle_copy):
    """With model.reload_poll_s, a changed manifest is noticed (once stable) and swapped in without a signal."""
    agent = start_agent(model={"path": str(bundle_copy), "reload_poll_s": 0.2})
    edit_manifest(bundle_copy, set_version("2.0.0-polled"))
    subscriber.expect(STATUS, lambda m: m.json()["model"]["version"] == "2.0.0-polled", timeout=20)
    assert agent.bundle.version == "2.0.0-polled"


def corrupt_onnx(folder: Path) -> None:
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))


def rename_feature(manifest: dict) -> None:
    old, new = "bearing_temp", "bearing_temperature"
    manifest["features"] = [new if f == old else f for f in manifest["features"]]
    manifest["targets"] = [new if f == old else f for f in manifest["targets"]]
    manifest["scaler"]["params"][new] = manifest["scaler"]["params"].pop(old)
    manifest["version"] = "9.9.9-renamed"


def overflow_scale(manifest: dict) -> None:
    manifest["scaler"]["params"]["bearing_temp"]["std"] = 1e300  # finite in JSON, infinite in float32 outputs
    manifest["version"] = "9.9.9-overflow"


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the non_finite case, on purpose
@pytest.mark.parametrize("breakage, expected", [
    ("checksum", "sha256"),
    ("features", "features"),
    ("non_finite", "NaN or infinity"),
    ("missing", "not found"),
])
def test_a_bad_new_bundle_keeps_the_old_model_running_and_is_reported(start_agent, subscriber, bundle_copy, breakage, expected):
    """Checksum mismatch, other features, non-finite warm-up or a missing file: old model stays, fault reported."""
    agent = start_agent(model={"path": str(bundle_copy), "reload_poll_s": 0})
    running = agent.bundle
    if breakage == "checksum":
        corrupt_onnx(bundle_copy)
    elif breakage == "features":
        edit_manifest(bundle_copy, rename_feature)
    elif breakage == "non_finite":
        edit_manifest(bundle_copy, overflow_scale)
    else:
        (bundle_copy / "model.onnx").unlink()
    agent.request_reload()
    fault = subscriber.expect(ERRORS, lambda m: m.json()["reason"] == "model_reload_failed", timeout=20).json()
    assert expected in fault["detail"] and "still running" in fault["detail"]
    status = subscriber.expect(STATUS, lambda m: "model_reload" in m.json(), timeout=10).json()
    assert status["model_reload"]["state"] == "failed" and status["model"]["version"] == running.version
    assert agent.bundle is running and agent.stats()["model_reload_failures"] == 1
    publish_rows(subscriber, healthy_rows(devices=1, rows=60, seed=3))
    assert subscriber.expect(f"{PREFIX}/pump-00/forecast", timeout=20).json()["model"]["version"] == running.version


def test_sighup_reloads_the_daemon(start_daemon, make_probe, bundle_copy):
    """The daemon process reloads on SIGHUP and announces the new version on its retained status."""
    probe = make_probe(subscribe=STATUS)
    daemon = start_daemon(env={"EDGECAST_MODEL__PATH": str(bundle_copy), "EDGECAST_MODEL__RELOAD_POLL_S": "0"})
    daemon.wait_online(probe)
    edit_manifest(bundle_copy, set_version("3.0.0-sighup"))
    daemon.signal(signal.SIGHUP)
    probe.expect(STATUS, lambda m: m.json()["model"]["version"] == "3.0.0-sighup", timeout=20)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    assert "model swapped" in daemon.log()
