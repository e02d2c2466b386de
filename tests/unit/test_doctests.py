"""Every example in a docstring of keyload runs and gives what it shows (STYLE: runnable
doctests). The modules are found by their text, so a new example is run without a list."""

from __future__ import annotations

import doctest
import importlib
from pathlib import Path

import pytest

import keyload

PACKAGE = Path(keyload.__file__).resolve().parent
WITH_EXAMPLES = sorted(
    "keyload." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
    for p in PACKAGE.rglob("*.py") if ">>> " in p.read_text(encoding="utf-8"))


def test_the_station_load_example_is_among_them() -> None:
    assert "keyload.station.load" in WITH_EXAMPLES
    assert "keyload.core.tlv" in WITH_EXAMPLES


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name}: no example found"
    assert result.failed == 0, f"{name}: {result.failed} example(s) failed"
