"""Shared test fixtures.

A test that needs a real external part (SoftHSM2, pcscd, PostgreSQL) calls
:func:`require`: on a laptop without it the test skips with the reason; in CI
(``CI=true``) a missing part is a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyload.lab.pcscd import Pcscd, pcsc_available, running_pcscd
from keyload.units.conformance import PUBLIC_VECTORS
from keyload.units.storage import KekSource

VECTORS = Path(__file__).resolve().parent / "vectors"
KLP1_VECTORS, KLP1_SUITE3_VECTORS = PUBLIC_VECTORS
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(ok: bool, reason: str) -> None:
    if ok:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def pcscd() -> Iterator[Pcscd]:
    """pcscd with the vpcd readers, for one module (reused when one already runs)."""
    avail = pcsc_available()
    require(avail.ok, f"PC/SC with vpcd: {avail.reason}")
    with running_pcscd() as d:
        yield d


@pytest.fixture
def kek_source() -> KekSource:
    return KekSource(passphrase="correct horse battery staple")


@pytest.fixture(autouse=True)
def _fast_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Vaults made in tests use a cheaper scrypt cost (the format stores N)."""
    import keyload.units.storage as storage

    monkeypatch.setattr(storage, "SCRYPT_N", 2**12)
