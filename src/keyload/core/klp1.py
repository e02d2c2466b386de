"""The KLP1 cryptography, both sides (docs/protocol.md §4, §7, §8), as pure functions.

Volatile key material (T1, Kenc, Kmac, Ksas, TA' in clear on the unit side) lives only in
buffers owned by a :class:`Scratch`; every function wipes them before it returns, on
success and on every failure. A caller may pass its own ``scratch=`` to reuse buffers
across calls, or to check afterwards that all of them are zeros.

Randomness and time never enter here: R comes in as an argument.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple, Protocol

from .errors import AuthenticityError, IntegrityError, PolicyRefused
from .keys import FLAG_DIVERSIFIED, FLAG_ED25519, KeyHeader, KeyType, kcv, length_fits
from .messages import ImportData
from .primitives import (
    Buf,
    aes_cmac,
    aes_cmac_parts,
    aes_kwp_unwrap,
    aes_kwp_wrap,
    ct_equal,
    ed25519_verify,
    sha256,
)
from .secret import Secret, scrub
from .suites import Suite

LABEL_T1 = b"KLP1-T1"
LABEL_DL = b"KLP1-DL"
LABEL_TA = b"KLP1-TA"
LABEL_SAS = b"KLP1-SAS"
LABEL_CAS = b"KLP1-CAS"
LABEL_RCT = b"KLP1-RCT"
_CAS_FORMAT = LABEL_CAS + b"%c%s%s%c%s%s%s"  # one bytes formatting builds a whole message
_RCT_FORMAT = LABEL_RCT + b"%c%s%s%c%s%s"

# where Kenc, Kmac and Ksas stand in KDF(T1, "KLP1-DL", …, 768) (docs/protocol.md §4)
KENC, KMAC, KSAS = slice(0, 32), slice(32, 64), slice(64, 96)


def lv(x: bytes) -> bytes:
    return bytes((len(x),)) + x


class Signer(Protocol):
    """An Ed25519 signer (the authority's SAS key); the private key never leaves it."""

    def sign(self, data: bytes) -> bytes: ...


_ZERO32 = bytes(32)
_ZERO96 = bytes(96)
_HEADER = struct.Struct(">BBBB2s1sH1sBB")


def encode_header(suite: int, key_type: int, key_length: int, usage: str, mode: str,
                  version: int, exportability: str, flags: int) -> bytes:
    """H (docs/protocol.md §3) without building a KeyHeader; same bytes as KeyHeader.encode."""
    return _HEADER.pack(1, suite, key_type, key_length, usage.encode("ascii"),
                        mode.encode("ascii"), version, exportability.encode("ascii"), flags, 0)


def encode_import_data(ref2: int, h: bytes, w: bytes, sas: bytes, cas: bytes) -> bytes:
    """ImportData(ref2, h, w, sas, cas).encode() for W and SAS shorter than 128 bytes."""
    if len(w) >= 0x80 or len(sas) >= 0x80 or len(h) != 12 or len(cas) != 16:
        return ImportData(ref2, h, w, sas, cas).encode()
    return b"\xc7\x01%c\xc8\x0c%s\xc9%c%s\xca%c%s\xcb\x10%s" % (
        ref2, h, len(w), w, len(sas), sas, cas)


class Scratch:
    """Volatile buffers for one operation; :meth:`wipe` zeroes them all.

    Buffers are kept (and reused) until the Scratch is dropped, so a test can check that
    every one of them is zero after an operation, and a hot loop allocates nothing.
    """

    __slots__ = ("kenc", "kmac", "ksas", "session", "t1", "ta")

    def __init__(self) -> None:
        self.t1 = bytearray(32)
        self.session = bytearray(96)  # Kenc || Kmac || Ksas
        view = memoryview(self.session)  # the three keys as views, made once
        self.kenc, self.kmac, self.ksas = view[KENC], view[KMAC], view[KSAS]
        self.ta = bytearray(0)  # diversified TA' (authority) or unwrapped TA' (unit)

    def buffers(self) -> list[bytearray]:
        return [self.t1, self.session, self.ta]

    def wipe(self) -> None:
        self.t1[:] = _ZERO32
        self.session[:] = _ZERO96
        if self.ta:
            self.ta[:] = bytes(len(self.ta))

    @property
    def wiped(self) -> bool:
        return not any(any(b) for b in self.buffers())


def derive_t1(suite: Suite, t: Buf, sn: bytes, out: bytearray) -> None:
    """T1 = KDF(T, "KLP1-T1", SN, 256) into ``out`` (32 bytes)."""
    suite.kdf_into(t, out, LABEL_T1, sn)


def dl_context(sn: bytes, r: bytes, ref2: int) -> bytes:
    """lv(SN) || R || REF2."""
    return b"%c%s%s%c" % (len(sn), sn, r, ref2)


def derive_session(suite: Suite, t1: Buf, sn: bytes, r: bytes, ref2: int,
                   out: bytearray) -> None:
    """Kenc || Kmac || Ksas = KDF(T1, "KLP1-DL", lv(SN) || R || REF2, 768) into ``out``."""
    suite.kdf_into(t1, out, LABEL_DL, dl_context(sn, r, ref2))


def diversify_into(suite: Suite, ta: Buf, sn: bytes, out: bytearray) -> None:
    """TA' = KDF(TA, "KLP1-TA", lv(SN), 8*len(TA)) into ``out`` (AES keys only)."""
    suite.kdf_into(ta, out, LABEL_TA, lv(sn))


def sas_message_ed25519(h: bytes, sn: bytes, ref2: int, ta: Buf) -> bytes:
    return sas_message_ed25519_of_digest(h, sn, ref2, sha256(ta))


def sas_message_ed25519_of_digest(h: bytes, sn: bytes, ref2: int, ta_sha256: bytes) -> bytes:
    """The message the Ed25519 SAS signs, given SHA-256(TA') (a token's ``C_DigestKey``)."""
    return LABEL_SAS + h + lv(sn) + bytes((ref2,)) + ta_sha256


def symmetric_sas(ksas: Buf, h: bytes, ta: Buf) -> bytes:
    """SAS = AES-CMAC(Ksas, "KLP1-SAS" || H || TA') (docs/protocol.md §4).

    The MAC is fed the parts, so TA' is never copied into a message buffer: there is
    nothing of it to wipe here (the caller wipes ``ta``)."""
    return aes_cmac_parts(ksas, LABEL_SAS + h, ta)  # no copy of TA' to wipe


def cas_message(sn: bytes, r: bytes, ref2: int, h: bytes, w: bytes, sas: bytes) -> bytes:
    """"KLP1-CAS" || lv(SN) || R || REF2 || H || W || SAS."""
    return _CAS_FORMAT % (len(sn), sn, r, ref2, h, w, sas)


def rct_message(sn: bytes, r: bytes, ref2: int, h: bytes, kcv_: bytes) -> bytes:
    """"KLP1-RCT" || lv(SN) || R || REF2 || H || KCV."""
    return _RCT_FORMAT % (len(sn), sn, r, ref2, h, kcv_)


class Exported(NamedTuple):
    """The authority's answer: the E0 content (IMPORTKEY data), H and KCV(TA')."""

    import_data: bytes
    header: bytes
    kcv: bytes


def export_key(
    suite: Suite,
    t: Buf,
    sn: bytes,
    r: bytes,
    ref2: int,
    *,
    key_type: KeyType,
    key: Buf,
    usage: str,
    mode: str,
    version: int,
    exportability: str,
    diversify: bool,
    signer: Signer | None = None,
    scratch: Scratch | None = None,
    kcv_: bytes | None = None,
) -> Exported:
    """Build the IMPORTKEY data for one unit (docs/protocol.md §4, §8). Wipes its buffers.

    A key whose length does not fit its type (§3) is never wrapped: PolicyRefused (6986).
    """
    if not length_fits(key_type, len(key)):
        raise PolicyRefused("export policy: the key's length does not fit its type")
    sc = scratch if scratch is not None else Scratch()
    try:
        derive_t1(suite, t, sn, sc.t1)
        derive_session(suite, sc.t1, sn, r, ref2, sc.session)
        sc.t1[:] = _ZERO32  # T1 is no longer needed
        kenc, kmac, ksas = sc.kenc, sc.kmac, sc.ksas
        flags = 0
        if diversify:
            if not key_type.is_aes:
                raise ValueError("only AES keys can be diversified")
            if len(sc.ta) != len(key):
                sc.ta = bytearray(len(key))
            diversify_into(suite, key, sn, sc.ta)
            ta: Buf = sc.ta
            flags |= FLAG_DIVERSIFIED
        else:
            ta = key
        if signer is not None:
            flags |= FLAG_ED25519
        h = encode_header(suite.id, key_type, len(ta), usage, mode, version, exportability, flags)
        w = aes_kwp_wrap(kenc, ta)
        if signer is not None:
            sas = signer.sign(sas_message_ed25519(h, sn, ref2, ta))
        else:
            sas = symmetric_sas(ksas, h, ta)
        cas = aes_cmac(kmac, cas_message(sn, r, ref2, h, w, sas))
        check = kcv_ if kcv_ is not None and not diversify else kcv(key_type, ta)
        data = encode_import_data(ref2, h, w, sas, cas)
        return Exported(data, h, check)
    finally:
        sc.wipe()


class Opened(NamedTuple):
    """What the unit stores and answers after a successful IMPORTKEY check."""

    header: KeyHeader
    key: Secret  # TA' in clear: store it, then wipe it
    kcv: bytes
    rct: bytes


def open_import(
    suite: Suite,
    t: Buf,
    sn: bytes,
    r: bytes,
    data: ImportData,
    header: KeyHeader,
    *,
    check_policy: Callable[[KeyHeader], None],
    verify_key: bytes | None,
    scratch: Scratch | None = None,
) -> Opened:
    """Unit steps 5–8 of docs/protocol.md §7: CAS, slot policy, unwrap, SAS. Wipes its buffers.

    Steps 1–4 (challenge, TLV, slot, header/suite) are the caller's; step 9 (store) too.
    Step 6 is ``check_policy`` (the slot's rules) and then the rule of §3 that holds for
    every slot: the key length H[3] fits the key type, else PolicyRefused (6986), so no
    key of a length its type does not have is ever unwrapped, checked or stored.
    Raises IntegrityError (6982), PolicyRefused or the policy's error (6986) or
    AuthenticityError (6988).
    """
    sc = scratch if scratch is not None else Scratch()
    ta_bytes: bytes | None = None
    try:
        derive_t1(suite, t, sn, sc.t1)
        derive_session(suite, sc.t1, sn, r, data.ref2, sc.session)
        sc.t1[:] = _ZERO32
        kenc, kmac, ksas = sc.kenc, sc.kmac, sc.ksas
        # 5. CAS before any decryption
        want = aes_cmac(kmac, cas_message(sn, r, data.ref2, data.h, data.w, data.sas))
        if not ct_equal(want, data.cas):
            raise IntegrityError()
        # 6. slot policy on the authenticated header, and a length that fits the type
        check_policy(header)
        if not length_fits(header.key_type, header.key_length):
            raise PolicyRefused("key length does not fit the key type")
        # 7. unwrap and length
        ta_bytes = aes_kwp_unwrap(kenc, data.w)
        sc.ta = bytearray(ta_bytes)
        scrub(ta_bytes)
        if len(sc.ta) != header.key_length:
            raise IntegrityError()
        # 8. SAS
        if verify_key is not None:
            bad_sas = "SAS signature not valid for the authority's key"
            if not header.ed25519:
                raise AuthenticityError(bad_sas)
            try:
                ed25519_verify(verify_key, data.sas,
                               sas_message_ed25519(data.h, sn, data.ref2, sc.ta))
            except AuthenticityError:
                raise AuthenticityError(bad_sas) from None
        else:
            if header.ed25519:
                raise AuthenticityError("signed SAS but the unit holds no authority key")
            want_sas = symmetric_sas(ksas, data.h, sc.ta)
            if not ct_equal(want_sas, data.sas):
                raise AuthenticityError("SAS wrong")
        check = kcv(header.key_type, sc.ta)
        rct = aes_cmac(kmac, rct_message(sn, r, data.ref2, data.h, check))
        return Opened(header, Secret(sc.ta), check, rct)
    finally:
        sc.wipe()


def receipt(suite: Suite, t: Buf, sn: bytes, r: bytes, ref2: int, h: bytes, kcv_: bytes,
            *, scratch: Scratch | None = None) -> bytes:
    """RCT = AES-CMAC(Kmac, "KLP1-RCT" || lv(SN) || R || REF2 || H || KCV)."""
    sc = scratch if scratch is not None else Scratch()
    try:
        derive_t1(suite, t, sn, sc.t1)
        derive_session(suite, sc.t1, sn, r, ref2, sc.session)
        return aes_cmac(sc.kmac, rct_message(sn, r, ref2, h, kcv_))
    finally:
        sc.wipe()


def verify_receipt(suite: Suite, t: Buf, sn: bytes, r: bytes, ref2: int, h: bytes,
                   kcv_: bytes, rct: bytes) -> None:
    """Raise IntegrityError unless ``rct`` is the unit's receipt for this load."""
    if not ct_equal(receipt(suite, t, sn, r, ref2, h, kcv_), rct):
        raise IntegrityError()
