"""Helpers for running the real ``keyload`` console script in subprocesses.

Nothing here imports keyload: the tests compute check values with ``cryptography`` and
the standard library only, so they check the CLI against an independent computation.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import cmac
from cryptography.hazmat.primitives.ciphers import algorithms

KEYLOAD = Path(sys.executable).with_name("keyload")
PASSPHRASE = "integration-test passphrase"
SEAL_MAGIC = b"KLSEAL1\x00"
TIMEOUT_S = 120


# -- check values, computed independently of keyload ------------------------------------
def aes_kcv(key: bytes) -> str:
    """Leftmost 5 bytes of AES-CMAC(key, 16 zero bytes), upper-case hex (docs/protocol.md §2)."""
    c = cmac.CMAC(algorithms.AES(key))
    c.update(bytes(16))
    return c.finalize()[:5].hex().upper()


def hmac_kcv(key: bytes) -> str:
    """Leftmost 5 bytes of HMAC-SHA256(key, 16 zero bytes), upper-case hex."""
    return hmac.new(key, bytes(16), hashlib.sha256).digest()[:5].hex().upper()


def xor(*parts: bytes) -> bytes:
    out = bytearray(len(parts[0]))
    for p in parts:
        assert len(p) == len(out)
        for i, b in enumerate(p):
            out[i] ^= b
    return bytes(out)


def secret_forms(value: bytes) -> list[str]:
    """The textual forms a leaked secret could take in CLI output."""
    return [value.hex(), value.hex().upper()]


def secret_byte_forms(value: bytes) -> list[bytes]:
    """The forms a secret could take in a file at rest: raw, hex lower and upper."""
    return [value, value.hex().encode(), value.hex().upper().encode()]


# -- running the CLI ---------------------------------------------------------------------
@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    rc: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def json(self) -> Any:
        return json.loads(self.stdout)

    def last_line(self) -> str:
        lines = self.stdout.rstrip("\n").splitlines()
        return lines[-1] if lines else ""

    def describe(self) -> str:
        return (f"keyload {' '.join(self.args)} -> rc={self.rc}\n--- stdout ---\n"
                f"{self.stdout}--- stderr ---\n{self.stderr}")


def cli_env(passphrase: str | None = PASSPHRASE, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("KEYLOAD_HOME", "KEYLOAD_KEK", "KEYLOAD_PASSPHRASE"):
        env.pop(name, None)
    if passphrase is not None:
        env["KEYLOAD_PASSPHRASE"] = passphrase
    env.update(extra)
    return env


def run(*args: str | os.PathLike[str], home: Path | None = None, input: str | None = None,
        passphrase: str | None = PASSPHRASE, cwd: Path | None = None,
        env_extra: dict[str, str] | None = None) -> Result:
    """Run ``keyload ARGS [--home HOME]``; stdin is ``input`` or /dev/null."""
    argv = [str(a) for a in args]
    if home is not None:
        argv += ["--home", str(home)]
    kwargs: dict[str, Any] = {"input": input} if input is not None else {
        "stdin": subprocess.DEVNULL}
    proc = subprocess.run([str(KEYLOAD), *argv], capture_output=True, text=True,
                          env=cli_env(passphrase, **(env_extra or {})),
                          cwd=cwd, timeout=TIMEOUT_S, check=False, **kwargs)
    return Result(tuple(argv), proc.returncode, proc.stdout, proc.stderr)


def ok(res: Result) -> Result:
    """Assert success and no traceback; return the result for chaining."""
    assert res.rc == 0, res.describe()
    assert "Traceback" not in res.output, res.describe()
    return res


def assert_error(res: Result, code: int, *needles: str, stdout_empty: bool = True) -> str:
    """Exit ``code``, exactly one stderr line ``keyload: error: ...`` holding every needle,
    no traceback anywhere; nothing on stdout, or with ``--json`` only the error as JSON
    (``{"error": {"code", "message", "exit"}}``, the message the line's). Returns the
    error line."""
    assert res.rc == code, res.describe()
    assert "Traceback" not in res.output, res.describe()
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.describe()
    assert lines[0].startswith("keyload: error: "), res.describe()
    for n in needles:
        assert n in lines[0], f"{n!r} not in error line\n{res.describe()}"
    if stdout_empty and "--json" in res.args:
        err = json.loads(res.stdout)["error"]
        assert err == {"code": err["code"], "exit": code,
                       "message": lines[0].removeprefix("keyload: error: ")}, res.describe()
        assert err["code"] and " " not in err["code"], res.describe()
    elif stdout_empty:
        assert res.stdout == "", res.describe()
    return lines[0]


def assert_no_secrets(text: str, secrets: dict[str, bytes]) -> None:
    for name, value in secrets.items():
        for form in secret_forms(value):
            assert form not in text, f"secret {name} appears in output"


def tree_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())
