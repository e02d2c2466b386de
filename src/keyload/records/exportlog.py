"""The authority's export records in SQLite (docs/protocol.md §8): never key material.

Opening reads the last record (so a damaged file is found before anything is exported,
not after), and every read decodes its rows in :func:`~keyload.records.stored.reading`:
a damaged file or row is a DamagedStore naming the file."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import StoreError
from . import stored as col
from .sql import SqliteBatch, add_columns
from .stored import open_records, reading

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
CREATE TABLE IF NOT EXISTS served (
    set_id TEXT NOT NULL,
    sn TEXT NOT NULL,
    r TEXT NOT NULL,
    PRIMARY KEY (set_id, sn, r)
);
"""
#: suite 0x03 (docs/protocol.md §10.4): R, H, E_A and C_U, NULL for the other suites; and
#: the initial key ID of an AES DUKPT IK delivered (docs/protocol.md Appendix D), NULL for
#: any other key; added to a table made before they existed
_ADDED_COLUMNS = ("r", "h", "e_a", "c_u", "initial_key_id")


@dataclass(frozen=True, slots=True)
class ExportRecord:
    """One export, as recorded (docs/protocol.md §8): never key material."""

    time: float
    set_id: bytes
    sn: bytes
    ref1: bytes
    ref2: int
    suite: int
    key_version: int
    kcv: bytes
    # suite 0x03 (docs/protocol.md §10.4): what verifying the unit's receipt later needs
    r: bytes | None = None
    h: bytes | None = None
    e_a: bytes | None = None
    c_u: bytes | None = None
    # an AES DUKPT initial key (docs/protocol.md Appendix D): its initial key ID, never the IK
    initial_key_id: bytes | None = None


class SqliteExportLog(SqliteBatch):
    """Append-only table of exports; each append is committed before the answer leaves
    (on its own, or in a batch whose answers wait for its commit).

    Usable from any thread (an authority served as a card answers on the card's thread).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.db = open_records(path, _SCHEMA)
        try:
            with reading(path):
                # processes opening a new file at once (serve --processes): the first adds them
                add_columns(self.db, "exports", _ADDED_COLUMNS)
                # the suite-0x03 challenges exported before the register was kept here
                self.db.execute("INSERT OR IGNORE INTO served (set_id, sn, r) "
                                "SELECT set_id, sn, r FROM exports WHERE r IS NOT NULL")
            self._read("ORDER BY id DESC LIMIT 1")
        except BaseException:
            self.db.close()
            raise

    def append(self, record: ExportRecord) -> None:
        try:
            with self._lock:
                self._append(record)
        except sqlite3.Error as e:
            raise StoreError(f"the export record could not be written ({e})") from None

    def _append(self, record: ExportRecord) -> None:
        self.db.execute(
            "INSERT INTO exports (time, set_id, sn, ref1, ref2, suite, key_version, kcv, "
            "r, h, e_a, c_u, initial_key_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record.time, record.set_id.hex(), record.sn.hex(), record.ref1.hex(), record.ref2,
             record.suite, record.key_version, record.kcv.hex(),
             *(None if v is None else v.hex()
               for v in (record.r, record.h, record.e_a, record.c_u,
                         record.initial_key_id))))

    # -- the register of served challenges (docs/protocol.md §10.4) ---------------------
    def claim(self, set_id: bytes, sn: bytes, r: bytes) -> bool:
        """Take (set id, SN, R) for a suite-0x03 export; False when it was served before,
        by this process or by any other authority of the same home (the table's key)."""
        try:
            with self._lock:
                cur = self.db.execute("INSERT OR IGNORE INTO served (set_id, sn, r) "
                                      "VALUES (?, ?, ?)", (set_id.hex(), sn.hex(), r.hex()))
                return cur.rowcount == 1
        except sqlite3.Error as e:
            raise StoreError(f"the register of served challenges could not be written ({e})"
                             ) from None

    def release(self, set_id: bytes, sn: bytes, r: bytes) -> None:
        """Give back a claim whose export was refused (nothing was served)."""
        try:
            with self._lock:
                self.db.execute("DELETE FROM served WHERE set_id = ? AND sn = ? AND r = ?",
                                (set_id.hex(), sn.hex(), r.hex()))
        except sqlite3.Error as e:
            raise StoreError(f"the register of served challenges could not be written ({e})"
                             ) from None

    def records(self) -> list[ExportRecord]:
        return self._read("ORDER BY id")

    def _read(self, tail: str) -> list[ExportRecord]:
        with reading(self.path):
            return [_record(t) for t in self.db.execute(
                "SELECT time, set_id, sn, ref1, ref2, suite, key_version, kcv, "  # noqa: S608
                "r, h, e_a, c_u, initial_key_id "
                f"FROM exports {tail}")]

    def count(self) -> int:
        with reading(self.path):
            return int(self.db.execute("SELECT count(*) FROM exports").fetchone()[0])

    def close(self) -> None:
        self.db.close()


def _record(t: tuple[object, ...]) -> ExportRecord:
    return ExportRecord(col.num_col(t[0], "time"), col.hex_col(t[1], "set_id", col.SET_ID_SIZE),
                        col.hex_col(t[2], "sn", col.SN_SIZE),
                        col.hex_col(t[3], "ref1", col.REF1_SIZE), col.int_col(t[4], "ref2"),
                        col.int_col(t[5], "suite"), col.int_col(t[6], "key_version"),
                        col.hex_col(t[7], "kcv", col.KCV_SIZE),
                        col.opt_hex_col(t[8], "r", 16), col.opt_hex_col(t[9], "h", 12),
                        col.opt_hex_col(t[10], "e_a", 65), col.opt_hex_col(t[11], "c_u"),
                        col.opt_hex_col(t[12], "initial_key_id", 8))
