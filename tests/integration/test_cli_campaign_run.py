"""``keyload campaign run`` ends: units that cannot be reached are retried a bounded number
of times, then failed with their reason (the console script, in subprocesses)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from .cli_helpers import KEYLOAD, Result, assert_error, cli_env, ok, run
from .test_cli_campaign import Home, _home

pytestmark = pytest.mark.slow  # campaign runs of the console script, with retries

EXIT_FAILED, EXIT_INPUT = 1, 3
DEADLINE_S = 60.0
OUTPUT_LIMIT = 64 * 1024
GHOSTS = ("deadbeef01", "deadbeef02")  # SNs in the manifest with no emulated unit


def _bounded(h: Home, *args: str) -> tuple[Result, float]:
    """Run ``keyload ARGS --home H`` with output to files; kill it at the deadline."""
    argv = [*args, "--home", str(h.root)]
    out, err = h.root.parent / "run.out", h.root.parent / "run.err"
    t0 = time.monotonic()
    with out.open("wb") as fo, err.open("wb") as fe:
        p = subprocess.Popen([str(KEYLOAD), *argv], stdin=subprocess.DEVNULL, stdout=fo,
                             stderr=fe, env=cli_env())
        try:
            rc = p.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = -1
    took = time.monotonic() - t0
    assert out.stat().st_size + err.stat().st_size < OUTPUT_LIMIT, \
        f"{out.stat().st_size + err.stat().st_size} bytes of output"
    res = Result(tuple(argv), rc, out.read_text(), err.read_text())
    assert rc != -1, f"still running after {DEADLINE_S} s\n{res.describe()[-3000:]}"
    return res, took


def _with_ghosts(tmp_path: Path, name: str) -> Home:
    """A home with two units, and campaign ``name`` over them and two SNs without one."""
    h = _home(tmp_path / "home", units=2)
    manifest = tmp_path / "units.csv"
    manifest.write_text("sn\nc0ffee00\n" + "\n".join(GHOSTS) + "\nc0ffee01\n")
    ok(run("campaign", "create", name, "--set", h.set_id, "--load", "TMK:1", "--load",
           "MAC:2", "--manifest", manifest, home=h.root))
    return h


def _journal_rows(h: Home) -> list[tuple[str, int, str, int, str | None]]:
    db = sqlite3.connect(h.root / "journal.db")
    try:
        return [(sn, ref2, state, attempts, reason) for sn, ref2, state, attempts, reason in
                db.execute("SELECT sn, ref2, state, attempts, reason FROM loads "
                           "ORDER BY seq, ref2")]
    finally:
        db.close()


def test_unreachable_units_fail_after_bounded_attempts(tmp_path: Path) -> None:
    h = _with_ghosts(tmp_path, "ghosts")
    res, took = _bounded(h, "campaign", "run", "ghosts", "--json")
    print(f"campaign run with unreachable units ended in {took:.2f} s")
    assert res.rc == EXIT_FAILED, res.describe()
    assert "Traceback" not in res.output
    out = json.loads(res.stdout)
    assert out["status"]["states"] == {"planned": 0, "claimed": 0, "exported": 0,
                                       "imported": 4, "failed": 4}
    run_ = out["run"]
    assert run_["units"] == 4 and run_["loads_done"] == 4 and run_["loads_failed"] == 4
    assert run_["loads_retried"] == 2 * 2 * 2  # two more attempts for each ghost's 2 loads
    assert sorted((f["sn"], f["ref2"]) for f in run_["failures"]) == \
        [(sn, r) for sn in GHOSTS for r in (1, 2)]
    assert {f["reason"] for f in run_["failures"]} == \
        {f"unit not reachable: no emulated unit with SN {sn}" for sn in GHOSTS}
    rows = _journal_rows(h)
    assert [(sn, ref2, state, attempts) for sn, ref2, state, attempts, _ in rows
            if sn in GHOSTS] == [(sn, r, "failed", 3) for sn in GHOSTS for r in (1, 2)]
    assert {state for sn, _, state, _, _ in rows if sn not in GHOSTS} == {"imported"}
    st = ok(run("campaign", "status", "ghosts", "--json", home=h.root)).json()
    assert st["states"]["claimed"] == 0 and st["states"]["failed"] == 4
    # the reachable units hold their keys
    unit = ok(run("unit", "status", "--sn", "c0ffee01", "--json", home=h.root)).json()
    assert [(s["ref2"], s["state"]) for s in unit["slots"]] == [(1, "loaded"), (2, "loaded")]
    # run again: the failures are final, nothing is tried again, the run ends at once
    again, _ = _bounded(h, "campaign", "run", "ghosts", "--json")
    assert again.rc == EXIT_FAILED and json.loads(again.stdout)["run"]["units"] == 0
    assert _journal_rows(h) == rows


def test_retries_option_and_progress_line(tmp_path: Path) -> None:
    h = _with_ghosts(tmp_path, "ghosts")
    before = _journal_rows(h)
    assert_error(run("campaign", "run", "ghosts", "--retries", "0", home=h.root), EXIT_INPUT,
                 "--retries 0: at least 1")
    assert _journal_rows(h) == before
    res, _ = _bounded(h, "campaign", "run", "ghosts", "--retries", "1")
    assert res.rc == EXIT_FAILED, res.describe()
    progress = [ln for ln in res.stderr.splitlines() if ln.startswith("[")]
    assert progress and progress[-1].split()[1:3] == ["4/4", "units"], res.stderr
    assert progress[-1].endswith("failed 2"), res.stderr
    assert res.last_line() == "4 of 8 loads imported, 4 failed"
    assert [a for sn, _, _, a, _ in _journal_rows(h) if sn in GHOSTS] == [1, 1, 1, 1]
