"""The hand-written RFC 8032 ed25519 that agent/core/signing.py used before it moved to `cryptography` (kept verbatim
below the marker, as a test oracle only: tests/test_signing.py checks that keys and signatures made by it, i.e. every
bundle signed before the change, still verify, and that the new code signs to the very same bytes).

Not constant-time and not used by edgecast itself.
"""

# --- verbatim from agent/core/signing.py before the change (git: the commit before "signing: cryptography's ed25519") ---
from __future__ import annotations

import hashlib
import os

SIGNATURE_FILE = "manifest.json.sig"

_P = 2**255 - 19
_L = 2**252 + 27742317777372353535851937790883648493  # order of the base point
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_IDENTITY = (0, 1, 1, 0)


class SignatureError(ValueError):
    """A key or signature that is malformed (wrong length, not hex)."""


def _inv(x: int) -> int:
    return pow(x, _P - 2, _P)


def _recover_x(y: int, sign: int) -> int | None:
    if y >= _P:
        return None
    x2 = (y * y - 1) * _inv(_D * y * y + 1) % _P
    if x2 == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


_GY = 4 * _inv(5) % _P
_GX = _recover_x(_GY, 0)
_G = (_GX, _GY, 1, _GX * _GY % _P)


def _add(p: tuple, q: tuple) -> tuple:
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _mul(s: int, p: tuple) -> tuple:
    q = _IDENTITY
    while s > 0:
        if s & 1:
            q = _add(q, p)
        p = _add(p, p)
        s >>= 1
    return q


def _equal(p: tuple, q: tuple) -> bool:
    return (p[0] * q[2] - q[0] * p[2]) % _P == 0 and (p[1] * q[2] - q[1] * p[2]) % _P == 0


def _compress(p: tuple) -> bytes:
    z = _inv(p[2])
    x, y = p[0] * z % _P, p[1] * z % _P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _decompress(data: bytes) -> tuple | None:
    y = int.from_bytes(data, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % _P)


def _hash_int(data: bytes) -> int:
    return int.from_bytes(hashlib.sha512(data).digest(), "little") % _L


def _expand(secret: bytes) -> tuple[int, bytes]:
    if len(secret) != 32:
        raise SignatureError(f"an ed25519 secret key is 32 bytes, got {len(secret)}")
    h = hashlib.sha512(secret).digest()
    a = int.from_bytes(h[:32], "little")
    a &= (1 << 254) - 8
    a |= 1 << 254
    return a, h[32:]


def public_key(secret: bytes) -> bytes:
    """The 32-byte public key of a 32-byte secret key (seed)."""
    a, _ = _expand(secret)
    return _compress(_mul(a, _G))


def generate_secret() -> bytes:
    return os.urandom(32)


def sign(secret: bytes, message: bytes) -> bytes:
    """The 64-byte signature of `message` (RFC 8032 5.1.6). Not constant-time: sign on a trusted machine."""
    a, prefix = _expand(secret)
    public = _compress(_mul(a, _G))
    r = _hash_int(prefix + message)
    r_point = _compress(_mul(r, _G))
    s = (r + _hash_int(r_point + public + message) * a) % _L
    return r_point + s.to_bytes(32, "little")


def verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is a valid ed25519 signature of `message` by `public` (RFC 8032 5.1.7)."""
    if len(public) != 32 or len(signature) != 64:
        return False
    a_point = _decompress(public)
    r_point = _decompress(signature[:32])
    if a_point is None or r_point is None:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= _L:  # non-canonical s: RFC 8032 requires rejecting it (no malleability)
        return False
    h = _hash_int(signature[:32] + public + message)
    return _equal(_mul(s, _G), _add(r_point, _mul(h, a_point)))


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
