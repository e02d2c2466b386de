"""The default campaign journal: one SQLite file (WAL), shared by the processes of one
machine; every write is a transaction taken at once (``BEGIN IMMEDIATE``)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ...core.errors import StoreError
from ...records.sql import add_columns
from ...records.stored import open_records, reading
from .model import Campaign, LoadRow
from .sql import (
    ADDED_COLUMNS,
    COLUMNS,
    COUNTS,
    PLANNED_COLUMNS,
    SCHEMA,
    campaign_from_row,
    campaign_to_row,
    counts_of,
    exported_write,
    failed_write,
    imported_write,
    planned_rows,
    row_of,
)


class SqliteJournal:
    """The default journal: one SQLite file (WAL), shared by processes on one machine."""

    BATCH = 5000

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._station_locks: dict[tuple[str, str], int] = {}
        self.db = open_records(path, SCHEMA)  # rows are decoded in reading(): see stored
        try:  # a journal made before the columns of suite 0x03 or the initial key ID gets them
            with reading(path):
                add_columns(self.db, "loads", ADDED_COLUMNS)
        except BaseException:
            self.db.close()
            raise

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
    def create_campaign(self, c: Campaign, serials: Iterable[bytes],
                        initial_key_ids: Mapping[bytes, bytes] | None = None) -> None:
        try:
            with self._transaction() as db:
                db.execute("INSERT INTO campaigns VALUES (?, ?, ?, ?, ?, ?)", campaign_to_row(c))
                db.executemany(f"INSERT INTO loads ({PLANNED_COLUMNS}) "  # noqa: S608
                               "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               planned_rows(c, serials, initial_key_ids))
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
        """See :meth:`Journal.claim`: one write transaction taken at once, so stations
        on this machine claim one after another."""
        with reading(self.path), self._transaction() as db:
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
                f"SELECT {COLUMNS} FROM loads WHERE campaign = ? AND seq IN ({marks}) "  # noqa: S608
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
        with reading(self.path), self._transaction() as db:
            rows = [row_of(t) for t in db.execute(
                f"SELECT {COLUMNS} FROM loads WHERE campaign = ? AND sn = ? AND "  # noqa: S608
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
                 kcv: bytes, rct: bytes | None, reconciled: bool, now: float,
                 e_a: bytes | None = None, c_u: bytes | None = None) -> None:
        self._x(*imported_write(row, suite, r, header, kcv, rct, reconciled, now, e_a, c_u))

    def failed(self, row: LoadRow, sw: str | None, reason: str, now: float, *,
               final: bool) -> None:
        self._x(*failed_write(row, sw, reason, now, final))

    def counts(self, campaign_id: str) -> dict[str, int]:
        return counts_of(self._x(COUNTS, (campaign_id,)))

    def rows(self, campaign_id: str, states: Sequence[str] | None = None) -> Iterator[LoadRow]:
        sql = f"SELECT {COLUMNS} FROM loads WHERE campaign = ?"  # noqa: S608
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
        """An exclusive ``flock`` on a lock file beside the journal (see
        :meth:`Journal.lock_station`)."""
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
