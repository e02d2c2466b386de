"""The software authority: a keystore of transport keys, identity sets, application keys
and an optional Ed25519 signing key, sealed at rest in a vault (see
:mod:`keyload.units.storage`).

Transport keys are found by set id (= KCV(T), docs/protocol.md §1), application keys by REF1.
An identity set (suite 0x03, §10) holds the set CA key d_CA, the authority key d_A with its
certificate C_A, and the register of the units it certified (SN → C_U, active or revoked);
its set id is that of Q_CA. Each export draws a fresh e_A, wiped after it.
Values are held as :class:`~keyload.core.secret.Secret` and wiped by :meth:`close`.
Every change is written atomically; a wrong passphrase or a damaged file is a clear
:class:`~keyload.core.errors.StoreError` and the previous file stays readable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..core import dukpt, klp1
from ..core import messages as msg
from ..core.dukpt import InitialKeyOrder
from ..core.ecc import EcdsaKey, scalar_from
from ..core.errors import StoreError
from ..core.identity import (
    ROLE_AUTHORITY,
    ROLE_UNIT,
    Certificate,
    identity_set_id,
    issue_certificate,
)
from ..core.keys import KeyAttributes, KeyType, aes_kcv, kcv
from ..core.klp1 import Exported, Scratch
from ..core.messages3 import ExportRequest3
from ..core.primitives import aes_cmac
from ..core.secret import Secret, scrub
from ..core.suite3 import SUITE_ECDH, Exported3, Scratch3, export_key3
from ..core.suites import SUITES, get_suite
from .authority import (
    Capabilities,
    ExportPolicy,
    IdentitySetInfo,
    KeyInfo,
    SetInfo,
    UnitRecord,
    check_new_units,
    find_key,
    find_set,
    registered_unit,
    validate_new_key,
    validate_new_set,
)
from .storage import KekSource, Vault

KEYSTORE_FILE = "keystore.sealed"
KIND = "authority-keystore"

# ANSI X9.143 (TR-31) key usages of a symmetric key (keyload holds AES and HMAC keys):
# the asymmetric ones (D1, E7, K2, K3, S0-S2) and codes X9.143 does not assign are refused.
KEY_USAGES = {
    "B0": "base derivation key (BDK)", "B1": "initial DUKPT key", "B2": "base key variant key",
    "B3": "key derivation key (non-X9.24)", "C0": "card verification key",
    "D0": "data encryption", "D2": "decimalization table encryption",
    "D3": "sensitive data encryption", "E0": "EMV master key: application cryptograms",
    "E1": "EMV master key: secure messaging, confidentiality",
    "E2": "EMV master key: secure messaging, integrity",
    "E3": "EMV master key: data authentication code", "E4": "EMV master key: dynamic numbers",
    "E5": "EMV master key: card personalization", "E6": "EMV master key: other",
    "I0": "initialization vector", "K0": "key encryption or wrapping",
    "K1": "TR-31 key block protection key", "K4": "ISO 20038 key block protection key",
    "M0": "ISO 16609 MAC algorithm 1", "M1": "ISO 9797-1 MAC algorithm 1",
    "M2": "ISO 9797-1 MAC algorithm 2", "M3": "ISO 9797-1 MAC algorithm 3",
    "M4": "ISO 9797-1 MAC algorithm 4", "M5": "ISO 9797-1:1999 MAC algorithm 5",
    "M6": "ISO 9797-1:2011 MAC algorithm 5 (CMAC)", "M7": "HMAC",
    "M8": "ISO 9797-1:2011 MAC algorithm 6", "P0": "PIN encryption", "P1": "PIN generation",
    "V0": "PIN verification (other)", "V1": "PIN verification (IBM 3624)",
    "V2": "PIN verification (VISA PVV)", "V3": "PIN verification (X9.132 algorithm 1)",
    "V4": "PIN verification (X9.132 algorithm 2)", "V5": "PIN verification (X9.132 algorithm 3)",
}


def check_usage(usage: str) -> str:
    """``usage`` when it is one of :data:`KEY_USAGES`, else ValueError listing them."""
    if usage not in KEY_USAGES:
        raise ValueError(f"--usage {usage!r}: not an X9.143 key usage of a symmetric key; "
                         f"accepted: {' '.join(KEY_USAGES)} (README: key usages)")
    return usage


@dataclass
class _AppKey:
    info: KeyInfo
    value: Secret


@dataclass
class _TransportKey:
    info: SetInfo
    value: Secret


class _IdentitySet:
    """d_CA, d_A (as signers over wipeable scalars), C_A and the register of units."""

    def __init__(self, name: str, ca: Secret, authority: Secret, authority_id: bytes) -> None:
        self.ca_value, self.authority_value = ca, authority
        self.ca, self.authority = EcdsaKey(ca.buffer), EcdsaKey(authority.buffer)
        set_id = identity_set_id(self.ca.public)
        self.info = SetInfo(set_id, name, identity=True)
        c_a = issue_certificate(self.ca, role=ROLE_AUTHORITY, set_id=set_id,
                                subject=authority_id, public_key=self.authority.public)
        self.public = IdentitySetInfo(set_id, name, self.ca.public, c_a)
        self.units: dict[bytes, UnitRecord] = {}

    def wipe(self) -> None:
        for k in (self.ca, self.authority):
            k.wipe()
        self.ca_value.wipe()
        self.authority_value.wipe()


def _units(set_id: bytes, d: dict[str, Any]) -> dict[bytes, UnitRecord]:
    """An identity set's register as the keystore file holds it."""
    out: dict[bytes, UnitRecord] = {}
    for u in d["units"]:
        cert = Certificate.decode(bytes.fromhex(u["certificate"]))
        out[cert.subject] = UnitRecord(set_id, cert.subject, cert, bool(u["revoked"]))
    return out


class SoftwareKeystore:
    """An :class:`~keyload.units.authority.AuthorityBackend` in software."""

    def __init__(self, vault: Vault | None = None) -> None:
        self.vault = vault
        self._sets: dict[bytes, _TransportKey] = {}
        self._identities: dict[bytes, _IdentitySet] = {}
        self._scratch3 = Scratch3()
        #: where e_A comes from: fresh randomness per export (vectors replay theirs)
        self.draw: Callable[[int], bytes] = os.urandom
        self._keys: dict[bytes, _AppKey] = {}
        #: the older versions of a REF1, oldest first: kept (``key list``), never exported
        self._older: dict[bytes, list[_AppKey]] = {}
        self._signing: Secret | None = None
        self._signer: Ed25519PrivateKey | None = None
        self._scratch = Scratch()
        self._closed = False
        # the keystore file as this process last read or wrote it (see _fresh_register)
        self._stamp: tuple[int, int, int] | None = None

    # -- construction -----------------------------------------------------------
    @classmethod
    def ephemeral(cls) -> SoftwareKeystore:
        """A keystore in memory only (tests, benchmarks, conformance)."""
        return cls(None)

    @classmethod
    def create(cls, directory: Path, source: KekSource | None = None, *,
               scrypt_n: int | None = None) -> SoftwareKeystore:
        if (directory / KEYSTORE_FILE).exists():
            raise StoreError(f"an authority already exists in {directory}")
        vault = Vault.create(directory, source, scrypt_n=scrypt_n)
        ks = cls(vault)
        ks.save()
        return ks

    @classmethod
    def open(cls, directory: Path, source: KekSource | None = None) -> SoftwareKeystore:
        if not (directory / KEYSTORE_FILE).exists() and not Vault.exists(directory):
            raise StoreError(f"no authority in {directory} (run `keyload authority init`)")
        vault = Vault.open(directory, source)
        ks = cls(vault)
        meta, secrets = vault.read_packed(KEYSTORE_FILE, KIND)
        try:
            ks._load(meta, secrets)
        except (KeyError, ValueError, TypeError, IndexError):
            from ..core.errors import DamagedStore

            raise DamagedStore(f"{directory / KEYSTORE_FILE} is damaged") from None
        ks._stamp = ks._file_stamp()
        return ks

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self.vault is None:
            return None
        try:
            st = (self.vault.directory / KEYSTORE_FILE).stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _fresh_register(self) -> None:
        """The register of units as the keystore file holds it now: another process
        (``keyload unit revoke`` while a service runs) may have changed it since this one
        read it, and a revocation takes effect at once. Only the units' records are taken
        again; when the file is unchanged this costs one ``stat``."""
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return
        assert self.vault is not None
        meta, secrets = self.vault.read_packed(KEYSTORE_FILE, KIND)
        try:
            for d in meta.get("identity_sets", []):
                ident = self._identities.get(bytes.fromhex(d["set_id"]))
                if ident is not None:
                    ident.units = _units(ident.info.set_id, d)
        except (KeyError, ValueError, TypeError, IndexError):
            from ..core.errors import DamagedStore

            raise DamagedStore(f"{self.vault.directory / KEYSTORE_FILE} is damaged") from None
        finally:
            for secret in secrets:
                secret.wipe()
        self._stamp = stamp

    def _load(self, meta: dict[str, Any], secrets: list[Secret]) -> None:
        for s in meta["sets"]:
            value = secrets[s["secret"]]
            set_id = aes_kcv(value.buffer)
            if set_id.hex() != s["set_id"]:
                raise ValueError("set id does not match its key")
            self._sets[set_id] = _TransportKey(
                SetInfo(set_id, s["name"], bool(s.get("signed", False))), value)
        for k in meta["keys"]:
            value = secrets[k["secret"]]
            kt = KeyType(k["type"])
            info = KeyInfo(
                ref1=bytes.fromhex(k["ref1"]), key_type=kt, length=len(value),
                attrs=KeyAttributes(k["usage"], k["mode"], k["exportability"]),
                version=int(k["version"]), diversify=bool(k["diversify"]),
                policy=ExportPolicy.from_json(k["policy"]), kcv=kcv(kt, value.buffer),
                label=k.get("label", ""), origin=k.get("origin", ""))
            if k.get("older"):
                self._older.setdefault(info.ref1, []).append(_AppKey(info, value))
            else:
                self._keys[info.ref1] = _AppKey(info, value)
        if meta.get("signing_key") is not None:
            self._set_signing(secrets[meta["signing_key"]])
        for d in meta.get("identity_sets", []):
            ident = _IdentitySet(d["name"], secrets[d["ca"]], secrets[d["authority"]],
                                 bytes.fromhex(d["authority_id"]))
            if ident.info.set_id.hex() != d["set_id"]:
                raise ValueError("set id does not match its CA key")
            ident.units = _units(ident.info.set_id, d)
            self._identities[ident.info.set_id] = ident

    def save(self) -> None:
        if self.vault is None:
            return
        secrets: list[Secret] = []
        sets, keys = [], []
        for t in self._sets.values():
            sets.append({"set_id": t.info.set_id.hex(), "name": t.info.name,
                         "signed": t.info.signed, "secret": len(secrets)})
            secrets.append(t.value)
        older = [(k, True) for ks in self._older.values() for k in ks]
        for k, old in [(k, False) for k in self._keys.values()] + older:
            i = k.info
            keys.append({"ref1": i.ref1.hex(), "type": int(i.key_type), "usage": i.attrs.usage,
                         "mode": i.attrs.mode, "exportability": i.attrs.exportability,
                         "version": i.version, "diversify": i.diversify,
                         "policy": i.policy.to_json(), "label": i.label,
                         "secret": len(secrets), **({"origin": i.origin} if i.origin else {}),
                         **({"older": True} if old else {})})
            secrets.append(k.value)
        meta: dict[str, Any] = {"format": "keyload-keystore-1", "sets": sets, "keys": keys,
                                "signing_key": None}
        if self._signing is not None:
            meta["signing_key"] = len(secrets)
            secrets.append(self._signing)
        meta["identity_sets"] = []
        for ident in self._identities.values():
            meta["identity_sets"].append({
                "set_id": ident.info.set_id.hex(), "name": ident.info.name,
                "ca": len(secrets), "authority": len(secrets) + 1,
                "authority_id": ident.public.c_a.subject.hex(),
                "units": [{"certificate": u.certificate.encode().hex(), "revoked": u.revoked}
                          for u in ident.units.values()]})
            secrets += [ident.ca_value, ident.authority_value]
        self.vault.write_packed(KEYSTORE_FILE, KIND, meta, secrets)
        self._stamp = self._file_stamp()

    def close(self) -> None:
        """Wipe every key and forget them: a closed keystore answers nothing."""
        for t in self._sets.values():
            t.value.wipe()
        for k in [*self._keys.values(), *(k for ks in self._older.values() for k in ks)]:
            k.value.wipe()
        for ident in self._identities.values():
            ident.wipe()
        self._sets.clear()
        self._keys.clear()
        self._older.clear()
        self._identities.clear()
        self._scratch3.wipe()
        self._closed = True
        if self._signing is not None:
            self._signing.wipe()
        self._signer = None
        if self.vault is not None:
            self.vault.close()

    # -- management ------------------------------------------------------------
    def add_set(self, value: Secret, name: str, *, signed: bool = False) -> SetInfo:
        """Install a transport key T (AES-256). Returns its set id = KCV(T).

        ``signed``: exports to this set carry an Ed25519 SAS (units hold the public key).
        """
        validate_new_set(len(value), signed=signed, has_signer=self._signer is not None)
        set_id = aes_kcv(value.buffer)
        self._check_new_set_id(set_id)
        info = SetInfo(set_id, name, signed)
        self._sets[set_id] = _TransportKey(info, value)
        try:
            self.save()
        except BaseException:
            del self._sets[set_id]
            raise
        return info

    def generate_set(self, name: str, *, signed: bool = False) -> SetInfo:
        return self.add_set(Secret.take(os.urandom(32)), name, signed=signed)

    def _check_new_set_id(self, set_id: bytes) -> None:
        """docs/protocol.md §10.1: no two sets (of either kind) with one set id."""
        if set_id in self._sets or set_id in self._identities:
            raise ValueError(f"set {set_id.hex()} already exists")

    # -- identity sets (suite 0x03) ---------------------------------------------
    def add_identity_set(self, ca: Secret, authority: Secret, name: str, *,
                         authority_id: bytes) -> SetInfo:
        """Take in d_CA and d_A (32-byte P-256 scalars) and issue C_A for ``authority_id``
        (1 to 32 bytes). The values are kept (and wiped by :meth:`close`)."""
        ident = _IdentitySet(name, ca, authority, authority_id)
        try:
            self._check_new_set_id(ident.info.set_id)
        except ValueError:
            ident.wipe()
            raise
        self._identities[ident.info.set_id] = ident
        try:
            self.save()
        except BaseException:
            del self._identities[ident.info.set_id]
            ident.wipe()
            raise
        return ident.info

    def generate_identity_set(self, name: str, *, authority_id: bytes) -> SetInfo:
        return self.add_identity_set(Secret.take(bytes(scalar_from(os.urandom))),
                                     Secret.take(bytes(scalar_from(os.urandom))), name,
                                     authority_id=authority_id)

    def _identity(self, set_id: bytes) -> _IdentitySet:
        if self._closed:
            raise StoreError("the keystore is closed")
        return find_set(self._identities, set_id)

    def identity_set(self, set_id: bytes) -> IdentitySetInfo:
        return self._identity(set_id).public

    def certify_unit(self, set_id: bytes, sn: bytes, public_key: bytes) -> Certificate:
        """Issue C_U for (SN, Q_U) and register the unit as active. ValueError for an SN
        already in the register or a key that is not a P-256 point."""
        return self.certify_units(set_id, [(sn, public_key)])[0]

    def certify_units(self, set_id: bytes, units: Sequence[tuple[bytes, bytes]]
                      ) -> list[Certificate]:
        """:meth:`certify_unit` for many (SN, Q_U) at once, the register saved once: every
        unit is certified and registered, or (any refused) none."""
        ident = self._identity(set_id)
        self._fresh_register()  # another process's revocations are kept by this save
        check_new_units(ident.units, set_id, units)
        certs: dict[bytes, Certificate] = {}
        for sn, public_key in units:
            certs[sn] = issue_certificate(ident.ca, role=ROLE_UNIT, set_id=set_id, subject=sn,
                                          public_key=public_key)
        ident.units.update((sn, UnitRecord(set_id, sn, c)) for sn, c in certs.items())
        self._save_or(lambda: [ident.units.pop(sn) for sn in certs])
        return list(certs.values())

    def revoke_unit(self, set_id: bytes, sn: bytes) -> UnitRecord:
        """Mark a certified unit revoked: EXPORTKEY answers it 6983 from then on."""
        ident = self._identity(set_id)
        self._fresh_register()
        old = registered_unit(ident.units, set_id, sn)
        ident.units[sn] = UnitRecord(set_id, sn, old.certificate, True)
        self._save_or(lambda: ident.units.__setitem__(sn, old))
        return ident.units[sn]

    def _save_or(self, undo: Callable[[], object]) -> None:
        try:
            self.save()
        except BaseException:
            undo()
            raise

    def unit_records(self, set_id: bytes) -> list[UnitRecord]:
        ident = self._identity(set_id)
        self._fresh_register()
        return list(ident.units.values())

    def unit_record(self, set_id: bytes, sn: bytes) -> UnitRecord | None:
        ident = self._identity(set_id)
        self._fresh_register()
        return ident.units.get(sn)

    def export3(self, req: ExportRequest3) -> Exported3:
        ident = self._identity(req.base.set_id)
        k = self._keys[req.base.ref1]
        i = k.info
        e_a = scalar_from(self.draw)
        try:
            return export_key3(req, authority=ident.authority, c_a=ident.public.c_a,
                               e_a_scalar=e_a, key_type=i.key_type, key=k.value.buffer,
                               attributes=i.attrs, version=i.version, diversify=i.diversify,
                               scratch=self._scratch3)
        finally:
            e_a[:] = bytes(len(e_a))

    def add_key(self, ref1: bytes, key_type: KeyType, value: Secret, attrs: KeyAttributes, *,
                version: int, diversify: bool, policy: ExportPolicy, label: str = "",
                replace: bool = False, origin: str = "") -> KeyInfo:
        """A new key, or (``replace``) the next version of REF1: the one exported from
        then on, the older versions kept beside it (:meth:`older_key_infos`)."""
        old = self._keys.get(ref1)
        validate_new_key(ref1, key_type, len(value), attrs, version=version,
                         diversify=diversify, old=None if old is None else old.info,
                         replace=replace)
        info = KeyInfo(ref1, key_type, len(value), attrs, version, diversify, policy,
                       kcv(key_type, value.buffer), label, origin)
        self._keys[ref1] = _AppKey(info, value)
        if old is not None:
            self._older.setdefault(ref1, []).append(old)
        try:
            self.save()
        except BaseException:
            if old is None:
                del self._keys[ref1]
            else:
                self._keys[ref1] = self._older[ref1].pop()
            raise
        return info

    def generate_key(self, ref1: bytes, key_type: KeyType, attrs: KeyAttributes, *,
                     version: int, diversify: bool, policy: ExportPolicy,
                     length: int | None = None, label: str = "",
                     replace: bool = False) -> KeyInfo:
        n = length or key_type.default_length
        return self.add_key(ref1, key_type, Secret.take(os.urandom(n)), attrs, version=version,
                            diversify=diversify, policy=policy, label=label, replace=replace)

    def set_signing_key(self, value: Secret | None = None) -> bytes:
        """Install (or generate) the Ed25519 SAS key; returns the public key."""
        self._set_signing(value if value is not None else Secret.take(os.urandom(32)))
        self.save()
        return self.public_key() or b""

    def _set_signing(self, value: Secret) -> None:
        if len(value) != 32:
            raise ValueError("an Ed25519 private key is 32 bytes")
        raw = bytes(value.buffer)
        self._signing = value
        self._signer = Ed25519PrivateKey.from_private_bytes(raw)
        scrub(raw)

    def public_key(self) -> bytes | None:
        if self._signer is None:
            return None
        return self._signer.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def set_infos(self) -> list[SetInfo]:
        return [t.info for t in self._sets.values()] + \
            [i.info for i in self._identities.values()]

    def key_infos(self) -> list[KeyInfo]:
        return [k.info for k in self._keys.values()]

    def older_key_infos(self) -> list[KeyInfo]:
        """The older versions of every REF1 that has them, oldest first."""
        return [k.info for ks in self._older.values() for k in ks]

    def key_cmac(self, ref1: bytes, data: bytes) -> bytes:
        """AES-CMAC of ``data`` under application key ``ref1`` (a KBPK: a key block's KBEK
        and KBAK)."""
        return aes_cmac(self._app_key(ref1).value.buffer, data)

    def _app_key(self, ref1: bytes) -> _AppKey:
        if self._closed:
            raise StoreError("the keystore is closed")
        return find_key(self._keys, ref1)

    def application_key_copy(self, ref1: bytes) -> Secret:
        """A copy of application key ``ref1``, to open or make a key block (its KBPK, or
        the key a block exports). Wipe it after use."""
        return Secret(self._app_key(ref1).value.buffer)

    def transport_key_copy(self, set_id: bytes) -> Secret:
        """A copy of T, for personalizing an emulated unit of the set. Wipe it after use."""
        return Secret(self._transport(set_id).value.buffer)

    # -- AuthorityBackend ------------------------------------------------------
    def capabilities(self) -> Capabilities:
        return Capabilities(frozenset(SUITES) | {SUITE_ECDH}, True, "software")

    def _transport(self, set_id: bytes) -> _TransportKey:
        if self._closed:
            raise StoreError("the keystore is closed")
        return find_set(self._sets, set_id)

    def set_info(self, set_id: bytes) -> SetInfo:
        ident = self._identities.get(set_id)
        if ident is not None and not self._closed:
            return ident.info
        return self._transport(set_id).info

    def key_info(self, ref1: bytes) -> KeyInfo:
        if self._closed:
            raise StoreError("the keystore is closed")
        return find_key(self._keys, ref1).info

    def export(self, req: msg.ExportRequest, *,
               initial_key: InitialKeyOrder | None = None) -> Exported:
        t = self._transport(req.set_id)
        k = self._keys[req.ref1]
        i = k.info
        if initial_key is not None:  # the IK of a BDK (docs/protocol.md Appendix D)
            kt = initial_key.key_type(i.key_type)
            ik = dukpt.initial_key(k.value.buffer, initial_key.initial_key_id, kt)
            try:
                return self._wrap(req, t, kt, ik.buffer, dukpt.ik_attributes(i.attrs),
                                  i.version, False, None)
            finally:
                ik.wipe()
        return self._wrap(req, t, i.key_type, k.value.buffer, i.attrs, i.version,
                          i.diversify, i.kcv)

    def _wrap(self, req: msg.ExportRequest, t: _TransportKey, key_type: KeyType, key: bytearray,
              attrs: KeyAttributes, version: int, diversify: bool,
              kcv_: bytes | None) -> Exported:
        return klp1.export_key(
            get_suite(req.suite), t.value.buffer, req.sn, req.r, req.ref2,
            key_type=key_type, key=key, usage=attrs.usage, mode=attrs.mode,
            version=version, exportability=attrs.exportability, diversify=diversify,
            signer=self._signer if t.info.signed else None, scratch=self._scratch,
            kcv_=kcv_)

    def dukpt_kcv(self, ref1: bytes, ksn: bytes, usage: dukpt.KeyUsage,
                  ik_type: KeyType | None = None) -> tuple[KeyType, bytes]:
        """The type and KCV of the working key of ``usage`` for ``ksn`` under BDK ``ref1``
        (X9.24-3); the BDK, IK and working key never leave, and are wiped."""
        k = find_key(self._keys, ref1)
        order = dukpt.ksn_order(k.info.attrs.usage, ksn, ik_type)
        kt = order.key_type(k.info.key_type)
        ik = dukpt.initial_key(k.value.buffer, order.initial_key_id, kt)
        try:
            wk = dukpt.derive_chain(ik.buffer, dukpt.working_key_steps(kt, ksn, usage))
        finally:
            ik.wipe()
        try:
            return kt, aes_kcv(wk.buffer)
        finally:
            wk.wipe()

    def receipt(self, suite: int, set_id: bytes, sn: bytes, r: bytes, ref2: int, h: bytes,
                kcv_: bytes) -> bytes:
        t = self._transport(set_id)
        return klp1.receipt(get_suite(suite), t.value.buffer, sn, r, ref2, h, kcv_,
                            scratch=self._scratch)

