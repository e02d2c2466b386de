"""Every cryptographic primitive keyload uses, each a thin call into pyca/cryptography.

Nothing here is hand-written cryptography: these wrappers fix the parameters KLP1 uses
(docs/protocol.md §2, §4) and turn library exceptions into keyload's typed errors. Keys may be
``bytes``, ``bytearray`` or a :class:`~keyload.core.secret.Secret` buffer; derived keys are
written into caller-owned buffers (``*_into``) so that they can be wiped.
"""

from __future__ import annotations

import hashlib
import hmac as _hmac

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import cmac, hashes
from cryptography.hazmat.primitives import hmac as _chmac
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFCMAC, CounterLocation, Mode
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap,
    aes_key_wrap_with_padding,
)

from .errors import AuthenticityError, IntegrityError

Buf = bytes | bytearray | memoryview

__all__ = [
    "aes_cmac",
    "aes_cmac_parts",
    "aes_cmac_verify",
    "aes_ecb_encrypt_into",
    "aes_kw_unwrap",
    "aes_kw_wrap",
    "aes_kwp_unwrap",
    "aes_kwp_wrap",
    "ct_equal",
    "ecbdiv_blocks",
    "ecbdiv_into",
    "ed25519_public",
    "ed25519_sign",
    "ed25519_verify",
    "hmac_sha256",
    "kbkdf_cmac_into",
    "sha256",
]


def ct_equal(a: bytes | bytearray, b: bytes | bytearray) -> bool:
    """Constant-time equality of two byte strings."""
    return _hmac.compare_digest(a, b)


def aes_cmac(key: Buf, data: Buf) -> bytes:
    """AES-CMAC (SP 800-38B), full 16-byte tag."""
    c = cmac.CMAC(algorithms.AES(key))
    c.update(data)  # type: ignore[arg-type]  # any bytes-like is accepted
    return c.finalize()


def aes_cmac_parts(key: Buf, head: Buf, tail: Buf) -> bytes:
    """AES-CMAC over ``head || tail`` without building the concatenation."""
    c = cmac.CMAC(algorithms.AES(key))
    c.update(head)  # type: ignore[arg-type]
    c.update(tail)  # type: ignore[arg-type]
    return c.finalize()


def aes_cmac_verify(key: Buf, data: Buf, tag: Buf) -> None:
    """Verify a full or truncated CMAC tag in constant time; raise IntegrityError."""
    if not 1 <= len(tag) <= 16:
        raise IntegrityError()
    if not ct_equal(aes_cmac(key, data)[: len(tag)], bytes(tag)):
        raise IntegrityError()


def hmac_sha256(key: Buf, data: Buf) -> bytes:
    h = _chmac.HMAC(key, hashes.SHA256())
    h.update(data)
    return h.finalize()


def sha256(data: Buf) -> bytes:
    return hashlib.sha256(data).digest()


def kbkdf_cmac_into(
    key: Buf,
    out: bytearray,
    *,
    label: bytes | None = None,
    context: bytes | None = None,
    fixed: bytes | None = None,
    rlen: int = 1,
    llen: int = 2,
) -> None:
    """SP 800-108r1 KDF in counter mode, PRF AES-CMAC, counter before the fixed data.

    With ``fixed`` None the fixed data is ``label || 0x00 || context || [L]_{8*llen}``
    (KLP1 suite 0x01: 8-bit counter, 16-bit L); ``len(out)`` gives L.
    """
    kdf = KBKDFCMAC(
        algorithm=algorithms.AES,
        mode=Mode.CounterMode,
        length=len(out),
        rlen=rlen,
        llen=llen if fixed is None else None,
        location=CounterLocation.BeforeFixed,
        label=label if fixed is None else None,
        context=context if fixed is None else None,
        fixed=fixed,
    )
    kdf.derive_into(key, out)


_AES = algorithms.AES
_COUNTER = Mode.CounterMode
_BEFORE = CounterLocation.BeforeFixed


def kbkdf_klp1_into(key: Buf, out: bytearray, label: bytes, context: bytes) -> None:
    """:func:`kbkdf_cmac_into` with KLP1 suite 0x01's parameters, positional (hot path)."""
    KBKDFCMAC(algorithm=_AES, mode=_COUNTER, length=len(out), rlen=1, llen=2,
              location=_BEFORE, label=label, context=context, fixed=None).derive_into(key, out)


def aes_ecb_encrypt_into(key: Buf, data: Buf, out: bytearray) -> None:
    """AES-ECB over whole blocks of ``data`` into ``out`` (``len(out) == len(data)``)."""
    if len(data) % 16 or len(out) != len(data):
        raise ValueError("AES-ECB needs whole blocks and an output of the same length")
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()  # noqa: S305 - KLP1 ECBDIV
    tmp = bytearray(len(data) + 15)
    try:
        n = enc.update_into(data, tmp)
        enc.finalize()
        out[:] = memoryview(tmp)[:n]
    finally:
        tmp[:] = bytes(len(tmp))


def ecbdiv_blocks(label: bytes, context: bytes, n: int) -> bytes:
    """``B_1 || … || B_n`` of KLP1 suite 0x02 (docs/protocol.md §4): the data AES-ECB
    encrypts, here or in a token (``CKM_AES_ECB_ENCRYPT_DATA``).

    ``h = SHA-256(label || 0x00 || context)[0:15]``, ``B_i = h || [i]_8``.
    """
    h = hashlib.sha256(label + b"\x00" + context).digest()[:15]
    return b"".join(h + bytes((i,)) for i in range(1, n + 1))


def ecbdiv_into(key: Buf, out: bytearray, *, label: bytes, context: bytes) -> None:
    """KLP1 suite 0x02 KDF (docs/protocol.md §4): leftmost L bits of AES-ECB_K(B_1 || … || B_n)
    (:func:`ecbdiv_blocks`); ``len(out)`` gives L.
    """
    n = -(-len(out) // 16)
    blocks = ecbdiv_blocks(label, context, n)
    if len(out) == 16 * n:
        aes_ecb_encrypt_into(key, blocks, out)
        return
    tmp = bytearray(16 * n)
    try:
        aes_ecb_encrypt_into(key, blocks, tmp)
        out[:] = memoryview(tmp)[: len(out)]
    finally:
        tmp[:] = bytes(len(tmp))


def aes_kwp_wrap(kek: Buf, key: Buf) -> bytes:
    """AES-KWP (RFC 5649 / SP 800-38F)."""
    return aes_key_wrap_with_padding(kek, key)


def aes_kwp_unwrap(kek: Buf, wrapped: Buf) -> bytes:
    """AES-KWP unwrap; any failure is an :class:`IntegrityError` (nothing more said)."""
    try:
        return aes_key_unwrap_with_padding(kek, wrapped)
    except (InvalidUnwrap, ValueError):
        raise IntegrityError() from None


def aes_kw_wrap(kek: Buf, key: Buf) -> bytes:
    """AES-KW (RFC 3394 / SP 800-38F)."""
    return aes_key_wrap(kek, key)


def aes_kw_unwrap(kek: Buf, wrapped: Buf) -> bytes:
    try:
        return aes_key_unwrap(kek, wrapped)
    except (InvalidUnwrap, ValueError):
        raise IntegrityError() from None


def ed25519_sign(private_key: Buf, message: bytes) -> bytes:
    """Ed25519 (RFC 8032) signature with a raw 32-byte private key."""
    return Ed25519PrivateKey.from_private_bytes(bytes(private_key)).sign(message)


def ed25519_public(private_key: Buf) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    pk = Ed25519PrivateKey.from_private_bytes(bytes(private_key)).public_key()
    return pk.public_bytes(Encoding.Raw, PublicFormat.Raw)


def ed25519_verify(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Verify an Ed25519 (RFC 8032) signature of ``message``; raise AuthenticityError.

    Like :func:`aes_cmac_verify`, it returns None or raises: a bad signature, and a public
    key that is not a point (not 32 bytes, or not on the curve), are the same error.
    """
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise AuthenticityError() from None
