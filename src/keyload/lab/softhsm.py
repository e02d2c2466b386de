"""A private SoftHSM2 token for tests, demos and benchmarks.

SoftHSM2 reads its configuration file when the module is initialized (C_Initialize), from the
``SOFTHSM2_CONF`` environment variable; python-pkcs11 loads a module once per process
(``pkcs11.lib(path)`` is cached by path). So the order is fixed:

1. :func:`make_token` writes ``softhsm2.conf`` and a private token directory (mode 0700)
   in a directory of your choice, initializes a token with ``softhsm2-util``, and sets
   ``os.environ["SOFTHSM2_CONF"]`` (``activate=True``, the default);
2. only then open a :class:`~keyload.units.pkcs11.Pkcs11Keystore` (which loads the module).

Make every token first, in the *same* directory (``make_token(d, label="other")``):
SoftHSM lists its tokens at C_Initialize, so a token made later, or in another directory,
is seen only after :func:`keyload.units.pkcs11.reinitialize` (C_Finalize + C_Initialize,
which re-reads ``SOFTHSM2_CONF`` and ends every session and login of the module in this
process).

What is and is not enforced: the PINs are passed to ``softhsm2-util`` on its command line
(visible in the process list of this machine for the duration of the call): this helper
is for test and demo tokens, never for a production HSM.

>>> import tempfile
>>> from pathlib import Path
>>> if softhsm_available():
...     tok = make_token(Path(tempfile.mkdtemp()), label="doc", activate=False)
...     tok.label
... else:
...     'doc'
'doc'
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import StoreError

SOFTHSM_MODULE_PATHS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
CONF_NAME = "softhsm2.conf"
TOKEN_DIR = "tokens"


class SoftHsmError(StoreError):
    """SoftHSM2 is missing, or a token could not be made."""


@dataclass(frozen=True, slots=True)
class SoftHsmToken:
    """Where a private SoftHSM2 token lives and how to reach it."""

    module: str
    conf: Path
    label: str
    user_pin: str
    so_pin: str

    def env(self) -> dict[str, str]:
        """The environment a subprocess (``pkcs11-tool``) needs to see this token."""
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}


def find_module() -> str | None:
    """The SoftHSM2 PKCS#11 module on this machine, or None.

    ``KEYLOAD_SOFTHSM_MODULE`` overrides the usual Debian paths.
    """
    env = os.environ.get("KEYLOAD_SOFTHSM_MODULE")
    candidates = (env,) if env else SOFTHSM_MODULE_PATHS
    for p in candidates:
        if p and Path(p).is_file():
            return p
    return None


def softhsm_available() -> bool:
    """True when the SoftHSM2 module is present and ``softhsm2-util`` is on PATH."""
    return find_module() is not None and shutil.which("softhsm2-util") is not None


def softhsm_missing_reason() -> str:
    """Why :func:`softhsm_available` is False (for a test skip), or ``""``."""
    missing = []
    if find_module() is None:
        missing.append("the SoftHSM2 module (Debian: apt-get install softhsm2)")
    if shutil.which("softhsm2-util") is None:
        missing.append("softhsm2-util on PATH")
    return "missing " + " and ".join(missing) if missing else ""


def write_conf(directory: Path) -> Path:
    """Write ``softhsm2.conf`` with a private token directory (0700) in ``directory``.

    Idempotent: an existing configuration (and the tokens in it) are kept.
    """
    directory.mkdir(parents=True, exist_ok=True)
    tokendir = directory / TOKEN_DIR
    tokendir.mkdir(mode=0o700, exist_ok=True)
    tokendir.chmod(0o700)
    conf = directory / CONF_NAME
    if not conf.exists():
        text = (f"directories.tokendir = {tokendir}/\n"
                "objectstore.backend = file\n"
                "log.level = ERROR\n"
                "slots.removable = false\n"
                "slots.mechanisms = ALL\n"
                "library.reset_on_fork = false\n")
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return conf


def token_labels(conf: Path) -> list[str]:
    """Labels of the initialized tokens of the SoftHSM2 configuration ``conf``."""
    util = shutil.which("softhsm2-util")
    if util is None:
        raise SoftHsmError(softhsm_missing_reason())
    proc = subprocess.run([util, "--show-slots"], env={**os.environ, "SOFTHSM2_CONF": str(conf)},
                          capture_output=True, text=True, check=False, timeout=60)
    if proc.returncode != 0:
        raise SoftHsmError(f"softhsm2-util --show-slots failed: {proc.stderr.strip()}")
    labels, initialized = [], False
    for line in proc.stdout.splitlines():
        key, _, val = line.strip().partition(":")
        if key == "Initialized":
            initialized = val.strip() == "yes"
        elif key == "Label" and initialized and val.strip():
            labels.append(val.strip())
    return labels


def make_token(directory: Path, *, label: str = "keyload", user_pin: str = "1234",
               so_pin: str = "12345678", activate: bool = True) -> SoftHsmToken:
    """Make a fresh SoftHSM2 token named ``label`` in ``directory``; see the module doc.

    ``activate``: set ``SOFTHSM2_CONF`` in this process's environment, which must happen
    before the module is first loaded (``pkcs11.lib``) in this process.
    """
    module = find_module()
    util = shutil.which("softhsm2-util")
    if module is None or util is None:
        raise SoftHsmError(softhsm_missing_reason())
    conf = write_conf(directory)
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    if label in token_labels(conf):
        raise SoftHsmError(f"a token labelled {label!r} already exists in {directory}")
    proc = subprocess.run(
        [util, "--init-token", "--free", "--label", label, "--so-pin", so_pin,
         "--pin", user_pin],
        env=env, capture_output=True, text=True, check=False, timeout=60)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise SoftHsmError(f"softhsm2-util could not initialize token {label!r}: "
                           f"{detail[-1] if detail else f'exit {proc.returncode}'}")
    if activate:
        os.environ["SOFTHSM2_CONF"] = str(conf)
    return SoftHsmToken(module, conf, label, user_pin, so_pin)
