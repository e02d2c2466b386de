"""Campaigns, ledger and audit through the console script."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from .cli_helpers import KEYLOAD, Result, assert_error, ok, run

pytestmark = pytest.mark.slow  # every test runs the console script (a process each)

EXIT_FAILED, EXIT_INPUT, EXIT_STORE = 1, 3, 4


@dataclass
class Home:
    root: Path
    set_id: str


def _home(root: Path, units: int = 6) -> Home:
    if not KEYLOAD.exists():
        pytest.skip("the keyload console script is not installed")
    ok(run("authority", "init", "--signing-key", home=root))
    ok(run("set", "create", "--name", "A", "--signed", home=root))
    set_id = ok(run("set", "list", "--json", home=root)).json()["sets"][0]["set_id"]
    ok(run("key", "generate", "--ref1", "TMK", "--type", "aes256", "--usage", "K0", "--mode",
           "B", "--exportability", "E", "--key-version", "3", "--diversify", "--sets", set_id,
           "--slots", "1", home=root))
    ok(run("key", "generate", "--ref1", "MAC", "--type", "hmac-sha256", "--usage", "M7",
           "--mode", "C", "--exportability", "N", "--key-version", "1", "--sets", "any",
           "--slots", "2", home=root))
    for i in range(units):
        ok(run("unit", "create", "--set", set_id, "--sn", f"C0FFEE{i:02x}", "--slot",
               "1=aes256", "--slot", "2=hmac-sha256", home=root))
    return Home(root, set_id)


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> tuple[Home, Result]:
    h = _home(tmp_path_factory.mktemp("campaign") / "home")
    ok(run("campaign", "create", "spring", "--set", h.set_id, "--load", "TMK:1",
           "--load", "MAC:2", home=h.root))
    return h, run("campaign", "run", "spring", "--quiet", "--json", home=h.root)


def test_campaign_run_loads_everything(done: tuple[Home, Result]) -> None:
    h, res = done
    out = ok(res).json()
    assert out["status"]["states"]["imported"] == 12 and out["status"]["done"] is True
    assert out["run"]["loads_done"] == 12 and out["run"]["loads_failed"] == 0
    st = ok(run("campaign", "status", "spring", "--json", home=h.root)).json()
    assert st["states"] == {"planned": 0, "claimed": 0, "exported": 0, "imported": 12,
                            "failed": 0}
    assert [(p["ref1"], p["ref2"], p["version"]) for p in st["plan"]] == \
        [("TMK", 1, 3), ("MAC", 2, 1)]
    unit = ok(run("unit", "status", "--sn", "c0ffee03", "--json", home=h.root)).json()
    assert [(s["ref2"], s["state"], s["version"]) for s in unit["slots"]] == \
        [(1, "loaded", 3), (2, "loaded", 1)]


def test_ledger_verify_and_export(done: tuple[Home, Result]) -> None:
    h, _ = done
    res = ok(run("ledger", "verify", home=h.root))
    assert res.last_line() == "12 receipts verified, 0 invalid"
    text = ok(run("ledger", "export", "--format", "csv", home=h.root)).stdout
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 12 and {r["sn"] for r in rows} == {f"c0ffee{i:02x}" for i in range(6)}
    assert all(len(r["receipt"]) == 32 and len(r["kcv"]) == 10 for r in rows)
    js = ok(run("ledger", "export", "--format", "json", home=h.root)).json()
    assert {(e["sn"], e["ref2"]) for e in js} == {(r["sn"], int(r["ref2"])) for r in rows}


def test_a_forged_receipt_is_found(done: tuple[Home, Result], tmp_path: Path) -> None:
    h, _ = done
    import shutil

    copy = tmp_path / "home"
    shutil.copytree(h.root, copy)
    db = sqlite3.connect(copy / "journal.db")
    sn, ref2, rct = db.execute("SELECT sn, ref2, rct FROM loads LIMIT 1").fetchone()
    forged = ("0" if rct[0] != "0" else "1") + rct[1:]
    db.execute("UPDATE loads SET rct = ? WHERE sn = ? AND ref2 = ?", (forged, sn, ref2))
    db.commit()
    db.close()
    res = run("ledger", "verify", home=copy)
    assert res.rc == EXIT_FAILED
    assert res.last_line() == "11 receipts verified, 1 invalid"
    assert f"unit {sn} slot {ref2}" in res.stdout


def test_campaign_report_files(done: tuple[Home, Result], tmp_path: Path) -> None:
    h, _ = done
    ok(run("campaign", "report", "spring", "--out", tmp_path / "rep", home=h.root))
    rep = json.loads((tmp_path / "rep" / "spring.json").read_text())
    assert rep["states"]["imported"] == 12 and rep["failures_by_sw"] == []
    page = (tmp_path / "rep" / "spring.html").read_text()
    assert page.startswith("<!doctype html>") and "Campaign spring" in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    assert (tmp_path / "rep" / "spring.csv").read_text().startswith("state,loads")


def test_campaign_report_tables_and_throughput(done: tuple[Home, Result], tmp_path: Path
                                               ) -> None:
    """A finished campaign run by the console script: throughput samples (one per bucket of
    the loads' import times), one CSV per table with ISO 8601 times, the failure list
    complete and saying so."""
    h, _ = done
    out = ok(run("campaign", "report", "spring", "--out", tmp_path / "rep", "--json",
                 home=h.root)).json()
    names = sorted(Path(p).name for p in out["files"])
    assert names == sorted(["spring.json", "spring.html", "spring.csv", "spring-plan.csv",
                            "spring-failures.csv", "spring-failures-by-sw.csv",
                            "spring-throughput.csv", "spring-pauses.csv",
                            "spring-stations.csv"])
    rep = json.loads((tmp_path / "rep" / "spring.json").read_text())
    assert sum(p["loads"] for p in rep["throughput"]) == 12
    assert (rep["failures"], rep["failures_total"], rep["failures_cut"]) == ([], 0, False)
    page = (tmp_path / "rep" / "spring.html").read_text()
    assert "No throughput samples yet." not in page and 'class="segment"' in page
    with (tmp_path / "rep" / "spring-throughput.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sum(int(r["loads"]) for r in rows) == 12
    assert all(datetime.fromisoformat(r["start"]).utcoffset() is not None for r in rows)


def test_audit_verify_and_tampering(done: tuple[Home, Result], tmp_path: Path) -> None:
    h, _ = done
    res = ok(run("audit", "verify", "--json", home=h.root)).json()
    assert res["problems"] == [] and res["records"] >= 12 + 3
    import shutil

    def tampered(sql: str) -> dict[str, object]:
        copy = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
        shutil.copytree(h.root, copy)
        db = sqlite3.connect(copy / "audit.db")
        db.executescript(sql)
        db.commit()
        db.close()
        r = run("audit", "verify", "--json", home=copy)
        assert r.rc == EXIT_FAILED, r.describe()
        out: dict[str, object] = r.json()
        return out

    edited = tampered("UPDATE audit SET detail = replace(detail, '\"ref2\":1', '\"ref2\":9') "
                      "WHERE seq = (SELECT min(seq) FROM audit WHERE action = 'export')")
    assert any("edited" in p["problem"] for p in edited["problems"])  # type: ignore[attr-defined]
    removed = tampered("DELETE FROM audit WHERE seq = 5")
    assert any("missing" in p["problem"] for p in removed["problems"])  # type: ignore[attr-defined]
    reordered = tampered("UPDATE audit SET seq = -1 WHERE seq = 6; "
                         "UPDATE audit SET seq = 6 WHERE seq = 7; "
                         "UPDATE audit SET seq = 7 WHERE seq = -1;")
    assert reordered["problems"]
    cut = tampered("DELETE FROM audit WHERE seq = (SELECT max(seq) FROM audit)")
    assert any("head" in p["problem"] for p in cut["problems"])  # type: ignore[attr-defined]


def test_resume_after_nothing_left_exports_nothing(done: tuple[Home, Result]) -> None:
    h, _ = done
    before = ok(run("authority", "exports", "--json", home=h.root)).json()["total"]
    out = ok(run("campaign", "run", "spring", "--quiet", "--json", home=h.root)).json()
    assert out["run"]["loads_done"] == 0
    assert ok(run("authority", "exports", "--json", home=h.root)).json()["total"] == before


def test_campaign_errors(tmp_path: Path) -> None:
    h = _home(tmp_path / "home", units=1)
    ok(run("campaign", "create", "c1", "--set", h.set_id, "--load", "TMK:1", home=h.root))
    assert_error(run("campaign", "create", "c1", "--set", h.set_id, "--load", "TMK:1",
                     home=h.root), EXIT_STORE, "exists")
    assert_error(run("campaign", "create", "c2", "--set", h.set_id, "--load", "TMK", home=h.root),
                 EXIT_INPUT, "REF1:REF2")
    assert_error(run("campaign", "create", "c3", "--set", h.set_id, "--load", "TMK:1",
                     "--load", "MAC:1", home=h.root), EXIT_INPUT, "same slot")
    bad = tmp_path / "units.csv"
    bad.write_text("sn\nnot-hex\n")
    assert_error(run("campaign", "create", "c4", "--set", h.set_id, "--load", "TMK:1",
                     "--manifest", bad, home=h.root), EXIT_INPUT, "not a hex SN")
    assert_error(run("campaign", "run", "nope", home=h.root), EXIT_STORE, "no campaign")
    st = ok(run("campaign", "status", "--json", home=h.root)).json()["campaigns"]
    assert [s["campaign"] for s in st] == ["c1"]  # the refused plans left nothing
