"""The service's ledger, checked and exported with the campaigns' (``keyload ledger …``).

Each entry the service recorded (a receipt a field client posted, already verified once
when it came in) is checked again, as a campaign's are:

- the entry must match the export the service recorded for its (SN, R) in the replay
  cache (client, set, REF1, REF2, suite, header, KCV, key version; state receipted);
- its header must parse, with the entry's suite and key version;
- the authority recomputes the unit's receipt over (set, SN, R, REF2, header, KCV); a
  suite-0x03 receipt is the unit's ECDSA signature, verified with the C_U and E_A the
  export recorded (C_U itself under the set's Q_CA).

The receipt binds the header and the KCV; the first two checks bind what it does not
(REF1, the client, the key version column) to what was exported. Nothing here writes to
the state, and a home without ``service.db`` is left without one.

The exports no receipt followed are reported too (:func:`exports_without_receipt`): the
challenges left ``exported`` without a ledger entry (the key left the service; no client
posted the unit's receipt), by client and by age, and those left ``claimed`` (neither
exported nor refused). Like the campaigns' loads reconciled without a receipt, they are
reported, not counted as invalid.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from ..core.errors import StoreError
from ..core.ref1 import display_ref1
from ..records.audit import AuditLog, AuditProblem
from ..records.ledger import Export, LedgerEntry, ReceiptChecker, verify_entries
from ..records.sql import is_postgres_url
from ..records.stored import check_file
from .store import (
    CLAIMED,
    EXPORTED,
    RECEIPTED,
    Challenge,
    PostgresServiceStore,
    SqliteServiceStore,
)

SERVICE_DB = "service.db"


class LedgerSource(Protocol):
    """What verifying needs from a service store (both stores have it)."""

    def ledger(self) -> list[LedgerEntry]: ...

    def challenge(self, sn: bytes, r: bytes) -> Challenge | None: ...

    def unreceipted_exports(self) -> list[tuple[str, str, float]]:
        """(client, state, time) of each challenge left exported or claimed without a
        ledger entry, oldest first."""
        ...


class ServiceState(LedgerSource, Protocol):
    """A service's state opened for reading its ledger."""

    def close(self) -> None: ...


# Age buckets (disjoint): the first whose bound (seconds) is above an export's age.
AGE_BUCKETS: tuple[tuple[str, str, float], ...] = (
    ("under_1h", "< 1 h", 3600.0), ("1h_to_1d", "< 1 day", 86400.0),
    ("1d_to_7d", "< 7 days", 7 * 86400.0), ("7d_or_more", "older", float("inf")))


def iso_utc(t: float) -> str:
    """``t`` (seconds since the epoch) as ISO 8601 in UTC, to the second."""
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def human_age(seconds: float) -> str:
    """An age for people, rounded down to its largest unit: 45s, 3m, 2h, 5d."""
    s = int(max(seconds, 0.0))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


@dataclass
class ClientWithoutReceipt:
    """One client's exports without a receipt: how many, the first and the last."""

    client: str
    count: int
    oldest: float  # when the oldest one's challenge was claimed (seconds since the epoch)
    newest: float

    def to_json(self, now: float) -> dict[str, Any]:
        return {"client": self.client, "count": self.count, "oldest": iso_utc(self.oldest),
                "newest": iso_utc(self.newest), "oldest_age_s": _age(now, self.oldest),
                "newest_age_s": _age(now, self.newest)}


def _age(now: float, t: float) -> float:
    """Seconds from ``t`` to ``now``; 0 for a time ahead of ``now`` (another instance's
    clock, or an export during the check)."""
    return round(max(now - t, 0.0), 3)


@dataclass
class WithoutReceipt:
    """The service's exports no receipt followed, as of ``now``; and the challenges left
    claimed (neither exported nor refused: in flight, or their request died)."""

    now: float
    total: int = 0
    claimed: int = 0
    by_client: list[ClientWithoutReceipt] = field(default_factory=list)
    by_age: dict[str, int] = field(
        default_factory=lambda: {key: 0 for key, _, _ in AGE_BUCKETS})

    @property
    def oldest(self) -> float | None:
        return min((c.oldest for c in self.by_client), default=None)

    @property
    def newest(self) -> float | None:
        return max((c.newest for c in self.by_client), default=None)

    def to_json(self) -> dict[str, Any]:
        return {"total": self.total, "claimed": self.claimed,
                "by_client": [c.to_json(self.now) for c in self.by_client],
                "by_age": dict(self.by_age)}

    HEADERS = ("client", "exports", "oldest", "age", "newest", "age")

    def heading(self) -> list[str]:
        """The line over :meth:`rows` (none when there are no rows)."""
        return [f"{self.total} service exports without receipt (the key left the service, "
                "no receipt was posted), by client:"] if self.total else []

    def rows(self) -> list[list[object]]:
        """A row per client (:data:`HEADERS`) and their total; none when there are none."""
        oldest, newest = self.oldest, self.newest
        if not self.total or oldest is None or newest is None:
            return []
        return [[c.client, c.count, iso_utc(c.oldest), human_age(self.now - c.oldest),
                 iso_utc(c.newest), human_age(self.now - c.newest)]
                for c in self.by_client] + [["total", self.total, iso_utc(oldest),
                                             human_age(self.now - oldest), iso_utc(newest),
                                             human_age(self.now - newest)]]


def exports_without_receipt(rows: Iterable[tuple[str, str, float]],
                            now: float) -> WithoutReceipt:
    """Group ``rows`` ((client, state, time), as :meth:`LedgerSource.unreceipted_exports`
    gives them) by client and by age as of ``now``; rows left claimed are only counted.
    Clients come by count, most first (then by name)."""
    out = WithoutReceipt(now=now)
    seen: dict[str, ClientWithoutReceipt] = {}
    for client, state, t in rows:
        if state == CLAIMED:
            out.claimed += 1
            continue
        if state != EXPORTED:
            continue
        out.total += 1
        c = seen.get(client)
        if c is None:
            seen[client] = ClientWithoutReceipt(client, 1, t, t)
        else:
            c.count, c.oldest, c.newest = c.count + 1, min(c.oldest, t), max(c.newest, t)
        age = now - t
        out.by_age[next(key for key, _, bound in AGE_BUCKETS if age < bound)] += 1
    out.by_client = sorted(seen.values(), key=lambda c: (-c.count, c.client))
    return out


@dataclass
class ServiceLedgerCheck:
    """How many of the service's ledger entries verify; the others, with their reasons;
    and the exports without a receipt."""

    state: str | None = None  # what was checked (a file, or a URL without credentials)
    verified: int = 0
    invalid: int = 0
    invalid_rows: list[dict[str, Any]] = field(default_factory=list)
    without_receipt: WithoutReceipt = field(default_factory=lambda: WithoutReceipt(now=0.0))

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "verified": self.verified, "invalid": self.invalid,
                "invalid_rows": list(self.invalid_rows),
                "without_receipt": self.without_receipt.to_json()}

    def invalid_lines(self) -> list[str]:
        return [f"INVALID receipt: service client {r['client']} unit {r['sn']} slot "
                f"{r['ref2']}: {r['reason']}" for r in self.invalid_rows]

    def lines(self, unchecked: str) -> list[str]:
        """The check for people; ``unchecked``: why, when no ``state`` was checked."""
        if self.state is None:
            return [f"service ledger: not checked ({unchecked})"]
        wr = self.without_receipt
        return [f"service ledger ({self.state}): {self.verified} receipts verified, "
                f"{self.invalid} invalid",
                *([f"service exports without receipt: {wr.total} (" + ", ".join(
                    f"{label}: {wr.by_age[key]}" for key, label, _ in AGE_BUCKETS) + ")"]
                  if wr.total else []),
                *(["service challenges left claimed (never exported nor refused): "
                   f"{wr.claimed}"] if wr.claimed else [])]


def _export(c: Challenge | None) -> Export | None:
    """The export the service recorded for an entry's (SN, R), as the verifier compares it."""
    return None if c is None else Export(
        c.set_id, c.ref1, c.ref2, c.suite, c.key_version, c.kcv, c.header, c.client,
        unreceipted=None if c.state == RECEIPTED else c.state, c_u=c.c_u, e_a=c.e_a)


def verify_service_ledger(store: LedgerSource, checker: ReceiptChecker, *, now: float,
                          state: str | None = None) -> ServiceLedgerCheck:
    """Check every entry of the service's ledger (see the module's docstring), and find
    the exports without a receipt, aged as of ``now`` (seconds since the epoch). Refusals
    by the authority make an entry invalid; a store or keystore failure is raised."""
    chk = verify_entries(store.ledger(), checker,
                         export_of=lambda e: _export(store.challenge(e.sn, e.r or b"")),
                         matched_by="(SN, R)")
    return ServiceLedgerCheck(
        state=state, verified=chk.verified, invalid=chk.invalid,
        invalid_rows=[{"sn": e.sn.hex(), "ref2": e.ref2, "ref1": display_ref1(e.ref1),
                       "set_id": e.set_id.hex(), "r": (e.r or b"").hex(), "client": e.client,
                       "time": e.time, "reason": i.reason}
                      for i in chk.invalid_entries for e in (i.entry,)],
        without_receipt=exports_without_receipt(store.unreceipted_exports(), now))


def service_ledger(store: LedgerSource) -> Iterator[dict[str, Any]]:
    """The service's ledger in the export's shape
    (:data:`~keyload.records.ledger.LEDGER_FIELDS`)."""
    for e in store.ledger():
        yield e.to_row(display_ref1(e.ref1))


# -- opening the state, for reading -----------------------------------------------------
def describe_state(state: str | None, home_root: Path) -> str:
    """The state for people: a file's path, or a URL without user, password or query."""
    if not is_postgres_url(state):
        return str(Path(state) if state else home_root / SERVICE_DB)
    assert state is not None
    u = urlsplit(state)
    try:
        port = f":{u.port}" if u.port else ""
    except ValueError:
        port = ""
    host = u.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{u.scheme}://{host}{port}{u.path}"


def _check_sqlite_state(path: Path) -> None:
    """``path`` is a database with the service's ledger, looked at read-only (so that a
    wrong file is not given the service's tables by opening it as the state)."""
    if not path.is_file():
        raise StoreError(f"no service state at {path}")
    check_file(path)
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            names = {n for (n,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()}
        finally:
            db.close()
    except sqlite3.Error:
        raise StoreError(f"{path} is not a readable database") from None
    if not {"ledger", "challenges"} <= names:
        raise StoreError(f"{path} is not a keyload service state")


def open_service_state(state: str | None, home_root: Path,
                       audit_path: Path) -> ServiceState | None:
    """The service's state for reading its ledger, or None when ``state`` is not given
    and the home has no ``service.db`` (nothing is created then). ``state``: a
    ``postgresql://`` URL or a SQLite file, which must exist (StoreError otherwise)."""
    if is_postgres_url(state):
        assert state is not None
        return PostgresServiceStore(state)
    path = Path(state) if state else home_root / SERVICE_DB
    if state is None and not path.exists():
        return None
    _check_sqlite_state(path)
    audit = AuditLog(audit_path, actor="service")
    try:
        return SqliteServiceStore(path, audit)
    except BaseException:
        audit.close()
        raise


def service_exports(home_root: Path, audit_path: Path) -> list[tuple[Any, ...]]:
    """The exports the home's service state accounts for in its ledger, as (set id, SN,
    REF1, REF2, KCV); none without a ``service.db``."""
    state = open_service_state(None, home_root, audit_path)
    if state is None:
        return []
    try:
        return [(e.set_id, e.sn, e.ref1, e.ref2, e.kcv) for e in state.ledger()]
    finally:
        state.close()


def ledger_state(state: str | None, home_root: Path, audit_path: Path, *,
                 campaign_only: bool, ensure: Callable[[], None]) -> ServiceState | None:
    """The service's state when the ledger commands include it: ``state`` given (the
    home ``ensure``d first), or no campaign named and the home has a ``service.db``."""
    if campaign_only and state is None:
        return None
    if state is not None:
        ensure()
    return open_service_state(state, home_root, audit_path)


def verify_audit(state: str | None, audit_path: Path,
                 open_audit: Callable[[], AuditLog]) -> tuple[int, list[AuditProblem]]:
    """(records, problems) of the audit chain: the services' in their shared PostgreSQL
    ``state``, else the home's (``open_audit``), which must exist."""
    if is_postgres_url(state):
        assert state is not None
        pg = PostgresServiceStore(state)
        try:
            return pg.verify_audit()
        finally:
            pg.close()
    if not audit_path.exists():
        raise StoreError(f"no audit log at {audit_path}")
    audit = open_audit()
    try:
        return audit.verify()
    finally:
        audit.close()
