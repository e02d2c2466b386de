"""What ``keyload fetch`` is told of a fetch (:class:`keyload.service.fetch.Fetched`):
its --json shape, which receipts are pending or refused, and the words it prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from keyload.core.keys import KeyHeader
from keyload.service.client import Delivery, Pending, Receipt
from keyload.service.fetch import Fetched, resent_told
from keyload.station.load import LoadResult

HEADER = KeyHeader(0x01, 0x03, 32, "P0", "E", 7, "E", 0).encode()
RES = LoadResult(b"\x0a\x0b", bytes(5), b"PIN", 3, 0x01, bytes(16), HEADER, b"\xab\xcd\xef",
                 b"\x01" * 16)


def _resent(*statuses: str) -> list[dict[str, Any]]:
    return [{"status": s, "path": f"/outbox/{i}.json"} for i, s in enumerate(statuses)]


def test_recorded() -> None:
    d = Delivery("recorded", 1, {"status": "recorded"}, "", None)
    got = Fetched(_resent("recorded"), RES, d, None)
    out = got.to_json()
    assert out["ledger"] is True and out["pending"] is None
    assert (out["sn"], out["ref1"], out["ref2"], out["key_version"], out["kcv"]) == \
        ("0a0b", "PIN", 3, 7, "ABCDEF")
    assert out["resent"] == got.resent
    assert not got.pending() and got.refused_resent() == []


def test_pending_own_or_resent() -> None:
    d = Delivery("pending", 3, {}, "HTTP 503", None)
    got = Fetched([], RES, d, Path("/outbox/x.json"))
    assert got.to_json()["pending"] == "/outbox/x.json"
    assert got.to_json()["ledger"] is False
    assert got.pending()
    assert Fetched(_resent("recorded", "pending")).pending()
    assert not Fetched(_resent("recorded")).pending()


def test_refused_resent() -> None:
    got = Fetched(_resent("refused", "recorded", "refused"))
    assert [e["path"] for e in got.refused_resent()] == ["/outbox/0.json", "/outbox/2.json"]
    refused = Fetched([], RES, Delivery("refused", 1, {}, "409", None), Path("/r.json"))
    assert refused.to_json()["pending"] is None and not refused.pending()


LOADED = "PIN v7 into unit 0a0b slot 3 from https://s:8443: KCV ABCDEF (authority and unit agree)"


def test_load_told() -> None:
    assert RES.told() == ("loaded PIN v7 into unit 0a0b slot 3: KCV ABCDEF (authority and "
                          "unit agree)")
    assert RES.told(" in reader 'R 0'").startswith("loaded PIN v7 into unit 0a0b slot 3 in "
                                                   "reader 'R 0': KCV ABCDEF")


def test_told_recorded_pending_refused() -> None:
    rec = Fetched([], RES, Delivery("recorded", 1, {"status": "recorded"}, "", None), None)
    assert rec.told("https://s:8443") == f"loaded {LOADED}, receipt 0101010101010101" \
        "0101010101010101 recorded by the service"
    assert rec.notice("https://s:8443", 30, 8) is None
    pend = Fetched([], RES, Delivery("pending", 3, {}, "HTTP 503", None), Path("/o/x.json"))
    assert pend.told("https://s:8443") == f"loaded {LOADED}; receipt 0101010101010101" \
        "0101010101010101 NOT recorded yet: kept at /o/x.json"
    assert pend.notice("https://s:8443", 2.5, 8) == (
        f"keyload: the key IS loaded ({LOADED}), but the service did not take its receipt "
        "within 2.5 s (HTTP 503).\nkeyload: the receipt is kept at /o/x.json; it will be "
        "sent by `keyload fetch --resend --server https://s:8443 --ca … --cert … --key …`, "
        "or by the next fetch to that server (exit 8: done, evidence pending)")
    ref = Fetched([], RES, Delivery("refused", 1, {}, "HTTP 409", None), Path("/o/r.json"))
    assert ref.notice("https://s:8443", 30, 8) == (
        f"keyload: the key IS loaded ({LOADED}), but the service refused its receipt for "
        "good (HTTP 409); the receipt is kept at /o/r.json")


def test_resent_told() -> None:
    p = Pending(Path("/o/x.json"), {"sn": "0a0b", "ref2": 3, "ref1": "PIN", "key_version": 7,
                                    "time": "T"}, cast(Receipt, None))
    label = "unit 0a0b slot 3 (PIN v7, loaded T)"
    assert resent_told(p, {"status": "recorded", "detail": "", "path": "/o/x.json"}) == \
        f"resent the receipt of {label}: recorded by the service"
    assert resent_told(p, {"status": "refused", "detail": "409", "path": "/o/refused/x"}) == \
        f"resent the receipt of {label}: REFUSED by the service (409): moved to /o/refused/x"
    assert resent_told(p, {"status": "pending", "detail": "503", "path": "/o/x.json"}) == \
        f"resent the receipt of {label}: still pending (503): kept at /o/x.json"
