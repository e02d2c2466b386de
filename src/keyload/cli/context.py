"""Where things live under a keyload home directory, and how secrets are read."""

from __future__ import annotations

import getpass
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import StoreError
from ..core.keys import KeyComponents, aes_kcv
from ..core.secret import Secret
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
            from ..core.errors import DamagedStore

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
        return Authority(ks, log=AuditedExportLog(audit or self.audit(), log))

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
        from ..core.errors import StoreError

        raise StoreError("the PKCS#11 backend needs python-pkcs11: pip install "
                         "'keyload[pkcs11]'") from None
    if cfg.get("softhsm2_conf"):  # a private SoftHSM2 token: its config must be known
        os.environ["SOFTHSM2_CONF"] = str(cfg["softhsm2_conf"])
    return Pkcs11Keystore.open(str(cfg["module"]), str(cfg["token"]), pin=pin,
                               clear_sas=bool(cfg.get("clear_sas", False)))


def read_secret_hex(prompt: str, *, length: int | None = None) -> Secret:
    """One hex value from the terminal (not echoed) or one line of stdin."""
    if sys.stdin.isatty():
        text = getpass.getpass(prompt)
    else:
        text = sys.stdin.readline()
        if not text:
            raise ValueError(f"no input for: {prompt.strip()}")
    text = text.strip().replace(" ", "")
    try:
        raw = bytearray.fromhex(text)
    except ValueError:
        raise ValueError("a key value must be hex digits") from None
    finally:
        text = ""
    if length is not None and len(raw) != length:
        n = len(raw)
        raw[:] = bytes(n)
        raise ValueError(f"expected {length} bytes, got {n}")
    s = Secret(raw)
    raw[:] = bytes(len(raw))
    return s


def read_components(count: int, length: int | None, *,
                    kcv_of: Callable[[bytearray], bytes] = aes_kcv,
                    show: bool | None = None) -> tuple[Secret, list[bytes]]:
    """XOR of ``count`` hex components read here, each shown with its KCV (a key ceremony);
    what is refused is :class:`~keyload.core.keys.KeyComponents`'s to say."""
    components = KeyComponents(count, kcv_of=kcv_of)
    if show is None:  # at a terminal, each KCV right after its component is typed
        show = sys.stdin.isatty()
    for i in range(1, count + 1):
        k = components.add(read_secret_hex(f"component {i} of {count} (hex): ", length=length))
        if show:
            sys.stderr.write(f"component {i} KCV: {k.hex().upper()}\n")
    return components.combined()


def require(path: Path, what: str) -> None:
    if not path.exists():
        raise StoreError(f"no {what} at {path}")
