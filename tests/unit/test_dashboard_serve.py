"""keyload.dashboard.serve.from_options: an option without its companions is refused
before anything is opened."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyload.dashboard.serve import from_options
from keyload.station.home import Home


def _opts(**given: str) -> dict[str, str | None]:
    base: dict[str, str | None] = {"cert": None, "key": None, "ca": None, "policy": None,
                                   "service": None}
    return {**base, **given}


@pytest.mark.parametrize("given", [{"cert": "c.pem"}, {"key": "k.pem", "ca": "ca.pem"},
                                   {"cert": "c", "key": "k", "policy": "p.json"}])
def test_https_needs_all_four_files(tmp_path: Path, given: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="HTTPS needs --cert, --key, --ca and --policy"):
        from_options(Home.resolve(str(tmp_path)), host="127.0.0.1", port=0, journal=None,
                     **_opts(**given))


def test_a_service_needs_its_ca(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--service needs --ca"):
        from_options(Home.resolve(str(tmp_path)), host="127.0.0.1", port=0, journal=None,
                     **_opts(service="https://127.0.0.1:8443"))
