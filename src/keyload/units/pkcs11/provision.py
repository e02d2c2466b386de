"""Making the authority's keys in the token: transport keys, application keys, the SAS key.

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

Every object is installed all or nothing (:meth:`Provisioning._install`); a replaced key's
old objects are destroyed after its successor is in.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from typing import Any

import pkcs11
from pkcs11 import Attribute as A
from pkcs11 import KeyType as CKK
from pkcs11 import Mechanism as CKM
from pkcs11 import MechanismFlag
from pkcs11 import ObjectClass as CKO
from pkcs11 import exceptions as pkx

from ...core.errors import AuthenticityError
from ...core.keyblock import KBPK_USAGE
from ...core.keys import KeyAttributes, KeyType, kcv
from ...core.primitives import ct_equal, ed25519_public, ed25519_verify
from ...core.ref1 import display_ref1
from ...core.secret import Secret, scrub
from ..authority import ExportPolicy, KeyInfo, SetInfo, validate_new_key, validate_new_set
from .index import KeyEntry, SetEntry, TokenIndex, key_doc
from .objects import (
    ED25519_OID,
    ID_KEY,
    ID_T,
    LOCKED,
    SAS_PRIV,
    SAS_PUB,
    ck_key_type,
    final,
    modifiable_last,
    raw_ed25519_point,
    scope,
    secret_template,
    sign,
)
from .session import Pkcs11Error, token_error


class Provisioning(TokenIndex):
    """The key-administration calls (:class:`~keyload.units.authority.KeyAdministration`)."""

    # -- token helpers --------------------------------------------------------------------
    def _token_kcv(self, obj: pkcs11.Object, kt: KeyType) -> bytes:
        mech = CKM.SHA256_HMAC if kt == KeyType.HMAC_SHA256 else CKM.AES_CMAC
        return sign(obj, bytes(16), mech)[:5]

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
            return self.session.create_object(modifiable_last({**tmpl, A.VALUE: raw}))
        finally:
            scrub(raw)

    def _check_length(self, length: int) -> None:
        if length % 8 and not self._wrap_any_length:
            raise ValueError(
                f"token {self.token_label!r} cannot wrap a {length}-byte key as RFC 5649 says "
                "(its CKM_AES_KEY_WRAP_PAD writes the zero-padded length in the header, as "
                "SoftHSM 2.6.1 does): use a length that is a multiple of 8")

    # -- transport keys ---------------------------------------------------------------------
    def add_set(self, value: Secret, name: str, *, signed: bool = False) -> SetInfo:
        """Import a transport key T (AES-256); returns its set id = KCV(T).

        The KCV is computed on the host and, as a known-answer test of the routine used for
        generated keys, by the token on a session copy; both must agree. The value is
        consumed: ``value`` is wiped once it is in the token (or on failure).
        """
        try:
            return self._new_set(value, name, signed)
        finally:
            value.wipe()

    def generate_set(self, name: str, *, signed: bool = False) -> SetInfo:
        """Generate T in the token (it never leaves); returns its set id."""
        return self._new_set(None, name, signed)

    def transport_key_copy(self, set_id: bytes) -> Secret:
        """Never: T does not leave the token (ValueError). An emulated unit of a PKCS#11
        set is made from the components T was imported from."""
        raise ValueError("T never leaves this token: give the set's components with "
                         "--components N")

    def _new_set(self, value: Secret | None, name: str, signed: bool) -> SetInfo:
        with self._lock:
            validate_new_set(32 if value is None else len(value), signed=signed,
                             has_signer=self._signer is not None)
            fin = secret_template(CKK.AES, token=True, extractable=False, allow=(A.DERIVE,))
            size = {A.VALUE_LEN: 32}  # read back only: C_CreateObject refuses CKA_VALUE_LEN
            try:
                with scope() as sc:
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
                    t, meta = self._install_key(
                        pre if value is None else value, fin, size, key_id, label, doc,
                        generated={A.NEVER_EXTRACTABLE: True, A.ALWAYS_SENSITIVE: True})
            except pkx.PKCS11Error as e:
                raise token_error("make a transport key", e) from e
            info = SetInfo(set_id, name, signed)
            self._sets[set_id] = SetEntry(info, t, meta)
            return info

    # -- application keys -----------------------------------------------------------------
    def add_key(self, ref1: bytes, key_type: KeyType, value: Secret, attrs: KeyAttributes, *,
                version: int, diversify: bool, policy: ExportPolicy, label: str = "",
                replace: bool = False, origin: str = "") -> KeyInfo:
        """Import an application key from its clear value (components assembled on the
        host); its KCV is computed on the host. The value is consumed: ``value`` is wiped
        once it is in the token (or on failure).
        """
        try:
            return self._new_key(ref1, key_type, len(value), value, attrs, version=version,
                                 diversify=diversify, policy=policy, label=label,
                                 replace=replace, origin=origin)
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
        return self._new_key(ref1, key_type, n, None, attrs, version=version,
                             diversify=diversify, policy=policy, label=label, replace=replace)

    def _new_key(self, ref1: bytes, key_type: KeyType, length: int, value: Secret | None,
                 attrs: KeyAttributes, *, version: int, diversify: bool, policy: ExportPolicy,
                 label: str, replace: bool, origin: str = "") -> KeyInfo:
        with self._lock:
            old = self._keys.get(ref1)
            validate_new_key(ref1, key_type, length, attrs, version=version,
                             diversify=diversify, old=None if old is None else old.info,
                             replace=replace)
            self._check_length(length)
            if diversify and key_type == KeyType.AES192 and not self._aes192_div:
                raise ValueError(f"token {self.token_label!r} does not truncate ECB derivations "
                                 "to CKA_VALUE_LEN: an AES-192 key cannot be diversified in it")
            ck = ck_key_type(key_type)
            bdk = policy.initial_keys_only  # derives IKs in the token, never leaves it
            allow = (A.DERIVE,) if diversify or bdk else ()
            if attrs.usage == KBPK_USAGE:  # a KBPK: CMAC, for a key block's KBEK and KBAK
                allow = (*allow, A.SIGN)
            fin = secret_template(ck, token=True, extractable=not bdk, allow=allow)
            size = {A.VALUE_LEN: length}  # read back only
            key_id = ID_KEY + version.to_bytes(2, "big") + ref1
            obj_label = f"keyload key {display_ref1(ref1)} v{version}"
            try:
                with scope() as sc:
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
                                   check, label, origin)
                    doc = key_doc(key_id, info)
                    k, meta = self._install_key(pre if value is None else value, fin, size,
                                                key_id, obj_label, doc)
            except pkx.PKCS11Error as e:
                raise token_error("make an application key", e) from e
            self._keys[ref1] = KeyEntry(info, k, meta, key_id)
            if old is not None:
                self._destroy_quietly(old.meta, old.key)
            return info

    def _install_key(self, source: pkcs11.Object | Secret, fin: dict[A, Any],
                     size: dict[A, Any], key_id: bytes, label: str, doc: dict[str, Any], *,
                     generated: dict[A, Any] | None = None) -> tuple[pkcs11.Object,
                                                                     pkcs11.Object]:
        """Install a secret key with final template ``fin``: copied from its session
        precursor (generated in the token; its attributes read back with ``generated``
        too), or created from its value (imported: also not copyable). ``size`` is read
        back only.
        """
        if isinstance(source, Secret):
            ident = {A.ID: key_id, A.LABEL: label}
            return self._install(lambda: self._create({**fin, **ident, **LOCKED}, source),
                                 label, {**fin, **size, **LOCKED}, key_id, doc)
        return self._install(lambda: source.copy(final(key_id, label, sign=fin[A.SIGN])),
                             label,
                             {**fin, **size, **(generated or {})}, key_id, doc)

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

    # -- the Ed25519 SAS key ----------------------------------------------------------------
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
                public_template=modifiable_last({**SAS_PUB, A.EC_PARAMS: ED25519_OID}),
                private_template=dict(SAS_PRIV))
            made += [pub, priv]
            raw_pub = raw_ed25519_point(bytes(pub[A.EC_POINT]))
            return self._adopt_signer(priv, raw_pub, made)
        except pkx.PKCS11Error as e:
            self._destroy_quietly(*made)
            raise token_error("generate an Ed25519 key", e) from e

    def _import_signer(self, value: Secret) -> bytes:
        raw_pub = ed25519_public(value.buffer)
        made: list[pkcs11.Object] = []
        raw = bytes(value.buffer)
        try:
            try:
                priv = self.session.create_object(
                    modifiable_last({**SAS_PRIV, A.EC_PARAMS: ED25519_OID, A.VALUE: raw}))
            finally:
                scrub(raw)
            made.append(priv)
            made.append(self.session.create_object(modifiable_last(
                {**SAS_PUB, A.EC_PARAMS: ED25519_OID, A.EC_POINT: b"\x04\x20" + raw_pub})))
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
                ed25519_verify(raw_pub, sign(priv, probe, CKM.EDDSA), probe)
            except AuthenticityError:
                raise Pkcs11Error("the token's Ed25519 signature does not verify with the "
                                  "public key") from None
        except BaseException:
            self._destroy_quietly(*made)
            raise
        self._signer = priv
        self._public = raw_pub
        return raw_pub
