"""The campaign journal on PostgreSQL: several stations on several machines, one campaign.

Same schema, states and semantics as :class:`~keyload.station.journal.sqlite.SqliteJournal` (the
reference); what differs is how a claim stays exclusive when stations claim at the same
time without a database-wide write lock.

*Claims.* Every unit has a fixed **head row**: its load with the lowest REF2 (rows are
never deleted, so the head never changes). A claim transaction (READ COMMITTED) works in
pages of candidate units, in ``seq`` order:

1. read candidate units (first this station's own unfinished claims and expired leases of
   other stations, then units with a planned load);
2. lock their head rows ``FOR UPDATE SKIP LOCKED``: a unit another station is claiming
   right now is skipped, never waited for, so stations spread over the campaign;
3. re-read every open load of the locked units ``FOR UPDATE`` (a new statement, so a new
   snapshot: it sees any claim committed before the head lock was granted) and keep only
   the units that are still claimable, exactly by the SQLite rules;
4. mark their open loads claimed by this station with ``lease = now + lease_s``.

The head lock makes claim transactions mutually exclusive per unit, and step 3 makes the
decision on the latest committed state, so a unit is given to one station at a time and
all its loads go together. Claims are committed before :meth:`PostgresJournal.claim`
returns and come back with their state *before* the claim, as in SQLite, so the caller
reconciles loads that were claimed or exported. A dead station's claims are taken over
once ``lease < now``. A claim that finds nothing but skipped locked heads waits a little
and looks again, so it answers "nothing left" only when nothing is left to claim now.

:meth:`PostgresJournal.claim_unit` (a card that came into a reader) locks the head of
that one unit, waiting rather than skipping, then claims by the same rules.

*Station guard.* :meth:`PostgresJournal.lock_station` takes a session advisory lock keyed
on (campaign, station) for the life of the connection: a second live process running as
the same station is refused (it would treat the first one's live claims as its own).

*Planning.* :meth:`PostgresJournal.create_campaign` streams the loads with ``COPY`` in one
transaction: memory stays flat however many units the campaign has.

Single statements run in autocommit; one connection per journal, shared by the worker
threads of a station under a lock. :meth:`PostgresJournal.rows` streams through a
server-side cursor on a connection of its own.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pgerrors

from ...core.errors import StoreError
from ...records.postgres import connect_error, describe_url, pg_reason
from ...records.stored import decoding
from . import sql as shared
from .model import PLANNED, Campaign, LoadRow

_T = TypeVar("_T")
_SCHEMA_LOCK = 0x6B6C_6A6E_6C00_0001  # advisory lock: one process creates the tables
_HEAD = ("ref2 = (SELECT min(m.ref2) FROM loads m WHERE m.campaign = h.campaign "
         "AND m.sn = h.sn)")


def station_key(campaign_id: str, station: str) -> int:
    """The advisory-lock key of (campaign, station): a signed 64-bit integer."""
    h = hashlib.blake2b(f"keyload-station\0{campaign_id}\0{station}".encode(),
                        digest_size=8).digest()
    return int.from_bytes(h, "big", signed=True)


def schema_statements() -> list[str]:
    return [s.strip() for s in shared.SCHEMA.split(";") if s.strip()]


class PostgresJournal:
    """The shared journal: a PostgreSQL database reached by ``url`` (``postgresql://…``)."""

    BATCH = 5000
    CLAIM_RETRIES = 50  # deadlocks and serialization failures (rare): the claim starts over
    SKIP_WAIT_S = 0.05  # a claim that only met locked units looks again after this
    SKIP_PATIENCE_S = 10.0

    def __init__(self, url: str) -> None:
        self.url = url
        self.where = describe_url(url)
        self._lock = threading.Lock()
        self._stations: set[int] = set()
        try:
            self.db = psycopg.connect(url, autocommit=True, application_name="keyload")
        except psycopg.Error as e:
            raise connect_error("journal", url, e) from None
        try:
            with self._lock:
                have = self.db.execute(
                    "SELECT to_regclass('campaigns') IS NOT NULL AND to_regclass('loads') "
                    "IS NOT NULL AND to_regclass('loads_claim') IS NOT NULL AND "
                    "to_regclass('events') IS NOT NULL").fetchone()
                if not (have and have[0]):  # a station's role may lack CREATE: only if needed
                    with self.db.transaction():
                        self.db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                        for stmt in schema_statements():
                            self.db.execute(stmt)
                self._add_columns()
        except psycopg.Error as e:
            self.db.close()
            raise StoreError(f"journal {self.where}: {pg_reason(e)}") from None

    def _add_columns(self) -> None:
        """A journal made before the columns of suite 0x03 or the initial key ID gets them,
        under the schema lock (only if needed, as the tables); its rows keep reading as
        they were."""
        cols = [t[0] for t in self.db.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'loads' "
            "AND table_schema = current_schema()").fetchall()]
        if not shared.missing_columns(cols):
            return
        with self.db.transaction():
            self.db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for name in shared.missing_columns(cols):
                self.db.execute(f"ALTER TABLE loads ADD COLUMN IF NOT EXISTS {name} TEXT")

    # -- plumbing ------------------------------------------------------------------
    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as e:
            raise StoreError(f"journal {self.where}: {pg_reason(e)}") from None

    def _x(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._errors(), self._lock:
            cur = self.db.execute(sql, args)
            return cur.fetchall() if cur.description is not None else []

    # -- the station guard -----------------------------------------------------------
    def lock_station(self, campaign_id: str, station: str) -> None:
        """A session advisory lock (see :meth:`Journal.lock_station`)."""
        key = station_key(campaign_id, station)
        if key in self._stations:
            return
        (ok,), = self._x("SELECT pg_try_advisory_lock(%s)", (key,))
        if not ok:
            raise StoreError(f"station {station!r} is already running campaign "
                             f"{campaign_id!r} (another live process holds its lock in "
                             f"{self.where}); give this station another name")
        self._stations.add(key)

    # -- planning --------------------------------------------------------------------
    def create_campaign(self, c: Campaign, serials: Iterable[bytes],
                        initial_key_ids: Mapping[bytes, bytes] | None = None) -> None:
        """With ``COPY``, in one transaction."""
        try:
            with self._lock, self.db.transaction():
                self.db.execute("INSERT INTO campaigns (id, set_id, created, plan, source, "
                                "units) VALUES (%s, %s, %s, %s, %s, %s)", shared.campaign_to_row(c))
                with self.db.cursor() as cur, cur.copy(
                        f"COPY loads ({shared.PLANNED_COLUMNS}) FROM STDIN") as cp:
                    for row in shared.planned_rows(c, serials, initial_key_ids):
                        cp.write_row(row)
        except pgerrors.UniqueViolation:
            raise StoreError(f"campaign {c.id!r} exists already, or a unit is listed twice")\
                from None
        except psycopg.Error as e:
            raise StoreError(f"journal {self.where}: {pg_reason(e)}") from None

    def campaign(self, campaign_id: str) -> Campaign:
        rows = self._x("SELECT id, set_id, created, plan, source, units FROM campaigns "
                       "WHERE id = %s", (campaign_id,))
        if not rows:
            raise StoreError(f"no campaign {campaign_id!r} in {self.where}")
        with decoding(self.where):
            return shared.campaign_from_row(rows[0])

    def campaigns(self) -> list[str]:
        return [t[0] for t in self._x("SELECT id FROM campaigns ORDER BY created, id")]

    # -- running ---------------------------------------------------------------------
    def claim(self, campaign_id: str, station: str, units: int, lease_s: float,
              now: float) -> list[LoadRow]:
        """See :meth:`Journal.claim` and the module's *Claims*: units another station is
        claiming are skipped, and looked at again while nothing else was found."""
        if units <= 0:
            return []
        t0 = time.monotonic()
        waited = 0.0  # a claim that had to wait grants its lease from the time it is made
        attempt = 0
        while True:
            try:
                with self._lock:
                    rows, skipped = self._claim_tx(campaign_id, station, units, lease_s,
                                                   now + waited)
            except (pgerrors.DeadlockDetected, pgerrors.SerializationFailure) as e:
                attempt += 1
                if attempt >= self.CLAIM_RETRIES:
                    raise StoreError(f"journal {self.where}: claim: {pg_reason(e)}") from None
                time.sleep(0.01 * attempt)
                waited = time.monotonic() - t0
                continue
            except psycopg.Error as e:
                raise StoreError(f"journal {self.where}: claim: {pg_reason(e)}") from None
            if rows or not skipped or waited > self.SKIP_PATIENCE_S:
                return rows
            time.sleep(self.SKIP_WAIT_S)  # units were being claimed by others: look again
            waited = time.monotonic() - t0

    def _claim_tx(self, campaign_id: str, station: str, units: int, lease_s: float,
                  now: float) -> tuple[list[LoadRow], int]:
        out: list[LoadRow] = []
        skipped = 0
        with decoding(self.where), self.db.transaction():
            # 1. own unfinished claims and expired leases; 2. planned units
            for phase in ("resume", "planned"):
                after = -1
                while self._units(out) < units:
                    want = units - self._units(out)
                    if phase == "resume":
                        cands = self.db.execute(
                            "SELECT seq, sn FROM loads WHERE campaign = %s AND state IN "
                            "('claimed', 'exported') AND (station = %s OR lease < %s) AND "
                            "seq > %s GROUP BY seq, sn ORDER BY seq LIMIT %s",
                            (campaign_id, station, now, after, want)).fetchall()
                    else:
                        cands = self.db.execute(
                            "SELECT seq, sn FROM loads WHERE campaign = %s AND state = "
                            "'planned' AND seq > %s GROUP BY seq, sn ORDER BY seq LIMIT %s",
                            (campaign_id, after, want)).fetchall()
                    if not cands:
                        break
                    after = int(cands[-1][0])
                    sns = [t[1] for t in cands]
                    heads = self.db.execute(
                        f"SELECT h.sn FROM loads h WHERE h.campaign = %s AND h.sn = ANY(%s) "  # noqa: S608
                        f"AND h.{_HEAD} FOR UPDATE OF h SKIP LOCKED",
                        (campaign_id, sns)).fetchall()
                    skipped += len(sns) - len(heads)
                    if not heads:
                        continue
                    locked = [t[0] for t in heads]
                    current = [shared.row_of(t) for t in self.db.execute(
                        f"SELECT {shared.COLUMNS} FROM loads WHERE campaign = %s AND sn = ANY(%s) "  # noqa: S608
                        "AND state IN ('planned', 'claimed', 'exported') "
                        "ORDER BY seq, ref2 FOR UPDATE",
                        (campaign_id, locked)).fetchall()]
                    take = _claimable(current, station, now, units - self._units(out))
                    if not take:
                        continue
                    mine = [r for r in current if r.sn.hex() in take]
                    self.db.execute(
                        "UPDATE loads SET state = CASE state WHEN 'planned' THEN 'claimed' "
                        "ELSE state END, station = %s, lease = %s, updated = %s "
                        "WHERE campaign = %s AND sn = ANY(%s) AND state IN "
                        "('planned', 'claimed', 'exported')",
                        (station, now + lease_s, now, campaign_id, sorted(take)))
                    out += mine
        out.sort(key=lambda r: (r.seq, r.ref2))
        return out, skipped

    def claim_unit(self, campaign_id: str, sn: bytes, station: str, lease_s: float,
                   now: float) -> list[LoadRow]:
        """The unit's head row is locked first (waiting, not skipping: a card is in the
        reader), then the loads are read again and claimed on the latest committed state.
        """
        def tx() -> list[LoadRow]:
            with decoding(self.where), self.db.transaction():
                head = self.db.execute(
                    f"SELECT h.sn FROM loads h WHERE h.campaign = %s AND h.sn = %s "  # noqa: S608
                    f"AND h.{_HEAD} FOR UPDATE OF h", (campaign_id, sn.hex())).fetchall()
                if not head:
                    return []
                rows = [shared.row_of(t) for t in self.db.execute(
                    f"SELECT {shared.COLUMNS} FROM loads WHERE campaign = %s AND sn = %s AND "  # noqa: S608
                    "(state = 'planned' OR (state IN ('claimed', 'exported') AND "
                    "(station = %s OR lease < %s))) ORDER BY ref2 FOR UPDATE",
                    (campaign_id, sn.hex(), station, now)).fetchall()]
                if rows:
                    self.db.execute(
                        "UPDATE loads SET state = CASE state WHEN 'planned' THEN "
                        "'claimed' ELSE state END, station = %s, lease = %s, updated = %s "
                        "WHERE campaign = %s AND sn = %s AND ref2 = ANY(%s)",
                        (station, now + lease_s, now, campaign_id, sn.hex(),
                         [r.ref2 for r in rows]))
                return rows

        return self._retrying("claim", tx)

    def _retrying(self, what: str, tx: Callable[[], _T]) -> _T:
        """Run ``tx`` (under the connection's lock) again after a deadlock or a
        serialization failure, which PostgreSQL breaks (rare), up to CLAIM_RETRIES times."""
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._lock:
                    return tx()
            except (pgerrors.DeadlockDetected, pgerrors.SerializationFailure) as e:
                if attempt >= self.CLAIM_RETRIES:
                    raise StoreError(f"journal {self.where}: {what}: {pg_reason(e)}") from None
                time.sleep(0.01 * attempt)
            except psycopg.Error as e:
                raise StoreError(f"journal {self.where}: {what}: {pg_reason(e)}") from None

    @staticmethod
    def _units(rows: list[LoadRow]) -> int:
        return len({r.seq for r in rows})

    def renew(self, campaign_id: str, station: str, lease_s: float, now: float) -> None:
        """It locks many rows at once, so it can meet a take-over of an expired claim in
        a deadlock: PostgreSQL breaks it, and it retries."""
        def tx() -> None:
            self.db.execute("UPDATE loads SET lease = %s WHERE campaign = %s AND station = %s "
                            "AND state IN ('claimed', 'exported')",
                            (now + lease_s, campaign_id, station))

        self._retrying("renew", tx)

    def exported(self, row: LoadRow, suite: int, r: bytes, header: bytes, kcv: bytes,
                 now: float) -> None:
        sql, args = shared.exported_write(row, suite, r, header, kcv, now)
        self._x(shared.pg_params(sql), args)

    def imported(self, row: LoadRow, *, suite: int | None, r: bytes | None, header: bytes,
                 kcv: bytes, rct: bytes | None, reconciled: bool, now: float,
                 e_a: bytes | None = None, c_u: bytes | None = None) -> None:
        sql, args = shared.imported_write(row, suite, r, header, kcv, rct, reconciled, now,
                                          e_a, c_u)
        self._x(shared.pg_params(sql), args)

    def failed(self, row: LoadRow, sw: str | None, reason: str, now: float, *,
               final: bool) -> None:
        sql, args = shared.failed_write(row, sw, reason, now, final)
        self._x(shared.pg_params(sql), args)

    def counts(self, campaign_id: str) -> dict[str, int]:
        return shared.counts_of(self._x(shared.pg_params(shared.COUNTS), (campaign_id,)))

    def rows(self, campaign_id: str, states: Sequence[str] | None = None) -> Iterator[LoadRow]:
        """Streamed through a server-side cursor on a connection of its own (flat memory)."""
        sql = f"SELECT {shared.COLUMNS} FROM loads WHERE campaign = %s"  # noqa: S608
        args: list[Any] = [campaign_id]
        if states:
            sql += " AND state = ANY(%s)"
            args.append(list(states))
        sql += " ORDER BY seq, ref2"
        try:
            conn = psycopg.connect(self.url, application_name="keyload-rows")
        except psycopg.Error as e:
            raise connect_error("journal", self.url, e) from None
        try:
            with conn, conn.cursor(name="keyload_rows") as cur:
                cur.itersize = self.BATCH
                try:
                    cur.execute(sql, args)
                    while True:
                        batch = cur.fetchmany(self.BATCH)
                        if not batch:
                            return
                        with decoding(self.where):
                            rows = [shared.row_of(t) for t in batch]
                        yield from rows
                except psycopg.Error as e:
                    raise StoreError(f"journal {self.where}: {pg_reason(e)}") from None
        finally:
            conn.close()

    def event(self, campaign_id: str, station: str, now: float, done: int,
              failed: int) -> None:
        self._x("INSERT INTO events (campaign, time, station, loads_done, loads_failed) "
                "VALUES (%s, %s, %s, %s, %s)", (campaign_id, now, station, done, failed))

    def events(self, campaign_id: str) -> list[tuple[float, str, int, int]]:
        return [(float(t), s, int(d), int(f)) for t, s, d, f in self._x(
            "SELECT time, station, loads_done, loads_failed FROM events WHERE campaign = %s "
            "ORDER BY time", (campaign_id,))]

    def close(self) -> None:
        """Close the connection (and so release the station locks)."""
        with self._lock:
            self._stations.clear()
            self.db.close()


def _claimable(current: list[LoadRow], station: str, now: float, limit: int) -> set[str]:
    """The SNs (hex) of units to claim among ``current`` (their open loads, locked), by the
    rules of SqliteJournal: a planned load, or a claim of this station or an expired one."""
    take: list[str] = []
    seen: set[str] = set()
    for r in current:  # ordered by seq
        h = r.sn.hex()
        if h in seen:
            continue
        if r.state == PLANNED or r.station == station or \
                (r.lease is not None and r.lease < now):
            seen.add(h)
            take.append(h)
    return set(take[:limit])
