"""The objects keyload makes in a PKCS#11 token, their templates, and the typed calls that
make and use them.

Objects in the token (all ``CKA_TOKEN``, ``CKA_PRIVATE``, ``CKA_MODIFIABLE`` false; the
usage flags not listed are explicitly false: SoftHSM defaults them to true)

===================  ========================================================================
T (per set)          CKK_AES 256, SENSITIVE, not EXTRACTABLE, DERIVE only. ``CKA_ID`` =
                     ``KLP1-T`` || set id, ``CKA_LABEL`` = ``keyload T <set id>``.
application key TA   CKK_AES (types 01–03) or CKK_GENERIC_SECRET (HMAC, 0x10); SENSITIVE
                     and EXTRACTABLE (it leaves the token only wrapped); DERIVE only when
                     the key is diversified; SIGN (CMAC) only for a KBPK, usage K1 (the
                     KBEK and KBAK of a key block). ``CKA_ID`` = ``KLP1-K`` || version || REF1.
SAS key              CKK_EC_EDWARDS (Ed25519) private key: SENSITIVE, not EXTRACTABLE, not
                     COPYABLE, SIGN only; its public key object: VERIFY only. ``CKA_ID``
                     ``KLP1-SAS``, label ``keyload SAS``. Made once; never replaced here.
set CA key, d_CA     CKK_EC (P-256) private key of an identity set (suite 0x03): SENSITIVE,
                     not EXTRACTABLE, not COPYABLE, SIGN only (certificates); its public
                     key object (Q_CA): VERIFY only. ``CKA_ID`` = ``KLP1-CA`` || 8 random
                     bytes (the set id is known only once Q_CA is; the set's metadata
                     names the key), label ``keyload CA``.
authority key, d_A   the same, ``CKA_ID`` = ``KLP1-AS`` || 8 random bytes, label ``keyload
                     authority``; SIGN only (the SAS of every export).
metadata             CKO_DATA, ``CKA_APPLICATION`` ``keyload``, ``CKA_LABEL`` = the label
                     of its key, ``CKA_VALUE`` = JSON (set: name, signed; key: REF1, type,
                     length, usage, mode, exportability, version, diversify, export policy,
                     KCV, label; identity set: name, the two keys' ``CKA_ID``, C_A; a
                     certified unit: set id, SN, C_U; a revocation: set id, SN) holding
                     the key's ``CKA_ID`` (SoftHSM refuses ``CKA_ID`` on a data object, so
                     the JSON carries the link).
===================  ========================================================================

Every object derived during one operation is a session object (``CKA_TOKEN`` false), made
in a :func:`scope` that destroys it on every path; so is the ephemeral pair (e_A, E_A) of a
suite-0x03 export and the Z it derives.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import pkcs11
from pkcs11 import KDF, MechanismFlag
from pkcs11 import Attribute as A
from pkcs11 import KeyType as CKK
from pkcs11 import Mechanism as CKM
from pkcs11 import ObjectClass as CKO
from pkcs11 import exceptions as pkx
from pkcs11.types import DeriveMixin, SignMixin, WrapMixin

from ...core.ecc import POINT_LEN
from ...core.errors import DamagedStore
from ...core.keys import KeyType
from ...core.primitives import sha256
from .session import token_error

ID_T = b"KLP1-T"
ID_KEY = b"KLP1-K"
ID_SAS = b"KLP1-SAS"
LABEL_SAS_KEY = "keyload SAS"
ED25519_OID = bytes.fromhex("06032b6570")  # id-Ed25519 (RFC 8410), DER
ID_CA = b"KLP1-CA"
ID_AS = b"KLP1-AS"
P256_OID = bytes.fromhex("06082a8648ce3d030107")  # prime256v1 (RFC 5480), DER

# Mechanisms suite 0x02 needs, and what key management needs.
SUITE2_MECHANISMS = (CKM.AES_ECB_ENCRYPT_DATA, CKM.AES_KEY_WRAP_PAD, CKM.AES_CMAC)
MANAGEMENT_MECHANISMS = (CKM.AES_KEY_GEN, CKM.GENERIC_SECRET_KEY_GEN, CKM.SHA256_HMAC,
                         CKM.SHA256)
ED25519_MECHANISMS = (CKM.EDDSA, CKM.EC_EDWARDS_KEY_PAIR_GEN)
# and suite 0x03 (docs/protocol.md §10), with SUITE2_MECHANISMS
P256_MECHANISMS = (CKM.EC_KEY_PAIR_GEN, CKM.ECDSA, CKM.ECDH1_DERIVE)

_USAGES = (A.ENCRYPT, A.DECRYPT, A.SIGN, A.VERIFY, A.WRAP, A.UNWRAP, A.DERIVE)

# the Ed25519 SAS key pair (CKA_MODIFIABLE last: see final)
SAS_PRIV: dict[A, Any] = {
    A.CLASS: CKO.PRIVATE_KEY, A.KEY_TYPE: CKK.EC_EDWARDS, A.TOKEN: True, A.PRIVATE: True,
    A.SENSITIVE: True, A.EXTRACTABLE: False, A.SIGN: True, A.DECRYPT: False,
    A.UNWRAP: False, A.DERIVE: False, A.SIGN_RECOVER: False, A.ID: ID_SAS,
    A.LABEL: LABEL_SAS_KEY, A.COPYABLE: False, A.MODIFIABLE: False}
SAS_PUB: dict[A, Any] = {
    A.CLASS: CKO.PUBLIC_KEY, A.KEY_TYPE: CKK.EC_EDWARDS, A.TOKEN: True, A.PRIVATE: False,
    A.VERIFY: True, A.ENCRYPT: False, A.WRAP: False, A.DERIVE: False,
    A.VERIFY_RECOVER: False, A.ID: ID_SAS, A.LABEL: LABEL_SAS_KEY, A.MODIFIABLE: False}

# the P-256 keys of an identity set (d_CA, d_A): signing keys, never leaving the token
EC_PRIV: dict[A, Any] = {
    A.CLASS: CKO.PRIVATE_KEY, A.KEY_TYPE: CKK.EC, A.TOKEN: True, A.PRIVATE: True,
    A.SENSITIVE: True, A.EXTRACTABLE: False, A.SIGN: True, A.DECRYPT: False,
    A.UNWRAP: False, A.DERIVE: False, A.SIGN_RECOVER: False, A.COPYABLE: False,
    A.MODIFIABLE: False}
EC_PUB: dict[A, Any] = {
    A.CLASS: CKO.PUBLIC_KEY, A.KEY_TYPE: CKK.EC, A.TOKEN: True, A.PRIVATE: False,
    A.EC_PARAMS: P256_OID, A.VERIFY: True, A.ENCRYPT: False, A.WRAP: False,
    A.DERIVE: False, A.VERIFY_RECOVER: False, A.MODIFIABLE: False}
# the ephemeral pair (e_A, E_A) of one suite-0x03 export: session objects, e_A DERIVE only
EPH_PRIV: dict[A, Any] = {
    A.CLASS: CKO.PRIVATE_KEY, A.KEY_TYPE: CKK.EC, A.TOKEN: False, A.PRIVATE: True,
    A.SENSITIVE: True, A.EXTRACTABLE: False, A.SIGN: False, A.DECRYPT: False,
    A.UNWRAP: False, A.DERIVE: True, A.SIGN_RECOVER: False}
EPH_PUB: dict[A, Any] = {
    A.CLASS: CKO.PUBLIC_KEY, A.KEY_TYPE: CKK.EC, A.TOKEN: False, A.PRIVATE: False,
    A.EC_PARAMS: P256_OID, A.VERIFY: False, A.ENCRYPT: False, A.WRAP: False,
    A.DERIVE: False, A.VERIFY_RECOVER: False}


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
T1_SESSION = secret_template(CKK.AES, token=False, extractable=False, allow=(A.DERIVE,))
KENC_SESSION = secret_template(CKK.AES, token=False, extractable=False, allow=(A.WRAP,))
KMAC_SESSION = secret_template(CKK.AES, token=False, extractable=False, allow=(A.SIGN,))
KSAS_SESSION = KMAC_SESSION
# TA' diversified: wrapped by Kenc (extractable, sensitive), SIGN for its KCV only
TA_DIV_SESSION = secret_template(CKK.AES, token=False, extractable=True, allow=(A.SIGN,))
# Z = ECDH(e_A, E_U) as an AES-256 key (docs/protocol.md §10.3): T1 is derived from it
Z_SESSION = T1_SESSION
# ephemeral key for clear_sas: its value is read by the host
EPHEMERAL = secret_template(CKK.AES, token=False, extractable=True, allow=(A.WRAP,),
                            sensitive=False)

# Imported objects: neither copyable nor modifiable (CKA_MODIFIABLE last: see final).
LOCKED: dict[A, Any] = {A.COPYABLE: False, A.MODIFIABLE: False}


def ck_key_type(kt: KeyType) -> CKK:
    return CKK.AES if kt.is_aes else CKK.GENERIC_SECRET


def modifiable_last(tmpl: dict[A, Any]) -> dict[A, Any]:
    if A.MODIFIABLE in tmpl:
        v = tmpl.pop(A.MODIFIABLE)
        tmpl[A.MODIFIABLE] = v
    return tmpl


def final(key_id: bytes, label: str, *, sign: bool = False) -> dict[A, Any]:
    """The C_CopyObject template that turns a session precursor into the token object
    (``sign``: the object keeps SIGN, a KBPK's; else only the precursor had it).

    Order matters: SoftHSM applies a copy template in order, and refuses any attribute
    after ``CKA_MODIFIABLE`` false (AttributeReadOnly); so it comes last.
    """
    return {A.TOKEN: True, A.SIGN: sign, A.ID: key_id, A.LABEL: label, A.MODIFIABLE: False}


# -- typed calls ------------------------------------------------------------------------
# python-pkcs11 builds each object's class at run time from its usage flags; these typed
# wrappers name the one capability each call needs.
def derive(base: pkcs11.Object, data: bytes, template: dict[A, Any],
           bits: int) -> pkcs11.Object:
    """``CKM_AES_ECB_ENCRYPT_DATA``: a session key = leftmost ``bits`` of AES-ECB_base(data)."""
    return cast(DeriveMixin, base).derive_key(
        template[A.KEY_TYPE], bits, mechanism=CKM.AES_ECB_ENCRYPT_DATA, mechanism_param=data,
        capabilities=MechanismFlag(0), template=template)


def sign(key: pkcs11.Object, data: bytes | Iterator[bytes], mech: CKM) -> bytes:
    return bytes(cast(SignMixin, key).sign(data, mechanism=mech))


def wrap(kek: pkcs11.Object, key: pkcs11.Object) -> bytes:
    """``CKM_AES_KEY_WRAP_PAD`` (RFC 5649), mechanism 0x210A."""
    return bytes(cast(WrapMixin, kek).wrap_key(cast(pkcs11.Key, key),
                                               mechanism=CKM.AES_KEY_WRAP_PAD))


def ecdh(e: pkcs11.Object, peer: bytes, template: dict[A, Any]) -> pkcs11.Object:
    """``CKM_ECDH1_DERIVE`` (``CKD_NULL``, no shared data): a session AES-256 key whose
    value is Z, the X coordinate of e·peer (``peer``: a 65-byte uncompressed point)."""
    return cast(DeriveMixin, e).derive_key(
        CKK.AES, 256, mechanism=CKM.ECDH1_DERIVE, mechanism_param=(KDF.NULL, None, peer),
        capabilities=MechanismFlag(0), template=template)


class TokenEcdsa:
    """An :class:`~keyload.core.ecc.EcdsaSigner` over a P-256 private key in the token:
    ``CKM_ECDSA`` over SHA-256(message), the digest computed on the host (the messages are
    public). The token draws its nonces: two signatures of one message differ, and both
    verify (docs/protocol.md §10.3).
    """

    __slots__ = ("key",)

    def __init__(self, key: pkcs11.Object) -> None:
        self.key = key

    def sign(self, message: bytes) -> bytes:
        return sign(self.key, sha256(message), CKM.ECDSA)


def raw_p256_point(point: bytes) -> bytes:
    """CKA_EC_POINT of a P-256 key: DER OCTET STRING of the 65-byte point (or the raw 65)."""
    if len(point) == POINT_LEN + 2 and point[:2] == b"\x04\x41":
        point = point[2:]
    if len(point) != POINT_LEN or point[0] != 0x04:
        raise DamagedStore("a public key in the token is not an uncompressed P-256 point")
    return point


def raw_ed25519_point(point: bytes) -> bytes:
    """CKA_EC_POINT of an Ed25519 key: DER OCTET STRING of 32 bytes (or the raw 32)."""
    if len(point) == 34 and point[:2] == b"\x04\x20":
        return point[2:]
    if len(point) == 32:
        return point
    raise DamagedStore("the SAS public key is not an Ed25519 point")


# -- session objects of one operation ----------------------------------------------------
class Scope:
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
            raise token_error("destroy a session object", errors[0])


@contextmanager
def scope() -> Iterator[Scope]:
    s = Scope()
    try:
        yield s
    except BaseException:
        s.close(failing=True)
        raise
    s.close(failing=False)
