"""Model integrity: pure-Python ed25519 (RFC 8032 vectors, cryptography interop) and signed bundles at load."""

from __future__ import annotations

import shutil

import pytest
from bundles import PUMP_BUNDLE

from agent import signing
from agent.model import BundleError, load_bundle

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


def test_interoperates_with_cryptography():
    """Signatures made by the `cryptography` package verify here, and ours verify there."""
    ed = pytest.importorskip("cryptography.hazmat.primitives.asymmetric.ed25519")
    from cryptography.hazmat.primitives import serialization

    key = ed.Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    message = PUMP_BUNDLE.joinpath("manifest.json").read_bytes()
    assert signing.verify(public, message, key.sign(message))
    assert signing.public_key(raw) == public
    key.public_key().verify(signing.sign(raw, message), message)  # raises InvalidSignature on mismatch


def test_non_canonical_s_is_rejected():
    """s >= L (a malleated signature) is refused, as RFC 8032 requires."""
    sk, pk, msg, sig = (bytes.fromhex(x) for x in RFC8032[0])
    s = int.from_bytes(sig[32:], "little") + signing._L
    assert not signing.verify(pk, msg, sig[:32] + s.to_bytes(32, "little"))


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
    """`python -m training keygen` + `sign-model`: the agent loads the bundle with the printed public key."""
    import subprocess
    import sys

    from bundles import REPO_ROOT

    folder = tmp_path / "bundle"
    shutil.copytree(PUMP_BUNDLE, folder)
    key = tmp_path / "keys" / "signing.key"
    run = lambda *args: subprocess.run([sys.executable, "-m", "training", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # noqa: E731
    assert run("keygen", str(key)).returncode == 0
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    signed = run("sign-model", str(folder), "--key", str(key))
    assert signed.returncode == 0, signed.stderr
    public = bytes.fromhex(key.with_name("signing.key.pub").read_text().strip())
    assert load_bundle(folder, public_key=public, require_signature=True).signed


@pytest.mark.mqtt
def test_daemon_refuses_an_unsigned_bundle_when_signatures_are_required(start_daemon, tmp_path):
    """`run` with model.require_signature and an unsigned bundle exits 1 and says the bundle is not signed."""
    folder = tmp_path / "unsigned"
    shutil.copytree(PUMP_BUNDLE, folder)
    daemon = start_daemon(env={"EDGECAST_MODEL__PATH": str(folder), "EDGECAST_MODEL__REQUIRE_SIGNATURE": "true",
                               "EDGECAST_MODEL__PUBLIC_KEY": signing.public_key(bytes(32)).hex()})
    assert daemon.wait(30) == 1
    assert "not signed" in daemon.log() and "Traceback" not in daemon.log(), daemon.log()
