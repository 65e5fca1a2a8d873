"""Fleet model rollout over MQTT: `publish-model` -> broker -> every opted-in daemon verifies and swaps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import PREFIX, healthy_rows, publish_rows, wait_until

from agent.core import signing
from agent.ops import rollout
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
    descriptor = publish_bundle(good, TOPIC, mosquitto.host, mosquitto.port, key_file=key_file, chunk_bytes=64 * 1024, release=1)
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

    assert run_sign(argparse.Namespace(bundle=evil, key=key_file, release=2)) == 0
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
    publish_bundle(foreign, TOPIC, mosquitto.host, mosquitto.port, key_file=stranger, release=1)
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
    publish_bundle(bundle_version(model_path, tmp_path / "v2", "2.0.0-kept"), TOPIC, mosquitto.host, mosquitto.port, key_file=key_file, release=1)
    wait_until(lambda: agent.bundle.version == "2.0.0-kept", timeout=30, message="the rollout")
    agent.stop()
    from training.publish_model import clear_topic

    clear_topic(TOPIC, mosquitto.host, mosquitto.port)  # nothing retained: the bundle must come from the state directory
    again = start_agent(**settings)
    assert again.bundle.version == "2.0.0-kept"
    assert status_of(subscriber, "gw-restart", lambda s: s["state"] == "online" and s["model"]["version"] == "2.0.0-kept")


def signed_release(model_path: Path, folder: Path, version: str, key_file: Path, release: int, **fields) -> Path:
    """A copy of the shipped bundle as `version`, signed (sign-model's code) as `release` with optional expires / rollback_to."""
    from training.sign import read_secret, sign_bundle

    sign_bundle(bundle_version(model_path, folder, version), read_secret(key_file), release, **fields)
    return folder


def refused(probe, agent_id: str, words: str) -> dict:
    """The status that reports a refused bundle whose detail contains `words`, and the matching fault on the errors topic."""
    status = status_of(probe, agent_id, lambda s: s.get("model_reload", {}).get("state") == "failed" and words in s["model_reload"]["detail"])
    fault = probe.expect(f"{PREFIX}/agent/{agent_id}/errors", lambda m: m.json()["reason"] == "model_reload_failed" and words in m.json()["detail"])
    assert "still running" in fault.json()["detail"]
    return status


def test_an_older_signed_release_replayed_on_the_retained_topic_is_refused(fleet, subscriber, mosquitto, model_path, keys, tmp_path):
    """After release 2, a validly signed release 1 published on the retained topic is refused by every daemon and reported;
    release 2 runs on. Rolling back on purpose (the old content signed again as release 3) is accepted."""
    key_file, _ = keys
    old = signed_release(model_path, tmp_path / "r1", "1.1.0-r1", key_file, 1)  # signed earlier, still valid
    new = signed_release(model_path, tmp_path / "r2", "1.2.0-r2", key_file, 2)
    publish_bundle(new, TOPIC, mosquitto.host, mosquitto.port)
    for agent_id in AGENTS:
        status_of(subscriber, agent_id, lambda s: s["model"]["version"] == "1.2.0-r2" and s["model_reload"].get("release") == 2)
    with pytest.raises(PublishError, match="not newer than release 2"):
        publish_bundle(old, TOPIC, mosquitto.host, mosquitto.port)  # the publisher tells an operator...
    publish_bundle(old, TOPIC, mosquitto.host, mosquitto.port, verify=False)  # ...someone with publish rights replays it anyway
    for agent_id in AGENTS:
        status = refused(subscriber, agent_id, "rollback refused")
        assert status["model"]["version"] == "1.2.0-r2"
        assert status["model_reload"]["trigger"].startswith("rollout pump-lstm 1.1.0-r1")
        assert "release 1, not newer than release 2" in status["model_reload"]["detail"]
    for agent in fleet:
        assert agent.bundle.version == "1.2.0-r2" and agent.bundle.release == 2 and agent.stats()["model_reload_failures"] == 1
    publish_rows(subscriber, healthy_rows(devices=1, rows=60, seed=3))
    assert subscriber.expect(f"{PREFIX}/pump-00/forecast", timeout=30).json()["model"]["version"] == "1.2.0-r2"

    # The sanctioned rollback: release 1's content, signed again as release 3.
    publish_bundle(old, TOPIC, mosquitto.host, mosquitto.port, key_file=key_file, release=3, rollback_to=1)
    for agent_id in AGENTS:
        status_of(subscriber, agent_id, lambda s: s["model"]["version"] == "1.1.0-r1" and s["model_reload"].get("release") == 3)
    for agent in fleet:
        assert agent.bundle.release == 3 and agent.bundle.release_info.rollback_to == 1


def test_a_release_signed_by_a_second_trusted_key_is_accepted(start_agent, subscriber, mosquitto, model_path, keys, tmp_path):
    """With model.public_key a list (key rotation), releases signed by either trusted key are accepted; a third key is not."""
    key_file, public = keys
    second = tmp_path / "second-key"
    second_secret = signing.generate_secret()
    second.write_text(second_secret.hex() + "\n")
    agent = start_agent(
        agent_id="gw-rotate", state={"directory": str(tmp_path / "state")},
        model={"public_key": [public, signing.public_key(second_secret).hex()], "reload_poll_s": 0},
        rollout={"enabled": True, "topic": TOPIC},
    )
    publish_bundle(bundle_version(model_path, tmp_path / "k1", "1.1.0-k1"), TOPIC, mosquitto.host, mosquitto.port, key_file=key_file, release=1)
    wait_until(lambda: agent.bundle.version == "1.1.0-k1", timeout=30, message="release 1 (first key)")
    assert agent.bundle.signed_by == bytes.fromhex(public)
    publish_bundle(bundle_version(model_path, tmp_path / "k2", "1.2.0-k2"), TOPIC, mosquitto.host, mosquitto.port, key_file=second)
    wait_until(lambda: agent.bundle.version == "1.2.0-k2", timeout=30, message="release 2 (second key)")
    assert agent.bundle.release == 2 and agent.bundle.signed_by == signing.public_key(second_secret)
    assert status_of(subscriber, "gw-rotate", lambda s: s["model"]["version"] == "1.2.0-k2")["model_reload"]["state"] == "ok"

    third = tmp_path / "third-key"
    third.write_text(signing.generate_secret().hex())
    publish_bundle(bundle_version(model_path, tmp_path / "k3", "1.3.0-k3"), TOPIC, mosquitto.host, mosquitto.port, key_file=third)
    assert "signature" in refused(subscriber, "gw-rotate", "public keys")["model_reload"]["detail"]
    assert agent.bundle.version == "1.2.0-k2"


def test_an_expired_release_is_refused(start_agent, subscriber, mosquitto, model_path, keys, tmp_path):
    """A release whose signed expiry has passed is refused and reported; one that expires later is accepted."""
    key_file, public = keys
    agent = start_agent(
        agent_id="gw-expiry", state={"directory": str(tmp_path / "state")},
        model={"public_key": public, "reload_poll_s": 0}, rollout={"enabled": True, "topic": TOPIC},
    )
    stale = bundle_version(model_path, tmp_path / "stale", "1.1.0-stale")
    publish_bundle(stale, TOPIC, mosquitto.host, mosquitto.port, key_file=key_file, release=5, expires="2020-01-01T00:00:00Z")
    status = refused(subscriber, "gw-expiry", "expired at 2020-01-01T00:00:00Z")
    assert status["model"]["version"] == "1.0.0" and agent.bundle.version == "1.0.0"
    assert not (tmp_path / "state" / "releases.json").exists()  # nothing accepted, nothing remembered

    fresh = bundle_version(model_path, tmp_path / "fresh", "1.2.0-fresh")
    publish_bundle(fresh, TOPIC, mosquitto.host, mosquitto.port, key_file=key_file, release=6, expires="2999-01-01T00:00:00Z")
    wait_until(lambda: agent.bundle.version == "1.2.0-fresh", timeout=30, message="the unexpired release")


def test_the_remembered_release_survives_a_restart(start_agent, subscriber, mosquitto, model_path, keys, tmp_path):
    """state.directory/releases.json keeps the highest accepted release: after a restart (even without the rolled-out
    copy), a replayed release 1 is still refused."""
    key_file, public = keys
    state = tmp_path / "state"
    settings = dict(
        agent_id="gw-ledger", state={"directory": str(state)},
        model={"public_key": public, "reload_poll_s": 0}, rollout={"enabled": True, "topic": TOPIC},
    )
    old = signed_release(model_path, tmp_path / "r1", "1.1.0-r1", key_file, 1)
    new = signed_release(model_path, tmp_path / "r2", "1.2.0-r2", key_file, 2)
    agent = start_agent(**settings)
    publish_bundle(new, TOPIC, mosquitto.host, mosquitto.port)
    wait_until(lambda: agent.bundle.release == 2, timeout=30, message="release 2")
    agent.stop()
    ledger = json.loads((state / "releases.json").read_text())
    assert ledger["bundles"]["pump-lstm"]["release"] == 2 and ledger["bundles"]["pump-lstm"]["version"] == "1.2.0-r2"

    from training.publish_model import clear_topic

    clear_topic(TOPIC, mosquitto.host, mosquitto.port)
    shutil.rmtree(state / "models")  # the rolled-out copy is gone: only the ledger remembers release 2
    again = start_agent(**settings)
    assert again.bundle.version == "1.0.0"  # the configured (unsigned) bundle
    publish_bundle(old, TOPIC, mosquitto.host, mosquitto.port, verify=False)
    assert "not newer than release 2" in refused(subscriber, "gw-ledger", "rollback refused")["model_reload"]["detail"]
    assert again.bundle.version == "1.0.0" and again.stats()["model_swaps"] == 0


def test_the_same_model_signed_as_a_new_release_is_fetched():
    """A descriptor for the running model's version and checksum but a new release (a re-signing: new expiry, rollback)
    is downloaded; the running release itself is not."""
    subscribed = []
    receiver = rollout.RolloutReceiver(
        TOPIC, 10**6, 30, subscribe=subscribed.append, unsubscribe=lambda t: None,
        running=lambda: ("1.0.0", "a" * 64, 4), on_complete=lambda d, a: None, on_failure=lambda d: None,
    )
    manifest = {"name": "pump-lstm", "version": "1.0.0", "onnx": {"sha256": "a" * 64}, "release": 4}
    receiver.on_message(TOPIC, json.dumps(rollout.make_descriptor(b"x" * 100, manifest, 64, signed=True)).encode())
    assert subscribed == []
    descriptor = rollout.make_descriptor(b"y" * 100, {**manifest, "release": 5, "expires": "2999-01-01T00:00:00Z"}, 64, signed=True)
    assert descriptor["release"] == 5 and descriptor["expires"] == "2999-01-01T00:00:00Z"
    receiver.on_message(TOPIC, json.dumps(descriptor).encode())
    assert subscribed == [rollout.chunk_filter(TOPIC, descriptor["transfer_id"])]


def test_malformed_descriptors_are_reported_once_and_change_nothing():
    """check_descriptor names the problem: wrong schema, ids, sizes over the limit."""
    good = rollout.make_descriptor(b"x" * 100, {"name": "m", "version": "1", "onnx": {"sha256": "0" * 64}}, 64, signed=True)
    assert rollout.check_descriptor(json.dumps(good).encode(), 1000)["chunks"] == 2
    for change, message in (
        ({"schema_version": 2}, "schema_version"),
        ({"transfer_id": "../../etc"}, "transfer_id"),
        ({"archive_bytes": 10**9}, "max_bundle_bytes"),
        ({"chunks": 0}, "chunks"),
        ({"release": "7"}, "release"),
        ({"release": 0}, "release"),
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
