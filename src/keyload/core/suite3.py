"""KLP1 suite 0x03, both sides (docs/protocol.md §10.3–§10.5), as pure functions.

One download: the unit signs its challenge (sigU over R and a fresh E_U); the authority
checks C_U, sigU and E_U (:func:`check_export_request`), draws (e_A, E_A) and derives
Z = ECDH(e_A, E_U), T1 and the session keys with ECBDIV (the KDF of suite 0x02), wraps TA'
under Kenc, signs the export with its ECDSA key (SAS) and binds the whole under Kmac (CAS)
(:func:`export_key3`). The unit derives the same Z from e_U and E_A, checks in the order of
§10.5 and signs its receipt with d_U (:func:`open_import3`).

Volatile key material (Z, T1, Kenc, Kmac, Ksas, TA' in clear) lives only in buffers owned by
a :class:`Scratch3`, wiped before every function returns, on success and on every failure.
The ephemeral scalars come in as arguments: the caller draws them (randomness never enters
here) and wipes them after the call. The state a role keeps (registers of units, served
challenges and revocations; slots; the pending challenge) stays with the role: the checks
that need it are callbacks or the caller's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from .ecc import POINT_LEN, EcdsaSigner, check_point, ecdh_into, ecdsa_verify, public_point
from .errors import AuthenticityError, IntegrityError, PolicyRefused, Unsupported
from .identity import ROLE_AUTHORITY, ROLE_UNIT, Certificate, verify_certificate
from .keys import FLAG_DIVERSIFIED, KeyAttributes, KeyHeader, KeyType, kcv, length_fits
from .klp1 import (
    KENC,
    KMAC,
    LABEL_CAS,
    LABEL_T1,
    Scratch,
    derive_session,
    diversify_into,
    encode_header,
    lv,
)
from .messages3 import ExportRequest3, ImportData3, InitResponse3
from .primitives import Buf, aes_cmac, aes_kwp_unwrap, aes_kwp_wrap, ct_equal, ecbdiv_into
from .secret import Secret, scrub
from .suites import SUITE_ECBDIV, SUITES

SUITE_ECDH = 0x03
LABEL_INI = b"KLP1-INI"
LABEL_SAS3 = b"KLP1-SAS3"
LABEL_RCT3 = b"KLP1-RCT3"

_ECBDIV = SUITES[SUITE_ECBDIV]
_ZERO32 = bytes(32)


class Scratch3(Scratch):
    """The buffers of :class:`~keyload.core.klp1.Scratch` and Z; :meth:`wipe` zeroes them all."""

    __slots__ = ("z",)

    def __init__(self) -> None:
        super().__init__()
        self.z = bytearray(32)

    def buffers(self) -> list[bytearray]:
        return [self.z, *super().buffers()]

    def wipe(self) -> None:
        self.z[:] = _ZERO32
        super().wipe()


# --- the messages signed and MACed (§10.3) ----------------------------------------------


def sig_u_message(sn: bytes, r: bytes, set_id: bytes, e_u: bytes) -> bytes:
    """``"KLP1-INI" || lv(SN) || R || set id || E_U``: what the unit signs as sigU."""
    return b"".join((LABEL_INI, lv(sn), r, set_id, e_u))


def t1_context(sn: bytes, r: bytes, e_u: bytes, e_a: bytes) -> bytes:
    """``lv(SN) || R || E_U || E_A``: the context of T1."""
    return b"".join((lv(sn), r, e_u, e_a))


def sas3_message(sn: bytes, r: bytes, ref2: int, ref1: bytes, h: bytes, w: bytes,
                 e_u: bytes, e_a: bytes) -> bytes:
    """``"KLP1-SAS3" || lv(SN) || R || REF2 || lv(REF1) || H || W || E_U || E_A``."""
    return b"".join((LABEL_SAS3, lv(sn), r, bytes((ref2,)), lv(ref1), h, w, e_u, e_a))


def cas3_message(sn: bytes, r: bytes, ref2: int, ref1: bytes, h: bytes, w: bytes,
                 sas: bytes, e_a: bytes) -> bytes:
    """``"KLP1-CAS" || lv(SN) || R || REF2 || lv(REF1) || H || W || SAS || E_A``."""
    return b"".join((LABEL_CAS, lv(sn), r, bytes((ref2,)), lv(ref1), h, w, sas, e_a))


def rct3_message(sn: bytes, r: bytes, ref2: int, ref1: bytes, h: bytes, kcv_: bytes,
                 e_a: bytes) -> bytes:
    """``"KLP1-RCT3" || lv(SN) || R || REF2 || lv(REF1) || H || KCV || E_A``."""
    return b"".join((LABEL_RCT3, lv(sn), r, bytes((ref2,)), lv(ref1), h, kcv_, e_a))


# --- derivations -------------------------------------------------------------------------


def derive_keys(sc: Scratch3, e: Buf, peer: bytes, sn: bytes, r: bytes, ref2: int, *,
                authority: bool) -> bytes:
    """Z = ECDH(e, peer), T1 = ECBDIV(Z, "KLP1-T1", lv(SN) || R || E_U || E_A, 256),
    Kenc || Kmac || Ksas = ECBDIV(T1, "KLP1-DL", lv(SN) || R || REF2, 768) into ``sc``.

    ``authority`` says whose ephemeral scalar ``e`` is (e_A, with ``peer`` = E_U; else e_U
    with ``peer`` = E_A). Returns the caller's own ephemeral point. Z and T1 are zeroed as
    soon as the next key is derived. IntegrityError when ``peer`` is not a point on the curve.
    """
    own = ecdh_into(e, peer, sc.z)
    e_u, e_a = (peer, own) if authority else (own, peer)
    ecbdiv_into(sc.z, sc.t1, label=LABEL_T1, context=t1_context(sn, r, e_u, e_a))
    sc.z[:] = _ZERO32
    derive_session(_ECBDIV, sc.t1, sn, r, ref2, sc.session)
    sc.t1[:] = _ZERO32
    return own


# --- the unit: INITIALIZE DOWNLOAD ---------------------------------------------------------


def initialize_response(unit: EcdsaSigner, *, sn: bytes, r: bytes, set_id: bytes,
                        e_u_scalar: Buf, c_u: Certificate) -> InitResponse3:
    """The unit's answer to INITIALIZE DOWNLOAD: E_U from ``e_u_scalar``, sigU by ``unit``.

    The caller keeps R and e_U as its pending challenge (and wipes e_U when it ends).
    """
    e_u = public_point(e_u_scalar)
    sig_u = unit.sign(sig_u_message(sn, r, set_id, e_u))
    return InitResponse3(sn, r, set_id, bytes((SUITE_ECDH,)), e_u, c_u, sig_u)


# --- the authority: EXPORTKEY ----------------------------------------------------------------


def check_export_request(req: ExportRequest3, *, q_ca: bytes,
                         issued: Certificate | None = None) -> None:
    """The authority's 6982 check (docs/protocol.md §10.4): C_U valid (role 02, the set id and
    SN of the request, under ``q_ca``), sigU valid under C_U's key, E_U on the curve.

    ``issued``: the certificate this authority issued to the unit of this set id and SN and
    keeps in its register, while the unit is not revoked. A C_U equal to it in every field
    is that certificate, valid by construction: its signature is not checked again.

    Raises IntegrityError, without saying which failed. The checks before (structure, set,
    suite) and after (revocation, served challenges, REF1, policy) are the authority's.
    """
    base = req.base
    if issued is None or req.c_u != issued:
        verify_certificate(req.c_u, q_ca=q_ca, role=ROLE_UNIT, set_id=base.set_id,
                           subject=base.sn)
    try:
        ecdsa_verify(req.c_u.public_key, req.sig_u,
                     sig_u_message(base.sn, base.r, base.set_id, req.e_u))
    except AuthenticityError:
        raise IntegrityError() from None
    check_point(req.e_u)


class Exported3(NamedTuple):
    """The authority's answer: the E0 content (IMPORTKEY data) and what it records."""

    import_data: bytes
    header: bytes
    kcv: bytes
    e_a: bytes
    sas: bytes


def export_key3(
    req: ExportRequest3,
    *,
    authority: EcdsaSigner,
    c_a: Certificate,
    e_a_scalar: Buf,
    key_type: KeyType,
    key: Buf,
    attributes: KeyAttributes,
    version: int,
    diversify: bool,
    scratch: Scratch3 | None = None,
) -> Exported3:
    """Build the IMPORTKEY data for one unit (docs/protocol.md §10.3). Wipes its buffers.

    ``req`` must have passed :func:`check_export_request` and the authority's registers.
    A key whose length does not fit its type (§3) is never wrapped: PolicyRefused (6986).
    The caller wipes ``e_a_scalar`` afterwards.
    """
    if not length_fits(key_type, len(key)):
        raise PolicyRefused("export policy: the key's length does not fit its type")
    if diversify and not key_type.is_aes:
        raise ValueError("only AES keys can be diversified")
    sc = scratch if scratch is not None else Scratch3()
    sn, r, ref1, ref2 = req.base.sn, req.base.r, req.base.ref1, req.base.ref2
    try:
        e_a = derive_keys(sc, e_a_scalar, req.e_u, sn, r, ref2, authority=True)
        session = memoryview(sc.session)
        kenc, kmac = session[KENC], session[KMAC]
        ta: Buf = key
        if diversify:  # TA' = ECBDIV(TA, "KLP1-TA", lv(SN), 8*len(TA)), in the scratch
            sc.ta = bytearray(len(key))
            diversify_into(_ECBDIV, key, sn, sc.ta)
            ta = sc.ta
        flags = FLAG_DIVERSIFIED if diversify else 0
        h = encode_header(SUITE_ECDH, key_type, len(ta), attributes.usage, attributes.mode,
                          version, attributes.exportability, flags)
        w = aes_kwp_wrap(kenc, ta)
        sas = authority.sign(sas3_message(sn, r, ref2, ref1, h, w, req.e_u, e_a))
        cas = aes_cmac(kmac, cas3_message(sn, r, ref2, ref1, h, w, sas, e_a))
        data = ImportData3(ref1, ref2, h, w, e_a, c_a, sas, cas).encode()
        return Exported3(data, h, kcv(key_type, ta), e_a, sas)
    finally:
        sc.wipe()


# --- the unit: IMPORTKEY -------------------------------------------------------------------


def check_header3(h: bytes) -> KeyHeader:
    """§10.5 step 3: ``H[0] = 01``, ``H[1] = 03``, ``H[10] & FE = 00``, ``H[11] = 00``, else
    Unsupported (6A81). Returns the decoded header."""
    if len(h) != 12 or h[0] != 0x01 or h[1] != SUITE_ECDH or h[10] & 0xFE or h[11]:
        raise Unsupported("header version, suite or reserved bits not supported")
    return KeyHeader.decode(h)


class Opened3(NamedTuple):
    """What the unit stores and answers after a successful IMPORTKEY check."""

    header: KeyHeader
    key: Secret  # TA' in clear: store it with H and REF1, then wipe it
    ref1: bytes
    kcv: bytes
    rct: bytes


def open_import3(
    data: ImportData3,
    *,
    unit: EcdsaSigner,
    sn: bytes,
    r: bytes,
    e_u_scalar: Buf,
    q_ca: bytes,
    set_id: bytes,
    check_slot: Callable[[int, KeyHeader], None],
    scratch: Scratch3 | None = None,
) -> Opened3:
    """Unit steps 3–9 of docs/protocol.md §10.5, then the receipt. Wipes its buffers.

    Step 1 (the pending challenge R and e_U, consumed whatever the outcome) and step 2
    (:meth:`ImportData3.decode`) are the caller's, and so is step 10 (the atomic store).
    ``check_slot(ref2, header)`` is steps 7 and 8: NoSuchSlot (6A88) for a slot that does
    not exist, the slot's policy error (6986); then the rule of §3 for every slot: H[3]
    fits the key type, else PolicyRefused. Raises Unsupported (6A81), AuthenticityError
    (6988) or IntegrityError (6982) as §10.5 orders them. ``set_id`` is the unit's own.
    """
    header = check_header3(data.h)  # 3
    try:  # 4
        verify_certificate(data.c_a, q_ca=q_ca, role=ROLE_AUTHORITY, set_id=set_id)
    except IntegrityError:
        raise AuthenticityError("authority certificate not valid") from None
    sc = scratch if scratch is not None else Scratch3()
    ta_bytes: bytes | None = None
    try:
        e_u = derive_keys(sc, e_u_scalar, data.e_a, sn, r, data.ref2, authority=False)  # 5
        session = memoryview(sc.session)
        kenc, kmac = session[KENC], session[KMAC]
        want = aes_cmac(kmac, cas3_message(sn, r, data.ref2, data.ref1, data.h, data.w,
                                           data.sas, data.e_a))
        if not ct_equal(want, data.cas):  # 5: CAS, before any decryption
            raise IntegrityError()
        try:  # 6
            ecdsa_verify(data.c_a.public_key, data.sas,
                         sas3_message(sn, r, data.ref2, data.ref1, data.h, data.w, e_u,
                                      data.e_a))
        except (AuthenticityError, IntegrityError):
            raise AuthenticityError("SAS not valid for the authority's key") from None
        check_slot(data.ref2, header)  # 7, 8
        if not length_fits(header.key_type, header.key_length):
            raise PolicyRefused("key length does not fit the key type")
        ta_bytes = aes_kwp_unwrap(kenc, data.w)  # 9
        sc.ta = bytearray(ta_bytes)
        scrub(ta_bytes)
        if len(sc.ta) != header.key_length:
            raise IntegrityError()
        check = kcv(header.key_type, sc.ta)
        rct = unit.sign(rct3_message(sn, r, data.ref2, data.ref1, data.h, check, data.e_a))
        return Opened3(header, Secret(sc.ta), data.ref1, check, rct)
    finally:
        sc.wipe()


def verify_receipt3(c_u: Certificate, *, sn: bytes, r: bytes, ref2: int, ref1: bytes,
                    h: bytes, kcv_: bytes, e_a: bytes, rct: bytes) -> None:
    """Raise IntegrityError unless ``rct`` is the unit's receipt for this load.

    Needs no secret: the unit's certificate (itself checked by the caller under Q_CA, as
    recorded with the export) and what the export record keeps.
    """
    if len(e_a) != POINT_LEN:
        raise IntegrityError()
    try:
        ecdsa_verify(c_u.public_key, rct, rct3_message(sn, r, ref2, ref1, h, kcv_, e_a))
    except AuthenticityError:
        raise IntegrityError() from None
