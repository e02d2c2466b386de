"""The receipts check as ``keyload receipts`` prints it (--json and text), and a
campaign's status as ``keyload campaign status`` does."""

from __future__ import annotations

from keyload.station.receipts import ReceiptsCheck
from keyload.station.report import CampaignStatus


def test_receipts_check_json() -> None:
    lost = [{"sn": "0a", "ref2": 1}, {"sn": "0b", "ref2": 2}]
    bad = [{"source": "station", "sn": "0c", "reason": "MAC"}]
    chk = ReceiptsCheck(verified=5, invalid=1, reconciled=2, invalid_rows=bad,
                        without_receipt=lost)
    assert chk.to_json() == {"verified": 5, "invalid": 1, "invalid_rows": bad,
                             "reconciled": 2, "exports_without_receipt": 2,
                             "without_receipt": lost}
    assert ReceiptsCheck().to_json()["exports_without_receipt"] == 0


def test_receipts_check_lines() -> None:
    bad = [{"source": "campaign c1", "sn": "0c", "ref2": 1, "ref1": "TMK", "reason": "MAC"}]
    lost = [{"sn": "0a", "ref2": 2, "ref1": "PIN", "key_version": 3, "kcv": "ABCDEF",
             "station": None}]
    chk = ReceiptsCheck(verified=5, invalid=1, reconciled=2, invalid_rows=bad,
                        without_receipt=lost)
    assert chk.lines() == [
        "INVALID receipt: campaign c1 unit 0c slot 1 TMK: MAC",
        "export without receipt: unit 0a slot 2 PIN v3 KCV ABCDEF (nothing recorded)",
        "1 export without receipt",
        "2 loads reconciled with the unit after a crash: receipt lost, slot status recorded",
        "5 receipts verified, 1 invalid"]
    assert ReceiptsCheck(verified=2).lines() == ["2 receipts verified, 0 invalid"]


def test_campaign_status_rows_and_line() -> None:
    states = {"planned": 1, "claimed": 0, "exported": 0, "imported": 1200, "failed": 3}
    st = CampaignStatus("c1", bytes.fromhex("0102030405"), 601, 1204, states, ())
    assert st.rows() == [("campaign", "c1"), ("set", "0102030405"), ("units", 601),
                         ("loads", 1204), ("planned", "1"), ("claimed", "0"),
                         ("exported", "0"), ("imported", "1,200"), ("failed", "3")]
    assert st.line() == "1,200 of 1,204 loads imported, 3 failed"
