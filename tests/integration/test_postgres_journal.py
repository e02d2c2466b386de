"""The PostgreSQL journal holds the same contract as SQLite, and more stations at once.

The contract tests run on both backends (``[postgres]`` and ``[sqlite]``): creating a
campaign, claims (order, whole units, state before the claim, resume, take-over after the
lease and not before), outcomes, counts, rows and events. On top: concurrent claimers get
disjoint units and together all of them, the station guard, and three station processes
on one PostgreSQL journal with one of them killed (SIGKILL) mid-run.

PostgreSQL runs privately (:mod:`keyload.lab.pgserver`): the tests skip where it is
absent, and fail in CI.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keyload.core.errors import DamagedStore, StoreError
from keyload.core.keys import KeyAttributes, KeyType
from keyload.lab.pgserver import make_database, postgres_available, private_postgres
from keyload.records.exportlog import SqliteExportLog
from keyload.station.fleet import EmulatedFleet
from keyload.station.journal.model import (
    CLAIMED,
    EXPORTED,
    FAILED,
    IMPORTED,
    PLANNED,
    Campaign,
    Journal,
    LoadRow,
    PlannedLoad,
)
from keyload.station.journal.sqlite import SqliteJournal
from keyload.units.authority import Authority, ExportPolicy
from keyload.units.keystore import SoftwareKeystore
from keyload.units.storage import KekSource
from keyload.units.unit import Slot

from ..conftest import require

pytestmark = pytest.mark.hardware  # SoftHSM2, pcscd + vpcd or PostgreSQL (skips without)

PASSPHRASE = "correct horse battery staple"
PLAN = (PlannedLoad(b"K-AES", 1, 3), PlannedLoad(b"K-MAC", 2, None))
_db_numbers = itertools.count(1)

Factory = Callable[[], Journal]


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One private PostgreSQL server for the module (a fresh database per test)."""
    ok, why = postgres_available()
    require(ok, f"PostgreSQL: {why}")
    with private_postgres(tmp_path_factory.mktemp("postgres")) as url:
        yield url


@pytest.fixture
def pg_url(pg_server: str) -> str:
    return make_database(pg_server, f"test_{os.getpid()}_{next(_db_numbers)}")


@pytest.fixture(params=["postgres", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """Opens journals on one shared store (each call: a new connection)."""
    opened: list[Journal] = []
    if request.param == "postgres":
        from keyload.station.journal.postgres import PostgresJournal

        url: str = request.getfixturevalue("pg_url")

        def make() -> Journal:
            j = PostgresJournal(url)
            opened.append(j)
            return j
    else:
        path = tmp_path / "journal.db"

        def make() -> Journal:
            j = SqliteJournal(path)
            opened.append(j)
            return j
    yield make
    for j in opened:
        j.close()


def raw_sql(store: str | Path) -> Callable[[str], None]:
    """A writer of raw SQL into a store behind keyload's back (a PostgreSQL URL or a SQLite
    file), each statement on a connection of its own: how tests damage a row."""
    def execute(sql: str) -> None:
        if isinstance(store, str):
            import psycopg

            with psycopg.connect(store, autocommit=True) as pg:
                pg.execute(sql.encode())
            return
        db = sqlite3.connect(store, isolation_level=None)
        try:
            db.execute(sql)
        finally:
            db.close()

    return execute


def sn_of(i: int) -> bytes:
    return b"KL" + i.to_bytes(6, "big")


def campaign_of(cid: str, units: int, plan: tuple[PlannedLoad, ...] = PLAN,
                set_id: bytes = b"\x11\x22\x33") -> Campaign:
    return Campaign(cid, set_id, time.time(), plan, {"kind": "test", "units": units}, units)


def make_campaign(j: Journal, cid: str, units: int) -> list[bytes]:
    serials = [sn_of(i) for i in range(units)]
    j.create_campaign(campaign_of(cid, units), iter(serials))
    return serials


def units_of(rows: list[LoadRow]) -> list[int]:
    return sorted({r.seq for r in rows})


def complete(rows: list[LoadRow], plan: tuple[PlannedLoad, ...] = PLAN) -> bool:
    """Every claimed unit came with all its loads, in (seq, REF2) order."""
    want = sorted(p.ref2 for p in plan)
    by: dict[int, list[int]] = defaultdict(list)
    for r in rows:
        by[r.seq].append(r.ref2)
    return rows == sorted(rows, key=lambda r: (r.seq, r.ref2)) and \
        all(v == want for v in by.values())


# -- the contract, on both backends ------------------------------------------------------
def test_postgres_journal_create_and_read(backend: Factory) -> None:
    j = backend()
    serials = make_campaign(j, "c1", 5)
    c = j.campaign("c1")
    assert c == Campaign("c1", b"\x11\x22\x33", c.created, PLAN, {"kind": "test", "units": 5},
                         5)
    assert j.campaigns() == ["c1"]
    assert j.counts("c1") == {PLANNED: 10, CLAIMED: 0, EXPORTED: 0, IMPORTED: 0, FAILED: 0}
    rows = list(j.rows("c1"))
    assert [(r.seq, r.sn, r.ref2, r.ref1, r.version) for r in rows] == [
        (i, sn, p.ref2, p.ref1, p.version) for i, sn in enumerate(serials) for p in PLAN]
    assert all(r.state == PLANNED and r.attempts == 0 and r.station is None and
               r.lease is None and not r.reconciled for r in rows)
    assert list(j.rows("c1", [IMPORTED])) == []

    with pytest.raises(StoreError, match="exists already"):
        j.create_campaign(campaign_of("c1", 1), iter([sn_of(99)]))
    with pytest.raises(StoreError, match="listed twice"):  # nothing of it is kept
        j.create_campaign(campaign_of("c2", 3), iter([sn_of(1), sn_of(2), sn_of(1)]))
    with pytest.raises(StoreError, match="no campaign"):
        j.campaign("c2")
    assert j.campaigns() == ["c1"] and sum(j.counts("c2").values()) == 0
    assert j.claim("c2", "a", 5, 10.0, time.time()) == []

    def broken() -> Iterator[bytes]:  # the unit list fails half-way: nothing is kept
        yield sn_of(7)
        yield sn_of(8)
        raise ValueError("unreadable unit list")

    with pytest.raises(ValueError, match="unreadable"):
        j.create_campaign(campaign_of("c3", 3), broken())
    assert j.campaigns() == ["c1"] and sum(j.counts("c3").values()) == 0

    other = backend()  # a second connection sees the same
    assert other.campaign("c1") == c and len(list(other.rows("c1"))) == 10


def test_postgres_journal_claims_whole_units_in_order(backend: Factory) -> None:
    j = backend()
    make_campaign(j, "c", 5)
    t = 1000.0
    a = j.claim("c", "a", 2, 10.0, t)
    assert units_of(a) == [0, 1] and complete(a) and {r.state for r in a} == {PLANNED}
    held = [r for r in j.rows("c") if r.seq in (0, 1)]
    assert {(r.state, r.station, r.lease, r.updated) for r in held} == {
        (CLAIMED, "a", t + 10.0, t)}

    b = j.claim("c", "b", 10, 10.0, t + 1)  # a's live claims are not b's
    assert units_of(b) == [2, 3, 4] and complete(b)
    j.exported(a[0], 2, b"r" * 16, b"H" * 12, b"KCV-5", t + 2)

    again = j.claim("c", "a", 10, 10.0, t + 3)  # a resumes its own claims, and only them
    assert units_of(again) == [0, 1] and complete(again)
    assert [r.state for r in again] == [EXPORTED, CLAIMED, CLAIMED, CLAIMED]
    e = again[0]
    assert (e.suite, e.r, e.header, e.kcv, e.attempts) == (2, b"r" * 16, b"H" * 12, b"KCV-5", 1)
    assert units_of(j.claim("c", "b", 1, 10.0, t + 3)) == [2]  # b's own first
    assert j.claim("c", "x", 10, 10.0, t + 4) == []  # nothing planned, no lease expired
    assert j.counts("c")[CLAIMED] == 9 and j.counts("c")[EXPORTED] == 1


def test_postgres_journal_lease_take_over(backend: Factory) -> None:
    j, k = backend(), backend()
    make_campaign(j, "c", 3)
    t = 5000.0
    mine = j.claim("c", "dead", 3, 2.0, t)
    assert units_of(mine) == [0, 1, 2]
    j.exported(mine[0], 1, b"R" * 16, b"H" * 12, b"K" * 5, t + 0.5)
    j.imported(mine[1], suite=1, r=b"Q" * 16, header=b"h" * 12, kcv=b"k" * 5, rct=b"T" * 16,
               reconciled=False, now=t + 0.6)
    for now in (t + 1.0, t + 1.99, t + 2.0):  # not before the lease has passed
        assert k.claim("c", "alive", 10, 2.0, now) == []
    took = k.claim("c", "alive", 10, 2.0, t + 2.01)
    # the dead station's open loads, with their state before the take-over
    assert [(r.seq, r.ref2, r.state) for r in took] == [
        (0, 1, EXPORTED), (1, 1, CLAIMED), (1, 2, CLAIMED), (2, 1, CLAIMED), (2, 2, CLAIMED)]
    assert took[0].r == b"R" * 16 and took[0].station == "dead"
    now_rows = {(r.seq, r.ref2): r for r in j.rows("c")}
    assert now_rows[(0, 2)].station == "dead" and now_rows[(0, 2)].state == IMPORTED
    assert all(r.station == "alive" and r.lease == t + 4.01 for key, r in now_rows.items()
               if key != (0, 2))
    assert j.claim("c", "dead", 10, 2.0, t + 3) == []  # back too late: nothing is its own


def test_postgres_journal_claim_unit(backend: Factory) -> None:
    """A card in a reader: its unit's open loads, by the same rules as claim()."""
    j, k = backend(), backend()
    make_campaign(j, "c", 3)
    t = 300.0
    got = j.claim_unit("c", sn_of(1), "a", 2.0, t)
    assert [(r.seq, r.ref2, r.state) for r in got] == [(1, 1, PLANNED), (1, 2, PLANNED)]
    assert k.claim_unit("c", sn_of(1), "b", 2.0, t + 1) == []  # a's, live
    assert k.claim_unit("c", sn_of(9), "b", 2.0, t + 1) == []  # not in the campaign
    assert units_of(k.claim("c", "b", 5, 2.0, t + 1)) == [0, 2]  # not unit 1
    j.imported(got[0], suite=1, r=b"r" * 16, header=b"h" * 12, kcv=b"k" * 5, rct=b"c" * 16,
               reconciled=False, now=t + 1)
    again = j.claim_unit("c", sn_of(1), "a", 2.0, t + 1.5)  # its own: a resume
    assert [(r.ref2, r.state) for r in again] == [(2, CLAIMED)]
    took = k.claim_unit("c", sn_of(1), "b", 2.0, t + 3.6)  # lease passed: a take-over
    assert [(r.ref2, r.state, r.station) for r in took] == [(2, CLAIMED, "a")]
    assert {(r.ref2, r.station, r.lease) for r in j.rows("c") if r.seq == 1} == {
        (1, "a", t + 2.0), (2, "b", t + 5.6)}  # the imported load is left as it was

    # the same card seen by two stations at once: one of them has it
    make_campaign(j, "race", 40)
    others = [backend() for _ in range(4)]
    start = threading.Barrier(len(others))
    winners: dict[int, list[str]] = defaultdict(list)
    lock = threading.Lock()

    def reader(i: int, jj: Journal) -> None:
        start.wait()
        for n in range(40):
            if jj.claim_unit("race", sn_of(n), f"r{i}", 60.0, time.time()):
                with lock:
                    winners[n].append(f"r{i}")

    threads = [threading.Thread(target=reader, args=(i, jj)) for i, jj in enumerate(others)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert sorted(winners) == list(range(40))
    assert all(len(w) == 1 for w in winners.values()), winners


def test_postgres_journal_renew_keeps_claims(backend: Factory) -> None:
    j = backend()
    make_campaign(j, "c", 2)
    t = 100.0
    assert units_of(j.claim("c", "a", 2, 1.0, t)) == [0, 1]
    j.renew("c", "a", 10.0, t + 0.5)
    assert j.claim("c", "b", 2, 1.0, t + 5.0) == []
    assert units_of(j.claim("c", "b", 2, 1.0, t + 10.6)) == [0, 1]


def test_postgres_journal_outcomes_and_counts(backend: Factory) -> None:
    j = backend()
    make_campaign(j, "c", 3)
    t = 200.0
    rows = j.claim("c", "a", 3, 30.0, t)
    assert len(rows) == 6
    r0, r1, r2, r3 = rows[:4]
    j.exported(r0, 1, b"r" * 16, b"h" * 12, b"kcv-5", t + 1)
    j.imported(r0, suite=1, r=b"r" * 16, header=b"h" * 12, kcv=b"kcv-5", rct=b"c" * 16,
               reconciled=False, now=t + 2)
    j.imported(r1, suite=None, r=None, header=b"H" * 12, kcv=b"KCV-5", rct=None,
               reconciled=True, now=t + 3)
    j.failed(r2, "6986", "unit IMPORTKEY: policy", t + 4, final=True)
    j.failed(r3, None, "unit IMPORTKEY: transport", t + 5, final=False)
    assert j.counts("c") == {PLANNED: 1, CLAIMED: 2, EXPORTED: 0, IMPORTED: 2, FAILED: 1}
    got = {(r.seq, r.ref2): r for r in j.rows("c")}
    a = got[(0, 1)]
    assert (a.state, a.suite, a.r, a.header, a.kcv, a.rct, a.reconciled, a.attempts,
            a.updated) == (IMPORTED, 1, b"r" * 16, b"h" * 12, b"kcv-5", b"c" * 16, False, 1, t + 2)
    b = got[(0, 2)]
    assert (b.state, b.suite, b.r, b.rct, b.reconciled, b.header) == (
        IMPORTED, None, None, None, True, b"H" * 12)
    f = got[(1, 1)]
    assert (f.state, f.sw, f.reason, f.attempts, f.station, f.lease) == (
        FAILED, "6986", "unit IMPORTKEY: policy", 1, "a", None)  # the station it failed on
    p = got[(1, 2)]
    assert (p.state, p.sw, p.attempts, p.station, p.lease) == (PLANNED, None, 1, None, None)
    assert [(r.seq, r.ref2) for r in j.rows("c", [FAILED, PLANNED])] == [(1, 1), (1, 2)]
    assert [(r.seq, r.ref2) for r in j.rows("c", [IMPORTED])] == [(0, 1), (0, 2)]

    # the load put back to planned is claimed again; final failures and imports are not,
    # nor a's live claims
    again = j.claim("c", "b", 5, 30.0, t + 6)
    assert [(r.seq, r.ref2, r.state) for r in again] == [(1, 2, PLANNED)]
    j.imported(again[0], suite=2, r=b"x" * 16, header=b"y" * 12, kcv=b"z" * 5, rct=b"w" * 16,
               reconciled=False, now=t + 7)
    done = {(r.seq, r.ref2): r for r in j.rows("c")}[(1, 2)]
    assert (done.state, done.sw, done.reason, done.attempts) == (IMPORTED, None, None, 1)


@pytest.mark.parametrize("kind", ["postgres", "sqlite"])
@pytest.mark.parametrize(("table", "damage", "read"), [
    ("loads", "state = 'teleported'", "rows"),
    ("loads", "sn = 'not hex' WHERE seq = 1", "rows"),
    ("loads", "ref1 = 'zz'", "claim"),
    ("campaigns", "plan = 'not json'", "campaign"),
], ids=["state", "sn", "ref1", "plan"])
def test_a_damaged_row_is_a_damaged_store_naming_the_journal(
        kind: str, table: str, damage: str, read: str, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    """A row whose columns do not decode (written by hand, or by a bad disk) is one
    DamagedStore naming the journal, in SQLite and PostgreSQL alike, never a stray
    ValueError or a row taken as good; nothing is claimed from such a campaign."""
    if kind == "postgres":
        from keyload.records.postgres import describe_url
        from keyload.station.journal.postgres import PostgresJournal

        url: str = request.getfixturevalue("pg_url")
        j: Journal = PostgresJournal(url)
        where = describe_url(url)  # the URL as the journal names it (no password)
        execute = raw_sql(url)
    else:
        path = tmp_path / "journal.db"
        j = SqliteJournal(path)
        where = str(path)
        execute = raw_sql(path)
    try:
        make_campaign(j, "c", 3)
        execute(f"UPDATE {table} SET {damage}")  # noqa: S608 - the test's own literals
        with pytest.raises(DamagedStore) as info:
            if read == "rows":
                list(j.rows("c"))
            elif read == "claim":
                j.claim("c", "a", 3, 30.0, time.time())
            else:
                j.campaign("c")
        assert "damaged" in str(info.value) and where in str(info.value), str(info.value)
    finally:
        j.close()


def test_postgres_journal_events(backend: Factory) -> None:
    j = backend()
    make_campaign(j, "c", 1)
    j.event("c", "b", 3.0, 5, 1)
    j.event("c", "a", 1.0, 0, 0)
    j.event("other", "a", 2.0, 9, 9)
    assert j.events("c") == [(1.0, "a", 0, 0), (3.0, "b", 5, 1)]
    assert j.events("nothing") == []


def test_postgres_journal_concurrent_claims_are_disjoint(backend: Factory) -> None:
    """Eight claimers on their own connections: disjoint units, all of them, whole."""
    setup = backend()
    n_units = 300
    make_campaign(setup, "c", n_units)
    journals = [backend() for _ in range(8)]
    start = threading.Barrier(len(journals))
    got: dict[str, list[list[LoadRow]]] = {}
    errors: list[BaseException] = []

    def station(i: int, j: Journal) -> None:
        name = f"s{i}"
        claims: list[list[LoadRow]] = []
        try:
            start.wait()
            while True:
                rows = j.claim("c", name, 1 + i % 5, 60.0, time.time())
                if not rows:
                    break
                claims.append(rows)
                for r in rows:  # done: so the next claim is not a resume of these
                    j.imported(r, suite=1, r=None, header=b"h" * 12, kcv=b"k" * 5, rct=None,
                               reconciled=False, now=time.time())
        except BaseException as e:
            errors.append(e)
        got[name] = claims

    threads = [threading.Thread(target=station, args=(i, j)) for i, j in enumerate(journals)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    owner: dict[int, str] = {}
    for name, claims in got.items():
        for rows in claims:
            assert complete(rows) and all(r.state == PLANNED for r in rows)
            assert len(units_of(rows)) <= 1 + int(name[1:]) % 5
            for seq in units_of(rows):
                assert seq not in owner, f"unit {seq} claimed by {owner[seq]} and {name}"
                owner[seq] = name
    assert sorted(owner) == list(range(n_units))
    assert len({o for o in owner.values()}) > 1  # they did run side by side
    assert setup.counts("c")[IMPORTED] == 2 * n_units
    final = {(r.seq, r.station) for r in setup.rows("c")}
    assert final == {(seq, name) for seq, name in owner.items()}


def test_postgres_journal_station_lock(backend: Factory) -> None:
    j1, j2 = backend(), backend()
    make_campaign(j1, "c", 1)
    j1.lock_station("c", "s1")
    with pytest.raises(StoreError, match="already running"):
        j2.lock_station("c", "s1")
    j2.lock_station("c", "s2")  # another station, or another campaign: fine
    j2.lock_station("other", "s1")
    j1.close()
    backend().lock_station("c", "s1")  # the first holder is gone


def test_postgres_journal_create_streams_in_flat_memory(backend: Factory) -> None:
    """Planning streams its rows: memory does not grow with the campaign."""
    j = backend()
    n_units = 60_000
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        j.create_campaign(campaign_of("big", n_units), (sn_of(i) for i in range(n_units)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert j.counts("big")[PLANNED] == 2 * n_units
    # 120,000 rows held at once would take tens of MB; streaming stays at a few
    assert peak < 8_000_000, f"peak {peak / 1e6:.1f} MB"


# -- PostgreSQL only ------------------------------------------------------------------------
def test_postgres_private_server_stops(tmp_path: Path) -> None:
    ok, why = postgres_available()
    require(ok, f"PostgreSQL: {why}")
    import psycopg

    with private_postgres(tmp_path / "pg") as url, psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=3)
    assert not (tmp_path / "pg" / "pgserver.json").exists()


DRIVER = textwrap.dedent("""
    import json, os, sys, time
    from contextlib import contextmanager
    from pathlib import Path

    from keyload.station.campaign import RunOptions, run_campaign
    from keyload.station.fleet import EmulatedFleet
    from keyload.station.journal.postgres import PostgresJournal
    from keyload.station.load import AuthorityClient
    from keyload.transports.local import LocalConnection
    from keyload.units.authority import Authority
    from keyload.records.exportlog import SqliteExportLog
    from keyload.units.keystore import SoftwareKeystore
    from keyload.units.storage import KekSource

    url, campaign, station, auth_dir, units_dir, log_path = sys.argv[1:7]
    batch, lease, workers, delay = (int(sys.argv[7]), float(sys.argv[8]), int(sys.argv[9]),
                                    float(sys.argv[10]))
    hold_at, hold_moment, marker, clock_ahead = (int(sys.argv[11]), sys.argv[12],
                                                 Path(sys.argv[13]), float(sys.argv[14]))
    source = KekSource(passphrase=os.environ["KL_TEST_PASSPHRASE"])
    ks = SoftwareKeystore.open(Path(auth_dir), source)
    authority = Authority(ks, log=SqliteExportLog(Path(log_path)))
    client = AuthorityClient(LocalConnection(authority), suites=authority.capabilities().suites)
    fleet = EmulatedFleet.open(Path(units_dir), source)
    journal = PostgresJournal(url)
    journal.lock_station(campaign, station)
    imports = 0

    def hold():  # say so, then stay there until the test kills this process
        marker.write_text("held")
        time.sleep(3600)

    class HoldImport:  # the hold_at-th IMPORTKEY stops before or after the unit stores it
        def __init__(self, unit):
            self.inner = LocalConnection(unit)

        def transmit(self, apdu):
            global imports
            if apdu[1] != 0x14:
                return self.inner.transmit(apdu)
            imports += 1
            if imports == hold_at and hold_moment == "before":
                hold()
            answer = self.inner.transmit(apdu)
            if imports == hold_at and hold_moment == "after":
                hold()
            return answer

    @contextmanager
    def connect(sn):
        time.sleep(delay)  # a unit takes a while to reach
        unit = fleet.open_unit(sn)
        try:
            yield HoldImport(unit) if hold_at else LocalConnection(unit)
        finally:
            unit.close()

    summary = run_campaign(journal, campaign, client, connect,
                           RunOptions(station=station, batch_units=batch, lease_s=lease,
                                      workers=workers,
                                      clock=lambda: time.time() + clock_ahead))
    journal.close()
    print(json.dumps(summary.to_json()))
""")


HOLD_AT = 7  # the victim is killed in its 7th load, its first 6 imported


@pytest.mark.parametrize("moment", ["before", "after"],
                         ids=["killed-before-the-unit-stores", "killed-after-the-unit-stores"])
def test_postgres_multi_station_with_a_station_killed(pg_url: str, tmp_path: Path,
                                                      moment: str) -> None:
    """Three station processes share one PostgreSQL journal and a directory of units; one
    is killed mid-run, in its 7th load between EXPORTKEY and the journaled import: before
    the unit stores the key (the load must run again) or after (reconciled: the unit holds
    the key, it must not be exported again). The others leave its claims alone while its
    lease lasts; a final run, its clock past that lease, takes them over and finishes.
    Every unit ends with exactly the planned keys, every load imported once, receipts
    verify, and only the load the kill cut before the unit stored it is exported twice."""
    from keyload.station.journal.postgres import PostgresJournal

    n_units, lease = 240, 60.0
    source = KekSource(passphrase=PASSPHRASE)
    auth_dir, units_dir = tmp_path / "authority", tmp_path / "units"
    anyp = ExportPolicy(None, None)
    ks = SoftwareKeystore.create(auth_dir, source)
    set_id = ks.generate_set("fleet").set_id
    ks.generate_key(b"K-AES", KeyType.AES256, KeyAttributes("K0", "B", "E"), version=3,
                    diversify=True, policy=anyp)
    ks.generate_key(b"K-MAC", KeyType.HMAC_SHA256, KeyAttributes("M7", "C", "N"), version=2,
                    diversify=False, policy=anyp, length=64)
    plan = (PlannedLoad(b"K-AES", 1, 3), PlannedLoad(b"K-MAC", 2, 2))
    fleet = EmulatedFleet.open(units_dir, source, create=True)
    serials = [sn_of(i) for i in range(n_units)]
    t_key = ks.transport_key_copy(set_id)
    try:
        for sn in serials:
            fleet.create_unit(sn, t_key, {1: Slot(1, frozenset({KeyType.AES256})),
                                          2: Slot(2, frozenset({KeyType.HMAC_SHA256}))})
    finally:
        t_key.wipe()
    journal = PostgresJournal(pg_url)
    journal.create_campaign(Campaign("multi", set_id, time.time(), plan, {}, n_units),
                            iter(serials))

    driver = tmp_path / "station_driver.py"
    driver.write_text(DRIVER)
    marker = tmp_path / "victim-held"
    env = {**os.environ, "KL_TEST_PASSPHRASE": PASSPHRASE}
    logs: dict[str, Path] = {}

    def start(label: str, station: str, batch: int, workers: int, delay: float, *,
              hold_at: int = 0, clock_ahead: float = 0.0) -> subprocess.Popen[str]:
        logs[label] = tmp_path / f"exports-{label}.db"
        return subprocess.Popen(
            [sys.executable, str(driver), pg_url, "multi", station, str(auth_dir),
             str(units_dir), str(logs[label]), str(batch), str(lease), str(workers),
             str(delay), str(hold_at), moment, str(marker), str(clock_ahead)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(p: subprocess.Popen[str], label: str) -> dict[str, Any]:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, f"{label} failed ({p.returncode}):\n{err[-3000:]}"
        summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        assert summary["loads_failed"] == 0, summary
        return summary

    def victims() -> list[LoadRow]:
        return [r for r in journal.rows("multi") if r.station == "station-c"]

    procs: dict[str, subprocess.Popen[str]] = {}

    def wait_for(what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 60
        while not done():
            if procs["victim"].poll() is not None:
                out, err = procs["victim"].communicate()
                pytest.fail(f"the victim ended before {what}:\n{out}\n{err[-3000:]}")
            assert time.monotonic() < deadline, f"the victim made no progress: {what}"
            time.sleep(0.01)

    try:
        procs["victim"] = start("victim", "station-c", 6, 1, 0.0, hold_at=HOLD_AT)
        wait_for("its first claim", lambda: bool(victims()))  # its batch is its own
        procs["a"] = start("a", "station-a", 4, 2, 0.004)
        procs["b"] = start("b", "station-b", 4, 1, 0.004)
        wait_for("its hold", marker.exists)

        def both_at_work() -> bool:  # the kill lands while the other two are loading
            by = [r.station for r in journal.rows("multi", [IMPORTED])]
            return by.count("station-a") >= 4 and by.count("station-b") >= 4

        wait_for("the others' work", both_at_work)
        procs["victim"].send_signal(signal.SIGKILL)
        procs["victim"].communicate(timeout=30)
        assert procs["victim"].returncode == -signal.SIGKILL
        summaries = {label: finish(procs[label], label) for label in ("a", "b")}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()

    # the victim's first batch (6 units, 12 loads): 6 imported, the 7th exported, 5 claimed,
    # and the others left those claims alone while its lease lasts
    left = victims()
    assert sorted(r.state for r in left) == [CLAIMED] * 5 + [EXPORTED] + [IMPORTED] * 6
    [held] = [(r.sn, r.ref2) for r in left if r.state == EXPORTED]
    orphaned = {(r.sn, r.ref2) for r in left if r.state != IMPORTED}
    by_victim = {(r.sn, r.ref2) for r in left if r.state == IMPORTED}
    assert journal.counts("multi") == {PLANNED: 0, CLAIMED: 5, EXPORTED: 1,
                                       IMPORTED: 2 * n_units - 6, FAILED: 0}
    assert sum(s["loads_done"] for s in summaries.values()) == 2 * n_units - 12
    assert all(s["reconciled"] == 0 for s in summaries.values())

    # a final run whose clock is past the dead station's lease takes over what it held
    summaries["final"] = finish(start("final", "station-a", 8, 1, 0.0,
                                      clock_ahead=lease + 1.0), "final")
    assert (summaries["final"]["loads_done"], summaries["final"]["reconciled"]) == \
        (6, 1 if moment == "after" else 0)
    assert journal.counts("multi") == {PLANNED: 0, CLAIMED: 0, EXPORTED: 0,
                                       IMPORTED: 2 * n_units, FAILED: 0}

    rows = list(journal.rows("multi"))
    by_load = {(r.sn, r.ref2): r for r in rows}
    assert {key for key, r in by_load.items() if r.station == "station-c"} == by_victim
    assert all(by_load[key].station == "station-a" for key in orphaned)

    # every unit holds exactly the planned key versions, as the journal says
    with_version = {p.ref2: p.version for p in plan}
    for sn in serials:
        unit = fleet.open_unit(sn)
        try:
            for ref2, slot in unit.state.slots.items():
                row = by_load[(sn, ref2)]
                assert slot.version == with_version[ref2], (sn.hex(), ref2, slot.version)
                assert (slot.header, slot.kcv) == (row.header, row.kcv)
        finally:
            unit.close()
    fleet.close()

    # every receipt the journal holds is the unit's genuine one
    checker = Authority(SoftwareKeystore.open(auth_dir, source))
    for r in rows:
        if r.reconciled:
            assert r.rct is None
            continue
        assert r.suite is not None and r.r is not None and r.header is not None
        assert r.kcv is not None and r.rct is not None
        checker.verify_receipt(suite=r.suite, set_id=set_id, sn=r.sn, r=r.r, ref2=r.ref2,
                               h=r.header, kcv=r.kcv, rct=r.rct)
    # only the load the unit stored before the kill is reconciled (the unit holds its key)
    assert {(r.sn, r.ref2) for r in rows if r.reconciled} == \
        ({held} if moment == "after" else set())

    # the authority's export records, per process
    records: list[tuple[float, str, bytes, int]] = []
    for label, path in logs.items():
        log = SqliteExportLog(path)
        records += [(rec.time, label, rec.sn, rec.ref2) for rec in log.records()]
        log.close()
    exports: dict[tuple[bytes, int], list[str]] = defaultdict(list)
    for _, label, sn, ref2 in sorted(records):
        exports[(sn, ref2)].append(label)
    assert set(exports) == set(by_load), "every load was exported at least once"
    # the load cut before the unit stored it is exported again, by the final run; the
    # one the unit stored is not (the unit refuses a version it holds, and the second
    # import succeeded with a genuine receipt); nothing else is exported twice
    twice = {k: v for k, v in exports.items() if len(v) > 1}
    assert twice == ({held: ["victim", "final"]} if moment == "before" else {})
    for key in by_victim:
        assert exports[key] == ["victim"], (key, exports[key])
    for key in orphaned - {held}:
        assert exports[key] == ["final"], (key, exports[key])
    per_unit: dict[bytes, set[str]] = defaultdict(set)
    for (sn, _), who in exports.items():
        per_unit[sn].update(who)
    for sn, labels in per_unit.items():  # a unit was split only by the kill
        assert len(labels - {"victim"}) <= 1, (sn.hex(), labels)
