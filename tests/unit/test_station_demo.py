"""The demo's outcome as ``keyload demo`` prints it (:class:`keyload.station.demo.DemoRun`)
and its home opened in a workdir (:func:`keyload.station.demo.open_demo`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from keyload.station.campaign import RunSummary
from keyload.station.customize import Failure, Summary
from keyload.station.demo import DemoRun, open_demo, removed_unless_kept
from keyload.station.receipts import ReceiptsCheck
from keyload.units.storage import ENV_KEK, ENV_PASSPHRASE

WANT = {"units": 3, "authority": "software", "transport": "local", "suite": 3}


def _done(reconciled: int = 0) -> DemoRun:
    s = Summary(units=3, customized=2, loads_ok=5, loads_failed=1, elapsed=2.0,
                failures=[Failure("0a", b"TMK-A", 1, "KCV", "6988", "mismatch")],
                by_suite=Counter({3: 5}))
    return DemoRun(s, ReceiptsCheck(verified=5, invalid=0),
                   RunSummary(loads_done=4, reconciled=reconciled, elapsed=0.5), 1.23456)


def test_rows() -> None:
    assert _done().rows() == [
        ("units", 3), ("customized", 2), ("failed", 1), ("loads", "5 ok, 1 failed"),
        ("receipts", "5 verified by the authority, 0 invalid"), ("suites", "0x03: 5"),
        ("this run", "4 loads in 0.50 s (8 loads/s)")]
    assert _done(reconciled=2).rows()[4] == (
        "receipts", "5 verified by the authority, 0 invalid, 2 loads reconciled after an "
        "interruption")


def test_json_and_outcome() -> None:
    out = _done().to_json(workdir="/w", suite=3)
    assert list(out)[:9] == ["units", "customized", "failed", "loads_ok", "loads_failed",
                             "elapsed_s", "units_per_s", "loads_by_suite", "failures"]
    assert list(out)[9:] == ["workdir", "suite", "receipts_verified", "receipts_invalid",
                             "reconciled", "loads_this_run", "run_s", "setup_s"]
    assert (out["receipts_verified"], out["loads_this_run"], out["run_s"], out["setup_s"]) \
        == (5, 4, 0.5, 1.235)
    assert not _done().ok


def test_open_demo_says_where_and_the_demo_passphrase(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_PASSPHRASE, raising=False)
    monkeypatch.delenv(ENV_KEK, raising=False)
    said: list[str] = []
    home, resume = open_demo(str(tmp_path / "w"), WANT, say=said.append)
    assert home.root == tmp_path / "w" and home.root.is_dir() and not resume
    assert said == [f"workdir: {tmp_path / 'w'}", "authority: software, transport: local, "
                    "suite 0x03", f"vaults sealed with the demo passphrase 'keyload-demo' (set "
                    f"{ENV_PASSPHRASE} or {ENV_KEK} for your own)"]
    monkeypatch.setenv(ENV_PASSPHRASE, "mine")
    said.clear()
    open_demo(str(tmp_path / "v"), {**WANT, "suite": None}, say=said.append)
    assert said == [f"workdir: {tmp_path / 'v'}", "authority: software, transport: local"]


def test_a_temporary_workdir_is_removed_at_the_end_and_a_given_one_kept(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR read again
    said: list[str] = []
    home, _ = open_demo(None, WANT, say=said.append)
    assert home.root.parent == tmp_path and home.root.is_dir()
    assert said[0] == f"workdir: {home.root} (temporary: removed at the end; --workdir DIR " \
                      "keeps it)"
    with pytest.raises(KeyboardInterrupt), removed_unless_kept(home, None):
        (home.root / "units").mkdir()
        raise KeyboardInterrupt  # an interrupted demo leaves nothing behind either
    assert not home.root.exists()
    kept, _ = open_demo(str(tmp_path / "kept"), WANT, say=said.append)
    with removed_unless_kept(kept, str(tmp_path / "kept")):
        pass
    assert kept.root.is_dir()
