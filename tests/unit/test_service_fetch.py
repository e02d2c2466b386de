"""What ``keyload fetch`` is told of a fetch (:class:`keyload.service.fetch.Fetched`):
its --json shape, and which receipts are pending or refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from keyload.core.keys import KeyHeader
from keyload.service.client import Delivery
from keyload.service.fetch import Fetched
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
