"""Receipts against the authority's export records (``keyload receipts``): each receipt
matched to the export it claims and checked by the authority's MAC; the exports left with
neither a receipt nor a reconciliation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import KeyloadError
from ..core.notation import counted
from ..core.ref1 import display_ref1
from ..records.exportlog import ExportRecord
from ..records.ledger import Export, KeyFacts, LedgerEntry, verify_entries
from ..units.authority import Authority
from .report import iso


@dataclass
class ReceiptsCheck:
    """Every receipt checked against the export it claims and by the authority's MAC;
    the exports left with neither a receipt nor a reconciliation."""

    verified: int = 0
    invalid: int = 0
    reconciled: int = 0
    invalid_rows: list[dict[str, Any]] = field(default_factory=list)
    without_receipt: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """What ``keyload receipts --json`` prints."""
        return {"verified": self.verified, "invalid": self.invalid,
                "invalid_rows": self.invalid_rows, "reconciled": self.reconciled,
                "exports_without_receipt": len(self.without_receipt),
                "without_receipt": self.without_receipt}

    def lines(self) -> list[str]:
        """What ``keyload receipts`` prints."""
        lost = self.without_receipt
        return [*(f"INVALID receipt: {row['source']} unit {row['sn']} slot {row['ref2']} "
                  f"{row['ref1']}: {row['reason']}" for row in self.invalid_rows),
                *(f"export without receipt: unit {e['sn']} slot {e['ref2']} {e['ref1']} "
                  f"v{e['key_version']} KCV {e['kcv']} ({e['station'] or 'nothing recorded'})"
                  for e in lost),
                *([f"{counted(len(lost), 'export')} without receipt"] if lost else []),
                *([f"{counted(self.reconciled, 'load')} reconciled with the unit after a crash: "
                   "receipt lost, slot status recorded"] if self.reconciled else []),
                f"{counted(self.verified, 'receipt')} verified, {self.invalid:,} invalid"]


def _download(set_id: bytes, sn: bytes, ref1: bytes, ref2: int, kcv: bytes | None) -> tuple[
        bytes, bytes, bytes, int, bytes | None]:
    return set_id, sn, ref1, ref2, kcv


class _Exports:
    """The export records by download (set, SN, REF1, REF2, KCV), each taken once."""

    def __init__(self, records: Iterable[ExportRecord]) -> None:
        self.records = list(records)
        self.taken = [False] * len(self.records)
        self.by_download: dict[tuple[Any, ...], list[int]] = {}
        for i, e in enumerate(self.records):
            self.by_download.setdefault(_download(e.set_id, e.sn, e.ref1, e.ref2, e.kcv),
                                        []).append(i)

    def take(self, key: tuple[Any, ...], t: float) -> ExportRecord | None:
        """The latest export of ``key`` not taken yet made at or before ``t`` (else the
        earliest not taken): a retried download's receipt goes with its last export."""
        free = [i for i in self.by_download.get(key, ()) if not self.taken[i]]
        if not free:
            return None
        before = [i for i in free if self.records[i].time <= t]
        i = before[-1] if before else free[0]
        self.taken[i] = True
        return self.records[i]

    def export_of(self, e: LedgerEntry) -> Export | None:
        """The export ``e`` claims, taken (the authority records no header nor client)."""
        x = self.take(e.download, e.time or 0.0)
        return None if x is None else Export(
            x.set_id, x.ref1, x.ref2, x.suite, x.key_version, x.kcv,
            recorded=("set_id", "ref1", "ref2", "suite", "kcv", "key_version",
                      "initial_key_id"),
            c_u=x.c_u, e_a=x.e_a, initial_key_id=x.initial_key_id)

    def left(self) -> Iterator[ExportRecord]:
        return (e for e, taken in zip(self.records, self.taken, strict=True) if not taken)


def key_facts(authority: Authority) -> Callable[[bytes], KeyFacts | None]:
    """The authority's keys as they are now, by REF1 (None: the key is gone: its
    receipts' MACs still count)."""
    def facts(ref1: bytes) -> KeyFacts | None:
        try:
            info = authority.backend.key_info(ref1)
        except KeyloadError:
            return None
        return KeyFacts(info.version, int(info.key_type), info.length, info.attrs.usage,
                        info.attrs.mode, info.attrs.exportability)
    return facts


def check_receipts(receipts: Iterable[LedgerEntry], exports: Iterable[ExportRecord],
                   authority: Authority, *, accounted: Iterable[tuple[Any, ...]] = (),
                   failures: dict[tuple[bytes, bytes, int], str] | None = None
                   ) -> ReceiptsCheck:
    """Check every receipt (reconciled loads, ``rct`` None, are counted apart) against
    the authority's export records and MAC (:func:`~keyload.records.ledger.verify_entries`);
    list the exports left over.

    The MAC binds SN, R, REF2, H and the KCV; the export record binds the rest to what
    the authority sent: set, REF1, suite and key version (the one in H and the row's
    own column), and H's key type, length, usage, mode and exportability to the key's
    while it is still at that version.

    ``accounted``: downloads (set, SN, REF1, REF2, KCV) whose receipt is kept and
    checked elsewhere (the service's ledger). ``failures``: what the station recorded
    for a download that did not end in a receipt, by (SN, REF1, REF2), shown with the
    exports left over."""
    ex = _Exports(exports)
    for key in accounted:
        ex.take(key, float("inf"))
    chk = verify_entries(sorted(receipts, key=lambda x: x.time or 0.0), authority,
                         export_of=ex.export_of, matched_by="unit, slot, key and KCV",
                         key_now=key_facts(authority))
    out = ReceiptsCheck(chk.verified, chk.invalid, chk.reconciled, [
        {"source": i.entry.label, "sn": i.entry.sn.hex(), "ref2": i.entry.ref2,
         "ref1": display_ref1(i.entry.ref1), "reason": i.reason}
        for i in chk.invalid_entries])
    for e in ex.left():
        out.without_receipt.append({
            "time": iso(e.time), "set_id": e.set_id.hex(), "sn": e.sn.hex(),
            "ref1": display_ref1(e.ref1), "ref2": e.ref2, "suite": e.suite,
            "key_version": e.key_version, "kcv": e.kcv.hex().upper(),
            "station": (failures or {}).get((e.sn, e.ref1, e.ref2))})
    return out
