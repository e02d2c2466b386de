"""benchmarks/throughput.py runs: its floors compute what keyload's export computes (the
script stops with "benchmark is wrong" otherwise), and it prints what the README says.

Figures are not checked here (speed is the script's to measure, not a test's to assert);
only that a short run completes and reports every figure and ratio, by name.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"

pytestmark = pytest.mark.slow  # a process that measures for a few seconds


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_a_short_run_reports_every_figure_and_its_ratios() -> None:
    p = _run("--seconds", "0.05", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    for name in ("floor_export", "floor_load", "export", "end_to_end"):
        assert doc[name]["ops_per_s"] > 0 and doc[name]["us_per_op"] > 0, name
    assert doc["targets"] == {"export": 1.5, "end_to_end": 3.0}
    assert doc["ratio_export_floor"] == pytest.approx(
        doc["export"]["us_per_op"] / doc["floor_export"]["us_per_op"], rel=0.01)
    assert doc["ratio_end_to_end_floor"] == pytest.approx(
        doc["end_to_end"]["us_per_op"] / doc["floor_load"]["us_per_op"], rel=0.01)
    assert "ratio_export_unregistered_floor" in json.dumps(doc)  # suite 0x03 by default


def test_suite_0x01_alone_ends_with_its_end_to_end_ratio() -> None:
    p = _run("--seconds", "0.05", "--suites", "1")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[-1].startswith("ratio end_to_end/floor: ")
    assert not any("0x03" in line for line in lines)


def test_help_names_the_suite_choices_as_they_are_typed() -> None:
    p = _run("--help")
    assert p.returncode == 0 and "--suites {1 | 1,3}" in p.stdout, p.stdout
    assert "{1,1,3}" not in p.stdout
