"""Assembling one service instance: authority over a keystore, state store, policy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..station.audit import AuditLog
from ..units.authority import Authority, AuthorityBackend
from ..units.exportlog import SqliteExportLog
from .app import ServiceApp
from .policy import Policy
from .store import ServiceStore, open_store


@dataclass
class Instance:
    """A ready :class:`ServiceApp` and what to close after the server stops."""

    app: ServiceApp
    store: ServiceStore
    exports: SqliteExportLog

    def close(self) -> None:
        self.store.close()
        self.exports.close()


def open_instance(backend: AuthorityBackend, policy: Policy, *, home_root: Path,
                  authority_dir: Path, audit_path: Path, state: str | None = None,
                  instance: str = "keyload") -> Instance:
    """The authority records each export in ``authority_dir/exports.db`` (as ``keyload
    load`` does, so ``keyload authority exports`` lists them); the service records the
    request, the challenge and the ledger in its store (SQLite ``HOME/service.db`` with
    the home's audit chain, or PostgreSQL for several instances)."""
    pg = bool(state and state.startswith(("postgresql://", "postgres://")))
    audit = None if pg else AuditLog(audit_path, actor="service")
    store = open_store(state, home_root, audit)
    exports = SqliteExportLog(authority_dir / "exports.db")
    authority = Authority(backend, log=exports)
    return Instance(ServiceApp(authority, store, policy, instance=instance), store, exports)
