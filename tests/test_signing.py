"""Model integrity: ed25519 by the `cryptography` package (RFC 8032 vectors, the pre-change file formats) and signed
bundles at load, with one or several trusted keys."""

from __future__ import annotations

import json
import shutil
import sys

import legacy_ed25519
import pytest
from bundles import PUMP_BUNDLE

from agent.core import signing
from agent.core.model import BundleError, load_bundle

L = 2**252 + 27742317777372353535851937790883648493  # order of the ed25519 base point

# RFC 8032 section 7.1, tests 1-3 and SHA(abc): (secret, public, message, signature)
RFC8032 = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
    ("833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
     "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
     "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
     "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704"),
]


@pytest.mark.parametrize("secret, public, message, signature", RFC8032)
def test_rfc8032_vectors(secret, public, message, signature):
    """Keys and signatures match RFC 8032 7.1 exactly; verification accepts them and rejects any changed bit."""
    sk, pk, msg, sig = (bytes.fromhex(x) for x in (secret, public, message, signature))
    assert signing.public_key(sk) == pk
    assert signing.sign(sk, msg) == sig
    assert signing.verify(pk, msg, sig)
    assert not signing.verify(pk, msg + b"x", sig)
    assert not signing.verify(pk, msg, sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not signing.verify(pk, msg, sig[:63])


def test_signatures_are_made_and_checked_by_cryptography(monkeypatch):
    """agent/core/signing.py delegates to cryptography's Ed25519 (no hand-written curve arithmetic): its verifier is called."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    calls = []
    original = ed25519.Ed25519PublicKey.from_public_bytes

    def spy(data):
        calls.append(bytes(data))
        return original(data)

    monkeypatch.setattr(ed25519.Ed25519PublicKey, "from_public_bytes", staticmethod(spy))
    sk, pk, msg, sig = (bytes.fromhex(x) for x in RFC8032[2])
    assert signing.verify(pk, msg, sig)
    assert calls == [pk]
    for name in ("_P", "_L", "_D", "_add", "_mul", "_recover_x"):
        assert not hasattr(signing, name), f"agent.core.signing still carries the hand-written {name}"


def test_without_cryptography_signing_says_what_is_missing(monkeypatch):
    """With `cryptography` unimportable, checking a signature raises SignatureError naming the package (never a silent pass)."""
    from cryptography.hazmat.primitives import asymmetric

    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.asymmetric.ed25519", None)
    monkeypatch.delattr(asymmetric, "ed25519", raising=False)
    sk, pk, msg, sig = (bytes.fromhex(x) for x in RFC8032[0])
    with pytest.raises(signing.SignatureError, match="cryptography"):
        signing.verify(pk, msg, sig)


def test_the_edge_install_depends_on_cryptography():
    """pyproject's edge dependencies (not only an extra) list cryptography>=42: gateways verify bundles with it."""
    import tomllib

    from bundles import REPO_ROOT

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert "cryptography>=42" in project["dependencies"]


def test_keys_and_signatures_made_before_the_change_still_verify(tmp_path):
    """A key pair and a bundle signed by the earlier pure-Python code (file formats unchanged) load with the new code,
    and the new code signs the same manifest to the same bytes."""
    from agent.config.settings import load_settings

    secret = bytes(range(100, 132))
    key_file = tmp_path / "model-signing"  # what `keygen` wrote: hex seed; KEY.pub: hex public key
    key_file.write_text(secret.hex() + "\n")
    (tmp_path / "model-signing.pub").write_text(legacy_ed25519.public_key(secret).hex() + "\n")
    folder = tmp_path / "bundle"
    shutil.copytree(PUMP_BUNDLE, folder)
    manifest = (folder / "manifest.json").read_bytes()
    (folder / signing.SIGNATURE_FILE).write_text(legacy_ed25519.sign(secret, manifest).hex() + "\n")

    settings = load_settings(None, model={"path": str(folder), "public_key_file": str(tmp_path / "model-signing.pub"), "require_signature": True})
    from agent.core.model import load_configured_bundle

    bundle = load_configured_bundle(settings.model)
    assert bundle.signed and bundle.release is None  # signed before release numbers: release 0 to the ledger
    parsed = signing.parse_hex(key_file.read_text(), 32, "secret key")
    assert signing.public_key(parsed) == legacy_ed25519.public_key(secret)
    assert signing.sign(parsed, manifest) == legacy_ed25519.sign(secret, manifest)
    assert legacy_ed25519.verify(signing.public_key(parsed), manifest, signing.sign(parsed, manifest))


def test_non_canonical_s_is_rejected():
    """s >= L (a malleated signature) is refused, as RFC 8032 requires."""
    sk, pk, msg, sig = (bytes.fromhex(x) for x in RFC8032[0])
    s = int.from_bytes(sig[32:], "little") + L
    assert not signing.verify(pk, msg, sig[:32] + s.to_bytes(32, "little"))
    assert not signing.verify(pk, msg, b"\xff" * 64)
    assert not signing.verify(b"\xff" * 32, msg, sig)  # not a point: False, not an exception


@pytest.fixture
def signed_bundle(tmp_path):
    secret = bytes(range(32))
    folder = tmp_path / "bundle"
    shutil.copytree(PUMP_BUNDLE, folder)
    sig = signing.sign(secret, (folder / "manifest.json").read_bytes())
    (folder / signing.SIGNATURE_FILE).write_text(sig.hex() + "\n")
    return folder, signing.public_key(secret)


def test_signed_bundle_loads_and_tampering_is_refused(signed_bundle):
    """A valid signature loads (bundle.signed); one changed manifest byte or another key is refused, by name."""
    folder, public = signed_bundle
    assert load_bundle(folder, public_key=public, require_signature=True).signed
    other = signing.public_key(bytes(32))
    with pytest.raises(BundleError, match="does not match manifest.json"):
        load_bundle(folder, public_key=other)
    manifest = folder / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"version"', b'"version" ', 1))
    with pytest.raises(BundleError, match="signature in manifest.json.sig does not match"):
        load_bundle(folder, public_key=public)


def test_unsigned_bundle_refused_only_when_required(signed_bundle):
    """Without manifest.json.sig: refused when require_signature, loaded (unsigned) otherwise."""
    folder, public = signed_bundle
    (folder / signing.SIGNATURE_FILE).unlink()
    with pytest.raises(BundleError, match="not signed"):
        load_bundle(folder, public_key=public, require_signature=True)
    assert not load_bundle(folder, public_key=public).signed
    (folder / signing.SIGNATURE_FILE).write_text("zz-not-hex")
    with pytest.raises(BundleError, match="bad signature file"):
        load_bundle(folder, public_key=public)


def test_keygen_and_sign_model_commands_produce_a_bundle_the_agent_accepts(tmp_path):
    """`keygen` + `sign-model --release 1`: the agent loads the bundle with the printed key; a manifest without an
    earlier release needs --release, a signed one defaults to the previous release + 1."""
    import subprocess

    from bundles import REPO_ROOT

    folder = tmp_path / "bundle"
    shutil.copytree(PUMP_BUNDLE, folder)
    key = tmp_path / "keys" / "signing.key"
    run = lambda *args: subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # noqa: E731
    assert run("keygen", str(key)).returncode == 0
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    unnumbered = run("sign-model", str(folder), "--key", str(key))
    assert unnumbered.returncode == 1 and "--release" in unnumbered.stderr
    assert not (folder / signing.SIGNATURE_FILE).exists()
    signed = run("sign-model", str(folder), "--key", str(key), "--release", "1", "--expires", "30d")
    assert signed.returncode == 0, signed.stderr
    public = bytes.fromhex(key.with_name("signing.key.pub").read_text().strip())
    bundle = load_bundle(folder, public_key=public, require_signature=True)
    assert bundle.signed and bundle.release == 1 and bundle.release_info.expires is not None
    again = run("sign-model", str(folder), "--key", str(key))
    assert again.returncode == 0 and "release 2" in again.stdout, again.stderr
    bundle = load_bundle(folder, public_key=public, require_signature=True)
    assert bundle.release == 2 and bundle.release_info.expires is None  # each signing states its expiry anew
    manifest = json.loads((folder / "manifest.json").read_text())
    assert list(manifest)[:4] == ["schema_version", "name", "version", "release"]
    past = run("sign-model", str(folder), "--key", str(key), "--expires", "2001-01-01")
    assert past.returncode == 1 and "past" in past.stderr


def test_any_of_several_trusted_keys_may_sign(signed_bundle):
    """With a list of trusted keys a bundle signed by any one loads (and says which); a key outside the list is refused."""
    folder, public = signed_bundle
    other = signing.public_key(bytes(32))
    bundle = load_bundle(folder, public_key=[other, public], require_signature=True)
    assert bundle.signed and bundle.signed_by == public
    stranger = signing.public_key(bytes([7]) * 32)
    with pytest.raises(BundleError, match=f"public keys {other.hex()[:16]}\\.\\.\\., {stranger.hex()[:16]}"):
        load_bundle(folder, public_key=[other, stranger])


def test_trusted_keys_come_from_a_list_a_multi_key_file_or_a_directory(tmp_path, monkeypatch):
    """model.public_key takes one key or a list; public_key_file a file (one key per line), a directory of *.pub, or a
    list; the environment takes a JSON list; a single key keeps working."""
    from agent.config.settings import load_settings

    keys = [signing.public_key(bytes([i]) * 32) for i in (1, 2, 3)]
    hexes = [k.hex() for k in keys]
    assert load_settings(None, model={"public_key": hexes[0]}).model.resolved_public_keys() == keys[:1]
    assert load_settings(None, model={"public_key": hexes[:2]}).model.resolved_public_key() == keys[0]
    assert load_settings(None, model={"public_key": hexes}).model.resolved_public_keys() == keys
    both = tmp_path / "trusted.pub"
    both.write_text(f"# current\n{hexes[0]}\n\n{hexes[1]}  # next (rotation)\n")
    assert load_settings(None, model={"public_key_file": str(both)}).model.resolved_public_keys() == keys[:2]
    folder = tmp_path / "keys.d"
    folder.mkdir()
    for i, text in enumerate(hexes):
        (folder / f"k{i}.pub").write_text(text + "\n")
    (folder / "README").write_text("not a key")
    assert load_settings(None, model={"public_key_file": str(folder)}).model.resolved_public_keys() == keys
    single = tmp_path / "one.pub"
    single.write_text(hexes[2] + "\n")
    listed = load_settings(None, model={"public_key_file": [str(both), str(single)]}).model
    assert listed.resolved_public_keys() == keys
    bad = tmp_path / "bad.pub"
    bad.write_text(hexes[0] + "\nnot-a-key\n")
    with pytest.raises(ValueError, match="line 2"):
        load_settings(None, model={"public_key_file": str(bad)}).model.resolved_public_keys()
    monkeypatch.setenv("EDGECAST_MODEL__PUBLIC_KEY", json.dumps(hexes[1:]))
    assert load_settings(None).model.resolved_public_keys() == keys[1:]


@pytest.mark.mqtt
def test_daemon_refuses_an_unsigned_bundle_when_signatures_are_required(start_daemon, tmp_path):
    """`run` with model.require_signature and an unsigned bundle exits 1 and says the bundle is not signed."""
    folder = tmp_path / "unsigned"
    shutil.copytree(PUMP_BUNDLE, folder)
    daemon = start_daemon(env={"EDGECAST_MODEL__PATH": str(folder), "EDGECAST_MODEL__REQUIRE_SIGNATURE": "true",
                               "EDGECAST_MODEL__PUBLIC_KEY": signing.public_key(bytes(32)).hex()})
    assert daemon.wait(30) == 1
    assert "not signed" in daemon.log() and "Traceback" not in daemon.log(), daemon.log()
