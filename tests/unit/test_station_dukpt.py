"""keyload.station.dukpt.initial_key_order and a BDK's load as LoadResult tells it."""

from __future__ import annotations

import pytest

from keyload.core.dukpt import InitialKeyId
from keyload.core.keys import KeyHeader, KeyType
from keyload.station.dukpt import initial_key_order
from keyload.station.load import LoadResult

IK_ID = "0123456789ABCDEF"


def test_no_initial_key_id_no_order() -> None:
    assert initial_key_order(None, None, reader=None, unit="01") is None


def test_an_order_of_the_id_and_type() -> None:
    order = initial_key_order(IK_ID, "AES-128", reader=None, unit="01")
    assert order is not None
    assert order.initial_key_id == InitialKeyId.parse(IK_ID)
    assert order.ik_type == KeyType.parse("AES-128")


def test_ik_type_alone_is_refused() -> None:
    with pytest.raises(ValueError, match="--ik-type goes with --initial-key-id"):
        initial_key_order(None, "AES-128", reader=None, unit="01")


@pytest.mark.parametrize(("reader", "unit"), [("r", "01"), ("r", None), (None, "01")])
def test_an_initial_key_goes_to_an_emulated_unit_or_a_card(reader: str | None,
                                                          unit: str | None) -> None:
    order = initial_key_order(IK_ID, None, reader=reader, unit=unit)
    assert order is not None and order.initial_key_id == InitialKeyId.parse(IK_ID)


def test_an_initial_key_needs_a_unit() -> None:
    with pytest.raises(ValueError, match="give --unit or --reader"):
        initial_key_order(IK_ID, None, reader=None, unit=None)


def test_a_bdk_load_names_its_initial_key() -> None:
    header = KeyHeader(0x01, KeyType.AES128, 16, "B1", "X", 3, "N", 0).encode()
    res = LoadResult(bytes.fromhex("01"), bytes(8), b"BDK1", 2, 0x01, bytes(16), header,
                     bytes.fromhex("ABCDEF"), bytes(16),
                     initial_key_id=bytes.fromhex(IK_ID))
    assert res.told() == (f"loaded the initial key {IK_ID} of BDK BDK1 v3 into unit 01 "
                          "slot 2: KCV ABCDEF (authority and unit agree)")
    assert res._replace(initial_key_id=None).told(" in reader 'r'") == (
        "loaded BDK1 v3 into unit 01 slot 2 in reader 'r': KCV ABCDEF (authority and unit "
        "agree)")
