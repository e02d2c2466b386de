"""A campaign run ends on both journals (SQLite, PostgreSQL): a unit that cannot be reached
uses an attempt per load each time, then fails with its reason; a load already exported
keeps that state between attempts, so it is reconciled with the unit, not exported again."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from keyload.core.errors import StoreError, TransportError
from keyload.lab.pgserver import make_database, postgres_available, private_postgres
from keyload.station.campaign import ATTEMPTS, RunOptions, run_campaign
from keyload.station.journal.model import (
    EXPORTED,
    FAILED,
    IMPORTED,
    Campaign,
    Journal,
    PlannedLoad,
)
from keyload.station.journal.sqlite import SqliteJournal
from keyload.station.load import LoadFailed, UnitClient, load_key
from keyload.transports import Connection
from keyload.transports.local import LocalConnection

from ..conftest import require
from .fixtures import make_world

PLAN = (PlannedLoad(b"DIV", 1, 1), PlannedLoad(b"MAC", 2, 1))
GHOST = b"GHOST-01"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.hardware)])
def journal(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Journal]:
    if request.param == "sqlite":
        j: Journal = SqliteJournal(tmp_path / "journal.db")
        yield j
        j.close()
        return
    ok, why = postgres_available()
    require(ok, f"PostgreSQL: {why}")
    from keyload.station.journal.postgres import PostgresJournal

    with private_postgres(tmp_path / "pg") as url:
        j = PostgresJournal(make_database(url, "ends"))
        yield j
        j.close()


def test_unreachable_unit_fails_after_its_attempts_and_exported_is_reconciled(
        journal: Journal) -> None:
    w = make_world()
    units = {sn: w.unit(sn) for sn in (b"U-0", b"U-1", b"U-2")}
    serials = [b"U-0", GHOST, b"U-1", b"U-2"]
    journal.create_campaign(Campaign("c", w.set_a, time.time(), PLAN, {}, 4), serials)
    # a dead station exported U-1's loads and the unit imported them; nothing more journaled
    t0 = time.time()
    rows = journal.claim("c", "dead", 1, 0.01, t0)
    assert [r.sn for r in rows] == [b"U-0", b"U-0"]
    rows = journal.claim_unit("c", b"U-1", "dead", 0.01, t0)
    client = UnitClient(LocalConnection(units[b"U-1"]))
    client.select()
    for row in rows:
        load_key(client, w.client(), row.ref1, row.ref2, select=False,
                 on_export=lambda i, s, r, row=row: journal.exported(
                     row, s, i.r, r.header, r.kcv, t0))
    exports_u1 = [r for r in w.log.records if r.sn == b"U-1"]
    opts = RunOptions(station="s1", clock=lambda: t0 + 1.0)  # the dead leases have expired
    attempts: dict[bytes, int] = {}

    @contextmanager
    def connect(sn: bytes) -> Iterator[Connection]:
        attempts[sn] = attempts.get(sn, 0) + 1
        if sn == GHOST:
            raise LoadFailed("open unit", StoreError(f"no emulated unit with SN {sn.hex()}"))
        if sn == b"U-1" and attempts[sn] == 1:
            raise TransportError("reader jammed")
        yield LocalConnection(units[sn])

    s = run_campaign(journal, "c", w.client(), connect, opts)
    assert attempts[GHOST] == ATTEMPTS and attempts[b"U-1"] == 2
    assert s.units_seen == 4 and s.loads_done == 6 and s.loads_failed == 2
    assert s.reconciled == 2  # U-1: reconciled after its jammed attempt, not exported again
    assert [r for r in w.log.records if r.sn == b"U-1"] == exports_u1
    assert sorted((sn, r2, why) for sn, r2, _, why in s.failures) == [
        (GHOST.hex(), ref2, f"unit not reachable: no emulated unit with SN {GHOST.hex()}")
        for ref2 in (1, 2)]
    counts = journal.counts("c")
    assert counts == {"planned": 0, "claimed": 0, "exported": 0, IMPORTED: 6, FAILED: 2}
    ghost = [r for r in journal.rows("c") if r.sn == GHOST]
    # failed for good, each row keeps the station it failed on
    assert [(r.state, r.attempts, r.station) for r in ghost] == [(FAILED, ATTEMPTS,
                                                                  opts.station)] * 2
    # a second run has nothing to do and tries nobody again
    again = run_campaign(journal, "c", w.client(), connect, opts)
    assert again.units_seen == 0 and attempts[GHOST] == ATTEMPTS


def test_a_retried_exported_load_stays_exported(journal: Journal) -> None:
    """The journal side: a failed attempt at an exported load releases it (expired lease)
    but keeps it exported; a claimed one goes back to planned."""
    w = make_world()
    journal.create_campaign(Campaign("c", w.set_a, time.time(), PLAN, {}, 1), [b"U-0"])
    one, two = journal.claim("c", "s1", 1, 60.0, time.time())
    journal.exported(one, 1, b"r" * 16, b"h" * 12, b"k" * 5, time.time())
    journal.failed(one, None, "unit IMPORTKEY: reader jammed", time.time(), final=False)
    journal.failed(two, None, "unit INITIALIZE DOWNLOAD: reader jammed", time.time(),
                   final=False)
    got = {r.ref2: r for r in journal.rows("c")}
    assert (got[1].state, got[1].station, got[1].attempts) == (EXPORTED, None, 2)
    assert (got[2].state, got[2].station, got[2].attempts) == ("planned", None, 1)
    assert got[1].header == b"h" * 12  # what the next claim reconciles against
    again = journal.claim("c", "s2", 1, 60.0, time.time())  # any station may take it
    assert [(r.ref2, r.state) for r in again] == [(1, EXPORTED), (2, "planned")]
