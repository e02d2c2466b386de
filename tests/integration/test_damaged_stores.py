"""Damaged record databases: every command that reads one exits 4 with one line naming it.

Real SQLite files in a home made by the CLI (:mod:`.store_homes`), damaged behind
keyload's back: a flipped byte at 4096 (the second page, where the first table lives),
a file cut by one byte, and rows that do not decode (not hex, odd length, NULL). Each
command that reads the file must end with exit 4, exactly one ``keyload: error:`` line
naming the file, no traceback, and leave the damaged file's bytes as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from .cli_helpers import assert_error, run
from .store_homes import CAMPAIGN, UNITS, copy_home, sql

pytestmark = pytest.mark.slow  # a home made with the console script; each test runs it

EXIT_STORE = 4

EXPORTS, AUDIT, STATION, JOURNAL = "authority/exports.db", "audit.db", "station.db", "journal.db"

AUTHORITY_EXPORTS = ("authority", "exports")
AUDIT_VERIFY = ("audit", "verify")
RECEIPTS = ("receipts",)
# a load that would be accepted: nothing is sent before the stores are read
LOAD = ("load", "--sn", UNITS[2], "--ref1", "PIN", "--ref2", "2")
CAMPAIGN_STATUS = ("campaign", "status", CAMPAIGN)
LEDGER_VERIFY = ("ledger", "verify")

# which commands read which file (every record of it, or at least its last one)
READERS = {
    EXPORTS: [AUTHORITY_EXPORTS, RECEIPTS, LOAD],
    AUDIT: [AUDIT_VERIFY, RECEIPTS, LOAD],  # ledger verify opens no audit log
    STATION: [RECEIPTS, LOAD],
    JOURNAL: [RECEIPTS, CAMPAIGN_STATUS, LEDGER_VERIFY],
}


def flip_4096(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[4096] ^= 0xFF
    path.write_bytes(bytes(data))


def cut_one_byte(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def _last_row(table: str, key: str, column: str, value: object,
              where: str = "") -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        sql(path, f"UPDATE {table} SET {column} = ? WHERE {key} = "  # noqa: S608
                  f"(SELECT max({key}) FROM {table} {where})", value)
    return damage


def _loaded(column: str, value: object) -> Callable[[Path], None]:
    return _last_row("loads", "id", column, value, "WHERE status = 'loaded'")


# row damage on each file's last record (of the shared logs, what a load reads)
ROW_DAMAGE: dict[str, list[tuple[str, Callable[[Path], None]]]] = {
    EXPORTS: [("kcv-zz", _last_row("exports", "id", "kcv", "zz")),
              ("sn-odd-length", _last_row("exports", "id", "sn", "0a0b0c0d0")),
              ("ref1-a-blob", _last_row("exports", "id", "ref1", b"\x00"))],
    AUDIT: [("hash-zz", _last_row("audit", "seq", "hash", "zz")),
            ("hash-odd-length", _last_row("audit", "seq", "hash", "abc"))],
    STATION: [("rct-zz", _loaded("rct", "zz")),
              ("kcv-odd-length", _loaded("kcv", "abc")),
              ("rct-null", _loaded("rct", None))],
    JOURNAL: [("rct-zz", _last_row("loads", "rowid", "rct", "zz")),
              ("header-odd-length", _last_row("loads", "rowid", "header", "abc")),
              ("campaign-set-id-zz", _last_row("campaigns", "rowid", "set_id", "zz"))],
}

CASES = [pytest.param(name, damage, args, id=f"{name.split('/')[-1]}-{how}-{'-'.join(args[:2])}")
         for name, readers in READERS.items() for args in readers
         for how, damage in [("flip-4096", flip_4096), ("cut-1-byte", cut_one_byte),
                             *ROW_DAMAGE[name]]
         # the journal's status reads the campaign, not its loads
         if not (args == CAMPAIGN_STATUS and how in ("rct-zz", "header-odd-length"))]


@pytest.mark.slow  # the damaged-store matrix: one CLI run per case
@pytest.mark.parametrize(("name", "damage", "args"), CASES)
def test_a_damaged_store_is_exit_4_naming_it(base_home: Path, tmp_path: Path, name: str,
                                             damage: Callable[[Path], None],
                                             args: tuple[str, ...]) -> None:
    home = copy_home(base_home, tmp_path / "home")
    path = home / name
    damage(path)
    before = path.read_bytes()
    line = assert_error(run(*args, home=home), EXIT_STORE, str(path))
    assert "damaged store" in line
    assert path.read_bytes() == before


@pytest.mark.parametrize(("name", "statement", "needle", "args"), [
    pytest.param(EXPORTS, "UPDATE exports SET set_id = 'zz' WHERE id = 1", "set_id is not hex",
                 AUTHORITY_EXPORTS, id="exports-set-id"),
    pytest.param(AUDIT, "UPDATE audit SET prev = 'abc' WHERE seq = 2", "prev is not hex",
                 AUDIT_VERIFY, id="audit-prev"),
    pytest.param(AUDIT, "UPDATE audit SET time = 'x' WHERE seq = 2", "time is str",
                 AUDIT_VERIFY, id="audit-time"),
    pytest.param(STATION, "UPDATE loads SET header = '00' WHERE id = 1", "header is 1 bytes",
                 RECEIPTS, id="station-header-length"),
])
def test_a_damaged_record_anywhere_is_found_by_its_reader(
        base_home: Path, tmp_path: Path, name: str, statement: str, needle: str,
        args: tuple[str, ...]) -> None:
    home = copy_home(base_home, tmp_path / "home")
    path = home / name
    sql(path, statement)
    before = path.read_bytes()
    assert_error(run(*args, home=home), EXIT_STORE, str(path), needle)
    assert path.read_bytes() == before


def test_a_load_refused_for_a_damaged_station_db_leaves_the_unit_alone(
        base_home: Path, tmp_path: Path) -> None:
    """station.db is read before anything is sent: the unit's slot stays empty and the
    authority records no export (the receipt could not have been kept)."""
    home = copy_home(base_home, tmp_path / "home")
    sql(home / STATION, "UPDATE loads SET rct = NULL WHERE id = 1")
    exports = (home / EXPORTS).read_bytes()
    assert_error(run(*LOAD, home=home), EXIT_STORE, str(home / STATION), "rct is NULL")
    assert (home / EXPORTS).read_bytes() == exports
    status = run("unit", "status", "--sn", UNITS[2], "--json", home=home)
    assert status.rc == 0, status.describe()
    assert {s["ref2"]: s["state"] for s in status.json()["slots"]} == {1: "loaded",
                                                                       2: "empty"}


def test_not_a_database_is_exit_4(base_home: Path, tmp_path: Path) -> None:
    home = copy_home(base_home, tmp_path / "home")
    path = home / STATION
    path.write_bytes(b"not a database at all" * 300)
    before = path.read_bytes()
    assert_error(run(*RECEIPTS, home=home), EXIT_STORE, str(path), "not a SQLite database")
    assert path.read_bytes() == before
