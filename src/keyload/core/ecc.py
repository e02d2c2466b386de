"""NIST P-256 for KLP1 suite 0x03 (docs/protocol.md §10.1), each a thin call into pyca/cryptography.

- A public key travels as the 65-byte uncompressed point ``04 || X || Y``. :func:`load_point`
  refuses anything else: a wrong length, a first byte other than ``04`` (compressed points
  included), a point not on the curve. The point at infinity has no such encoding.
- ECDSA is P-256 with SHA-256, the signature ``r || s`` (IEEE P1363, 32 bytes each).
  :func:`ecdsa_sign` signs deterministically (RFC 6979), so that a signature is reproducible.
- ECDH is the SP 800-56A ECC CDH primitive: Z is the 32-byte X coordinate of the shared point.

Errors: a point that is not a valid public key is :class:`IntegrityError` (6982, what §10.1
gives for E_U, E_A and D6); a signature that does not verify, whatever the reason (length,
``r`` or ``s`` out of range, wrong key), is :class:`AuthenticityError`. Callers map them where
§10 gives another word. A private scalar outside 1..n-1 is a caller mistake: ``ValueError``.

What is and is not wiped: a private scalar passed in a ``bytearray`` or
:class:`~keyload.core.secret.Secret` stays the caller's to wipe; the integer and the key
object that pyca/cryptography builds from it cannot be overwritten from Python and live until
they are collected. Z is copied into a caller-owned buffer and the library's copy is scrubbed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import AuthenticityError, IntegrityError
from .primitives import Buf
from .secret import Secret, scrub

POINT_LEN = 65
SCALAR_LEN = 32
SIGNATURE_LEN = 64
#: the order n of the P-256 group
ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

_CURVE = ec.SECP256R1()
_VERIFY = ec.ECDSA(hashes.SHA256())
_SIGN = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)


class EcdsaSigner(Protocol):
    """A P-256 signer (set CA, authority or unit key); the private key never leaves it."""

    def sign(self, message: bytes) -> bytes:
        """ECDSA-P256-SHA256 of ``message`` as ``r || s`` (64 bytes)."""
        ...


def load_point(point: bytes) -> ec.EllipticCurvePublicKey:
    """The public key of an uncompressed P-256 point; IntegrityError unless it is one."""
    if len(point) != POINT_LEN or point[0] != 0x04:
        raise IntegrityError()
    return _loaded(bytes(point))


@functools.lru_cache(maxsize=256)
def _loaded(point: bytes) -> ec.EllipticCurvePublicKey:
    """Public keys only, so kept: Q_CA and Q_A serve every download of a set, and one
    download checks E_U and C_U's D0 before it uses them (a point that fails is not kept)."""
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, point)
    except ValueError:
        raise IntegrityError() from None


def check_point(point: bytes) -> None:
    """Raise IntegrityError unless ``point`` is an uncompressed point on P-256."""
    load_point(point)


def _private(scalar: Buf) -> ec.EllipticCurvePrivateKey:
    if len(scalar) != SCALAR_LEN:
        raise ValueError("a P-256 private key is a 32-byte scalar")
    d = int.from_bytes(scalar, "big")
    if not 1 <= d < ORDER:
        raise ValueError("a P-256 private key is in 1..n-1")
    return ec.derive_private_key(d, _CURVE)


def public_point(scalar: Buf) -> bytes:
    """Q = d·G as the 65-byte uncompressed point."""
    return _private(scalar).public_key().public_bytes(Encoding.X962,
                                                      PublicFormat.UncompressedPoint)


def scalar_from(draw: Callable[[int], bytes]) -> bytearray:
    """A private scalar from ``draw(32)`` (e.g. ``os.urandom``), drawn again until in 1..n-1.

    Randomness comes in as an argument; the scalar is a buffer the caller wipes.
    """
    while True:
        b = bytearray(draw(SCALAR_LEN))
        if len(b) != SCALAR_LEN:
            raise ValueError("draw(32) must return 32 bytes")
        if 1 <= int.from_bytes(b, "big") < ORDER:
            return b
        b[:] = bytes(SCALAR_LEN)


def ecdh_into(scalar: Buf, peer: bytes, out: bytearray) -> bytes:
    """Z = X coordinate of d·P into ``out`` (32 bytes); IntegrityError if P is not a point.

    Returns the caller's own public point d·G (E_A or E_U), computed on the way.
    """
    if len(out) != SCALAR_LEN:
        raise ValueError("Z is 32 bytes")
    pub = load_point(peer)
    key = _private(scalar)
    z = key.exchange(ec.ECDH(), pub)
    out[:] = z
    scrub(z)
    return key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)


def ecdsa_sign(scalar: Buf, message: bytes) -> bytes:
    """ECDSA-P256-SHA256 of ``message``, deterministic (RFC 6979), as ``r || s``."""
    return _sign(_private(scalar), message)


def _sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(message, _SIGN))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def ecdsa_verify(point: bytes, signature: bytes, message: bytes) -> None:
    """Verify an ``r || s`` signature of ``message`` under ``point``.

    A point that is not a valid public key: IntegrityError. A signature that is not 64 bytes,
    has ``r`` or ``s`` outside 1..n-1, or does not verify: AuthenticityError.
    """
    pub = load_point(point)
    if len(signature) != SIGNATURE_LEN:
        raise AuthenticityError()
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    if not (1 <= r < ORDER and 1 <= s < ORDER):
        raise AuthenticityError()
    try:
        pub.verify(encode_dss_signature(r, s), message, _VERIFY)
    except InvalidSignature:
        raise AuthenticityError() from None


class EcdsaKey:
    """A software P-256 signer over a private scalar held in a wipeable buffer.

    ``sign`` is deterministic (RFC 6979). ``public`` is Q. :meth:`wipe` zeroes the scalar
    (the library's own copy cannot be reached, see the module text).
    """

    __slots__ = ("_key", "_scalar", "public")

    def __init__(self, scalar: Buf) -> None:
        self._scalar = Secret(scalar)
        self._key = _private(self._scalar.buffer)
        self.public = self._key.public_key().public_bytes(Encoding.X962,
                                                          PublicFormat.UncompressedPoint)

    def sign(self, message: bytes) -> bytes:
        return _sign(self._key, message)

    def wipe(self) -> None:
        self._scalar.wipe()

    def __repr__(self) -> str:
        return "EcdsaKey(<private key redacted>)"
