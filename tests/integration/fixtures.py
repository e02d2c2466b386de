"""Small builders for protocol tests: an ephemeral authority, in-memory units, a station."""

from __future__ import annotations

from dataclasses import dataclass, field

from keyload.core.keys import KeyAttributes, KeyType
from keyload.core.secret import Secret
from keyload.station.load import AuthorityClient, UnitClient
from keyload.transports.local import LocalConnection
from keyload.units.authority import Authority, ExportPolicy, MemoryExportLog
from keyload.units.keystore import SoftwareKeystore
from keyload.units.unit import MemoryUnitStore, Slot, Unit, UnitState


@dataclass
class Recorder:
    """A connection that keeps every C-APDU it carried (a curious station)."""

    inner: LocalConnection
    sent: list[bytes] = field(default_factory=list)

    def transmit(self, apdu: bytes) -> bytes:
        self.sent.append(apdu)
        return self.inner.transmit(apdu)


@dataclass
class World:
    ks: SoftwareKeystore
    authority: Authority
    log: MemoryExportLog
    set_a: bytes
    set_b: bytes
    signed_set: bytes

    def client(self) -> AuthorityClient:
        return AuthorityClient(LocalConnection(self.authority),
                               suites=self.authority.capabilities().suites)

    def unit(self, sn: bytes, set_id: bytes | None = None, *,
             slots: dict[int, Slot] | None = None, verify_key: bytes | None = None,
             suites: tuple[int, ...] = (1, 2)) -> Unit:
        t = self.ks.transport_key_copy(set_id or self.set_a)
        if slots is None:
            slots = {1: Slot(1, frozenset({KeyType.AES256})),
                     2: Slot(2, frozenset({KeyType.HMAC_SHA256})),
                     3: Slot(3, frozenset({KeyType.AES128}), locked=True),
                     4: Slot(4, frozenset({KeyType.AES128}))}
        return Unit(MemoryUnitStore(UnitState.new(sn, t, dict(slots), verify_key=verify_key,
                                                  suites=suites)))


def make_world() -> World:
    ks = SoftwareKeystore.ephemeral()
    ks.set_signing_key()
    a = ks.generate_set("A").set_id
    b = ks.generate_set("B").set_id
    signed = ks.generate_set("S", signed=True).set_id
    anyp = ExportPolicy(None, None)
    ks.generate_key(b"AES", KeyType.AES256, KeyAttributes("K0", "B", "E"), version=5,
                    diversify=False, policy=anyp)
    ks.generate_key(b"DIV", KeyType.AES256, KeyAttributes("K0", "B", "E"), version=1,
                    diversify=True, policy=anyp)
    ks.generate_key(b"MAC", KeyType.HMAC_SHA256, KeyAttributes("M7", "C", "N"), version=1,
                    diversify=False, policy=anyp, length=64)
    ks.generate_key(b"A128", KeyType.AES128, KeyAttributes("P0", "E", "N"), version=1,
                    diversify=False, policy=anyp)
    ks.generate_key(b"ONLY-B-SLOT1", KeyType.AES256, KeyAttributes("K0", "B", "E"), version=1,
                    diversify=False, policy=ExportPolicy(frozenset({b}), frozenset({1})))
    log = MemoryExportLog()
    return World(ks, Authority(ks, log=log), log, a, b, signed)


def slots_snapshot(unit: Unit) -> list[tuple[int, bytes | None, bytes | None, bytes | None]]:
    return [(s.ref2, s.header, s.kcv, None if s.key is None else bytes(s.key.buffer))
            for s in sorted(unit.state.slots.values(), key=lambda s: s.ref2)]


def unit_client(unit: Unit) -> UnitClient:
    return UnitClient(LocalConnection(unit))


__all__ = ["Secret"]
