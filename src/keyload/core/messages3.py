"""KLP1 suite 0x03 messages (docs/protocol.md §10.2): strict TLV encode/decode with lengths.

Every ``decode`` raises :class:`MalformedData` (6A80) on a structural fault: wrong tags,
order, duplicates, trailing data, a field of the wrong length, or a certificate (E1) that is
not ``E1 { C0 C5 C3 C1 D0 D2 }`` with the lengths of §10.1. Points and signatures are only
measured here; whether they are valid is :mod:`keyload.core.suite3`'s to decide.
"""

from __future__ import annotations

from typing import NamedTuple

from . import tlv
from .ecc import POINT_LEN, SIGNATURE_LEN
from .errors import MalformedData
from .identity import T_CERT, T_E_A, T_E_U, T_SIG_U, Certificate, bounded, fixed
from .messages import (
    EXPORT_TAGS,
    PROTOCOL_VERSION,
    T_CAS,
    T_E0,
    T_H,
    T_KCV,
    T_R,
    T_RCT,
    T_REF1,
    T_REF2,
    T_SAS,
    T_SET,
    T_SN,
    T_STATE,
    T_SUITE,
    T_VERSION,
    T_W,
    ExportRequest,
    ImportResponse,
    SlotStatus,
)

_INIT_TAGS = (T_VERSION, T_SN, T_R, T_SET, T_SUITE, T_E_U, T_CERT, T_SIG_U)
_EXPORT_TAGS = (*EXPORT_TAGS, T_E_U, T_CERT, T_SIG_U)
_IMPORT_TAGS = (T_REF1, T_REF2, T_H, T_W, T_E_A, T_CERT, T_SAS, T_CAS)


def _ref2(v: bytes) -> int:
    if len(v) != 1 or not 1 <= v[0] <= 254:
        raise MalformedData("REF2 must be one byte in 1..254")
    return v[0]


class InitResponse3(NamedTuple):
    """INITIALIZE DOWNLOAD response, suite 0x03: ``C0 C1 C2 C3 C4 D3 E1 D5``."""

    sn: bytes
    r: bytes
    set_id: bytes
    suites: bytes
    e_u: bytes
    c_u: Certificate
    sig_u: bytes

    def encode(self) -> bytes:
        return tlv.encode([(T_VERSION, bytes((PROTOCOL_VERSION,))), (T_SN, self.sn),
                           (T_R, self.r), (T_SET, self.set_id), (T_SUITE, self.suites),
                           (T_E_U, self.e_u)]) + self.c_u.encode() + tlv.tlv(T_SIG_U, self.sig_u)

    @classmethod
    def decode(cls, data: bytes) -> InitResponse3:
        v, sn, r, set_id, suites, e_u, cert, sig_u = tlv.decode(data, _INIT_TAGS)
        if v != bytes((PROTOCOL_VERSION,)):
            raise MalformedData("protocol version must be 01")
        if not suites:
            raise MalformedData("no suite listed")
        return cls(bounded(sn, "SN"), fixed(r, 16, "R"), fixed(set_id, 5, "set id"), suites,
                   fixed(e_u, POINT_LEN, "E_U"), Certificate.decode_value(cert),
                   fixed(sig_u, SIGNATURE_LEN, "sigU"))


class ExportRequest3(NamedTuple):
    """EXPORTKEY command data, suite 0x03: ``C1 C2 C3 C4 C6 C7 D3 E1 D5``: the fields of
    section 5 (``base``, checked as there), then E_U, C_U and sigU."""

    base: ExportRequest
    e_u: bytes
    c_u: Certificate
    sig_u: bytes

    def encode(self) -> bytes:
        return self.base.encode() + tlv.tlv(T_E_U, self.e_u) + self.c_u.encode() + \
            tlv.tlv(T_SIG_U, self.sig_u)

    @classmethod
    def decode(cls, data: bytes) -> ExportRequest3:
        return cls.from_values(tlv.decode(data, _EXPORT_TAGS))

    @classmethod
    def from_values(cls, values: list[bytes]) -> ExportRequest3:
        """The request from the values of its nine TLVs, each checked (MalformedData)."""
        sn, r, set_id, suite, ref1, ref2, e_u, cert, sig_u = values
        return cls(ExportRequest.from_values(sn, r, set_id, suite, ref1, ref2),
                   fixed(e_u, POINT_LEN, "E_U"), Certificate.decode_value(cert),
                   fixed(sig_u, SIGNATURE_LEN, "sigU"))


def decode_export_request(data: bytes) -> ExportRequest | ExportRequest3:
    """EXPORTKEY data of either shape (docs/protocol.md §10.4, first check): the tags of
    section 5 or those of §10.2, with their lengths, else MalformedData (6A80).

    Which shape fits which set and suite (6A81) is the authority's next check.
    """
    req = ExportRequest.decode_valid(data)  # the section-5 shape, by offsets: the common case
    if req is not None:
        return req
    items = tlv.iter_tlv(data)  # split once
    if len(items) == len(_EXPORT_TAGS) and items[6][0] == T_E_U:
        return ExportRequest3.from_values(tlv.values_of(items, _EXPORT_TAGS))
    return ExportRequest.decode(data)  # its exact error


class ImportData3(NamedTuple):
    """IMPORTKEY data, suite 0x03, also the content of E0: ``C6 C7 C8 C9 D4 E1 CA CB``.

    Lengths (§10.5 step 2): C6 1–32, C7 one byte in 1–254, C8 12, C9 any, D4 65, E1 as in
    §10.1, CA 64, CB 16.
    """

    ref1: bytes
    ref2: int
    h: bytes
    w: bytes
    e_a: bytes
    c_a: Certificate
    sas: bytes
    cas: bytes

    def encode(self) -> bytes:
        return tlv.encode([(T_REF1, self.ref1), (T_REF2, bytes((self.ref2,))), (T_H, self.h),
                           (T_W, self.w), (T_E_A, self.e_a)]) + self.c_a.encode() + \
            tlv.encode([(T_SAS, self.sas), (T_CAS, self.cas)])

    @classmethod
    def decode(cls, data: bytes) -> ImportData3:
        ref1, ref2, h, w, e_a, cert, sas, cas = tlv.decode(data, _IMPORT_TAGS)
        return cls(bounded(ref1, "REF1"), _ref2(ref2), fixed(h, 12, "H"), w,
                   fixed(e_a, POINT_LEN, "E_A"), Certificate.decode_value(cert),
                   fixed(sas, SIGNATURE_LEN, "SAS"), fixed(cas, 16, "CAS"))


class ExportResponse3(NamedTuple):
    """EXPORTKEY response data, suite 0x03: ``E0{C6 C7 C8 C9 D4 E1 CA CB} CD``."""

    import_data: bytes  # the content of E0, sent as it stands in IMPORTKEY
    kcv: bytes

    def encode(self) -> bytes:
        return tlv.tlv(T_E0, self.import_data) + tlv.tlv(T_KCV, self.kcv)

    @classmethod
    def decode(cls, data: bytes) -> ExportResponse3:
        e0, kcv = tlv.decode(data, (T_E0, T_KCV))
        ImportData3.decode(e0)
        return cls(e0, fixed(kcv, 5, "KCV"))


class ImportResponse3(ImportResponse):
    """IMPORTKEY response data, suite 0x03: ``CD CF`` (CF the unit's 64-byte ECDSA receipt)."""

    __slots__ = ()

    @classmethod
    def decode(cls, data: bytes) -> ImportResponse3:
        kcv, rct = tlv.decode(data, (T_KCV, T_RCT))
        return cls(fixed(kcv, 5, "KCV"), fixed(rct, SIGNATURE_LEN, "RCT"))


class SlotStatus3(NamedTuple):
    """GET SLOT STATUS response for a key loaded by suite 0x03: ``C7 CE C8 CD C6``.

    Slots that are empty, locked or loaded by another suite answer :class:`SlotStatus`.
    """

    ref2: int
    state: int
    h: bytes
    kcv: bytes
    ref1: bytes

    def encode(self) -> bytes:
        return tlv.encode([(T_REF2, bytes((self.ref2,))), (T_STATE, bytes((self.state,))),
                           (T_H, self.h), (T_KCV, self.kcv), (T_REF1, self.ref1)])

    @classmethod
    def decode(cls, data: bytes) -> SlotStatus3:
        ref2, state, h, kcv, ref1 = tlv.decode(data, (T_REF2, T_STATE, T_H, T_KCV, T_REF1))
        plain = SlotStatus.decode(tlv.encode([(T_REF2, ref2), (T_STATE, state), (T_H, h),
                                              (T_KCV, kcv)]))
        return cls(plain.ref2, plain.state, fixed(h, 12, "H"), fixed(kcv, 5, "KCV"),
                   bounded(ref1, "REF1"))
