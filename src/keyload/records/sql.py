"""SQL helpers shared by the record databases (SQLite files, PostgreSQL URLs)."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TypeGuard

from ..core.errors import StoreError


def is_postgres_url(where: str | Path | None) -> TypeGuard[str]:
    """Whether a ``--journal`` / ``--state`` value names a PostgreSQL database (a
    ``postgresql://`` URL) rather than a SQLite file."""
    return where is not None and str(where).startswith(("postgresql://", "postgres://"))


def _wal(db: sqlite3.Connection, wait: float = 30.0) -> None:
    """WAL mode. Switching a new file to it takes the file for a moment and is answered
    "database is locked" without the busy timeout when another process does the same (the
    workers of ``serve`` open the same new files at once): tried again for ``wait`` s."""
    deadline = time.monotonic() + wait
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def open_sqlite(path: Path, schema: str) -> sqlite3.Connection:
    """A record database: autocommit, WAL, ``synchronous=NORMAL`` (a committed write
    survives a crash of the process), usable from any thread, mode 0600; ``schema`` is
    applied. Raises StoreError when the file cannot be opened as a database."""
    try:
        db = sqlite3.connect(path, isolation_level=None, timeout=30.0,
                             check_same_thread=False)
        path.chmod(0o600)
        _wal(db)
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(schema)
    except sqlite3.Error as e:
        raise StoreError(f"{path}: {e}") from None
    return db


def add_columns(db: sqlite3.Connection, table: str, names: Sequence[str]) -> None:
    """Give ``table`` (of a database from :func:`open_sqlite`) the TEXT columns ``names``
    it lacks: columns that came after the table was made, NULL in its older rows. One
    write transaction, looked at again once it is taken, so that of processes opening
    the file at once the first adds them. Raises sqlite3.Error."""
    def missing() -> list[str]:
        have = {t[1] for t in db.execute(f"PRAGMA table_info({table})")}
        return [n for n in names if n not in have]

    if not missing():
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        for name in missing():
            db.execute(f"ALTER TABLE {table} ADD COLUMN {name} TEXT")
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


class SqliteBatch:
    """Group commit for a record database (``db`` from :func:`open_sqlite`, ``_lock``).

    Between :meth:`begin_batch` and :meth:`commit_batch` every statement on the
    connection, from any caller, is part of one ``BEGIN IMMEDIATE`` transaction: one
    commit for many records. A caller that answers after a write must wait for the
    commit (the service's :class:`~keyload.service.commit.GroupCommit` does).
    """

    db: sqlite3.Connection
    _lock: threading.Lock

    def begin_batch(self) -> None:
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")

    def commit_batch(self) -> None:
        with self._lock:
            self.db.execute("COMMIT")

    def rollback_batch(self) -> None:
        with self._lock:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
