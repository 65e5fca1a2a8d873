"""Signed release numbers, expiry and the rollback ledger (agent/ops/releases.py): the rules without a broker, and the
daemon's local reload and start paths."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from bundles import PUMP_BUNDLE
from conftest import PREFIX

from agent.core import signing
from agent.core.model import BundleError, load_bundle
from agent.ops.releases import ReleaseError, ReleaseInfo, ReleaseLedger, parse_expiry, parse_time, release_info, with_release

NOW = 1_800_000_000.0  # 2027-01-15


def fake_bundle(release: int | None, content: str = "a", expires: float | None = None, signed: bool = True, name: str = "pump-lstm"):
    """What the ledger reads of an agent.core.model.Bundle."""
    return SimpleNamespace(
        name=name, version=f"v-{release}-{content}", signed=signed, release_info=ReleaseInfo(release, expires, None),
        manifest_sha256=hashlib.sha256(f"{release}{content}".encode()).hexdigest(),
    )


@pytest.fixture
def ledger(tmp_path) -> ReleaseLedger:
    return ReleaseLedger(tmp_path / "state", clock=lambda: NOW)


def test_releases_must_increase_and_the_first_is_accepted(ledger):
    """Nothing remembered: any signed release is accepted; afterwards only higher ones, or the very bundle accepted."""
    ledger.check(fake_bundle(3))
    ledger.record(fake_bundle(3))
    ledger.check(fake_bundle(3))  # the same bundle again (restart, unchanged reload)
    for older, why in ((fake_bundle(2), "release 2, not newer than release 3"), (fake_bundle(3, "b"), "same release number")):
        with pytest.raises(ReleaseError, match=why):
            ledger.check(older)
    ledger.check(fake_bundle(4))
    ledger.record(fake_bundle(4))
    with pytest.raises(ReleaseError, match="rollback refused"):
        ledger.check(fake_bundle(3))
    ledger.record(fake_bundle(2))  # never lowers the mark
    assert ledger.remembered("pump-lstm")["release"] == 4
    ledger.check(fake_bundle(1, name="fan-lstm"))  # per bundle name


def test_bundles_signed_before_releases_count_as_release_0(ledger):
    """A signed bundle without a release number is accepted first, then only itself; after a numbered release, never."""
    ledger.check(fake_bundle(None))
    ledger.record(fake_bundle(None))
    ledger.check(fake_bundle(None))
    with pytest.raises(ReleaseError, match="no signed release number"):
        ledger.check(fake_bundle(None, "other"))
    ledger.record(fake_bundle(1))
    with pytest.raises(ReleaseError, match="re-sign it with `python -m training sign-model --release 2`"):
        ledger.check(fake_bundle(None))


def test_unsigned_bundles_are_neither_checked_nor_remembered(ledger):
    """An unsigned local bundle carries no trusted release: it passes and leaves the ledger alone."""
    ledger.record(fake_bundle(5))
    ledger.check(fake_bundle(1, signed=False))
    ledger.record(fake_bundle(1, signed=False))
    assert ledger.remembered("pump-lstm")["release"] == 5


def test_expired_releases_are_refused_unless_already_accepted(ledger):
    """A release past its expiry is refused when new; the bundle already accepted under that number keeps running."""
    with pytest.raises(ReleaseError, match="expired at 2027-01-15T07:59:59Z"):
        ledger.check(fake_bundle(1, expires=NOW - 1))
    ledger.check(fake_bundle(1, expires=NOW + 1))
    ledger.record(fake_bundle(1, expires=NOW + 1))
    later = ReleaseLedger(ledger.path.parent, clock=lambda: NOW + 10)
    later.check(fake_bundle(1, expires=NOW + 1))  # a restart after the expiry: what was accepted stays
    with pytest.raises(ReleaseError, match="expired"):
        later.check(fake_bundle(2, expires=NOW + 1))


def test_the_ledger_is_written_atomically_and_read_back(ledger):
    """record() writes releases.json (no temporary file left); a new ledger on the same directory knows the release."""
    ledger.record(fake_bundle(7))
    data = json.loads(ledger.path.read_text())
    assert data["schema_version"] == 1 and data["bundles"]["pump-lstm"]["release"] == 7
    assert sorted(p.name for p in ledger.path.parent.iterdir()) == ["releases.json"]
    with pytest.raises(ReleaseError, match="not newer than release 7"):
        ReleaseLedger(ledger.path.parent).check(fake_bundle(6))


def test_an_unreadable_ledger_fails_closed(ledger):
    """A corrupt releases.json refuses signed bundles (naming the file and how to reset) instead of forgetting releases."""
    ledger.path.parent.mkdir(parents=True)
    ledger.path.write_text('{"schema_version": 1, "bundles": {"pump-lstm": {"release": "7"}}}')
    with pytest.raises(ReleaseError, match="releases.json is unreadable.*delete it"):
        ledger.check(fake_bundle(8))
    ledger.check(fake_bundle(8, signed=False))  # unsigned bundles never consult it


def test_release_fields_are_validated():
    """release: integer >= 1; expires: ISO-8601 with a timezone; rollback_to: below release; both need a release."""
    assert release_info({"release": 3, "expires": "2027-01-31T00:00:00Z", "rollback_to": 1}) == ReleaseInfo(3, parse_time("2027-01-31T00:00:00+00:00"), 1)
    assert release_info({}) == ReleaseInfo(None, None, None)
    for manifest, message in (
        ({"release": 0}, "release must be an integer"),
        ({"release": True}, "release must be an integer"),
        ({"release": "2"}, "release must be an integer"),
        ({"release": 2, "expires": "2027-01-31T00:00:00"}, "no timezone"),
        ({"release": 2, "expires": "soon"}, "not an ISO-8601"),
        ({"release": 2, "rollback_to": 2}, "lower than manifest.release"),
        ({"expires": "2027-01-31T00:00:00Z"}, "need manifest.release"),
    ):
        with pytest.raises(ReleaseError, match=message):
            release_info(manifest)


def test_expiry_arguments_take_durations_and_iso_times():
    """--expires: 30d / 12h / 2w from now, an ISO date (midnight UTC) or time; the past is refused."""
    assert parse_expiry("30d", now=NOW) == "2027-02-14T08:00:00Z"
    assert parse_expiry("12h", now=NOW) == "2027-01-15T20:00:00Z"
    assert parse_expiry("2w", now=NOW) == "2027-01-29T08:00:00Z"
    assert parse_expiry("2027-03-01", now=NOW) == "2027-03-01T00:00:00Z"
    assert parse_expiry("2027-03-01T12:00:00+02:00", now=NOW) == "2027-03-01T10:00:00Z"
    for bad, message in (("2020-01-01", "past"), ("tomorrow", "duration")):
        with pytest.raises(ReleaseError, match=message):
            parse_expiry(bad, now=NOW)


def test_with_release_places_and_replaces_the_fields():
    """Signing writes release (after version), expires and rollback_to anew; earlier values are replaced, not kept."""
    manifest = {"schema_version": 1, "name": "m", "version": "1", "release": 1, "expires": "2027-01-01T00:00:00Z", "lookback": 3}
    out = with_release(manifest, 2)
    assert list(out) == ["schema_version", "name", "version", "release", "lookback"] and out["release"] == 2
    out = with_release(manifest, 4, expires="2027-06-01T00:00:00+00:00", rollback_to=1)
    assert (out["release"], out["expires"], out["rollback_to"]) == (4, "2027-06-01T00:00:00Z", 1)
    with pytest.raises(ReleaseError, match="rollback_to"):
        with_release(manifest, 2, rollback_to=3)


def test_the_loader_refuses_malformed_release_fields(tmp_path):
    """A bundle whose manifest has a malformed release field is refused at load, by name."""
    folder = tmp_path / "bundle"
    shutil.copytree(PUMP_BUNDLE, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "release": -1}))
    with pytest.raises(BundleError, match="manifest.release"):
        load_bundle(folder)


# -- the daemon: local reloads and start --------------------------------------------------------------------------


def signed_copy(folder: Path, secret: bytes, release: int, version: str) -> Path:
    from training.sign import sign_bundle

    shutil.copytree(PUMP_BUNDLE, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "version": version}, indent=2))
    sign_bundle(folder, secret, release)
    return folder


@pytest.mark.mqtt
def test_an_older_release_copied_into_the_model_folder_is_refused_on_reload_and_at_start(start_agent, subscriber, tmp_path):
    """Reload (SIGHUP) of an older signed release in model.path is refused and reported; so is starting with it."""
    secret = signing.generate_secret()
    public = signing.public_key(secret).hex()
    model = signed_copy(tmp_path / "model", secret, 2, "1.2.0-r2")
    older = signed_copy(tmp_path / "older", secret, 1, "1.1.0-r1")
    settings = dict(agent_id="gw-local", state={"directory": str(tmp_path / "state")},
                    model={"path": str(model), "public_key": public, "require_signature": True, "reload_poll_s": 0})
    agent = start_agent(**settings)
    assert agent.bundle.release == 2
    for name in ("manifest.json", signing.SIGNATURE_FILE):
        shutil.copy(older / name, model / name)
    agent.request_reload()
    status = subscriber.expect(f"{PREFIX}/agent/gw-local/status", lambda m: m.json().get("model_reload", {}).get("state") == "failed", timeout=30).json()
    assert "rollback refused" in status["model_reload"]["detail"] and status["model_reload"]["trigger"] == "SIGHUP"
    assert agent.bundle.release == 2 and agent.bundle.version == "1.2.0-r2"
    agent.stop()

    from agent.app import Agent

    with pytest.raises(BundleError, match="not newer than release 2"):
        Agent(agent.settings).start()  # a restart with release 1 in model.path: refused before anything opens
