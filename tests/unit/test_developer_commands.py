"""The developer commands the README lists exist and do what it says: `make test-fast`
runs the suite without the tests marked slow or hardware, and both markers are declared."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_markers_are_declared() -> None:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    declared = {m.split(":")[0] for m in doc["tool"]["pytest"]["ini_options"]["markers"]}
    assert {"slow", "hardware"} <= declared


def test_make_test_fast_deselects_slow_and_hardware() -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    # -n prints the recipe without running it; VENV points at no real environment
    res = subprocess.run([make, "-n", "-C", str(ROOT), "test-fast", "VENV=/nonexistent-venv"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    [line] = [x for x in res.stdout.splitlines() if "pytest" in x]
    assert re.search(r'-m "not slow and not hardware"', line), line


def test_make_test_still_runs_everything() -> None:
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^unit-tests:.*\n\t(.*)$", text, re.M)
    assert recipe is not None and "pytest" in recipe.group(1)
    assert "not slow" not in recipe.group(1) and "not hardware" not in recipe.group(1)
    assert recipe.group(1).split("pytest", 1)[1].strip() == "-q"  # no marker selection


def test_the_readme_lists_make_test_fast() -> None:
    assert re.search(r"^make test-fast\s+# .*slow or hardware", (ROOT / "README.md").read_text(),
                     re.M)
