"""Logging in to a PKCS#11 token, once per token and process, and the backend's errors.

PKCS#11 logs in an *application*, not a session: one login per token and process is
shared by every keystore on that token (a second keystore must present the same PIN,
checked against a salted hash of the one that logged in); the login ends when the last of
them closes. SoftHSM reads ``SOFTHSM2_CONF`` when the module is initialized: see
:mod:`keyload.lab.softhsm` and :func:`reinitialize`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
from contextlib import suppress
from dataclasses import dataclass

import pkcs11
from pkcs11 import exceptions as pkx

from ...core.errors import StoreError, WrongPassphrase
from ...core.primitives import ct_equal

PIN_ENV = "KEYLOAD_PKCS11_PIN"

LoginKey = tuple[str, bytes]  # (module, token serial)


class Pkcs11Error(StoreError):
    """The token cannot be reached, lacks a mechanism, or refused an operation."""


class WrongPin(Pkcs11Error, WrongPassphrase):
    """The PIN does not open this token (also a :class:`WrongPassphrase` for the CLI)."""


class NoPin(Pkcs11Error, WrongPassphrase):
    """No PIN was given (for the CLI, as a missing passphrase)."""


def token_error(what: str, e: Exception) -> Pkcs11Error:
    return Pkcs11Error(f"the token refused to {what} ({type(e).__name__})")


@dataclass
class _Login:
    anchor: pkcs11.Session
    salt: bytes
    digest: bytes
    users: int = 0


_LOGINS: dict[LoginKey, _Login] = {}
_LOGINS_LOCK = threading.Lock()


def _pin_digest(salt: bytes, pin: str) -> bytes:
    return hmac.new(salt, pin.encode(), hashlib.sha256).digest()


def reinitialize(module: str) -> None:
    """C_Finalize then C_Initialize ``module`` in this process (SoftHSM re-reads
    ``SOFTHSM2_CONF`` then). Every session of that module ends, and so does every login:
    close the keystores over it first.
    """
    with _LOGINS_LOCK:
        for key in [k for k in _LOGINS if k[0] == module]:
            del _LOGINS[key]
    try:
        lib = pkcs11.lib(module)
        lib.reinitialize()
    except pkx.PKCS11Error as e:
        raise token_error("reinitialize the module", e) from e


def find_token(module: str, token_label: str) -> pkcs11.Token:
    """Token ``token_label`` of PKCS#11 ``module``; Pkcs11Error when there is not one."""
    try:
        lib = pkcs11.lib(module)
    except (OSError, RuntimeError) as e:
        raise Pkcs11Error(f"cannot load PKCS#11 module {module}: {e}") from e
    try:
        return lib.get_token(token_label=token_label)
    except pkx.NoSuchToken:
        raise Pkcs11Error(f"no token labelled {token_label!r} in {module}") from None
    except pkx.MultipleTokensReturned:
        raise Pkcs11Error(f"several tokens labelled {token_label!r} in {module}") from None
    except pkx.PKCS11Error as e:
        raise token_error("list its tokens", e) from e


def pin_or_env(pin: str | None, token_label: str) -> str:
    """``pin``, else the ``KEYLOAD_PKCS11_PIN`` environment variable; NoPin without one."""
    if pin is None:
        pin = os.environ.get(PIN_ENV)
    if not pin:
        raise NoPin(f"no PIN for token {token_label!r}: set {PIN_ENV} to its user PIN")
    return pin


def acquire_login(module: str, token: pkcs11.Token, token_label: str, pin: str) -> LoginKey:
    """Log in to ``token`` (C_Login), or join the login this process holds on it after
    checking ``pin`` against it. Pair with :func:`release_login`.
    """
    key = (module, token.serial)
    with _LOGINS_LOCK:
        login = _LOGINS.get(key)
        if login is None:
            try:
                anchor = token.open(rw=True, user_pin=pin)
            except pkx.PinIncorrect:
                raise WrongPin(f"wrong PIN for token {token_label!r}") from None
            except pkx.PinLocked:
                raise Pkcs11Error(f"the PIN of token {token_label!r} is locked") from None
            except pkx.UserAlreadyLoggedIn:
                raise Pkcs11Error(f"token {token_label!r} is already logged in by another "
                                  "part of this process: keyload cannot check the PIN"
                                  ) from None
            except pkx.PKCS11Error as e:
                raise token_error("log in", e) from e
            salt = secrets.token_bytes(16)
            login = _Login(anchor, salt, _pin_digest(salt, pin))
            _LOGINS[key] = login
        elif not ct_equal(login.digest, _pin_digest(login.salt, pin)):
            raise WrongPin(f"wrong PIN for token {token_label!r}")
        login.users += 1
    return key


def release_login(key: LoginKey) -> None:
    """One user of the login fewer; the last one logs out (C_Logout, C_CloseSession)."""
    with _LOGINS_LOCK:
        login = _LOGINS.get(key)
        if login is None:
            return
        login.users -= 1
        if login.users <= 0:
            del _LOGINS[key]
            with suppress(pkx.PKCS11Error):
                login.anchor.close()  # C_Logout, then C_CloseSession
