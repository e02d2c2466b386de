"""A BDK's load between the real roles, in process (docs/protocol.md Appendix D): the
authority delivers the unit's AES DUKPT initial key (the X9.24-3 supplement's IK) on the
station's order, records its initial key ID, and refuses a BDK without an order (6986,
as an authority reached by APDUs only, a card, does), a BDK over suite 0x03, an order for
another key, and a BDK that could be exported; the ledger binds the ID to the export."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from tests.conftest import VECTORS
from tests.unit.test_suite3_roles import EXPORT, World, tx

from keyload.core import messages as msg
from keyload.core.apdu import CommandAPDU, ResponseAPDU
from keyload.core.dukpt import InitialKeyId, InitialKeyOrder
from keyload.core.errors import PolicyRefused
from keyload.core.keys import KeyAttributes, KeyHeader, KeyType, aes_kcv
from keyload.core.secret import Secret
from keyload.records.exportlog import SqliteExportLog
from keyload.records.ledger import Export, KeyFacts, LedgerEntry, entry_problems
from keyload.station.admin import bdk_policy
from keyload.station.load import AuthorityClient, LoadFailed, UnitClient, load_key
from keyload.transports.local import LocalConnection
from keyload.units.authority import Authority, ExportPolicy, MemoryExportLog
from keyload.units.keystore import SoftwareKeystore
from keyload.units.unit import MemoryUnitStore, Slot, Unit, UnitState

SET: dict[str, Any] = json.loads(
    (VECTORS / "dukpt" / "aes128_x9_24_3_supplement.json").read_text())["aes128_bdk"]
BDK, IK = bytes.fromhex(SET["bdk"]), bytes.fromhex(SET["initial_key"])
IK_ID = InitialKeyId.parse(SET["initial_key_id"])
T = bytes(range(32))
SN = b"TERM-1"
ANY = ExportPolicy(None, None)
BDK_ONLY = ExportPolicy(None, None, initial_keys_only=True)  # as keyload gives every BDK


class Roles:
    def __init__(self) -> None:
        self.ks = SoftwareKeystore.ephemeral()
        self.set_id = self.ks.add_set(Secret(T), "terminals").set_id
        self.ks.add_key(b"BDK", KeyType.AES128, Secret(BDK), KeyAttributes("B0", "X", "N"),
                        version=4, diversify=False, policy=BDK_ONLY)
        self.ks.add_key(b"KEK", KeyType.AES128, Secret(bytes(16)), KeyAttributes("K0", "B", "E"),
                        version=1, diversify=False, policy=ANY)
        self.log = MemoryExportLog()
        self.authority = Authority(self.ks, log=self.log)
        self.unit = Unit(MemoryUnitStore(UnitState.new(
            SN, Secret(T), {1: Slot(1, frozenset({KeyType.AES128}))})))

    def load(self, ref1: bytes = b"BDK") -> Any:
        return load_key(UnitClient(LocalConnection(self.unit)),
                        AuthorityClient(LocalConnection(self.authority)), ref1, 1)


@pytest.fixture
def roles() -> Roles:
    return Roles()


def test_the_unit_receives_the_vector_ik_as_b1(roles: Roles) -> None:
    roles.authority.order_initial_key(SN, b"BDK", 1, InitialKeyOrder(IK_ID))
    res = roles.load()
    slot = roles.unit.state.slots[1]
    assert slot.key is not None and bytes(slot.key.buffer) == IK
    h = KeyHeader.decode(res.header)
    assert (h.key_type, h.key_length, h.usage, h.mode, h.version, h.exportability, h.flags) == \
        (KeyType.AES128, 16, "B1", "X", 4, "N", 0)
    assert res.kcv == aes_kcv(IK)
    [rec] = roles.log.records
    assert (rec.ref1, rec.initial_key_id, rec.kcv) == (b"BDK", IK_ID.value, aes_kcv(IK))


def test_an_aes128_ik_from_an_aes256_bdk(roles: Roles) -> None:
    roles.ks.add_key(b"BDK256", KeyType.AES256, Secret(bytes(range(32))),
                     KeyAttributes("B0", "X", "N"), version=1, diversify=False,
                     policy=BDK_ONLY)
    roles.authority.order_initial_key(SN, b"BDK256", 1,
                                      InitialKeyOrder(IK_ID, KeyType.AES128))
    res = roles.load(b"BDK256")
    assert KeyHeader.decode(res.header).key_length == 16


def test_a_bdk_without_an_order_is_never_exported(roles: Roles) -> None:
    """As an authority on a card answers it: 6986 to the APDU, nothing recorded."""
    with pytest.raises(LoadFailed) as e:
        roles.load()
    assert e.value.sw == 0x6986
    req = msg.ExportRequest(SN, bytes(16), roles.set_id, 1, b"BDK", 1).encode()
    r = ResponseAPDU.decode(roles.authority.process_apdu(
        CommandAPDU(0x80, EXPORT, 0, 0, req, ne=256).encode()))
    assert r.sw == 0x6986 and roles.log.records == []
    assert roles.unit.state.slots[1].key is None
    with pytest.raises(PolicyRefused, match="never exported"):
        roles.authority.export_request(msg.ExportRequest(SN, bytes(16), roles.set_id, 1,
                                                         b"BDK", 1))


def test_an_order_is_for_a_bdk_and_an_ik_no_stronger(roles: Roles) -> None:
    with pytest.raises(ValueError, match="not a BDK"):
        roles.authority.order_initial_key(SN, b"KEK", 1, InitialKeyOrder(IK_ID))
    with pytest.raises(ValueError, match="no stronger"):
        roles.authority.order_initial_key(SN, b"BDK", 1, InitialKeyOrder(IK_ID, KeyType.AES256))
    with pytest.raises(LoadFailed):
        roles.load()  # nothing was ordered


@pytest.mark.parametrize(("key_type", "attrs", "diversify", "match"), [
    (KeyType.AES128, KeyAttributes("B0", "X", "E"), False, "never exported"),
    (KeyType.AES192, KeyAttributes("B0", "X", "N"), False, "AES-128 or AES-256"),
    (KeyType.AES128, KeyAttributes("B0", "X", "N"), True, "not diversified"),
])
def test_a_bdk_that_could_leave_is_refused(key_type: KeyType, attrs: KeyAttributes,
                                           diversify: bool, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bdk_policy(key_type, attrs, ANY, diversify=diversify)


def test_every_bdk_keyload_takes_in_lets_only_its_initial_keys_leave() -> None:
    policy = bdk_policy(KeyType.AES256, KeyAttributes("B0", "X", "N"),
                        ExportPolicy(None, frozenset({1})), diversify=False)
    assert policy == ExportPolicy(None, frozenset({1}), initial_keys_only=True)
    assert ExportPolicy.from_json(policy.to_json()) == policy
    assert policy.to_json()["initial_keys_only"] is True
    assert "initial_keys_only" not in ANY.to_json()  # other keys' records as before
    other = ExportPolicy(None, None)
    assert bdk_policy(KeyType.AES128, KeyAttributes("K0", "B", "E"), other,
                      diversify=True) is other


def test_a_b0_key_without_that_policy_is_exported_as_the_contract_says(roles: Roles) -> None:
    """KLP1 exports a key of any usage (its conformance file has a B0 key): only the
    policy keyload gives a BDK stops it."""
    roles.ks.add_key(b"B0-API", KeyType.AES128, Secret(BDK), KeyAttributes("B0", "X", "N"),
                     version=1, diversify=False, policy=ANY)
    res = roles.load(b"B0-API")
    assert KeyHeader.decode(res.header).usage == "B0" and res.kcv == aes_kcv(BDK)
    assert roles.log.records[-1].initial_key_id is None


def test_suite3_never_exports_a_bdk() -> None:
    w = World()
    w.ks.add_key(b"BDK", KeyType.AES128, Secret(BDK), KeyAttributes("B0", "X", "N"),
                 version=1, diversify=False, policy=BDK_ONLY)
    unit = w.enrol(b"SN-D1")
    assert tx(w.authority, EXPORT, w.request(unit, b"BDK", 2).encode())[0] == 0x6986
    assert w.log.records == []


def test_the_ledger_compares_the_initial_key_id_with_the_export(roles: Roles) -> None:
    roles.authority.order_initial_key(SN, b"BDK", 1, InitialKeyOrder(IK_ID))
    res = roles.load()
    rec = roles.log.records[0]
    facts = KeyFacts(4, KeyType.AES128, 16, "B0", "X", "N")
    export = Export(rec.set_id, rec.ref1, rec.ref2, rec.suite, rec.key_version, rec.kcv,
                    recorded=("kcv", "initial_key_id"), initial_key_id=rec.initial_key_id)

    def entry(ik: bytes | None) -> LedgerEntry:
        return LedgerEntry("station", 0.0, b"BDK", 4, res.suite, res.set_id, SN, res.r, 1,
                           res.header, res.kcv, res.rct, initial_key_id=ik)

    assert entry_problems(entry(IK_ID.value), roles.authority, export=export,
                          key_now=lambda _: facts) == []
    other = entry(IK_ID.plus(1).value)
    assert entry_problems(other, roles.authority, export=export) == \
        ["differs from the export: initial_key_id"]
    # without its initial key ID, a B1 header is not the BDK's own (B0)
    assert "key header's type or attributes differ from the key's" in entry_problems(
        entry(None), roles.authority, key_now=lambda _: facts)


_OLD_EXPORTS = ("CREATE TABLE exports (id INTEGER PRIMARY KEY, time REAL NOT NULL, set_id "
                "TEXT NOT NULL, sn TEXT NOT NULL, ref1 TEXT NOT NULL, ref2 INTEGER NOT NULL, "
                "suite INTEGER NOT NULL, key_version INTEGER NOT NULL, kcv TEXT NOT NULL);"
                "INSERT INTO exports (time, set_id, sn, ref1, ref2, suite, key_version, kcv) "
                "VALUES (1.0, '0102030405', 'aa', '4b', 1, 1, 1, '0102030405');")
_OLD_LOADS = ("CREATE TABLE loads (id INTEGER PRIMARY KEY, time REAL NOT NULL, station TEXT "
              "NOT NULL, sn TEXT NOT NULL, set_id TEXT, ref1 TEXT NOT NULL, ref2 INTEGER NOT "
              "NULL, status TEXT NOT NULL, suite INTEGER, r TEXT, header TEXT, key_version "
              "INTEGER, kcv TEXT, rct TEXT, step TEXT, sw TEXT, reason TEXT);"
              "INSERT INTO loads (time, station, sn, ref1, ref2, status, step, reason) "
              "VALUES (1.0, 'local', 'aa', '4b', 1, 'failed', 'import', 'refused');")


@pytest.mark.parametrize("made_before", ["exports", "station"])
def test_older_records_take_the_new_column(tmp_path: Path, made_before: str) -> None:
    """An export log or a station.db made before the initial key ID reads as before."""
    import sqlite3

    from keyload.station.records import LoadRecords

    path = tmp_path / f"{made_before}.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(_OLD_EXPORTS if made_before == "exports" else _OLD_LOADS)
    store = SqliteExportLog(path) if made_before == "exports" else LoadRecords(path)
    try:
        [old] = store.records() if isinstance(store, SqliteExportLog) else store.rows()
        assert old.initial_key_id is None and old.sn == b"\xaa"
    finally:
        store.close()
