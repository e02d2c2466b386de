"""The service's shared state: replay cache, exports served, ledger, rate counters, audit.

Two implementations of one small interface:

- :class:`SqliteServiceStore` (the default, one instance; several worker processes may
  share the file): ``HOME/service.db``, and the audit records go to the home's
  hash-chained audit log (``HOME/audit.db``, checked by ``keyload audit verify``);
- :class:`PostgresServiceStore` (``--state postgresql://…``): several ``keyload serve``
  instances behind one address share every table, the audit chain included, so that a
  challenge served by one instance is refused by every other.

The replay cache is the ``challenges`` table, keyed by (SN, R): a request claims its
challenge with one ``INSERT … ON CONFLICT DO NOTHING`` before the authority is asked,
so of two concurrent requests with the same (SN, R), on any instance, exactly one wins.
A claimed challenge is never released (not even when the authority then refuses):
a unit answers each INITIALIZE DOWNLOAD with a fresh R, so a legitimate client never
needs one twice. Rows hold SN, R, set id, REF1, REF2, suite, H, KCV, version and the
receipt: never key material.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..core.errors import StoreError
from ..station.audit import AuditLog, AuditProblem, chain_row, check_chain, last_record
from ..station.pgserver import is_postgres_url
from ..units.storage import SqliteBatch, open_sqlite
from .policy import Rate

SCHEMA = """
CREATE TABLE IF NOT EXISTS challenges (
    sn TEXT NOT NULL,
    r TEXT NOT NULL,
    client TEXT NOT NULL,
    set_id TEXT NOT NULL,
    ref1 TEXT NOT NULL,
    ref2 INTEGER NOT NULL,
    suite INTEGER NOT NULL,
    state TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    header TEXT,
    kcv TEXT,
    key_version INTEGER,
    sw TEXT,
    PRIMARY KEY (sn, r)
);
CREATE TABLE IF NOT EXISTS ledger (
    sn TEXT NOT NULL,
    r TEXT NOT NULL,
    set_id TEXT NOT NULL,
    ref1 TEXT NOT NULL,
    ref2 INTEGER NOT NULL,
    suite INTEGER NOT NULL,
    header TEXT NOT NULL,
    key_version INTEGER NOT NULL,
    kcv TEXT NOT NULL,
    rct TEXT NOT NULL,
    client TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (sn, r)
);
CREATE TABLE IF NOT EXISTS rate (
    key TEXT NOT NULL,
    win BIGINT NOT NULL,
    n INTEGER NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (key, win)
);
"""

PG_AUDIT = """
CREATE TABLE IF NOT EXISTS audit (
    seq BIGINT PRIMARY KEY,
    time DOUBLE PRECISION NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL
);
"""

CLAIMED, EXPORTED, REFUSED, RECEIPTED = "claimed", "exported", "refused", "receipted"
ADMITTED, RATE_LIMITED, REPLAYED = "admitted", "rate-limited", "replayed"


@dataclass(frozen=True, slots=True)
class Challenge:
    """One (SN, R) served, or being served, to one client."""

    sn: bytes
    r: bytes
    client: str
    set_id: bytes
    ref1: bytes
    ref2: int
    suite: int
    state: str = CLAIMED
    header: bytes | None = None
    kcv: bytes | None = None
    key_version: int | None = None


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    sn: bytes
    r: bytes
    set_id: bytes
    ref1: bytes
    ref2: int
    suite: int
    header: bytes
    key_version: int
    kcv: bytes
    rct: bytes
    client: str
    time: float


class ServiceStore(Protocol):
    """What the service keeps; every method is atomic on its own."""

    def hit(self, key: str, rate: Rate, now: float) -> bool:
        """Count one request against ``key``; False when over the limit."""
        ...

    def claim(self, c: Challenge, now: float) -> bool:
        """Claim (SN, R) for this export; False when it was ever claimed before."""
        ...

    def admit(self, key: str, rate: Rate, c: Challenge, now: float) -> str:
        """Count one request against ``key`` then, within the limit, claim ``c``:
        :data:`ADMITTED`, :data:`RATE_LIMITED` (nothing claimed) or :data:`REPLAYED`."""
        ...

    def exported(self, sn: bytes, r: bytes, header: bytes, kcv: bytes,
                 key_version: int) -> None: ...

    def refused(self, sn: bytes, r: bytes, sw: str) -> None: ...

    def challenge(self, sn: bytes, r: bytes) -> Challenge | None: ...

    def add_receipt(self, c: Challenge, rct: bytes, now: float) -> bool:
        """Ledger entry for an exported challenge; False when it already has one."""
        ...

    def ledger(self) -> list[LedgerEntry]: ...

    def receipt_of(self, sn: bytes, r: bytes) -> bytes | None:
        """The receipt recorded for (SN, R), if any."""
        ...

    def ping(self) -> None:
        """Read from every database the service writes; StoreError when one cannot be."""
        ...

    def append(self, action: str, detail: dict[str, Any], *, actor: str | None = None) -> int:
        """One audit record (hash-chained)."""
        ...

    def close(self) -> None: ...




def _ch(t: Any) -> Challenge:
    sn, r, client, set_id, ref1, ref2, suite, state, header, kcv, ver = t
    return Challenge(bytes.fromhex(sn), bytes.fromhex(r), client, bytes.fromhex(set_id),
                     bytes.fromhex(ref1), int(ref2), int(suite), state,
                     None if header is None else bytes.fromhex(header),
                     None if kcv is None else bytes.fromhex(kcv),
                     None if ver is None else int(ver))


def _le(t: Any) -> LedgerEntry:
    sn, r, set_id, ref1, ref2, suite, header, ver, kcv, rct, client, tm = t
    return LedgerEntry(bytes.fromhex(sn), bytes.fromhex(r), bytes.fromhex(set_id),
                       bytes.fromhex(ref1), int(ref2), int(suite), bytes.fromhex(header),
                       int(ver), bytes.fromhex(kcv), bytes.fromhex(rct), client, float(tm))


class _SqlStore(ABC):
    """The SQL both engines share; ``_x(sql, args)`` runs one statement (``?`` style)."""

    _hits = 0

    @abstractmethod
    def _x(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """Run one statement, return its rows (none for a statement without)."""

    def _w(self, sql: str, args: tuple[Any, ...]) -> None:
        """Run one statement whose result is not needed (PostgreSQL may send it later,
        with the next statement that needs one, in the same transaction)."""
        self._x(sql, args)

    @abstractmethod
    def _receipt_tx(self, c: Challenge, rct: bytes, now: float) -> bool:
        """Mark the challenge receipted and add its ledger entry, in one transaction."""

    def hit(self, key: str, rate: Rate, now: float) -> bool:
        win = int(now // rate.window_s)
        return self._count(key, win, rate, now, 1) <= rate.limit

    def _count(self, key: str, win: int, rate: Rate, now: float, add: int) -> int:
        """Add ``add`` to the counter of (key, window); its new value."""
        rows = self._x("INSERT INTO rate (key, win, n, expires) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (key, win) DO UPDATE SET n = rate.n + ? RETURNING n",
                       (key, win, add, (win + 1) * rate.window_s, add))
        self._hits += 1
        if self._hits % 4096 == 0:
            self._x("DELETE FROM rate WHERE expires < ?", (now,))
        return int(rows[0][0])

    def admit(self, key: str, rate: Rate, c: Challenge, now: float) -> str:
        if not self.hit(key, rate, now):
            return RATE_LIMITED
        return ADMITTED if self.claim(c, now) else REPLAYED

    def claim(self, c: Challenge, now: float) -> bool:
        return len(self._x(
            "INSERT INTO challenges (sn, r, client, set_id, ref1, ref2, suite, state, time) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sn, r) DO NOTHING RETURNING 1",
            (c.sn.hex(), c.r.hex(), c.client, c.set_id.hex(), c.ref1.hex(), c.ref2, c.suite,
             CLAIMED, now))) == 1

    def exported(self, sn: bytes, r: bytes, header: bytes, kcv: bytes,
                 key_version: int) -> None:
        self._w("UPDATE challenges SET state = ?, header = ?, kcv = ?, key_version = ? "
                "WHERE sn = ? AND r = ? AND state = ?",
                (EXPORTED, header.hex(), kcv.hex(), key_version, sn.hex(), r.hex(), CLAIMED))

    def refused(self, sn: bytes, r: bytes, sw: str) -> None:
        self._w("UPDATE challenges SET state = ?, sw = ? WHERE sn = ? AND r = ? AND state = ?",
                (REFUSED, sw, sn.hex(), r.hex(), CLAIMED))

    def challenge(self, sn: bytes, r: bytes) -> Challenge | None:
        rows = self._x("SELECT sn, r, client, set_id, ref1, ref2, suite, state, header, kcv, "
                       "key_version FROM challenges WHERE sn = ? AND r = ?",
                       (sn.hex(), r.hex()))
        return _ch(rows[0]) if rows else None

    def receipt_of(self, sn: bytes, r: bytes) -> bytes | None:
        rows = self._x("SELECT rct FROM ledger WHERE sn = ? AND r = ?", (sn.hex(), r.hex()))
        return bytes.fromhex(rows[0][0]) if rows else None

    def ledger(self) -> list[LedgerEntry]:
        return [_le(t) for t in self._x(
            "SELECT sn, r, set_id, ref1, ref2, suite, header, key_version, kcv, rct, client, "
            "time FROM ledger ORDER BY time")]

    def unreceipted_exports(self) -> list[tuple[str, str, float]]:
        """(client, state, time) of each challenge left exported or claimed without a
        ledger entry, oldest first (``time``: when it was claimed, just before its export)."""
        return [(str(c), str(s), float(t)) for c, s, t in self._x(
            "SELECT c.client, c.state, c.time FROM challenges c WHERE c.state IN (?, ?) "
            "AND NOT EXISTS (SELECT 1 FROM ledger l WHERE l.sn = c.sn AND l.r = c.r) "
            "ORDER BY c.time", (EXPORTED, CLAIMED))]

    @staticmethod
    def _ledger_args(c: Challenge, rct: bytes, now: float) -> tuple[Any, ...]:
        assert c.header is not None and c.kcv is not None and c.key_version is not None
        return (c.sn.hex(), c.r.hex(), c.set_id.hex(), c.ref1.hex(), c.ref2, c.suite,
                c.header.hex(), c.key_version, c.kcv.hex(), rct.hex(), c.client, now)

    _UPDATE_RECEIPTED = "UPDATE challenges SET state = ? WHERE sn = ? AND r = ? AND state = ?"
    _INSERT_LEDGER = ("INSERT INTO ledger (sn, r, set_id, ref1, ref2, suite, header, "
                      "key_version, kcv, rct, client, time) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

    def add_receipt(self, c: Challenge, rct: bytes, now: float) -> bool:
        return self._receipt_tx(c, rct, now)


class MemoryRates:
    """Fixed-window counters in this process (one process owns the state: nothing to
    share). Each key keeps its current window only; ended ones are dropped once a second."""

    def __init__(self) -> None:
        self._n: dict[str, tuple[int, int, float]] = {}  # key -> (window, count, its end)
        self._purge_at = 0.0

    def hit(self, key: str, rate: Rate, now: float) -> bool:
        if now >= self._purge_at:
            self._n = {k: v for k, v in self._n.items() if v[2] > now}
            self._purge_at = now + 1.0
        win = int(now // rate.window_s)
        cur = self._n.get(key)
        n = cur[1] + 1 if cur is not None and cur[0] == win else 1
        self._n[key] = (win, n, (win + 1) * rate.window_s)
        return n <= rate.limit


class SqliteServiceStore(_SqlStore, SqliteBatch):
    """``HOME/service.db`` (WAL) and the home's audit log; batches group-commit both.

    ``shared_rates=False`` (one process serves from this file) keeps the rate counters in
    memory; worker processes sharing the file count in its ``rate`` table."""

    def __init__(self, path: Path, audit: AuditLog, *, shared_rates: bool = True) -> None:
        self.path = path
        self.db = open_sqlite(path, SCHEMA)
        self.audit = audit
        self._lock = threading.Lock()
        self._rates = None if shared_rates else MemoryRates()

    def hit(self, key: str, rate: Rate, now: float) -> bool:
        if self._rates is not None:
            return self._rates.hit(key, rate, now)
        return super().hit(key, rate, now)

    def _x(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        try:
            with self._lock:
                return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"service state: {e.__class__.__name__}") from None


    def _receipt_tx(self, c: Challenge, rct: bytes, now: float) -> bool:
        try:
            with self._lock:
                nested = self.db.in_transaction  # inside a batch: a savepoint
                self.db.execute("SAVEPOINT receipt" if nested else "BEGIN IMMEDIATE")
                try:
                    n = self.db.execute(self._UPDATE_RECEIPTED,
                                        (RECEIPTED, c.sn.hex(), c.r.hex(), EXPORTED)).rowcount
                    if n == 1:
                        self.db.execute(self._INSERT_LEDGER, self._ledger_args(c, rct, now))
                    self.db.execute("RELEASE receipt" if nested else "COMMIT")
                except BaseException:
                    self.db.execute("ROLLBACK TO receipt" if nested else "ROLLBACK")
                    if nested:
                        self.db.execute("RELEASE receipt")
                    raise
                return n == 1
        except sqlite3.Error as e:
            raise StoreError(f"service state: {e.__class__.__name__}") from None

    def append(self, action: str, detail: dict[str, Any], *, actor: str | None = None) -> int:
        return self.audit.append(action, detail, actor=actor)

    def ping(self) -> None:
        self._x("SELECT 1 FROM challenges LIMIT 1")
        self.audit.ping()

    def close(self) -> None:
        self.db.close()
        self.audit.close()


class PostgresServiceStore(_SqlStore):
    """The same tables in PostgreSQL (psycopg 3), plus the audit chain as a table.

    Audit appends take a transaction-scoped advisory lock, so the chain stays linear with
    any number of instances writing; ``verify_audit`` recomputes it.

    Batches (:class:`~.commit.GroupCommit`): one transaction for the requests of a pass,
    which takes the audit lock first — so two instances' batches never wait on each other
    in opposite orders — and holds it to the commit.
    """

    _ADMIT = (
        "WITH h AS (INSERT INTO rate (key, win, n, expires) VALUES (?, ?, 1, ?) "
        "ON CONFLICT (key, win) DO UPDATE SET n = rate.n + 1 RETURNING n), "
        "c AS (INSERT INTO challenges (sn, r, client, set_id, ref1, ref2, suite, state, time) "
        "SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE (SELECT n FROM h) <= ? "
        "ON CONFLICT (sn, r) DO NOTHING RETURNING 1) "
        "SELECT (SELECT n FROM h), (SELECT COUNT(*) FROM c)")

    def admit(self, key: str, rate: Rate, c: Challenge, now: float) -> str:
        """In a batch, for a key not yet counted in it: the count and the claim in one
        statement (one round trip)."""
        win = int(now // rate.window_s)
        if not self._in_batch or (key, win) in self._batch_rates:
            return super().admit(key, rate, c, now)
        rows = self._x(self._ADMIT, (
            key, win, (win + 1) * rate.window_s, c.sn.hex(), c.r.hex(), c.client,
            c.set_id.hex(), c.ref1.hex(), c.ref2, c.suite, CLAIMED, now, rate.limit))
        n, claimed = int(rows[0][0]), int(rows[0][1])
        self._batch_rates[(key, win)] = [n, 0, rate]
        if n > rate.limit:
            return RATE_LIMITED
        return ADMITTED if claimed == 1 else REPLAYED

    def hit(self, key: str, rate: Rate, now: float) -> bool:
        if not self._in_batch:
            return super().hit(key, rate, now)
        win = int(now // rate.window_s)
        seen = self._batch_rates.get((key, win))
        if seen is None:  # the batch holds the audit lock: no other instance counts now
            n = self._count(key, win, rate, now, 1)
            self._batch_rates[(key, win)] = [n, 0, rate]
            return n <= rate.limit
        seen[1] += 1
        return int(seen[0]) + int(seen[1]) <= rate.limit

    AUDIT_LOCK = 0x4B4C5031  # "KLP1"

    def __init__(self, url: str, *, actor: str = "service") -> None:
        try:
            import psycopg
        except ImportError:
            raise StoreError("PostgreSQL state needs psycopg: pip install 'psycopg[binary]'") \
                from None
        self._psycopg = psycopg
        self.actor = actor
        self._lock = threading.Lock()
        # an open batch: its psycopg pipeline (statements go out without a wait) and what
        # ends it, the chain's head in it, and the counters hit again in it, added once
        # before the commit: (key, window) -> [value at its first hit, hits since, rate]
        self._pipe: Any = None
        self._pipe_end: contextlib.ExitStack | None = None
        self._batch_head: tuple[int, bytes] | None = None
        self._batch_rates: dict[tuple[str, int], list[Any]] = {}
        try:
            self.conn = psycopg.connect(url, autocommit=True)
            with self.conn.transaction():
                self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.AUDIT_LOCK + 1,))
                for stmt in (SCHEMA + PG_AUDIT).split(";"):
                    if stmt.strip():
                        self.conn.execute(stmt)
        except psycopg.Error as e:
            raise StoreError(f"service state (PostgreSQL): {e.__class__.__name__}") from None

    @staticmethod
    def _pg(sql: str) -> str:
        return sql.replace("?", "%s")

    def _x(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        try:
            with self._lock:
                return self._rows(self.conn.execute(self._pg(sql), args))
        except self._psycopg.Error as e:
            raise StoreError(f"service state (PostgreSQL): {e.__class__.__name__}") from None

    def _w(self, sql: str, args: tuple[Any, ...]) -> None:
        try:
            with self._lock:
                self.conn.execute(self._pg(sql), args)  # in a batch: sent with the next sync
        except self._psycopg.Error as e:
            raise StoreError(f"service state (PostgreSQL): {e.__class__.__name__}") from None

    def _rows(self, cur: Any) -> list[Any]:
        if self._pipe is not None:  # in a batch's pipeline: wait for this result
            self._pipe.sync()
        return list(cur.fetchall()) if cur.description is not None else []

    def _receipt_tx(self, c: Challenge, rct: bytes, now: float) -> bool:
        try:
            with self._lock, self.conn.transaction():
                n = len(self._rows(self.conn.execute(
                    self._pg(self._UPDATE_RECEIPTED) + " RETURNING 1",
                    (RECEIPTED, c.sn.hex(), c.r.hex(), EXPORTED))))
                if n == 1:
                    self.conn.execute(self._pg(self._INSERT_LEDGER),
                                      self._ledger_args(c, rct, now))
                return n == 1
        except self._psycopg.Error as e:
            raise StoreError(f"service state (PostgreSQL): {e.__class__.__name__}") from None

    @property
    def _in_batch(self) -> bool:
        return self._pipe_end is not None

    def _end_batch(self) -> contextlib.ExitStack:
        """Leave the batch's state; what ends its pipeline (closing it sends the rest)."""
        end = self._pipe_end or contextlib.ExitStack()
        self._pipe, self._pipe_end, self._batch_head, self._batch_rates = None, None, None, {}
        return end

    def begin_batch(self) -> None:
        try:
            with self._lock:
                self._pipe_end = contextlib.ExitStack()
                self._pipe = self._pipe_end.enter_context(self.conn.pipeline())
                self.conn.execute("BEGIN")
                self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.AUDIT_LOCK,))
        except self._psycopg.Error as e:
            raise StoreError(f"service state (PostgreSQL): {e.__class__.__name__}") from None

    def commit_batch(self) -> None:
        try:
            for (key, win), (_, more, rate) in self._batch_rates.items():
                if more:
                    self._count(key, win, rate, 0.0, more)
            with self._lock:
                cur = self.conn.execute("COMMIT")
                self._end_batch().close()  # sends what is queued; raises its error
                if cur.statusmessage != "COMMIT":  # PostgreSQL ends a failed one "ROLLBACK"
                    raise StoreError("service state (PostgreSQL): the batch was rolled back")
        except self._psycopg.Error as e:
            raise StoreError(f"service state (PostgreSQL): {e.__class__.__name__}") from None

    def rollback_batch(self) -> None:
        with self._lock:
            with contextlib.suppress(self._psycopg.Error):
                self._end_batch().close()
            if self.conn.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE:
                self.conn.execute("ROLLBACK")

    def append(self, action: str, detail: dict[str, Any], *, actor: str | None = None) -> int:
        d = json.dumps(detail, sort_keys=True, separators=(",", ":"))
        who = actor or self.actor
        try:
            with self._lock:
                if self._in_batch:  # the batch holds the audit lock
                    seq, h = self._audit_insert(who, action, d)
                    self._batch_head = (seq, h)
                    return seq
                with self.conn.transaction():
                    self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.AUDIT_LOCK,))
                    seq, h = self._audit_insert(who, action, d)
        except self._psycopg.Error as e:
            raise StoreError(f"audit (PostgreSQL): {e.__class__.__name__}") from None
        return seq

    def _audit_insert(self, who: str, action: str, d: str) -> tuple[int, bytes]:
        row = chain_row(self._batch_head or last_record(self.conn), who, action, d)
        self.conn.execute("INSERT INTO audit VALUES (%s, %s, %s, %s, %s, %s, %s)", row)
        return row[0], bytes.fromhex(row[6])

    def ping(self) -> None:
        self._x("SELECT 1 FROM audit LIMIT 1")

    def verify_audit(self) -> tuple[int, list[AuditProblem]]:
        """(records, problems) of the audit chain in this database (no head file here:
        the chain lives with the rest of the state)."""
        n, problems, _ = check_chain(self._x(
            "SELECT seq, time, actor, action, detail, prev, hash FROM audit ORDER BY seq"))
        return n, problems

    def audit_records(self) -> list[tuple[str, str, dict[str, Any]]]:
        return [(a, act, json.loads(d)) for a, act, d in
                self._x("SELECT actor, action, detail FROM audit ORDER BY seq")]

    def close(self) -> None:
        self.conn.close()


def open_store(state: str | None, home_root: Path, audit: AuditLog | None, *,
               shared_rates: bool = True) -> ServiceStore:
    """``postgresql://…`` -> PostgreSQL; else a SQLite file (default ``HOME/service.db``),
    with the rate counters in memory unless ``shared_rates``."""
    if is_postgres_url(state):
        return PostgresServiceStore(state)
    if audit is None:
        raise StoreError("a SQLite service state needs the home's audit log")
    return SqliteServiceStore(Path(state) if state else home_root / "service.db", audit,
                              shared_rates=shared_rates)
