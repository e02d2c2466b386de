"""The columns of suite 0x03 (E_A and the unit's C_U, kept with each receipt) in the
campaign journal (SQLite and PostgreSQL) and in ``station.db``: a store made before them
is given them when opened, its rows read as they were (NULL: a receipt of suite
0x01/0x02), and a suite-0x03 import keeps its 64-byte receipt with E_A and C_U."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import pytest

from keyload.lab.pgserver import make_database
from keyload.station.journal.model import Campaign, Journal, PlannedLoad
from keyload.station.journal.sql import SUITE3_COLUMNS
from keyload.station.journal.sqlite import SqliteJournal
from keyload.station.records import LoadRecords

from .test_postgres_journal import pg_server  # noqa: F401  (the module's private server)

SN = bytes.fromhex("1d000001")
PLAN = (PlannedLoad(b"TMK", 1, 1),)
HEADER = bytes.fromhex("010303204b30420001450000")
E_A = b"\x04" + bytes(range(64))
C_U = bytes.fromhex("e1") + bytes(50)


def _old_campaign_rows(journal: Journal) -> None:
    """A campaign with one load imported by suite 0x01 (as journals held before)."""
    journal.create_campaign(Campaign("old", b"\x11" * 5, time.time(), PLAN, {}, 1), [SN])
    [row] = journal.claim("old", "s1", 1, 60.0, time.time())
    journal.imported(row, suite=1, r=bytes(16), header=HEADER, kcv=bytes(5), rct=bytes(16),
                     reconciled=False, now=time.time())


def _suite3_import(journal: Journal) -> None:
    journal.create_campaign(Campaign("new", b"\x22" * 5, time.time(), PLAN, {}, 1), [SN])
    [row] = journal.claim("new", "s1", 1, 60.0, time.time())
    journal.imported(row, suite=3, r=bytes(16), header=HEADER, kcv=bytes(5),
                     rct=bytes(range(64)), reconciled=False, now=time.time(), e_a=E_A,
                     c_u=C_U)


def _check(journal: Journal) -> None:
    [old] = list(journal.rows("old"))
    assert (old.suite, old.rct, old.e_a, old.c_u) == (1, bytes(16), None, None)
    _suite3_import(journal)
    [new] = list(journal.rows("new"))
    assert (new.suite, new.rct, new.e_a, new.c_u) == (3, bytes(range(64)), E_A, C_U)


def test_an_older_sqlite_journal_is_given_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    j = SqliteJournal(path)
    try:
        _old_campaign_rows(j)
    finally:
        j.close()
    db = sqlite3.connect(path)  # the table as it was made before the columns came
    for name in SUITE3_COLUMNS:
        db.execute(f"ALTER TABLE loads DROP COLUMN {name}")
    assert {t[1] for t in db.execute("PRAGMA table_info(loads)")}.isdisjoint(SUITE3_COLUMNS)
    db.close()
    j = SqliteJournal(path)
    try:
        _check(j)
    finally:
        j.close()
    db = sqlite3.connect(path)
    assert set(SUITE3_COLUMNS) <= {t[1] for t in db.execute("PRAGMA table_info(loads)")}
    db.close()


def test_an_older_station_db_is_given_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "station.db"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE loads (id INTEGER PRIMARY KEY, time REAL NOT NULL, station TEXT NOT NULL,
            sn TEXT NOT NULL, set_id TEXT, ref1 TEXT NOT NULL, ref2 INTEGER NOT NULL,
            status TEXT NOT NULL, suite INTEGER, r TEXT, header TEXT, key_version INTEGER,
            kcv TEXT, rct TEXT, step TEXT, sw TEXT, reason TEXT);""")
    db.execute("INSERT INTO loads (time, station, sn, set_id, ref1, ref2, status, suite, r, "
               "header, key_version, kcv, rct) VALUES (1.0, 'local', ?, ?, ?, 1, 'loaded', 1, "
               "?, ?, 1, ?, ?)", (SN.hex(), "11" * 5, b"TMK".hex(), "00" * 16, HEADER.hex(),
                                  "00" * 5, "00" * 16))
    db.commit()
    db.close()
    rec = LoadRecords(path)
    try:
        [row] = list(rec.rows())
        assert (row.suite, row.rct, row.e_a, row.c_u) == (1, bytes(16), None, None)
    finally:
        rec.close()
    db = sqlite3.connect(path)
    assert {"e_a", "c_u"} <= {t[1] for t in db.execute("PRAGMA table_info(loads)")}
    db.close()


@pytest.mark.hardware
def test_an_older_postgres_journal_is_given_the_columns(pg_server: str) -> None:  # noqa: F811
    import psycopg

    from keyload.station.journal.postgres import PostgresJournal

    url = make_database(pg_server, f"suite3_{os.getpid()}")
    j = PostgresJournal(url)
    try:
        _old_campaign_rows(j)
    finally:
        j.close()
    with psycopg.connect(url, autocommit=True) as conn:
        for name in SUITE3_COLUMNS:
            conn.execute(f"ALTER TABLE loads DROP COLUMN {name}")
    j = PostgresJournal(url)
    try:
        _check(j)
    finally:
        j.close()
