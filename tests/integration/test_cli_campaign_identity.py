"""Campaigns of an identity set (suite 0x03, docs/protocol.md §10) through the console
script: ``campaign create … --set ID`` as for any set, ``campaign run`` loading each unit
by suite 0x03; a run killed mid-campaign and resumed loads every unit once (reconciled
by GET SLOT STATUS, which answers the slot's REF1); the journal keeps E_A and C_U with
each receipt, and ``ledger verify --auditor`` checks them with certificates alone — no
passphrase, no keystore — and names a tampered entry; a revoked unit fails with 6983
while the others are loaded."""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keyload.core.keys import KeyType
from keyload.station.campaign import Interrupt, RunOptions, run_campaign_cards
from keyload.station.fleet import EmulatedFleet, EmulatedUnitSource
from keyload.station.home import Home as StationHome
from keyload.station.identity import enrol_unit
from keyload.station.journal.model import Journal, LoadRow
from keyload.station.journal.sqlite import SqliteJournal
from keyload.station.load import AuthorityClient
from keyload.station.run import run_emulated
from keyload.transports.local import LocalConnection
from keyload.units.storage import KekSource
from keyload.units.unit import Slot

from ..conftest import require
from ..helpers import sqlite_count
from .cli_helpers import KEYLOAD, PASSPHRASE, Result, cli_env, ok, run

pytestmark = pytest.mark.slow  # every test runs the console script

UNITS = 6
SERIALS = [f"1d{i:06x}" for i in range(UNITS)]
EXIT_FAILED, EXIT_INPUT = 1, 3


@dataclass
class Home:
    path: Path
    id_set: str
    t_set: str

    def run(self, *args: str, passphrase: str | None = PASSPHRASE) -> Result:
        return run(*args, home=self.path, passphrase=passphrase)

    def copy(self, to: Path) -> Home:
        shutil.copytree(self.path, to)
        return Home(to, self.id_set, self.t_set)

    def journal(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path / "journal.db")


def _enrol(home: Home, serials: list[str]) -> None:
    """Emulated units of the identity set, enrolled in-process (one process, not one a unit)."""
    station = StationHome.resolve(str(home.path), KekSource(passphrase=PASSPHRASE))
    ks = station.open_keystore()
    try:
        for sn in serials:
            enrol_unit(station, ks, bytes.fromhex(home.id_set), bytes.fromhex(sn),
                       {1: Slot(1, frozenset({KeyType.AES256})),
                        2: Slot(2, frozenset({KeyType.AES128}))})
    finally:
        ks.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Home:
    """An identity set of UNITS units, two keys; a transport-key set with one unit."""
    require(KEYLOAD.is_file(), f"the keyload console script is not installed at {KEYLOAD}")
    path = tmp_path_factory.mktemp("campaign-identity") / "home"
    ok(run("authority", "init", home=path))
    id_set = ok(run("set", "create", "--name", "plant", "--identity", "--json",
                    home=path)).json()["set_id"]
    t_set = ok(run("set", "create", "--name", "plain", "--json", home=path)).json()["set_id"]
    home = Home(path, id_set, t_set)
    for ref1, typ, slot in (("TMK", "aes256", "1"), ("PEK", "aes128", "2")):
        ok(home.run("key", "generate", "--ref1", ref1, "--type", typ, "--usage", "K0",
                    "--mode", "B", "--exportability", "E", "--key-version", "1", "--sets", "any",
                    "--slots", slot))
    _enrol(home, SERIALS)
    ok(home.run("unit", "create", "--set", t_set, "--sn", "7e000001", "--slot", "1=aes256"))
    return home


@pytest.fixture
def home(base: Home, tmp_path: Path) -> Home:
    return base.copy(tmp_path / "home")


def _create(home: Home, serials: list[str] = SERIALS) -> None:
    """Campaign ``spring``: TMK into slot 1 and PEK into slot 2 of each of ``serials``."""
    ok(home.run("campaign", "create", "spring", "--set", home.id_set, "--load", "TMK:1",
                "--load", "PEK:2", "--manifest", str(_manifest(home, serials))))


def _exports_per_load(home: Home) -> list[int]:
    db = sqlite3.connect(home.path / "authority" / "exports.db")
    try:
        return [n for (n,) in db.execute("SELECT count(*) FROM exports GROUP BY sn, ref2")]
    finally:
        db.close()


def _trust(home: Home) -> str:
    out = ok(home.run("set", "ca", "--set", home.id_set, "--json")).json()
    assert out["ca"] == f"{home.id_set}={out['q_ca']}"
    return str(out["ca"])


def _no_authority(home: Home) -> None:
    """What an auditor has: the journal, no keystore (nor export records) at all."""
    shutil.rmtree(home.path / "authority")


def _rct_verifies(q_u: bytes, rct: bytes, message: bytes) -> bool:
    """ECDSA P-256 (r || s) checked with ``cryptography`` alone."""
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), q_u)
    sig = encode_dss_signature(int.from_bytes(rct[:32], "big"), int.from_bytes(rct[32:], "big"))
    try:
        key.verify(sig, message, ec.ECDSA(hashes.SHA256()))
    except Exception:
        return False
    return True


def test_a_campaign_of_identity_units_loads_each_by_suite_3(home: Home) -> None:
    _create(home)
    out = ok(home.run("campaign", "run", "spring", "--quiet", "--json")).json()
    assert (out["run"]["loads_done"], out["run"]["loads_failed"]) == (2 * UNITS, 0)
    assert out["status"]["done"] is True and out["status"]["states"]["failed"] == 0
    # every unit holds both keys, as GET SLOT STATUS tells (REF1 too, in suite 0x03)
    for sn in SERIALS:
        st = ok(home.run("unit", "status", "--sn", sn, "--json")).json()
        assert [(s["ref2"], s["state"], s["version"]) for s in st["slots"]] == \
            [(1, "loaded", 1), (2, "loaded", 1)]
    assert _exports_per_load(home) == [1] * (2 * UNITS)
    # the journal keeps E_A and C_U with each receipt; the receipt is the unit's ECDSA
    # signature over §10.3's message, checked here with cryptography alone
    db = home.journal()
    rows = db.execute("SELECT sn, ref2, ref1, suite, r, header, kcv, rct, e_a, c_u "
                      "FROM loads").fetchall()
    db.close()
    assert len(rows) == 2 * UNITS
    for sn, ref2, ref1, suite, r, header, kcv, rct, e_a, c_u in rows:
        assert suite == 3 and len(bytes.fromhex(rct)) == 64 and len(bytes.fromhex(e_a)) == 65
        cert = bytes.fromhex(c_u)
        q_u = cert[cert.index(b"\xd0\x41\x04") + 2:][:65]
        sn_b, ref1_b = bytes.fromhex(sn), bytes.fromhex(ref1)
        msg = (b"KLP1-RCT3" + bytes([len(sn_b)]) + sn_b + bytes.fromhex(r) + bytes([ref2])
               + bytes([len(ref1_b)]) + ref1_b + bytes.fromhex(header) + bytes.fromhex(kcv)
               + bytes.fromhex(e_a))
        assert _rct_verifies(q_u, bytes.fromhex(rct), msg), (sn, ref2)
    # the authority verifies them; the export shows E_A and C_U in the columns added at
    # the end (before a BDK's initial key ID, empty here)
    assert ok(home.run("ledger", "verify")).last_line() == \
        f"{2 * UNITS} receipts verified, 0 invalid"
    text = ok(home.run("ledger", "export", "--format", "csv")).stdout
    header = text.splitlines()[0].split(",")
    assert header[-3:] == ["e_a", "c_u", "initial_key_id"]
    exported = {(r["sn"], int(r["ref2"])): (r["e_a"], r["c_u"])
                for r in csv.DictReader(io.StringIO(text))}
    assert exported == {(sn, ref2): (e_a, c_u)
                        for sn, ref2, *_, e_a, c_u in rows}


def test_the_auditor_verifies_with_certificates_alone(home: Home) -> None:
    # a transport-key set's campaign in the same journal: its MAC receipts are counted apart
    ok(home.run("campaign", "create", "plain", "--set", home.t_set, "--load", "TMK:1",
                "--manifest", str(_manifest(home, ["7e000001"]))))
    ok(home.run("campaign", "run", "plain", "--quiet"))
    _create(home)
    ok(home.run("campaign", "run", "spring", "--quiet", "--threads", "3"))  # export3 locked
    trust = _trust(home)
    _no_authority(home)
    auditor = ("ledger", "verify", "--auditor", "--ca", trust)
    res = ok(home.run(*auditor, passphrase=None))
    assert res.last_line() == f"{2 * UNITS} receipts verified, 0 invalid"
    assert "1 receipt of suites 0x01/0x02 not verifiable without the authority" in res.stdout
    js = ok(home.run(*auditor, "--json", passphrase=None)).json()
    assert (js["verified"], js["invalid"], js["not_verifiable_without_authority"]) == \
        (2 * UNITS, 0, 1)
    # without the set's Q_CA nothing of it verifies; a Q_CA that is not the set's is refused
    res = home.run("ledger", "verify", "--auditor", passphrase=None)
    assert res.rc == EXIT_FAILED and f"no Q_CA known for set {home.id_set}" in res.stdout
    other = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        Encoding.X962, PublicFormat.UncompressedPoint)
    bad = home.run("ledger", "verify", "--auditor", "--ca", f"{home.id_set}={other.hex()}",
                   passphrase=None)
    assert bad.rc == EXIT_INPUT and "is not the key of set" in bad.stderr


def test_set_ca_prints_what_an_auditor_needs(base: Home) -> None:
    js = ok(base.run("set", "ca", "--set", base.id_set, "--json")).json()
    assert js["set_id"] == base.id_set and js["name"] == "plant"
    q_ca, c_a = bytes.fromhex(js["q_ca"]), bytes.fromhex(js["c_a"])
    assert len(q_ca) == 65 and q_ca[0] == 4
    assert hashlib.sha256(b"KLP1-SET" + q_ca).digest()[:5].hex() == base.id_set  # §10.1
    assert c_a[0] == 0xE1 and bytes.fromhex(base.id_set) in c_a
    text = ok(base.run("set", "ca", "--set", base.id_set)).stdout.splitlines()
    assert text[-1] == f"an auditor verifies this set's receipts with: keyload ledger " \
                       f"verify --auditor --ca {js['ca']}"
    res = base.run("set", "ca", "--set", base.t_set)
    assert res.rc == EXIT_INPUT and "not an identity set" in res.stderr
    assert base.run("ledger", "verify", "--auditor", "--state", "x.db").rc == EXIT_INPUT
    assert base.run("ledger", "verify", "--ca", js["ca"]).rc == EXIT_INPUT


@pytest.mark.parametrize("column", ["rct", "e_a", "c_u"])
def test_the_auditor_names_a_tampered_entry(home: Home, column: str) -> None:
    _create(home)
    ok(home.run("campaign", "run", "spring", "--quiet"))
    trust = _trust(home)
    _no_authority(home)
    db = home.journal()
    rows = db.execute("SELECT sn, ref2, e_a, c_u FROM loads ORDER BY seq, ref2").fetchall()
    sn, ref2 = rows[2][0], rows[2][1]
    if column == "rct":  # one bit of the signature
        (v,) = db.execute("SELECT rct FROM loads WHERE sn = ? AND ref2 = ?", (sn, ref2)).fetchone()
        new = v[:-2] + f"{int(v[-2:], 16) ^ 1:02x}"
    elif column == "e_a":  # another download's E_A: a genuine point, not this one
        new = rows[0][2]
    else:  # another unit's genuine certificate
        new = rows[-1][3]
    db.execute(f"UPDATE loads SET {column} = ? WHERE sn = ? AND ref2 = ?",  # noqa: S608
               (new, sn, ref2))
    db.commit()
    db.close()
    res = home.run("ledger", "verify", "--auditor", "--ca", trust, passphrase=None)
    assert res.rc == EXIT_FAILED, res.describe()
    assert "Traceback" not in res.output
    bad = [ln for ln in res.stdout.splitlines() if ln.startswith("INVALID")]
    assert bad == [f"INVALID receipt: campaign spring unit {sn} slot {ref2}: receipt does not "
                   "verify (the unit's certificate or signature)"]
    assert res.last_line() == f"{2 * UNITS - 1} receipts verified, 1 invalid"


def _manifest(home: Home, serials: list[str]) -> Path:
    p = home.path.parent / f"units-{len(serials)}.csv"
    p.write_text("sn\n" + "".join(f"{s}\n" for s in serials))
    return p


def test_a_revoked_unit_fails_6983_and_the_others_are_loaded(home: Home) -> None:
    revoked = SERIALS[3]
    ok(home.run("unit", "revoke", "--set", home.id_set, "--sn", revoked))
    _create(home)
    res = home.run("campaign", "run", "spring", "--quiet", "--json")
    assert res.rc == EXIT_FAILED, res.describe()
    out = res.json()
    assert out["status"]["states"] == {"planned": 0, "claimed": 0, "exported": 0,
                                       "imported": 2 * (UNITS - 1), "failed": 2}
    assert {(f["sn"], f["sw"]) for f in out["run"]["failures"]} == {(revoked, "6983")}
    st = ok(home.run("unit", "status", "--sn", revoked, "--json")).json()
    assert {s["state"] for s in st["slots"]} == {"empty"}
    assert ok(home.run("ledger", "verify")).last_line() == \
        f"{2 * (UNITS - 1)} receipts verified, 0 invalid"


# -- crash and resume ----------------------------------------------------------------------
IMPORTED_SQL = "SELECT count(*) FROM loads WHERE state = 'imported'"


def _kill_after_imports(home: Home, more: int) -> None:
    """``campaign run`` SIGKILLed once it has journaled ``more`` imports (a unit at a time)."""
    cmd = [str(KEYLOAD), "campaign", "run", "spring", "--station", "s1", "--batch", "1",
           "--quiet", "--home", str(home.path)]
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=cli_env())
    try:
        deadline = time.monotonic() + 120
        while sqlite_count(home.path / "journal.db", IMPORTED_SQL) < more and p.poll() is None:
            assert time.monotonic() < deadline, f"not {more} loads journaled in 120 s"
            time.sleep(0.002)
        assert p.poll() is None, "the run ended before the kill: raise UNITS"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_killed_mid_campaign_then_resumed_loads_every_unit_once(home: Home) -> None:
    _create(home)
    _kill_after_imports(home, 3)
    done = sqlite_count(home.path / "journal.db", IMPORTED_SQL)
    assert 3 <= done < 2 * UNITS
    out = ok(home.run("campaign", "run", "spring", "--station", "s1", "--quiet",
                      "--json")).json()
    assert out["status"]["states"]["imported"] == 2 * UNITS
    assert out["run"]["loads_failed"] == 0
    # a load the unit had imported before the kill was reconciled with the unit (its
    # slot's REF1, version and KCV), never exported again (a load killed after the
    # authority's export and before the journal's may be exported twice, never imported
    # twice: the unit had not received it)
    db = home.journal()
    imported = {(sn, ref2): t for sn, ref2, t in db.execute(
        "SELECT sn, ref2, updated FROM loads WHERE state = 'imported'")}
    db.close()
    xdb = sqlite3.connect(home.path / "authority" / "exports.db")
    late = [(sn, ref2) for sn, ref2, t in xdb.execute("SELECT sn, ref2, time FROM exports")
            if t > imported[(sn, ref2)]]
    xdb.close()
    assert late == []
    js = ok(home.run("ledger", "verify", "--json")).json()
    assert js["invalid"] == 0
    assert js["verified"] + js["reconciled_without_receipt"] == 2 * UNITS
    assert js["reconciled_without_receipt"] == out["run"]["reconciled"]


class _Killed(BaseException):
    """The station dies here (as under SIGKILL: nothing after it is written)."""


class _DiesAtImport:
    """The journal of a station that dies once the unit has answered IMPORTKEY of the
    ``n``-th load, before the import is journaled."""

    def __init__(self, inner: Journal, n: int) -> None:
        self._inner = inner
        self._left = n

    def imported(self, row: LoadRow, **kw: object) -> None:
        self._left -= 1
        if self._left == 0:
            raise _Killed
        self._inner.imported(row, **kw)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


def _run_until_killed(home: Home, n: int) -> None:
    station = StationHome.resolve(str(home.path), KekSource(passphrase=PASSPHRASE))
    journal = SqliteJournal(home.path / "journal.db")
    try:
        with pytest.raises(_Killed):
            run_emulated(station, _DiesAtImport(journal, n), "spring",  # type: ignore[arg-type]
                         RunOptions(station="s1", batch_units=1), on_unit=None,
                         interrupt=Interrupt())
    finally:
        journal.close()


def test_a_load_the_unit_imported_before_the_crash_is_reconciled_by_its_ref1(
        home: Home) -> None:
    """Killed between the unit's answer and the journal: the load stays ``exported``; the
    next run asks the unit (GET SLOT STATUS: REF1, header, KCV) and records it imported,
    without a second export."""
    _create(home)
    _run_until_killed(home, 3)
    db = home.journal()
    states = dict(db.execute("SELECT state, count(*) FROM loads GROUP BY state").fetchall())
    db.close()
    assert states["exported"] == 1 and states["imported"] == 2
    out = ok(home.run("campaign", "run", "spring", "--station", "s1", "--quiet",
                      "--json")).json()
    assert (out["run"]["reconciled"], out["run"]["loads_failed"]) == (1, 0)
    assert out["status"]["states"]["imported"] == 2 * UNITS
    assert _exports_per_load(home) == [1] * (2 * UNITS)
    js = ok(home.run("ledger", "verify", "--json")).json()
    assert (js["verified"], js["invalid"], js["reconciled_without_receipt"]) == \
        (2 * UNITS - 1, 0, 1)


def test_a_slot_holding_another_ref1_is_not_taken_for_the_planned_load(home: Home) -> None:
    """A unit whose slot 1 already holds another key at the planned version: a load left
    claimed there is not reconciled as done (the slot answers its REF1), it runs, and
    the unit refuses it (6986: version not higher)."""
    ok(home.run("key", "generate", "--ref1", "OLD", "--type", "aes256", "--usage", "K0",
                "--mode", "B", "--exportability", "E", "--key-version", "1", "--sets", "any",
                "--slots", "1"))
    sn = SERIALS[0]
    ok(home.run("load", "--sn", sn, "--ref1", "OLD", "--ref2", "1"))
    _create(home, [sn])
    journal = SqliteJournal(home.path / "journal.db")
    try:  # the station took the unit, then died before anything was sent
        assert len(journal.claim("spring", "s1", 1, 60.0, time.time())) == 2
    finally:
        journal.close()
    res = home.run("campaign", "run", "spring", "--station", "s1", "--quiet", "--json")
    assert res.rc == EXIT_FAILED, res.describe()
    out = res.json()
    assert out["run"]["reconciled"] == 0
    assert [(f["sn"], f["ref2"], f["sw"]) for f in out["run"]["failures"]] == [(sn, 1, "6986")]
    assert out["status"]["states"]["imported"] == 1


def test_a_single_load_keeps_e_a_and_c_u_and_receipts_check_them(home: Home) -> None:
    """``keyload load`` records E_A and C_U in station.db; ``keyload receipts`` verifies the
    receipt with them (the same check as the ledger's) and finds an E_A changed there."""
    sn = SERIALS[0]
    ok(home.run("load", "--sn", sn, "--ref1", "TMK", "--ref2", "1"))
    ok(home.run("load", "--sn", sn, "--ref1", "PEK", "--ref2", "2"))
    db = sqlite3.connect(home.path / "station.db")
    rows = db.execute("SELECT id, e_a, c_u FROM loads ORDER BY id").fetchall()
    assert len(rows) == 2 and all(len(bytes.fromhex(e_a)) == 65 for _, e_a, _ in rows)
    assert rows[0][2] == rows[1][2]  # one unit, one certificate
    assert ok(home.run("receipts")).last_line() == "2 receipts verified, 0 invalid"
    db.execute("UPDATE loads SET e_a = ? WHERE id = ?", (rows[1][1], rows[0][0]))
    db.commit()
    db.close()
    res = home.run("receipts", "--json")
    assert res.rc == EXIT_FAILED, res.describe()
    [bad] = res.json()["invalid_rows"]
    assert (bad["sn"], bad["ref2"]) == (sn, 1)
    assert "differs from the export: e_a" in bad["reason"]
    assert "receipt does not verify" in bad["reason"]


def test_identity_cards_presented_in_any_order_are_each_loaded(home: Home) -> None:
    """The cards' path (a reader presents units in a feeder's order): each card tells who
    it is by INITIALIZE DOWNLOAD of suite 0x03, then its loads run as in any campaign."""
    _create(home)
    station = StationHome.resolve(str(home.path), KekSource(passphrase=PASSPHRASE))
    journal = SqliteJournal(home.path / "journal.db")
    ks = station.open_keystore()
    fleet = EmulatedFleet.open(station.units_dir, station.source)
    try:
        authority = AuthorityClient(LocalConnection(station.authority(ks)))
        cards = [EmulatedUnitSource(fleet, bytes.fromhex(sn)) for sn in reversed(SERIALS)]
        run = run_campaign_cards(journal, "spring", authority, cards,
                                 RunOptions(station="reader"), identity=True)
        assert (run.loads_done, run.loads_failed, run.units_seen) == (2 * UNITS, 0, UNITS)
        assert run.failures == []
    finally:
        fleet.close()
        ks.close()
        journal.close()
    js = ok(home.run("ledger", "verify", "--json")).json()
    assert (js["verified"], js["invalid"]) == (2 * UNITS, 0)
