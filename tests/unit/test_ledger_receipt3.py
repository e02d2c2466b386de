"""The ledger's one suite-0x03 receipt check, :func:`verify_receipt3` (docs/protocol.md
§10.3), on a real download between the software authority and an emulated unit of an
identity set: each field the receipt covers, E_A and C_U changed one at a time; and
:func:`verify_entries` with the authority or with an auditor's Q_CA alone."""

from __future__ import annotations

import dataclasses

import pytest

from keyload.core import tlv
from keyload.core.aids import INS_GENERATE_KEY, INS_PUT_CERTIFICATE
from keyload.core.apdu import ResponseAPDU, encode_command
from keyload.core.identity import T_PUBLIC, PutCertificate
from keyload.core.keys import KeyAttributes, KeyType
from keyload.core.secret import Secret
from keyload.records.ledger import (
    CertificatesOnly,
    LedgerEntry,
    verify_entries,
    verify_receipt3,
)
from keyload.station.load import AuthorityClient, LoadResult, UnitClient, load_key, load_key3
from keyload.transports.local import LocalConnection
from keyload.units.authority import Authority, ExportPolicy
from keyload.units.keystore import SoftwareKeystore
from keyload.units.unit import MemoryUnitStore, Slot, Unit, UnitState

SLOTS = {1: Slot(1, frozenset({KeyType.AES256}))}


def _apdu(unit: Unit, ins: int, data: bytes = b"") -> bytes:
    return ResponseAPDU.decode(unit.process_apdu(encode_command(0x80, ins, 0, 0, data,
                                                                256))).check()


class World:
    """An authority with an identity set and a transport-key set, a unit of each."""

    def __init__(self) -> None:
        self.ks = SoftwareKeystore.ephemeral()
        self.set_id = self.ks.generate_identity_set("plant", authority_id=b"AS").set_id
        self.q_ca = self.ks.identity_set(self.set_id).q_ca
        self.other = self.ks.generate_identity_set("other", authority_id=b"AS").set_id
        self.t_set = self.ks.generate_set("plain").set_id
        self.ks.add_key(b"K1", KeyType.AES256, Secret(bytes(range(32))),
                        KeyAttributes("K0", "B", "E"), version=1, diversify=False,
                        policy=ExportPolicy(None, None))
        self.authority = Authority(self.ks)

    def unit(self, sn: bytes, set_id: bytes | None = None) -> Unit:
        """Enrolled: GENERATE UNIT KEY, the authority certifies, PUT CERTIFICATE."""
        set_id = set_id or self.set_id
        unit = Unit(MemoryUnitStore(UnitState.new_identity(sn, dict(SLOTS))))
        (q_u,) = tlv.decode(_apdu(unit, INS_GENERATE_KEY), (T_PUBLIC,))
        cert = self.ks.certify_unit(set_id, sn, q_u)
        _apdu(unit, INS_PUT_CERTIFICATE,
              PutCertificate(cert, self.ks.identity_set(set_id).q_ca).encode())
        return unit

    def load3(self, unit: Unit) -> LoadResult:
        return load_key3(UnitClient(LocalConnection(unit)),
                         AuthorityClient(LocalConnection(self.authority)), b"K1", 1)


def entry(res: LoadResult) -> LedgerEntry:
    return LedgerEntry("campaign", 0.0, res.ref1, res.key_version, res.suite, res.set_id,
                       res.sn, res.r, res.ref2, res.header, res.kcv, res.rct, campaign="c",
                       e_a=res.e_a, c_u=res.c_u)


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture(scope="module")
def loaded(world: World) -> tuple[LedgerEntry, LedgerEntry]:
    """One unit's suite-0x03 entry, and another unit's (its own E_A and C_U)."""
    return entry(world.load3(world.unit(b"SN-1"))), entry(world.load3(world.unit(b"SN-2")))


def test_a_genuine_receipt_verifies_with_or_without_q_ca(
        world: World, loaded: tuple[LedgerEntry, LedgerEntry]) -> None:
    e, _ = loaded
    assert e.suite == 3 and e.rct is not None and len(e.rct) == 64
    assert verify_receipt3(e, q_ca=world.q_ca)
    assert verify_receipt3(e)  # without Q_CA: the key of C_U signed, C_U not checked
    assert not verify_receipt3(e, q_ca=world.ks.identity_set(world.other).q_ca)


@pytest.mark.parametrize("change", [
    {"sn": b"SN-3"}, {"r": bytes(16)}, {"ref2": 2}, {"ref1": b"K2"}, {"kcv": bytes(5)},
    {"header": bytes(12)}, {"rct": bytes(64)}, {"e_a": None}, {"c_u": None},
    {"set_id": bytes(5)},
], ids=lambda c: next(iter(c)))
def test_any_field_changed_fails(world: World, loaded: tuple[LedgerEntry, LedgerEntry],
                                 change: dict[str, object]) -> None:
    e, _ = loaded
    assert not verify_receipt3(dataclasses.replace(e, **change), q_ca=world.q_ca)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["e_a", "c_u", "rct"])
def test_another_downloads_genuine_value_fails(
        world: World, loaded: tuple[LedgerEntry, LedgerEntry], field: str) -> None:
    e, other = loaded
    assert not verify_receipt3(dataclasses.replace(e, **{field: getattr(other, field)}),
                               q_ca=world.q_ca)


def test_a_certificate_of_another_set_fails_under_the_sets_q_ca(world: World) -> None:
    """The unit of another identity set signed its receipt: genuine for its own C_U, not
    for a ledger entry of this set."""
    e = entry(world.load3(world.unit(b"SN-9", world.other)))
    assert verify_receipt3(e, q_ca=world.ks.identity_set(world.other).q_ca)
    assert not verify_receipt3(dataclasses.replace(e, set_id=world.set_id), q_ca=world.q_ca)


def test_verify_entries_with_the_authority_and_with_an_auditor(
        world: World, loaded: tuple[LedgerEntry, LedgerEntry]) -> None:
    plain = Unit(MemoryUnitStore(UnitState.new(b"T-1", world.ks.transport_key_copy(
        world.t_set), dict(SLOTS))))
    mac = load_key(UnitClient(LocalConnection(plain)),
                   AuthorityClient(LocalConnection(world.authority)), b"K1", 1)
    entries = [*loaded, entry(mac)]
    chk = verify_entries(entries, world.authority)
    assert (chk.verified, chk.invalid, chk.unverifiable) == (3, 0, 0)
    auditor = CertificatesOnly({world.set_id: world.q_ca})
    chk = verify_entries(entries, auditor)
    assert (chk.verified, chk.invalid, chk.unverifiable) == (2, 0, 1)
    chk = verify_entries(entries, CertificatesOnly({}))  # no Q_CA for the set
    assert (chk.verified, chk.invalid, chk.unverifiable) == (0, 2, 1)
    assert all("no Q_CA known" in i.reason for i in chk.invalid_entries)
    tampered = dataclasses.replace(loaded[0], e_a=loaded[1].e_a)
    chk = verify_entries([tampered, loaded[1]], auditor)
    assert (chk.verified, chk.invalid) == (1, 1)
    assert chk.invalid_entries[0].entry is tampered


def test_an_auditor_refuses_a_q_ca_that_is_not_the_sets(world: World) -> None:
    with pytest.raises(ValueError, match="is not the key of set"):
        CertificatesOnly({world.set_id: world.ks.identity_set(world.other).q_ca})
