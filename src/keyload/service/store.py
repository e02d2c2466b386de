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
needs one twice. Suite 0x03 (docs/protocol.md §10.4) is the exception: this table is the
authority's register of served challenges, claimed only once the unit's certificate,
signature and registration are checked, and released when the export is then refused,
so that a refusal records nothing. Rows hold SN, R, set id, REF1, REF2, suite, H, KCV,
version and the receipt, and for suite 0x03 E_A and C_U: never key material.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..core.errors import StoreError
from ..records.audit import AuditLog, AuditProblem, PostgresAudit
from ..records.ledger import LedgerEntry
from ..records.sql import SqliteBatch, is_postgres_url, open_sqlite
from ..records.stored import decoding
from .commit import Busy
from .policy import Rate
from .rates import RATE_SCHEMA, LogRates, MemoryRates

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
    e_a TEXT,
    c_u TEXT,
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
    e_a TEXT,
    c_u TEXT,
    PRIMARY KEY (sn, r)
);
""" + RATE_SCHEMA
#: suite 0x03 (docs/protocol.md §10.4): E_A and C_U of an export and of its ledger entry
#: (NULL for the other suites), added to the tables of a state made before them
SUITE3_COLUMNS = tuple((table, name) for table in ("challenges", "ledger")
                       for name in ("e_a", "c_u"))

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
    # suite 0x03: the authority's E_A and the unit's C_U (encoded), once exported
    e_a: bytes | None = None
    c_u: bytes | None = None


class ServiceStore(Protocol):
    """What the service keeps; every method is atomic on its own."""

    def hit(self, key: str, rate: Rate, now: float) -> bool:
        """Count one request against ``key``; False (and nothing counted) when
        ``rate.limit`` requests were already admitted in ``(now - window, now]``."""
        ...

    def retry_after(self, key: str, rate: Rate, now: float) -> float:
        """Seconds until ``key`` admits one more request (0 when it would now)."""
        ...

    def claim(self, c: Challenge, now: float) -> bool:
        """Claim (SN, R) for this export; False when it was ever claimed before."""
        ...

    def admit(self, key: str, rate: Rate, c: Challenge, now: float) -> str:
        """Count one request against ``key`` then, within the limit, claim ``c``:
        :data:`ADMITTED`, :data:`RATE_LIMITED` (nothing claimed) or :data:`REPLAYED`."""
        ...

    def exported(self, sn: bytes, r: bytes, header: bytes, kcv: bytes,
                 key_version: int, *, e_a: bytes | None = None,
                 c_u: bytes | None = None) -> None: ...

    def refused(self, sn: bytes, r: bytes, sw: str) -> None: ...

    def release(self, sn: bytes, r: bytes) -> None:
        """Forget a claim not exported (suite 0x03: a refused export records nothing)."""
        ...

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




def _hex(v: str | None) -> bytes | None:
    return None if v is None else bytes.fromhex(v)


def _ch(t: Any) -> Challenge:
    sn, r, client, set_id, ref1, ref2, suite, state, header, kcv, ver, e_a, c_u = t
    return Challenge(bytes.fromhex(sn), bytes.fromhex(r), client, bytes.fromhex(set_id),
                     bytes.fromhex(ref1), int(ref2), int(suite), state, _hex(header),
                     _hex(kcv), None if ver is None else int(ver), _hex(e_a), _hex(c_u))


def _le(t: Any) -> LedgerEntry:
    sn, r, set_id, ref1, ref2, suite, header, ver, kcv, rct, client, tm, e_a, c_u = t
    return LedgerEntry("service", float(tm), bytes.fromhex(ref1), int(ver), int(suite),
                       bytes.fromhex(set_id), bytes.fromhex(sn), bytes.fromhex(r), int(ref2),
                       bytes.fromhex(header), bytes.fromhex(kcv), bytes.fromhex(rct),
                       client=client, e_a=_hex(e_a), c_u=_hex(c_u))


class _SqlStore(ABC):
    """The SQL both engines share; ``_x(sql, args)`` runs one statement (``?`` style).
    ``where`` names the state in errors (a row that does not decode: DamagedStore).

    The rate counters are ``_rates`` (:mod:`.rates`): sliding logs in the ``rate_log``
    table, or in memory when one process owns the state."""

    _rates: MemoryRates | LogRates
    where: str

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
        """Count the key's window and, under the limit, log this one (in one transaction:
        a batch, or the caller's)."""
        return self._rates.hit(key, rate, now)

    def retry_after(self, key: str, rate: Rate, now: float) -> float:
        return self._rates.retry_after(key, rate, now)

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
                 key_version: int, *, e_a: bytes | None = None,
                 c_u: bytes | None = None) -> None:
        self._w("UPDATE challenges SET state = ?, header = ?, kcv = ?, key_version = ?, "
                "e_a = ?, c_u = ? WHERE sn = ? AND r = ? AND state = ?",
                (EXPORTED, header.hex(), kcv.hex(), key_version,
                 None if e_a is None else e_a.hex(), None if c_u is None else c_u.hex(),
                 sn.hex(), r.hex(), CLAIMED))

    def release(self, sn: bytes, r: bytes) -> None:
        self._w("DELETE FROM challenges WHERE sn = ? AND r = ? AND state = ?",
                (sn.hex(), r.hex(), CLAIMED))

    def refused(self, sn: bytes, r: bytes, sw: str) -> None:
        self._w("UPDATE challenges SET state = ?, sw = ? WHERE sn = ? AND r = ? AND state = ?",
                (REFUSED, sw, sn.hex(), r.hex(), CLAIMED))

    def challenge(self, sn: bytes, r: bytes) -> Challenge | None:
        rows = self._x("SELECT sn, r, client, set_id, ref1, ref2, suite, state, header, kcv, "
                       "key_version, e_a, c_u FROM challenges WHERE sn = ? AND r = ?",
                       (sn.hex(), r.hex()))
        with decoding(self.where):
            return _ch(rows[0]) if rows else None

    def receipt_of(self, sn: bytes, r: bytes) -> bytes | None:
        rows = self._x("SELECT rct FROM ledger WHERE sn = ? AND r = ?", (sn.hex(), r.hex()))
        with decoding(self.where):
            return bytes.fromhex(rows[0][0]) if rows else None

    def ledger(self) -> list[LedgerEntry]:
        rows = self._x("SELECT sn, r, set_id, ref1, ref2, suite, header, key_version, kcv, "
                       "rct, client, time, e_a, c_u FROM ledger ORDER BY time")
        with decoding(self.where):
            return [_le(t) for t in rows]

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
                c.header.hex(), c.key_version, c.kcv.hex(), rct.hex(), c.client, now,
                None if c.e_a is None else c.e_a.hex(), None if c.c_u is None else c.c_u.hex())

    _UPDATE_RECEIPTED = "UPDATE challenges SET state = ? WHERE sn = ? AND r = ? AND state = ?"
    _INSERT_LEDGER = ("INSERT INTO ledger (sn, r, set_id, ref1, ref2, suite, header, "
                      "key_version, kcv, rct, client, time, e_a, c_u) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")

    def add_receipt(self, c: Challenge, rct: bytes, now: float) -> bool:
        return self._receipt_tx(c, rct, now)


class SqliteServiceStore(_SqlStore, SqliteBatch):
    """``HOME/service.db`` (WAL) and the home's audit log; batches group-commit both.

    ``shared_rates=False`` (one process serves from this file) keeps the rate counters in
    memory; worker processes sharing the file count in its ``rate`` table."""

    def __init__(self, path: Path, audit: AuditLog, *, shared_rates: bool = True) -> None:
        self.where = str(path)
        self.path = path
        self.db = open_sqlite(path, SCHEMA)
        try:  # a state made before suite 0x03 (one process at a time: workers share it)
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                for table, name in SUITE3_COLUMNS:
                    have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
                    if name not in have:
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} TEXT")
        except sqlite3.Error as e:
            self.db.close()
            raise StoreError(f"service state: {e.__class__.__name__}") from None
        self.audit = audit
        self._lock = threading.Lock()
        self._rates = LogRates(self._x, self._w) if shared_rates else MemoryRates()

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
    """The same tables in PostgreSQL (psycopg 3), plus the audit chain and its head
    (:class:`~keyload.records.audit.PostgresAudit`, on this connection).

    Audit appends take a transaction-scoped advisory lock, so the chain stays linear with
    any number of instances writing; ``verify_audit`` recomputes it.

    Batches (:class:`~.commit.GroupCommit`): one transaction for the requests of a pass,
    which takes the audit lock first — so two instances' batches never wait on each other
    in opposite orders — and holds it to the commit.
    """

    _ADMIT = LogRates.COUNT_AND_LOG + (  # noqa: S608 (constants)
        ", c AS (INSERT INTO challenges (sn, r, client, set_id, ref1, ref2, suite, state, "
        "time) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE (SELECT n FROM w) < ? "
        "ON CONFLICT (sn, r) DO NOTHING RETURNING 1) "
        "SELECT (SELECT COUNT(*) FROM h), (SELECT COUNT(*) FROM c)")

    def admit(self, key: str, rate: Rate, c: Challenge, now: float) -> str:
        """The sliding-log count and the claim in one statement (one round trip). A batch
        holds the audit lock, and statements of one transaction see each other's rows,
        so the count is exact across instances and within a batch."""
        rows = self._x(self._ADMIT, (
            *LogRates.args(key, rate, now), c.sn.hex(), c.r.hex(), c.client,
            c.set_id.hex(), c.ref1.hex(), c.ref2, c.suite, CLAIMED, now, rate.limit))
        self._rates.tidy(rate, now)
        if int(rows[0][0]) != 1:
            return RATE_LIMITED
        return ADMITTED if int(rows[0][1]) == 1 else REPLAYED

    AUDIT_LOCK = PostgresAudit.LOCK

    def __init__(self, url: str, *, actor: str = "service", busy_timeout: float = 2.0) -> None:
        from ..records.postgres import describe_url

        self.where = describe_url(url)  # without its password
        try:
            import psycopg
        except ImportError:
            raise StoreError("PostgreSQL state needs psycopg: pip install 'psycopg[binary]'") \
                from None
        self._psycopg = psycopg
        self.actor = actor
        self._lock = threading.Lock()
        # an open batch: its psycopg pipeline (statements go out without a wait) and what
        # ends it
        self._pipe: Any = None
        self._pipe_end: contextlib.ExitStack | None = None
        try:
            # a lock held elsewhere (another instance stuck mid-batch) fails a statement
            # after ``busy_timeout`` instead of stalling every request
            self.conn = psycopg.connect(
                url, autocommit=True, options=f"-c lock_timeout={int(busy_timeout * 1000)}")
        except psycopg.Error as e:
            from ..records.postgres import connect_error

            raise connect_error("service state", url, e) from None
        self.audit = PostgresAudit(self.conn, actor=actor)
        self._rates: LogRates = LogRates(self._x, self._w, one_statement=True)
        try:
            with self.conn.transaction():
                self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.AUDIT_LOCK + 1,))
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        self.conn.execute(stmt)
                for table, name in SUITE3_COLUMNS:  # a state made before suite 0x03
                    self.conn.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS "
                                      f"{name} TEXT")
                self.audit.create()
        except psycopg.Error as e:
            raise _pg_error("service state", e) from None

    @staticmethod
    def _pg(sql: str) -> str:
        return sql.replace("?", "%s")

    def _x(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        try:
            with self._lock:
                return self._rows(self.conn.execute(self._pg(sql), args))
        except self._psycopg.Error as e:
            raise _pg_error("service state", e) from None

    def _w(self, sql: str, args: tuple[Any, ...]) -> None:
        try:
            with self._lock:
                self.conn.execute(self._pg(sql), args)  # in a batch: sent with the next sync
        except self._psycopg.Error as e:
            raise _pg_error("service state", e) from None

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
            raise _pg_error("service state", e) from None

    def _end_batch(self) -> contextlib.ExitStack:
        """Leave the batch's state; what ends its pipeline (closing it sends the rest)."""
        end = self._pipe_end or contextlib.ExitStack()
        self._pipe, self._pipe_end = None, None
        self.audit.abandon_batch()
        return end

    def begin_batch(self) -> None:
        try:
            with self._lock:
                self._pipe_end = contextlib.ExitStack()
                self._pipe = self._pipe_end.enter_context(self.conn.pipeline())
                self.conn.execute("BEGIN")
                self.audit.begin_batch()
        except self._psycopg.Error as e:
            raise _pg_error("service state", e) from None

    def commit_batch(self) -> None:
        try:
            with self._lock:
                self.audit.end_batch()
                cur = self.conn.execute("COMMIT")
                self._end_batch().close()  # sends what is queued; raises its error
                if cur.statusmessage != "COMMIT":  # PostgreSQL ends a failed one "ROLLBACK"
                    raise StoreError("service state (PostgreSQL): the batch was rolled back")
        except self._psycopg.Error as e:
            raise _pg_error("service state", e) from None

    def rollback_batch(self) -> None:
        with self._lock:
            with contextlib.suppress(self._psycopg.Error):
                self._end_batch().close()
            if self.conn.info.transaction_status != self._psycopg.pq.TransactionStatus.IDLE:
                self.conn.execute("ROLLBACK")

    def append(self, action: str, detail: dict[str, Any], *, actor: str | None = None) -> int:
        try:
            with self._lock:
                return self.audit.append(action, detail, actor=actor)
        except self._psycopg.Error as e:
            raise _pg_error("audit", e) from None

    def ping(self) -> None:
        self._x("SELECT 1 FROM audit LIMIT 1")

    def verify_audit(self) -> tuple[int, list[AuditProblem]]:
        """(records, problems) of the audit chain in this database, its head included."""
        try:
            with self._lock:
                return self.audit.verify()
        except self._psycopg.Error as e:
            raise _pg_error("audit", e) from None

    def audit_records(self) -> list[tuple[str, str, dict[str, Any]]]:
        try:
            with self._lock:
                return self.audit.records()
        except self._psycopg.Error as e:
            raise _pg_error("audit", e) from None

    def close(self) -> None:
        self.conn.close()


def _pg_error(what: str, e: Exception) -> StoreError:
    """A psycopg error as the service's: :class:`~.commit.Busy` for a lock held elsewhere
    past ``lock_timeout`` (SQLSTATE 55P03), else :class:`StoreError` (class name only)."""
    cls = Busy if getattr(e, "sqlstate", None) == "55P03" else StoreError
    return cls(f"{what} (PostgreSQL): {e.__class__.__name__}")


def open_store(state: str | None, home_root: Path, audit: AuditLog | None, *,
               shared_rates: bool = True, busy_timeout: float = 2.0) -> ServiceStore:
    """``postgresql://…`` -> PostgreSQL; else a SQLite file (default ``HOME/service.db``),
    with the rate counters in memory unless ``shared_rates``. A lock held elsewhere
    fails a statement after ``busy_timeout`` seconds (SQLite's busy timeout, PostgreSQL's
    ``lock_timeout``)."""
    if is_postgres_url(state):
        return PostgresServiceStore(state, busy_timeout=busy_timeout)
    if audit is None:
        raise StoreError("a SQLite service state needs the home's audit log")
    return SqliteServiceStore(Path(state) if state else home_root / "service.db", audit,
                              shared_rates=shared_rates)
