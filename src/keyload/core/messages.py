"""KLP1 messages (docs/protocol.md §5): strict TLV encode/decode with length checks.

Each ``decode`` raises :class:`MalformedData` (6A80) on any structural fault: wrong
tags, order, duplicates, trailing data, or a field of the wrong length.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, TypeVar

from . import tlv
from .errors import MalformedData

PROTOCOL_VERSION = 0x01

T_VERSION, T_SN, T_R, T_SET, T_SUITE = 0xC0, 0xC1, 0xC2, 0xC3, 0xC4
T_REF1, T_REF2, T_H, T_W, T_SAS, T_CAS = 0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xCB
T_KCV, T_STATE, T_RCT, T_E0 = 0xCD, 0xCE, 0xCF, 0xE0

SLOT_EMPTY, SLOT_LOADED, SLOT_LOCKED = 0x00, 0x01, 0x02

T = TypeVar("T")


def check_sn(sn: bytes) -> bytes:
    """A caller's SN: 1 to 32 bytes, else ``ValueError`` (a caller mistake, not 6A80)."""
    if not 1 <= len(sn) <= 32:
        raise ValueError("SN must be 1 to 32 bytes")
    return sn


def check_ref1(ref1: bytes) -> bytes:
    """A caller's REF1: 1 to 32 bytes, else ``ValueError``."""
    if not 1 <= len(ref1) <= 32:
        raise ValueError("REF1 must be 1 to 32 bytes")
    return ref1


def check_ref2(ref2: int) -> int:
    """A caller's REF2: 1..254, else ``ValueError``."""
    if not 1 <= ref2 <= 254:
        raise ValueError("REF2 must be in 1..254")
    return ref2


def _field(check: Callable[[T], T], value: T) -> T:
    """``check`` applied to a field of a message: its ValueError is :class:`MalformedData`."""
    try:
        return check(value)
    except ValueError as e:
        raise MalformedData(str(e)) from None


def _ref2(v: bytes) -> int:
    if len(v) != 1:
        raise MalformedData("REF2 must be one byte")
    return _field(check_ref2, v[0])


def _fixed(v: bytes, n: int, what: str) -> bytes:
    if len(v) != n:
        raise MalformedData(f"{what} must be {n} bytes")
    return v


class InitResponse(NamedTuple):
    """INITIALIZE DOWNLOAD response: ``C0 C1 C2 C3 C4``."""

    sn: bytes
    r: bytes
    set_id: bytes
    suites: bytes
    version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return tlv.encode([(T_VERSION, bytes((self.version,))), (T_SN, self.sn), (T_R, self.r),
                           (T_SET, self.set_id), (T_SUITE, self.suites)])

    @classmethod
    def decode(cls, data: bytes) -> InitResponse:
        v, sn, r, set_id, suites = tlv.decode(data, (T_VERSION, T_SN, T_R, T_SET, T_SUITE))
        if v != bytes((PROTOCOL_VERSION,)):
            raise MalformedData("protocol version must be 01")
        if not suites:
            raise MalformedData("no suite listed")
        if 0 < len(sn) <= 32 and len(r) == 16 and len(set_id) == 5:
            return cls(sn, r, set_id, suites)
        return cls(_field(check_sn, sn), _fixed(r, 16, "R"), _fixed(set_id, 5, "set id"),
                   suites)


EXPORT_TAGS = (T_SN, T_R, T_SET, T_SUITE, T_REF1, T_REF2)


class ExportRequest(NamedTuple):
    """EXPORTKEY command data: ``C1 C2 C3 C4 C6 C7``."""

    sn: bytes
    r: bytes
    set_id: bytes
    suite: int
    ref1: bytes
    ref2: int

    def encode(self) -> bytes:
        return tlv.encode(zip(EXPORT_TAGS, (self.sn, self.r, self.set_id, bytes((self.suite,)),
                                            self.ref1, bytes((self.ref2,))), strict=True))

    @classmethod
    def decode(cls, data: bytes) -> ExportRequest:
        req = cls.decode_valid(data)
        if req is not None:
            return req
        return cls.from_values(*tlv.decode(data, EXPORT_TAGS))  # the exact error, if any

    @classmethod
    def decode_valid(cls, data: bytes) -> ExportRequest | None:
        """The request when ``data`` is a valid one, else None, read by offsets: C1 ls SN,
        C2 10 R, C3 05 set, C4 01 suite, C6 lr REF1, C7 01 REF2, every length valid. That
        is every request :meth:`decode` accepts (each field is shorter than 128 bytes, so
        all lengths are one byte); for the rest, :meth:`decode` gives the exact error."""
        n = len(data)
        if n >= 36 and data[0] == T_SN and 0 < data[1] <= 32:
            a = 2 + data[1]
            if (n >= a + 33 and data[a] == T_R and data[a + 1] == 16 and data[a + 18] == T_SET
                    and data[a + 19] == 5 and data[a + 25] == T_SUITE and data[a + 26] == 1
                    and data[a + 28] == T_REF1 and 0 < data[a + 29] <= 32):
                b = a + 30 + data[a + 29]
                if (b + 3 == n and data[b] == T_REF2 and data[b + 1] == 1
                        and 0 < data[b + 2] < 255):
                    return cls(data[2:a], data[a + 2:a + 18], data[a + 20:a + 25],
                               data[a + 27], data[a + 30:b], data[b + 2])
        return None

    @classmethod
    def from_values(cls, sn: bytes, r: bytes, set_id: bytes, suite: bytes, ref1: bytes,
                    ref2: bytes) -> ExportRequest:
        """The request from the values of its six TLVs, each length checked (MalformedData)."""
        if (0 < len(sn) <= 32 and len(r) == 16 and len(set_id) == 5 and len(suite) == 1
                and 0 < len(ref1) <= 32 and len(ref2) == 1 and 0 < ref2[0] < 255):
            return cls(sn, r, set_id, suite[0], ref1, ref2[0])  # fast path: all valid
        return cls(_field(check_sn, sn), _fixed(r, 16, "R"), _fixed(set_id, 5, "set id"),
                   _fixed(suite, 1, "suite id")[0], _field(check_ref1, ref1), _ref2(ref2))


class ImportData(NamedTuple):
    """IMPORTKEY command data, also the content of E0: ``C7 C8 C9 CA CB``."""

    ref2: int
    h: bytes
    w: bytes
    sas: bytes
    cas: bytes

    def encode(self) -> bytes:
        return tlv.encode([(T_REF2, bytes((self.ref2,))), (T_H, self.h), (T_W, self.w),
                           (T_SAS, self.sas), (T_CAS, self.cas)])

    @classmethod
    def decode(cls, data: bytes) -> ImportData:
        ref2, h, w, sas, cas = tlv.decode(data, (T_REF2, T_H, T_W, T_SAS, T_CAS))
        if len(ref2) == 1 and 0 < ref2[0] < 255 and len(h) == 12 and len(cas) == 16:
            return cls(ref2[0], h, w, sas, cas)  # fast path: all valid
        return cls(_ref2(ref2), _fixed(h, 12, "H"), w, sas, _fixed(cas, 16, "CAS"))


class ExportResponse(NamedTuple):
    """EXPORTKEY response data: ``E0{C7 C8 C9 CA CB} CD``."""

    import_data: bytes  # the content of E0, sent as it stands in IMPORTKEY
    kcv: bytes
    header: bytes = b""  # H, as found in E0 by decode (not part of the encoding)

    def encode(self) -> bytes:
        return encode_export_response(self.import_data, self.kcv)

    @classmethod
    def decode(cls, data: bytes) -> ExportResponse:
        e0, kcv = tlv.decode(data, (T_E0, T_KCV))
        return cls(e0, _fixed(kcv, 5, "KCV"), ImportData.decode(e0).h)


def encode_export_response(import_data: bytes, kcv: bytes) -> bytes:
    """``E0{import_data} CD{kcv}``: ExportResponse(import_data, kcv).encode() without the
    tuple (the authority's hot path)."""
    if len(import_data) < 0x80 and len(kcv) < 0x80:
        return b"\xe0%c%s\xcd%c%s" % (len(import_data), import_data, len(kcv), kcv)
    return tlv.tlv(T_E0, import_data) + tlv.tlv(T_KCV, kcv)


class ImportResponse(NamedTuple):
    """IMPORTKEY response data: ``CD CF``."""

    kcv: bytes
    rct: bytes

    def encode(self) -> bytes:
        return tlv.encode([(T_KCV, self.kcv), (T_RCT, self.rct)])

    @classmethod
    def decode(cls, data: bytes) -> ImportResponse:
        kcv, rct = tlv.decode(data, (T_KCV, T_RCT))
        if len(kcv) == 5 and len(rct) == 16:
            return cls(kcv, rct)
        return cls(_fixed(kcv, 5, "KCV"), _fixed(rct, 16, "RCT"))


class SlotStatus(NamedTuple):
    """GET SLOT STATUS response: ``C7 CE [C8 CD]``."""

    ref2: int
    state: int
    h: bytes | None = None
    kcv: bytes | None = None

    def encode(self) -> bytes:
        items = [(T_REF2, bytes((self.ref2,))), (T_STATE, bytes((self.state,)))]
        if self.h is not None and self.kcv is not None:
            items += [(T_H, self.h), (T_KCV, self.kcv)]
        return tlv.encode(items)

    @classmethod
    def decode(cls, data: bytes) -> SlotStatus:
        items = tlv.iter_tlv(data)
        if len(items) == 2:
            ref2, state = tlv.decode(data, (T_REF2, T_STATE))
            h = kcv = None
        else:
            ref2, state, h, kcv = tlv.decode(data, (T_REF2, T_STATE, T_H, T_KCV))
            _fixed(h, 12, "H")
            _fixed(kcv, 5, "KCV")
        st = _fixed(state, 1, "slot state")[0]
        if st not in (SLOT_EMPTY, SLOT_LOADED, SLOT_LOCKED):
            raise MalformedData("unknown slot state")
        if (st == SLOT_LOADED and h is None) or (st == SLOT_EMPTY and h is not None):
            raise MalformedData("H and KCV go with a loaded slot, and only with one")
        return cls(_ref2(ref2), st, h, kcv)
