"""``keyload receipts`` checks each receipt against the authority's export record, not only
its MAC, and lists the exports left with neither a receipt nor a reconciliation.

The home (:mod:`.store_homes`) holds five receipts (three from a campaign, two from single
loads) and one export without a receipt (a load the unit refused, recorded as failed).
Rows are edited behind keyload's back in copies of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .cli_helpers import assert_error, run
from .store_homes import UNITS, copy_home, sql

pytestmark = pytest.mark.slow  # a home made with the console script; each test runs it

EXIT_FAILED, EXIT_STORE = 1, 4
REFUSED = {"sn": UNITS[2], "ref1": "PIN", "ref2": 1, "key_version": 3,
           "station": "load failed at unit IMPORTKEY: SW 6986"}


@pytest.fixture
def home(base_home: Path, tmp_path: Path) -> Path:
    return copy_home(base_home, tmp_path / "home")


def receipts(home: Path, rc: int) -> dict[str, Any]:
    res = run("receipts", "--json", home=home)
    assert res.rc == rc, res.describe()
    assert "Traceback" not in res.output and res.stderr == "", res.describe()
    out: dict[str, Any] = res.json()
    assert out["exports_without_receipt"] == len(out["without_receipt"])
    return out


def lost(out: dict[str, Any]) -> list[dict[str, Any]]:
    keys = ("sn", "ref1", "ref2", "key_version", "station")
    return [{k: e[k] for k in keys} for e in out["without_receipt"]]


def test_an_untouched_home_verifies_and_lists_the_refused_export(home: Path) -> None:
    out = receipts(home, 0)
    assert (out["verified"], out["invalid"], out["invalid_rows"], out["reconciled"]) == \
        (5, 0, [], 0)
    assert lost(out) == [REFUSED]
    e = out["without_receipt"][0]
    assert len(e["set_id"]) == 10 and len(e["kcv"]) == 10 and e["suite"] in (1, 2)
    text = run("receipts", home=home)
    assert text.rc == 0, text.describe()
    assert text.stdout.splitlines()[-2:] == ["1 export without receipt",
                                              "5 receipts verified, 0 invalid"]
    assert f"export without receipt: unit {UNITS[2]} slot 1 PIN v3" in text.stdout


@pytest.mark.parametrize(("statement", "reasons"), [
    pytest.param("UPDATE loads SET key_version = 4 WHERE id = 1",
                 ["header version differs from the entry's key version"], id="key-version"),
    pytest.param("UPDATE loads SET ref1 = '544d4b' WHERE id = 1",  # PIN -> TMK
                 ["no export recorded"], id="ref1"),
    pytest.param("UPDATE loads SET ref2 = 1 WHERE id = 1",
                 ["no export recorded", "receipt does not verify"], id="ref2"),
    pytest.param("UPDATE loads SET sn = '0a0b0c0d03' WHERE id = 1",
                 ["no export recorded", "receipt does not verify"], id="sn"),
])
def test_an_edited_station_row_is_invalid(home: Path, statement: str,
                                          reasons: list[str]) -> None:
    sql(home / "station.db", statement)
    out = receipts(home, EXIT_FAILED)
    assert (out["verified"], out["invalid"]) == (4, 1)
    [row] = out["invalid_rows"]
    assert row["source"] == "station"
    for reason in reasons:
        assert reason in row["reason"]
    # an edit that moves the receipt off its download leaves that export over
    moved = "no export recorded" in reasons
    assert ({"sn": UNITS[0], "ref1": "PIN", "ref2": 2, "key_version": 3,
             "station": None} in lost(out)) == moved


def test_an_edited_export_record_makes_its_receipt_invalid(home: Path) -> None:
    sql(home / "authority" / "exports.db", "UPDATE exports SET key_version = 9 WHERE "
        "id = (SELECT min(id) FROM exports WHERE ref1 = '50494e')")
    out = receipts(home, EXIT_FAILED)
    assert out["invalid"] == 1
    assert "differs from the export: key_version" in out["invalid_rows"][0]["reason"]


def test_an_edited_campaign_row_is_invalid(home: Path) -> None:
    sql(home / "journal.db", "UPDATE loads SET version = 2 WHERE seq = 0")
    out = receipts(home, EXIT_FAILED)
    assert (out["verified"], out["invalid"]) == (4, 1)
    assert out["invalid_rows"][0]["source"] == "campaign spring"
    assert "header version differs from the entry's key version" in \
        out["invalid_rows"][0]["reason"]


def test_a_deleted_row_shows_its_export_without_receipt(home: Path) -> None:
    sql(home / "station.db", "DELETE FROM loads WHERE id = 1")
    out = receipts(home, 0)
    assert (out["verified"], out["invalid"]) == (4, 0)
    assert lost(out) == [{"sn": UNITS[0], "ref1": "PIN", "ref2": 2, "key_version": 3,
                          "station": None}, REFUSED]


def test_an_emptied_station_db_shows_every_single_load_export(home: Path) -> None:
    sql(home / "station.db", "DELETE FROM loads")
    out = receipts(home, 0)
    assert (out["verified"], out["invalid"]) == (3, 0)
    assert [(e["sn"], e["ref1"], e["ref2"], e["station"]) for e in lost(out)] == [
        (UNITS[0], "PIN", 2, None), (UNITS[1], "PIN", 2, None), (UNITS[2], "PIN", 1, None)]
    text = run("receipts", home=home)
    assert text.stdout.splitlines()[-2:] == ["3 exports without receipt",
                                              "3 receipts verified, 0 invalid"]


def test_a_duplicated_receipt_has_no_export_of_its_own(home: Path) -> None:
    sql(home / "station.db", "INSERT INTO loads (time, station, sn, set_id, ref1, ref2, "
        "status, suite, r, header, key_version, kcv, rct) SELECT time + 1, station, sn, "
        "set_id, ref1, ref2, status, suite, r, header, key_version, kcv, rct FROM loads "
        "WHERE id = 1")
    out = receipts(home, EXIT_FAILED)
    assert (out["verified"], out["invalid"]) == (5, 1)
    assert "no export recorded" in out["invalid_rows"][0]["reason"]


def test_without_export_records_nothing_is_verified(home: Path) -> None:
    path = home / "authority" / "exports.db"
    path.unlink()
    assert_error(run("receipts", home=home), EXIT_STORE, str(path))
    assert not path.exists()
