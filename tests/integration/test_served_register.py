"""The authority of a home keeps its register of served challenges (docs/protocol.md §10.4)
in its export records' database: a suite-0x03 challenge served once is refused 6985 by
every later authority of the home (another process, or after a restart), and a challenge
whose export was refused is not taken."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from keyload.core import messages as msg
from keyload.core import messages3 as msg3
from keyload.core.errors import SW, StatusError
from keyload.core.keys import KeyAttributes, KeyType
from keyload.core.suite3 import SUITE_ECDH
from keyload.station.home import Home
from keyload.station.identity import enrol_unit
from keyload.station.load import UnitClient
from keyload.transports.local import LocalConnection
from keyload.units.authority import ExportPolicy
from keyload.units.keystore import SoftwareKeystore
from keyload.units.storage import KekSource
from keyload.units.unit import Slot

SN = bytes.fromhex("1D000000AA")
TMK = b"TMK-1"


@pytest.fixture
def world(tmp_path: Path) -> tuple[Home, SoftwareKeystore, bytes]:
    home = Home(tmp_path / "home", KekSource(passphrase="served register"))
    home.ensure()
    ks = home.create_authority()
    assert isinstance(ks, SoftwareKeystore)
    set_id = ks.generate_identity_set("plant", authority_id=b"A").set_id
    ks.generate_key(TMK, KeyType.AES256, KeyAttributes("K0", "B", "E"), version=1,
                    diversify=False, policy=ExportPolicy(None, None))
    enrol_unit(home, ks, set_id, SN, {1: Slot(1, frozenset({KeyType.AES256}))})
    return home, ks, set_id


def _request(home: Home, ref1: bytes = TMK) -> bytes:
    """A genuine suite-0x03 EXPORTKEY request of the home's unit, as a station sends it."""
    from keyload.station.fleet import EmulatedFleet

    fleet = EmulatedFleet.open(home.units_dir, home.source)
    try:
        unit = fleet.open_unit(SN)
        try:
            client = UnitClient(LocalConnection(unit))
            client.select()
            init = client.initialize3()
        finally:
            unit.close()
    finally:
        fleet.close()
    return msg3.ExportRequest3(msg.ExportRequest(init.sn, init.r, init.set_id, SUITE_ECDH,
                                                 ref1, 1), init.e_u, init.c_u,
                               init.sig_u).encode()


def _served(home: Home) -> int:
    db = sqlite3.connect(home.authority_dir / "exports.db")
    try:
        return int(db.execute("SELECT count(*) FROM served").fetchone()[0])
    finally:
        db.close()


def test_a_served_challenge_is_refused_by_every_later_authority(
        world: tuple[Home, SoftwareKeystore, bytes]) -> None:
    home, ks, _ = world
    req = _request(home)
    first = home.authority(ks)
    first.export(req)
    again = home.authority(ks)  # another process of the home, or after a restart
    with pytest.raises(StatusError) as e:
        again.export(req)
    assert e.value.sw == SW.NO_CHALLENGE
    with pytest.raises(StatusError) as e:
        first.export(req)
    assert e.value.sw == SW.NO_CHALLENGE
    assert _served(home) == 1


def test_a_refused_export_takes_no_challenge(
        world: tuple[Home, SoftwareKeystore, bytes]) -> None:
    home, ks, _ = world
    req = _request(home, ref1=b"NO-SUCH-KEY")
    with pytest.raises(StatusError) as e:
        home.authority(ks).export(req)
    assert e.value.sw == SW.NOT_FOUND
    assert _served(home) == 0
