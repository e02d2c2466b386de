"""Verifying a home's receipts: single loads (``station.db``) and every campaign's ledger
(``journal.db``), each receipt against the authority's export record and MAC (or, in
suite 0x03, the unit's signature under its certificate); then the exports left with
neither a receipt nor a reconciliation. An auditor verifies the campaigns' suite-0x03
receipts without the authority, trusting the Q_CA of each set (:func:`identity_trust`)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TextIO, TypeVar

from ..core.errors import StoreError
from ..core.notation import counted
from ..records.exportlog import SqliteExportLog
from ..records.ledger import CertificatesOnly, LedgerEntry, ReceiptChecker
from ..units.authority import IdentityBackend, IdentitySetInfo
from .admin import read_keystore
from .home import Home, Keystore
from .journal import open_journal
from .journal.model import IMPORTED, STATES, Journal
from .plan import open_home_journal
from .receipts import ReceiptsCheck, check_receipts
from .records import LoadRecords
from .report import (
    campaign_entries,
    invalid_rows,
    ledger,
    station_entry,
    verify_ledger,
    write_ledger_csv,
)


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


@dataclass(frozen=True)
class AuditorTrust:
    """An identity set's Q_CA and C_A, as ``keyload set ca`` gives them to an auditor."""

    info: IdentitySetInfo

    def to_json(self) -> dict[str, Any]:
        i = self.info
        return {"set_id": i.set_id.hex(), "name": i.name, "q_ca": i.q_ca.hex(),
                "c_a": i.c_a.encode().hex(), "ca": self.ca()}

    def ca(self) -> str:
        """The argument of ``keyload ledger verify --auditor --ca``."""
        return f"{self.info.set_id.hex()}={self.info.q_ca.hex()}"

    def rows(self) -> list[tuple[str, str]]:
        i = self.info
        return [("set id", i.set_id.hex()), ("name", i.name), ("Q_CA", i.q_ca.hex()),
                ("C_A", i.c_a.encode().hex())]

    def hint(self) -> str:
        return ("an auditor verifies this set's receipts with: keyload ledger verify "
                f"--auditor --ca {self.ca()}")


def identity_trust(home: Home, set_id: bytes) -> AuditorTrust:
    """Q_CA and C_A of identity set ``set_id``: what an auditor trusts to verify its units'
    receipts without the authority (``keyload ledger verify --auditor --ca``). Unknown
    set: 6A82; a transport-key set: ValueError (its receipts are MACs)."""
    def read(ks: Keystore) -> IdentitySetInfo:
        info = ks.set_info(set_id)
        if not info.identity or not isinstance(ks, IdentityBackend):
            raise ValueError(f"set {set_id.hex()} is a transport-key set, not an identity "
                             "set: its receipts are verified by the authority only")
        return ks.identity_set(set_id)
    return AuditorTrust(read_keystore(home, read))


# -- the campaigns' ledgers (``keyload ledger verify|export``) --------------------------
class Closing(Protocol):
    def close(self) -> None: ...


StateT = TypeVar("StateT", bound=Closing)


@contextmanager
def ledgers(home: Home, where: str | None, state: Callable[[], StateT | None]
            ) -> Iterator[tuple[StateT | None, Journal | None]]:
    """The service's state as ``state`` opens it (None: its ledger is left out) and the
    campaign journal of :func:`ledger_journal`, both closed after the block. The home
    must exist: a typo must not leave a new home behind."""
    home.existing()
    with ExitStack() as stack:
        store = state()
        if store is not None:
            stack.callback(store.close)
        journal = ledger_journal(home, where)
        if journal is not None:
            stack.callback(journal.close)
        yield store, journal


def write_ledgers(out: TextIO, fmt: str, campaigns: Iterable[dict[str, Any]],
                  service: Iterable[dict[str, Any]]) -> tuple[int, int]:
    """The campaigns' ledger entries, then the service's, written to ``out`` as CSV
    (``fmt`` ``csv``) or a JSON list; how many of each."""
    n = [0, 0]

    def counted(entries: Iterable[dict[str, Any]], i: int) -> Iterator[dict[str, Any]]:
        for e in entries:
            n[i] += 1
            yield e

    entries = itertools.chain(counted(campaigns, 0), counted(service, 1))
    if fmt == "csv":
        write_ledger_csv(entries, out)
    else:
        out.write(json.dumps(list(entries), indent=1) + "\n")
    return n[0], n[1]


def ledgers_json(campaigns: Iterable[dict[str, Any]], service: Iterable[dict[str, Any]]
                 ) -> dict[str, Any]:
    """The campaigns' ledger entries, then the service's, as ``keyload ledger export
    --json`` prints them: one object, the entries under ``entries``, each source counted."""
    camp, svc = list(campaigns), list(service)
    return {"entries": camp + svc, "from_campaigns": len(camp), "from_service": len(svc)}


def ledger_journal(home: Home, where: str | None) -> Journal | None:
    """The campaign journal to read the ledgers of (``where``, or the home's), or None
    when the home has none and none is named: no campaign was created here, and none is
    created by reading."""
    if where is None and not home.journal_path.exists():
        return None
    return open_home_journal(home, where, create=False)


def ledger_campaigns(home: Home, journal: Journal | None, campaign: str | None) -> list[str]:
    """``campaign`` (which must exist), or every campaign of ``journal``."""
    if journal is None:
        if campaign:
            raise StoreError(f"no campaign {campaign!r}: no campaign journal at "
                             f"{home.journal_path}")
        return []
    return [campaign] if campaign else journal.campaigns()


def campaigns_ledger(journal: Journal | None, names: list[str]) -> Iterator[dict[str, Any]]:
    """The ledger of these campaigns, in the export's shape."""
    for name in names if journal is not None else []:
        assert journal is not None
        yield from ledger(journal, name)


@dataclass
class CampaignsCheck:
    """The campaigns' receipts verified by the authority; or by an ``auditor`` without
    it, who counts those of suites 0x01/0x02 apart (``unverifiable``)."""

    verified: int = 0
    invalid: int = 0
    reconciled: int = 0  # loads reconciled with the unit after a crash: receipt lost
    invalid_rows: list[dict[str, object]] = field(default_factory=list)
    auditor: bool = False
    unverifiable: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"verified": self.verified, "invalid": self.invalid,
                "reconciled_without_receipt": self.reconciled,
                "invalid_rows": self.invalid_rows, **self.auditor_json()}

    def auditor_json(self) -> dict[str, Any]:
        """What an auditor's check adds: the receipts it could not verify."""
        return {"not_verifiable_without_authority": self.unverifiable} if self.auditor else {}

    def invalid_lines(self) -> list[str]:
        return [f"INVALID receipt: campaign {r['campaign']} unit {r['sn']} slot {r['ref2']}: "
                f"{r['reason']}" for r in self.invalid_rows]

    def notes(self) -> list[str]:
        """What was neither verified nor invalid, for people."""
        return [*([f"{counted(self.reconciled, 'load')} reconciled with the unit after a "
                   "crash: receipt lost, slot status recorded"] if self.reconciled else []),
                *([f"{counted(self.unverifiable, 'receipt')} of suites 0x01/0x02 not verifiable "
                   "without the authority (MACs under the set's keys)"]
                  if self.unverifiable else [])]


def verify_campaigns(journal: Journal | None, names: list[str],
                     authority: ReceiptChecker) -> CampaignsCheck:
    """Every receipt of these campaigns, verified by ``authority`` (or an auditor's
    :class:`~keyload.records.ledger.CertificatesOnly`)."""
    out = CampaignsCheck(auditor=isinstance(authority, CertificatesOnly))
    for n in names if journal is not None else []:
        assert journal is not None
        chk = verify_ledger(journal, n, authority)
        out.verified += chk.verified
        out.invalid += chk.invalid
        out.reconciled += chk.reconciled
        out.unverifiable += chk.unverifiable
        out.invalid_rows += [{"source": "campaign", "campaign": n, **r}
                             for r in invalid_rows(chk)]
    return out


class ServiceCheck(Protocol):
    """The service's ledger checked (``keyload.service.ledger.ServiceLedgerCheck``)."""

    verified: int
    invalid: int
    invalid_rows: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]: ...


ServiceT = TypeVar("ServiceT", bound=ServiceCheck)


@dataclass
class LedgersCheck(Generic[ServiceT]):
    """Every ledger verified: the campaigns' and the service's."""

    campaigns: CampaignsCheck
    service: ServiceT

    @property
    def verified(self) -> int:
        return self.campaigns.verified + self.service.verified

    @property
    def invalid(self) -> int:
        return self.campaigns.invalid + self.service.invalid

    def to_json(self) -> dict[str, Any]:
        c = self.campaigns
        return {"verified": self.verified, "invalid": self.invalid,
                "reconciled_without_receipt": c.reconciled, **c.auditor_json(),
                "invalid_rows": c.invalid_rows + [{"source": "service", "campaign": None, **r}
                                                  for r in self.service.invalid_rows],
                "campaigns": c.to_json(), "service": self.service.to_json()}


def check_ledgers(home: Home, journal: Journal | None, campaign: str | None, *,
                  trust: dict[bytes, bytes] | None,
                  service: Callable[[ReceiptChecker], ServiceT]) -> LedgersCheck[ServiceT]:
    """Every receipt of the campaigns' ledgers in ``journal`` (``campaign``'s alone, when
    given) verified by the home's authority, or, given an auditor's ``trust`` (Q_CA by set
    id), with certificates alone; and the service's ledger, checked by ``service`` with
    the same checker."""
    with ExitStack() as stack:
        checker: ReceiptChecker
        if trust is not None:  # certificates only: no keystore, no passphrase
            checker = CertificatesOnly(trust)
        else:
            ks = home.open_keystore()
            stack.callback(ks.close)
            checker = home.verifier(ks)
        camp = verify_campaigns(journal, ledger_campaigns(home, journal, campaign), checker)
        return LedgersCheck(camp, service(checker))
