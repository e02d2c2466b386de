"""The authority's keys in a PKCS#11 token (an HSM, or SoftHSM2 for tests), through
python-pkcs11: an :class:`~keyload.units.authority.AuthorityBackend` and
:class:`~keyload.units.authority.KeyAdministration`.

KLP1 suite 0x02 (ECBDIV, docs/protocol.md §4) runs entirely inside the token
(:mod:`~keyload.units.pkcs11.export`), and so does suite 0x03 for identity sets (§10:
P-256 keys, ECDH and ECDSA in the token, :mod:`~keyload.units.pkcs11.identity`) when the
token has P-256. No key value reaches the host, except with the explicit
``clear_sas=True``, and for a key block opened or made with the explicit
``--open-in-host`` (:mod:`~keyload.units.pkcs11.keyblocks`). Suite 0x01 (KBKDF) is not
offered: standard PKCS#11 2.40 has no SP 800-108 KDF, and an
:class:`~keyload.units.authority.Authority` over this backend refuses it with 6A81.
Keys enter the token as :mod:`~keyload.units.pkcs11.provision` says, as the objects
:mod:`~keyload.units.pkcs11.objects` describes; a self-test at open
(:mod:`~keyload.units.pkcs11.selftest`) finds what the token does not do as KLP1 needs.

What is and is not enforced. Every derived object is a session object (``CKA_TOKEN``
false) destroyed on every path; :meth:`Pkcs11Keystore.session_object_count` lets a test
check it. The usage flags state intent; in SoftHSM the real boundary is the user
PIN: T carries no ``CKA_DERIVE_TEMPLATE`` (python-pkcs11 0.10.1 crashes on nested
templates), so a logged-in application may derive an *extractable* key from T, an ECB
oracle on T (the tests show it). A production HSM must restrict derivation from T by its
own policy. ``CKA_WRAP_WITH_TRUSTED`` is not set on application keys: only the SO can mark a
key TRUSTED, and Kenc is derived per export by the user. Metadata objects are private
and not modifiable, but a PIN holder can replace them (and so an export policy).
"""

from __future__ import annotations

import threading
from contextlib import suppress

import pkcs11
from pkcs11 import Attribute as A
from pkcs11 import exceptions as pkx

from ...core.suite3 import SUITE_ECDH
from ...core.suites import SUITE_ECBDIV
from ..authority import Capabilities
from .identity import IdentitySets
from .keyblocks import KeyBlocks
from .objects import (
    ED25519_MECHANISMS,
    MANAGEMENT_MECHANISMS,
    P256_MECHANISMS,
    SUITE2_MECHANISMS,
)
from .provision import Provisioning
from .selftest import self_test
from .session import (
    LoginKey,
    Pkcs11Error,
    acquire_login,
    find_token,
    pin_or_env,
    release_login,
)


class Pkcs11Keystore(Provisioning, IdentitySets, KeyBlocks):
    """An :class:`~keyload.units.authority.AuthorityBackend` over a PKCS#11 token.

    Open with :meth:`open`; one logged-in session is reused for every operation (guarded by
    a lock: PKCS#11 sessions are not for concurrent use). ``clear_sas``: allow exports to
    unsigned sets, whose symmetric SAS needs TA' in clear on the host
    (:mod:`~keyload.units.pkcs11.export`).
    """

    def __init__(self, *, module: str, token: pkcs11.Token, session: pkcs11.Session,
                 login_key: LoginKey, clear_sas: bool) -> None:
        self.module = module
        self.token = token
        self.token_label = token.label
        self.clear_sas = clear_sas
        self._session = session
        self._login_key = login_key
        self._lock = threading.RLock()
        self._sets = {}
        self._keys = {}
        self._identities = {}
        self._signer = None
        self._public = None
        mechs = token.slot.get_mechanisms()
        missing = [m.name for m in SUITE2_MECHANISMS + MANAGEMENT_MECHANISMS if m not in mechs]
        if missing:
            raise Pkcs11Error(f"token {self.token_label!r} lacks {', '.join(missing)} "
                              "(needed for KLP1 suite 0x02)")
        self._ed25519 = all(m in mechs for m in ED25519_MECHANISMS)
        self._p256 = all(m in mechs for m in P256_MECHANISMS)
        self._load()
        with self._lock:
            self._aes192_div, self._wrap_any_length = self_test(self.session)

    # -- construction ----------------------------------------------------------------
    @classmethod
    def open(cls, module: str, token_label: str, *, pin: str | None = None,
             clear_sas: bool = False) -> Pkcs11Keystore:
        """Log in to token ``token_label`` of PKCS#11 ``module`` and read its keyload objects.

        ``pin``: the user PIN, else the ``KEYLOAD_PKCS11_PIN`` environment variable.
        Raises :class:`WrongPin`, or :class:`Pkcs11Error` (no such token, no PIN, missing
        mechanisms).
        """
        pin = pin_or_env(pin, token_label)
        token = find_token(module, token_label)
        key = acquire_login(module, token, token_label, pin)
        session: pkcs11.Session | None = None
        try:
            session = token.open(rw=True)  # shares the application's login
            return cls(module=module, token=token, session=session, login_key=key,
                       clear_sas=clear_sas)
        except BaseException:
            if session is not None:
                with suppress(pkx.PKCS11Error):
                    session.close()
            release_login(key)
            raise

    def close(self) -> None:
        """Close this keystore's session; the login ends with the last keystore."""
        with self._lock:
            if self._session is None:
                return
            s, self._session = self._session, None
            self._sets.clear()
            self._keys.clear()
            self._identities.clear()
            self._signer = None
            try:
                with suppress(pkx.PKCS11Error):
                    s.close()
            finally:
                release_login(self._login_key)

    def __enter__(self) -> Pkcs11Keystore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what it can do, and what is in it --------------------------------------------------
    def capabilities(self) -> Capabilities:
        """Suite 0x02 (no SP 800-108 KDF here, so not 0x01), and 0x03 when the token has
        P-256 key generation, ECDSA and ECDH; Ed25519 when it has CKM_EDDSA."""
        suites = {SUITE_ECBDIV, SUITE_ECDH} if self._p256 else {SUITE_ECBDIV}
        return Capabilities(frozenset(suites), self._ed25519, "pkcs11")

    @property
    def wraps_any_length(self) -> bool:
        """The token's CKM_AES_KEY_WRAP_PAD is RFC 5649 for any key length (self-test)."""
        return self._wrap_any_length

    def session_object_count(self) -> int:
        """Session objects (CKA_TOKEN false) visible to this application: 0 when idle."""
        with self._lock:
            return sum(1 for _ in self.session.get_objects({A.TOKEN: False}))

    def token_object_count(self) -> int:
        with self._lock:
            return sum(1 for _ in self.session.get_objects({A.TOKEN: True}))
