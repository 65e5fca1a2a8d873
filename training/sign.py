"""Bundle signing: `python -m training keygen KEY` and `python -m training sign-model DIR --key KEY`.

The agent verifies `DIR/manifest.json.sig` (ed25519 over the exact bytes of manifest.json, which holds
model.onnx's sha256) against `model.public_key` in its configuration. Keys are hex text: KEY holds the 32-byte
secret seed (mode 0600), KEY.pub the public key to put in the agent's configuration. Signing uses the agent's
pure-Python ed25519 (no extra dependency); it is not constant-time, so keep it to a trusted build machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from agent import signing


def add_keygen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("key", type=Path, help="secret key file to create (KEY.pub is written beside it)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing key")


def run_keygen(args: argparse.Namespace) -> int:
    if args.key.exists() and not args.force:
        print(f"error: {args.key} exists (use --force to replace it)", file=sys.stderr)
        return 1
    secret = signing.generate_secret()
    args.key.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(args.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex() + "\n")
    public = signing.public_key(secret).hex()
    Path(f"{args.key}.pub").write_text(public + "\n")
    print(f"secret key: {args.key} (keep it off the gateways)\npublic key: {args.key}.pub\n"
          f'agent configuration:\n  [model]\n  public_key = "{public}"\n  require_signature = true')
    return 0


def add_sign_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="bundle folder (model.onnx + manifest.json)")
    parser.add_argument("--key", type=Path, required=True, help="secret key file from `keygen`")


def run_sign(args: argparse.Namespace) -> int:
    from agent.model import BundleError, load_bundle

    manifest = args.bundle / "manifest.json"
    try:
        secret = signing.parse_hex(args.key.read_text(), 32, f"secret key {args.key}")
        load_bundle(args.bundle)  # never sign a bundle the agent would refuse (checksum, shapes, warm-up)
    except (OSError, signing.SignatureError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    data = manifest.read_bytes()
    signature = signing.sign(secret, data)
    public = signing.public_key(secret)
    assert signing.verify(public, data, signature)
    (args.bundle / signing.SIGNATURE_FILE).write_text(signature.hex() + "\n")
    print(f"signed {manifest} -> {args.bundle / signing.SIGNATURE_FILE} (public key {public.hex()})")
    return 0
