"""Fault test: a demo campaign killed with SIGKILL at 20+ random moments, resumed each
time. At the end every unit holds exactly the planned keys, every receipt verifies, the
audit chain verifies, and no load was exported again after it was imported."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keyload.core.keys import KeyHeader
from keyload.station.fleet import EmulatedFleet
from keyload.units.storage import KekSource

pytestmark = pytest.mark.slow

UNITS = 1200
KILLS = 22
PASS = "fault-test-passphrase"


def _keyload() -> Path:
    exe = Path(sys.executable).with_name("keyload")
    if not exe.exists():
        pytest.skip("the keyload console script is not installed in this environment")
    return exe


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYLOAD_")}
    env["KEYLOAD_PASSPHRASE"] = PASS
    return env


def _campaign_runs(workdir: Path) -> int:
    """How many times the campaign was started (its audit records), 0 before any."""
    if not (workdir / "audit.db").exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{workdir / 'audit.db'}?mode=ro", uri=True, timeout=5)
        try:
            return int(db.execute("SELECT count(*) FROM audit WHERE action = 'campaign run'")
                       .fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:  # the table is not there yet
        return 0


def _demo(workdir: Path, *, kill_after: float | None,
          after_start: bool = False) -> subprocess.CompletedProcess[str] | None:
    """Run the demo; with ``kill_after``, SIGKILL it that many seconds after it starts or,
    with ``after_start``, after its campaign starts (however slow the setup is here).
    None when it was killed; its result when it ended by itself first."""
    cmd = [str(_keyload()), "demo", "--units", str(UNITS), "--workdir", str(workdir),
           "--quiet"]
    if kill_after is None:
        return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600,
                              check=False)
    runs = _campaign_runs(workdir)
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        if after_start:
            deadline = time.monotonic() + 120
            while _campaign_runs(workdir) == runs and p.poll() is None and \
                    time.monotonic() < deadline:
                time.sleep(0.02)
        p.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
        return None
    return subprocess.CompletedProcess(cmd, p.returncode)  # it finished before the kill


def test_sigkill_at_random_moments_then_resume(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    rng = random.Random(int(os.environ.get("KEYLOAD_FAULT_SEED", "20261127")))
    killed = 0
    for i in range(KILLS):
        # half the kills at a random moment from the start (the setup, the first claims,
        # loads and slot writes), half within the campaign once it has started: so the
        # campaign is cut many times however long the setup takes on this machine
        if i % 2:
            ended = _demo(work, kill_after=rng.uniform(0.05, 2.0), after_start=True)
        else:
            ended = _demo(work, kill_after=rng.uniform(0.3, 4.0))
        killed += ended is None  # a run that ended by itself first was not killed
    final = _demo(work, kill_after=None)
    assert final is not None
    assert final.returncode == 0, final.stderr[-2000:]
    assert final.stdout.strip().splitlines()[-1] == \
        f"customized {UNITS} of {UNITS} units, 0 failed"
    assert killed >= 20, f"only {killed} of {KILLS} runs were killed before they ended"

    # every receipt verifies, the audit chain is whole
    k = str(_keyload())
    led = subprocess.run([k, "--home", str(work), "ledger", "verify", "--json"], env=_env(),
                         capture_output=True, text=True, check=False)
    assert led.returncode == 0, led.stderr
    ledger = json.loads(led.stdout)
    assert ledger["invalid"] == 0
    assert ledger["verified"] + ledger["reconciled_without_receipt"] == 2 * UNITS
    aud = subprocess.run([k, "--home", str(work), "audit", "verify", "--json"], env=_env(),
                         capture_output=True, text=True, check=False)
    assert aud.returncode == 0 and json.loads(aud.stdout)["problems"] == []

    # every unit holds exactly the planned versions (read the units' own files)
    fleet = EmulatedFleet.open(work / "units", KekSource(passphrase=PASS))
    try:
        serials = fleet.serials()
        assert len(serials) == UNITS
        for sn in serials:
            unit = fleet.open_unit(sn)
            try:
                for ref2 in (1, 2):
                    slot = unit.state.slots[ref2]
                    assert slot.header is not None, f"unit {sn.hex()} slot {ref2} empty"
                    assert KeyHeader.decode(slot.header).version == 1
                assert unit.state.slots[3].header is None
            finally:
                unit.close()
    finally:
        fleet.close()

    # no load was exported again after it was imported (journaled)
    jdb = sqlite3.connect(work / "journal.db")
    imported = {(sn, ref2): t for sn, ref2, t, state in jdb.execute(
        "SELECT sn, ref2, updated, state FROM loads") if state == "imported"}
    assert len(imported) == 2 * UNITS
    xdb = sqlite3.connect(work / "authority" / "exports.db")
    late = [(sn, ref2) for sn, ref2, t in xdb.execute("SELECT sn, ref2, time FROM exports")
            if t > imported[(sn, ref2)]]
    assert late == [], f"{len(late)} loads exported again after their import"
    failed = jdb.execute("SELECT count(*) FROM loads WHERE state = 'failed'").fetchone()[0]
    assert failed == 0
    jdb.close()
    xdb.close()
    # the kills really landed inside the campaign: it was started (and cut) many times
    adb = sqlite3.connect(work / "audit.db")
    runs = adb.execute("SELECT count(*) FROM audit WHERE action = 'campaign run'").fetchone()[0]
    adb.close()
    assert runs >= 5, f"only {runs} campaign runs: the kills missed the campaign"
