"""keyload.station.dukpt.initial_key_order and a BDK's load as LoadResult tells it."""

from __future__ import annotations

import json
from dataclasses import replace

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
    with pytest.raises(ValueError, match="give --sn or --reader"):
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


def test_a_journal_planned_before_the_rows_kept_the_id_counts_up_its_base() -> None:
    """A campaign planned when only the plan kept a BDK's base (no ``initial_key`` flag, no
    ID in its rows) still delivers the base counted up by the unit's place."""
    from keyload.station.dukpt import campaign_initial_key
    from keyload.station.journal.model import PLANNED, LoadRow
    from keyload.station.journal.sql import campaign_from_row

    plan = [{"ref1": b"BDK".hex(), "ref2": 1, "version": 1, "initial_key_id_base": IK_ID}]
    camp = campaign_from_row(("c", "0102030405", 0.0, json.dumps(plan), "{}", 3))
    assert camp.plan[0].initial_key and camp.plan[0].ik_type is None
    row = LoadRow("c", 2, b"\x01", 1, b"BDK", 1, PLANNED, 0, None, None, None, None, None,
                  None, None, False, None, None, None)
    assert campaign_initial_key(camp, row) == InitialKeyId.parse(IK_ID).plus(2)
    kept = InitialKeyId.parse("AABBCCDD00000001")
    assert campaign_initial_key(camp, replace(row, initial_key_id=kept.value)) == kept


def test_a_plan_keeps_its_initial_keys_and_ik_type() -> None:
    from keyload.station.journal.model import Campaign, PlannedLoad
    from keyload.station.journal.sql import campaign_from_row, campaign_to_row, planned_rows

    plan = (PlannedLoad(b"BDK", 1, 2, None, True, KeyType.AES128), PlannedLoad(b"KEK", 2, 1))
    camp = Campaign("c", bytes(5), 0.0, plan, {}, 2)
    assert campaign_from_row(campaign_to_row(camp)).plan == plan
    ids = {b"\x01": bytes.fromhex(IK_ID), b"\x02": bytes(8)}
    assert [r[-1] for r in planned_rows(camp, [b"\x01", b"\x02"], ids)] == \
        [IK_ID.lower(), None, "00" * 8, None]
    with pytest.raises(ValueError, match="unit 03: no initial key ID"):
        list(planned_rows(camp, [b"\x03"], ids))
