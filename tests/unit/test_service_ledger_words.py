"""The service's ledger check in words, as ``keyload ledger verify`` prints it
(:mod:`keyload.service.ledger`): invalid entries, the exports without receipt by client
and by age, the challenges left claimed, a state not checked."""

from __future__ import annotations

from keyload.service.ledger import (
    ServiceLedgerCheck,
    WithoutReceipt,
    exports_without_receipt,
)

NOW = 1_700_000_000.0


def _wr() -> WithoutReceipt:
    return exports_without_receipt([("fleet-a", "exported", NOW - 7200),
                                    ("fleet-a", "exported", NOW - 30),
                                    ("fleet-b", "exported", NOW - 3 * 86400),
                                    ("fleet-b", "claimed", NOW - 5)], NOW)


def test_without_receipt_heading_and_rows() -> None:
    wr = _wr()
    assert wr.heading() == ["3 service exports without receipt (the key left the service, "
                            "no receipt was posted), by client:"]
    assert wr.HEADERS == ("client", "exports", "oldest", "age", "newest", "age")
    assert wr.rows() == [
        ["fleet-a", 2, "2023-11-14T20:13:20Z", "2h", "2023-11-14T22:12:50Z", "30s"],
        ["fleet-b", 1, "2023-11-11T22:13:20Z", "3d", "2023-11-11T22:13:20Z", "3d"],
        ["total", 3, "2023-11-11T22:13:20Z", "3d", "2023-11-14T22:12:50Z", "30s"]]
    assert WithoutReceipt(now=NOW).heading() == [] == WithoutReceipt(now=NOW).rows()


def test_service_check_lines() -> None:
    chk = ServiceLedgerCheck(state="/h/service.db", verified=4, invalid=1, invalid_rows=[
        {"client": "fleet-a", "sn": "0a", "ref2": 1, "reason": "MAC"}], without_receipt=_wr())
    assert chk.invalid_lines() == ["INVALID receipt: service client fleet-a unit 0a slot 1: "
                                   "MAC"]
    assert chk.lines("unused") == [
        "service ledger (/h/service.db): 4 receipts verified, 1 invalid",
        "service exports without receipt: 3 (< 1 h: 1, < 1 day: 1, < 7 days: 1, older: 0)",
        "service challenges left claimed (never exported nor refused): 1"]
    assert ServiceLedgerCheck(state="pg").lines("x") == [
        "service ledger (pg): 0 receipts verified, 0 invalid"]
    assert ServiceLedgerCheck().lines("--campaign given") == [
        "service ledger: not checked (--campaign given)"]
