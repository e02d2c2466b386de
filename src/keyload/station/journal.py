"""The campaign journal: every planned load and its state, crash-safe and shared.

One row per planned load (campaign, unit SN, REF2), in ``loads``. States::

    planned -> claimed -> exported -> imported        (receipt held; verified later)
                      \\-> failed (SW, reason)     \\-> imported, reconciled (no receipt)

*Claims are the durability barrier.* A station claims a batch of units (all their loads)
in one committed transaction before it sends anything to them, with a lease. Later
writes (exported, imported) are committed one by one but need not reach the disk before
the next command: SQLite runs in WAL mode with ``synchronous=NORMAL``, which survives a
crash of the station process; after a power loss the last commits may be missing.
Either way, any load left ``claimed`` or ``exported`` (by this station, or by a station
whose lease expired) is *reconciled* before anything is sent again: the unit is asked
(GET SLOT STATUS) and, if it already holds the planned key version, the load is marked
imported without a new export (its receipt, if it was lost, is recorded as lost).

SQLite is the default (one machine; several processes may share the file). PostgreSQL
(several machines) implements the same interface with ``FOR UPDATE SKIP LOCKED`` claims.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from ..core.errors import StoreError
from ..records.sql import is_postgres_url
from ..records.stored import (
    H_SIZE,
    KCV_SIZE,
    R_SIZE,
    RCT_SIZE,
    REF1_SIZE,
    SN_SIZE,
    DamagedRow,
    hex_col,
    int_col,
    open_records,
    opt_hex_col,
    opt_int_col,
    reading,
    text_col,
)


class LoadState(StrEnum):
    """Where a planned load stands (the diagram above); the value is what is stored."""

    PLANNED = "planned"
    CLAIMED = "claimed"
    EXPORTED = "exported"
    IMPORTED = "imported"
    FAILED = "failed"


PLANNED, CLAIMED, EXPORTED, IMPORTED, FAILED = LoadState
STATES = tuple(LoadState)

SCHEMA = """
CREATE TABLE IF NOT EXISTS campaigns (
    id TEXT PRIMARY KEY,
    set_id TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    plan TEXT NOT NULL,
    source TEXT NOT NULL,
    units INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS loads (
    campaign TEXT NOT NULL,
    seq BIGINT NOT NULL,
    sn TEXT NOT NULL,
    ref2 INTEGER NOT NULL,
    ref1 TEXT NOT NULL,
    version INTEGER,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    station TEXT,
    lease DOUBLE PRECISION,
    suite INTEGER,
    r TEXT,
    header TEXT,
    kcv TEXT,
    rct TEXT,
    reconciled INTEGER NOT NULL DEFAULT 0,
    sw TEXT,
    reason TEXT,
    updated DOUBLE PRECISION,
    PRIMARY KEY (campaign, sn, ref2)
);
CREATE INDEX IF NOT EXISTS loads_claim ON loads (campaign, state, seq);
CREATE INDEX IF NOT EXISTS loads_seq ON loads (campaign, seq, ref2);
CREATE TABLE IF NOT EXISTS events (
    campaign TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    station TEXT NOT NULL,
    loads_done INTEGER NOT NULL,
    loads_failed INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class PlannedLoad:
    ref1: bytes
    ref2: int
    version: int | None = None  # the key version to hold at the end (None: any)


@dataclass(frozen=True, slots=True)
class Campaign:
    id: str
    set_id: bytes
    created: float
    plan: tuple[PlannedLoad, ...]
    source: dict[str, Any]
    units: int


@dataclass(frozen=True, slots=True)
class LoadRow:
    campaign: str
    seq: int
    sn: bytes
    ref2: int
    ref1: bytes
    version: int | None
    state: LoadState
    attempts: int
    station: str | None
    lease: float | None
    suite: int | None
    r: bytes | None
    header: bytes | None
    kcv: bytes | None
    rct: bytes | None
    reconciled: bool
    sw: str | None
    reason: str | None
    updated: float | None


_COLS = ("campaign, seq, sn, ref2, ref1, version, state, attempts, station, lease, suite, r, "
         "header, kcv, rct, reconciled, sw, reason, updated")


def row_of(t: Sequence[Any]) -> LoadRow:
    """A ``loads`` row (columns as in ``_COLS``); DamagedRow when a column does not decode."""
    if not isinstance(t[6], str) or t[6] not in STATES:
        raise DamagedRow("state is not a load state")
    return LoadRow(text_col(t[0], "campaign"), int_col(t[1], "seq"),
                   hex_col(t[2], "sn", SN_SIZE), int_col(t[3], "ref2"),
                   hex_col(t[4], "ref1", REF1_SIZE), opt_int_col(t[5], "version"),
                   LoadState(t[6]),
                   int_col(t[7], "attempts"), t[8], t[9], opt_int_col(t[10], "suite"),
                   opt_hex_col(t[11], "r", R_SIZE), opt_hex_col(t[12], "header", H_SIZE),
                   opt_hex_col(t[13], "kcv", KCV_SIZE), opt_hex_col(t[14], "rct", RCT_SIZE),
                   bool(t[15]), t[16], t[17], t[18])


class Journal(Protocol):
    """What a campaign needs from its journal (SQLite or PostgreSQL)."""

    def create_campaign(self, c: Campaign, serials: Iterable[bytes]) -> None: ...
    def campaign(self, campaign_id: str) -> Campaign: ...
    def campaigns(self) -> list[str]: ...
    def claim(self, campaign_id: str, station: str, units: int, lease_s: float,
              now: float) -> list[LoadRow]: ...
    def claim_unit(self, campaign_id: str, sn: bytes, station: str, lease_s: float,
                   now: float) -> list[LoadRow]: ...
    def renew(self, campaign_id: str, station: str, lease_s: float, now: float) -> None: ...
    def exported(self, row: LoadRow, suite: int, r: bytes, header: bytes, kcv: bytes,
                 now: float) -> None: ...
    def imported(self, row: LoadRow, *, suite: int | None, r: bytes | None, header: bytes,
                 kcv: bytes, rct: bytes | None, reconciled: bool, now: float) -> None: ...
    def failed(self, row: LoadRow, sw: str | None, reason: str, now: float, *,
               final: bool) -> None: ...
    def counts(self, campaign_id: str) -> dict[str, int]: ...
    def rows(self, campaign_id: str, states: Sequence[str] | None = None) -> Iterator[LoadRow]: ...
    def event(self, campaign_id: str, station: str, now: float, done: int,
              failed: int) -> None: ...
    def events(self, campaign_id: str) -> list[tuple[float, str, int, int]]: ...
    def lock_station(self, campaign_id: str, station: str) -> None: ...
    def close(self) -> None: ...


def campaign_to_row(c: Campaign) -> tuple[str, str, float, str, str, int]:
    plan = [{"ref1": p.ref1.hex(), "ref2": p.ref2, "version": p.version} for p in c.plan]
    return (c.id, c.set_id.hex(), c.created, json.dumps(plan), json.dumps(c.source), c.units)


def campaign_from_row(t: Sequence[Any]) -> Campaign:
    plan = tuple(PlannedLoad(bytes.fromhex(p["ref1"]), int(p["ref2"]), p["version"])
                 for p in json.loads(t[3]))
    return Campaign(t[0], bytes.fromhex(t[1]), float(t[2]), plan, json.loads(t[4]), int(t[5]))


# The outcome writes, the same on every backend (``?`` placeholders; PostgreSQL's
# journal turns them into ``%s`` with :func:`pg_params`).
def exported_write(row: LoadRow, suite: int, r: bytes, header: bytes, kcv: bytes,
                   now: float) -> tuple[str, tuple[Any, ...]]:
    return ("UPDATE loads SET state = 'exported', attempts = attempts + 1, suite = ?, r = ?, "
            "header = ?, kcv = ?, updated = ? WHERE campaign = ? AND sn = ? AND ref2 = ?",
            (suite, r.hex(), header.hex(), kcv.hex(), now, row.campaign, row.sn.hex(),
             row.ref2))


def imported_write(row: LoadRow, suite: int | None, r: bytes | None, header: bytes,
                   kcv: bytes, rct: bytes | None, reconciled: bool,
                   now: float) -> tuple[str, tuple[Any, ...]]:
    return ("UPDATE loads SET state = 'imported', suite = ?, r = ?, header = ?, kcv = ?, "
            "rct = ?, reconciled = ?, sw = NULL, reason = NULL, updated = ? "
            "WHERE campaign = ? AND sn = ? AND ref2 = ?",
            (suite, None if r is None else r.hex(), header.hex(), kcv.hex(),
             None if rct is None else rct.hex(), int(reconciled), now, row.campaign,
             row.sn.hex(), row.ref2))


def failed_write(row: LoadRow, sw: str | None, reason: str, now: float,
                 final: bool) -> tuple[str, tuple[Any, ...]]:
    """A failed attempt. Final: ``failed``. Else released for a retry: back to planned,
    or, once exported (the unit may hold the key), left exported with an expired lease,
    so that the next claim reconciles it with the unit before any new export."""
    if final:
        return ("UPDATE loads SET state = 'failed', sw = ?, reason = ?, "
                "attempts = attempts + 1, station = NULL, lease = NULL, updated = ? "
                "WHERE campaign = ? AND sn = ? AND ref2 = ?",
                (sw, reason, now, row.campaign, row.sn.hex(), row.ref2))
    return ("UPDATE loads SET state = CASE state WHEN 'exported' THEN 'exported' ELSE "
            "'planned' END, lease = CASE state WHEN 'exported' THEN 0 ELSE NULL END, "
            "sw = ?, reason = ?, attempts = attempts + 1, station = NULL, updated = ? "
            "WHERE campaign = ? AND sn = ? AND ref2 = ?",
            (sw, reason, now, row.campaign, row.sn.hex(), row.ref2))


def pg_params(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``%s`` (the statements above hold no literal ?)."""
    return sql.replace("?", "%s")


class SqliteJournal:
    """The default journal: one SQLite file (WAL), shared by processes on one machine."""

    BATCH = 5000

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._station_locks: dict[tuple[str, str], int] = {}
        self.db = open_records(path, SCHEMA)  # rows are decoded in reading(): see stored

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE), rolled back on error;
        a database error other than an integrity error becomes a StoreError.

        Whatever arrives once COMMIT is done (a Ctrl-C) passes through as it is: the
        transaction stands and there is nothing to roll back. A rollback that fails does
        not hide the exception that called for it."""
        try:
            with self._lock:
                try:
                    self.db.execute("BEGIN IMMEDIATE")
                    yield self.db
                    self.db.execute("COMMIT")
                except BaseException:
                    if self.db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self.db.execute("ROLLBACK")
                    raise
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as e:
            raise StoreError(f"journal {self.path}: {e}") from None

    def _x(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        with self._lock, reading(self.path):
            return self.db.execute(sql, args)

    # -- planning ----------------------------------------------------------------
    def create_campaign(self, c: Campaign, serials: Iterable[bytes]) -> None:
        """Write the campaign and every planned load in one transaction (flat memory)."""
        plan = [(p.ref2, p.ref1.hex(), p.version) for p in c.plan]

        def rows() -> Iterator[tuple[Any, ...]]:
            for seq, sn in enumerate(serials):
                h = sn.hex()
                for ref2, ref1, version in plan:
                    yield (c.id, seq, h, ref2, ref1, version, PLANNED)

        try:
            with self._transaction() as db:
                db.execute("INSERT INTO campaigns VALUES (?, ?, ?, ?, ?, ?)", campaign_to_row(c))
                db.executemany("INSERT INTO loads (campaign, seq, sn, ref2, ref1, version, "
                               "state) VALUES (?, ?, ?, ?, ?, ?, ?)", rows())
        except sqlite3.IntegrityError:
            raise StoreError(f"campaign {c.id!r} exists already, or a unit is listed twice")\
                from None

    def campaign(self, campaign_id: str) -> Campaign:
        t = self._x("SELECT id, set_id, created, plan, source, units FROM campaigns "
                    "WHERE id = ?", (campaign_id,)).fetchone()
        if t is None:
            raise StoreError(f"no campaign {campaign_id!r} in {self.path}")
        with reading(self.path):
            return campaign_from_row(t)

    def campaigns(self) -> list[str]:
        return [t[0] for t in self._x("SELECT id FROM campaigns ORDER BY created")]

    # -- running -----------------------------------------------------------------
    def claim(self, campaign_id: str, station: str, units: int, lease_s: float,
              now: float) -> list[LoadRow]:
        """Claim up to ``units`` units (all their open loads), committed before returning.

        First this station's own unfinished claims (a resume), then claims of stations
        whose lease expired (a take-over), then planned units. Rows that were claimed or
        exported before are returned with their state, so the caller reconciles them.
        """
        with self._transaction() as db:
            seqs = [t[0] for t in db.execute(
                "SELECT DISTINCT seq FROM loads WHERE campaign = ? AND state IN "
                "('claimed', 'exported') AND (station = ? OR lease < ?) "
                "ORDER BY seq LIMIT ?", (campaign_id, station, now, units))]
            if len(seqs) < units:
                seqs += [t[0] for t in db.execute(
                    "SELECT DISTINCT seq FROM loads WHERE campaign = ? AND state = "
                    "'planned' ORDER BY seq LIMIT ?", (campaign_id, units - len(seqs)))]
            if not seqs:
                return []
            marks = ",".join("?" * len(seqs))
            rows = [row_of(t) for t in db.execute(
                f"SELECT {_COLS} FROM loads WHERE campaign = ? AND seq IN ({marks}) "  # noqa: S608
                "AND state IN ('planned', 'claimed', 'exported') ORDER BY seq, ref2",
                (campaign_id, *seqs))]
            db.execute(
                f"UPDATE loads SET state = CASE state WHEN 'planned' THEN 'claimed' "  # noqa: S608
                f"ELSE state END, station = ?, lease = ?, updated = ? "
                f"WHERE campaign = ? AND seq IN ({marks}) AND state IN "
                "('planned', 'claimed', 'exported')",
                (station, now + lease_s, now, campaign_id, *seqs))
        return rows

    def claim_unit(self, campaign_id: str, sn: bytes, station: str, lease_s: float,
                   now: float) -> list[LoadRow]:
        """Claim one unit's open loads (a card that came into a reader), as :meth:`claim`
        would: planned ones, this station's own, or another's whose lease expired."""
        with self._transaction() as db:
            rows = [row_of(t) for t in db.execute(
                f"SELECT {_COLS} FROM loads WHERE campaign = ? AND sn = ? AND "  # noqa: S608
                "(state = 'planned' OR (state IN ('claimed', 'exported') AND "
                "(station = ? OR lease < ?))) ORDER BY ref2",
                (campaign_id, sn.hex(), station, now))]
            if rows:
                db.execute(
                    "UPDATE loads SET state = CASE state WHEN 'planned' THEN "
                    "'claimed' ELSE state END, station = ?, lease = ?, updated = ? "
                    "WHERE campaign = ? AND sn = ? AND (state = 'planned' OR "
                    "(state IN ('claimed', 'exported') AND (station = ? OR lease < ?)))",
                    (station, now + lease_s, now, campaign_id, sn.hex(), station, now))
        return rows

    def renew(self, campaign_id: str, station: str, lease_s: float, now: float) -> None:
        self._x("UPDATE loads SET lease = ? WHERE campaign = ? AND station = ? AND state IN "
                "('claimed', 'exported')", (now + lease_s, campaign_id, station))

    def exported(self, row: LoadRow, suite: int, r: bytes, header: bytes, kcv: bytes,
                 now: float) -> None:
        self._x(*exported_write(row, suite, r, header, kcv, now))

    def imported(self, row: LoadRow, *, suite: int | None, r: bytes | None, header: bytes,
                 kcv: bytes, rct: bytes | None, reconciled: bool, now: float) -> None:
        self._x(*imported_write(row, suite, r, header, kcv, rct, reconciled, now))

    def failed(self, row: LoadRow, sw: str | None, reason: str, now: float, *,
               final: bool) -> None:
        """Record a failure; ``final`` False puts the load back to planned (retry later)."""
        self._x(*failed_write(row, sw, reason, now, final))

    def counts(self, campaign_id: str) -> dict[str, int]:
        out: dict[str, int] = dict.fromkeys(STATES, 0)
        for state, n in self._x("SELECT state, count(*) FROM loads WHERE campaign = ? "
                                "GROUP BY state", (campaign_id,)):
            out[state] = int(n)
        return out

    def rows(self, campaign_id: str, states: Sequence[str] | None = None) -> Iterator[LoadRow]:
        sql = f"SELECT {_COLS} FROM loads WHERE campaign = ?"  # noqa: S608
        args: list[Any] = [campaign_id]
        if states:
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += list(states)
        cur = self._x(sql + " ORDER BY seq, ref2", args)
        while True:
            with reading(self.path):
                rows = [row_of(t) for t in cur.fetchmany(self.BATCH)]
            if not rows:
                return
            yield from rows

    def event(self, campaign_id: str, station: str, now: float, done: int,
              failed: int) -> None:
        self._x("INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                (campaign_id, now, station, done, failed))

    def events(self, campaign_id: str) -> list[tuple[float, str, int, int]]:
        rows = self._x("SELECT time, station, loads_done, loads_failed FROM events WHERE "
                       "campaign = ? ORDER BY time", (campaign_id,))
        with reading(self.path):
            return [(float(t), str(s), int(d), int(f)) for t, s, d, f in rows]

    def lock_station(self, campaign_id: str, station: str) -> None:
        """Hold a lock so that no other live process runs as ``station`` on this campaign
        (a station resumes its own claims at once: two processes must not share a name)."""
        import fcntl
        import hashlib

        if (campaign_id, station) in self._station_locks:
            return
        tag = hashlib.sha256(f"{campaign_id}\x00{station}".encode()).hexdigest()[:16]
        path = self.path.with_name(f".{self.path.name}.{tag}.lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"station {station!r} is already running campaign "
                             f"{campaign_id!r}: give each station its own --station name")\
                from None
        self._station_locks[(campaign_id, station)] = fd

    def close(self) -> None:
        with self._lock:
            self.db.close()
        for fd in self._station_locks.values():
            os.close(fd)
        self._station_locks.clear()


def open_journal(where: str | Path) -> Journal:
    """``postgresql://…`` opens the shared PostgreSQL journal, anything else a SQLite file."""
    text = str(where)
    if is_postgres_url(text):
        import importlib

        try:
            mod = importlib.import_module("keyload.station.journal_pg")
        except ImportError as e:
            raise StoreError(f"the PostgreSQL journal needs psycopg ({e})") from None
        journal: Journal = mod.PostgresJournal(text)
        return journal
    return SqliteJournal(Path(text))


def now() -> float:
    return time.time()
