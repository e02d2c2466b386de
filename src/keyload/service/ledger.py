"""The service's ledger, checked and exported with the campaigns' (``keyload ledger …``).

Each entry the service recorded (a receipt a field client posted, already verified once
when it came in) is checked again, as a campaign's are:

- the entry must match the export the service recorded for its (SN, R) in the replay
  cache (client, set, REF1, REF2, suite, header, KCV, key version; state receipted);
- its header must parse, with the entry's suite and key version;
- the authority recomputes the unit's receipt over (set, SN, R, REF2, header, KCV).

The receipt binds the header and the KCV; the first two checks bind what it does not
(REF1, the client, the key version column) to what was exported. Nothing here writes to
the state, and a home without ``service.db`` is left without one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from ..core.errors import MalformedData, StatusError, StoreError
from ..core.keys import KeyHeader
from ..station.audit import AuditLog
from ..station.pgserver import is_postgres_url
from ..units.authority import Authority
from ..units.keystore import display_ref1
from .store import RECEIPTED, Challenge, LedgerEntry, ServiceStore, open_store

SERVICE_DB = "service.db"
KCV_LEN = 5
R_LEN = 16


class LedgerSource(Protocol):
    """What verifying needs from a service store (both stores have it)."""

    def ledger(self) -> list[LedgerEntry]: ...

    def challenge(self, sn: bytes, r: bytes) -> Challenge | None: ...


@dataclass
class ServiceLedgerCheck:
    """How many of the service's ledger entries verify; the others, with their reasons."""

    state: str | None = None  # what was checked (a file, or a URL without credentials)
    verified: int = 0
    invalid: int = 0
    invalid_rows: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "verified": self.verified, "invalid": self.invalid,
                "invalid_rows": list(self.invalid_rows)}


def entry_problems(e: LedgerEntry, export: Challenge | None,
                   authority: Authority) -> list[str]:
    """Why ``e`` is not a genuine, consistent ledger entry (empty when it is)."""
    out: list[str] = []
    if export is None:
        out.append("no export recorded for this (SN, R)")
    else:
        if export.state != RECEIPTED:
            out.append(f"the export is {export.state}, not receipted")
        differ = [name for name, mine, theirs in (
            ("client", e.client, export.client), ("set_id", e.set_id, export.set_id),
            ("ref1", e.ref1, export.ref1), ("ref2", e.ref2, export.ref2),
            ("suite", e.suite, export.suite), ("header", e.header, export.header),
            ("kcv", e.kcv, export.kcv), ("key_version", e.key_version, export.key_version),
        ) if mine != theirs]
        if differ:
            out.append("differs from the export: " + ", ".join(differ))
    if len(e.kcv) != KCV_LEN:
        out.append(f"KCV is {len(e.kcv)} bytes, not {KCV_LEN}")
    try:
        h = KeyHeader.decode(e.header)
        if h.suite != e.suite:
            out.append("header suite differs from the entry's")
        if h.version != e.key_version:
            out.append("header version differs from the entry's key version")
    except MalformedData:
        out.append("header malformed")
    if len(e.r) != R_LEN:
        out.append(f"R is {len(e.r)} bytes, not {R_LEN}")
    try:
        authority.verify_receipt(suite=e.suite, set_id=e.set_id, sn=e.sn, r=e.r, ref2=e.ref2,
                                 h=e.header, kcv=e.kcv, rct=e.rct)
    except StatusError as err:
        out.append(f"receipt does not verify (SW {err.sw:04X})")
    return out


def verify_service_ledger(store: LedgerSource, authority: Authority, *,
                          state: str | None = None) -> ServiceLedgerCheck:
    """Check every entry of the service's ledger (see the module's docstring). Refusals
    by the authority make an entry invalid; a store or keystore failure is raised."""
    out = ServiceLedgerCheck(state=state)
    for e in store.ledger():
        problems = entry_problems(e, store.challenge(e.sn, e.r), authority)
        if not problems:
            out.verified += 1
            continue
        out.invalid += 1
        out.invalid_rows.append({"sn": e.sn.hex(), "ref2": e.ref2, "ref1": display_ref1(e.ref1),
                                 "set_id": e.set_id.hex(), "r": e.r.hex(), "client": e.client,
                                 "time": e.time, "reason": "; ".join(problems)})
    return out


def service_ledger_entry(e: LedgerEntry) -> dict[str, Any]:
    """One service entry in the export's shape (:data:`~keyload.station.report.LEDGER_FIELDS`)."""
    return {"campaign": None, "sn": e.sn.hex(), "ref2": e.ref2, "ref1": display_ref1(e.ref1),
            "key_version": e.key_version, "kcv": e.kcv.hex().upper(), "suite": e.suite,
            "r": e.r.hex(), "header": e.header.hex(), "receipt": e.rct.hex(),
            "reconciled": False, "station": None, "time": e.time, "source": "service",
            "client": e.client, "set_id": e.set_id.hex()}


def service_ledger(store: LedgerSource) -> Iterator[dict[str, Any]]:
    for e in store.ledger():
        yield service_ledger_entry(e)


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
                       audit_path: Path) -> ServiceStore | None:
    """The service's state for reading its ledger, or None when ``state`` is not given
    and the home has no ``service.db`` (nothing is created then). ``state``: a
    ``postgresql://`` URL or a SQLite file, which must exist (StoreError otherwise)."""
    if is_postgres_url(state):
        return open_store(state, home_root, None)
    path = Path(state) if state else home_root / SERVICE_DB
    if state is None and not path.exists():
        return None
    _check_sqlite_state(path)
    audit = AuditLog(audit_path, actor="service")
    try:
        return open_store(str(path), home_root, audit)
    except BaseException:
        audit.close()
        raise
