"""The service's ledger in ``keyload ledger verify`` and ``keyload ledger export``.

Real parts throughout: the real service over mutual TLS records the entries (``keyload
fetch`` in a subprocess), a real campaign fills the journal next to it, the software
authority re-verifies, and the CLI runs as the console script. Tampering is done in the
SQLite files (or PostgreSQL) directly, as an attacker with write access to them would.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keyload.core.errors import KeyloadError
from keyload.core.keys import KeyHeader
from keyload.lab.pgserver import postgres_available, private_postgres
from keyload.records.ledger import LEDGER_FIELDS
from keyload.service.client import HttpsAuthority
from keyload.service.ledger import (
    ServiceLedgerCheck,
    ServiceState,
    describe_state,
    exports_without_receipt,
    human_age,
    iso_utc,
    open_service_state,
    service_ledger,
    verify_service_ledger,
)
from keyload.station.load import UnitClient, load_key
from keyload.transports.local import LocalConnection
from keyload.units.authority import Authority
from keyload.units.keystore import SoftwareKeystore
from keyload.units.storage import KekSource

from ..conftest import require
from .cli_helpers import KEYLOAD, Result, assert_error, assert_no_secrets, ok, run
from .test_service import PASSPHRASE, World, build_world, policy_doc, start_service

pytestmark = pytest.mark.slow  # `keyload ledger` runs of the console script and real fetches

EXIT_FAILED, EXIT_STORE = 1, 4
LEGACY_KEYS = {"verified", "invalid", "reconciled_without_receipt", "invalid_rows"}
NO_UNRECEIPTED = {"total": 0, "claimed": 0, "by_client": [],
                  "by_age": {"under_1h": 0, "1h_to_1d": 0, "1d_to_7d": 0, "7d_or_more": 0}}


@dataclass
class Base:
    """A home whose service recorded 4 entries (2 clients) and whose journal holds a
    campaign of 2 loads; the service is stopped (tests copy the home to change it)."""

    world: World
    fetched: list[tuple[bytes, str, int, str]]  # (SN, REF1, REF2, client)
    campaign_units: list[bytes]
    secrets: dict[str, bytes]


def cli(*args: str | Path, home: Path) -> Result:
    return run(*args, home=home, passphrase=PASSPHRASE)


def fetch_cli(w: World, url: str, sn: bytes, ref1: str, ref2: int) -> None:
    cert, key = w.client_paths("terminal-1")
    res = cli("fetch", "--server", url, "--sn", sn.hex(), "--ref1", ref1, "--ref2", str(ref2),
              "--ca", w.pki / "ca.pem", "--cert", cert, "--key", key, "--json", home=w.home)
    assert ok(res).json()["ledger"] is True


def fetch_lib(w: World, url: str, sn: bytes, ref1: bytes, ref2: int, client: str) -> None:
    c = w.client(url, client)
    fleet = w.fleet()
    unit = fleet.open_unit(sn)
    try:
        res = load_key(UnitClient(LocalConnection(unit)), HttpsAuthority(c), ref1, ref2)
        assert c.post_receipt(res)["status"] == "recorded"
    finally:
        unit.close()
        fleet.close()
        c.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Base]:
    if not KEYLOAD.exists():
        pytest.skip("the keyload console script is not installed")
    w = build_world(tmp_path_factory.mktemp("service-ledger"), units=8)
    svc = start_service(w, policy_doc(w))
    try:
        fetched = [(w.units_a[0], "TMK-1", 1, "terminal-1"), (w.units_a[0], "PIN-1", 2,
                                                              "terminal-1"),
                   (w.units_a[1], "TMK-1", 1, "terminal-1")]
        for sn, ref1, ref2, _ in fetched:
            fetch_cli(w, svc.url, sn, ref1, ref2)
        fetch_lib(w, svc.url, w.unit_b, b"SECRET-9", 1, "other")
        fetched.append((w.unit_b, "SECRET-9", 1, "other"))
    finally:
        svc.stop()
    units = w.units_a[4:6]
    manifest = w.dir / "manifest.json"
    manifest.write_text(json.dumps([sn.hex() for sn in units]))
    ok(cli("campaign", "create", "spring", "--set", w.set_a.hex(), "--load", "TMK-1:1",
           "--manifest", manifest, home=w.home))
    ok(cli("campaign", "run", "spring", "--quiet", home=w.home))
    ks = w.open_keystore()
    try:
        secrets = {"T(A)": bytes(ks.transport_key_copy(w.set_a).buffer),
                   "T(B)": bytes(ks.transport_key_copy(w.set_b).buffer)}
    finally:
        ks.close()
    yield Base(w, fetched, list(units), secrets)


def copy_home(b: Base, dst: Path) -> Path:
    shutil.copytree(b.world.home, dst)
    return dst


def service_db(home: Path) -> Path:
    return home / "service.db"


def edit(home: Path, sql: str, *args: Any) -> int:
    db = sqlite3.connect(service_db(home))
    try:
        n = db.execute(sql, args).rowcount
        db.commit()
        return n
    finally:
        db.close()


def flip(hex_text: str) -> str:
    return ("0" if hex_text[0] != "0" else "1") + hex_text[1:]


def first_entry(home: Path, client: str = "terminal-1") -> tuple[str, str, int]:
    db = sqlite3.connect(service_db(home))
    try:
        sn, r, ref2 = db.execute("SELECT sn, r, ref2 FROM ledger WHERE client = ? "
                                 "ORDER BY time LIMIT 1", (client,)).fetchone()
        return str(sn), str(r), int(ref2)
    finally:
        db.close()


def ledger_rows(path: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return list(db.execute("SELECT * FROM ledger ORDER BY sn, r"))
    finally:
        db.close()


@contextmanager
def opened(home: Path, state: str | None = None) -> Iterator[tuple[ServiceState, Authority]]:
    """The service's state (through the same opener as the CLI) and the real authority."""
    ks = SoftwareKeystore.open(home / "authority", KekSource(passphrase=PASSPHRASE))
    try:
        store = open_service_state(state, home, home / "audit.db")
        assert store is not None
        try:
            yield store, Authority(ks)
        finally:
            store.close()
    finally:
        ks.close()


def svc_files(home: Path) -> list[str]:
    return sorted(p.name for p in home.glob("service.db*"))


# -- verification, as a function ------------------------------------------------------
def test_service_ledger_entries_from_real_fetches_verify(base: Base) -> None:
    home = base.world.home
    with opened(home) as (store, authority):
        chk = verify_service_ledger(store, authority, now=time.time(), state="here")
        entries = store.ledger()
    assert isinstance(chk, ServiceLedgerCheck)
    assert (chk.verified, chk.invalid, chk.invalid_rows) == (4, 0, [])
    assert chk.to_json() == {"state": "here", "verified": 4, "invalid": 0, "invalid_rows": [],
                             "without_receipt": NO_UNRECEIPTED}
    assert sorted((e.sn, e.ref2, e.client) for e in entries) == \
        sorted((sn, ref2, client) for sn, _, ref2, client in base.fetched)


# Each case: statements run on the first entry of terminal-1 (placeholders :sn, :r), what
# the reason must say, and what it must not.
TAMPER = {
    "rct": (["UPDATE ledger SET rct = :flip_rct WHERE sn = :sn AND r = :r"],
            ["receipt does not verify (SW 6982)"], ["differs"]),
    "kcv-in-ledger": (["UPDATE ledger SET kcv = :flip_kcv WHERE sn = :sn AND r = :r"],
                      ["differs from the export: kcv", "receipt does not verify"], []),
    "kcv-in-both": (["UPDATE ledger SET kcv = :flip_kcv WHERE sn = :sn AND r = :r",
                     "UPDATE challenges SET kcv = :flip_kcv WHERE sn = :sn AND r = :r"],
                    ["receipt does not verify"], ["differs"]),
    "kcv-short": (["UPDATE ledger SET kcv = substr(kcv, 1, 8) WHERE sn = :sn AND r = :r",
                   "UPDATE challenges SET kcv = substr(kcv, 1, 8) WHERE sn = :sn AND r = :r"],
                  ["KCV is 4 bytes", "receipt does not verify"], []),
    "key-version-in-both": (
        ["UPDATE ledger SET key_version = key_version + 1 WHERE sn = :sn AND r = :r",
         "UPDATE challenges SET key_version = key_version + 1 WHERE sn = :sn AND r = :r"],
        ["header version differs from the entry's key version"],
        ["receipt", "differs from the export"]),
    "header-version-in-both": (
        ["UPDATE ledger SET header = :bumped WHERE sn = :sn AND r = :r",
         "UPDATE challenges SET header = :bumped WHERE sn = :sn AND r = :r"],
        ["header version differs", "receipt does not verify"], ["differs from the export"]),
    "header-truncated": (
        ["UPDATE ledger SET header = substr(header, 1, 20) WHERE sn = :sn AND r = :r",
         "UPDATE challenges SET header = substr(header, 1, 20) WHERE sn = :sn AND r = :r"],
        ["header malformed"], []),
    "suite-in-both": (["UPDATE ledger SET suite = 3 - suite WHERE sn = :sn AND r = :r",
                       "UPDATE challenges SET suite = 3 - suite WHERE sn = :sn AND r = :r"],
                      ["header suite differs"], []),
    "ref1-in-ledger": (["UPDATE ledger SET ref1 = :other_ref1 WHERE sn = :sn AND r = :r"],
                       ["differs from the export: ref1"], ["receipt"]),
    "client-in-ledger": (["UPDATE ledger SET client = 'other' WHERE sn = :sn AND r = :r"],
                         ["differs from the export: client"], ["receipt"]),
    "ref2-in-both": (["UPDATE ledger SET ref2 = ref2 + 7 WHERE sn = :sn AND r = :r",
                      "UPDATE challenges SET ref2 = ref2 + 7 WHERE sn = :sn AND r = :r"],
                     ["receipt does not verify"], ["differs"]),
    "set-in-both": (["UPDATE ledger SET set_id = :set_b WHERE sn = :sn AND r = :r",
                     "UPDATE challenges SET set_id = :set_b WHERE sn = :sn AND r = :r"],
                    ["receipt does not verify"], ["differs"]),
    "unknown-set": (["UPDATE ledger SET set_id = 'ffffffffffffffff' WHERE sn = :sn AND r = :r",
                     "UPDATE challenges SET set_id = 'ffffffffffffffff' WHERE sn = :sn "
                     "AND r = :r"],
                    ["receipt does not verify"], []),
    "export-missing": (["DELETE FROM challenges WHERE sn = :sn AND r = :r"],
                       ["no export recorded for this (SN, R)"], []),
    "export-not-receipted": (
        ["UPDATE challenges SET state = 'exported' WHERE sn = :sn AND r = :r"],
        ["the export is exported, not receipted"], ["receipt does not"]),
}


def _params(home: Path, b: Base) -> dict[str, Any]:
    db = sqlite3.connect(service_db(home))
    try:
        sn, r, rct, kcv, header = db.execute(
            "SELECT sn, r, rct, kcv, header FROM ledger WHERE client = 'terminal-1' "
            "ORDER BY time LIMIT 1").fetchone()
    finally:
        db.close()
    h = KeyHeader.decode(bytes.fromhex(header))
    return {"sn": sn, "r": r, "flip_rct": flip(rct), "flip_kcv": flip(kcv),
            "bumped": h._replace(version=h.version + 1).encode().hex(),
            "other_ref1": b"PIN-1".hex(), "set_b": b.world.set_b.hex()}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_service_ledger_tampered_entry_is_invalid(base: Base, tmp_path: Path,
                                                  case: str) -> None:
    home = copy_home(base, tmp_path / "home")
    statements, want, unwanted = TAMPER[case]
    params = _params(home, base)
    db = sqlite3.connect(service_db(home))
    try:
        for sql in statements:
            assert db.execute(sql, params).rowcount == 1, sql
        db.commit()
    finally:
        db.close()
    with opened(home) as (store, authority):
        chk = verify_service_ledger(store, authority, now=time.time())
    assert (chk.verified, chk.invalid) == (3, 1), chk
    (row,) = chk.invalid_rows
    assert row["r"] == params["r"] and row["client"] in ("terminal-1", "other")
    for text in want:
        assert text in row["reason"], (case, row["reason"])
    for text in unwanted:
        assert text not in row["reason"], (case, row["reason"])
    assert set(row) == {"sn", "ref2", "ref1", "set_id", "r", "client", "time", "reason"}


def test_service_ledger_every_entry_tampered_is_reported(base: Base, tmp_path: Path) -> None:
    home = copy_home(base, tmp_path / "home")
    assert edit(home, "UPDATE ledger SET rct = '00000000000000000000000000000000'") == 4
    with opened(home) as (store, authority):
        chk = verify_service_ledger(store, authority, now=time.time())
    assert (chk.verified, chk.invalid) == (0, 4)
    assert sorted((r["sn"], r["ref2"]) for r in chk.invalid_rows) == \
        sorted((sn.hex(), ref2) for sn, _, ref2, _ in base.fetched)


def test_service_ledger_empty_service_state_verifies_nothing(base: Base, tmp_path: Path) -> None:
    home = copy_home(base, tmp_path / "home")
    edit(home, "DELETE FROM ledger")
    with opened(home) as (store, authority):
        chk = verify_service_ledger(store, authority, now=time.time())
    assert (chk.verified, chk.invalid, chk.invalid_rows) == (0, 0, [])


def test_service_ledger_open_state_creates_nothing(tmp_path: Path) -> None:
    assert open_service_state(None, tmp_path, tmp_path / "audit.db") is None
    assert list(tmp_path.iterdir()) == []


def test_service_ledger_describe_state_hides_credentials(tmp_path: Path) -> None:
    assert describe_state(None, tmp_path) == str(tmp_path / "service.db")
    assert describe_state("x/state.db", tmp_path) == "x/state.db"
    url = "postgresql://keyload:s3cret@db.example:5433/ledger?sslmode=require&password=p2"
    assert describe_state(url, tmp_path) == "postgresql://db.example:5433/ledger"
    assert describe_state("postgres:///svc?host=/run/pg&password=p2", tmp_path) == \
        "postgres:///svc"


# -- verification, through the CLI -----------------------------------------------------
def test_service_ledger_verify_json_counts_each_source(base: Base) -> None:
    home = base.world.home
    before = ledger_rows(service_db(home))
    res = ok(cli("ledger", "verify", "--json", home=home))
    doc = res.json()
    assert set(doc) >= LEGACY_KEYS
    assert set(doc) == LEGACY_KEYS | {"campaigns", "service"}
    assert (doc["verified"], doc["invalid"], doc["reconciled_without_receipt"]) == (6, 0, 0)
    assert doc["invalid_rows"] == []
    assert doc["campaigns"] == {"verified": 2, "invalid": 0, "reconciled_without_receipt": 0,
                                "invalid_rows": []}
    assert doc["service"] == {"state": str(service_db(home)), "verified": 4, "invalid": 0,
                              "invalid_rows": [], "without_receipt": NO_UNRECEIPTED}
    assert_no_secrets(res.output, base.secrets)
    assert ledger_rows(service_db(home)) == before  # read, not written


def test_service_ledger_verify_human_output_per_source(base: Base) -> None:
    home = base.world.home
    res = ok(cli("ledger", "verify", home=home))
    lines = res.stdout.splitlines()
    assert lines == ["campaign ledger: 2 receipts verified, 0 invalid",
                     f"service ledger ({service_db(home)}): 4 receipts verified, 0 invalid",
                     "6 receipts verified, 0 invalid"]
    assert res.stderr == ""


def test_service_ledger_verify_tampered_receipt_exits_1(base: Base, tmp_path: Path) -> None:
    home = copy_home(base, tmp_path / "home")
    sn, r, ref2 = first_entry(home)
    assert edit(home, "UPDATE ledger SET rct = ? WHERE sn = ? AND r = ?",
                flip(first_rct(home, sn, r)), sn, r) == 1
    res = cli("ledger", "verify", home=home)
    assert res.rc == EXIT_FAILED, res.describe()
    assert "Traceback" not in res.output
    assert f"INVALID receipt: service client terminal-1 unit {sn} slot {ref2}: receipt does " \
           "not verify (SW 6982)" in res.stdout
    assert "service ledger (" in res.stdout and "3 receipts verified, 1 invalid" in res.stdout
    assert "campaign ledger: 2 receipts verified, 0 invalid" in res.stdout
    assert res.last_line() == "5 receipts verified, 1 invalid"
    js = cli("ledger", "verify", "--json", home=home)
    assert js.rc == EXIT_FAILED, js.describe()
    doc = js.json()
    assert (doc["verified"], doc["invalid"]) == (5, 1)
    assert doc["campaigns"]["invalid"] == 0
    assert (doc["service"]["verified"], doc["service"]["invalid"]) == (3, 1)
    (row,) = doc["service"]["invalid_rows"]
    assert (row["sn"], row["r"], row["ref2"], row["client"]) == (sn, r, ref2, "terminal-1")
    assert doc["invalid_rows"] == [{"source": "service", "campaign": None, **row}]
    assert_no_secrets(res.output + js.output, base.secrets)


def first_rct(home: Path, sn: str, r: str) -> str:
    db = sqlite3.connect(service_db(home))
    try:
        return str(db.execute("SELECT rct FROM ledger WHERE sn = ? AND r = ?",
                              (sn, r)).fetchone()[0])
    finally:
        db.close()


def test_service_ledger_verify_tampered_kcv_and_campaign_both_reported(
        base: Base, tmp_path: Path) -> None:
    home = copy_home(base, tmp_path / "home")
    sn, r, ref2 = first_entry(home, "other")
    db = sqlite3.connect(service_db(home))
    kcv = db.execute("SELECT kcv FROM ledger WHERE sn = ? AND r = ?", (sn, r)).fetchone()[0]
    db.close()
    assert edit(home, "UPDATE ledger SET kcv = ? WHERE sn = ? AND r = ?", flip(kcv), sn, r) == 1
    jdb = sqlite3.connect(home / "journal.db")
    csn, cref2, crct = jdb.execute("SELECT sn, ref2, rct FROM loads LIMIT 1").fetchone()
    jdb.execute("UPDATE loads SET rct = ? WHERE sn = ? AND ref2 = ?", (flip(crct), csn, cref2))
    jdb.commit()
    jdb.close()
    res = cli("ledger", "verify", "--json", home=home)
    assert res.rc == EXIT_FAILED, res.describe()
    doc = res.json()
    assert (doc["verified"], doc["invalid"]) == (4, 2)
    assert (doc["campaigns"]["verified"], doc["campaigns"]["invalid"]) == (1, 1)
    assert (doc["service"]["verified"], doc["service"]["invalid"]) == (3, 1)
    srcs = sorted((x["source"], x["campaign"], x["sn"]) for x in doc["invalid_rows"])
    assert srcs == [("campaign", "spring", csn), ("service", None, sn)]
    (row,) = doc["service"]["invalid_rows"]
    assert row["client"] == "other" and "differs from the export: kcv" in row["reason"]
    human = cli("ledger", "verify", home=home)
    assert human.rc == EXIT_FAILED
    assert f"INVALID receipt: campaign spring unit {csn} slot {cref2}" in human.stdout
    assert f"INVALID receipt: service client other unit {sn} slot {ref2}:" in human.stdout


def test_service_ledger_home_without_service_db_creates_nothing(base: Base,
                                                                tmp_path: Path) -> None:
    home = copy_home(base, tmp_path / "home")
    for p in home.glob("service.db*"):
        p.unlink()
    doc = ok(cli("ledger", "verify", "--json", home=home)).json()
    assert (doc["verified"], doc["invalid"]) == (2, 0)
    assert doc["service"] == {"state": None, "verified": 0, "invalid": 0, "invalid_rows": [],
                              "without_receipt": NO_UNRECEIPTED}
    res = ok(cli("ledger", "verify", home=home))
    assert f"service ledger: not checked (no {service_db(home)})" in res.stdout
    assert res.last_line() == "2 receipts verified, 0 invalid"
    rows = json.loads(ok(cli("ledger", "export", "--format", "json", home=home)).stdout)
    assert {e["source"] for e in rows} == {"campaign"} and len(rows) == 2
    assert svc_files(home) == []


def test_service_ledger_home_without_campaigns_or_service_db(base: Base,
                                                             tmp_path: Path) -> None:
    home = copy_home(base, tmp_path / "home")
    for p in [*home.glob("service.db*"), *home.glob("journal.db*")]:
        p.unlink()
    res = ok(cli("ledger", "verify", home=home))
    assert res.stdout.splitlines() == [
        "campaign ledger: 0 receipts verified, 0 invalid",
        f"service ledger: not checked (no {service_db(home)})",
        "0 receipts verified, 0 invalid"]
    doc = ok(cli("ledger", "verify", "--json", home=home)).json()
    assert (doc["verified"], doc["invalid"], doc["invalid_rows"]) == (0, 0, [])
    assert doc["service"]["state"] is None and doc["service"]["verified"] == 0
    text = ok(cli("ledger", "export", home=home)).stdout
    assert text.splitlines() == [",".join(LEDGER_FIELDS)]
    assert svc_files(home) == []


def test_service_ledger_state_option_non_default_sqlite(base: Base, tmp_path: Path) -> None:
    home = copy_home(base, tmp_path / "home")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    moved = elsewhere / "state.db"
    src = sqlite3.connect(service_db(home))
    dst = sqlite3.connect(moved)
    src.backup(dst)
    src.close()
    dst.close()
    for p in home.glob("service.db*"):
        p.unlink()
    doc = ok(cli("ledger", "verify", "--json", home=home)).json()
    assert doc["service"]["state"] is None and doc["verified"] == 2
    doc = ok(cli("ledger", "verify", "--json", "--state", moved, home=home)).json()
    assert doc["service"] == {"state": str(moved), "verified": 4, "invalid": 0,
                              "invalid_rows": [], "without_receipt": NO_UNRECEIPTED}
    assert doc["verified"] == 6
    assert svc_files(home) == []
    rows = json.loads(ok(cli("ledger", "export", "--format", "json", "--state", moved,
                             home=home)).stdout)
    assert sum(e["source"] == "service" for e in rows) == 4


def test_service_ledger_state_option_errors(base: Base, tmp_path: Path) -> None:
    home = copy_home(base, tmp_path / "home")
    missing = tmp_path / "nowhere" / "service.db"
    for action in ("verify", "export"):
        assert_error(cli("ledger", action, "--state", missing, home=home), EXIT_STORE,
                     "no service state at", str(missing))
        assert not missing.exists() and not missing.parent.exists()
        assert_error(cli("ledger", action, "--state", tmp_path, home=home), EXIT_STORE,
                     "no service state at")
    # a database that is not the service's (the journal) is refused and left as it was
    journal = home / "journal.db"

    def tables() -> list[str]:
        db = sqlite3.connect(journal)
        try:
            return sorted(n for (n,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"))
        finally:
            db.close()
    before = tables()
    for action in ("verify", "export"):
        assert_error(cli("ledger", action, "--state", journal, home=home), EXIT_STORE,
                     "not a keyload service state")
    assert tables() == before and "ledger" not in before
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database " * 100)
    assert_error(cli("ledger", "verify", "--state", junk, home=home), EXIT_STORE,
                 f"damaged store {junk}: not a SQLite database")
    # the default service.db, when damaged, is an error too (not silently skipped)
    service_db(home).write_bytes(b"damaged " * 200)
    for p in home.glob("service.db-*"):
        p.unlink()
    assert_error(cli("ledger", "verify", home=home), EXIT_STORE,
                 "service.db: not a SQLite database")


def test_service_ledger_campaign_option_leaves_service_out_unless_state(base: Base) -> None:
    home = base.world.home
    res = ok(cli("ledger", "verify", "--campaign", "spring", home=home))
    assert "service ledger: not checked (--campaign given)" in res.stdout
    assert res.last_line() == "2 receipts verified, 0 invalid"
    doc = ok(cli("ledger", "verify", "--campaign", "spring", "--json", home=home)).json()
    assert (doc["verified"], doc["service"]["state"]) == (2, None)
    doc = ok(cli("ledger", "verify", "--campaign", "spring", "--json", "--state",
                 service_db(home), home=home)).json()
    assert (doc["verified"], doc["campaigns"]["verified"], doc["service"]["verified"]) == \
        (6, 2, 4)
    rows = json.loads(ok(cli("ledger", "export", "--format", "json", "--campaign", "spring",
                             home=home)).stdout)
    assert {e["source"] for e in rows} == {"campaign"}


# -- export ----------------------------------------------------------------------------
def test_service_ledger_export_includes_service_entries(base: Base) -> None:
    home = base.world.home
    res = ok(cli("ledger", "export", "--format", "csv", home=home))
    text = res.stdout
    assert text.splitlines()[0] == ",".join(LEDGER_FIELDS)
    assert sum(line == ",".join(LEDGER_FIELDS) for line in text.splitlines()) == 1
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 6
    camp = [r for r in rows if r["source"] == "campaign"]
    svc = [r for r in rows if r["source"] == "service"]
    assert len(camp) == 2 and len(svc) == 4
    assert {r["campaign"] for r in camp} == {"spring"} and all(r["client"] == "" for r in camp)
    assert {r["set_id"] for r in camp} == {base.world.set_a.hex()}
    assert {bytes.fromhex(r["sn"]) for r in camp} == set(base.campaign_units)
    assert all(r["campaign"] == "" and r["station"] == "" for r in svc)
    assert sorted((r["sn"], r["ref1"], int(r["ref2"]), r["client"]) for r in svc) == \
        sorted((sn.hex(), ref1, ref2, client) for sn, ref1, ref2, client in base.fetched)
    assert {r["set_id"] for r in svc} == {base.world.set_a.hex(), base.world.set_b.hex()}
    for r in rows:
        assert len(r["receipt"]) == 32 and len(r["kcv"]) == 10 and len(r["r"]) == 32
        assert r["kcv"] == r["kcv"].upper() and len(r["header"]) == 24
        assert KeyHeader.decode(bytes.fromhex(r["header"])).version == int(r["key_version"])
    js = json.loads(ok(cli("ledger", "export", "--format", "json", home=home)).stdout)
    assert all(set(e) == set(LEDGER_FIELDS) for e in js)
    assert sorted((e["source"], e["sn"], e["ref2"]) for e in js) == \
        sorted((r["source"], r["sn"], int(r["ref2"])) for r in rows)
    for e in js:
        if e["source"] == "service":
            assert e["campaign"] is None and e["reconciled"] is False
            assert e["client"] in ("terminal-1", "other") and isinstance(e["time"], float)
        else:
            assert e["campaign"] == "spring" and e["client"] is None
    assert_no_secrets(text + json.dumps(js), base.secrets)


def test_service_ledger_export_to_file_counts_each_source(base: Base, tmp_path: Path) -> None:
    home = base.world.home
    out = tmp_path / "ledger.json"
    res = ok(cli("ledger", "export", "--format", "json", "--out", out, home=home))
    assert res.stdout == (f"6 ledger entries written to {out} (2 from campaigns, "
                          "4 from the service)\n")
    assert len(json.loads(out.read_text())) == 6
    out_csv = tmp_path / "ledger.csv"
    ok(cli("ledger", "export", "--out", out_csv, home=home))
    assert len(list(csv.DictReader(out_csv.open()))) == 6


def test_service_ledger_library_export_matches_store(base: Base) -> None:
    with opened(base.world.home) as (store, _):
        entries = list(service_ledger(store))
        raw = store.ledger()
    assert [e["sn"] for e in entries] == [x.sn.hex() for x in raw]
    assert all(e["source"] == "service" and set(e) == set(LEDGER_FIELDS) for e in entries)


# -- the service running, and PostgreSQL ------------------------------------------------
def test_service_ledger_verify_while_the_service_runs(base: Base, tmp_path: Path) -> None:
    home = copy_home(base, tmp_path / "home")
    w = dataclasses.replace(base.world, home=home)
    svc = start_service(w, policy_doc(w))
    try:
        doc = ok(cli("ledger", "verify", "--json", home=home)).json()
        assert doc["service"]["verified"] == 4
        fetch_cli(w, svc.url, w.units_a[2], "TMK-1", 1)  # the service still writes
        doc = ok(cli("ledger", "verify", "--json", home=home)).json()
        assert (doc["service"]["verified"], doc["service"]["invalid"]) == (5, 0)
        assert len(svc.inst.store.ledger()) == 5
    finally:
        svc.stop()


@pytest.mark.hardware
def test_service_ledger_postgres_state(base: Base, tmp_path: Path) -> None:
    ok_pg, why = postgres_available()
    require(ok_pg, f"PostgreSQL: {why}")
    home = copy_home(base, tmp_path / "home")
    w = dataclasses.replace(base.world, home=home)
    with private_postgres(tmp_path / "pg") as url:
        svc = start_service(w, policy_doc(w), state=url)
        try:
            fetch_cli(w, svc.url, w.units_a[3], "TMK-1", 1)
            fetch_cli(w, svc.url, w.units_a[3], "PIN-1", 2)
        finally:
            svc.stop()
        doc = ok(cli("ledger", "verify", "--json", "--state", url, home=home)).json()
        assert doc["service"]["state"] == describe_state(url, home)
        assert "?" not in doc["service"]["state"]
        assert (doc["service"]["verified"], doc["service"]["invalid"]) == (2, 0)
        assert doc["campaigns"]["verified"] == 2 and doc["verified"] == 4
        rows = json.loads(ok(cli("ledger", "export", "--format", "json", "--state", url,
                                 home=home)).stdout)
        assert sorted(e["ref1"] for e in rows if e["source"] == "service") == \
            ["PIN-1", "TMK-1"]
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            found = conn.execute("SELECT sn, r, rct FROM ledger WHERE ref2 = 1").fetchone()
            assert found is not None
            sn, r, rct = found
            conn.execute("UPDATE ledger SET rct = %s WHERE sn = %s AND r = %s",
                         (flip(rct), sn, r))
        res = cli("ledger", "verify", "--state", url, home=home)
        assert res.rc == EXIT_FAILED, res.describe()
        assert f"INVALID receipt: service client terminal-1 unit {sn} slot 1" in res.stdout
        assert res.last_line() == "3 receipts verified, 1 invalid"
        assert "?host=" not in res.output  # the URL's details stay out of the output
        with opened(home, url) as (store, authority):
            chk = verify_service_ledger(store, authority, now=time.time())
        assert (chk.verified, chk.invalid) == (1, 1)


# -- exports without a receipt ----------------------------------------------------------
HOUR, DAY = 3600.0, 86400.0


def export_only(w: World, url: str, sn: bytes, ref1: bytes, ref2: int, client: str) -> None:
    """A real download through the service whose receipt is never posted (the key left
    the service; the unit holds it; the ledger does not know)."""
    c = w.client(url, client)
    fleet = w.fleet()
    unit = fleet.open_unit(sn)
    try:
        res = load_key(UnitClient(LocalConnection(unit)), HttpsAuthority(c), ref1, ref2)
        assert res.sn == sn and len(res.rct) == 16  # the unit's receipt, kept to ourselves
    finally:
        unit.close()
        fleet.close()
        c.close()


def refused_export(w: World, url: str, sn: bytes) -> None:
    """A challenge the authority refused (REF1 unknown): state refused, never counted."""
    c = w.client(url, "terminal-1")
    fleet = w.fleet()
    unit = fleet.open_unit(sn)
    try:
        with pytest.raises(KeyloadError):
            load_key(UnitClient(LocalConnection(unit)), HttpsAuthority(c), b"GHOST", 3)
    finally:
        unit.close()
        fleet.close()
        c.close()


@dataclass
class Unreceipted:
    """The base home, then: 4 exports without receipt (3 by terminal-1, 1 by other), one
    more receipted (other), one refused (terminal-1); the service stopped again."""

    home: Path
    times: dict[str, list[float]]  # client -> claim times of its unreceipted exports
    secrets: dict[str, bytes]


UNRECEIPTED_BY_CLIENT = {"terminal-1": 3, "other": 1}


@pytest.fixture(scope="module")
def unreceipted(base: Base, tmp_path_factory: pytest.TempPathFactory) -> Unreceipted:
    home = copy_home(base, tmp_path_factory.mktemp("unreceipted") / "home")
    w = dataclasses.replace(base.world, home=home)
    svc = start_service(w, policy_doc(w))
    try:
        export_only(w, svc.url, w.units_a[2], b"TMK-1", 1, "terminal-1")
        export_only(w, svc.url, w.units_a[2], b"PIN-1", 2, "terminal-1")
        fetch_lib(w, svc.url, w.units_a[7], b"TMK-1", 1, "other")  # receipted
        export_only(w, svc.url, w.units_a[6], b"SECRET-9", 1, "other")
        refused_export(w, svc.url, w.units_a[3])
        export_only(w, svc.url, w.units_a[3], b"TMK-1", 1, "terminal-1")
    finally:
        svc.stop()
    return Unreceipted(home, challenge_times(service_db(home), "exported"), base.secrets)


def challenge_times(path: Path, state: str) -> dict[str, list[float]]:
    db = sqlite3.connect(path)
    try:
        out: dict[str, list[float]] = {}
        for client, t in db.execute("SELECT client, time FROM challenges WHERE state = ? "
                                    "ORDER BY time", (state,)):
            out.setdefault(str(client), []).append(float(t))
        return out
    finally:
        db.close()


def test_unreceipted_fixture_is_what_it_says(unreceipted: Unreceipted) -> None:
    db = sqlite3.connect(service_db(unreceipted.home))
    try:
        states = dict(db.execute("SELECT state, COUNT(*) FROM challenges GROUP BY state"))
        entries = db.execute("SELECT COUNT(*) FROM ledger").fetchone()[0]
    finally:
        db.close()
    assert states == {"receipted": 5, "exported": 4, "refused": 1}
    assert entries == 5
    assert {c: len(t) for c, t in unreceipted.times.items()} == UNRECEIPTED_BY_CLIENT


def test_unreceipted_exports_from_the_store(unreceipted: Unreceipted) -> None:
    with opened(unreceipted.home) as (store, _):
        rows = store.unreceipted_exports()
    assert [t for _, _, t in rows] == sorted(t for _, _, t in rows)  # oldest first
    assert sorted(rows) == sorted((c, "exported", t) for c, ts in unreceipted.times.items()
                                  for t in ts)


def test_unreceipted_ages_from_an_injected_now(unreceipted: Unreceipted) -> None:
    times = unreceipted.times
    last = max(t for ts in times.values() for t in ts)
    for now, bucket in ((last + 5.0, "under_1h"), (last + HOUR, "1h_to_1d"),
                        (last + 2 * DAY, "1d_to_7d"), (last + 7 * DAY, "7d_or_more")):
        with opened(unreceipted.home) as (store, authority):
            chk = verify_service_ledger(store, authority, now=now)
        assert (chk.verified, chk.invalid) == (5, 0)
        wr = chk.without_receipt.to_json()
        assert (wr["total"], wr["claimed"]) == (4, 0)
        assert wr["by_age"] == {**NO_UNRECEIPTED["by_age"], bucket: 4}, (now - last, wr)
        assert [(c["client"], c["count"]) for c in wr["by_client"]] == \
            list(UNRECEIPTED_BY_CLIENT.items())
        for c in wr["by_client"]:
            ts = times[c["client"]]
            assert c["oldest_age_s"] == round(now - min(ts), 3)
            assert c["newest_age_s"] == round(now - max(ts), 3)
            assert c["oldest"] == iso_utc(min(ts)) and c["newest"] == iso_utc(max(ts))


def test_unreceipted_grouping_and_ages_as_a_function() -> None:
    now = 1_700_000_000.0
    rows = [("b", "exported", now - 7 * DAY - 1), ("a", "exported", now - 7 * DAY + 1),
            ("a", "exported", now - DAY), ("b", "claimed", now - 3 * DAY),
            ("a", "exported", now - DAY + 0.5), ("c", "exported", now - HOUR),
            ("a", "exported", now - HOUR + 1), ("c", "exported", now),
            ("c", "exported", now + 30.0),  # ahead of now: another instance's clock
            ("a", "refused", now - 1), ("a", "receipted", now - 1), ("d", "claimed", now)]
    wr = exports_without_receipt(rows, now)
    assert (wr.total, wr.claimed, wr.now) == (8, 2, now)
    assert wr.by_age == {"under_1h": 3, "1h_to_1d": 2, "1d_to_7d": 2, "7d_or_more": 1}
    assert wr.to_json()["by_client"] == [
        {"client": "a", "count": 4, "oldest": iso_utc(now - 7 * DAY + 1),
         "newest": iso_utc(now - HOUR + 1), "oldest_age_s": 7 * DAY - 1,
         "newest_age_s": HOUR - 1},
        {"client": "c", "count": 3, "oldest": iso_utc(now - HOUR), "newest": iso_utc(now + 30),
         "oldest_age_s": HOUR, "newest_age_s": 0.0},
        {"client": "b", "count": 1, "oldest": iso_utc(now - 7 * DAY - 1),
         "newest": iso_utc(now - 7 * DAY - 1), "oldest_age_s": 7 * DAY + 1,
         "newest_age_s": 7 * DAY + 1}]
    assert (wr.oldest, wr.newest) == (now - 7 * DAY - 1, now + 30)
    assert iso_utc(now) == "2023-11-14T22:13:20Z"
    assert [human_age(s) for s in (-4, 0, 59.9, 60, 179, 3599, 3600, 7199, DAY - 1, DAY,
                                   5 * DAY + 3 * HOUR, 400 * DAY)] == \
        ["0s", "0s", "59s", "1m", "2m", "59m", "1h", "1h", "23h", "1d", "5d", "400d"]
    empty = exports_without_receipt([], now)
    assert empty.to_json() == NO_UNRECEIPTED and (empty.oldest, empty.newest) == (None, None)


def test_unreceipted_verify_json_by_client(unreceipted: Unreceipted) -> None:
    home = unreceipted.home
    before = ledger_rows(service_db(home))
    t0 = time.time()
    res = cli("ledger", "verify", "--json", home=home)
    t1 = time.time()
    assert res.rc == 0, res.describe()  # reported, like reconciled_without_receipt
    doc = res.json()
    assert set(doc) == LEGACY_KEYS | {"campaigns", "service"}
    assert (doc["verified"], doc["invalid"], doc["reconciled_without_receipt"]) == (7, 0, 0)
    svc = doc["service"]
    assert (svc["state"], svc["verified"], svc["invalid"], svc["invalid_rows"]) == \
        (str(service_db(home)), 5, 0, [])
    wr = svc["without_receipt"]
    assert set(wr) == {"total", "claimed", "by_client", "by_age"}
    assert (wr["total"], wr["claimed"]) == (4, 0)
    assert wr["by_age"] == {**NO_UNRECEIPTED["by_age"], "under_1h": 4}
    times = unreceipted.times
    assert [(c["client"], c["count"], c["oldest"], c["newest"]) for c in wr["by_client"]] == \
        [(c, n, iso_utc(min(times[c])), iso_utc(max(times[c])))
         for c, n in UNRECEIPTED_BY_CLIENT.items()]
    for c in wr["by_client"]:
        ts = times[c["client"]]
        assert t0 - min(ts) - 0.01 <= c["oldest_age_s"] <= t1 - min(ts) + 0.01
        assert t0 - max(ts) - 0.01 <= c["newest_age_s"] <= t1 - max(ts) + 0.01
    assert_no_secrets(res.output, unreceipted.secrets)
    assert ledger_rows(service_db(home)) == before  # read, not written


def test_unreceipted_verify_text_by_client(unreceipted: Unreceipted) -> None:
    home = unreceipted.home
    res = cli("ledger", "verify", home=home)
    assert res.rc == 0, res.describe()
    times = unreceipted.times
    first = min(t for ts in times.values() for t in ts)
    last = max(t for ts in times.values() for t in ts)
    lines = res.stdout.splitlines()
    assert lines[0] == ("4 service exports without receipt (the key left the service, no "
                        "receipt was posted), by client:")
    assert lines[1].split() == ["client", "exports", "oldest", "age", "newest", "age"]
    rows = [line.split() for line in lines[3:6]]
    assert [[r[0], r[2], r[4]] for r in rows] == [
        ["terminal-1", iso_utc(min(times["terminal-1"])), iso_utc(max(times["terminal-1"]))],
        ["other", iso_utc(min(times["other"])), iso_utc(max(times["other"]))],
        ["total", iso_utc(first), iso_utc(last)]]
    assert [r[1] for r in rows] == ["3", "1", "4"]
    assert all(r[3].endswith(("s", "m")) and r[5].endswith(("s", "m")) for r in rows)
    assert lines[6:] == [
        "campaign ledger: 2 receipts verified, 0 invalid",
        f"service ledger ({service_db(home)}): 5 receipts verified, 0 invalid",
        "service exports without receipt: 4 (< 1 h: 4, < 1 day: 0, < 7 days: 0, older: 0)",
        "7 receipts verified, 0 invalid"]
    assert res.stderr == ""


def test_unreceipted_claimed_counted_apart_and_tampered_not_taken_for_one(
        unreceipted: Unreceipted, tmp_path: Path) -> None:
    home = tmp_path / "home"
    shutil.copytree(unreceipted.home, home)
    # a request that died between its claim and the authority's answer
    assert edit(home, "UPDATE challenges SET state = 'claimed', sw = NULL "
                      "WHERE state = 'refused'") == 1
    # a receipted export set back to exported: its ledger entry is invalid, and it has one
    sn, r, ref2 = first_entry(home)
    assert edit(home, "UPDATE challenges SET state = 'exported' WHERE sn = ? AND r = ?",
                sn, r) == 1
    res = cli("ledger", "verify", "--json", home=home)
    assert res.rc == EXIT_FAILED, res.describe()
    svc = res.json()["service"]
    assert (svc["verified"], svc["invalid"]) == (4, 1)
    assert "the export is exported, not receipted" in svc["invalid_rows"][0]["reason"]
    wr = svc["without_receipt"]
    assert (wr["total"], wr["claimed"]) == (4, 1)
    assert [(c["client"], c["count"]) for c in wr["by_client"]] == \
        list(UNRECEIPTED_BY_CLIENT.items())
    text = cli("ledger", "verify", home=home)
    assert text.rc == EXIT_FAILED
    assert "service challenges left claimed (never exported nor refused): 1" in text.stdout
    assert f"INVALID receipt: service client terminal-1 unit {sn} slot {ref2}:" in text.stdout
    assert text.last_line() == "6 receipts verified, 1 invalid"
    # with the receipts all missing, every export is one without receipt
    assert edit(home, "DELETE FROM ledger") == 5
    assert edit(home, "UPDATE challenges SET state = 'exported' WHERE state = 'receipted'") \
        == 4
    doc = ok(cli("ledger", "verify", "--json", home=home)).json()
    assert (doc["service"]["verified"], doc["service"]["invalid"]) == (0, 0)
    wr = doc["service"]["without_receipt"]
    assert (wr["total"], wr["claimed"]) == (9, 1)
    assert sorted((c["client"], c["count"]) for c in wr["by_client"]) == \
        [("other", 3), ("terminal-1", 6)]


def test_unreceipted_campaign_option_leaves_them_out(unreceipted: Unreceipted) -> None:
    res = ok(cli("ledger", "verify", "--campaign", "spring", home=unreceipted.home))
    assert "without receipt" not in res.stdout
    doc = ok(cli("ledger", "verify", "--campaign", "spring", "--json",
                 home=unreceipted.home)).json()
    assert doc["service"]["state"] is None
    assert doc["service"]["without_receipt"] == NO_UNRECEIPTED


@pytest.mark.hardware
def test_unreceipted_postgres_state(base: Base, tmp_path: Path) -> None:
    ok_pg, why = postgres_available()
    require(ok_pg, f"PostgreSQL: {why}")
    home = copy_home(base, tmp_path / "home")
    w = dataclasses.replace(base.world, home=home)
    with private_postgres(tmp_path / "pg") as url:
        svc = start_service(w, policy_doc(w), state=url)
        try:
            fetch_cli(w, svc.url, w.units_a[3], "TMK-1", 1)
            export_only(w, svc.url, w.units_a[3], b"PIN-1", 2, "terminal-1")
            export_only(w, svc.url, w.units_a[6], b"SECRET-9", 1, "other")
            export_only(w, svc.url, w.units_a[7], b"SECRET-9", 1, "other")
            refused_export(w, svc.url, w.units_a[2])
        finally:
            svc.stop()
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            times: dict[str, list[float]] = {}
            for client, t in conn.execute("SELECT client, time FROM challenges "
                                          "WHERE state = 'exported' ORDER BY time"):
                times.setdefault(client, []).append(float(t))
        assert {c: len(ts) for c, ts in times.items()} == {"terminal-1": 1, "other": 2}
        res = cli("ledger", "verify", "--json", "--state", url, home=home)
        assert res.rc == 0, res.describe()
        doc = res.json()
        assert (doc["service"]["verified"], doc["service"]["invalid"]) == (1, 0)
        wr = doc["service"]["without_receipt"]
        assert (wr["total"], wr["claimed"]) == (3, 0)
        assert wr["by_age"] == {**NO_UNRECEIPTED["by_age"], "under_1h": 3}
        assert [(c["client"], c["count"], c["oldest"], c["newest"])
                for c in wr["by_client"]] == \
            [(c, len(times[c]), iso_utc(min(times[c])), iso_utc(max(times[c])))
             for c in ("other", "terminal-1")]
        text = cli("ledger", "verify", "--state", url, home=home)
        assert text.rc == 0, text.describe()
        assert "service exports without receipt: 3 (< 1 h: 3, < 1 day: 0, < 7 days: 0, " \
               "older: 0)" in text.stdout
        with opened(home, url) as (store, authority):
            chk = verify_service_ledger(store, authority, now=max(times["other"]) + 3 * DAY)
        assert chk.without_receipt.by_age == {**NO_UNRECEIPTED["by_age"], "1d_to_7d": 3}
