"""The layers the README's "How it is built" shows hold in the code's own imports.

Each layer imports only the layers below it; ``records`` builds on ``core`` alone; no
product layer below the CLI imports ``lab`` (what demos, tests and benchmarks start); the
service keeps its own state (nothing of the station's persistence). Every ``keyload``
import of every module is read, including those inside functions, and each names a module
or a name that exists. No module is over 600 lines.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import keyload

ROOT = Path(keyload.__file__).parent


#: Each layer and what it may import, bottom up (the README's "How it is built").
LAYERS = {
    "core": set(),
    "records": {"core"},
    "units": {"core", "records"},
    "transports": {"core"},
    "station": {"core", "records", "units", "transports"},
    "service": {"core", "records", "units", "transports", "station"},
    "lab": {"core", "records", "units", "transports", "station"},
    "dashboard": {"core", "records", "units", "transports", "station", "service"},
    "cli": {"core", "records", "units", "transports", "station", "service", "lab",
            "dashboard"},
}
#: What the service may take from the station: driving a unit (``fetch``), not records.
SERVICE_FROM_STATION = {"keyload.station.fleet", "keyload.station.load"}


def _modules(path: Path) -> list[tuple[str, list[str]]]:
    """Every keyload import of a module: (module, [names taken from it])."""
    package = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("keyload")]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            mod = ".".join([*base, *(node.module or "").split(".")]).strip(".")
            if mod.startswith("keyload"):
                found.append((mod, [a.name for a in node.names]))
    return found


def _imports(path: Path) -> set[str]:
    """The keyload subpackages (``core``, ``lab``, ...) that a module imports."""
    found: set[str] = set()
    for mod, names in _modules(path):
        parts = mod.split(".")
        if len(parts) > 1:
            found.add(parts[1])
        else:  # from keyload import core (a layer), or __version__ (not one)
            found.update(n for n in names if (ROOT / n / "__init__.py").exists())
    return found


def _sources() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def _layer_imports(layer: str) -> dict[str, set[str]]:
    return {str(p.relative_to(ROOT)): _imports(p) - {layer}
            for p in sorted((ROOT / layer).rglob("*.py"))}


def test_each_layer_imports_only_the_layers_below() -> None:
    assert set(LAYERS) == {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    wrong = {m: sorted(i - allowed) for layer, allowed in LAYERS.items()
             for m, i in _layer_imports(layer).items() if i - allowed}
    assert wrong == {}


def test_the_service_takes_no_persistence_from_the_station() -> None:
    taken = {mod for p in (ROOT / "service").rglob("*.py") for mod, _ in _modules(p)
             if mod.startswith("keyload.station")}
    assert taken <= SERVICE_FROM_STATION, sorted(taken - SERVICE_FROM_STATION)


def test_every_import_names_something_that_exists() -> None:
    """A module moved or a name renamed leaves no import behind, even one inside a
    function that only runs on a rare path."""
    missing: list[str] = []
    for p in _sources():
        for mod, names in _modules(p):
            try:
                m = importlib.import_module(mod)
            except ModuleNotFoundError:
                missing.append(f"{p.relative_to(ROOT)}: {mod}")
                continue
            for n in names:
                if n == "*" or hasattr(m, n):
                    continue
                try:
                    importlib.import_module(f"{mod}.{n}")
                except ModuleNotFoundError:
                    missing.append(f"{p.relative_to(ROOT)}: {mod}.{n}")
    assert missing == []


def test_no_module_is_over_600_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _sources()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert long == {}


#: The command line parses, calls and prints (the restructure's done-criterion).
CLI_LINES = 1300


def _cli_lines() -> int:
    return sum(len(p.read_text(encoding="utf-8").splitlines())
               for p in (ROOT / "cli").glob("*.py"))


def test_the_cli_stays_under_1300_lines() -> None:
    assert _cli_lines() < CLI_LINES


def test_records_builds_on_core_alone() -> None:
    found = _layer_imports("records")
    assert found, "records/ has modules"
    assert {m: i for m, i in found.items() if i - {"core"}} == {}


def test_only_the_cli_imports_the_lab() -> None:
    for layer in ("core", "records", "units", "transports", "station", "service",
                  "dashboard"):
        found = _layer_imports(layer)
        assert found, f"{layer}/ has modules"
        assert {m: i for m, i in found.items() if "lab" in i} == {}, layer
    assert any("lab" in i for i in _layer_imports("cli").values())  # the reader sees it


def test_the_moved_modules_are_gone_from_their_old_homes() -> None:
    for old in ("units/softhsm.py", "transports/pcscd.py", "station/pgserver.py",
                "transports/vcard.py", "units/stored.py"):
        assert not (ROOT / old).exists(), old
