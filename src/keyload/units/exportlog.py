"""The authority's export records in SQLite (PROTOCOL.md §8): never key material."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from ..core.errors import StoreError
from .authority import ExportRecord
from .storage import SqliteBatch, open_sqlite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exports (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    set_id TEXT NOT NULL,
    sn TEXT NOT NULL,
    ref1 TEXT NOT NULL,
    ref2 INTEGER NOT NULL,
    suite INTEGER NOT NULL,
    key_version INTEGER NOT NULL,
    kcv TEXT NOT NULL
);
"""


class SqliteExportLog(SqliteBatch):
    """Append-only table of exports; each append is committed before the answer leaves
    (on its own, or in a batch whose answers wait for its commit).

    Usable from any thread (an authority served as a card answers on the card's thread).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.db = open_sqlite(path, _SCHEMA)

    def append(self, record: ExportRecord) -> None:
        try:
            with self._lock:
                self._append(record)
        except sqlite3.Error as e:
            raise StoreError(f"the export record could not be written ({e})") from None

    def _append(self, record: ExportRecord) -> None:
        self.db.execute(
            "INSERT INTO exports (time, set_id, sn, ref1, ref2, suite, key_version, kcv) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (record.time, record.set_id.hex(), record.sn.hex(), record.ref1.hex(), record.ref2,
             record.suite, record.key_version, record.kcv.hex()))

    def records(self) -> list[ExportRecord]:
        rows = self.db.execute("SELECT time, set_id, sn, ref1, ref2, suite, key_version, kcv "
                               "FROM exports ORDER BY id").fetchall()
        return [ExportRecord(t, bytes.fromhex(s), bytes.fromhex(sn), bytes.fromhex(r1), r2, su,
                             v, bytes.fromhex(k)) for t, s, sn, r1, r2, su, v, k in rows]

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM exports").fetchone()[0])

    def close(self) -> None:
        self.db.close()
