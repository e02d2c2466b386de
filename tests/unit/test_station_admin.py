"""A new unit's slots as ``keyload unit create`` gives them (``--slot``, ``--lock``)."""

from __future__ import annotations

import pytest

from keyload.core.keys import KeyType
from keyload.station.admin import parse_slots
from keyload.units.unit import Slot


def test_default_is_one_aes256_slot() -> None:
    assert parse_slots([], []) == {1: Slot(1, frozenset({int(KeyType.parse("aes256"))}))}


def test_slots_with_their_types_and_a_lock() -> None:
    aes = frozenset(int(KeyType.parse(t)) for t in ("aes128", "aes256"))
    slots = parse_slots(["2=aes128, aes256", "7=hmac-sha256"], [2])
    assert slots[2] == Slot(2, aes, True)
    assert slots[7] == Slot(7, frozenset({int(KeyType.parse("hmac-sha256"))}))
    assert not slots[7].locked


@pytest.mark.parametrize(("specs", "locked", "message"), [
    (["x=aes256"], [], r"--slot 'x=aes256': expected REF2=TYPES"),
    (["0=aes256"], [], r"REF2 must be in 1\.\.254"),
    (["1=aes256", "1=aes128"], [], "slot 1 given twice"),
    (["1="], [], r"--slot '1=': no key type"),
    (["1=des"], [], "des"),
    (["1=aes256"], [2], "--lock 2: no such slot"),
])
def test_slots_refused(specs: list[str], locked: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_slots(specs, locked)
