"""The unit (EI, second security unit) emulator: a card application speaking KLP1 APDUs.

Commands (docs/protocol.md §5): SELECT, INITIALIZE DOWNLOAD, IMPORTKEY, GET SLOT STATUS; a
unit of an identity set (suite 0x03, §10) also GENERATE UNIT KEY and PUT CERTIFICATE, and
holds d_U, C_U and Q_CA instead of T (its d_U sealed with the other unit secrets). Each
INS goes to a handler that raises a status-word error; :meth:`Unit.process_apdu` turns it
into the SW at the boundary and never raises: an error nobody planned for (a bug, a store
failing in an unforeseen way) answers 6581, "nothing was stored" (§6), and is logged by its
class name only. IMPORTKEY runs the checks of §7 (suite 0x03: §10.5) in order;
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
from ..core import tlv
from ..core.aids import (
    AID_UNIT,
    INS_GENERATE_KEY,
    INS_IMPORT,
    INS_INIT,
    INS_PUT_CERTIFICATE,
    INS_SELECT,
    INS_STATUS,
)
from ..core.apdu import CommandAPDU, sw_bytes
from ..core.ecc import EcdsaKey, public_point, scalar_from
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
    Unsupported,
    WrongLength,
    WrongP1P2,
)
from ..core.identity import (
    T_PUBLIC,
    Certificate,
    PutCertificate,
    check_enrolment,
    identity_set_id,
)
from ..core.keys import KeyHeader, aes_kcv
from ..core.klp1 import Scratch, open_import
from ..core.messages3 import ImportData3, ImportResponse3, SlotStatus3
from ..core.secret import Secret
from ..core.suite3 import SUITE_ECDH, Scratch3, initialize_response, open_import3
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
    ref1: bytes | None = None  # recorded with a key loaded by suite 0x03 (§10.5 step 10)

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
    """Everything a unit keeps in non-volatile memory.

    A unit of a T set holds T (suites 0x01/0x02). A unit of an identity set (suite 0x03)
    holds no T: its key d_U once generated, then C_U and Q_CA once enrolled; its set id is
    that of Q_CA (or, for a unit given only its certificate, the certificate's C3).
    """

    sn: bytes
    t: Secret | None
    slots: dict[int, Slot]
    verify_key: bytes | None = None
    suites: tuple[int, ...] = (0x01, 0x02)
    set_id: bytes = b""
    unit_key: Secret | None = field(default=None, repr=False)
    certificate: bytes | None = None
    q_ca: bytes | None = None

    def __post_init__(self) -> None:
        msg.check_sn(self.sn)
        if self.t is None:
            self.suites = (SUITE_ECDH,)
            self.set_id = self._identity_set_id()
        elif len(self.t) != 32:
            raise ValueError("T is AES-256 (32 bytes)")
        for ref2, s in self.slots.items():
            msg.check_ref2(ref2)
            if s.ref2 != ref2:
                raise ValueError("slot number mismatch")
        if self.verify_key is not None and len(self.verify_key) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")
        if self.t is not None:
            for suite_id in self.suites:
                get_suite(suite_id)
            self.set_id = aes_kcv(self.t.buffer)

    def _identity_set_id(self) -> bytes:
        if self.unit_key is not None and len(self.unit_key) != 32:
            raise ValueError("a P-256 private key is 32 bytes")
        if self.q_ca is not None:
            return identity_set_id(self.q_ca)
        if self.certificate is not None:
            return Certificate.decode(self.certificate).set_id
        return b""

    @property
    def identity(self) -> bool:
        """A unit of an identity set (suite 0x03, no T)."""
        return self.t is None

    @classmethod
    def new(cls, sn: bytes, t: Secret, slots: dict[int, Slot], *,
            verify_key: bytes | None = None,
            suites: tuple[int, ...] = (0x01, 0x02)) -> UnitState:
        return cls(sn, t, slots, verify_key, suites)

    @classmethod
    def new_identity(cls, sn: bytes, slots: dict[int, Slot], *,
                     unit_key: Secret | None = None, certificate: bytes | None = None,
                     q_ca: bytes | None = None) -> UnitState:
        """A unit of an identity set: no key yet (it makes d_U on GENERATE UNIT KEY), or the
        given state (conformance vectors)."""
        return cls(sn, None, slots, unit_key=unit_key, certificate=certificate, q_ca=q_ca)

    def to_packed(self) -> tuple[dict[str, Any], list[Secret]]:
        secrets = [] if self.t is None else [self.t]
        slots = []
        for s in sorted(self.slots.values(), key=lambda x: x.ref2):
            d: dict[str, Any] = {"ref2": s.ref2, "accepts": sorted(s.accepts),
                                 "locked": s.locked, "header": None, "kcv": None, "key": None}
            if s.header is not None and s.key is not None and s.kcv is not None:
                d.update(header=s.header.hex(), kcv=s.kcv.hex(), key=len(secrets))
                secrets.append(s.key)
            if s.ref1 is not None:
                d["ref1"] = s.ref1.hex()
            slots.append(d)
        meta = {"format": "keyload-unit-1", "sn": self.sn.hex(),
                "t": None if self.t is None else 0,
                "verify_key": None if self.verify_key is None else self.verify_key.hex(),
                "suites": list(self.suites), "slots": slots}
        if self.identity:
            meta["unit_key"] = None
            if self.unit_key is not None:
                meta["unit_key"] = len(secrets)
                secrets.append(self.unit_key)
            meta["certificate"] = None if self.certificate is None else self.certificate.hex()
            meta["q_ca"] = None if self.q_ca is None else self.q_ca.hex()
        return meta, secrets

    @classmethod
    def from_packed(cls, meta: dict[str, Any], secrets: list[Secret]) -> UnitState:
        slots = {}
        for d in meta["slots"]:
            key = None if d["key"] is None else secrets[d["key"]]
            slots[d["ref2"]] = Slot(
                d["ref2"], frozenset(d["accepts"]), bool(d["locked"]),
                None if d["header"] is None else bytes.fromhex(d["header"]),
                None if d["kcv"] is None else bytes.fromhex(d["kcv"]), key,
                None if d.get("ref1") is None else bytes.fromhex(d["ref1"]))
        vk = meta["verify_key"]
        if meta["t"] is None:
            uk, cert, q_ca = meta["unit_key"], meta["certificate"], meta["q_ca"]
            return cls.new_identity(
                bytes.fromhex(meta["sn"]), slots,
                unit_key=None if uk is None else secrets[uk],
                certificate=None if cert is None else bytes.fromhex(cert),
                q_ca=None if q_ca is None else bytes.fromhex(q_ca))
        return cls(bytes.fromhex(meta["sn"]), secrets[meta["t"]], slots,
                   None if vk is None else bytes.fromhex(vk), tuple(meta["suites"]))


class SlotStore(Protocol):
    """A unit's non-volatile memory."""

    def load(self) -> UnitState: ...

    def commit(self, state: UnitState, slot: Slot) -> None:
        """Make ``slot`` part of the stored state atomically, or raise (nothing changed)."""
        ...

    def commit_identity(self, state: UnitState) -> None:
        """Store ``state``'s d_U, C_U and Q_CA atomically, or raise (nothing changed)."""
        ...


class MemoryUnitStore:
    """Volatile store for tests and benchmarks."""

    def __init__(self, state: UnitState) -> None:
        self.state = state

    def load(self) -> UnitState:
        return self.state

    def commit(self, state: UnitState, slot: Slot) -> None:
        return None

    def commit_identity(self, state: UnitState) -> None:
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

    def commit_identity(self, state: UnitState) -> None:
        try:
            self._write(state, state.slots)
        except OSError as e:
            raise MemoryFailure(f"identity write failed ({e.strerror})") from None


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
        # suite 0x03: e_U goes with R (volatile, wiped when the challenge ends)
        self._pending_e: bytearray | None = None
        self._taken_e: bytearray | None = None
        self._signer: EcdsaKey | None = None
        self._scratch = Scratch()
        self._scratch3 = Scratch3()
        self._handlers: dict[tuple[int, int], Callable[[CommandAPDU], bytes]] = {
            (0x00, INS_SELECT): self._select,
            (0x80, INS_INIT): self._init,
            (0x80, INS_IMPORT): self._import,
            (0x80, INS_STATUS): self._status,
            (0x80, INS_GENERATE_KEY): self._generate_key,
            (0x80, INS_PUT_CERTIFICATE): self._put_certificate,
        }

    @property
    def sn(self) -> bytes:
        return self.state.sn

    def set_challenge(self, r: bytes | None, e_u: bytes | None = None) -> None:
        """Force the pending challenge (conformance vectors); None clears it. A unit of an
        identity set takes its ephemeral scalar e_U with it."""
        self._set_pending(r, None if e_u is None else bytearray(e_u))

    def _set_pending(self, r: bytes | None, e_u: bytearray | None) -> None:
        """The new pending challenge; the old e_U is wiped (a newer challenge replaces it)."""
        _wipe(self._pending_e)
        self._pending, self._pending_e = r, e_u

    @property
    def pending(self) -> bytes | None:
        return self._pending

    def reset(self) -> None:
        """Power cycle: volatile state (the pending challenge) is lost."""
        self._set_pending(None, None)

    def process_apdu(self, apdu: bytes) -> bytes:
        """C-APDU in, R-APDU out; never raises (errors become status words).

        Any command with the IMPORTKEY INS ends the pending challenge (docs/protocol.md §7
        step 1), one refused for its encoding (a wrong Lc: 6700) as well. An unexpected
        error answers 6581: the slots change only after a successful commit, so nothing
        was stored."""
        if len(apdu) >= 2 and apdu[1] == INS_IMPORT:
            self._taken, self._pending = self._pending, None
            self._taken_e, self._pending_e = self._pending_e, None
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
        finally:  # e_U of a challenge an IMPORTKEY took never outlives the command
            _wipe(self._taken_e)
            self._taken_e = None

    # -- handlers: each returns response data or raises a StatusError -----------
    def _select(self, cmd: CommandAPDU) -> bytes:
        if (cmd.p1, cmd.p2) != (0x04, 0x00):
            raise WrongP1P2()
        self._set_pending(None, None)  # any SELECT leaves the download, and its challenge
        if cmd.data != AID_UNIT:
            raise StatusError("application not found", sw=SW.UNKNOWN_SET)
        return b""

    def _init(self, cmd: CommandAPDU) -> bytes:
        _no_data(cmd, "INITIALIZE DOWNLOAD")
        st = self.state
        if st.identity and st.certificate is None:
            raise NoChallenge("the unit holds no certificate (enrol it first)")
        r = self.rng(16)
        if len(r) != 16:
            raise MemoryFailure("random generator failed")
        if not st.identity:
            self._set_pending(r, None)
            return msg.InitResponse(st.sn, r, st.set_id, bytes(st.suites)).encode()
        e_u = scalar_from(self.rng)
        try:
            resp = initialize_response(self._unit_signer(), sn=st.sn, r=r, set_id=st.set_id,
                                       e_u_scalar=e_u, c_u=Certificate.decode(st.certificate
                                                                             or b""))
        except BaseException:
            _wipe(e_u)
            raise
        self._set_pending(r, e_u)
        return resp.encode()

    def _unit_signer(self) -> EcdsaKey:
        if self._signer is None:
            if self.state.unit_key is None:
                raise NoChallenge("the unit has no key")
            self._signer = EcdsaKey(self.state.unit_key.buffer)
        return self._signer

    def _import(self, cmd: CommandAPDU) -> bytes:
        # 1. a pending challenge, consumed whatever happens next (by process_apdu)
        r, self._taken = self._taken, None
        if r is None:
            raise NoChallenge("no pending challenge (out of order, or replay)")
        if (cmd.p1, cmd.p2) != (0, 0):
            raise WrongP1P2()
        if self.state.identity:
            return self.import_key3(cmd.data, r, self._taken_e)
        return self.import_key(cmd.data, r)

    def import_key(self, data: bytes, r: bytes) -> bytes:
        """Steps 2–9 of docs/protocol.md §7 with challenge ``r``; returns ``CD CF``."""
        st = self.state
        if st.t is None:
            raise Unsupported("a unit of an identity set speaks suite 0x03 only")
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
        new = Slot(slot.ref2, slot.accepts, slot.locked, d.h, opened.kcv, opened.key)
        return self._store(slot, new, msg.ImportResponse(opened.kcv, opened.rct).encode())

    def _store(self, old: Slot, new: Slot, response: bytes) -> bytes:
        """Commit ``new`` in place of ``old`` atomically and answer ``response``; a failed
        write wipes the new key and changes nothing."""
        try:
            self.store.commit(self.state, new)
        except BaseException:
            if new.key is not None:
                new.key.wipe()
            raise
        self.state.slots[old.ref2] = new
        if old.key is not None:
            old.key.wipe()
        return response

    def import_key3(self, data: bytes, r: bytes, e_u: bytearray | None) -> bytes:
        """Steps 2–10 of docs/protocol.md §10.5 with challenge (``r``, ``e_u``); returns
        ``CD CF``. The caller wipes ``e_u``."""
        st = self.state
        if e_u is None or st.q_ca is None:
            raise NoChallenge("no pending challenge")
        d = ImportData3.decode(data)  # 2

        def check_slot(ref2: int, h: KeyHeader) -> None:  # 7, 8
            slot = st.slots.get(ref2)
            if slot is None:
                raise NoSuchSlot(f"no slot {ref2}")
            slot.check_policy(h)

        opened = open_import3(d, unit=self._unit_signer(), sn=st.sn, r=r, e_u_scalar=e_u,
                              q_ca=st.q_ca, set_id=st.set_id, check_slot=check_slot,
                              scratch=self._scratch3)  # 3–9
        old = st.slots[d.ref2]  # 10
        new = Slot(old.ref2, old.accepts, old.locked, d.h, opened.kcv, opened.key, d.ref1)
        return self._store(old, new, ImportResponse3(opened.kcv, opened.rct).encode())

    # -- enrolment (§10.2) ---------------------------------------------------------
    def _generate_key(self, cmd: CommandAPDU) -> bytes:
        _no_data(cmd, "GENERATE UNIT KEY")
        st = self.state
        if not st.identity:
            raise NoChallenge("a unit of a T set has no identity to enrol")
        if st.unit_key is not None:
            raise NoChallenge("the unit already has its key")
        d_u = Secret.take(bytes(scalar_from(self.rng)))
        q_u = public_point(d_u.buffer)
        try:
            self.store.commit_identity(replace(st, slots=st.slots, unit_key=d_u))
        except BaseException:
            d_u.wipe()
            raise
        st.unit_key = d_u
        return tlv.tlv(T_PUBLIC, q_u)

    def _put_certificate(self, cmd: CommandAPDU) -> bytes:
        if (cmd.p1, cmd.p2) != (0, 0):
            raise WrongP1P2()
        st = self.state
        if not st.identity:
            raise NoChallenge("a unit of a T set has no identity to enrol")
        if st.unit_key is None or st.certificate is not None:
            raise NoChallenge("no key generated, or a certificate already put")
        put = PutCertificate.decode(cmd.data)
        check_enrolment(put, sn=st.sn, q_u=self._unit_signer().public)
        cert = put.certificate.encode()
        self.store.commit_identity(replace(st, slots=st.slots, certificate=cert,
                                           q_ca=put.q_ca))
        st.certificate, st.q_ca = cert, put.q_ca
        st.set_id = identity_set_id(put.q_ca)
        return b""

    def _status(self, cmd: CommandAPDU) -> bytes:
        if cmd.p1 != 0 or not 1 <= cmd.p2 <= 254:
            raise WrongP1P2()
        if cmd.data:
            raise WrongLength("GET SLOT STATUS takes no data")
        return self.slot_status(cmd.p2).encode()

    def slot_status(self, ref2: int) -> msg.SlotStatus | SlotStatus3:
        """The slot's state, H and KCV; REF1 too for a key loaded by suite 0x03 (§10.2)."""
        slot = self.state.slots.get(ref2)
        if slot is None:
            raise NoSuchSlot(f"no slot {ref2}")
        if slot.ref1 is not None and slot.header is not None and slot.kcv is not None:
            return SlotStatus3(ref2, slot.state, slot.header, slot.kcv, slot.ref1)
        return msg.SlotStatus(ref2, slot.state, slot.header, slot.kcv)

    def close(self) -> None:
        self._scratch.wipe()
        self._scratch3.wipe()
        self._set_pending(None, None)
        if self._signer is not None:
            self._signer.wipe()
        for secret in (self.state.t, self.state.unit_key):
            if secret is not None:
                secret.wipe()
        for s in self.state.slots.values():
            if s.key is not None:
                s.key.wipe()


def _no_data(cmd: CommandAPDU, name: str) -> None:
    """P1 P2 ``00 00`` and no data, else 6A86 or 6700."""
    if (cmd.p1, cmd.p2) != (0, 0):
        raise WrongP1P2()
    if cmd.data:
        raise WrongLength(f"{name} takes no data")


def _wipe(buf: bytearray | None) -> None:
    if buf is not None:
        buf[:] = bytes(len(buf))


__all__ = ["FileUnitStore", "MalformedData", "MemoryUnitStore", "Slot", "SlotStore", "Unit",
           "UnitState", "open_unit_vault"]
