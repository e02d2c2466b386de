"""Enrolling emulated units of an identity set in bulk (station.enrolment): every unit
ends enrolled and registered, or is not left in the fleet at all; the register is written
once per batch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from keyload.core.identity import Certificate
from keyload.core.keys import KeyType
from keyload.station import enrolment
from keyload.station.campaign import Interrupt
from keyload.station.enrolment import certifier, enrol_units
from keyload.station.fleet import EmulatedFleet
from keyload.units.authority import IdentitySetInfo
from keyload.units.keystore import SoftwareKeystore
from keyload.units.storage import KekSource
from keyload.units.unit import Slot

SLOTS = {1: Slot(1, frozenset({KeyType.AES256}))}


@pytest.fixture
def fleet(tmp_path: Path) -> EmulatedFleet:
    return EmulatedFleet.open(tmp_path / "units", KekSource(passphrase="enrol test"),
                              create=True)


@pytest.fixture
def ks() -> SoftwareKeystore:
    return SoftwareKeystore.ephemeral()


def _serials(n: int) -> list[bytes]:
    return [b"EN" + i.to_bytes(4, "big") for i in range(n)]


def test_units_are_enrolled_and_registered(fleet: EmulatedFleet, ks: SoftwareKeystore,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    set_id = ks.generate_identity_set("s", authority_id=b"A").set_id
    saves: list[int] = []
    save = ks.save

    def counted() -> None:
        saves.append(1)
        save()

    monkeypatch.setattr(ks, "save", counted)
    monkeypatch.setattr(enrolment, "BATCH", 4)
    done: list[bool] = []
    assert enrol_units(fleet, certifier(ks), set_id, _serials(10), SLOTS,
                       on_unit=done.append) == 10
    assert done == [True] * 10 and len(saves) == 3  # batches of 4, 4 and 2
    assert fleet.serials() == sorted(_serials(10))
    registered = {r.sn: r.certificate for r in ks.unit_records(set_id)}
    for sn in _serials(10):
        unit = fleet.open_unit(sn)
        try:
            assert unit.state.certificate is not None
            assert Certificate.decode(unit.state.certificate) == registered[sn]
            assert unit.state.q_ca == ks.identity_set(set_id).q_ca
        finally:
            unit.close()


class Refusing:
    """An authority whose register refuses the second batch."""

    def __init__(self, ks: SoftwareKeystore) -> None:
        self.ks, self.calls = ks, 0

    def identity_set(self, set_id: bytes) -> IdentitySetInfo:
        return self.ks.identity_set(set_id)

    def certify_units(self, set_id: bytes, units: Sequence[tuple[bytes, bytes]]
                      ) -> list[Certificate]:
        self.calls += 1
        if self.calls == 2:
            raise ValueError("the register cannot be written")
        return self.ks.certify_units(set_id, units)


def test_a_refused_batch_leaves_no_unit_of_it(fleet: EmulatedFleet, ks: SoftwareKeystore,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    set_id = ks.generate_identity_set("s", authority_id=b"A").set_id
    monkeypatch.setattr(enrolment, "BATCH", 3)
    with pytest.raises(ValueError, match="register"):
        enrol_units(fleet, Refusing(ks), set_id, _serials(7), SLOTS)
    assert fleet.serials() == sorted(_serials(3))  # the first batch, enrolled
    assert sorted(r.sn for r in ks.unit_records(set_id)) == sorted(_serials(3))


def test_an_sn_already_registered_refuses_its_batch(fleet: EmulatedFleet,
                                                    ks: SoftwareKeystore,
                                                    tmp_path: Path) -> None:
    """Another fleet (another station) enrolling an SN the register holds: its batch is
    refused whole, and the unit made for the new SN removed."""
    set_id = ks.generate_identity_set("s", authority_id=b"A").set_id
    enrol_units(fleet, certifier(ks), set_id, _serials(2), SLOTS)
    other = EmulatedFleet.open(tmp_path / "other", KekSource(passphrase="enrol test"),
                               create=True)
    with pytest.raises(ValueError, match="already certified"):
        enrol_units(other, certifier(ks), set_id, [b"NEW1", _serials(2)[1]], SLOTS)
    assert other.serials() == []  # both made, both removed with their batch
    assert fleet.serials() == sorted(_serials(2))
    assert len(ks.unit_records(set_id)) == 2


def test_a_stop_removes_the_unfinished_batch(fleet: EmulatedFleet,
                                             ks: SoftwareKeystore) -> None:
    set_id = ks.generate_identity_set("s", authority_id=b"A").set_id
    done: list[bool] = []
    calls = iter(range(100))

    class Stopping(Interrupt):
        """Ctrl-C while the third unit of the first batch is about to be made."""

        def check(self) -> None:
            if next(calls) == 2:
                self.stop.set()
            super().check()

    with pytest.raises(KeyboardInterrupt):
        enrol_units(fleet, certifier(ks), set_id, _serials(5), SLOTS, on_unit=done.append,
                    interrupt=Stopping())
    assert fleet.serials() == [] and ks.unit_records(set_id) == [] and done == []


def test_a_backend_that_certifies_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot certify"):
        certifier(object())
