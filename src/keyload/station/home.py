"""A keyload home directory: where the authority, the emulated units and the station's
records live, and the authority made or opened there."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import DamagedStore, StoreError
from ..records.audit import AuditedExportLog, AuditLog
from ..records.exportlog import SqliteExportLog
from ..units.authority import Authority, AuthorityBackend
from ..units.keystore import SoftwareKeystore
from ..units.storage import KekSource, atomic_write, ensure_private_dir

if TYPE_CHECKING:
    from ..units.pkcs11 import Pkcs11Keystore

    Keystore = SoftwareKeystore | Pkcs11Keystore
else:
    Keystore = Any

BACKEND_FILE = "backend.json"

ENV_HOME = "KEYLOAD_HOME"
DEFAULT_HOME = "keyload-home"


@dataclass(frozen=True)
class Home:
    """``authority/`` (keystore, export records), ``units/`` (emulated units),
    ``station.db`` (download records with receipts)."""

    root: Path
    source: KekSource

    @classmethod
    def resolve(cls, home: str | None, source: KekSource | None = None) -> Home:
        root = Path(home or os.environ.get(ENV_HOME) or DEFAULT_HOME)
        if root.exists() and not root.is_dir():
            raise StoreError(f"home {root} is a file, not a directory")
        return cls(root, source or KekSource.from_env())

    @property
    def authority_dir(self) -> Path:
        return self.root / "authority"

    @property
    def units_dir(self) -> Path:
        return self.root / "units"

    @property
    def station_db(self) -> Path:
        return self.root / "station.db"

    def ensure(self) -> None:
        ensure_private_dir(self.root)

    def existing(self) -> None:
        """Refuse a home that is not there (a command that reads creates none)."""
        if not self.root.is_dir():
            raise StoreError(f"no keyload home at {self.root}")

    def backend_config(self) -> dict[str, Any]:
        """``authority/backend.json``: which backend holds the keys (software by default)."""
        path = self.authority_dir / BACKEND_FILE
        if not path.exists():
            return {"backend": "software"}
        try:
            cfg = json.loads(path.read_text())
            if not isinstance(cfg, dict) or cfg.get("backend") not in ("software", "pkcs11"):
                raise ValueError("backend")
        except ValueError:
            raise DamagedStore(f"{path} is damaged") from None
        return cfg

    def write_backend_config(self, cfg: dict[str, Any]) -> None:
        ensure_private_dir(self.authority_dir)
        atomic_write(self.authority_dir / BACKEND_FILE, json.dumps(cfg, indent=1).encode())

    def open_keystore(self) -> Keystore:
        cfg = self.backend_config()
        if cfg["backend"] == "pkcs11":
            return open_pkcs11(cfg)
        return SoftwareKeystore.open(self.authority_dir, self.source)

    def create_authority(self, pkcs11: dict[str, Any] | None = None, *,
                         pin: str | None = None) -> Keystore:
        """A new authority in this home: a sealed software keystore; or, given a
        ``backend.json``'s settings, a PKCS#11 token, opened (module, token and PIN
        checked) before its settings are written. Refused when an authority is here."""
        backend = self.authority_dir / BACKEND_FILE
        if pkcs11 is not None:
            if backend.exists() or (self.authority_dir / "vault.json").exists():
                raise StoreError(f"an authority already exists in {self.authority_dir}")
            p11 = open_pkcs11(pkcs11, pin=pin)
            self.write_backend_config(pkcs11)
            return p11
        if backend.exists():
            raise StoreError(f"an authority already exists in {self.authority_dir} (its "
                             "keys are in a PKCS#11 token: backend.json)")
        return SoftwareKeystore.create(self.authority_dir, self.source)

    @property
    def journal_path(self) -> Path:
        return self.root / "journal.db"

    @property
    def audit_path(self) -> Path:
        return self.root / "audit.db"

    def audit(self) -> AuditLog:
        self.ensure()
        return AuditLog(self.audit_path, actor="station")

    def authority(self, ks: AuthorityBackend, audit: AuditLog | None = None) -> Authority:
        """The authority role over ``ks``: exports recorded, and chained into the audit log."""
        log = SqliteExportLog(self.authority_dir / "exports.db")
        # the export records' database is the register of served challenges (§10.4) too:
        # every process of this home refuses a challenge another has served
        return Authority(ks, log=AuditedExportLog(audit or self.audit(), log), served=log)

    @staticmethod
    def verifier(ks: AuthorityBackend) -> Authority:
        """The authority role that only checks receipts: it exports nothing, so it opens
        no export records and no audit log (a command that reads creates neither)."""
        return Authority(ks)


def open_pkcs11(cfg: dict[str, Any], *, pin: str | None = None) -> Pkcs11Keystore:
    """Open the PKCS#11 keystore a ``backend.json`` names (PIN: ``$KEYLOAD_PKCS11_PIN``)."""
    try:
        from ..units.pkcs11 import Pkcs11Keystore
    except ImportError:
        raise StoreError("the PKCS#11 backend needs python-pkcs11: pip install "
                         "'keyload[pkcs11]'") from None
    if cfg.get("softhsm2_conf"):  # a private SoftHSM2 token: its config must be known
        os.environ["SOFTHSM2_CONF"] = str(cfg["softhsm2_conf"])
    return Pkcs11Keystore.open(str(cfg["module"]), str(cfg["token"]), pin=pin,
                               clear_sas=bool(cfg.get("clear_sas", False)))
