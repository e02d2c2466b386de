"""The unit (EI, second security unit) emulator: a card application speaking KLP1 APDUs.

Commands (docs/protocol.md §5): SELECT, INITIALIZE DOWNLOAD, IMPORTKEY, GET SLOT STATUS. Each
INS goes to a handler that raises a status-word error; :meth:`Unit.process_apdu` turns it
into the SW at the boundary and never raises: an error nobody planned for (a bug, a store
failing in an unforeseen way) answers 6581, "nothing was stored" (§6), and is logged by its
class name only. IMPORTKEY runs the checks of §7 in order;
the pending challenge is single use (any IMPORTKEY consumes it). Slots are committed
through a :class:`SlotStore` atomically: the in-memory state changes only after the store
has accepted the new slot, so a failed write (6581) changes nothing.

>>> import os
>>> from keyload.core.secret import Secret
>>> unit = Unit(MemoryUnitStore(UnitState.new(b"SN-1", Secret(os.urandom(32)),
...                                           {1: Slot(1, frozenset({3}))})))
>>> unit.process_apdu(bytes.fromhex("8016000100")).hex()
'c70101ce01009000'
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from ..core import messages as msg
from ..core.aids import AID_UNIT, INS_IMPORT, INS_INIT, INS_SELECT, INS_STATUS
from ..core.apdu import CommandAPDU, sw_bytes
from ..core.errors import (
    SW,
    ClaNotSupported,
    DamagedStore,
    InsNotSupported,
    MalformedData,
    MemoryFailure,
    NoChallenge,
    NoSuchSlot,
    PolicyRefused,
    StatusError,
    WrongLength,
    WrongP1P2,
)
from ..core.keys import KeyHeader, aes_kcv
from ..core.klp1 import Scratch, open_import
from ..core.secret import Secret
from ..core.suites import SUITES, get_suite
from .storage import KekSource, Vault

UNIT_KIND = "unit"

log = logging.getLogger("keyload.unit")


@dataclass(frozen=True)
class Slot:
    """One key slot: its policy (accepted key types, locked) and what it holds."""

    ref2: int
    accepts: frozenset[int]
    locked: bool = False
    header: bytes | None = None
    kcv: bytes | None = None
    key: Secret | None = field(default=None, compare=False, repr=False)

    @property
    def version(self) -> int | None:
        return None if self.header is None else KeyHeader.decode(self.header).version

    @property
    def state(self) -> int:
        if self.locked:
            return msg.SLOT_LOCKED
        return msg.SLOT_EMPTY if self.header is None else msg.SLOT_LOADED

    def check_policy(self, h: KeyHeader) -> None:
        """docs/protocol.md §7 step 6 on the authenticated header, this slot's part, else 6986
        (the length rule of §3, the same for every slot, is checked by ``open_import``)."""
        if self.locked:
            raise PolicyRefused("slot is locked")
        if h.key_type not in self.accepts:
            raise PolicyRefused("key type not accepted by this slot")
        v = self.version
        if v is not None and h.version <= v:
            raise PolicyRefused("key version not higher than the loaded one")


@dataclass
class UnitState:
    """Everything a unit keeps in non-volatile memory."""

    sn: bytes
    t: Secret
    slots: dict[int, Slot]
    verify_key: bytes | None = None
    suites: tuple[int, ...] = (0x01, 0x02)
    set_id: bytes = b""

    def __post_init__(self) -> None:
        msg.check_sn(self.sn)
        if len(self.t) != 32:
            raise ValueError("T is AES-256 (32 bytes)")
        for ref2, s in self.slots.items():
            msg.check_ref2(ref2)
            if s.ref2 != ref2:
                raise ValueError("slot number mismatch")
        if self.verify_key is not None and len(self.verify_key) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")
        for suite_id in self.suites:
            get_suite(suite_id)
        self.set_id = aes_kcv(self.t.buffer)

    @classmethod
    def new(cls, sn: bytes, t: Secret, slots: dict[int, Slot], *,
            verify_key: bytes | None = None,
            suites: tuple[int, ...] = (0x01, 0x02)) -> UnitState:
        return cls(sn, t, slots, verify_key, suites)

    def to_packed(self) -> tuple[dict[str, Any], list[Secret]]:
        secrets = [self.t]
        slots = []
        for s in sorted(self.slots.values(), key=lambda x: x.ref2):
            d: dict[str, Any] = {"ref2": s.ref2, "accepts": sorted(s.accepts),
                                 "locked": s.locked, "header": None, "kcv": None, "key": None}
            if s.header is not None and s.key is not None and s.kcv is not None:
                d.update(header=s.header.hex(), kcv=s.kcv.hex(), key=len(secrets))
                secrets.append(s.key)
            slots.append(d)
        meta = {"format": "keyload-unit-1", "sn": self.sn.hex(), "t": 0,
                "verify_key": None if self.verify_key is None else self.verify_key.hex(),
                "suites": list(self.suites), "slots": slots}
        return meta, secrets

    @classmethod
    def from_packed(cls, meta: dict[str, Any], secrets: list[Secret]) -> UnitState:
        slots = {}
        for d in meta["slots"]:
            key = None if d["key"] is None else secrets[d["key"]]
            slots[d["ref2"]] = Slot(
                d["ref2"], frozenset(d["accepts"]), bool(d["locked"]),
                None if d["header"] is None else bytes.fromhex(d["header"]),
                None if d["kcv"] is None else bytes.fromhex(d["kcv"]), key)
        vk = meta["verify_key"]
        return cls(bytes.fromhex(meta["sn"]), secrets[meta["t"]], slots,
                   None if vk is None else bytes.fromhex(vk), tuple(meta["suites"]))


class SlotStore(Protocol):
    """A unit's non-volatile memory."""

    def load(self) -> UnitState: ...

    def commit(self, state: UnitState, slot: Slot) -> None:
        """Make ``slot`` part of the stored state atomically, or raise (nothing changed)."""
        ...


class MemoryUnitStore:
    """Volatile store for tests and benchmarks."""

    def __init__(self, state: UnitState) -> None:
        self.state = state

    def load(self) -> UnitState:
        return self.state

    def commit(self, state: UnitState, slot: Slot) -> None:
        return None


class FileUnitStore:
    """One sealed file per unit in a vault directory; every commit rewrites it atomically."""

    def __init__(self, vault: Vault, filename: str) -> None:
        self.vault = vault
        self.filename = filename

    @staticmethod
    def filename_for(sn: bytes) -> str:
        return f"{sn.hex()}.unit"

    @classmethod
    def create(cls, vault: Vault, state: UnitState) -> FileUnitStore:
        name = cls.filename_for(state.sn)
        if (vault.directory / name).exists():
            raise ValueError(f"unit {state.sn.hex()} already exists")
        store = cls(vault, name)
        store._write(state, state.slots)
        return store

    def load(self) -> UnitState:
        meta, secrets = self.vault.read_packed(self.filename, UNIT_KIND)
        try:
            return UnitState.from_packed(meta, secrets)
        except (KeyError, ValueError, TypeError, IndexError):
            raise DamagedStore(f"unit file {self.filename} is damaged") from None

    def _write(self, state: UnitState, slots: dict[int, Slot]) -> None:
        meta, secrets = replace(state, slots=slots).to_packed()
        self.vault.write_packed(self.filename, UNIT_KIND, meta, secrets)

    def commit(self, state: UnitState, slot: Slot) -> None:
        try:
            self._write(state, {**state.slots, slot.ref2: slot})
        except OSError as e:
            raise MemoryFailure(f"slot write failed ({e.strerror})") from None


def open_unit_vault(directory: Path, source: KekSource | None = None) -> Vault:
    """Open (or create) the vault that holds emulated units' files."""
    if Vault.exists(directory):
        return Vault.open(directory, source)
    return Vault.create(directory, source)


class Unit:
    """The unit application: APDUs in, APDUs out (docs/protocol.md §5–§7)."""

    def __init__(self, store: SlotStore, *, rng: Callable[[int], bytes] = os.urandom) -> None:
        self.store = store
        self.state = store.load()
        self.rng = rng
        self._pending: bytes | None = None
        self._taken: bytes | None = None  # the challenge an IMPORTKEY took (§7 step 1)
        self._scratch = Scratch()
        self._handlers: dict[tuple[int, int], Callable[[CommandAPDU], bytes]] = {
            (0x00, INS_SELECT): self._select,
            (0x80, INS_INIT): self._init,
            (0x80, INS_IMPORT): self._import,
            (0x80, INS_STATUS): self._status,
        }

    @property
    def sn(self) -> bytes:
        return self.state.sn

    def set_challenge(self, r: bytes | None) -> None:
        """Force the pending challenge (conformance vectors); None clears it."""
        self._pending = r

    @property
    def pending(self) -> bytes | None:
        return self._pending

    def reset(self) -> None:
        """Power cycle: volatile state (the pending challenge) is lost."""
        self._pending = None

    def process_apdu(self, apdu: bytes) -> bytes:
        """C-APDU in, R-APDU out; never raises (errors become status words).

        Any command with the IMPORTKEY INS ends the pending challenge (docs/protocol.md §7
        step 1), one refused for its encoding (a wrong Lc: 6700) as well. An unexpected
        error answers 6581: the slots change only after a successful commit, so nothing
        was stored."""
        if len(apdu) >= 2 and apdu[1] == INS_IMPORT:
            self._taken, self._pending = self._pending, None
        try:
            cmd = CommandAPDU.decode(apdu)
            handler = self._handlers.get((cmd.cla, cmd.ins))
            if handler is None:
                if cmd.cla not in (0x00, 0x80):
                    raise ClaNotSupported()
                raise InsNotSupported()
            return handler(cmd) + b"\x90\x00"
        except StatusError as e:
            return sw_bytes(e.sw)
        except Exception as e:  # no exception leaves the card (docs/protocol.md §6)
            log.error("unit: %s while handling INS %02X; answered 6581", type(e).__name__,
                      apdu[1] if len(apdu) > 1 else 0)
            return sw_bytes(SW.MEMORY_FAILURE)

    # -- handlers: each returns response data or raises a StatusError -----------
    def _select(self, cmd: CommandAPDU) -> bytes:
        if (cmd.p1, cmd.p2) != (0x04, 0x00):
            raise WrongP1P2()
        self._pending = None  # any SELECT leaves the download: its challenge goes with it
        if cmd.data != AID_UNIT:
            raise StatusError("application not found", sw=SW.UNKNOWN_SET)
        return b""

    def _init(self, cmd: CommandAPDU) -> bytes:
        if (cmd.p1, cmd.p2) != (0, 0):
            raise WrongP1P2()
        if cmd.data:
            raise WrongLength("INITIALIZE DOWNLOAD takes no data")
        r = self.rng(16)
        if len(r) != 16:
            raise MemoryFailure("random generator failed")
        self._pending = r
        st = self.state
        return msg.InitResponse(st.sn, r, st.set_id, bytes(st.suites)).encode()

    def _import(self, cmd: CommandAPDU) -> bytes:
        # 1. a pending challenge, consumed whatever happens next (by process_apdu)
        r, self._taken = self._taken, None
        if r is None:
            raise NoChallenge("no pending challenge (out of order, or replay)")
        if (cmd.p1, cmd.p2) != (0, 0):
            raise WrongP1P2()
        return self.import_key(cmd.data, r)

    def import_key(self, data: bytes, r: bytes) -> bytes:
        """Steps 2–9 of docs/protocol.md §7 with challenge ``r``; returns ``CD CF``."""
        st = self.state
        # 2. TLV structure, order and lengths
        d = msg.ImportData.decode(data)
        # 3. the slot exists
        slot = st.slots.get(d.ref2)
        if slot is None:
            raise NoSuchSlot(f"no slot {d.ref2}")
        # 4. header version and suite
        h = KeyHeader.decode(d.h)
        h.check_supported(st.suites)
        suite = SUITES[h.suite]
        # 5–8. CAS, slot policy, unwrap, SAS
        opened = open_import(suite, st.t.buffer, st.sn, r, d, h, check_policy=slot.check_policy,
                             verify_key=st.verify_key, scratch=self._scratch)
        # 9. store atomically; nothing after the commit can fail
        try:
            new = Slot(slot.ref2, slot.accepts, slot.locked, d.h, opened.kcv, opened.key)
            response = msg.ImportResponse(opened.kcv, opened.rct).encode()
            self.store.commit(st, new)
        except BaseException:
            opened.key.wipe()
            raise
        st.slots[slot.ref2] = new
        if slot.key is not None:
            slot.key.wipe()
        return response

    def _status(self, cmd: CommandAPDU) -> bytes:
        if cmd.p1 != 0 or not 1 <= cmd.p2 <= 254:
            raise WrongP1P2()
        if cmd.data:
            raise WrongLength("GET SLOT STATUS takes no data")
        return self.slot_status(cmd.p2).encode()

    def slot_status(self, ref2: int) -> msg.SlotStatus:
        slot = self.state.slots.get(ref2)
        if slot is None:
            raise NoSuchSlot(f"no slot {ref2}")
        return msg.SlotStatus(ref2, slot.state, slot.header, slot.kcv)

    def close(self) -> None:
        self._scratch.wipe()
        self.state.t.wipe()
        for s in self.state.slots.values():
            if s.key is not None:
                s.key.wipe()


__all__ = ["FileUnitStore", "MalformedData", "MemoryUnitStore", "Slot", "SlotStore", "Unit",
           "UnitState", "open_unit_vault"]
