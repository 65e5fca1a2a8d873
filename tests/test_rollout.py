"""Fleet model rollout over MQTT: `publish-model` -> broker -> every opted-in daemon verifies and swaps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import PREFIX, healthy_rows, publish_rows, wait_until

from agent import rollout, signing
from training.publish_model import PublishError, publish_bundle

pytestmark = pytest.mark.mqtt

TOPIC = "edgecast/models/pump-lstm/stage-all"
AGENTS = ("gw-a", "gw-b")


@pytest.fixture
def keys(tmp_path) -> tuple[Path, str]:
    """(secret key file, public key hex), as `python -m training keygen` writes them."""
    secret = signing.generate_secret()
    key_file = tmp_path / "model-signing"
    key_file.write_text(secret.hex() + "\n")
    return key_file, signing.public_key(secret).hex()


def bundle_version(model_path: Path, folder: Path, version: str, change=None) -> Path:
    shutil.copytree(model_path, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["version"] = version
    if change is not None:
        change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return folder


def status_of(probe, agent_id: str, predicate, timeout: float = 30.0) -> dict:
    return probe.expect(f"{PREFIX}/agent/{agent_id}/status", lambda m: predicate(m.json()), timeout=timeout).json()


@pytest.fixture
def fleet(start_agent, keys, tmp_path):
    """Two running daemons (own agent ids and state directories) that opt in to rollouts on TOPIC."""
    _, public = keys
    return [
        start_agent(
            agent_id=agent_id,
            state={"directory": str(tmp_path / f"state-{agent_id}")},
            model={"public_key": public, "reload_poll_s": 0},
            rollout={"enabled": True, "topic": TOPIC, "transfer_timeout_s": 20},
        )
        for agent_id in AGENTS
    ]


def test_a_signed_bundle_reaches_both_daemons_and_a_tampered_one_is_refused_by_both(fleet, subscriber, mosquitto, model_path, keys, tmp_path):
    """Both daemons swap in a published signed bundle and report it; a bundle changed after signing is refused by both."""
    key_file, _ = keys
    good = bundle_version(model_path, tmp_path / "good", "1.1.0-fleet")
    descriptor = publish_bundle(good, TOPIC, mosquitto.host, mosquitto.port, key_file=key_file, chunk_bytes=64 * 1024)
    assert descriptor["chunks"] > 1  # the shipped model (~240 kB) travels in several chunks
    for agent_id in AGENTS:
        status = status_of(subscriber, agent_id, lambda s: s["model"]["version"] == "1.1.0-fleet")
        assert status["state"] == "online" and status["model_reload"]["state"] == "ok"
    for agent, agent_id in zip(fleet, AGENTS):
        assert agent.bundle.version == "1.1.0-fleet" and agent.bundle.signed
        active = (tmp_path / f"state-{agent_id}" / "models" / "active").read_text().strip()
        assert (tmp_path / f"state-{agent_id}" / "models" / active / "model.onnx").is_file()

    # Tampered after signing: the manifest's thresholds changed, the old signature kept.
    evil = bundle_version(model_path, tmp_path / "evil", "6.6.6-evil")
    import argparse

    from training.sign import run_sign

    assert run_sign(argparse.Namespace(bundle=evil, key=key_file)) == 0
    manifest = json.loads((evil / "manifest.json").read_text())
    manifest["calibration"]["thresholds"]["warning"] *= 100
    (evil / "manifest.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(PublishError):
        publish_bundle(evil, TOPIC, mosquitto.host, mosquitto.port)  # the publisher refuses it itself...
    publish_bundle(evil, TOPIC, mosquitto.host, mosquitto.port, verify=False)  # ...so force it out, as an attacker would
    for agent_id in AGENTS:
        status = status_of(subscriber, agent_id, lambda s: s.get("model_reload", {}).get("state") == "failed")
        assert status["model"]["version"] == "1.1.0-fleet"
        assert status["model_reload"]["trigger"].startswith("rollout pump-lstm 6.6.6-evil")
        assert "signature" in status["model_reload"]["detail"]
        fault = subscriber.expect(f"{PREFIX}/agent/{agent_id}/errors", lambda m: m.json()["reason"] == "model_reload_failed").json()
        assert "signature" in fault["detail"]
    for agent in fleet:
        assert agent.bundle.version == "1.1.0-fleet" and agent.stats()["model_reload_failures"] == 1
    # The old (rolled-out) model keeps serving forecasts.
    publish_rows(subscriber, healthy_rows(devices=1, rows=60, seed=3))
    forecast = subscriber.expect(f"{PREFIX}/pump-00/forecast", timeout=30).json()
    assert forecast["model"]["version"] == "1.1.0-fleet"


def test_a_bundle_signed_by_another_key_or_corrupted_in_transit_is_refused(fleet, subscriber, mosquitto, model_path, tmp_path):
    """A bundle signed by a key the daemons do not trust, or whose archive does not match its descriptor, changes nothing."""
    stranger = tmp_path / "stranger-key"
    stranger.write_text(signing.generate_secret().hex())
    foreign = bundle_version(model_path, tmp_path / "foreign", "7.0.0-foreign")
    publish_bundle(foreign, TOPIC, mosquitto.host, mosquitto.port, key_file=stranger)
    for agent_id in AGENTS:
        status = status_of(subscriber, agent_id, lambda s: s.get("model_reload", {}).get("state") == "failed")
        assert "signature" in status["model_reload"]["detail"] and status["model"]["version"] == "1.0.0"

    # A chunk replaced on the broker after publishing: the archive's sha256 no longer matches the descriptor.
    corrupt = bundle_version(model_path, tmp_path / "corrupt", "7.0.1-corrupt")
    archive = rollout.pack_bundle(corrupt, b"00" * 64)
    manifest = json.loads((corrupt / "manifest.json").read_text())
    descriptor = rollout.make_descriptor(archive, manifest, len(archive), signed=True)
    bad = bytearray(archive)
    bad[len(bad) // 2] ^= 0xFF
    subscriber.publish(rollout.chunk_topic(TOPIC, descriptor["transfer_id"], 0), bytes(bad), retain=True)
    subscriber.publish(TOPIC, descriptor, retain=True)
    for agent_id in AGENTS:
        status = status_of(subscriber, agent_id, lambda s: "archive sha256" in s.get("model_reload", {}).get("detail", ""))
        assert status["model"]["version"] == "1.0.0"
    for agent in fleet:
        assert agent.bundle.version == "1.0.0" and agent.stats()["model_swaps"] == 0


def test_a_rolled_out_bundle_is_kept_across_a_restart(start_agent, subscriber, mosquitto, model_path, keys, tmp_path):
    """After a restart the daemon starts with the last rolled-out bundle (state.directory/models), even before it connects."""
    key_file, public = keys
    settings = dict(
        agent_id="gw-restart",
        state={"directory": str(tmp_path / "state")},
        model={"public_key": public, "reload_poll_s": 0},
        rollout={"enabled": True, "topic": TOPIC},
    )
    agent = start_agent(**settings)
    publish_bundle(bundle_version(model_path, tmp_path / "v2", "2.0.0-kept"), TOPIC, mosquitto.host, mosquitto.port, key_file=key_file)
    wait_until(lambda: agent.bundle.version == "2.0.0-kept", timeout=30, message="the rollout")
    agent.stop()
    from training.publish_model import clear_topic

    clear_topic(TOPIC, mosquitto.host, mosquitto.port)  # nothing retained: the bundle must come from the state directory
    again = start_agent(**settings)
    assert again.bundle.version == "2.0.0-kept"
    assert status_of(subscriber, "gw-restart", lambda s: s["state"] == "online" and s["model"]["version"] == "2.0.0-kept")


def test_malformed_descriptors_are_reported_once_and_change_nothing():
    """check_descriptor names the problem: wrong schema, ids, sizes over the limit."""
    good = rollout.make_descriptor(b"x" * 100, {"name": "m", "version": "1", "onnx": {"sha256": "0" * 64}}, 64, signed=True)
    assert rollout.check_descriptor(json.dumps(good).encode(), 1000)["chunks"] == 2
    for change, message in (
        ({"schema_version": 2}, "schema_version"),
        ({"transfer_id": "../../etc"}, "transfer_id"),
        ({"archive_bytes": 10**9}, "max_bundle_bytes"),
        ({"chunks": 0}, "chunks"),
    ):
        with pytest.raises(rollout.RolloutError, match=message):
            rollout.check_descriptor(json.dumps({**good, **change}).encode(), 1000)
    with pytest.raises(rollout.RolloutError, match="not JSON"):
        rollout.check_descriptor(b"\xff", 1000)


def test_archives_with_paths_or_links_are_refused(tmp_path):
    """unpack_bundle accepts only the known bundle files as plain files: nothing can escape the target folder."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(rollout.RolloutError, match="unexpected entry"):
        rollout.unpack_bundle(buffer.getvalue(), tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
