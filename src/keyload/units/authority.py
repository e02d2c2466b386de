"""The authority (AS, first security unit): EXPORTKEY and receipt checks (docs/protocol.md §8).

:class:`Authority` is the role: it parses requests, applies the checks in the order of §8
(TLV 6A80, set id 6A82, suite 6A81, REF1 6A88, export policy 6986 — which includes a key
whose length does not fit its type, §3), records every export (never key material) and
answers. As a card application its :meth:`Authority.process_apdu` never raises: an error
nobody planned for answers 6581 (nothing exported, nothing recorded), logged by its class
name only. The key material and the cryptography sit behind an
:class:`AuthorityBackend` (software keystore here; PKCS#11 token or card elsewhere), which
says what it can do through :meth:`AuthorityBackend.capabilities`.

>>> from keyload.units.keystore import SoftwareKeystore
>>> ks = SoftwareKeystore.ephemeral()
>>> authority = Authority(ks)
>>> sorted(authority.capabilities().suites)
[1, 2]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..core import messages as msg
from ..core.apdu import CommandAPDU, sw_bytes
from ..core.errors import (
    SW,
    ClaNotSupported,
    InsNotSupported,
    IntegrityError,
    PolicyRefused,
    StatusError,
    Unsupported,
    WrongLength,
    WrongP1P2,
)
from ..core.keys import KeyAttributes, KeyType, length_fits
from ..core.klp1 import Exported
from ..core.primitives import ct_equal
from ..records.exportlog import ExportRecord

AID_AUTHORITY = bytes.fromhex("F04B4C50314153")
AID_UNIT = bytes.fromhex("F04B4C50314549")
INS_SELECT, INS_INIT, INS_EXPORT, INS_IMPORT, INS_STATUS = 0xA4, 0x10, 0x12, 0x14, 0x16

log = logging.getLogger("keyload.authority")


@dataclass(frozen=True, slots=True)
class ExportPolicy:
    """Which sets and unit slots may receive a key. ``None`` means any (said explicitly)."""

    sets: frozenset[bytes] | None
    slots: frozenset[int] | None

    def check(self, set_id: bytes, ref2: int) -> None:
        if self.sets is not None and set_id not in self.sets:
            raise PolicyRefused("export policy: set not allowed for this key")
        if self.slots is not None and ref2 not in self.slots:
            raise PolicyRefused("export policy: slot not allowed for this key")

    def to_json(self) -> dict[str, list[str] | list[int] | None]:
        return {"sets": None if self.sets is None else sorted(s.hex() for s in self.sets),
                "slots": None if self.slots is None else sorted(self.slots)}

    @classmethod
    def from_json(cls, d: dict[str, list[str] | list[int] | None]) -> ExportPolicy:
        sets, slots = d.get("sets"), d.get("slots")
        return cls(None if sets is None else frozenset(bytes.fromhex(str(s)) for s in sets),
                   None if slots is None else frozenset(int(x) for x in slots))

    def describe(self) -> str:
        sets = "any set" if self.sets is None else ",".join(sorted(s.hex() for s in self.sets))
        slots = "any slot" if self.slots is None else ",".join(map(str, sorted(self.slots)))
        return f"{sets}; {slots}"


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """An application key's public description (no value)."""

    ref1: bytes
    key_type: KeyType
    length: int
    attrs: KeyAttributes
    version: int
    diversify: bool
    policy: ExportPolicy
    kcv: bytes
    label: str = ""


@dataclass(frozen=True, slots=True)
class SetInfo:
    """A set of units sharing one transport key; ``signed``: SAS is Ed25519 for this set."""

    set_id: bytes
    name: str
    signed: bool = False


@dataclass(frozen=True, slots=True)
class Capabilities:
    suites: frozenset[int]
    ed25519: bool
    backend: str


class ExportLog(Protocol):
    def append(self, record: ExportRecord) -> None: ...


@dataclass
class MemoryExportLog:
    records: list[ExportRecord] = field(default_factory=list)

    def append(self, record: ExportRecord) -> None:
        self.records.append(record)


class AuthorityBackend(Protocol):
    """Where the authority's keys live and its cryptography runs."""

    def capabilities(self) -> Capabilities: ...

    def set_info(self, set_id: bytes) -> SetInfo:
        """Raise UnknownSet (6A82) when there is no transport key for ``set_id``."""
        ...

    def key_info(self, ref1: bytes) -> KeyInfo:
        """Raise NoSuchKey (6A88) when ``ref1`` is unknown."""
        ...

    def export(self, req: msg.ExportRequest) -> Exported:
        """The wrap of docs/protocol.md §4 for an already-checked request."""
        ...

    def receipt(self, suite: int, set_id: bytes, sn: bytes, r: bytes, ref2: int, h: bytes,
                kcv: bytes) -> bytes:
        """The RCT the unit should have answered for this load."""
        ...


class Authority:
    """The authority role over a backend: EXPORTKEY (§8) and receipt verification."""

    def __init__(self, backend: AuthorityBackend, *, log: ExportLog | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.log = log
        self.clock = clock
        self._caps = backend.capabilities()

    def capabilities(self) -> Capabilities:
        return self._caps

    def export(self, request: bytes) -> bytes:
        """EXPORTKEY data in, response data (``E0{…} CD``) out; StatusError on refusal."""
        req = msg.ExportRequest.decode(request)
        return self.export_request(req).encode()

    def export_request(self, req: msg.ExportRequest) -> msg.ExportResponse:
        self.backend.set_info(req.set_id)
        if req.suite not in self._caps.suites:
            offers = ", ".join(f"{s:#04x}" for s in sorted(self._caps.suites))
            raise Unsupported(f"authority does not offer suite {req.suite:#04x} "
                              f"(offers {offers})")
        info = self.backend.key_info(req.ref1)
        if not length_fits(info.key_type, info.length):
            raise PolicyRefused("export policy: the key's length does not fit its type")
        info.policy.check(req.set_id, req.ref2)
        out = self.backend.export(req)
        if self.log is not None:
            self.log.append(ExportRecord(self.clock(), req.set_id, req.sn, req.ref1, req.ref2,
                                         req.suite, info.version, out.kcv))
        return msg.ExportResponse(out.import_data, out.kcv)

    def verify_receipt(self, *, suite: int, set_id: bytes, sn: bytes, r: bytes, ref2: int,
                       h: bytes, kcv: bytes, rct: bytes) -> None:
        """Return None when ``rct`` is the unit's genuine receipt, else raise IntegrityError."""
        want = self.backend.receipt(suite, set_id, sn, r, ref2, h, kcv)
        if not ct_equal(want, rct):
            raise IntegrityError()

    # -- the authority as a card application (SELECT, EXPORTKEY) --------------------
    def process_apdu(self, apdu: bytes) -> bytes:
        """C-APDU in, R-APDU out; never raises (errors become status words, an
        unexpected one 6581)."""
        try:
            cmd = CommandAPDU.decode(apdu)
            if cmd.cla not in (0x00, 0x80):
                raise ClaNotSupported()
            if cmd.ins == INS_SELECT and cmd.cla == 0x00:
                if (cmd.p1, cmd.p2) != (0x04, 0x00):
                    raise WrongP1P2()
                if cmd.data != AID_AUTHORITY:
                    return sw_bytes(0x6A82)
                return sw_bytes(SW.SUCCESS)
            if cmd.ins == INS_EXPORT and cmd.cla == 0x80:
                if (cmd.p1, cmd.p2) != (0, 0):
                    raise WrongP1P2()
                if not cmd.data:
                    raise WrongLength("EXPORTKEY needs data")
                return self.export(cmd.data) + sw_bytes(SW.SUCCESS)
            raise InsNotSupported()
        except StatusError as e:
            return sw_bytes(e.sw)
        except Exception as e:  # no exception leaves the card (docs/protocol.md §6)
            log.error("authority: %s while handling INS %02X; answered 6581",
                      type(e).__name__, apdu[1] if len(apdu) > 1 else 0)
            return sw_bytes(SW.MEMORY_FAILURE)

