"""The station's record of every download: results with their receipts, and failures.

SQLite (WAL). A row holds what the authority needs to verify the unit's receipt later
(SN, R, REF2, suite, H, KCV, RCT) and never key material.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..units.storage import open_sqlite
from .load import LoadFailed, LoadResult

_SCHEMA = """
CREATE TABLE IF NOT EXISTS loads (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    station TEXT NOT NULL,
    sn TEXT NOT NULL,
    set_id TEXT,
    ref1 TEXT NOT NULL,
    ref2 INTEGER NOT NULL,
    status TEXT NOT NULL,          -- 'loaded' or 'failed'
    suite INTEGER,
    r TEXT,
    header TEXT,
    key_version INTEGER,
    kcv TEXT,
    rct TEXT,
    step TEXT,
    sw TEXT,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS loads_sn ON loads (sn, ref2);
"""


@dataclass(frozen=True, slots=True)
class LoadRow:
    time: float
    station: str
    sn: bytes
    set_id: bytes | None
    ref1: bytes
    ref2: int
    status: str
    suite: int | None
    r: bytes | None
    header: bytes | None
    key_version: int | None
    kcv: bytes | None
    rct: bytes | None
    step: str | None
    sw: str | None
    reason: str | None


def _b(x: str | None) -> bytes | None:
    return None if x is None else bytes.fromhex(x)


class LoadRecords:
    def __init__(self, path: Path, *, station: str = "local") -> None:
        self.path = path
        self.station = station
        self.db = open_sqlite(path, _SCHEMA)

    def add(self, result: LoadResult) -> None:
        self.db.execute(
            "INSERT INTO loads (time, station, sn, set_id, ref1, ref2, status, suite, r, header,"
            " key_version, kcv, rct) VALUES (?, ?, ?, ?, ?, ?, 'loaded', ?, ?, ?, ?, ?, ?)",
            (time.time(), self.station, result.sn.hex(), result.set_id.hex(), result.ref1.hex(),
             result.ref2, result.suite, result.r.hex(), result.header.hex(), result.key_version,
             result.kcv.hex(), result.rct.hex()))

    def add_failure(self, sn: bytes, ref1: bytes, ref2: int, err: LoadFailed) -> None:
        sw = None if err.sw is None else f"{err.sw:04X}"
        self.db.execute(
            "INSERT INTO loads (time, station, sn, ref1, ref2, status, step, sw, reason) "
            "VALUES (?, ?, ?, ?, ?, 'failed', ?, ?, ?)",
            (time.time(), self.station, sn.hex(), ref1.hex(), ref2, err.step, sw, err.reason))

    def rows(self) -> Iterator[LoadRow]:
        cur = self.db.execute(
            "SELECT time, station, sn, set_id, ref1, ref2, status, suite, r, header, key_version,"
            " kcv, rct, step, sw, reason FROM loads ORDER BY id")
        for (t, st, sn, set_id, ref1, ref2, status, suite, r, header, ver, kcv, rct, step, sw,
             reason) in cur:
            yield LoadRow(t, st, bytes.fromhex(sn), _b(set_id), bytes.fromhex(ref1), ref2, status,
                          suite, _b(r), _b(header), ver, _b(kcv), _b(rct), step, sw, reason)

    def close(self) -> None:
        self.db.close()
