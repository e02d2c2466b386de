"""Ctrl-C: a journal transaction interrupted right after COMMIT stands (no rollback, no
StoreError); ``keyload campaign run`` and ``keyload demo`` interrupted at several moments
exit 130 saying so, count nothing as failed, and a later run loads every unit exactly once.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from keyload.lab.pgserver import make_database, postgres_available, private_postgres
from keyload.records.audit import AuditLog
from keyload.station.campaign import RunOptions, run_campaign, run_campaign_cards, sigint_deferred
from keyload.station.drive import UnitSource
from keyload.station.journal.model import (
    CLAIMED,
    IMPORTED,
    PLANNED,
    Campaign,
    PlannedLoad,
)
from keyload.station.journal.sqlite import SqliteJournal
from keyload.transports import Connection
from keyload.transports.local import LocalConnection

from ..conftest import require
from ..helpers import sqlite_count
from .cli_helpers import KEYLOAD, cli_env
from .fixtures import make_world

pytestmark = pytest.mark.slow

PLAN = (PlannedLoad(b"K-AES", 1, 3), PlannedLoad(b"K-MAC", 2, None))
SERIALS = [b"KL" + i.to_bytes(6, "big") for i in range(3)]


def _campaign() -> Campaign:
    return Campaign("c", b"\x11\x22\x33", time.time(), PLAN, {}, len(SERIALS))


class _CtrlC:
    """A real connection on which Ctrl-C arrives right after a statement (once)."""

    def __init__(self, db: Any, after: str) -> None:
        self._db = db
        self._after: str | None = after

    def execute(self, sql: str, *args: Any) -> Any:
        cur = self._db.execute(sql, *args)
        if self._after is not None and sql.lstrip().startswith(self._after):
            self._after = None
            raise KeyboardInterrupt
        return cur

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


def _states(path: Path) -> dict[tuple[str, int], tuple[str, str | None]]:
    """Every load's (state, station), read on a connection of its own."""
    db = sqlite3.connect(path)
    try:
        return {(sn, ref2): (state, station) for sn, ref2, state, station in
                db.execute("SELECT sn, ref2, state, station FROM loads")}
    finally:
        db.close()


def _units(states: dict[tuple[str, int], tuple[str, str | None]], state: str) -> list[str]:
    return sorted({sn for (sn, _), (st, _) in states.items() if st == state})


def test_sqlite_ctrl_c_right_after_commit_keeps_the_claim(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    j = SqliteJournal(path)
    j.create_campaign(_campaign(), SERIALS)
    real = j.db
    j.db = _CtrlC(real, "COMMIT")  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):  # as it came: not a StoreError
        j.claim("c", "s1", 2, 60.0, time.time())
    assert not real.in_transaction
    states = _states(path)
    assert _units(states, CLAIMED) == [sn.hex() for sn in SERIALS[:2]]
    assert _units(states, PLANNED) == [SERIALS[2].hex()]
    assert {who for st, who in states.values() if st == CLAIMED} == {"s1"}
    j.db = real
    again = j.claim("c", "s1", 3, 60.0, time.time())  # a resume: its own claims come back
    assert [(r.sn, r.state) for r in again] == \
        [(sn, CLAIMED) for sn in SERIALS[:2] for _ in PLAN] + [(SERIALS[2], PLANNED)] * 2
    j.close()


def test_audit_append_ctrl_c_right_after_commit_keeps_the_record(tmp_path: Path) -> None:
    """The audit log's own transaction: an interrupt once COMMIT is done is no StoreError
    (it was 'cannot rollback'), the record stands and the chain still verifies."""
    log = AuditLog(tmp_path / "audit.db")
    log.append("first", {"n": 1})
    real = log.db
    log.db = _CtrlC(real, "COMMIT")  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        log.append("second", {"n": 2})
    assert not real.in_transaction
    log.db = real
    log.append("third", {"n": 3})
    count, problems = log.verify()
    assert (count, problems) == (3, [])
    log.close()


def test_sqlite_ctrl_c_before_commit_rolls_back(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    j = SqliteJournal(path)
    j.create_campaign(_campaign(), SERIALS)
    before = _states(path)
    real = j.db
    j.db = _CtrlC(real, "UPDATE loads")  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        j.claim("c", "s1", 2, 60.0, time.time())
    assert not real.in_transaction
    assert _states(path) == before
    j.db = real
    assert len(j.claim("c", "s1", 1, 60.0, time.time())) == 2  # the journal goes on
    j.close()


class _PgCtrlC(_CtrlC):
    """Also Ctrl-C right after a transaction's COMMIT (``after="COMMIT"``)."""

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        with self._db.transaction() as tx:
            yield tx
        if self._after == "COMMIT":
            self._after = None
            raise KeyboardInterrupt


def test_postgres_ctrl_c_in_a_claim(tmp_path: Path) -> None:
    """After COMMIT the claim stands, before it nothing is claimed; never a StoreError."""
    ok, why = postgres_available()
    require(ok, f"PostgreSQL: {why}")
    from keyload.station.journal.postgres import PostgresJournal

    with private_postgres(tmp_path / "pg") as server:
        for moment, claimed in (("COMMIT", SERIALS[:2]), ("UPDATE loads", [])):
            j = PostgresJournal(make_database(server, f"ctrlc_{moment.split()[0].lower()}"))
            j.create_campaign(_campaign(), SERIALS)
            real = j.db
            j.db = _PgCtrlC(real, moment)  # type: ignore[assignment]
            with pytest.raises(KeyboardInterrupt):
                j.claim("c", "s1", 2, 60.0, time.time())
            j.db = real
            assert sorted({r.sn for r in j.rows("c", [CLAIMED])}) == claimed, moment
            again = j.claim("c", "s1", 3, 60.0, time.time())
            assert sorted({r.sn for r in again}) == SERIALS
            j.close()


# -- the run loops, with SIGINT deferred (in this process) ---------------------------------
RUN_PLAN = (PlannedLoad(b"DIV", 1, 1), PlannedLoad(b"MAC", 2, 1))


def test_sigint_in_a_load_lets_it_finish_then_the_run_stops(tmp_path: Path) -> None:
    w = make_world()
    units = {sn: w.unit(sn) for sn in SERIALS}
    j = SqliteJournal(tmp_path / "journal.db")
    j.create_campaign(Campaign("c", w.set_a, time.time(), RUN_PLAN, {}, 3), SERIALS)
    seen: list[bytes] = []

    @contextmanager
    def connect(sn: bytes) -> Iterator[Connection]:
        seen.append(sn)
        if seen == SERIALS[:2]:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C as this unit's loads begin
        yield LocalConnection(units[sn])

    with sigint_deferred() as intr:
        s = run_campaign(j, "c", w.client(), connect, RunOptions(station="s1"),
                         interrupt=intr)
        assert intr.stop.is_set()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert s.interrupted and s.loads_failed == 0 and s.loads_retried == 0
    assert seen == SERIALS[:2]  # the third unit is not touched
    # the unit in flight was stopped before its first load; its claim waits for a resume
    assert j.counts("c") == {"planned": 0, CLAIMED: 4, "exported": 0, IMPORTED: 2,
                             "failed": 0}
    n_exports = len(w.log.records)
    again = run_campaign(j, "c", w.client(), connect, RunOptions(station="s1"))
    assert not again.interrupted and again.loads_done == 4 and again.reconciled == 0
    assert len(w.log.records) == n_exports + 4  # each load exported once in all
    j.close()


def test_sigint_while_waiting_for_a_card_stops_at_once(tmp_path: Path) -> None:
    w = make_world()
    j = SqliteJournal(tmp_path / "journal.db")
    j.create_campaign(Campaign("c", w.set_a, time.time(), RUN_PLAN, {}, 3), SERIALS)

    def cards() -> Iterator[UnitSource]:
        signal.raise_signal(signal.SIGINT)  # while the reader is empty
        raise AssertionError("the wait for a card was not cut")
        yield  # a generator

    with sigint_deferred() as intr:
        s = run_campaign_cards(j, "c", w.client(), cards(), RunOptions(station="r"),
                               interrupt=intr)
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C is not deferred
            signal.raise_signal(signal.SIGINT)
    assert s.interrupted and s.units_seen == 0 and j.counts("c")[PLANNED] == 6
    j.close()


# -- the console script, interrupted with SIGINT -------------------------------------------
UNITS = 2000
# each run is interrupted once it has journaled this many imports (the first one at once,
# later ones some way into the run), however fast or slow this machine is
MORE = (1, 3, 25, 60, 100, 12)
EXIT_INTERRUPTED = 130


def _count(work: Path, sql: str) -> int:
    return sqlite_count(work / "journal.db", sql)


IMPORTED_SQL = "SELECT count(*) FROM loads WHERE state = 'imported'"


def _interrupt(cmd: list[str], work: Path, more: int, out: Path) -> tuple[int, str, str]:
    """Start ``cmd``, wait until it has journaled ``more`` new imports, then SIGINT."""
    before = _count(work, IMPORTED_SQL)
    with (out.with_suffix(".out")).open("wb") as fo, (out.with_suffix(".err")).open("wb") as fe:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                             env=cli_env())
        try:
            deadline = time.monotonic() + 300
            while _count(work, IMPORTED_SQL) < before + more and p.poll() is None:
                assert time.monotonic() < deadline, f"not {more} loads journaled in 300 s"
                time.sleep(0.005)
            assert p.poll() is None, f"{cmd[1]} ended before the interrupt: raise UNITS"
            t0 = time.monotonic()
            p.send_signal(signal.SIGINT)
            rc = p.wait(timeout=30)
            took = time.monotonic() - t0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"{cmd[1]}: SIGINT after {more} loads, exit {rc} {took:.3f} s later")
    return rc, out.with_suffix(".out").read_text(), out.with_suffix(".err").read_text()


def test_ctrl_c_at_several_moments_then_resume(tmp_path: Path) -> None:
    if not KEYLOAD.exists():
        pytest.skip("the keyload console script is not installed")
    work = tmp_path / "demo"
    demo = [str(KEYLOAD), "demo", "--units", str(UNITS), "--workdir", str(work)]
    # the demo's home, resumed as the demo's station (its claims are its own)
    run_ = [str(KEYLOAD), "campaign", "run", "demo", "--station", "demo", "--home", str(work)]
    for i, more in enumerate(MORE):
        cmd = demo if i % 2 == 0 else [*run_, "--threads", str(1 + i // 2)]
        rc, out, err = _interrupt(cmd, work, more, tmp_path / f"run{i}")
        what = f"{' '.join(cmd[1:3])} #{i}\n--- stdout ---\n{out[-2000:]}\n--- stderr ---\n" \
               f"{err[-2000:]}"
        assert rc == EXIT_INTERRUPTED, what
        assert err.splitlines()[-1] == "keyload: interrupted", what
        assert "Traceback" not in out + err and "keyload: error" not in err, what
        assert all(ln.endswith("failed 0") for ln in err.splitlines() if ln.startswith("[")), \
            what
        if cmd[1] == "campaign":  # the status is printed, nothing failed
            assert out.splitlines()[-1].endswith(" loads imported, 0 failed"), what
        assert _count(work, "SELECT count(*) FROM loads WHERE state = 'failed'") == 0, what
        assert _count(work, "SELECT count(*) FROM loads WHERE attempts > 1") == 0, what
    assert 0 < _count(work, IMPORTED_SQL) < 2 * UNITS

    final = subprocess.run([*demo, "--quiet"], capture_output=True, text=True, env=cli_env(),
                           timeout=900, check=False)
    assert final.returncode == 0, final.stderr[-2000:]
    assert final.stdout.splitlines()[-1] == f"customized {UNITS:,} of {UNITS:,} units, 0 failed"
    # each load exported once and imported once, its receipt kept
    xdb = sqlite3.connect(work / "authority" / "exports.db")
    per_load = [n for (n,) in xdb.execute("SELECT count(*) FROM exports GROUP BY sn, ref2")]
    xdb.close()
    assert len(per_load) == 2 * UNITS and set(per_load) == {1}
    led = subprocess.run([str(KEYLOAD), "--home", str(work), "ledger", "verify", "--json"],
                         capture_output=True, text=True, env=cli_env(), timeout=300,
                         check=False)
    assert led.returncode == 0, led.stderr
    doc = json.loads(led.stdout)
    assert (doc["verified"], doc["invalid"], doc["reconciled_without_receipt"]) == \
        (2 * UNITS, 0, 0)
    st = subprocess.run([str(KEYLOAD), "campaign", "status", "demo", "--json", "--home",
                         str(work)], capture_output=True, text=True, env=cli_env(),
                        timeout=60, check=False)
    assert json.loads(st.stdout)["states"] == {"planned": 0, "claimed": 0, "exported": 0,
                                               "imported": 2 * UNITS, "failed": 0}


@pytest.mark.parametrize("delay", [0.25, 0.35, 0.5])
def test_ctrl_c_while_the_command_starts_is_exit_130_without_traceback(
        tmp_path: Path, delay: float) -> None:
    """A Ctrl-C in the first half second, while ``keyload``'s modules are still being
    imported (or the demo is setting up), ends it as a later one does: one line, 130."""
    cmd = [str(KEYLOAD), "demo", "--units", "2000", "--workdir", str(tmp_path / "w")]
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=cli_env())
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "keyload: interrupted", err
