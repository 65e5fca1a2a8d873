"""Bundle signing: `python -m training keygen KEY` and `python -m training sign-model DIR --key KEY [--release N]`.

The agent verifies `DIR/manifest.json.sig` (ed25519 over the exact bytes of manifest.json, which holds model.onnx's
sha256 and the release fields) against the trusted keys in its configuration (`model.public_key`, one key or a
list). Keys are hex text: KEY holds the 32-byte secret seed (mode 0600), KEY.pub the public key to put in the
agent's configuration. Signing uses the `cryptography` package's ed25519 (the same file formats as before it).

Every signing is a release: `sign-model` writes `"release": N` (and `"expires"`, `"rollback_to"` when given) into
manifest.json before signing it (agent/ops/releases.py). N defaults to the manifest's previous release + 1; a manifest
without one needs `--release`. Agents refuse a release not newer than the one they run, so rolling back means
signing the old bundle again under a higher number: `sign-model old-bundle --key KEY --release 8 --rollback-to 5`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from agent.ops import releases

from agent.core import signing


def add_keygen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key", type=Path, help="secret key file to create (KEY.pub is written beside it)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing key")


def run_keygen(args: argparse.Namespace) -> int:
    if args.key.exists() and not args.force:
        print(f"error: {args.key} exists (use --force to replace it)", file=sys.stderr)
        return 1
    try:
        secret = signing.generate_secret()
    except signing.SignatureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.key.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(args.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex() + "\n")
    public = signing.public_key(secret).hex()
    Path(f"{args.key}.pub").write_text(public + "\n")
    print(f"secret key: {args.key} (keep it off the gateways)\npublic key: {args.key}.pub\n"
          f'agent configuration:\n  [model]\n  public_key = "{public}"\n  require_signature = true\n'
          f'(rotating keys: trust both, public_key = ["<old key>", "{public}"], until every bundle is signed with the new one)')
    return 0


def add_release_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--release", type=int, metavar="N",
                        help="signed release number, higher than any release of this bundle name before "
                             "(default: the previous release + 1, when known)")
    parser.add_argument("--expires", metavar="WHEN",
                        help="agents refuse the bundle after this: a duration (30d, 12h, 2w) or an ISO-8601 date/time "
                             "(2027-01-31T00:00:00Z); default: never")
    parser.add_argument("--rollback-to", type=int, metavar="M",
                        help="mark this release as carrying the content of the older release M (a deliberate rollback)")


def add_sign_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="bundle folder (model.onnx + manifest.json)")
    parser.add_argument("--key", type=Path, required=True, help="secret key file from `keygen`")
    add_release_arguments(parser)
    parser.epilog = (
        "examples:\n"
        "  python -m training sign-model exported_models/pump-lstm-1.1.0 --key keys/model-signing --release 1 --expires 90d\n"
        "  python -m training sign-model exported_models/pump-lstm-1.1.0 --key keys/model-signing   # next release\n"
        "  # roll back to the content of release 5 (agents run release 7): a new, higher release\n"
        "  python -m training sign-model exported_models/pump-lstm-1.0.0 --key keys/model-signing --release 8 --rollback-to 5"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def read_secret(key_file: Path) -> bytes:
    return signing.parse_hex(key_file.read_text(), signing.SECRET_BYTES, f"secret key {key_file}")


def next_release(manifest: dict, *known: int | None) -> int | None:
    """The previous release + 1, from the manifest's own release and any other `known` ones; None when none is."""
    found = [r for r in (manifest.get("release"), *known) if isinstance(r, int) and not isinstance(r, bool)]
    return max(found) + 1 if found else None


def sign_bundle(
    folder: str | Path, secret: bytes, release: int, expires: str | None = None, rollback_to: int | None = None,
    verify: bool = True,
) -> tuple[bytes, bytes]:
    """Write the release fields into folder/manifest.json, sign it, write manifest.json.sig.

    Returns (manifest bytes, signature). `expires` is an ISO-8601 time (the CLI's `--expires` accepts durations and
    refuses past times; this function does not, so tests can make expired releases). With `verify`, the bundle is
    first loaded as the agent would (checksum, shapes, warm-up): nothing an agent would refuse is signed.
    """
    from agent.core.model import BundleError, load_bundle

    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if verify:
        try:
            load_bundle(folder)
        except BundleError as exc:
            raise releases.ReleaseError(f"bundle {folder} refused: {exc}") from None
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    updated = releases.with_release(manifest, release, expires, rollback_to)  # ReleaseError for bad fields
    data = (json.dumps(updated, indent=2) + "\n").encode("utf-8")
    signature = signing.sign(secret, data)
    if not signing.verify(signing.public_key(secret), data, signature):
        raise RuntimeError("the signature just made does not verify")  # a bug, never bad input
    sig_path = folder / signing.SIGNATURE_FILE
    for path, content in ((manifest_path, data), (sig_path, (signature.hex() + "\n").encode("ascii"))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(content)
        tmp.replace(path)
    return data, signature


def run_sign(args: argparse.Namespace) -> int:
    manifest_path = args.bundle / "manifest.json"
    try:
        secret = read_secret(args.key)
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        release = getattr(args, "release", None)
        release = release if release is not None else next_release(manifest)
        if release is None:
            raise releases.ReleaseError(
                f"give --release N: {manifest_path} carries no earlier release of {manifest.get('name')!r} "
                f"(1 for the first signed release; otherwise one more than the highest release agents have seen)"
            )
        expires = releases.parse_expiry(args.expires) if getattr(args, "expires", None) else None
        sign_bundle(args.bundle, secret, release, expires, getattr(args, "rollback_to", None))
    except (OSError, ValueError, signing.SignatureError, releases.ReleaseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    public = signing.public_key(secret)
    what = f"release {release}" + (f", rolls back to release {args.rollback_to}" if getattr(args, "rollback_to", None) else "")
    what += f", expires {expires}" if expires else ", no expiry"
    print(f"signed {manifest_path} ({what}) -> {args.bundle / signing.SIGNATURE_FILE} (public key {public.hex()})")
    return 0
