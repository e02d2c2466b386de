"""Files at rest: atomic writes and sealed (encrypted) stores.

Every secret keyload keeps on disk is sealed with AES-256-GCM under a key-encryption key
(KEK). A *vault* is a directory whose ``vault.json`` says where the KEK comes from:

- ``scrypt``: derived from a passphrase (``KEYLOAD_PASSPHRASE``, or asked at the terminal)
  with scrypt (N=2^15, r=8, p=1 by default; a fresh 16-byte salt per vault);
- ``raw``: 32 bytes given in hex by ``KEYLOAD_KEK`` (for a KEK held by a key manager).

``vault.json`` also holds a 5-byte check value of the KEK so that a wrong passphrase is
told apart from a damaged file. Sealed files carry a magic, a kind and a fresh 96-bit
nonce; the kind is authenticated, so a file cannot be passed off as another kind.

Writes are atomic: temp file in the same directory, ``fsync``, ``rename``, ``fsync`` of
the directory. A crash leaves either the old or the new file, never a mix. Files are
mode 0600, directories 0700.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..core.errors import DamagedStore, StoreError, WrongPassphrase
from ..core.keys import aes_kcv
from ..core.primitives import ct_equal
from ..core.secret import Secret, scrub

MAGIC = b"KLSEAL1\x00"
VAULT_FILE = "vault.json"
ENV_PASSPHRASE = "KEYLOAD_PASSPHRASE"
ENV_KEK = "KEYLOAD_KEK"
SCRYPT_N = 2**15


def ensure_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp, fsync, rename, fsync dir).

    ``durable=False`` skips the fsyncs: still atomic (old or new file after a crash of the
    process), but the newest content may be lost on a power failure.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass(frozen=True, repr=False)
class KekSource:
    """Where a vault's KEK comes from when none is given explicitly."""

    passphrase: str | None = None
    kek_hex: str | None = None
    interactive: bool = False

    def __repr__(self) -> str:
        """Says which sources are set, never their values (a ``Home`` or a traceback
        that prints this object must not show the passphrase or the KEK)."""
        def shown(v: str | None) -> str:
            return "<set>" if v else "<unset>"

        return (f"KekSource(passphrase={shown(self.passphrase)}, kek={shown(self.kek_hex)}, "
                f"interactive={self.interactive})")

    @classmethod
    def from_env(cls) -> KekSource:
        return cls(passphrase=os.environ.get(ENV_PASSPHRASE), kek_hex=os.environ.get(ENV_KEK),
                   interactive=sys.stdin.isatty())

    def get_passphrase(self, *, confirm: bool = False) -> str:
        if self.passphrase:
            return self.passphrase
        if self.interactive:
            p = getpass.getpass("keyload passphrase: ")
            if confirm and getpass.getpass("again: ") != p:
                raise StoreError("the passphrases differ")
            if not p:
                raise WrongPassphrase("empty passphrase")
            return p
        raise WrongPassphrase(f"no passphrase: set {ENV_PASSPHRASE} (or {ENV_KEK}), or run "
                              "at a terminal")

    def get_raw_kek(self) -> Secret:
        if not self.kek_hex:
            raise WrongPassphrase(f"this vault needs its KEK in {ENV_KEK}")
        try:  # a malformed value is an input error (never shown), not a wrong KEK
            raw = bytes.fromhex(self.kek_hex)
        except ValueError:
            raise ValueError(f"{ENV_KEK} must be 64 hex digits") from None
        if len(raw) != 32:
            raise ValueError(f"{ENV_KEK} must be 64 hex digits")
        return Secret.take(raw)


SCRYPT_BOUNDS = "N a power of two in 2^10..2^20, r in 1..16, p in 1..16, 128·N·r ≤ 1 GiB"


def scrypt_params_ok(n: int, r: int, p: int) -> bool:
    """Whether scrypt parameters are within :data:`SCRYPT_BOUNDS` (a vault.json that asks
    for more is refused as damaged rather than allowed to exhaust memory or time)."""
    return (1 << 10 <= n <= 1 << 20 and n & (n - 1) == 0 and 1 <= r <= 16 and
            1 <= p <= 16 and 128 * n * r <= 1 << 30)


def _utf8(passphrase: str) -> bytes:
    try:
        return passphrase.encode("utf-8")
    except UnicodeEncodeError:  # bytes from the environment that are not UTF-8
        raise ValueError("the passphrase is not valid UTF-8") from None


def _scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int) -> Secret:
    pw = _utf8(passphrase)
    out = bytearray(32)
    Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive_into(pw, out)
    s = Secret(out)
    out[:] = bytes(32)
    return s


def pack(meta: dict[str, Any], secrets: list[Secret]) -> bytearray:
    """``[len]32 || JSON || ([len]16 || secret)*``: secrets never pass through text."""
    j = json.dumps(meta, sort_keys=True).encode()
    out = bytearray(len(j).to_bytes(4, "big"))
    out += j
    for s in secrets:
        out += len(s).to_bytes(2, "big")
        out += s.buffer
    return out


def unpack(data: bytes, *, name: str = "store") -> tuple[dict[str, Any], list[Secret]]:
    try:
        n = int.from_bytes(data[:4], "big")
        meta = json.loads(data[4 : 4 + n])
        if not isinstance(meta, dict):
            raise ValueError("not an object")
        secrets: list[Secret] = []
        i = 4 + n
        while i < len(data):
            ln = int.from_bytes(data[i : i + 2], "big")
            if i + 2 + ln > len(data):
                raise ValueError("truncated secret")
            secrets.append(Secret(memoryview(data)[i + 2 : i + 2 + ln]))
            i += 2 + ln
    except (ValueError, UnicodeDecodeError):
        raise DamagedStore(f"{name} is damaged") from None
    return meta, secrets


class Vault:
    """A directory of sealed files sharing one KEK (derived once per process)."""

    def __init__(self, directory: Path, kek: Secret) -> None:
        self.directory = directory
        self._kek = kek
        self._aead = AESGCM(kek.buffer)

    @staticmethod
    def exists(directory: Path) -> bool:
        return (directory / VAULT_FILE).is_file()

    @classmethod
    def create(cls, directory: Path, source: KekSource | None = None, *,
               scrypt_n: int | None = None) -> Vault:
        src = source or KekSource.from_env()
        ensure_private_dir(directory)
        if cls.exists(directory):
            raise StoreError(f"a vault already exists in {directory}")
        if src.kek_hex:
            kek = src.get_raw_kek()
            meta: dict[str, Any] = {"format": "keyload-vault-1", "kdf": "raw"}
        else:
            salt = os.urandom(16)
            n = scrypt_n or SCRYPT_N
            kek = _scrypt(src.get_passphrase(confirm=True), salt, n, 8, 1)
            meta = {"format": "keyload-vault-1", "kdf": "scrypt", "salt": salt.hex(),
                    "n": n, "r": 8, "p": 1}
        meta["check"] = aes_kcv(kek.buffer).hex()
        atomic_write(directory / VAULT_FILE, json.dumps(meta, indent=1).encode())
        return cls(directory, kek)

    @classmethod
    def open(cls, directory: Path, source: KekSource | None = None) -> Vault:
        src = source or KekSource.from_env()
        path = directory / VAULT_FILE
        try:
            meta = json.loads(path.read_bytes())
            kdf = meta["kdf"]
            check = bytes.fromhex(meta["check"])
            if meta.get("format") != "keyload-vault-1":
                raise ValueError("format")
        except FileNotFoundError:
            raise StoreError(f"no keyload store in {directory}") from None
        except (ValueError, KeyError, TypeError):
            raise DamagedStore(f"{path} is damaged") from None
        if kdf == "raw":
            kek = src.get_raw_kek()
        elif kdf == "scrypt":
            try:
                salt, n, r, p = (bytes.fromhex(meta["salt"]), int(meta["n"]), int(meta["r"]),
                                 int(meta["p"]))
            except (ValueError, KeyError, TypeError):
                raise DamagedStore(f"{path} is damaged") from None
            if not scrypt_params_ok(n, r, p):
                raise DamagedStore(f"{path} is damaged: scrypt parameters out of bounds "
                                   f"({SCRYPT_BOUNDS})")
            passphrase = src.get_passphrase()
            _utf8(passphrase)  # a clear input error, before anything else
            try:
                kek = _scrypt(passphrase, salt, n, r, p)
            except (ValueError, MemoryError):
                raise DamagedStore(f"{path} is damaged") from None
        else:
            raise DamagedStore(f"{path}: unknown KEK source {kdf!r}")
        if not ct_equal(aes_kcv(kek.buffer), check):
            kek.wipe()
            raise WrongPassphrase(f"wrong passphrase or KEK for {directory}")
        return cls(directory, kek)

    def seal(self, kind: str, plaintext: bytes | bytearray) -> bytes:
        k = kind.encode()
        nonce = os.urandom(12)
        head = MAGIC + bytes((len(k),)) + k
        return head + nonce + self._aead.encrypt(nonce, plaintext, head)

    def unseal(self, kind: str, blob: bytes, *, name: str = "file") -> bytes:
        k = kind.encode()
        head = MAGIC + bytes((len(k),)) + k
        if len(blob) < len(head) + 12 + 16 or not blob.startswith(head):
            raise DamagedStore(f"{name} is not a sealed {kind} store, or is truncated")
        nonce = blob[len(head) : len(head) + 12]
        try:
            return self._aead.decrypt(nonce, blob[len(head) + 12 :], head)
        except InvalidTag:
            raise DamagedStore(f"{name} is damaged (authentication failed)") from None

    def write(self, filename: str, kind: str, plaintext: bytes | bytearray) -> None:
        atomic_write(self.directory / filename, self.seal(kind, plaintext))

    def read(self, filename: str, kind: str) -> bytes:
        path = self.directory / filename
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"{path} does not exist") from None
        return self.unseal(kind, blob, name=str(path))

    def write_packed(self, filename: str, kind: str, meta: dict[str, Any],
                     secrets: list[Secret]) -> None:
        """Seal ``meta`` (JSON, no secrets) and ``secrets`` (binary, wiped after sealing)."""
        buf = pack(meta, secrets)
        try:
            self.write(filename, kind, buf)
        finally:
            buf[:] = bytes(len(buf))

    def read_packed(self, filename: str, kind: str) -> tuple[dict[str, Any], list[Secret]]:
        plain = self.read(filename, kind)
        try:
            return unpack(plain, name=str(self.directory / filename))
        finally:
            scrub(plain)

    def close(self) -> None:
        self._kek.wipe()
