"""The remote-download service and identity sets (suite 0x03, docs/protocol.md §10): the
real server (uvicorn) on loopback with real mutual TLS.

``keyload fetch`` drives an emulated unit of an identity set (INITIALIZE DOWNLOAD, the
unit's E_U, C_U and sigU to the service, E0 back, IMPORTKEY, the receipt posted): the
unit's KCV agrees with the authority's, and the ledger keeps the receipt with E_A and
C_U, verified with the certificate alone. Then each refusal — a revoked unit (6983), a
challenge served before (6985; after a restart, across two instances on one
PostgreSQL), a tampered sigU (6982), a suite that does not fit the set (6A81), an unknown
set (6A82) — is a problem document with its status word, and the service's state, the
export records and the unit stay as they were.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
import signal
import sqlite3
import ssl
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from keyload.core import messages3 as msg3
from keyload.core.identity import Certificate
from keyload.core.keys import KeyAttributes, KeyType
from keyload.core.messages import SLOT_EMPTY, SLOT_LOADED, ExportRequest
from keyload.lab.pgserver import postgres_available, private_postgres
from keyload.records.audit import AuditLog
from keyload.records.ledger import verify_receipt3
from keyload.service.fetch import speaks_suite3
from keyload.service.pki import init_pki
from keyload.service.store import SqliteServiceStore
from keyload.station.home import Home
from keyload.station.identity import AUTHORITY_ID, enrol_unit
from keyload.station.load import UnitClient
from keyload.transports.local import LocalConnection
from keyload.units.authority import ExportPolicy
from keyload.units.keystore import SoftwareKeystore
from keyload.units.storage import KekSource
from keyload.units.unit import Slot

from ..conftest import require
from .cli_helpers import KEYLOAD, cli_env
from .test_service import (
    PASSPHRASE,
    SLOTS,
    Running,
    World,
    policy_doc,
    problem,
    raw,
    run_cli,
    start_service,
)

ID_SLOTS = {1: Slot(1, frozenset({KeyType.AES256})), 2: Slot(2, frozenset({KeyType.AES128}))}


def build_identity_world(d: Path, *, units: int = 11) -> World:
    """A home with an identity set (``set_a``, its units ``units_a`` enrolled as
    ``keyload unit create`` does) and a transport-key set (``set_b``, one unit)."""
    src = KekSource(passphrase=PASSPHRASE)
    home = d / "home"
    ks = SoftwareKeystore.create(home / "authority", src, scrypt_n=2**12)
    a = ks.generate_identity_set("plant", authority_id=AUTHORITY_ID).set_id
    b = ks.generate_set("B").set_id
    ks.generate_key(b"TMK-1", KeyType.AES256, KeyAttributes("K0", "B", "E"), version=1,
                    diversify=True, policy=ExportPolicy(None, frozenset({1})))
    ks.generate_key(b"PIN-1", KeyType.AES128, KeyAttributes("P0", "E", "N"), version=3,
                    diversify=False, policy=ExportPolicy(None, frozenset({2})))
    from keyload.station.fleet import EmulatedFleet
    from keyload.units import storage

    n, storage.SCRYPT_N = storage.SCRYPT_N, 2**12
    try:
        h = Home(home, src)
        sns = [bytes.fromhex(f"1D0C{i:04X}") for i in range(units)]
        for sn in sns:
            enrol_unit(h, ks, a, sn, dict(ID_SLOTS))
        fleet = EmulatedFleet.open(home / "units", src, create=True)
        sn_b = bytes.fromhex("0B0B0B0001")
        fleet.create_unit(sn_b, ks.transport_key_copy(b), dict(SLOTS))
        fleet.close()
    finally:
        storage.SCRYPT_N = n
    ks.close()
    init_pki(d / "pki", clients=("terminal-1", "intruder", "monitor", "slowpoke", "other"))
    return World(d, home, d / "pki", a, b, sns, sn_b, d / "pki")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_identity_world(tmp_path_factory.mktemp("service-identity"))


@pytest.fixture(scope="module")
def svc(world: World) -> Iterator[Running]:
    run = start_service(world, policy_doc(world))
    yield run
    run.stop()


# -- helpers --------------------------------------------------------------------------
@contextmanager
def unit_client(w: World, sn: bytes) -> Iterator[UnitClient]:
    """An emulated unit of the home, selected, closed afterwards."""
    fleet = w.fleet()
    unit = fleet.open_unit(sn)
    try:
        c = UnitClient(LocalConnection(unit))
        c.select()
        yield c
    finally:
        unit.close()
        fleet.close()


def init3(w: World, sn: bytes) -> msg3.InitResponse3:
    with unit_client(w, sn) as c:
        return c.initialize3()


def request3(i: msg3.InitResponse3, ref1: bytes, ref2: int, *, suite: int = 3,
             set_id: bytes | None = None, sig_u: bytes | None = None) -> bytes:
    return msg3.ExportRequest3(ExportRequest(i.sn, i.r, set_id or i.set_id, suite, ref1, ref2),
                               i.e_u, i.c_u, sig_u or i.sig_u).encode()


def json3(i: msg3.InitResponse3, ref1: bytes, ref2: int) -> bytes:
    return json.dumps({"sn": i.sn.hex(), "r": i.r.hex(), "set_id": i.set_id.hex(),
                       "suite": 3, "ref1": ref1.hex(), "ref2": ref2, "e_u": i.e_u.hex(),
                       "c_u": i.c_u.encode().hex(), "sig_u": i.sig_u.hex()}).encode()


def octets(run: Running, body: bytes,
           client: str = "terminal-1") -> tuple[int, dict[str, str], bytes]:
    return raw(run, "POST", "/v1/exportkey", body, ctype="application/octet-stream",
               client=client)


State = tuple[list[Any], list[Any], int]


def state_of(run: Running) -> State:
    """The service's replay cache and ledger, and the authority's export records."""
    store = run.inst.store
    assert isinstance(store, SqliteServiceStore)
    return (store._x("SELECT * FROM challenges ORDER BY sn, r"),
            store._x("SELECT * FROM ledger ORDER BY sn, r"), run.inst.exports.count())


def slot_empty(w: World, sn: bytes, ref2: int) -> bool:
    with unit_client(w, sn) as c:
        return c.slot_status3(ref2).state == SLOT_EMPTY


def fetch_cli(w: World, url: str, sn: bytes, ref1: str, ref2: int) -> Any:
    cert, key = w.client_paths("terminal-1")
    return run_cli("fetch", "--home", str(w.home), "--server", url, "--sn", sn.hex(),
                   "--ref1", ref1, "--ref2", str(ref2), "--ca", str(w.pki / "ca.pem"),
                   "--cert", str(cert), "--key", str(key), "--json")


def last_request(w: World) -> dict[str, Any]:
    """The detail of the home's last audited request."""
    audit = AuditLog(w.home / "audit.db")
    try:
        (d,) = audit.db.execute("SELECT detail FROM audit WHERE action = 'request' "
                                "ORDER BY seq DESC LIMIT 1").fetchone()
        return dict(json.loads(d))
    finally:
        audit.close()


# -- a whole download -------------------------------------------------------------------
@pytest.mark.slow  # runs the console script
def test_fetch_loads_a_key_into_a_unit_of_an_identity_set(svc: Running) -> None:
    w = svc.world
    sn = w.units_a[0]
    before = len(svc.inst.store.ledger())
    p = fetch_cli(w, svc.url, sn, "TMK-1", 1)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["ledger"] is True and out["suite"] == 3 and out["set_id"] == w.set_a.hex()
    assert len(bytes.fromhex(out["receipt"])) == 64  # the unit's ECDSA signature
    with unit_client(w, sn) as c:
        st = c.slot_status3(1)
    assert isinstance(st, msg3.SlotStatus3) and st.state == SLOT_LOADED
    assert st.kcv.hex().upper() == out["kcv"] and st.ref1 == b"TMK-1"
    entries = svc.inst.store.ledger()
    assert len(entries) == before + 1
    e = entries[-1]
    assert (e.sn, e.suite, e.ref2, e.rct) == (sn, 3, 1, bytes.fromhex(out["receipt"]))
    # the ledger keeps E_A and C_U with the receipt: verified with the certificate alone
    assert e.c_u is not None and e.e_a is not None and len(e.e_a) == 65
    cert = Certificate.decode(e.c_u)
    assert cert.subject == sn
    assert verify_receipt3(e)
    assert not verify_receipt3(dataclasses.replace(e, rct=bytes(64)))
    other = dataclasses.replace(e, c_u=init3(w, w.units_a[1]).c_u.encode())
    assert not verify_receipt3(other)  # another unit's certificate
    # the export record keeps R, H, E_A and C_U, the same
    rec = svc.inst.exports.records()[-1]
    assert (rec.r, rec.h, rec.e_a, rec.c_u) == (e.r, e.header, e.e_a, e.c_u)
    # keyload ledger verify checks the service's entries, this one included
    v = run_cli("ledger", "verify", "--home", str(w.home), "--json")
    assert v.returncode == 0, v.stderr + v.stdout
    checked = json.loads(v.stdout)["service"]
    assert (checked["verified"], checked["invalid"]) == (len(entries), 0), checked


@pytest.mark.slow  # runs the console script
def test_a_receipt_altered_in_the_state_does_not_verify(svc: Running, tmp_path: Path) -> None:
    """The service's ledger, copied and one suite-0x03 receipt altered: ``keyload ledger
    verify --state`` finds it invalid (the unit's signature under its C_U fails)."""
    w = svc.world
    p = fetch_cli(w, svc.url, w.units_a[0], "PIN-1", 2)
    assert p.returncode == 0, p.stderr
    copy = tmp_path / "service.db"
    src = sqlite3.connect(w.home / "service.db")
    dst = sqlite3.connect(copy)
    src.backup(dst)
    src.close()
    rct = bytes.fromhex(json.loads(p.stdout)["receipt"])
    dst.execute("UPDATE ledger SET rct = ? WHERE rct = ?",
                ((rct[:-1] + bytes([rct[-1] ^ 1])).hex(), rct.hex()))
    dst.commit()
    dst.close()
    v = run_cli("ledger", "verify", "--home", str(w.home), "--state", str(copy), "--json")
    assert v.returncode == 1, v.stderr + v.stdout
    checked = json.loads(v.stdout)["service"]
    assert checked["invalid"] == 1, checked
    assert "receipt does not verify" in checked["invalid_rows"][0]["reason"]


def test_export_and_receipt_in_json_and_a_forged_receipt_refused(svc: Running) -> None:
    w = svc.world
    sn = w.units_a[1]
    with unit_client(w, sn) as c:
        i = c.initialize3()
        status, headers, body = raw(svc, "POST", "/v1/exportkey", json3(i, b"PIN-1", 2))
        assert status == 200 and headers["content-type"] == "application/json", body
        doc = json.loads(body)
        assert doc["suite"] == 3 and doc["key_version"] == 3
        ans = c.import_key3(bytes.fromhex(doc["import_data"]))
    assert ans.kcv.hex() == doc["kcv"]
    n = len(svc.inst.store.ledger())
    rc = {"sn": sn.hex(), "r": i.r.hex(), "ref2": 2, "kcv": ans.kcv.hex(), "rct": ans.rct.hex()}
    for forged in (bytes(64), ans.rct[:-1] + bytes([ans.rct[-1] ^ 1]), bytes(16)):
        d = problem(*raw(svc, "POST", "/v1/receipts", json.dumps(dict(rc, rct=forged.hex()))
                         .encode()), 422, "receipt-invalid")
        assert d["sw"] == "6982"
    problem(*raw(svc, "POST", "/v1/receipts", json.dumps(dict(rc, rct="00" * 40)).encode()),
            400, "malformed")
    assert len(svc.inst.store.ledger()) == n
    status, _, body = raw(svc, "POST", "/v1/receipts", json.dumps(rc).encode())
    assert status == 201, body
    e = svc.inst.store.ledger()[-1]
    assert (e.sn, e.rct, e.c_u) == (sn, ans.rct, i.c_u.encode())
    assert verify_receipt3(e)


@pytest.mark.slow  # runs the console script
def test_revoked_unit_is_refused_6983_and_nothing_is_recorded(svc: Running) -> None:
    """``keyload unit revoke`` while the service runs: the next fetch is refused (exit 6)."""
    w = svc.world
    sn = w.units_a[2]
    p = run_cli("unit", "revoke", "--home", str(w.home), "--set", w.set_a.hex(), "--sn",
                sn.hex())
    assert p.returncode == 0, p.stderr
    before = state_of(svc)
    p = fetch_cli(w, svc.url, sn, "TMK-1", 1)
    assert p.returncode == 6, (p.returncode, p.stderr)
    assert "revoked" in p.stderr and "Traceback" not in p.stderr
    assert last_request(w) | {"status": 403, "problem": "unit-revoked", "sw": "6983",
                              "sn": sn.hex()} == last_request(w)
    d = problem(*octets(svc, request3(init3(w, sn), b"TMK-1", 1)), 403, "unit-revoked")
    assert d["sw"] == "6983"
    assert state_of(svc) == before and slot_empty(w, sn, 1)


def test_replayed_challenge_is_409_6985_and_recorded_once(svc: Running) -> None:
    w = svc.world
    i = init3(w, w.units_a[3])
    status, _, body = octets(svc, request3(i, b"TMK-1", 1))
    assert status == 200, body
    before = state_of(svc)
    for client in ("terminal-1", "other"):
        d = problem(*octets(svc, request3(i, b"TMK-1", 1), client), 409, "replay")
        assert d["sw"] == "6985"
    # the same challenge for another key or slot: served before all the same
    d = problem(*raw(svc, "POST", "/v1/exportkey", json3(i, b"PIN-1", 2)), 409, "replay")
    assert d["sw"] == "6985"
    assert state_of(svc) == before


def test_tampered_sig_u_is_refused_6982_and_nothing_is_recorded(svc: Running) -> None:
    w = svc.world
    sn = w.units_a[4]
    i = init3(w, sn)
    before = state_of(svc)
    bad = i.sig_u[:-1] + bytes([i.sig_u[-1] ^ 1])
    d = problem(*octets(svc, request3(i, b"TMK-1", 1, sig_u=bad)), 422, "integrity")
    assert d["sw"] == "6982"
    # another unit's certificate with this unit's challenge
    other = init3(w, w.units_a[5])
    forged = msg3.ExportRequest3(ExportRequest(i.sn, i.r, i.set_id, 3, b"TMK-1", 1), i.e_u,
                                 other.c_u, i.sig_u).encode()
    assert problem(*octets(svc, forged), 422, "integrity")["sw"] == "6982"
    assert state_of(svc) == before
    # the challenge was not consumed by the refusals: the genuine request is served
    status, _, body = octets(svc, request3(i, b"TMK-1", 1))
    assert status == 200, body
    assert slot_empty(w, sn, 1)


def test_wrong_suite_for_the_set_and_unknown_set_are_refused(svc: Running) -> None:
    w = svc.world
    i = init3(w, w.units_a[5])
    before = state_of(svc)
    # suite 0x01 named in a suite-0x03 message, and a suite-0x03 message for a T set
    for body, client in ((request3(i, b"TMK-1", 1, suite=1), "terminal-1"),
                         (request3(i, b"TMK-1", 1, set_id=w.set_b), "other")):
        d = problem(*octets(svc, body, client), 422, "suite-unsupported")
        assert d["sw"] == "6A81"
    d = problem(*octets(svc, request3(i, b"TMK-1", 1, set_id=os.urandom(5)), "other"), 404,
                "unknown-set")
    assert d["sw"] == "6A82"
    assert state_of(svc) == before
    # a suite-0x01 request for an identity set: 6A81 too, nothing exported or in the ledger
    plain = ExportRequest(i.sn, i.r, i.set_id, 1, b"TMK-1", 1).encode()
    assert problem(*octets(svc, plain), 422, "suite-unsupported")["sw"] == "6A81"
    challenges, ledger, exports = state_of(svc)
    assert (ledger, exports) == before[1:]
    assert all(row[7] != "exported" for row in challenges if row not in before[0])
    assert slot_empty(w, w.units_a[5], 1)


def test_served_challenge_is_refused_after_a_restart(world: World, svc: Running) -> None:
    """The register of served challenges is the service's state: a new instance (a
    restart, or a second service on the same state) refuses what the first served."""
    w = world
    i = init3(w, w.units_a[6])
    first = start_service(w, policy_doc(w), instance="first")
    try:
        status, _, body = octets(first, request3(i, b"TMK-1", 1))
        assert status == 200, body
    finally:
        first.stop()
    before = state_of(svc)
    again = start_service(w, policy_doc(w), instance="again")
    try:
        d = problem(*octets(again, request3(i, b"TMK-1", 1)), 409, "replay")
        assert d["sw"] == "6985"
    finally:
        again.stop()
    assert state_of(svc) == before


def test_state_made_before_suite_3_opens_and_keeps_its_entries(tmp_path: Path) -> None:
    """A service state without the E_A and C_U columns takes them on opening; its
    entries read as before (no E_A, no C_U)."""
    path = tmp_path / "service.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO ledger VALUES ('0a', '00', '0102030405', '41', 1, 1, '00', 1, "
               "'0000000000', '00', 'terminal-1', 1.0)")
    db.commit()
    db.close()
    audit = AuditLog(tmp_path / "audit.db", actor="service")
    store = SqliteServiceStore(path, audit)
    try:
        (e,) = store.ledger()
        assert (e.sn, e.client, e.e_a, e.c_u) == (b"\x0a", "terminal-1", None, None)
    finally:
        store.close()


OLD_SCHEMA = """
CREATE TABLE challenges (sn TEXT NOT NULL, r TEXT NOT NULL, client TEXT NOT NULL,
    set_id TEXT NOT NULL, ref1 TEXT NOT NULL, ref2 INTEGER NOT NULL, suite INTEGER NOT NULL,
    state TEXT NOT NULL, time DOUBLE PRECISION NOT NULL, header TEXT, kcv TEXT,
    key_version INTEGER, sw TEXT, PRIMARY KEY (sn, r));
CREATE TABLE ledger (sn TEXT NOT NULL, r TEXT NOT NULL, set_id TEXT NOT NULL,
    ref1 TEXT NOT NULL, ref2 INTEGER NOT NULL, suite INTEGER NOT NULL, header TEXT NOT NULL,
    key_version INTEGER NOT NULL, kcv TEXT NOT NULL, rct TEXT NOT NULL, client TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL, PRIMARY KEY (sn, r));
"""


# -- two services on one PostgreSQL -----------------------------------------------------
@pytest.fixture(scope="module")
def pg_pair(world: World, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[Running, Running]]:
    ok, why = postgres_available()
    require(ok, f"PostgreSQL: {why}")
    d = Path(tmp_path_factory.mktemp("service-identity-pg"))
    with private_postgres(d / "pg") as url:
        policy = policy_doc(world, per_sn={"limit": 1000, "window_s": 60})
        one = start_service(world, policy, state=url, instance="one")
        two = start_service(world, policy, state=url, instance="two")
        try:
            yield one, two
        finally:
            one.stop()
            two.stop()


@pytest.mark.hardware  # PostgreSQL (skips without it, fails without it under CI=true)
def test_postgres_two_services_share_the_register_of_served_challenges(
        pg_pair: tuple[Running, Running]) -> None:
    one, two = pg_pair
    w = one.world
    sn = w.units_a[7]
    with unit_client(w, sn) as c:
        i = c.initialize3()
        status, _, body = octets(one, request3(i, b"TMK-1", 1))
        assert status == 200, body
        resp = msg3.ExportResponse3.decode(body)
        ans = c.import_key3(resp.import_data)
    rows = len(two.inst.store.ledger())
    for run in (two, one):  # served by one: refused by both
        assert problem(*octets(run, request3(i, b"TMK-1", 1)), 409, "replay")["sw"] == "6985"
    # the receipt, posted to the other service, is verified with the C_U the first recorded
    rc = {"sn": sn.hex(), "r": i.r.hex(), "ref2": 1, "kcv": ans.kcv.hex(),
          "rct": ans.rct.hex()}
    status, _, body = raw(two, "POST", "/v1/receipts", json.dumps(rc).encode())
    assert status == 201, body
    entries = one.inst.store.ledger()
    assert len(entries) == rows + 1
    e = entries[-1]
    assert (e.sn, e.c_u, e.rct) == (sn, i.c_u.encode(), ans.rct) and e.e_a is not None
    assert verify_receipt3(e)
    # a refusal on either records nothing in the shared state
    j = init3(w, w.units_a[7])
    count = one.inst.store._x("SELECT COUNT(*) FROM challenges")  # type: ignore[attr-defined]
    bad = j.sig_u[:-1] + bytes([j.sig_u[-1] ^ 1])
    assert problem(*octets(two, request3(j, b"TMK-1", 1, sig_u=bad)), 422,
                   "integrity")["sw"] == "6982"
    assert problem(*octets(one, request3(j, b"GHOST", 1)), 404, "unknown-ref1")["sw"] == "6A88"
    assert one.inst.store._x("SELECT COUNT(*) FROM challenges") == count  # type: ignore[attr-defined]


@pytest.mark.hardware
def test_postgres_one_challenge_sent_to_both_services_at_once_is_served_once(
        pg_pair: tuple[Running, Running]) -> None:
    one, two = pg_pair
    w = one.world
    for _ in range(3):
        i = init3(w, w.units_a[7])
        body = request3(i, b"TMK-1", 1)
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(octets, (one, two, one, two), [body] * 4))
        assert sorted(a[0] for a in answers) == [200, 409, 409, 409], answers


# -- keyload serve --processes --------------------------------------------------------------
def _post(port: int, pki: Path, body: bytes) -> tuple[int, dict[str, Any]]:
    """POST EXPORTKEY bytes on a new connection (the kernel hands it to any worker)."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(str(pki / "clients" / "terminal-1.pem"),
                        str(pki / "clients" / "terminal-1.key"))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
    try:
        conn.request("POST", "/v1/exportkey", body=body,
                     headers={"Content-Type": "application/octet-stream"})
        r = conn.getresponse()
        data = r.read()
        return r.status, (json.loads(data) if r.status != 200 else {})
    finally:
        conn.close()


@pytest.mark.slow  # keyload serve --processes through the console script
def test_workers_share_the_register_and_see_a_revocation(world: World, tmp_path: Path) -> None:
    if not KEYLOAD.exists():
        pytest.skip("the keyload console script is not installed")
    w = world
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(policy_doc(w, per_sn={"limit": 1000, "window_s": 60})))
    srv = subprocess.Popen(
        [str(KEYLOAD), "serve", "--home", str(w.home), "--cert", str(w.pki / "server.pem"),
         "--key", str(w.pki / "server.key"), "--ca", str(w.pki / "ca.pem"), "--policy",
         str(policy), "--port", "0", "--processes", "2"],
        env=cli_env(PASSPHRASE), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None
        first = srv.stdout.readline()
        found = re.search(r"listening on https://127\.0\.0\.1:(\d+) ", first)
        assert found is not None and "(2 processes)" in first, first
        port = int(found.group(1))
        url = f"https://127.0.0.1:{port}"
        p = fetch_cli(w, url, w.units_a[8], "TMK-1", 1)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["ledger"] is True
        i = init3(w, w.units_a[8])
        body = request3(i, b"PIN-1", 2)
        answers = [_post(port, w.pki, body) for _ in range(8)]
        assert answers[0][0] == 200, answers[0]
        assert {(s, d.get("sw")) for s, d in answers[1:]} == {(409, "6985")}, answers
        # revoked while the workers run: every worker refuses it from then on
        p = run_cli("unit", "revoke", "--home", str(w.home), "--set", w.set_a.hex(), "--sn",
                    w.units_a[9].hex())
        assert p.returncode == 0, p.stderr
        for _ in range(4):
            status, doc = _post(port, w.pki, request3(init3(w, w.units_a[9]), b"TMK-1", 1))
            assert (status, doc.get("sw")) == (403, "6983"), doc
        p = fetch_cli(w, url, w.units_a[9], "TMK-1", 1)
        assert p.returncode == 6 and "revoked" in p.stderr, p.stderr
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(15)
    assert slot_empty(w, w.units_a[9], 1)


def test_a_unit_in_a_reader_is_told_by_its_answer(world: World) -> None:
    """``fetch --reader`` runs suite 0x03 for a card of an identity set: its INITIALIZE
    DOWNLOAD answers E_U, C_U and sigU; a unit of a transport-key set does not."""
    fleet = world.fleet()
    try:
        for sn, identity in ((world.units_a[5], True), (world.unit_b, False)):
            unit = fleet.open_unit(sn)
            try:
                assert speaks_suite3(LocalConnection(unit)) is identity
            finally:
                unit.close()
    finally:
        fleet.close()


def test_refusals_after_the_claim_release_it(svc: Running) -> None:
    """REF1 unknown (6A88) and the export policy (6986) come after the register of served
    challenges (§10.4): the claim is given back, nothing is recorded, and the same
    challenge is served once the request is right."""
    w = svc.world
    sn = w.units_a[10]
    i = init3(w, sn)
    before = state_of(svc)
    assert problem(*octets(svc, request3(i, b"GHOST", 1)), 404, "unknown-ref1")["sw"] == "6A88"
    assert problem(*octets(svc, request3(i, b"TMK-1", 2)), 403, "export-policy")["sw"] == "6986"
    assert state_of(svc) == before
    with unit_client(w, sn) as c:
        i = c.initialize3()
        assert problem(*octets(svc, request3(i, b"PIN-1", 1)), 403,
                       "export-policy")["sw"] == "6986"
        status, _, body = octets(svc, request3(i, b"PIN-1", 2))
        assert status == 200, body
        ans = c.import_key3(msg3.ExportResponse3.decode(body).import_data)
    assert ans.kcv == msg3.ExportResponse3.decode(body).kcv
