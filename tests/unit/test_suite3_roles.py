"""Suite 0x03 between the real roles, in process (docs/protocol.md §10): a unit of an
identity set enrolled through GENERATE UNIT KEY and PUT CERTIFICATE, the software authority
with its identity set and register, a whole download, and the refusals of §10.4 and §10.5
each leaving the slots, the register and the export log as they were."""

from __future__ import annotations

import hashlib
import itertools
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyload.core import messages3
from keyload.core.apdu import CommandAPDU, ResponseAPDU
from keyload.core.ecc import ecdh_into, public_point
from keyload.core.identity import (
    ROLE_UNIT,
    Certificate,
    PutCertificate,
    verify_certificate,
)
from keyload.core.keys import KeyAttributes, KeyType, kcv
from keyload.core.klp1 import KENC, KMAC, LABEL_T1, derive_session
from keyload.core.messages import ExportRequest, SlotStatus
from keyload.core.messages3 import ExportRequest3, ExportResponse3, ImportData3, InitResponse3
from keyload.core.primitives import aes_cmac, aes_kwp_wrap, ecbdiv_into
from keyload.core.secret import Secret
from keyload.core.suite3 import cas3_message, t1_context, verify_receipt3
from keyload.core.suites import SUITE_ECBDIV, get_suite
from keyload.records.exportlog import ExportRecord, SqliteExportLog
from keyload.units.authority import Authority, ExportPolicy, MemoryExportLog
from keyload.units.keystore import SoftwareKeystore
from keyload.units.storage import KekSource, Vault
from keyload.units.unit import FileUnitStore, MemoryUnitStore, Slot, Unit, UnitState

INIT, EXPORT, IMPORT, STATUS, GENKEY, PUTCERT = 0x10, 0x12, 0x14, 0x16, 0x18, 0x1A
KEY = bytes(range(0x20, 0x40))  # the AES-256 application key K1
ATTRS = KeyAttributes("K0", "B", "N")


def _rng(seed: bytes) -> Callable[[int], bytes]:
    counter = itertools.count()
    return lambda n: hashlib.sha256(seed + next(counter).to_bytes(8, "big")).digest()[:n]


def tx(app: Unit | Authority, ins: int, data: bytes = b"", p2: int = 0) -> tuple[int, bytes]:
    r = ResponseAPDU.decode(app.process_apdu(
        CommandAPDU(0x80, ins, 0, p2, data, ne=65536).encode()))
    return r.sw, r.data


def _slots() -> dict[int, Slot]:
    """1: AES-256; 2: AES-128 only; 3: locked."""
    return {1: Slot(1, frozenset({3})), 2: Slot(2, frozenset({1})),
            3: Slot(3, frozenset({3}), locked=True)}


class World:
    def __init__(self) -> None:
        self.ks = SoftwareKeystore.ephemeral()
        self.set_id = self.ks.generate_identity_set("plant", authority_id=b"AS-1").set_id
        self.q_ca = self.ks.identity_set(self.set_id).q_ca
        self.ks.add_key(b"K1", KeyType.AES256, Secret(KEY), ATTRS, version=1, diversify=False,
                        policy=ExportPolicy(None, None))
        self.ks.add_key(b"K2", KeyType.AES256, Secret(KEY), ATTRS, version=1, diversify=False,
                        policy=ExportPolicy(None, frozenset({9})))
        self.log = MemoryExportLog()
        self.authority = Authority(self.ks, log=self.log)

    def enrol(self, sn: bytes, store: Any = None) -> Unit:
        unit = Unit(store or MemoryUnitStore(UnitState.new_identity(sn, _slots())),
                    rng=_rng(sn))
        sw, data = tx(unit, GENKEY)
        assert sw == 0x9000 and data[:2] == b"\xd0\x41"
        cert = self.ks.certify_unit(self.set_id, sn, data[2:])
        assert tx(unit, PUTCERT, PutCertificate(cert, self.q_ca).encode()) == (0x9000, b"")
        return unit

    def request(self, unit: Unit, ref1: bytes = b"K1", ref2: int = 1) -> ExportRequest3:
        sw, data = tx(unit, INIT)
        assert sw == 0x9000
        ini = InitResponse3.decode(data)
        assert ini.suites == b"\x03" and ini.set_id == self.set_id
        return ExportRequest3(ExportRequest(ini.sn, ini.r, ini.set_id, 3, ref1, ref2),
                              ini.e_u, ini.c_u, ini.sig_u)

    def export(self, req: ExportRequest3) -> tuple[int, bytes]:
        return tx(self.authority, EXPORT, req.encode())


@pytest.fixture
def world() -> World:
    return World()


def _snapshot(unit: Unit) -> list[tuple[Any, ...]]:
    return [(s.ref2, s.header, s.kcv, s.ref1, None if s.key is None else bytes(s.key.buffer))
            for s in unit.state.slots.values()]


def test_full_download_and_receipt_with_certificates_only(world: World) -> None:
    unit = world.enrol(b"SN-0001")
    req = world.request(unit)
    sw, data = world.export(req)
    assert sw == 0x9000
    er = ExportResponse3.decode(data)
    assert er.kcv == kcv(KeyType.AES256, KEY)
    assert world.ks._scratch3.wiped  # Z, T1 and the session keys at the authority
    e_u = unit._pending_e
    assert e_u is not None and any(e_u)
    sw, resp = tx(unit, IMPORT, er.import_data)
    assert sw == 0x9000
    assert e_u == bytearray(32)  # e_U wiped once the IMPORTKEY ended
    assert unit.state.slots[1].key is not None and unit.state.slots[1].key.equals(KEY)
    status = messages3.SlotStatus3.decode(tx(unit, STATUS, p2=1)[1])
    assert (status.ref1, status.kcv) == (b"K1", er.kcv)
    # the auditor: the export record and the certificates (Q_CA public), no secret
    (record,) = world.log.records
    assert isinstance(record, ExportRecord) and record.suite == 3
    assert record.r == req.base.r and record.e_a == ImportData3.decode(er.import_data).e_a
    assert record.c_u is not None and record.h is not None
    c_u = Certificate.decode(record.c_u)
    verify_certificate(c_u, q_ca=world.q_ca, role=ROLE_UNIT, set_id=record.set_id,
                       subject=record.sn)
    rct = messages3.ImportResponse3.decode(resp).rct
    verify_receipt3(c_u, sn=record.sn, r=record.r, ref2=record.ref2, ref1=record.ref1,
                    h=record.h, kcv_=record.kcv, e_a=record.e_a, rct=rct)
    world.authority.verify_receipt3(set_id=record.set_id, c_u=c_u, r=record.r,
                                    ref2=record.ref2, ref1=record.ref1, h=record.h,
                                    kcv=record.kcv, e_a=record.e_a, rct=rct)
    # the export record holds no key material
    flat = b"".join(v if isinstance(v, bytes) else repr(v).encode() for v in vars_of(record))
    assert KEY not in flat and KEY[:16] not in flat
    # a replay of the same IMPORTKEY: no challenge
    assert tx(unit, IMPORT, er.import_data)[0] == 0x6985


def vars_of(record: ExportRecord) -> list[object]:
    return [getattr(record, f) for f in record.__slots__]


def test_revoked_unit_is_refused_from_then_on(world: World) -> None:
    unit = world.enrol(b"SN-0002")
    assert world.export(world.request(unit))[0] == 0x9000
    world.ks.revoke_unit(world.set_id, b"SN-0002")
    (rec,) = world.ks.unit_records(world.set_id)
    assert rec.revoked
    assert world.export(world.request(unit)) == (0x6983, b"")
    assert len(world.log.records) == 1


def test_station_in_the_middle_is_refused_6988(world: World) -> None:
    """The station swaps E_A for its own ephemeral key, rewraps under the keys it shares
    with the unit and computes a correct CAS, keeping the genuine SAS: 6988."""
    unit = world.enrol(b"SN-0003")
    req = world.request(unit)
    sw, data = world.export(req)
    assert sw == 0x9000
    d = ImportData3.decode(ExportResponse3.decode(data).import_data)
    e_s = hashlib.sha256(b"station ephemeral").digest()
    e_s_pub = public_point(e_s)
    z, t1, sess = bytearray(32), bytearray(32), bytearray(96)
    ecdh_into(e_s, req.e_u, z)
    sn, r = req.base.sn, req.base.r
    ecbdiv_into(z, t1, label=LABEL_T1, context=t1_context(sn, r, req.e_u, e_s_pub))
    derive_session(get_suite(SUITE_ECBDIV), t1, sn, r, d.ref2, sess)
    w = aes_kwp_wrap(bytes(sess[KENC]), bytes(32))  # the station's own key
    cas = aes_cmac(bytes(sess[KMAC]), cas3_message(sn, r, d.ref2, d.ref1, d.h, w, d.sas,
                                                   e_s_pub))
    forged = ImportData3(d.ref1, d.ref2, d.h, w, e_s_pub, d.c_a, d.sas, cas).encode()
    before = _snapshot(unit)
    e_u = unit._pending_e
    assert e_u is not None and any(e_u)
    assert tx(unit, IMPORT, forged)[0] == 0x6988
    assert _snapshot(unit) == before
    assert e_u == bytearray(32) and unit._scratch3.wiped  # wiped on the refusal too
    assert tx(unit, IMPORT, data)[0] == 0x6985  # the challenge went with the refusal


def test_tampered_unit_certificate_is_refused(world: World) -> None:
    unit = world.enrol(b"SN-0004")
    req = world.request(unit)
    c = req.c_u
    for bad in (c._replace(signature=c.signature[:-1] + bytes((c.signature[-1] ^ 1,))),
                c._replace(subject=b"SN-9999"), c._replace(role=1)):
        assert world.export(req._replace(c_u=bad)) == (0x6982, b"")
    sig = bytearray(req.sig_u)
    sig[5] ^= 0x40
    assert world.export(req._replace(sig_u=bytes(sig))) == (0x6982, b"")
    assert world.log.records == []
    assert world.export(req)[0] == 0x9000  # the genuine request still goes through


def test_served_challenge_is_not_served_again(world: World) -> None:
    unit = world.enrol(b"SN-0005")
    req = world.request(unit)
    assert world.export(req)[0] == 0x9000
    assert world.export(req) == (0x6985, b"")
    assert len(world.log.records) == 1


def test_another_units_message_is_refused(world: World) -> None:
    a, b = world.enrol(b"SN-000A"), world.enrol(b"SN-000B")
    sw, data = world.export(world.request(a))
    assert sw == 0x9000
    world.request(b)  # b has a pending challenge of its own
    before = _snapshot(b)
    assert tx(b, IMPORT, ExportResponse3.decode(data).import_data)[0] == 0x6982
    assert _snapshot(b) == before


@pytest.mark.parametrize(("ref2", "sw"), [(2, 0x6986), (3, 0x6986), (7, 0x6A88)],
                         ids=["wrong-slot-type", "locked-slot", "no-such-slot"])
def test_unit_slot_refusals(world: World, ref2: int, sw: int) -> None:
    unit = world.enrol(b"SN-0006")
    sw_e, data = world.export(world.request(unit, ref2=ref2))
    assert sw_e == 0x9000
    before = _snapshot(unit)
    assert tx(unit, IMPORT, ExportResponse3.decode(data).import_data)[0] == sw
    assert _snapshot(unit) == before
    assert unit.pending is None


@pytest.mark.parametrize(("ref1", "ref2", "sw"), [(b"K9", 1, 0x6A88), (b"K2", 1, 0x6986)])
def test_authority_key_refusals(world: World, ref1: bytes, ref2: int, sw: int) -> None:
    unit = world.enrol(b"SN-0007")
    assert world.export(world.request(unit, ref1, ref2)) == (sw, b"")
    assert world.log.records == []


def test_a_t_shaped_request_for_an_identity_set_is_6a81(world: World) -> None:
    unit = world.enrol(b"SN-0008")
    req = world.request(unit)
    for suite in (1, 2, 3):
        base = req.base._replace(suite=suite)
        assert tx(world.authority, EXPORT, base.encode()) == (0x6A81, b"")
    assert world.export(req._replace(base=req.base._replace(suite=2))) == (0x6A81, b"")


def test_enrolment_rules(world: World) -> None:
    unit = Unit(MemoryUnitStore(UnitState.new_identity(b"SN-0009", _slots())))
    assert tx(unit, INIT)[0] == 0x6985  # no certificate yet
    assert tx(unit, PUTCERT, b"\xe1\x00")[0] == 0x6985  # no key yet
    sw, data = tx(unit, GENKEY)
    assert sw == 0x9000
    assert tx(unit, GENKEY)[0] == 0x6985
    other = world.ks.certify_unit(world.set_id, b"SN-OTHER", data[2:])
    assert tx(unit, PUTCERT, PutCertificate(other, world.q_ca).encode())[0] == 0x6982
    assert unit.state.certificate is None
    cert = world.ks.certify_unit(world.set_id, b"SN-0009", data[2:])
    assert tx(unit, PUTCERT, PutCertificate(cert, world.q_ca).encode())[0] == 0x9000
    assert tx(unit, PUTCERT, PutCertificate(cert, world.q_ca).encode())[0] == 0x6985
    assert unit.state.set_id == world.set_id


def test_enrolled_unit_and_authority_survive_a_restart(tmp_path: Path,
                                                       kek_source: KekSource) -> None:
    ks = SoftwareKeystore.create(tmp_path / "as", kek_source)
    set_id = ks.generate_identity_set("plant", authority_id=b"AS-1").set_id
    ks.add_key(b"K1", KeyType.AES256, Secret(KEY), ATTRS, version=1, diversify=False,
               policy=ExportPolicy(None, None))
    vault = Vault.create(tmp_path / "units", kek_source)
    store = FileUnitStore.create(vault, UnitState.new_identity(b"SN-F", _slots()))
    unit = Unit(store, rng=_rng(b"F"))
    q_u = tx(unit, GENKEY)[1][2:]
    cert = ks.certify_unit(set_id, b"SN-F", q_u)
    ks.certify_unit(set_id, b"SN-G", q_u)
    ks.revoke_unit(set_id, b"SN-G")
    assert tx(unit, PUTCERT, PutCertificate(cert, ks.identity_set(set_id).q_ca).encode())[0] \
        == 0x9000
    c_a = ks.identity_set(set_id).c_a
    ks.close()
    unit.close()
    ks = SoftwareKeystore.open(tmp_path / "as", kek_source)
    assert ks.identity_set(set_id).c_a == c_a
    assert {(r.sn, r.revoked) for r in ks.unit_records(set_id)} == {(b"SN-F", False),
                                                                     (b"SN-G", True)}
    unit = Unit(FileUnitStore(vault, store.filename), rng=_rng(b"F2"))
    assert unit.state.certificate == cert.encode()
    assert tx(unit, GENKEY)[0] == 0x6985
    sw, data = tx(unit, INIT)
    ini = InitResponse3.decode(data)
    req = ExportRequest3(ExportRequest(ini.sn, ini.r, ini.set_id, 3, b"K1", 1), ini.e_u,
                         ini.c_u, ini.sig_u)
    sw, data = tx(Authority(ks), EXPORT, req.encode())
    assert sw == 0x9000
    assert tx(unit, IMPORT, ExportResponse3.decode(data).import_data)[0] == 0x9000
    reopened = Unit(FileUnitStore(vault, store.filename))
    assert reopened.state.slots[1].ref1 == b"K1"
    assert isinstance(reopened.slot_status(1), messages3.SlotStatus3)
    assert isinstance(reopened.slot_status(2), SlotStatus)
    ks.close()


class _FailingStore(MemoryUnitStore):
    def __init__(self, state: UnitState, error: BaseException) -> None:
        super().__init__(state)
        self.error = error
        self.armed = False

    def commit(self, state: UnitState, slot: Slot) -> None:
        if self.armed:
            raise self.error

    def commit_identity(self, state: UnitState) -> None:
        if self.armed:
            raise self.error


@pytest.mark.parametrize("error", [OSError(5, "I/O"), RuntimeError("bug")],
                         ids=["oserror", "unexpected"])
def test_a_failing_store_answers_6581_and_changes_nothing(world: World,
                                                         error: BaseException) -> None:
    store = _FailingStore(UnitState.new_identity(b"SN-000F", _slots()), error)
    unit = world.enrol(b"SN-000F", store)
    sw, data = world.export(world.request(unit))
    assert sw == 0x9000
    store.armed = True
    before = _snapshot(unit)
    assert tx(unit, IMPORT, ExportResponse3.decode(data).import_data)[0] == 0x6581
    assert _snapshot(unit) == before
    fresh = Unit(_FailingStore(UnitState.new_identity(b"SN-000E", _slots()), error))
    fresh.store.armed = True  # type: ignore[attr-defined]
    assert tx(fresh, GENKEY)[0] == 0x6581
    assert fresh.state.unit_key is None


def test_sqlite_export_log_keeps_what_verifies_the_receipt(tmp_path: Path) -> None:
    """§10.4: the record keeps R, H, E_A and C_U; a table made before them gains them."""
    path = tmp_path / "exports.db"
    old = sqlite3.connect(path)
    old.executescript("CREATE TABLE exports (id INTEGER PRIMARY KEY, time REAL NOT NULL, "
                      "set_id TEXT NOT NULL, sn TEXT NOT NULL, ref1 TEXT NOT NULL, "
                      "ref2 INTEGER NOT NULL, suite INTEGER NOT NULL, "
                      "key_version INTEGER NOT NULL, kcv TEXT NOT NULL);"
                      "INSERT INTO exports VALUES (1, 1.0, '0102030405', '01', '4b31', 1, 1, 1, "
                      "'0102030405');")
    old.commit()
    old.close()
    world = World()
    log = SqliteExportLog(path)
    world.authority.log = log
    unit = world.enrol(b"SN-0010")
    req = world.request(unit)
    sw, data = world.export(req)
    assert sw == 0x9000
    sw, resp = tx(unit, IMPORT, ExportResponse3.decode(data).import_data)
    assert sw == 0x9000
    log.close()
    log = SqliteExportLog(path)
    first, record = log.records()
    log.close()
    assert (first.r, first.h, first.e_a, first.c_u) == (None, None, None, None)
    assert record.r == req.base.r and record.c_u == req.c_u.encode()
    assert record.e_a is not None and record.h is not None
    verify_receipt3(req.c_u, sn=record.sn, r=record.r, ref2=record.ref2, ref1=record.ref1,
                    h=record.h, kcv_=record.kcv, e_a=record.e_a,
                    rct=messages3.ImportResponse3.decode(resp).rct)
    raw = path.read_bytes()
    assert KEY not in raw and KEY.hex().encode() not in raw


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ins=st.sampled_from([INIT, IMPORT, STATUS, GENKEY, PUTCERT]),
       p2=st.integers(0, 255), data=st.binary(max_size=400), cut=st.integers(0, 40))
def test_hostile_commands_answer_a_status_word(ins: int, p2: int, data: bytes,
                                               cut: int) -> None:
    """Whatever arrives, an enrolled unit of an identity set answers a status word of §6
    and its slots and identity stay as they were (an IMPORTKEY built from a genuine one,
    cut or with odd data, included)."""
    world = _SHARED
    if not _UNITS:  # one enrolled unit for every example
        _UNITS.append(world.enrol(b"SN-HOSTILE"))
    unit = _UNITS[0]
    sw_e, exported = world.export(world.request(unit))
    assert sw_e == 0x9000
    genuine = ExportResponse3.decode(exported).import_data
    body = genuine[:-cut] + data if cut else data
    before = (_snapshot(unit), unit.state.certificate, unit.state.q_ca)
    sw, _ = tx(unit, ins, body if ins == IMPORT else data, p2)
    assert sw in SECTION_6
    if ins != IMPORT or sw != 0x9000:
        assert (_snapshot(unit), unit.state.certificate, unit.state.q_ca) == before
    assert unit._taken_e is None


SECTION_6 = frozenset({0x9000, 0x6700, 0x6A80, 0x6A81, 0x6A82, 0x6A86, 0x6A88, 0x6982,
                       0x6983, 0x6985, 0x6986, 0x6988, 0x6581, 0x6D00, 0x6E00})
_SHARED = World()
_UNITS: list[Unit] = []
