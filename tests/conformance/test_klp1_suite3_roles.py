"""Every case of klp1-suite3-public.json through the real roles (docs/protocol.md §10.6):
the authority over a software keystore holding the case's identity set, keys and
revocations; the emulated unit holding the case's d_U, C_U or Q_CA and pending challenge.
And the command-line run of both vector files, counted."""

from __future__ import annotations

import json
from typing import Any

import pytest

from keyload.units.conformance import run_case
from tests.conftest import KLP1_SUITE3_VECTORS, KLP1_VECTORS, require
from tests.integration.cli_helpers import KEYLOAD, ok, run

SUITE3_VECTORS = KLP1_SUITE3_VECTORS
CASES: list[dict[str, Any]] = json.loads(SUITE3_VECTORS.read_text())["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_case(case: dict[str, Any]) -> None:
    assert run_case(case) == []


def _first(kind: str, sw: str) -> dict[str, Any]:
    case = next(c for c in CASES if c["kind"] == kind and c["expected"]["sw"] == sw)
    copy: dict[str, Any] = json.loads(json.dumps(case))
    return copy


def test_a_wrong_expectation_is_caught() -> None:
    """The runner is not a rubber stamp: each altered field is the one reported."""
    export = _first("export", "9000")
    export["expected"]["SAS"] = "00" * 64
    assert run_case(export) == ["SAS"]
    export = _first("export", "9000")
    export["expected"]["Z"] = "00" * 32
    assert run_case(export) == ["Z"]
    imp = _first("import", "9000")
    imp["expected"]["receipt"] = "00" * 64
    assert run_case(imp) == ["receipt"]
    imp = _first("import", "9000")
    imp["expected"]["ref1"] = "00"
    assert run_case(imp) == ["ref1"]
    revoked = next(c for c in CASES if c["name"].endswith("-revoked"))
    revoked = json.loads(json.dumps(revoked))
    revoked["expected"]["sw"] = "9000"
    assert run_case(revoked) == ["sw 6983, expected 9000"]
    init = json.loads(json.dumps(next(c for c in CASES if c["kind"] == "initialize")))
    init["eph_unit"] = "11" * 32
    assert run_case(init) == ["response"]
    enrol = _first("enrol", "9000")
    enrol["expected"]["sw"] = "6982"
    assert run_case(enrol) == ["sw 9000, expected 6982"]


def test_cli_runs_both_files() -> None:
    require(KEYLOAD.is_file(), f"the keyload console script is not installed at {KEYLOAD}")
    res = ok(run("conformance", KLP1_VECTORS, SUITE3_VECTORS))
    assert res.last_line() == f"{160 + len(CASES)} passed, 0 failed"
    assert len(CASES) == 188
    assert "FAIL" not in res.stdout and res.stderr == ""
