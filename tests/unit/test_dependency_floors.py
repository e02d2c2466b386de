"""The dependency floors pyproject.toml declares are the ones CI tests.

``constraints/floors.txt`` pins every dependency (runtime and every extra) at the lower bound
pyproject.toml gives it; ``make test-floors`` installs with it and runs lint, types and the
tests. These tests fail when one file changes without the other, and, in that run, when what
got installed is not the floors.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
FLOORS = ROOT / "constraints" / "floors.txt"
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.+!-]*)")


def declared(project: dict[str, Any]) -> list[Requirement]:
    """Every requirement of ``[project]``: dependencies, then each extra's."""
    reqs = [Requirement(r) for r in project.get("dependencies", [])]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    return reqs


def pins(text: str) -> dict[NormalizedName, Version]:
    """``name==version`` per line (comments and blank lines aside); anything else is refused."""
    out: dict[NormalizedName, Version] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = PIN.fullmatch(line)
        if m is None:
            raise ValueError(f"floors.txt line {n}: not name==version: {line!r}")
        name = canonicalize_name(m[1])
        if name in out:
            raise ValueError(f"floors.txt line {n}: {name} pinned twice")
        out[name] = Version(m[2])
    return out


def floor_mismatches(project: dict[str, Any], constraints: str) -> list[str]:
    """What keeps ``constraints`` from pinning exactly the floors ``project`` declares."""
    pinned = pins(constraints)
    problems: list[str] = []
    floors: dict[NormalizedName, Version] = {}
    for req in declared(project):
        name = canonicalize_name(req.name)
        lows = [Version(s.version) for s in req.specifier if s.operator == ">="]
        if len(lows) != 1:
            problems.append(f"{name}: {req} has no single >= floor")
            continue
        low = lows[0]
        if floors.setdefault(name, low) != low:
            problems.append(f"{name}: two floors in pyproject.toml, {floors[name]} and {low}")
        elif not req.specifier.contains(low, prereleases=True):
            problems.append(f"{name}: the floor {low} is outside {req.specifier}")
        elif name not in pinned:
            problems.append(f"{name}: floor {low} in pyproject.toml, not in floors.txt")
        elif pinned[name] != low:
            problems.append(f"{name}: floor {low} in pyproject.toml, floors.txt pins "
                            f"{pinned[name]}")
    names = {canonicalize_name(r.name) for r in declared(project)}
    problems += [f"{name}: pinned in floors.txt, not a dependency in pyproject.toml"
                 for name in pinned if name not in names]
    return list(dict.fromkeys(problems))  # a name in several extras is said once


def _project() -> dict[str, Any]:
    with PYPROJECT.open("rb") as f:
        project: dict[str, Any] = tomllib.load(f)["project"]
    return project


def _with(project: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """A copy of ``project`` with requirement ``old`` replaced by ``new`` wherever it is."""
    p = copy.deepcopy(project)
    lists = [p["dependencies"], *p["optional-dependencies"].values()]
    hits = [(reqs, i) for reqs in lists for i, r in enumerate(reqs) if r == old]
    assert hits, old
    for reqs, i in hits:
        reqs[i] = new
    return p


def test_floors_file_pins_every_declared_floor() -> None:
    assert floor_mismatches(_project(), FLOORS.read_text()) == []
    # and it is not vacuous: the runtime dependencies and each extra's are there
    names = set(pins(FLOORS.read_text()))
    assert {canonicalize_name(r.name) for r in declared(_project())} == names
    assert {"cryptography", "uvicorn", "pytest", "mypy", "ruff", "pyscard"} <= names


def test_a_floor_raised_in_pyproject_alone_is_caught() -> None:
    project = _with(_project(), "cryptography>=50", "cryptography>=51")
    assert floor_mismatches(project, FLOORS.read_text()) == [
        "cryptography: floor 51 in pyproject.toml, floors.txt pins 50.0.0"]


def test_a_pin_raised_in_floors_txt_alone_is_caught() -> None:
    text = FLOORS.read_text().replace("uvicorn==0.54.0", "uvicorn==0.55.0")
    assert text != FLOORS.read_text()
    assert floor_mismatches(_project(), text) == [
        "uvicorn: floor 0.54 in pyproject.toml, floors.txt pins 0.55.0"]


def test_a_dependency_without_a_pin_and_a_pin_without_a_dependency_are_caught() -> None:
    project = _project()
    project["dependencies"] = [*project["dependencies"], "h11>=0.16"]
    assert floor_mismatches(project, FLOORS.read_text()) == [
        "h11: floor 0.16 in pyproject.toml, not in floors.txt"]
    text = FLOORS.read_text() + "anyio==4.0.0\n"
    assert floor_mismatches(_project(), text) == [
        "anyio: pinned in floors.txt, not a dependency in pyproject.toml"]


def test_an_extra_disagreeing_with_another_on_a_floor_is_caught() -> None:
    project = _project()
    project["optional-dependencies"]["pkcs11"] = ["python-pkcs11>=0.10.2,<0.11"]
    assert floor_mismatches(project, FLOORS.read_text()) == [
        "python-pkcs11: two floors in pyproject.toml, 0.10.1 and 0.10.2"]


@pytest.mark.parametrize("req", ["uvicorn", "uvicorn<1", "uvicorn>=0.54,>=0.50",
                                 "uvicorn==0.54.0"])
def test_a_dependency_without_a_single_lower_bound_is_refused(req: str) -> None:
    project = _with(_project(), "uvicorn>=0.54", req)
    assert floor_mismatches(project, FLOORS.read_text()) == [
        f"uvicorn: {Requirement(req)} has no single >= floor"]


def test_a_floor_its_own_range_excludes_is_refused() -> None:
    project = _with(_project(), "uvicorn>=0.54", "uvicorn>=0.54,!=0.54.0")
    assert floor_mismatches(project, FLOORS.read_text()) == [
        "uvicorn: the floor 0.54 is outside !=0.54.0,>=0.54"]


@pytest.mark.parametrize("line", ["cryptography>=50", "psycopg[binary]==3.1.4",
                                  "uvloop==0.19.0; sys_platform != 'win32'", "-e ."])
def test_floors_txt_holds_nothing_but_exact_pins(line: str) -> None:
    with pytest.raises(ValueError, match="line 2: not name==version"):
        pins("# a comment\n" + line + "\n")


def test_floors_txt_pins_a_package_once() -> None:
    with pytest.raises(ValueError, match="line 2: ruff pinned twice"):
        pins("ruff==0.13.0\nRuff==0.13.0\n")


def test_lint_and_type_checkers_are_held_to_the_range_tested() -> None:
    """A new ruff or mypy release changes what they report: each has a cap as well."""
    test_extra = [Requirement(r) for r in _project()["optional-dependencies"]["test"]]
    for tool in ("ruff", "mypy"):
        (req,) = [r for r in test_extra if r.name == tool]
        assert {s.operator for s in req.specifier} == {">=", "<"}, req


def test_make_test_floors_installs_the_floors_and_ci_runs_it() -> None:
    """The README's claim: CI runs lint, types and the tests at the floors."""
    makefile = (ROOT / "Makefile").read_text()
    m = re.search(r"^test-floors:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert m is not None, "no test-floors target"
    recipe = m[1]
    assert "KEYLOAD_FLOORS=constraints/floors.txt" in recipe
    for tool in ("ruff check src tests benchmarks", "mypy", "pytest"):
        assert tool in recipe, tool
    assert re.search(r"pip install .*-c constraints/floors\.txt", makefile)
    steps = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert steps.index("make test-floors") > steps.index("make test")


def test_the_floors_run_has_the_floors_installed() -> None:
    """In ``make test-floors`` every declared dependency present is at its pinned floor."""
    constraints = os.environ.get("KEYLOAD_FLOORS")
    if not constraints:
        pytest.skip("installed versions are checked against the floors in make test-floors")
    pinned = pins((ROOT / constraints).read_text())
    installed: dict[NormalizedName, str] = {}
    for name in pinned:
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    assert {"cryptography", "uvicorn", "pytest", "hypothesis", "mypy", "ruff"} <= set(installed)
    assert {n: Version(v) for n, v in installed.items()} == {n: pinned[n] for n in installed}
