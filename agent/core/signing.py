"""Ed25519 bundle signatures, by the `cryptography` package (OpenSSL's ed25519: RFC 8032, constant-time signing).

A bundle is signed by `manifest.json.sig` (hex text, 128 digits) over the exact bytes of `manifest.json`; the
manifest carries model.onnx's sha256, which the loader checks, so the signature covers the model too, and its
release number, expiry and rollback marker (agent/ops/releases.py), so those cannot be changed without the key.

Key files are hex text: the secret key is the 32-byte RFC 8032 seed, the public key its 32 raw bytes. These are
the formats the earlier pure-Python implementation wrote and read; ed25519 signatures are deterministic, so the
same key signs the same manifest to the same bytes as before, and every earlier key and signature still verifies.

`cryptography` is imported on first use, so a daemon without a configured public key does not load it.
"""

from __future__ import annotations

SIGNATURE_FILE = "manifest.json.sig"
SECRET_BYTES = 32
PUBLIC_BYTES = 32
SIGNATURE_BYTES = 64


class SignatureError(ValueError):
    """A key or signature that is malformed (wrong length, not hex), or no ed25519 implementation to check it."""


def _ed25519():
    try:
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # a hand-made install without the dependency: say what is missing
        raise SignatureError(
            f"checking or making bundle signatures needs the `cryptography` package (pip install 'cryptography>=42'): {exc}"
        ) from None
    return ed25519


def _private(secret: bytes):
    if len(secret) != SECRET_BYTES:
        raise SignatureError(f"an ed25519 secret key is {SECRET_BYTES} bytes, got {len(secret)}")
    return _ed25519().Ed25519PrivateKey.from_private_bytes(bytes(secret))


def generate_secret() -> bytes:
    """A new 32-byte secret key (seed), from the operating system's random source."""
    return _ed25519().Ed25519PrivateKey.generate().private_bytes_raw()


def public_key(secret: bytes) -> bytes:
    """The 32-byte public key of a 32-byte secret key (seed)."""
    return _private(secret).public_key().public_bytes_raw()


def sign(secret: bytes, message: bytes) -> bytes:
    """The 64-byte ed25519 signature of `message` (RFC 8032 5.1.6)."""
    return _private(secret).sign(bytes(message))


def verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is a valid ed25519 signature of `message` by `public` (RFC 8032 5.1.7)."""
    if len(public) != PUBLIC_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    ed25519 = _ed25519()
    from cryptography.exceptions import InvalidSignature

    try:
        ed25519.Ed25519PublicKey.from_public_bytes(bytes(public)).verify(bytes(signature), bytes(message))
    except (InvalidSignature, ValueError):  # ValueError: bytes that are no key
        return False
    return True


def verify_any(publics: list[bytes], message: bytes, signature: bytes) -> bytes | None:
    """The first of the trusted `publics` that made `signature` over `message`, or None."""
    for public in publics:
        if verify(public, message, signature):
            return public
    return None


def key_id(public: bytes) -> str:
    """A short name for a public key in messages: its first 16 hex digits."""
    return public.hex()[:16]


def parse_hex(text: str, length: int, what: str) -> bytes:
    """Hex text (whitespace ignored) of exactly `length` bytes, else SignatureError naming `what`."""
    cleaned = "".join(text.split())
    try:
        data = bytes.fromhex(cleaned)
    except ValueError:
        raise SignatureError(f"{what} is not hex text") from None
    if len(data) != length:
        raise SignatureError(f"{what} must be {length} bytes ({2 * length} hex digits), got {len(data)} bytes")
    return data


def parse_public_keys(text: str, what: str) -> list[bytes]:
    """The public keys in a key file: one per line (64 hex digits), `#` starts a comment; at least one."""
    lines = [(number, line.split("#", 1)[0].strip()) for number, line in enumerate(text.splitlines(), 1)]
    lines = [(number, line) for number, line in lines if line]
    if len(lines) > 1 and all(len("".join(line.split())) != 2 * PUBLIC_BYTES for _, line in lines):
        # one key wrapped over several lines, which the single-key reader always accepted
        return [parse_hex("".join(line for _, line in lines), PUBLIC_BYTES, what)]
    keys = [parse_hex(line, PUBLIC_BYTES, f"{what}, line {number}") for number, line in lines]
    if not keys:
        raise SignatureError(f"{what} holds no public key (64 hex digits per line)")
    return keys
