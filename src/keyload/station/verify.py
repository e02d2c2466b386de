"""Verifying a home's receipts: single loads (``station.db``) and every campaign's ledger
(``journal.db``), each receipt against the authority's export record and MAC; then the
exports left with neither a receipt nor a reconciliation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..core.errors import StoreError
from ..records.exportlog import SqliteExportLog
from ..records.ledger import LedgerEntry
from .home import Home
from .journal import open_journal
from .journal.model import IMPORTED, STATES
from .records import LoadRecords
from .report import ReceiptsCheck, campaign_entries, check_receipts, station_entry


def check_home_receipts(home: Home, accounted: Callable[[], list[tuple[Any, ...]]]
                        ) -> ReceiptsCheck:
    """Every receipt of the home checked by its authority. ``accounted`` gives the
    exports accounted for elsewhere (the service's ledger: (set id, SN, REF1, REF2,
    KCV)), which are not counted as without receipt."""
    if not home.station_db.exists() and not home.journal_path.exists():
        raise StoreError(f"no station records or campaign journal in {home.root}")
    exports_path = home.authority_dir / "exports.db"
    if not exports_path.exists():
        raise StoreError(f"no export records at {exports_path}")
    ks = home.open_keystore()
    try:
        authority = home.authority(ks)
        receipts, failures = station_receipts(home)
        others = accounted()
        log = SqliteExportLog(exports_path)
        try:
            return check_receipts(receipts, log.records(), authority, accounted=others,
                                  failures=failures)
        finally:
            log.close()
    finally:
        ks.close()


def station_receipts(home: Home) -> tuple[list[LedgerEntry],
                                          dict[tuple[bytes, bytes, int], str]]:
    """The receipts of ``station.db`` and of every campaign in ``journal.db``; and what
    the station recorded for loads that ended without one, by (SN, REF1, REF2)."""
    receipts: list[LedgerEntry] = []
    failures: dict[tuple[bytes, bytes, int], str] = {}
    if home.station_db.exists():
        records = LoadRecords(home.station_db)
        try:
            for row in records.rows():
                if row.status != "loaded":
                    failures[(row.sn, row.ref1, row.ref2)] = \
                        f"load failed at {row.step}" + (f": SW {row.sw}" if row.sw else "")
                    continue
                assert row.set_id is not None
                receipts.append(station_entry(row))
        finally:
            records.close()
    if home.journal_path.exists():
        journal = open_journal(home.journal_path)
        try:
            for name in journal.campaigns():
                receipts += campaign_entries(journal, name)
                for jr in journal.rows(name, [s for s in STATES if s != IMPORTED]):
                    failures[(jr.sn, jr.ref1, jr.ref2)] = f"campaign {name}: load {jr.state}" \
                        + (f", SW {jr.sw}" if jr.sw else "")
        finally:
            journal.close()
    return receipts, failures

