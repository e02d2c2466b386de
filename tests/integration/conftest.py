"""Fixtures shared by the integration modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from .cli_helpers import KEYLOAD
from .store_homes import make_home


@pytest.fixture(scope="session")
def base_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The home of :func:`.store_homes.make_home`, made once with the real CLI for every
    module that damages or edits one; a test never changes it, it changes a copy
    (:func:`.store_homes.copy_home`)."""
    if not KEYLOAD.is_file():
        pytest.skip(f"the keyload console script is not installed at {KEYLOAD}")
    return make_home(tmp_path_factory.mktemp("store-home") / "home")
