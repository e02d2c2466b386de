"""The station's record of every download: results with their receipts, and failures.

SQLite (WAL). A row holds what is needed to verify the unit's receipt later (SN, R, REF2,
suite, H, KCV, RCT; in suite 0x03 also E_A and the unit's C_U, with which anyone holding
the set's Q_CA verifies it) and never key material.

Opening reads every row (one a load: a damaged file is found before a load, not after
it, when the receipt could not be kept) and every read decodes its rows in
:func:`~keyload.records.stored.reading`: a damaged file, or a row that does not decode (a
loaded row needs every field of its receipt), is a DamagedStore naming the file.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..core.dukpt import INITIAL_KEY_ID_LEN
from ..records.sql import add_columns
from ..records.stored import (
    E_A_SIZE,
    H_SIZE,
    KCV_SIZE,
    R_SIZE,
    REF1_SIZE,
    SET_ID_SIZE,
    SN_SIZE,
    hex_col,
    int_col,
    num_col,
    open_records,
    opt_hex_col,
    opt_int_col,
    rct_size,
    reading,
    text_col,
)
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
#: columns added to a table made before them, NULL in older rows: suite 0x03's E_A and C_U
#: (docs/protocol.md §10.3), a BDK's load's initial key ID (Appendix D)
_ADDED_COLUMNS = ("e_a", "c_u", "initial_key_id")


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
    e_a: bytes | None = None
    c_u: bytes | None = None
    initial_key_id: bytes | None = None  # a BDK's load: the IK's ID (never the IK)


_COLS = ("time, station, sn, set_id, ref1, ref2, status, suite, r, header, key_version, kcv, "
         "rct, step, sw, reason, e_a, c_u, initial_key_id")


def _row(t: tuple[object, ...]) -> LoadRow:
    status = text_col(t[6], "status")
    if status not in ("loaded", "failed"):
        raise ValueError(status)
    loaded = status == "loaded"  # then it holds its receipt and what checks it

    def need(value: object, column: str, size: int) -> bytes | None:
        return hex_col(value, column, size) if loaded else opt_hex_col(value, column, size)

    def opt(value: object, column: str) -> int | None:
        return int_col(value, column) if loaded else opt_int_col(value, column)

    suite = opt(t[7], "suite")
    return LoadRow(num_col(t[0], "time"), text_col(t[1], "station"), hex_col(t[2], "sn", SN_SIZE),
                   need(t[3], "set_id", SET_ID_SIZE), hex_col(t[4], "ref1", REF1_SIZE),
                   int_col(t[5], "ref2"), status, suite, need(t[8], "r", R_SIZE),
                   need(t[9], "header", H_SIZE), opt(t[10], "key_version"),
                   need(t[11], "kcv", KCV_SIZE), need(t[12], "rct", rct_size(suite)),
                   None if t[13] is None else str(t[13]), None if t[14] is None else str(t[14]),
                   None if t[15] is None else str(t[15]), opt_hex_col(t[16], "e_a", E_A_SIZE),
                   opt_hex_col(t[17], "c_u"),
                   opt_hex_col(t[18], "initial_key_id", INITIAL_KEY_ID_LEN))


class LoadRecords:
    """``clock``: the wall-clock time (seconds) each row is stamped with."""

    def __init__(self, path: Path, *, station: str = "local",
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.station = station
        self.clock = clock
        self.db = open_records(path, _SCHEMA)
        try:
            with reading(path):
                add_columns(self.db, "loads", _ADDED_COLUMNS)
            for _ in self.rows():  # one row a load: read them all before another one
                pass
        except BaseException:
            self.db.close()
            raise

    def add(self, result: LoadResult) -> None:
        self.db.execute(
            "INSERT INTO loads (time, station, sn, set_id, ref1, ref2, status, suite, r, header,"
            " key_version, kcv, rct, e_a, c_u, initial_key_id) VALUES (?, ?, ?, ?, ?, ?, "
            "'loaded', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (self.clock(), self.station, result.sn.hex(), result.set_id.hex(), result.ref1.hex(),
             result.ref2, result.suite, result.r.hex(), result.header.hex(), result.key_version,
             result.kcv.hex(), result.rct.hex(),
             *(None if v is None else v.hex()
               for v in (result.e_a, result.c_u, result.initial_key_id))))

    def add_failure(self, sn: bytes, ref1: bytes, ref2: int, err: LoadFailed) -> None:
        sw = None if err.sw is None else f"{err.sw:04X}"
        self.db.execute(
            "INSERT INTO loads (time, station, sn, ref1, ref2, status, step, sw, reason) "
            "VALUES (?, ?, ?, ?, ?, 'failed', ?, ?, ?)",
            (self.clock(), self.station, sn.hex(), ref1.hex(), ref2, err.step, sw, err.reason))

    def rows(self) -> Iterator[LoadRow]:
        with reading(self.path):
            cur = self.db.execute(f"SELECT {_COLS} FROM loads ORDER BY id")  # noqa: S608
            while batch := cur.fetchmany(1000):
                rows = [_row(t) for t in batch]
                yield from rows

    def close(self) -> None:
        self.db.close()
