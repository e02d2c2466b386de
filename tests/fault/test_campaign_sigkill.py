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

from ..helpers import sqlite_count

pytestmark = pytest.mark.slow

UNITS = 2000
KILLS = 22
# each killed run may import at most this many more loads (plus what lands between two
# polls): 22 runs cannot finish the 2 x 2,000 loads, so every run is cut in its work
MORE = (4, 40)
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
    return sqlite_count(workdir / "audit.db",
                        "SELECT count(*) FROM audit WHERE action = 'campaign run'")


def _imported(workdir: Path) -> int:
    return sqlite_count(workdir / "journal.db",
                        "SELECT count(*) FROM loads WHERE state = 'imported'")


def _demo(workdir: Path, *, kill_after: float | None, more: int = 0,
          after_start: bool = False) -> subprocess.CompletedProcess[str] | None:
    """Run the demo; with ``kill_after``, SIGKILL it that many seconds after it starts or,
    with ``after_start``, after its campaign starts (however slow the setup is here), or
    as soon as it has imported ``more`` loads, whichever comes first. None when it was
    killed; its result when it ended by itself first."""
    cmd = [str(_keyload()), "demo", "--units", str(UNITS), "--workdir", str(workdir),
           "--quiet"]
    if kill_after is None:
        return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600,
                              check=False)
    runs, done = _campaign_runs(workdir), _imported(workdir)
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    if after_start:
        deadline = time.monotonic() + 120
        while _campaign_runs(workdir) == runs and p.poll() is None and \
                time.monotonic() < deadline:
            time.sleep(0.01)
    kill_at = time.monotonic() + kill_after
    while p.poll() is None:
        if time.monotonic() >= kill_at or _imported(workdir) >= done + more:
            p.send_signal(signal.SIGKILL)
            p.wait()
            return None
        time.sleep(0.01)
    return subprocess.CompletedProcess(cmd, p.returncode)  # it finished before the kill


def test_sigkill_at_random_moments_then_resume(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    rng = random.Random(int(os.environ.get("KEYLOAD_FAULT_SEED", "20261127")))
    killed = 0
    for i in range(KILLS):
        # half the kills at a random moment from the start (the setup, the first claims,
        # loads and slot writes), half within the campaign once it has started; each
        # also once a few more loads are in, so that the campaign is cut many times
        # however fast this machine is, and never finishes before the last kill
        more = rng.randint(*MORE)
        if i % 2:
            ended = _demo(work, kill_after=rng.uniform(0.05, 2.0), more=more,
                          after_start=True)
        else:
            ended = _demo(work, kill_after=rng.uniform(0.3, 4.0), more=more)
        killed += ended is None  # a run that ended by itself first was not killed
    final = _demo(work, kill_after=None)
    assert final is not None
    assert final.returncode == 0, final.stderr[-2000:]
    assert final.stdout.strip().splitlines()[-1] == \
        f"customized {UNITS:,} of {UNITS:,} units, 0 failed"
    assert killed == KILLS, f"only {killed} of {KILLS} runs were killed before they ended"

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
