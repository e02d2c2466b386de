"""The authority's keys in a PKCS#11 token (an HSM, or SoftHSM2 for tests), through
python-pkcs11: an :class:`~keyload.units.authority.AuthorityBackend`.

KLP1 suite 0x02 (ECBDIV, docs/protocol.md §4) runs entirely inside the token: T1, Kenc, Kmac,
Ksas and a diversified TA' are derived with ``CKM_AES_ECB_ENCRYPT_DATA`` as session
objects, TA' is wrapped with ``CKM_AES_KEY_WRAP_PAD`` (RFC 5649), CAS and RCT are
``CKM_AES_CMAC``, and the Ed25519 SAS is ``CKM_EDDSA`` over a message holding
SHA-256(TA') computed by ``C_DigestKey``. No key value reaches the host, except with the
explicit ``clear_sas=True`` (below). Suite 0x01 (KBKDF) is not offered: standard PKCS#11
2.40 has no SP 800-108 KDF, and an :class:`~keyload.units.authority.Authority` over this
backend refuses it with 6A81.

Objects in the token (all ``CKA_TOKEN``, ``CKA_PRIVATE``, ``CKA_MODIFIABLE`` false; the
usage flags not listed are explicitly false: SoftHSM defaults them to true)

===================  ========================================================================
T (per set)          CKK_AES 256, SENSITIVE, not EXTRACTABLE, DERIVE only. ``CKA_ID`` =
                     ``KLP1-T`` || set id, ``CKA_LABEL`` = ``keyload T <set id>``.
application key TA   CKK_AES (types 01–03) or CKK_GENERIC_SECRET (HMAC, 0x10); SENSITIVE
                     and EXTRACTABLE (it leaves the token only wrapped); DERIVE only when
                     the key is diversified. ``CKA_ID`` = ``KLP1-K`` || version || REF1.
SAS key              CKK_EC_EDWARDS (Ed25519) private key: SENSITIVE, not EXTRACTABLE, not
                     COPYABLE, SIGN only; its public key object: VERIFY only. ``CKA_ID``
                     ``KLP1-SAS``, label ``keyload SAS``. Made once; never replaced here.
metadata             CKO_DATA, ``CKA_APPLICATION`` ``keyload``, ``CKA_LABEL`` = the label
                     of its key, ``CKA_VALUE`` = JSON (set: name, signed; key: REF1, type,
                     length, usage, mode, exportability, version, diversify, export policy,
                     KCV, label) holding the key's ``CKA_ID`` (SoftHSM refuses ``CKA_ID`` on a
                     data object, so the JSON carries the link).
===================  ========================================================================

Key check values (docs/protocol.md §2), computed once, when a key enters the token:

- imported (a clear value, e.g. components assembled on the host): on the host, then
  ``C_CreateObject`` with the final template (also ``CKA_COPYABLE`` false) and the host
  copy is overwritten. For T the token also computes the KCV on a throwaway session copy
  that may SIGN, and both must agree: a known-answer test of the routine used for
  generated keys.
- generated (``C_GenerateKey``): the key is first a *session* object that may also SIGN;
  AES-CMAC (HMAC-SHA256 for type 0x10) of 16 zero bytes runs in the token; then
  ``C_CopyObject`` makes the token object with SIGN false and its final attributes
  (``CKA_MODIFIABLE`` false last: SoftHSM refuses any attribute after it in a copy
  template), and the session object is destroyed. Only the standard check value leaves
  the token. Residual, measured on SoftHSM 2.6.1: the copy cannot be made
  ``CKA_COPYABLE`` false (refused in a copy template and by ``C_SetAttributeValue``).
  SoftHSM's CKM_SHA256_HMAC wants keys of 32 bytes or more: a shorter HMAC key is
  imported, not generated.

The alternative for T, deriving ``E_T(0)`` and ``E_T(K1)`` into extractable throwaway keys
and doing CMAC's subkey arithmetic on the host, was not chosen: ``E_T(0)`` is never an
ECBDIV block (its last byte, the counter, is 0), so it would be harmless here, but it
needs an *extractable* derivation from T, which a hardened HSM refuses, and puts more than
the check value in host memory.

Diversified AES-192: ECB derivation yields as many bytes as its data (whole blocks); TA'
of 24 bytes is derived from 32 bytes of data with ``CKA_VALUE_LEN`` 24, which SoftHSM
truncates to the leftmost 24 bytes (the KLP1 rule). :meth:`Pkcs11Keystore.open` checks this
with a known-answer test (a fixed test key, through CMAC in the token) and refuses AES-192
diversification on a token that does otherwise. The derived TA' is a session object that
may SIGN, for one AES-CMAC: its KCV, which the unit answers.

Key lengths that are not a multiple of 8 (HMAC keys of 17–23, 25–31… bytes): SoftHSM
2.6.1's ``CKM_AES_KEY_WRAP_PAD`` zero-pads the key *before* wrapping and writes the padded
length in the RFC 5649 header, so a unit unwraps a longer key and refuses it (6982). The
self-test at open detects this; such keys are then refused at import and at export.

SAS. Ed25519 sets ("signed"): SHA-256(TA') by ``C_DigestKey`` and ``CKM_EDDSA`` in the
token. Symmetric SAS = AES-CMAC(Ksas, "KLP1-SAS" || H || TA') needs TA' *in clear* as MAC
input: PKCS#11 can feed a key only to a digest (``C_DigestKey``), and SoftHSM has no
mechanism (XOR/concatenate base-and-data, CMAC over a key) that would do it in the token.
So it is an explicit opt-in, ``clear_sas=True``: TA' is wrapped under an ephemeral,
extractable session AES key, unwrapped on the host, fed to ``CKM_AES_CMAC`` with Ksas in
the token (Ksas never leaves), then the host copy is overwritten. Without it, an export
to an unsigned set is refused with :class:`~keyload.core.errors.PolicyRefused` (6986).

What is and is not enforced. Every derived object is a session object (``CKA_TOKEN``
false) destroyed on every path; :meth:`Pkcs11Keystore.session_object_count` lets a test
check it. The usage flags above state intent; in SoftHSM the real boundary is the user
PIN: T carries no ``CKA_DERIVE_TEMPLATE`` (python-pkcs11 0.10.1 crashes on nested
templates), so a logged-in application may derive an *extractable* key from T, an ECB
oracle on T (the tests show it). A production HSM must restrict derivation from T by its
own policy. ``CKA_WRAP_WITH_TRUSTED`` is not set on application keys: only the SO can mark a
key TRUSTED, and Kenc is derived per export by the user. Metadata objects are private
and not modifiable, but a PIN holder can replace them (and so an export policy).

PKCS#11 logs in an *application*, not a session: one login per token and process is
shared by every keystore on that token (a second keystore must present the same PIN,
checked against a salted hash of the one that logged in); the login ends when the last of
them closes. SoftHSM reads ``SOFTHSM2_CONF`` when the module is initialized: see
:mod:`keyload.lab.softhsm` and :func:`reinitialize`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, cast

import pkcs11
from pkcs11 import Attribute as A
from pkcs11 import KeyType as CKK
from pkcs11 import Mechanism as CKM
from pkcs11 import MechanismFlag
from pkcs11 import ObjectClass as CKO
from pkcs11 import exceptions as pkx
from pkcs11.types import DeriveMixin, SignMixin, WrapMixin

from ..core import messages as msg
from ..core.errors import (
    AuthenticityError,
    DamagedStore,
    NoSuchKey,
    PolicyRefused,
    StoreError,
    UnknownSet,
    Unsupported,
    WrongPassphrase,
)
from ..core.keys import FLAG_DIVERSIFIED, FLAG_ED25519, KeyAttributes, KeyHeader, KeyType, kcv
from ..core.klp1 import LABEL_DL, LABEL_SAS, LABEL_T1, LABEL_TA, Exported, cas_message, lv
from ..core.klp1 import rct_message as _rct_message
from ..core.primitives import (
    aes_cmac,
    aes_kwp_unwrap,
    aes_kwp_wrap,
    ct_equal,
    ecbdiv_into,
    ed25519_public,
    ed25519_verify,
)
from ..core.ref1 import display_ref1
from ..core.secret import Secret, scrub
from ..core.suites import SUITE_ECBDIV
from .authority import Capabilities, ExportPolicy, KeyInfo, SetInfo

PIN_ENV = "KEYLOAD_PKCS11_PIN"
APPLICATION = "keyload"
META_FORMAT = "keyload-pkcs11-1"
ID_T = b"KLP1-T"
ID_KEY = b"KLP1-K"
ID_SAS = b"KLP1-SAS"
LABEL_SAS_KEY = "keyload SAS"
ED25519_OID = bytes.fromhex("06032b6570")  # id-Ed25519 (RFC 8410), DER
CLEAR_SAS_REFUSED = ("this PKCS#11 authority signs with Ed25519; a symmetric SAS needs the key "
                     "in clear outside the token (open the keystore with clear_sas=True to "
                     "allow it, or make the set a signed one)")

# Mechanisms suite 0x02 needs, and what key management needs.
SUITE2_MECHANISMS = (CKM.AES_ECB_ENCRYPT_DATA, CKM.AES_KEY_WRAP_PAD, CKM.AES_CMAC)
MANAGEMENT_MECHANISMS = (CKM.AES_KEY_GEN, CKM.GENERIC_SECRET_KEY_GEN, CKM.SHA256_HMAC,
                         CKM.SHA256)
ED25519_MECHANISMS = (CKM.EDDSA, CKM.EC_EDWARDS_KEY_PAIR_GEN)

_USAGES = (A.ENCRYPT, A.DECRYPT, A.SIGN, A.VERIFY, A.WRAP, A.UNWRAP, A.DERIVE)

# the Ed25519 SAS key pair (CKA_MODIFIABLE last: see _final)
_SAS_PRIV: dict[A, Any] = {
    A.CLASS: CKO.PRIVATE_KEY, A.KEY_TYPE: CKK.EC_EDWARDS, A.TOKEN: True, A.PRIVATE: True,
    A.SENSITIVE: True, A.EXTRACTABLE: False, A.SIGN: True, A.DECRYPT: False,
    A.UNWRAP: False, A.DERIVE: False, A.SIGN_RECOVER: False, A.ID: ID_SAS,
    A.LABEL: LABEL_SAS_KEY, A.COPYABLE: False, A.MODIFIABLE: False}
_SAS_PUB: dict[A, Any] = {
    A.CLASS: CKO.PUBLIC_KEY, A.KEY_TYPE: CKK.EC_EDWARDS, A.TOKEN: True, A.PRIVATE: False,
    A.VERIFY: True, A.ENCRYPT: False, A.WRAP: False, A.DERIVE: False,
    A.VERIFY_RECOVER: False, A.ID: ID_SAS, A.LABEL: LABEL_SAS_KEY, A.MODIFIABLE: False}


class Pkcs11Error(StoreError):
    """The token cannot be reached, lacks a mechanism, or refused an operation."""


class WrongPin(Pkcs11Error, WrongPassphrase):
    """The PIN does not open this token (also a :class:`WrongPassphrase` for the CLI)."""


class NoPin(Pkcs11Error, WrongPassphrase):
    """No PIN was given (for the CLI, as a missing passphrase)."""


# -- templates ------------------------------------------------------------------------
def secret_template(key_type: CKK, *, token: bool, extractable: bool,
                    allow: Iterable[A] = (), sensitive: bool = True) -> dict[A, Any]:
    """A secret-key template with *every* usage flag explicit (SoftHSM defaults them true)."""
    allowed = frozenset(allow)
    t: dict[A, Any] = {A.CLASS: CKO.SECRET_KEY, A.KEY_TYPE: key_type, A.TOKEN: token,
                       A.PRIVATE: True, A.SENSITIVE: sensitive, A.EXTRACTABLE: extractable}
    for u in _USAGES:
        t[u] = u in allowed
    return t


# session objects of one export (docs/protocol.md §4)
_T1 = secret_template(CKK.AES, token=False, extractable=False, allow=(A.DERIVE,))
_KENC = secret_template(CKK.AES, token=False, extractable=False, allow=(A.WRAP,))
_KMAC = secret_template(CKK.AES, token=False, extractable=False, allow=(A.SIGN,))
_KSAS = _KMAC
# TA' diversified: wrapped by Kenc (extractable, sensitive), SIGN for its KCV only
_TA_DIV = secret_template(CKK.AES, token=False, extractable=True, allow=(A.SIGN,))
# ephemeral key for clear_sas: its value is read by the host
_EPHEMERAL = secret_template(CKK.AES, token=False, extractable=True, allow=(A.WRAP,),
                             sensitive=False)


def _ecbdiv_data(label: bytes, context: bytes, nblocks: int) -> bytes:
    """``B_1 || … || B_n`` of KLP1 ECBDIV (docs/protocol.md §4): the data the token encrypts."""
    h = hashlib.sha256(label + b"\x00" + context).digest()[:15]
    return b"".join(h + bytes((i,)) for i in range(1, nblocks + 1))


def _ck_key_type(kt: KeyType) -> CKK:
    return CKK.AES if kt.is_aes else CKK.GENERIC_SECRET


# -- one login per token and process ---------------------------------------------------
@dataclass
class _Login:
    anchor: pkcs11.Session
    salt: bytes
    digest: bytes
    users: int = 0


_LOGINS: dict[tuple[str, bytes], _Login] = {}
_LOGINS_LOCK = threading.Lock()


def _pin_digest(salt: bytes, pin: str) -> bytes:
    return hmac.new(salt, pin.encode(), hashlib.sha256).digest()


def _token_error(what: str, e: Exception) -> Pkcs11Error:
    return Pkcs11Error(f"the token refused to {what} ({type(e).__name__})")


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
        raise _token_error("reinitialize the module", e) from e


# -- index entries ----------------------------------------------------------------------
@dataclass
class _Set:
    info: SetInfo
    key: pkcs11.Object
    meta: pkcs11.Object


@dataclass
class _Key:
    info: KeyInfo
    key: pkcs11.Object
    meta: pkcs11.Object
    key_id: bytes


class _Scope:
    """Session objects made during one operation, destroyed on exit whatever happens."""

    __slots__ = ("objs",)

    def __init__(self) -> None:
        self.objs: list[pkcs11.Object] = []

    def keep(self, obj: pkcs11.Object) -> pkcs11.Object:
        self.objs.append(obj)
        return obj

    def drop(self, obj: pkcs11.Object) -> None:
        """Destroy ``obj`` now (it is no longer needed); kept for a retry if that fails."""
        obj.destroy()
        self.objs.remove(obj)

    def close(self, failing: bool) -> None:
        errors: list[Exception] = []
        while self.objs:
            obj = self.objs.pop()
            try:
                obj.destroy()
            except pkx.PKCS11Error as e:
                errors.append(e)
        if errors and not failing:
            raise _token_error("destroy a session object", errors[0])


@contextmanager
def _scope() -> Iterator[_Scope]:
    s = _Scope()
    try:
        yield s
    except BaseException:
        s.close(failing=True)
        raise
    s.close(failing=False)


class Pkcs11Keystore:
    """An :class:`~keyload.units.authority.AuthorityBackend` over a PKCS#11 token.

    Open with :meth:`open`; one logged-in session is reused for every operation (guarded by
    a lock: PKCS#11 sessions are not for concurrent use). ``clear_sas``: allow exports to
    unsigned sets, whose symmetric SAS needs TA' in clear on the host (module doc).
    """

    def __init__(self, *, module: str, token: pkcs11.Token, session: pkcs11.Session,
                 login_key: tuple[str, bytes], clear_sas: bool) -> None:
        self.module = module
        self.token = token
        self.token_label = token.label
        self.clear_sas = clear_sas
        self._session: pkcs11.Session | None = session
        self._login_key = login_key
        self._lock = threading.RLock()
        self._sets: dict[bytes, _Set] = {}
        self._keys: dict[bytes, _Key] = {}
        self._signer: pkcs11.Object | None = None
        self._public: bytes | None = None
        mechs = token.slot.get_mechanisms()
        missing = [m.name for m in SUITE2_MECHANISMS + MANAGEMENT_MECHANISMS if m not in mechs]
        if missing:
            raise Pkcs11Error(f"token {self.token_label!r} lacks {', '.join(missing)} "
                              "(needed for KLP1 suite 0x02)")
        self._ed25519 = all(m in mechs for m in ED25519_MECHANISMS)
        self._load()
        self._aes192_div, self._wrap_any_length = self._self_test()

    # -- construction ----------------------------------------------------------------
    @classmethod
    def open(cls, module: str, token_label: str, *, pin: str | None = None,
             clear_sas: bool = False) -> Pkcs11Keystore:
        """Log in to token ``token_label`` of PKCS#11 ``module`` and read its keyload objects.

        ``pin``: the user PIN, else the ``KEYLOAD_PKCS11_PIN`` environment variable.
        Raises :class:`WrongPin`, or :class:`Pkcs11Error` (no such token, no PIN, missing
        mechanisms).
        """
        if pin is None:
            pin = os.environ.get(PIN_ENV)
        if not pin:
            raise NoPin(f"no PIN for token {token_label!r}: set {PIN_ENV} to its user PIN")
        try:
            lib = pkcs11.lib(module)
        except (OSError, RuntimeError) as e:
            raise Pkcs11Error(f"cannot load PKCS#11 module {module}: {e}") from e
        try:
            token = lib.get_token(token_label=token_label)
        except pkx.NoSuchToken:
            raise Pkcs11Error(f"no token labelled {token_label!r} in {module}") from None
        except pkx.MultipleTokensReturned:
            raise Pkcs11Error(f"several tokens labelled {token_label!r} in {module}") from None
        except pkx.PKCS11Error as e:
            raise _token_error("list its tokens", e) from e
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
                    raise _token_error("log in", e) from e
                salt = secrets.token_bytes(16)
                login = _Login(anchor, salt, _pin_digest(salt, pin))
                _LOGINS[key] = login
            elif not ct_equal(login.digest, _pin_digest(login.salt, pin)):
                raise WrongPin(f"wrong PIN for token {token_label!r}")
            login.users += 1
        session: pkcs11.Session | None = None
        try:
            session = token.open(rw=True)  # shares the application's login
            return cls(module=module, token=token, session=session, login_key=key,
                       clear_sas=clear_sas)
        except BaseException:
            if session is not None:
                with suppress(pkx.PKCS11Error):
                    session.close()
            _release_login(key)
            raise

    def close(self) -> None:
        """Close this keystore's session; the login ends with the last keystore."""
        with self._lock:
            if self._session is None:
                return
            s, self._session = self._session, None
            self._sets.clear()
            self._keys.clear()
            self._signer = None
            try:
                with suppress(pkx.PKCS11Error):
                    s.close()
            finally:
                _release_login(self._login_key)

    def __enter__(self) -> Pkcs11Keystore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def session(self) -> pkcs11.Session:
        if self._session is None:
            raise Pkcs11Error("this PKCS#11 keystore is closed")
        return self._session

    # -- reading the token --------------------------------------------------------------
    def _load(self) -> None:
        s = self.session
        metas: list[tuple[dict[str, Any], pkcs11.Object]] = []
        try:
            for obj in s.get_objects({A.CLASS: CKO.DATA}):
                if obj[A.APPLICATION] != APPLICATION:
                    continue
                try:
                    doc = json.loads(bytes(obj[A.VALUE]).decode())
                except (ValueError, UnicodeDecodeError):
                    raise DamagedStore(f"keyload object {obj[A.LABEL]!r} holds no JSON") \
                        from None
                if doc.get("format") != META_FORMAT:
                    raise DamagedStore(f"keyload object {obj[A.LABEL]!r}: unknown format")
                metas.append((doc, obj))
            best: dict[bytes, tuple[dict[str, Any], pkcs11.Object]] = {}
            for doc, obj in metas:
                if doc["kind"] == "set":
                    set_id = bytes.fromhex(doc["set_id"])
                    t = self._find_secret(bytes.fromhex(doc["key_id"]), doc)
                    self._sets[set_id] = _Set(SetInfo(set_id, doc["name"], bool(doc["signed"])),
                                              t, obj)
                elif doc["kind"] == "key":
                    ref1 = bytes.fromhex(doc["ref1"])
                    old = best.get(ref1)
                    # a lower version is left over by an interrupted replacement: ignored
                    if old is None or int(old[0]["version"]) < int(doc["version"]):
                        best[ref1] = (doc, obj)
            for ref1, (doc, obj) in best.items():
                key_id = bytes.fromhex(doc["key_id"])
                self._keys[ref1] = _Key(_key_info(doc), self._find_secret(key_id, doc), obj,
                                        key_id)
            self._load_signer()
        except (KeyError, ValueError, TypeError) as e:
            raise DamagedStore(f"keyload metadata in token {self.token_label!r} is damaged "
                               f"({type(e).__name__})") from None
        except pkx.PKCS11Error as e:
            raise _token_error("list its objects", e) from e

    def _find_secret(self, key_id: bytes, doc: dict[str, Any]) -> pkcs11.Object:
        found = list(self.session.get_objects({A.CLASS: CKO.SECRET_KEY, A.ID: key_id}))
        if len(found) != 1:
            raise DamagedStore(f"token {self.token_label!r}: {len(found)} key objects for "
                               f"keyload {doc['kind']} {doc.get('label') or key_id.hex()}")
        return found[0]

    def _load_signer(self) -> None:
        privs = list(self.session.get_objects({A.CLASS: CKO.PRIVATE_KEY, A.ID: ID_SAS}))
        pubs = list(self.session.get_objects({A.CLASS: CKO.PUBLIC_KEY, A.ID: ID_SAS}))
        if not privs and not pubs:
            return
        if len(privs) != 1 or len(pubs) != 1:
            raise DamagedStore(f"token {self.token_label!r}: the SAS key is incomplete or "
                               "duplicated")
        point = bytes(pubs[0][A.EC_POINT])
        self._public = _raw_ed25519_point(point)
        self._signer = privs[0]

    # -- token helpers --------------------------------------------------------------------
    def _check(self, obj: pkcs11.Object, want: dict[A, Any], what: str) -> None:
        """Read back security attributes: a token that ignored a template is an error."""
        got = obj.get_attributes(list(want))
        wrong = [a.name for a, v in want.items() if got.get(a) != v]
        if wrong:
            raise Pkcs11Error(f"the token did not apply {', '.join(wrong)} to {what}")

    def _token_kcv(self, obj: pkcs11.Object, kt: KeyType) -> bytes:
        mech = CKM.SHA256_HMAC if kt == KeyType.HMAC_SHA256 else CKM.AES_CMAC
        return _sign(obj, bytes(16), mech)[:5]

    def _put_meta(self, label: str, doc: dict[str, Any]) -> pkcs11.Object:
        doc = {"format": META_FORMAT, **doc}
        return self.session.create_object({
            A.CLASS: CKO.DATA, A.TOKEN: True, A.PRIVATE: True, A.APPLICATION: APPLICATION,
            A.LABEL: label, A.VALUE: json.dumps(doc, sort_keys=True).encode(),
            A.MODIFIABLE: False})

    def _generate(self, ck: CKK, length: int, tmpl: dict[A, Any]) -> pkcs11.Object:
        mech = CKM.AES_KEY_GEN if ck == CKK.AES else CKM.GENERIC_SECRET_KEY_GEN
        return self.session.generate_key(ck, 8 * length, mechanism=mech,
                                         capabilities=MechanismFlag(0), template=tmpl)

    def _create(self, tmpl: dict[A, Any], value: Secret) -> pkcs11.Object:
        """C_CreateObject with the key value; the host's ``bytes`` copy is overwritten.

        python-pkcs11 copies the template into a C buffer that it frees without wiping:
        a residue this code cannot reach.
        """
        raw = bytes(value.buffer)
        try:
            return self.session.create_object(_modifiable_last({**tmpl, A.VALUE: raw}))
        finally:
            scrub(raw)

    # -- management ----------------------------------------------------------------------
    def add_set(self, value: Secret, name: str, *, signed: bool = False) -> SetInfo:
        """Import a transport key T (AES-256); returns its set id = KCV(T).

        The KCV is computed on the host and, as a known-answer test of the routine used for
        generated keys, by the token on a session copy; both must agree. The value is
        consumed: ``value`` is wiped once it is in the token (or on failure).
        """
        try:
            if len(value) != 32:
                raise ValueError("a transport key is AES-256 (32 bytes)")
            return self._new_set(value, name, signed)
        finally:
            value.wipe()

    def generate_set(self, name: str, *, signed: bool = False) -> SetInfo:
        """Generate T in the token (it never leaves); returns its set id."""
        return self._new_set(None, name, signed)

    def _new_set(self, value: Secret | None, name: str, signed: bool) -> SetInfo:
        with self._lock:
            if signed and self._signer is None:
                raise ValueError("a signed set needs the authority's signing key first")
            final = secret_template(CKK.AES, token=True, extractable=False, allow=(A.DERIVE,))
            size = {A.VALUE_LEN: 32}  # read back only: C_CreateObject refuses CKA_VALUE_LEN
            try:
                with _scope() as sc:
                    if value is None:  # precursor: may also SIGN, for its KCV only
                        pre = sc.keep(self._generate(CKK.AES, 32, secret_template(
                            CKK.AES, token=False, extractable=False, allow=(A.SIGN, A.DERIVE))))
                        set_id = self._token_kcv(pre, KeyType.AES256)
                    else:
                        set_id = kcv(KeyType.AES256, value.buffer)
                        probe = sc.keep(self._create(secret_template(
                            CKK.AES, token=False, extractable=False, allow=(A.SIGN,)), value))
                        if not ct_equal(self._token_kcv(probe, KeyType.AES256), set_id):
                            raise Pkcs11Error("the token's AES-CMAC disagrees with the host's")
                    if set_id in self._sets:
                        raise ValueError(f"set {set_id.hex()} already exists")
                    key_id = ID_T + set_id
                    label = f"keyload T {set_id.hex()}"
                    doc = {"kind": "set", "key_id": key_id.hex(), "set_id": set_id.hex(),
                           "name": name, "signed": signed}
                    if value is None:
                        t, meta = self._install(
                            lambda: pre.copy(_final(key_id, label)), label,
                            {**final, **size, A.NEVER_EXTRACTABLE: True,
                             A.ALWAYS_SENSITIVE: True}, key_id, doc)
                    else:
                        ident = {A.ID: key_id, A.LABEL: label}
                        t, meta = self._install(
                            lambda: self._create({**final, **ident, **_LOCKED}, value),
                            label, {**final, **size, **_LOCKED}, key_id, doc)
            except pkx.PKCS11Error as e:
                raise _token_error("make a transport key", e) from e
            info = SetInfo(set_id, name, signed)
            self._sets[set_id] = _Set(info, t, meta)
            return info

    def add_key(self, ref1: bytes, key_type: KeyType, value: Secret, attrs: KeyAttributes, *,
                version: int, diversify: bool, policy: ExportPolicy, label: str = "",
                replace: bool = False) -> KeyInfo:
        """Import an application key from its clear value (components assembled on the
        host); its KCV is computed on the host. The value is consumed: ``value`` is wiped
        once it is in the token (or on failure).
        """
        try:
            key_type.check_length(len(value))
            return self._new_key(ref1, key_type, len(value), value, attrs, version=version,
                                 diversify=diversify, policy=policy, label=label,
                                 replace=replace)
        finally:
            value.wipe()

    def generate_key(self, ref1: bytes, key_type: KeyType, attrs: KeyAttributes, *,
                     version: int, diversify: bool, policy: ExportPolicy,
                     length: int | None = None, label: str = "",
                     replace: bool = False) -> KeyInfo:
        """Generate an application key in the token (C_GenerateKey); the token computes
        its KCV (an HMAC key needs a length the token's CKM_SHA256_HMAC accepts: SoftHSM
        wants 32 bytes or more).
        """
        n = length or key_type.default_length
        key_type.check_length(n)
        return self._new_key(ref1, key_type, n, None, attrs, version=version,
                             diversify=diversify, policy=policy, label=label, replace=replace)

    def _new_key(self, ref1: bytes, key_type: KeyType, length: int, value: Secret | None,
                 attrs: KeyAttributes, *, version: int, diversify: bool, policy: ExportPolicy,
                 label: str, replace: bool) -> KeyInfo:
        msg.check_ref1(ref1)
        if not 0 <= version <= 0xFFFF:
            raise ValueError("key version must be in 0..65535")
        if diversify and not key_type.is_aes:
            raise ValueError("only AES keys can be diversified (docs/protocol.md §4)")
        if key_type == KeyType.HMAC_SHA256 and attrs.usage[0] != "M":
            raise ValueError("an HMAC key must have a MAC usage (M…)")
        self._check_length(length)
        if diversify and key_type == KeyType.AES192 and not self._aes192_div:
            raise ValueError(f"token {self.token_label!r} does not truncate ECB derivations "
                             "to CKA_VALUE_LEN: an AES-192 key cannot be diversified in it")
        with self._lock:
            old = self._keys.get(ref1)
            if old is not None:
                if not replace:
                    raise ValueError(f"REF1 {display_ref1(ref1)} already exists")
                if version <= old.info.version:
                    raise ValueError("a replacing key needs a higher version")
            ck = _ck_key_type(key_type)
            allow = (A.DERIVE,) if diversify else ()
            final = secret_template(ck, token=True, extractable=True, allow=allow)
            size = {A.VALUE_LEN: length}  # read back only
            key_id = ID_KEY + version.to_bytes(2, "big") + ref1
            obj_label = f"keyload key {display_ref1(ref1)} v{version}"
            try:
                with _scope() as sc:
                    if value is None:  # precursor: may also SIGN, for its KCV only
                        pre = sc.keep(self._generate(ck, length, secret_template(
                            ck, token=False, extractable=True, allow=(*allow, A.SIGN))))
                        try:
                            check = self._token_kcv(pre, key_type)
                        except pkx.KeySizeRange:
                            raise ValueError(f"this token cannot compute the KCV of a "
                                             f"{length}-byte {key_type.label} key: choose "
                                             "another length, or import the value") from None
                    else:
                        check = kcv(key_type, value.buffer)
                    info = KeyInfo(ref1, key_type, length, attrs, version, diversify, policy,
                                   check, label)
                    doc = {"kind": "key", "key_id": key_id.hex(), "ref1": ref1.hex(),
                           "type": int(key_type), "length": length, "usage": attrs.usage,
                           "mode": attrs.mode, "exportability": attrs.exportability,
                           "version": version, "diversify": diversify,
                           "policy": policy.to_json(), "kcv": check.hex(), "label": label}
                    if value is None:
                        k, meta = self._install(lambda: pre.copy(_final(key_id, obj_label)),
                                                obj_label, {**final, **size}, key_id, doc)
                    else:
                        ident = {A.ID: key_id, A.LABEL: obj_label}
                        k, meta = self._install(
                            lambda: self._create({**final, **ident, **_LOCKED}, value),
                            obj_label, {**final, **size, **_LOCKED}, key_id, doc)
            except pkx.PKCS11Error as e:
                raise _token_error("make an application key", e) from e
            self._keys[ref1] = _Key(info, k, meta, key_id)
            if old is not None:
                self._destroy_quietly(old.meta, old.key)
            return info

    def _install(self, make: Callable[[], pkcs11.Object], label: str, want: dict[A, Any],
                 key_id: bytes, doc: dict[str, Any]) -> tuple[pkcs11.Object, pkcs11.Object]:
        """Make the token object, read back its attributes, add its metadata: all or
        nothing.
        """
        for orphan in list(self.session.get_objects({A.CLASS: CKO.SECRET_KEY, A.ID: key_id})):
            orphan.destroy()  # left by an interrupted install: no metadata points at it
        obj = make()
        try:
            self._check(obj, {**want, A.MODIFIABLE: False}, label)
            meta = self._put_meta(label, doc)
        except BaseException:
            with suppress(pkx.PKCS11Error):
                obj.destroy()
            raise
        return obj, meta

    def _destroy_quietly(self, *objs: pkcs11.Object) -> None:
        """Remove superseded token objects; one left behind is ignored by :meth:`_load`."""
        for o in objs:
            with suppress(pkx.PKCS11Error):
                o.destroy()

    def set_signing_key(self, value: Secret | None = None) -> bytes:
        """Generate the Ed25519 SAS key in the token (``value`` None), or import a 32-byte
        private key (consumed: wiped). Returns the public key (32 bytes).

        Refused when the token already holds one: the units of signed sets hold its public
        key, and replacing it is a decision to take outside keyload. A token that refuses
        the import (C_CreateObject, or signing with the imported key) is reported as such.
        """
        try:
            with self._lock:
                if not self._ed25519:
                    raise Pkcs11Error(f"token {self.token_label!r} has no Ed25519 (CKM_EDDSA)")
                if value is not None and len(value) != 32:
                    raise ValueError("an Ed25519 private key is 32 bytes")
                if self._signer is not None:
                    raise ValueError("the authority already has a signing key (replacing it "
                                     "breaks the units of its signed sets)")
                if value is None:
                    return self._generate_signer()
                return self._import_signer(value)
        finally:
            if value is not None:
                value.wipe()

    def _generate_signer(self) -> bytes:
        made: list[pkcs11.Object] = []
        try:
            pub, priv = self.session.generate_keypair(
                CKK.EC_EDWARDS, mechanism=CKM.EC_EDWARDS_KEY_PAIR_GEN,
                public_template=_modifiable_last({**_SAS_PUB, A.EC_PARAMS: ED25519_OID}),
                private_template=dict(_SAS_PRIV))
            made += [pub, priv]
            raw_pub = _raw_ed25519_point(bytes(pub[A.EC_POINT]))
            return self._adopt_signer(priv, raw_pub, made)
        except pkx.PKCS11Error as e:
            self._destroy_quietly(*made)
            raise _token_error("generate an Ed25519 key", e) from e

    def _import_signer(self, value: Secret) -> bytes:
        raw_pub = ed25519_public(value.buffer)
        made: list[pkcs11.Object] = []
        raw = bytes(value.buffer)
        try:
            try:
                priv = self.session.create_object(
                    _modifiable_last({**_SAS_PRIV, A.EC_PARAMS: ED25519_OID, A.VALUE: raw}))
            finally:
                scrub(raw)
            made.append(priv)
            made.append(self.session.create_object(_modifiable_last(
                {**_SAS_PUB, A.EC_PARAMS: ED25519_OID, A.EC_POINT: b"\x04\x20" + raw_pub})))
            return self._adopt_signer(priv, raw_pub, made)
        except pkx.PKCS11Error as e:
            self._destroy_quietly(*made)
            raise Pkcs11Error(f"the token refused the imported Ed25519 private key "
                              f"({type(e).__name__}): generate the key in the token instead"
                              ) from e

    def _adopt_signer(self, priv: pkcs11.Object, raw_pub: bytes,
                      made: list[pkcs11.Object]) -> bytes:
        """Check the new key's attributes and a signature; on failure destroy ``made``."""
        try:
            self._check(priv, {A.SENSITIVE: True, A.EXTRACTABLE: False, A.SIGN: True,
                               A.DECRYPT: False, A.DERIVE: False, A.UNWRAP: False},
                        "the SAS key")
            probe = b"keyload SAS key self-test"
            try:
                ed25519_verify(raw_pub, _sign(priv, probe, CKM.EDDSA), probe)
            except AuthenticityError:
                raise Pkcs11Error("the token's Ed25519 signature does not verify with the "
                                  "public key") from None
        except BaseException:
            self._destroy_quietly(*made)
            raise
        self._signer = priv
        self._public = raw_pub
        return raw_pub

    def public_key(self) -> bytes | None:
        return self._public

    @property
    def wraps_any_length(self) -> bool:
        """The token's CKM_AES_KEY_WRAP_PAD is RFC 5649 for any key length (self-test)."""
        return self._wrap_any_length

    def set_infos(self) -> list[SetInfo]:
        return [t.info for t in self._sets.values()]

    def key_infos(self) -> list[KeyInfo]:
        return [k.info for k in self._keys.values()]

    def session_object_count(self) -> int:
        """Session objects (CKA_TOKEN false) visible to this application: 0 when idle."""
        with self._lock:
            return sum(1 for _ in self.session.get_objects({A.TOKEN: False}))

    def token_object_count(self) -> int:
        with self._lock:
            return sum(1 for _ in self.session.get_objects({A.TOKEN: True}))

    # -- AuthorityBackend ------------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        """Suite 0x02 only (no SP 800-108 KDF here); Ed25519 when the token has CKM_EDDSA."""
        return Capabilities(frozenset({SUITE_ECBDIV}), self._ed25519, "pkcs11")

    def _set(self, set_id: bytes) -> _Set:
        try:
            return self._sets[set_id]
        except KeyError:
            raise UnknownSet(f"no transport key for set {set_id.hex()}") from None

    def set_info(self, set_id: bytes) -> SetInfo:
        return self._set(set_id).info

    def key_info(self, ref1: bytes) -> KeyInfo:
        try:
            return self._keys[ref1].info
        except KeyError:
            raise NoSuchKey(f"no application key {display_ref1(ref1)}") from None

    def export(self, req: msg.ExportRequest) -> Exported:
        """docs/protocol.md §4, suite 0x02, in the token; every derived object is destroyed."""
        if req.suite != SUITE_ECBDIV:
            raise Unsupported(f"suite {req.suite:#04x} not offered by this PKCS#11 authority")
        with self._lock:
            t = self._set(req.set_id)
            try:
                k = self._keys[req.ref1]
            except KeyError:
                raise NoSuchKey(f"no application key {display_ref1(req.ref1)}") from None
            signed = t.info.signed
            if signed and self._signer is None:
                raise Pkcs11Error("a signed set, but the token holds no SAS key")
            if not signed and not self.clear_sas:
                raise PolicyRefused(CLEAR_SAS_REFUSED)
            i = k.info
            if i.diversify and i.key_type == KeyType.AES192 and not self._aes192_div:
                raise PolicyRefused("this token does not truncate ECB derivations to "
                                    "CKA_VALUE_LEN: AES-192 keys cannot be diversified in it")
            if i.length % 8 and not self._wrap_any_length:
                raise PolicyRefused(f"this token cannot wrap a {i.length}-byte key as "
                                    "RFC 5649 says (CKM_AES_KEY_WRAP_PAD defect)")
            try:
                return self._export(req, t.key, k, signed)
            except pkx.PKCS11Error as e:
                raise _token_error("export the key", e) from e

    def _export(self, req: msg.ExportRequest, t: pkcs11.Object, k: _Key,
                signed: bool) -> Exported:
        i = k.info
        sn, r, ref2 = req.sn, req.r, req.ref2
        dl = _ecbdiv_data(LABEL_DL, lv(sn) + r + bytes((ref2,)), 6)
        with _scope() as sc:
            t1 = sc.keep(_derive(t, _ecbdiv_data(LABEL_T1, sn, 2), _T1, 256))
            kenc = sc.keep(_derive(t1, dl[0:32], _KENC, 256))
            kmac = sc.keep(_derive(t1, dl[32:64], _KMAC, 256))
            ksas = None if signed else sc.keep(_derive(t1, dl[64:96], _KSAS, 256))
            sc.drop(t1)  # T1 is no longer needed
            flags = FLAG_ED25519 if signed else 0
            ta: pkcs11.Object
            if i.diversify:
                n = i.length
                ta = sc.keep(_derive(k.key, _ecbdiv_data(LABEL_TA, lv(sn), -(-n // 16)),
                                     _TA_DIV, 8 * n))
                check = _sign(ta, bytes(16), CKM.AES_CMAC)[:5]
                flags |= FLAG_DIVERSIFIED
            else:
                ta = k.key
                check = i.kcv
            h = KeyHeader(suite=SUITE_ECBDIV, key_type=i.key_type, key_length=i.length,
                          usage=i.attrs.usage, mode=i.attrs.mode, version=i.version,
                          exportability=i.attrs.exportability, flags=flags).encode()
            w = _wrap(kenc, ta)
            sc.drop(kenc)
            if ksas is None:
                assert self._signer is not None
                digest = bytes(self.session.digest(cast(pkcs11.Key, ta), mechanism=CKM.SHA256))
                sas = _sign(self._signer, LABEL_SAS + h + lv(sn) + bytes((ref2,)) + digest,
                            CKM.EDDSA)
            else:
                sas = self._clear_sas(sc, ksas, h, ta)
            cas = _sign(kmac, cas_message(sn, r, ref2, h, w, sas), CKM.AES_CMAC)
        return Exported(msg.ImportData(ref2, h, w, sas, cas).encode(), h, check)

    def _clear_sas(self, sc: _Scope, ksas: pkcs11.Object, h: bytes,
                   ta: pkcs11.Object) -> bytes:
        """SAS = AES-CMAC(Ksas, "KLP1-SAS" || H || TA') with TA' briefly in host memory
        (``clear_sas=True`` only): wrapped under an ephemeral session key, unwrapped here,
        MACed by Ksas in the token, then overwritten.
        """
        eph = sc.keep(self.session.generate_key(CKK.AES, 256, mechanism=CKM.AES_KEY_GEN,
                                                capabilities=MechanismFlag(0), template=_EPHEMERAL))
        ev = bytes(eph[A.VALUE])
        clear = b""
        try:
            wrapped = _wrap(eph, ta)
            sc.drop(eph)
            clear = aes_kwp_unwrap(ev, wrapped)
            return _sign(ksas, iter((LABEL_SAS + h, clear)), CKM.AES_CMAC)
        finally:
            scrub(ev)
            scrub(clear)

    def receipt(self, suite: int, set_id: bytes, sn: bytes, r: bytes, ref2: int, h: bytes,
                kcv_: bytes) -> bytes:
        """RCT = AES-CMAC(Kmac, "KLP1-RCT" || …) with a freshly derived Kmac (SIGN only)."""
        if suite != SUITE_ECBDIV:
            raise Unsupported(f"suite {suite:#04x} not offered by this PKCS#11 authority")
        with self._lock:
            t = self._set(set_id)
            dl = _ecbdiv_data(LABEL_DL, lv(sn) + r + bytes((ref2,)), 4)
            try:
                with _scope() as sc:
                    t1 = sc.keep(_derive(t.key, _ecbdiv_data(LABEL_T1, sn, 2), _T1, 256))
                    kmac = sc.keep(_derive(t1, dl[32:64], _KMAC, 256))
                    sc.drop(t1)
                    return _sign(kmac, _rct_message(sn, r, ref2, h, kcv_), CKM.AES_CMAC)
            except pkx.PKCS11Error as e:
                raise _token_error("compute a receipt", e) from e

    # -- self-test ------------------------------------------------------------------------
    def _self_test(self) -> tuple[bool, bool]:
        """Known-answer tests of two token behaviours KLP1 relies on, on fixed test keys:

        - ECB derivation of 32 bytes of data with ``CKA_VALUE_LEN`` 24 keeps the leftmost
          24 bytes (diversified AES-192), checked through CMAC in the token;
        - ``CKM_AES_KEY_WRAP_PAD`` of a 20-byte key is RFC 5649 (SoftHSM 2.6.1 is not: it
          zero-pads the key first and writes the padded length in the header).

        Returns (AES-192 diversification ok, wrap of any key length ok).
        """
        div_key, kek, odd = bytes(range(24)), bytes(range(32, 64)), bytes(range(64, 84))
        want = bytearray(24)
        ecbdiv_into(div_key, want, label=LABEL_TA, context=b"\x03KAT")
        with self._lock, _scope() as sc:
            try:
                base = sc.keep(self.session.create_object(
                    {**secret_template(CKK.AES, token=False, extractable=False,
                                       allow=(A.DERIVE,)), A.VALUE: div_key}))
                d = sc.keep(_derive(base, _ecbdiv_data(LABEL_TA, b"\x03KAT", 2), _TA_DIV, 192))
                div_ok = ct_equal(_sign(d, bytes(16), CKM.AES_CMAC), aes_cmac(want, bytes(16)))
            except pkx.PKCS11Error:
                div_ok = False
            try:
                k = sc.keep(self.session.create_object(
                    {**secret_template(CKK.AES, token=False, extractable=False,
                                       allow=(A.WRAP,)), A.VALUE: kek}))
                o = sc.keep(self.session.create_object(
                    {**secret_template(CKK.GENERIC_SECRET, token=False, extractable=True),
                     A.VALUE: odd}))
                wrap_ok = _wrap(k, o) == aes_kwp_wrap(kek, odd)
            except pkx.PKCS11Error:
                wrap_ok = False
        return div_ok, wrap_ok

    def _check_length(self, length: int) -> None:
        if length % 8 and not self._wrap_any_length:
            raise ValueError(
                f"token {self.token_label!r} cannot wrap a {length}-byte key as RFC 5649 says "
                "(its CKM_AES_KEY_WRAP_PAD writes the zero-padded length in the header, as "
                "SoftHSM 2.6.1 does): use a length that is a multiple of 8")


# Imported objects: neither copyable nor modifiable (CKA_MODIFIABLE last: see _final).
_LOCKED: dict[A, Any] = {A.COPYABLE: False, A.MODIFIABLE: False}


def _modifiable_last(tmpl: dict[A, Any]) -> dict[A, Any]:
    if A.MODIFIABLE in tmpl:
        v = tmpl.pop(A.MODIFIABLE)
        tmpl[A.MODIFIABLE] = v
    return tmpl


def _final(key_id: bytes, label: str) -> dict[A, Any]:
    """The C_CopyObject template that turns a session precursor into the token object.

    Order matters: SoftHSM applies a copy template in order, and refuses any attribute
    after ``CKA_MODIFIABLE`` false (AttributeReadOnly); so it comes last.
    """
    return {A.TOKEN: True, A.SIGN: False, A.ID: key_id, A.LABEL: label, A.MODIFIABLE: False}


# python-pkcs11 builds each object's class at run time from its usage flags; these typed
# wrappers name the one capability each call needs.
def _derive(base: pkcs11.Object, data: bytes, template: dict[A, Any],
            bits: int) -> pkcs11.Object:
    """``CKM_AES_ECB_ENCRYPT_DATA``: a session key = leftmost ``bits`` of AES-ECB_base(data)."""
    return cast(DeriveMixin, base).derive_key(
        template[A.KEY_TYPE], bits, mechanism=CKM.AES_ECB_ENCRYPT_DATA, mechanism_param=data,
        capabilities=MechanismFlag(0), template=template)


def _sign(key: pkcs11.Object, data: bytes | Iterator[bytes], mech: CKM) -> bytes:
    return bytes(cast(SignMixin, key).sign(data, mechanism=mech))


def _wrap(kek: pkcs11.Object, key: pkcs11.Object) -> bytes:
    """``CKM_AES_KEY_WRAP_PAD`` (RFC 5649), mechanism 0x210A."""
    return bytes(cast(WrapMixin, kek).wrap_key(cast(pkcs11.Key, key),
                                               mechanism=CKM.AES_KEY_WRAP_PAD))


def _raw_ed25519_point(point: bytes) -> bytes:
    """CKA_EC_POINT of an Ed25519 key: DER OCTET STRING of 32 bytes (or the raw 32)."""
    if len(point) == 34 and point[:2] == b"\x04\x20":
        return point[2:]
    if len(point) == 32:
        return point
    raise DamagedStore("the SAS public key is not an Ed25519 point")


def _key_info(doc: dict[str, Any]) -> KeyInfo:
    kt = KeyType(int(doc["type"]))
    return KeyInfo(ref1=bytes.fromhex(doc["ref1"]), key_type=kt, length=int(doc["length"]),
                   attrs=KeyAttributes(doc["usage"], doc["mode"], doc["exportability"]),
                   version=int(doc["version"]), diversify=bool(doc["diversify"]),
                   policy=ExportPolicy.from_json(doc["policy"]), kcv=bytes.fromhex(doc["kcv"]),
                   label=str(doc.get("label", "")))


def _release_login(key: tuple[str, bytes]) -> None:
    with _LOGINS_LOCK:
        login = _LOGINS.get(key)
        if login is None:
            return
        login.users -= 1
        if login.users <= 0:
            del _LOGINS[key]
            with suppress(pkx.PKCS11Error):
                login.anchor.close()  # C_Logout, then C_CloseSession
