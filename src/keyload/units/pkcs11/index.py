"""What a keystore knows of its token: the sets and keys its metadata objects describe.

Each token object keyload makes has a ``CKO_DATA`` companion (``CKA_APPLICATION``
``keyload``) holding JSON that names the object's ``CKA_ID`` (see
:mod:`~keyload.units.pkcs11.objects`). :class:`TokenIndex` reads them all when a keystore
opens, and is the state every part of :class:`~keyload.units.pkcs11.Pkcs11Keystore` works on.

An identity set (suite 0x03) is one document naming its two key pairs and holding C_A;
its register is one document per certified unit (set id, SN, C_U) and one per revocation
(set id, SN), all beside the others, never modified: a revocation is added, not written
over. At open the set id is recomputed from Q_CA and C_A checked under it.
"""

from __future__ import annotations

import json
import threading
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import pkcs11
from pkcs11 import Attribute as A
from pkcs11 import ObjectClass as CKO
from pkcs11 import exceptions as pkx

from ...core.errors import DamagedStore, IntegrityError, MalformedData
from ...core.identity import ROLE_AUTHORITY, Certificate, identity_set_id, verify_certificate
from ...core.keys import KeyAttributes, KeyType
from ..authority import (
    ExportPolicy,
    IdentitySetInfo,
    KeyInfo,
    SetInfo,
    UnitRecord,
    find_key,
    find_set,
)
from .objects import ID_SAS, raw_ed25519_point, raw_p256_point
from .session import LoginKey, Pkcs11Error, token_error

APPLICATION = "keyload"
META_FORMAT = "keyload-pkcs11-1"


@dataclass
class SetEntry:
    info: SetInfo
    key: pkcs11.Object
    meta: pkcs11.Object


@dataclass
class KeyEntry:
    info: KeyInfo
    key: pkcs11.Object
    meta: pkcs11.Object
    key_id: bytes


@dataclass
class IdentityEntry:
    """An identity set in the token: d_CA and d_A (private key objects, SIGN only), its
    public part, and the register of units by SN."""

    info: SetInfo
    public: IdentitySetInfo
    ca: pkcs11.Object
    authority: pkcs11.Object
    units: dict[bytes, UnitRecord]


def key_info_of(doc: dict[str, Any]) -> KeyInfo:
    """The KeyInfo a key's metadata document describes."""
    kt = KeyType(int(doc["type"]))
    return KeyInfo(ref1=bytes.fromhex(doc["ref1"]), key_type=kt, length=int(doc["length"]),
                   attrs=KeyAttributes(doc["usage"], doc["mode"], doc["exportability"]),
                   version=int(doc["version"]), diversify=bool(doc["diversify"]),
                   policy=ExportPolicy.from_json(doc["policy"]), kcv=bytes.fromhex(doc["kcv"]),
                   label=str(doc.get("label", "")), origin=str(doc.get("origin", "")))


def key_doc(key_id: bytes, info: KeyInfo) -> dict[str, Any]:
    """The metadata document of an application key (read back by :func:`key_info_of`)."""
    attrs = info.attrs
    return {"kind": "key", "key_id": key_id.hex(), "ref1": info.ref1.hex(),
            "type": int(info.key_type), "length": info.length, "usage": attrs.usage,
            "mode": attrs.mode, "exportability": attrs.exportability,
            "version": info.version, "diversify": info.diversify,
            "policy": info.policy.to_json(), "kcv": info.kcv.hex(), "label": info.label,
            **({"origin": info.origin} if info.origin else {})}


class TokenIndex:
    """One logged-in session on a token and the keyload objects found in it.

    The session is reused for every operation, guarded by ``_lock`` (PKCS#11 sessions are
    not for concurrent use).
    """

    module: str
    token: pkcs11.Token
    token_label: str
    clear_sas: bool
    _session: pkcs11.Session | None
    _login_key: LoginKey
    _lock: threading.RLock
    _sets: dict[bytes, SetEntry]
    _keys: dict[bytes, KeyEntry]
    _identities: dict[bytes, IdentityEntry]
    _signer: pkcs11.Object | None
    _public: bytes | None
    _ed25519: bool
    _p256: bool
    _aes192_div: bool
    _wrap_any_length: bool

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
            register: list[dict[str, Any]] = []
            for doc, obj in metas:
                if doc["kind"] == "identity":
                    self._load_identity(doc)
                elif doc["kind"] in ("unit", "revocation"):
                    register.append(doc)
                elif doc["kind"] == "set":
                    set_id = bytes.fromhex(doc["set_id"])
                    t = self._find_secret(bytes.fromhex(doc["key_id"]), doc)
                    self._sets[set_id] = SetEntry(
                        SetInfo(set_id, doc["name"], bool(doc["signed"])), t, obj)
                elif doc["kind"] == "key":
                    ref1 = bytes.fromhex(doc["ref1"])
                    old = best.get(ref1)
                    # a lower version is left over by an interrupted replacement: ignored
                    if old is None or int(old[0]["version"]) < int(doc["version"]):
                        best[ref1] = (doc, obj)
            for ref1, (doc, obj) in best.items():
                key_id = bytes.fromhex(doc["key_id"])
                self._keys[ref1] = KeyEntry(key_info_of(doc), self._find_secret(key_id, doc),
                                            obj, key_id)
            self._load_register(register)
            self._load_signer()
        except (KeyError, ValueError, TypeError, MalformedData, IntegrityError) as e:
            raise DamagedStore(f"keyload metadata in token {self.token_label!r} is damaged "
                               f"({type(e).__name__})") from None
        except pkx.PKCS11Error as e:
            raise token_error("list its objects", e) from e

    def _find_secret(self, key_id: bytes, doc: dict[str, Any]) -> pkcs11.Object:
        found = list(self.session.get_objects({A.CLASS: CKO.SECRET_KEY, A.ID: key_id}))
        if len(found) != 1:
            raise DamagedStore(f"token {self.token_label!r}: {len(found)} key objects for "
                               f"keyload {doc['kind']} {doc.get('label') or key_id.hex()}")
        return found[0]

    def _key_pair(self, key_id: bytes, what: str) -> tuple[pkcs11.Object, bytes]:
        """The private key object and the public point (65 bytes) of P-256 pair ``key_id``."""
        privs = list(self.session.get_objects({A.CLASS: CKO.PRIVATE_KEY, A.ID: key_id}))
        pubs = list(self.session.get_objects({A.CLASS: CKO.PUBLIC_KEY, A.ID: key_id}))
        if len(privs) != 1 or len(pubs) != 1:
            raise DamagedStore(f"token {self.token_label!r}: {what} is missing or duplicated")
        return privs[0], raw_p256_point(bytes(pubs[0][A.EC_POINT]))

    def _load_identity(self, doc: dict[str, Any]) -> None:
        set_id = bytes.fromhex(doc["set_id"])
        what = f"identity set {set_id.hex()}"
        ca, q_ca = self._key_pair(bytes.fromhex(doc["ca_key"]), f"the CA key of {what}")
        d_a, q_a = self._key_pair(bytes.fromhex(doc["authority_key"]),
                                  f"the authority key of {what}")
        c_a = Certificate.decode(bytes.fromhex(doc["c_a"]))
        if identity_set_id(q_ca) != set_id or c_a.public_key != q_a:
            raise DamagedStore(f"token {self.token_label!r}: the keys of {what} do not match "
                               "its metadata")
        verify_certificate(c_a, q_ca=q_ca, role=ROLE_AUTHORITY, set_id=set_id)
        info = SetInfo(set_id, doc["name"], identity=True)
        self._identities[set_id] = IdentityEntry(
            info, IdentitySetInfo(set_id, info.name, q_ca, c_a), ca, d_a, {})

    def _load_register(self, docs: list[dict[str, Any]]) -> None:
        """Certified units first, then their revocations (a document each, §10.4)."""
        for doc in sorted(docs, key=lambda d: d["kind"] != "unit"):
            set_id, sn = bytes.fromhex(doc["set_id"]), bytes.fromhex(doc["sn"])
            ident = self._identities.get(set_id)
            old = None if ident is None else ident.units.get(sn)
            cert: Certificate | None = None if old is None else old.certificate
            if doc["kind"] == "unit":
                cert = Certificate.decode(bytes.fromhex(doc["certificate"]))
                fits = old is None and cert.set_id == set_id and cert.subject == sn
            else:  # a revocation of a unit in the register
                fits = cert is not None
            if ident is None or cert is None or not fits:
                raise DamagedStore(f"token {self.token_label!r}: the register of set "
                                   f"{set_id.hex()} is damaged at unit {sn.hex()}")
            ident.units[sn] = UnitRecord(set_id, sn, cert, doc["kind"] == "revocation")

    def _load_signer(self) -> None:
        privs = list(self.session.get_objects({A.CLASS: CKO.PRIVATE_KEY, A.ID: ID_SAS}))
        pubs = list(self.session.get_objects({A.CLASS: CKO.PUBLIC_KEY, A.ID: ID_SAS}))
        if not privs and not pubs:
            return
        if len(privs) != 1 or len(pubs) != 1:
            raise DamagedStore(f"token {self.token_label!r}: the SAS key is incomplete or "
                               "duplicated")
        point = bytes(pubs[0][A.EC_POINT])
        self._public = raw_ed25519_point(point)
        self._signer = privs[0]

    def _check(self, obj: pkcs11.Object, want: dict[A, Any], what: str) -> None:
        """Read back security attributes: a token that ignored a template is an error."""
        got = obj.get_attributes(list(want))
        wrong = [a.name for a, v in want.items() if got.get(a) != v]
        if wrong:
            raise Pkcs11Error(f"the token did not apply {', '.join(wrong)} to {what}")

    def _destroy_quietly(self, *objs: pkcs11.Object) -> None:
        """Remove superseded token objects; one left behind is ignored by :meth:`_load`."""
        for o in objs:
            with suppress(pkx.PKCS11Error):
                o.destroy()

    def _put_meta(self, label: str, doc: dict[str, Any]) -> pkcs11.Object:
        doc = {"format": META_FORMAT, **doc}
        return self.session.create_object({
            A.CLASS: CKO.DATA, A.TOKEN: True, A.PRIVATE: True, A.APPLICATION: APPLICATION,
            A.LABEL: label, A.VALUE: json.dumps(doc, sort_keys=True).encode(),
            A.MODIFIABLE: False})

    # -- lookups ----------------------------------------------------------------------------
    def _set(self, set_id: bytes) -> SetEntry:
        return find_set(self._sets, set_id)

    def _key(self, ref1: bytes) -> KeyEntry:
        return find_key(self._keys, ref1)

    def _identity(self, set_id: bytes) -> IdentityEntry:
        return find_set(self._identities, set_id)

    def set_info(self, set_id: bytes) -> SetInfo:
        ident = self._identities.get(set_id)
        return ident.info if ident is not None else self._set(set_id).info

    def key_info(self, ref1: bytes) -> KeyInfo:
        return self._key(ref1).info

    def set_infos(self) -> list[SetInfo]:
        return [t.info for t in self._sets.values()] + \
            [i.info for i in self._identities.values()]

    def key_infos(self) -> list[KeyInfo]:
        return [k.info for k in self._keys.values()]

    def older_key_infos(self) -> list[KeyInfo]:
        return []  # a token keeps one version of a REF1 (a new one is refused there)

    def public_key(self) -> bytes | None:
        return self._public
