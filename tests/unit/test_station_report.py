"""The receipts check as ``keyload receipts --json`` prints it."""

from __future__ import annotations

from keyload.station.receipts import ReceiptsCheck


def test_receipts_check_json() -> None:
    lost = [{"sn": "0a", "ref2": 1}, {"sn": "0b", "ref2": 2}]
    bad = [{"source": "station", "sn": "0c", "reason": "MAC"}]
    chk = ReceiptsCheck(verified=5, invalid=1, reconciled=2, invalid_rows=bad,
                        without_receipt=lost)
    assert chk.to_json() == {"verified": 5, "invalid": 1, "invalid_rows": bad,
                             "reconciled": 2, "exports_without_receipt": 2,
                             "without_receipt": lost}
    assert ReceiptsCheck().to_json()["exports_without_receipt"] == 0
