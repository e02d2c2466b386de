"""Campaigns at library level: journal states, reconciliation, retries, cards in readers."""

from __future__ import annotations

import json
import random
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from keyload.core.errors import KcvMismatch, TransportError
from keyload.core.keys import KeyHeader
from keyload.station.campaign import RunOptions, is_transient, run_campaign, run_campaign_cards
from keyload.station.journal.model import (
    CLAIMED,
    EXPORTED,
    IMPORTED,
    Campaign,
    LoadState,
    PlannedLoad,
)
from keyload.station.journal.sqlite import SqliteJournal
from keyload.station.load import LoadFailed, Step, UnitClient, load_key
from keyload.transports import Connection
from keyload.transports.local import LocalConnection
from keyload.units.unit import Unit

from ..conftest import require
from .fixtures import World, make_world

PLAN = (PlannedLoad(b"DIV", 1, 1), PlannedLoad(b"MAC", 2, 1))


def _setup(tmp_path: Path, n: int) -> tuple[World, SqliteJournal, dict[bytes, Unit]]:
    w = make_world()
    units = {sn: w.unit(sn) for sn in (f"U{i:04d}".encode() for i in range(n))}
    j = SqliteJournal(tmp_path / "journal.db")
    j.create_campaign(Campaign("c", w.set_a, time.time(), PLAN, {}, n), list(units))
    return w, j, units


def _connector(units: dict[bytes, Unit]):  # type: ignore[no-untyped-def]
    @contextmanager
    def connect(sn: bytes) -> Iterator[Connection]:
        yield LocalConnection(units[sn])
    return connect


def _holds_plan(unit: Unit) -> bool:
    return all(unit.state.slots[p.ref2].header is not None and
               KeyHeader.decode(unit.state.slots[p.ref2].header or b"").version == p.version
               for p in PLAN)


def test_campaign_runs_every_load_and_receipts_verify(tmp_path: Path) -> None:
    w, j, units = _setup(tmp_path, 25)
    s = run_campaign(j, "c", w.client(), _connector(units), RunOptions(station="s1",
                                                                        batch_units=4))
    assert s.loads_done == 50 and s.loads_failed == 0 and s.reconciled == 0
    assert j.counts("c")[IMPORTED] == 50
    assert all(_holds_plan(u) for u in units.values())
    for row in j.rows("c"):
        assert row.rct is not None and row.r is not None and row.header is not None
        w.authority.verify_receipt(suite=row.suite or 0, set_id=w.set_a, sn=row.sn, r=row.r,
                                   ref2=row.ref2, h=row.header, kcv=row.kcv or b"",
                                   rct=row.rct)
    # nothing left: a second run claims nothing and exports nothing
    n_exports = len(w.log.records)
    again = run_campaign(j, "c", w.client(), _connector(units), RunOptions(station="s1"))
    assert again.loads_done == 0 and len(w.log.records) == n_exports


def test_crash_after_import_is_reconciled_not_exported_again(tmp_path: Path) -> None:
    """The station dies after the unit stored the key but before 'imported' was written."""
    w, j, units = _setup(tmp_path, 3)
    rows = j.claim("c", "s1", 1, 60.0, time.time())
    sn = rows[0].sn
    unit = units[sn]
    client = UnitClient(LocalConnection(unit))
    client.select()
    for row in rows:  # what the dead station did: export journaled, import done, no record
        load_key(client, w.client(), row.ref1, row.ref2, select=False,
                 on_export=lambda i, s, r, row=row: j.exported(row, s, i.r, r.header, r.kcv,
                                                               time.time()))
    assert {r.state for r in j.rows("c") if r.sn == sn} == {EXPORTED}
    exports_before = [r for r in w.log.records if r.sn == sn]
    s = run_campaign(j, "c", w.client(), _connector(units), RunOptions(station="s1"))
    assert s.reconciled == 2 and s.loads_failed == 0
    assert [r for r in w.log.records if r.sn == sn] == exports_before  # no new export
    done = [r for r in j.rows("c") if r.sn == sn]
    assert all(r.state == IMPORTED and r.reconciled and r.rct is None for r in done)
    assert all(_holds_plan(u) for u in units.values())


def test_crash_before_import_loads_again(tmp_path: Path) -> None:
    """Claimed (and even exported) but the unit never got IMPORTKEY: the load runs."""
    w, j, units = _setup(tmp_path, 2)
    t0 = time.time()
    rows = j.claim("c", "dead", 1, 0.01, t0)
    assert {r.state for r in j.rows("c") if r.sn == rows[0].sn} == {CLAIMED}
    later = t0 + 1.0  # the dead station's lease has expired by then
    s = run_campaign(j, "c", w.client(), _connector(units),
                     RunOptions(station="other", clock=lambda: later))
    assert s.loads_done == 4 and s.reconciled == 0
    assert all(_holds_plan(u) for u in units.values())


def test_claims_of_a_live_station_are_not_taken(tmp_path: Path) -> None:
    w, j, units = _setup(tmp_path, 2)
    rows = j.claim("c", "busy", 1, 3600.0, time.time())
    s = run_campaign(j, "c", w.client(), _connector(units), RunOptions(station="other"))
    assert s.loads_done == 2  # only the other unit
    assert not _holds_plan(units[rows[0].sn])


def test_security_refusal_is_final_and_transport_error_retried(tmp_path: Path) -> None:
    w, j, units = _setup(tmp_path, 2)
    sns = list(units)
    # unit 0 refuses: its slot 1 is locked
    from keyload.units.unit import Slot

    u0 = units[sns[0]]
    s1 = u0.state.slots[1]
    u0.state.slots[1] = Slot(1, s1.accepts, True)
    flaky = {"n": 0}

    @contextmanager
    def connect(sn: bytes) -> Iterator[Connection]:
        if sn == sns[1] and flaky["n"] < 1:
            flaky["n"] += 1
            from keyload.core.errors import TransportError

            raise TransportError("reader jammed")
        yield LocalConnection(units[sn])

    now = [time.time()]  # the run's clock: it moves only when the test moves it
    opts = RunOptions(station="s", lease_s=0.01, clock=lambda: now[0])
    first = run_campaign(j, "c", w.client(), connect, opts)
    assert first.loads_failed == 1  # the locked slot: refused once, for good
    assert first.loads_retried == 2  # the jammed unit's two loads, tried again
    if j.counts("c")[IMPORTED] < 3:  # the jammed unit's claim waits for its lease
        now[0] += 1.0  # ... which has expired by now
        again = run_campaign(j, "c", w.client(), connect, opts)
        assert again.loads_failed == 0  # the final refusal is not tried again
    counts = j.counts("c")
    assert counts["failed"] == 1 and counts[IMPORTED] == 3
    failed = next(r for r in j.rows("c", ["failed"]))
    assert failed.sw == "6986" and failed.sn == sns[0] and failed.ref2 == 1
    assert _holds_plan(units[sns[1]])


def test_a_run_reads_time_from_its_clock_alone(tmp_path: Path) -> None:
    """Leases are renewed once a third of the lease has passed on the run's clock, and
    every stamp in the journal is that clock's: a test moves time without sleeping."""
    w, j, units = _setup(tmp_path, 6)
    now = [1000.0]
    renewals: list[float] = []
    renew = j.renew

    def watched(campaign_id: str, station: str, lease_s: float, at: float) -> None:
        renewals.append(at)
        renew(campaign_id, station, lease_s, at)

    j.renew = watched  # type: ignore[method-assign]

    @contextmanager
    def connect(sn: bytes) -> Iterator[Connection]:
        now[0] += 10.0  # each unit takes ten seconds of the run's clock
        yield LocalConnection(units[sn])

    s = run_campaign(j, "c", w.client(), connect,
                     RunOptions(station="s", batch_units=6, lease_s=60.0,
                                clock=lambda: now[0]))
    assert s.loads_done == 12 and s.units_seen == 6
    assert renewals == [1020.0, 1040.0, 1060.0]
    assert {r.updated for r in j.rows("c")} <= {1010.0 + 10 * i for i in range(6)}
    # an event after the batch (a second or more since the last one), one as the run ends
    assert [t for t, *_ in j.events("c")] == [1060.0, 1060.0]


@pytest.mark.hardware
def test_cards_in_readers_campaign(tmp_path: Path) -> None:
    """Cards come in any order, one is a stranger; each unit is found by its SN."""
    from keyload.lab.cards import CardFeeder
    from keyload.lab.pcscd import pcsc_available, running_pcscd
    from keyload.transports.pcsc import cards_in_reader

    avail = pcsc_available()
    require(avail.ok, f"PC/SC with vpcd: {avail.reason}")
    w, j, units = _setup(tmp_path, 3)
    stranger = w.unit(b"NOT-PLANNED")
    order = [*units.values(), stranger]
    random.Random(7).shuffle(order)
    with running_pcscd() as d:
        feeder = CardFeeder(order, 35963).start()
        try:
            s = run_campaign_cards(j, "c", w.client(),
                                   cards_in_reader(d.reader_for_port(35963), count=len(order),
                                                   timeout=15),
                                   RunOptions(station="reader-1"))
        finally:
            feeder.stop()
    assert s.loads_done == 6 and j.counts("c")[IMPORTED] == 6
    assert all(_holds_plan(u) for u in units.values())
    assert any("not in this campaign" in f[3] for f in s.failures)
    assert stranger.state.slots[1].header is None


def test_unknown_campaign_is_a_clear_error(tmp_path: Path) -> None:
    from keyload.core.errors import StoreError

    j = SqliteJournal(tmp_path / "j.db")
    with pytest.raises(StoreError, match="no campaign"):
        j.campaign("nope")
    with pytest.raises(StoreError):
        j.create_campaign(Campaign("x", b"12345", 0.0, PLAN, {}, 2), [b"A", b"A"])
    assert j.campaigns() == []  # the failed plan left nothing behind


def test_station_name_is_exclusive(tmp_path: Path) -> None:
    from keyload.core.errors import StoreError

    _, j, _ = _setup(tmp_path, 1)
    j.lock_station("c", "s1")
    j2 = SqliteJournal(tmp_path / "journal.db")
    with pytest.raises(StoreError, match="already running"):
        j2.lock_station("c", "s1")
    j2.lock_station("c", "s2")
    j.close()
    j2.close()


def test_load_states_are_an_enum_stored_as_the_same_strings(tmp_path: Path) -> None:
    """LoadState members are what the journal stores: a journal written before them (plain
    strings) reads back as members, and counts print as before."""
    w, j, units = _setup(tmp_path, 2)
    db = sqlite3.connect(tmp_path / "journal.db")
    try:
        assert {s for (s,) in db.execute("SELECT state FROM loads")} == {"planned"}
        [first, *_] = j.rows("c")
        assert first.state is LoadState.PLANNED and first.state == "planned"
        run_campaign(j, "c", w.client(), _connector(units), RunOptions(station="s1"))
        assert {s for (s,) in db.execute("SELECT state FROM loads")} == {"imported"}
        with db:  # a row as an older keyload wrote it: the plain text 'failed'
            db.execute("UPDATE loads SET state = 'failed' WHERE sn = ? AND ref2 = ?",
                       (first.sn.hex(), first.ref2))
        got = {(r.sn, r.ref2): r.state for r in j.rows("c")}
        assert got[first.sn, first.ref2] is LoadState.FAILED
        assert {type(s) for s in got.values()} == {LoadState}
        assert json.dumps(j.counts("c")) == json.dumps(
            {"planned": 0, "claimed": 0, "exported": 0, "imported": 3, "failed": 1})
    finally:
        db.close()


def test_failure_steps_are_an_enum_with_the_same_text() -> None:
    kcv = LoadFailed("KCV check", KcvMismatch("the unit's KCV differs from the authority's"))
    assert kcv.step is Step.KCV and str(kcv).startswith("KCV check: ")
    assert not is_transient(kcv)  # a KCV mismatch is never retried
    lost = LoadFailed(Step.IMPORT, TransportError("card removed"))
    assert lost.step == "unit IMPORTKEY" and is_transient(lost)
    with pytest.raises(ValueError):
        LoadFailed("no such step", TransportError("x"))
