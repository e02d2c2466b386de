"""One KLP1 download: SELECT, INITIALIZE DOWNLOAD, EXPORTKEY, IMPORTKEY (docs/protocol.md §5).

The status word is checked in one place (:meth:`ResponseAPDU.check`) and becomes a typed
error; :class:`LoadFailed` says at which step, on which side, and keeps that error.

>>> from keyload.core.keys import KeyAttributes, KeyType
>>> from keyload.transports.local import LocalConnection
>>> from keyload.units.authority import Authority, ExportPolicy
>>> from keyload.units.keystore import SoftwareKeystore
>>> from keyload.units.unit import MemoryUnitStore, Slot, Unit, UnitState
>>> ks = SoftwareKeystore.ephemeral()
>>> set_id = ks.generate_set("A").set_id
>>> _ = ks.generate_key(b"TMK", KeyType.AES256, KeyAttributes("K0", "B", "E"), version=1,
...                     diversify=False, policy=ExportPolicy(None, None))
>>> unit = Unit(MemoryUnitStore(UnitState.new(b"SN-1", ks.transport_key_copy(set_id),
...                                           {1: Slot(1, frozenset({KeyType.AES256}))})))
>>> station = AuthorityClient(LocalConnection(Authority(ks)))
>>> res = load_key(UnitClient(LocalConnection(unit)), station, b"TMK", 1)
>>> res.sn, res.ref2, res.key_version, res.kcv == unit.state.slots[1].kcv
(b'SN-1', 1, 1, True)
>>> try:  # the same version again: the unit refuses, nothing changes
...     load_key(UnitClient(LocalConnection(unit)), station, b"TMK", 1)
... except LoadFailed as e:
...     print(e.step, f"{e.sw:04X}")
unit IMPORTKEY 6986
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Any, NamedTuple, TypeVar

from ..core import messages as msg
from ..core import messages3 as msg3
from ..core import tlv
from ..core.aids import AID_AUTHORITY, AID_UNIT, INS_EXPORT, INS_IMPORT, INS_INIT, INS_STATUS
from ..core.apdu import ResponseAPDU, encode_command
from ..core.errors import KcvMismatch, KeyloadError, StatusError, Unsupported
from ..core.keys import KeyHeader
from ..core.primitives import ct_equal
from ..core.ref1 import display_ref1
from ..core.suite3 import SUITE_ECDH
from ..core.suites import PREFERENCE
from ..transports import Connection


class Step(StrEnum):
    """Where a download failed; the value is the text reports and journals carry."""

    OPEN_UNIT = "open unit"
    UNIT_UNREACHABLE = "unit not reachable"
    UNIT_STATUS = "unit GET SLOT STATUS"
    UNIT_INIT = "unit INITIALIZE DOWNLOAD"
    SUITE = "suite negotiation"
    EXPORT = "authority EXPORTKEY"
    IMPORT = "unit IMPORTKEY"
    KCV = "KCV check"


class LoadFailed(KeyloadError):
    """A download failed at ``step``; ``cause`` is the typed error (with its SW if any)."""

    def __init__(self, step: Step | str, cause: KeyloadError, *,
                 sn: bytes | None = None) -> None:
        self.step = Step(step)
        self.cause = cause
        self.sn = sn  # known once INITIALIZE DOWNLOAD has answered
        super().__init__(f"{step}: {cause}")

    @property
    def sw(self) -> int | None:
        return self.cause.code if isinstance(self.cause, StatusError) else None

    @property
    def reason(self) -> str:
        if isinstance(self.cause, StatusError):
            return self.cause.detail
        return str(self.cause)


# What each status word means on each side (docs/protocol.md §6), for operators' messages.
UNIT_MEANING = {
    0x6A80: "malformed data",
    0x6A81: "suite or header version not supported by the unit",
    0x6A88: "the unit has no such slot (REF2)",
    0x6982: "integrity check failed (CAS, unwrap or length; or data meant for another unit, "
            "set or challenge)",
    0x6985: "no pending challenge (out of order, or replay)",
    0x6986: "slot policy refuses (slot locked, key type not accepted, key length not "
            "fitting its type, or key version not higher than the loaded one)",
    0x6988: "authenticity check failed (SAS wrong, or a symmetric SAS sent to a unit that "
            "requires the authority's signature)",
    0x6581: "memory failure in the unit: nothing was stored",
}
AUTHORITY_MEANING = {
    0x6A80: "malformed request",
    0x6A81: "suite not offered by the authority",
    0x6A82: "the authority holds no transport key for this set",
    0x6A88: "the authority holds no key with this REF1",
    0x6986: "export policy refuses (set or slot not allowed for this key, or a key "
            "whose length does not fit its type)",
    0x6581: "the authority could not record the export, or failed: nothing was sent",
}


def _check(rapdu: bytes, meanings: dict[int, str]) -> bytes:
    if rapdu[-2:] == b"\x90\x00":  # fast path: success
        return rapdu[:-2]
    r = ResponseAPDU.decode(rapdu)
    return r.check(meanings.get(r.sw, ""))


def _select(conn: Connection, aid: bytes) -> None:
    _check(conn.transmit(encode_command(0x00, 0xA4, 0x04, 0x00, aid)), {
        0x6A82: "application not found on the card"})


def _ne(data: bytes) -> int:
    return 256 if len(data) <= 255 else 65536


class UnitClient:
    """The station's side of a unit: typed calls over a connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def select(self) -> None:
        _select(self.conn, AID_UNIT)

    def _call(self, ins: int, data: bytes = b"", *, p2: int = 0, ne: int = 256) -> bytes:
        """One command to the unit; its answer's data, or the typed error of its SW."""
        return _check(self.conn.transmit(encode_command(0x80, ins, 0, p2, data, ne)),
                      UNIT_MEANING)

    def initialize(self) -> msg.InitResponse:
        return msg.InitResponse.decode(self._call(INS_INIT))

    def import_key(self, data: bytes) -> msg.ImportResponse:
        return msg.ImportResponse.decode(self._call(INS_IMPORT, data, ne=_ne(data)))

    def initialize3(self) -> msg3.InitResponse3:
        """INITIALIZE DOWNLOAD of a unit of an identity set (suite 0x03, §10.3)."""
        return msg3.InitResponse3.decode(self._call(INS_INIT, ne=65536))

    def import_key3(self, data: bytes) -> msg3.ImportResponse3:
        return msg3.ImportResponse3.decode(self._call(INS_IMPORT, data, ne=_ne(data)))

    def slot_status3(self, ref2: int) -> msg.SlotStatus | msg3.SlotStatus3:
        """GET SLOT STATUS of a unit of an identity set: a slot loaded by suite 0x03
        answers its REF1 too (``SlotStatus3``), any other as in suites 0x01/0x02."""
        msg.check_ref2(ref2)
        data = self._call(INS_STATUS, p2=ref2)
        if len(tlv.iter_tlv(data)) == len(msg3.SlotStatus3._fields):
            return msg3.SlotStatus3.decode(data)
        return msg.SlotStatus.decode(data)

    def slot_status(self, ref2: int) -> msg.SlotStatus:
        msg.check_ref2(ref2)
        return msg.SlotStatus.decode(self._call(INS_STATUS, p2=ref2))


class AuthorityClient:
    """The station's side of an authority. ``suites``: what it offers, when known."""

    def __init__(self, conn: Connection, *, suites: frozenset[int] | None = None,
                 select: bool = True) -> None:
        self.conn = conn
        self.suites = suites
        if select:
            _select(conn, AID_AUTHORITY)

    def export(self, req: msg.ExportRequest) -> msg.ExportResponse:
        data = req.encode()
        r = self.conn.transmit(encode_command(0x80, INS_EXPORT, 0, 0, data, _ne(data)))
        return msg.ExportResponse.decode(_check(r, AUTHORITY_MEANING))

    def export3(self, req: msg3.ExportRequest3) -> msg3.ExportResponse3:
        data = req.encode()
        r = self.conn.transmit(encode_command(0x80, INS_EXPORT, 0, 0, data, 65536))
        return msg3.ExportResponse3.decode(_check(r, AUTHORITY_MEANING))


class LoadResult(NamedTuple):
    """A successful download, with the evidence the authority can check later."""

    sn: bytes
    set_id: bytes
    ref1: bytes
    ref2: int
    suite: int
    r: bytes
    header: bytes
    kcv: bytes
    rct: bytes
    # suite 0x03 (docs/protocol.md §10.3): the authority's E_A and the unit's encoded C_U,
    # what anyone verifies the ECDSA receipt with; None for the other suites
    e_a: bytes | None = None
    c_u: bytes | None = None
    # a BDK's load: the initial key ID of the IK delivered (docs/protocol.md Appendix D)
    initial_key_id: bytes | None = None

    @property
    def key_version(self) -> int:
        return KeyHeader.decode(self.header).version

    def to_json(self) -> dict[str, Any]:
        """The load as ``keyload load --json`` prints it (never key material)."""
        return {"sn": self.sn.hex(), "set_id": self.set_id.hex(),
                "ref1": display_ref1(self.ref1), "ref2": self.ref2, "suite": self.suite,
                "key_version": self.key_version, "kcv": self.kcv.hex().upper(),
                "receipt": self.rct.hex(),
                **({} if self.initial_key_id is None else
                   {"initial_key_id": self.initial_key_id.hex().upper()})}

    def told(self, where: str = "") -> str:
        """The load for people, ``where`` (`` in reader …``) after its slot; a BDK's
        load names the initial key it delivered."""
        what = display_ref1(self.ref1)
        if self.initial_key_id is not None:
            what = f"the initial key {self.initial_key_id.hex().upper()} of BDK {what}"
        return (f"loaded {what} v{self.key_version} into unit "
                f"{self.sn.hex()} slot {self.ref2}{where}: KCV {self.kcv.hex().upper()} "
                "(authority and unit agree)")


def _step(step: Step, e: KeyloadError, sn: bytes | None = None) -> LoadFailed:
    return LoadFailed(step, e, sn=sn)


ExportHook = Callable[[msg.InitResponse | msg3.InitResponse3, int, msg.ExportResponse], None]
"""``on_export(init, suite, response)``: after EXPORTKEY, before IMPORTKEY (a journal
records the export there: R, and H and the KCV of the response); if it raises, nothing is
sent to the unit."""


Init = TypeVar("Init", msg.InitResponse, msg3.InitResponse3)
Imported = TypeVar("Imported", bound=msg.ImportResponse)


def _initialized(unit: UnitClient, ref1: bytes, ref2: int, select: bool,
                 initialize: Callable[[], Init]) -> Init:
    """REF1 and REF2 checked, then SELECT and INITIALIZE DOWNLOAD."""
    msg.check_ref1(ref1)
    msg.check_ref2(ref2)
    try:
        if select:
            unit.select()
        return initialize()
    except KeyloadError as e:
        raise _step(Step.UNIT_INIT, e) from None


def _imported(import_key: Callable[[bytes], Imported], data: bytes, kcv: bytes,
              sn: bytes) -> Imported:
    """IMPORTKEY, and the unit's KCV checked against the authority's."""
    try:
        ans = import_key(data)
    except KeyloadError as e:
        raise _step(Step.IMPORT, e, sn) from None
    if not ct_equal(ans.kcv, kcv):
        raise _step(Step.KCV, KcvMismatch("the unit's KCV differs from the authority's"), sn)
    return ans


def load_key(unit: UnitClient, authority: AuthorityClient, ref1: bytes, ref2: int, *,
             select: bool = True, on_export: ExportHook | None = None) -> LoadResult:
    """Load key REF1 of the authority into slot REF2 of the unit; raise LoadFailed.

    ``on_export`` (:data:`ExportHook`) runs after EXPORTKEY and before IMPORTKEY.
    """
    init = _initialized(unit, ref1, ref2, select, unit.initialize)
    candidates = [s for s in PREFERENCE if s in init.suites and
                  (authority.suites is None or s in authority.suites)]
    if not candidates:
        raise _step(Step.SUITE, Unsupported("no suite in common between unit and "
                                                     "authority"), init.sn)
    resp: msg.ExportResponse | None = None
    suite = candidates[0]
    for suite in candidates:  # with an authority of unknown suites, 6A81 moves on
        try:
            resp = authority.export(msg.ExportRequest(init.sn, init.r, init.set_id, suite,
                                                      ref1, ref2))
            break
        except Unsupported as e:
            if authority.suites is not None or suite == candidates[-1]:
                raise _step(Step.EXPORT, e, init.sn) from None
        except KeyloadError as e:
            raise _step(Step.EXPORT, e, init.sn) from None
    assert resp is not None
    if on_export is not None:
        on_export(init, suite, resp)
    ans = _imported(unit.import_key, resp.import_data, resp.kcv, init.sn)
    header = resp.header or msg.ImportData.decode(resp.import_data).h
    return LoadResult(init.sn, init.set_id, ref1, ref2, suite, init.r, header, ans.kcv, ans.rct)


def load_key3(unit: UnitClient, authority: AuthorityClient, ref1: bytes, ref2: int, *,
              select: bool = True, on_export: ExportHook | None = None) -> LoadResult:
    """Load key REF1 into slot REF2 of a unit of an identity set (suite 0x03, §10.3): the
    unit's E_U, C_U and signature to the authority, its E0 back to the unit; the receipt is
    the unit's ECDSA signature, kept with E_A and C_U. Raise LoadFailed. ``on_export`` as
    in :func:`load_key`."""
    init = _initialized(unit, ref1, ref2, select, unit.initialize3)
    try:
        resp = authority.export3(msg3.ExportRequest3(
            msg.ExportRequest(init.sn, init.r, init.set_id, SUITE_ECDH, ref1, ref2),
            init.e_u, init.c_u, init.sig_u))
        data = msg3.ImportData3.decode(resp.import_data)
    except KeyloadError as e:
        raise _step(Step.EXPORT, e, init.sn) from None
    if on_export is not None:
        on_export(init, SUITE_ECDH, msg.ExportResponse(resp.import_data, resp.kcv, data.h))
    ans = _imported(unit.import_key3, resp.import_data, resp.kcv, init.sn)
    return LoadResult(init.sn, init.set_id, ref1, ref2, SUITE_ECDH, init.r, data.h, ans.kcv,
                      ans.rct, e_a=data.e_a, c_u=init.c_u.encode())
