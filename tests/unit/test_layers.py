"""The layers the README's "How it is built" shows hold in the code's own imports.

``records`` builds on ``core`` alone; no product layer below the CLI imports ``lab`` (what
demos, tests and benchmarks start). Every ``keyload`` import of every module is read,
including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import keyload

ROOT = Path(keyload.__file__).parent


def _imports(path: Path) -> set[str]:
    """The keyload subpackages (``core``, ``lab``, ...) that a module imports."""
    package = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            mod = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
        for n in names:
            parts = n.split(".")
            if parts[0] == "keyload" and len(parts) > 1:
                found.add(parts[1])
    return found


def _layer_imports(layer: str) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): _imports(p) - {layer}
            for p in sorted((ROOT / layer).glob("*.py"))}


def test_records_builds_on_core_alone() -> None:
    found = _layer_imports("records")
    assert found, "records/ has modules"
    assert {m: i for m, i in found.items() if i - {"core"}} == {}


def test_only_the_cli_imports_the_lab() -> None:
    for layer in ("core", "records", "units", "transports", "station", "service"):
        found = _layer_imports(layer)
        assert found, f"{layer}/ has modules"
        assert {m: i for m, i in found.items() if "lab" in i} == {}, layer
    assert any("lab" in i for i in _layer_imports("cli").values())  # the reader sees it


def test_the_moved_modules_are_gone_from_their_old_homes() -> None:
    for old in ("units/softhsm.py", "transports/pcscd.py", "station/pgserver.py",
                "transports/vcard.py", "units/stored.py"):
        assert not (ROOT / old).exists(), old
