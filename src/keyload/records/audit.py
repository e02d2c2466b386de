"""An append-only, hash-chained audit log of authority and station actions.

Each record holds its sequence number, time, actor, action and details (never key
material) and ``hash = SHA-256(prev_hash || canonical JSON of the record)``. Verifying
recomputes the chain: an edited record breaks its own hash, a removed or reordered one
breaks the link of the next. The chain's head (last sequence number and hash) is also
kept in a separate file, ``<log>.head``, rewritten in place after each append (one small
write at offset 0, under a file lock, never moving backwards when several processes
append), so that cutting records off the end is found too; a head torn by a crash is
reported as damaged, never taken as good (an attacker who can rewrite both files can
rewrite history: anchor the head elsewhere, e.g. in the ledger export, for that).

Opening the SQLite log reads its last record, and verifying reads them all, in
:func:`~keyload.records.stored.reading`: a damaged file, or a record whose columns do not
decode, is a DamagedStore naming the file (no chain is walked over garbage).

The same chain lives in PostgreSQL (:class:`PostgresAudit`, the state several service
instances share): the ``audit`` table, and its head as the one row of ``audit_head``,
written in the transaction of the records it names (so it never moves backwards, and
cutting records off the end is found there too). Both stores share the record's hash,
the walk over the records and the verdict on the head; only where they keep them differs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import StoreError
from ..records.exportlog import ExportRecord
from ..records.sql import SqliteBatch
from ..records.stored import hex_col, int_col, num_col, open_records, reading, text_col

GENESIS = bytes(32)
HEAD_SIZE = 128  # the head file: one JSON object, padded to a fixed size

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL
);
"""


PG_SCHEMA = """
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
PG_HEAD_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_head (
    one BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
    seq BIGINT NOT NULL,
    hash TEXT NOT NULL
)
"""
ALL_RECORDS = "SELECT seq, time, actor, action, detail, prev, hash FROM audit ORDER BY seq"
CUT = "the chain's head differs: records were cut off the end or the head was changed"


def detail_text(detail: dict[str, Any]) -> str:
    """A record's details as stored (and hashed): canonical JSON."""
    return json.dumps(detail, sort_keys=True, separators=(",", ":"))


def record_hash(prev: bytes, seq: int, t: float, actor: str, action: str, detail: str) -> bytes:
    body = json.dumps([seq, repr(t), actor, action, detail], separators=(",", ":"))
    return hashlib.sha256(prev + body.encode()).digest()


LAST_RECORD = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1"


def last_record(db: Any) -> tuple[int, bytes] | None:
    """(seq, hash) of the chain's last record in ``db`` (SQLite or psycopg), if any."""
    last = db.execute(LAST_RECORD).fetchone()
    return None if last is None else (int_col(last[0], "seq"), hex_col(last[1], "hash", 32))


def chain_row(head: tuple[int, bytes] | None, actor: str, action: str,
              detail: str) -> tuple[int, float, str, str, str, str, str]:
    """The audit table's row for the record after ``head``: (seq, time, actor, action,
    detail, prev hash, hash)."""
    seq, prev = (1, GENESIS) if head is None else (head[0] + 1, head[1])
    t = time.time()
    return (seq, t, actor, action, detail, prev.hex(),
            record_hash(prev, seq, t, actor, action, detail).hex())


@dataclass(frozen=True)
class AuditProblem:
    seq: int
    problem: str


def check_chain(rows: Iterable[Any], head_seq: int = 0) -> tuple[int, list[AuditProblem],
                                                                   str | None]:
    """Walk audit rows (seq, time, actor, action, detail, prev, hash) in sequence order:
    (records, problems — gaps, broken links, edited records —, the hash of record
    ``head_seq`` if there is one). The same for the SQLite log and a PostgreSQL table."""
    problems: list[AuditProblem] = []
    prev = GENESIS
    expect = 1
    n = 0
    at_head: str | None = None
    for row in rows:
        seq, t = int_col(row[0], "seq"), num_col(row[1], "time")
        actor, action, detail = (text_col(row[i], c) for i, c in
                                 ((2, "actor"), (3, "action"), (4, "detail")))
        row_prev, h = hex_col(row[5], "prev", 32), hex_col(row[6], "hash", 32)
        n += 1
        if seq != expect:
            problems.append(AuditProblem(seq, f"records {expect}..{seq - 1} are missing"))
        if row_prev != prev:
            problems.append(AuditProblem(seq, "does not follow the record before it "
                                              "(removed or reordered records)"))
        if record_hash(row_prev, seq, t, actor, action, detail) != h:
            problems.append(AuditProblem(seq, "edited: its hash does not match"))
        if seq == head_seq:
            at_head = h.hex()
        prev = h
        expect = seq + 1
    return n, problems, at_head


def verify_chain(db: Any, head: tuple[int, str] | None, head_problem: str) -> tuple[
        int, list[AuditProblem]]:
    """(records checked, problems found) of the chain in ``db`` (SQLite or psycopg), read
    after its head (``head``: (seq, hash hex), None when it is missing or damaged, which
    ``head_problem`` says).

    The head may be behind the last record (a crash between a commit and the head's
    write): that is not a problem as long as the record at the head's sequence number
    has the head's hash; a head past the last record, or naming another hash, is."""
    head_seq, head_hash = head or (0, "")
    n, problems, at_head = check_chain(db.execute(ALL_RECORDS), head_seq)
    last = last_record(db)
    if head is None:
        if n:
            problems.append(AuditProblem(0, head_problem))
    elif head_seq > (0 if last is None else last[0]) or (head_seq and at_head != head_hash):
        problems.append(AuditProblem(head_seq, CUT))
    return n, problems


class AuditLog(SqliteBatch):
    """Append-only audit records in SQLite, chained by SHA-256.

    In a batch (:meth:`begin_batch`) appends join one transaction and the head file is
    written once, after the commit.
    """

    def __init__(self, path: Path, *, actor: str = "keyload") -> None:
        self.path = path
        self.actor = actor
        self._lock = threading.Lock()
        self._head_fd: int | None = None
        self._batch_head: tuple[int, bytes] | None = None
        self._in_batch = False
        self.db = open_records(path, _SCHEMA)
        try:
            with reading(path):
                last_record(self.db)
        except BaseException:
            self.db.close()
            raise

    def begin_batch(self) -> None:
        super().begin_batch()
        self._in_batch = True
        self._batch_head = None

    def commit_batch(self) -> None:
        try:
            super().commit_batch()
        except sqlite3.Error as e:
            raise StoreError(f"audit log {self.path}: {e}") from None
        finally:
            self._in_batch = False
        head, self._batch_head = self._batch_head, None
        if head is not None:
            with self._lock:
                self._write_head(*head)

    def rollback_batch(self) -> None:
        self._in_batch = False
        self._batch_head = None
        super().rollback_batch()

    @property
    def head_path(self) -> Path:
        return self.path.with_name(self.path.name + ".head")

    def _write_head(self, seq: int, h: bytes) -> None:
        """Record the chain's head, unless another process already recorded a later one."""
        if self._head_fd is None:
            self._head_fd = os.open(self.head_path, os.O_RDWR | os.O_CREAT, 0o600)
        fd = self._head_fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            try:
                current = int(json.loads(os.pread(fd, HEAD_SIZE, 0).rstrip(b" \n\x00"))["seq"])
            except (ValueError, KeyError, TypeError):
                current = 0
            if seq > current:
                body = json.dumps({"seq": seq, "hash": h.hex()}).encode()
                os.pwrite(fd, body.ljust(HEAD_SIZE - 1) + b"\n", 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def append(self, action: str, detail: dict[str, Any], *, actor: str | None = None) -> int:
        d = detail_text(detail)
        who = actor or self.actor
        try:
            with self._lock:
                if self._in_batch:  # the batch's transaction; the head after its commit
                    seq, h = self._insert(who, action, d)
                    self._batch_head = (seq, h)
                    return seq
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    seq, h = self._insert(who, action, d)
                    self.db.execute("COMMIT")
                except BaseException:  # a Ctrl-C once COMMIT is done passes as it came
                    if self.db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self.db.execute("ROLLBACK")
                    raise
                self._write_head(seq, h)
        except sqlite3.Error as e:
            raise StoreError(f"audit log {self.path}: {e}") from None
        return seq

    def _insert(self, who: str, action: str, d: str) -> tuple[int, bytes]:
        # in a batch, which holds the write lock, the batch's last record is the chain's
        row = chain_row(self._batch_head or last_record(self.db), who, action, d)
        self.db.execute("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?)", row)
        return row[0], bytes.fromhex(row[6])

    def ping(self) -> None:
        """A read of the log; StoreError when it cannot be read."""
        try:
            with self._lock:
                self.db.execute("SELECT 1 FROM audit LIMIT 1").fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"audit log {self.path}: {e.__class__.__name__}") from None

    def verify(self) -> tuple[int, list[AuditProblem]]:
        """(records checked, problems found): edits, removals, reorders, a cut tail
        (:func:`verify_chain`)."""
        head: tuple[int, str] | None = None
        problem = ""
        try:
            d = json.loads(self.head_path.read_bytes().rstrip(b" \n\x00"))
            head = int(d["seq"]), str(d["hash"])
        except FileNotFoundError:
            problem = "the head file is missing"
        except (ValueError, KeyError, TypeError):
            problem = "the head file is damaged"
        with reading(self.path):
            return verify_chain(self.db, head, problem)

    def close(self) -> None:
        self.db.close()
        if self._head_fd is not None:
            os.close(self._head_fd)
            self._head_fd = None


class PostgresAudit:
    """The audit chain as tables of a PostgreSQL database, over a psycopg connection the
    caller holds and serializes (the service's state shares it, so that a batch of
    requests and their records commit in one transaction).

    Appends take a transaction-scoped advisory lock (:attr:`LOCK`), so the chain stays
    linear with any number of writers; the head row is written in the same transaction
    as the records it names. In a batch (:meth:`begin_batch`, inside the caller's
    transaction) appends share that transaction and the head is written once, by
    :meth:`end_batch`, before the caller commits. psycopg errors pass to the caller.
    """

    LOCK = 0x4B4C5031  # "KLP1"

    def __init__(self, conn: Any, *, actor: str = "service") -> None:
        self.conn = conn
        self.actor = actor
        self.in_batch = False
        self._batch_head: tuple[int, bytes] | None = None

    def create(self) -> None:
        """Create the tables (in the caller's transaction). A head table made now, over
        records already there, starts at their last record."""
        had_head = self.conn.execute("SELECT to_regclass('audit_head')").fetchone()[0]
        self.conn.execute(PG_SCHEMA)
        self.conn.execute(PG_HEAD_SCHEMA)
        if had_head is None:
            last = last_record(self.conn)
            if last is not None:
                self._write_head(*last)

    def _write_head(self, seq: int, h: bytes) -> None:
        self.conn.execute(
            "INSERT INTO audit_head (one, seq, hash) VALUES (TRUE, %s, %s) ON CONFLICT (one) "
            "DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash "
            "WHERE audit_head.seq < EXCLUDED.seq", (seq, h.hex()))

    def _insert(self, who: str, action: str, d: str) -> tuple[int, bytes]:
        row = chain_row(self._batch_head or last_record(self.conn), who, action, d)
        self.conn.execute("INSERT INTO audit VALUES (%s, %s, %s, %s, %s, %s, %s)", row)
        return row[0], bytes.fromhex(row[6])

    def begin_batch(self) -> None:
        """Take the chain's lock in the caller's open transaction, held to its end."""
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.LOCK,))
        self.in_batch = True
        self._batch_head = None

    def end_batch(self) -> None:
        """Write the head of the batch's records (before the caller commits)."""
        head, self._batch_head, self.in_batch = self._batch_head, None, False
        if head is not None:
            self._write_head(*head)

    def abandon_batch(self) -> None:
        self._batch_head, self.in_batch = None, False

    def append(self, action: str, detail: dict[str, Any], *, actor: str | None = None) -> int:
        who, d = actor or self.actor, detail_text(detail)
        if self.in_batch:  # the batch holds the lock; its head is written at its end
            seq, h = self._insert(who, action, d)
            self._batch_head = (seq, h)
            return seq
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.LOCK,))
            seq, h = self._insert(who, action, d)
            self._write_head(seq, h)
        return seq

    def verify(self) -> tuple[int, list[AuditProblem]]:
        """(records checked, problems found), as :meth:`AuditLog.verify`: the head row is
        read first, so records appended meanwhile are no problem."""
        row = self.conn.execute("SELECT seq, hash FROM audit_head").fetchone()
        head = None if row is None else (int_col(row[0], "seq"), text_col(row[1], "hash"))
        return verify_chain(self.conn, head, "the head record is missing")

    def records(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(actor, action, details) of every record, in order."""
        return [(a, act, json.loads(d)) for a, act, d in self.conn.execute(
            "SELECT actor, action, detail FROM audit ORDER BY seq").fetchall()]


class AuditedExportLog:
    """An authority ExportLog that writes each export to the audit chain too."""

    def __init__(self, audit: AuditLog, inner: Any = None) -> None:
        self.audit = audit
        self.inner = inner

    def append(self, record: ExportRecord) -> None:
        if self.inner is not None:
            self.inner.append(record)
        self.audit.append("export", {
            "set_id": record.set_id.hex(), "sn": record.sn.hex(), "ref1": record.ref1.hex(),
            "ref2": record.ref2, "suite": record.suite, "key_version": record.key_version,
            "kcv": record.kcv.hex(),
            **{k: v.hex() for k, v in (("r", record.r), ("h", record.h), ("e_a", record.e_a),
                                       ("c_u", record.c_u),
                                       ("initial_key_id", record.initial_key_id))
               if v is not None}},
            actor="authority")
