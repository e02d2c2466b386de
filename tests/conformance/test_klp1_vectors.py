"""Every case of klp1-public.json through the library (docs/protocol.md §9)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from keyload.units.conformance import run_case, run_files

from ..conftest import KLP1_VECTORS

CASES: list[dict[str, Any]] = json.loads(KLP1_VECTORS.read_text())["cases"]


def test_vector_file_has_both_kinds() -> None:
    kinds = {c["kind"] for c in CASES}
    assert kinds == {"export", "import"}
    assert len(CASES) == 160


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case(case: dict[str, Any]) -> None:
    assert run_case(case) == []


def test_a_wrong_expectation_is_caught() -> None:
    """The runner is not a rubber stamp: an altered vector fails on the altered field."""
    export = json.loads(json.dumps(next(c for c in CASES if c["kind"] == "export")))
    cas = export["expected"]["CAS"]
    export["expected"]["CAS"] = ("0" if cas[0] != "0" else "1") + cas[1:]
    assert run_case(export) == ["CAS"]
    imp = json.loads(json.dumps(next(c for c in CASES if c["expected"].get("sw") == "9000")))
    imp["expected"]["sw"] = "6982"
    assert run_case(imp)[0].startswith("sw 9000")
    imp2 = json.loads(json.dumps(next(c for c in CASES if c["expected"].get("sw") == "9000")))
    imp2["expected"]["receipt"] = "00" * 16
    assert run_case(imp2) == ["receipt"]


def test_a_missing_file_is_refused_before_any_case_runs(tmp_path: Path) -> None:
    runs = run_files([KLP1_VECTORS, tmp_path / "missing.json"])
    with pytest.raises(ValueError, match=r"missing\.json: no such file"):
        next(runs)


def test_run_files_runs_every_case_of_each_file() -> None:
    results = list(run_files([KLP1_VECTORS]))
    assert len(results) == len(CASES) and all(r.passed for r in results)
    assert {r.name for r in results} == {c["name"] for c in CASES}
