"""EXPORTKEY and receipts in the token: KLP1 suite 0x02 (ECBDIV, docs/protocol.md §4).

T1, Kenc, Kmac, Ksas and a diversified TA' are derived with ``CKM_AES_ECB_ENCRYPT_DATA`` as
session objects, TA' is wrapped with ``CKM_AES_KEY_WRAP_PAD`` (RFC 5649), CAS and RCT are
``CKM_AES_CMAC``; the data each derivation encrypts, and every message MACed or signed,
are core's (:mod:`keyload.core.klp1`). Every derived object is destroyed on every path.

SAS. Ed25519 sets ("signed"): SHA-256(TA') by ``C_DigestKey`` and ``CKM_EDDSA`` in the
token. Symmetric SAS = AES-CMAC(Ksas, "KLP1-SAS" || H || TA') needs TA' *in clear* as MAC
input: PKCS#11 can feed a key only to a digest (``C_DigestKey``), and SoftHSM has no
mechanism (XOR/concatenate base-and-data, CMAC over a key) that would do it in the token.
So it is an explicit opt-in, ``clear_sas=True``: TA' is wrapped under an ephemeral,
extractable session AES key, unwrapped on the host, fed to ``CKM_AES_CMAC`` with Ksas in
the token (Ksas never leaves), then the host copy is overwritten. Without it, an export
to an unsigned set is refused with :class:`~keyload.core.errors.PolicyRefused` (6986).
"""

from __future__ import annotations

from typing import cast

import pkcs11
from pkcs11 import Attribute as A
from pkcs11 import KeyType as CKK
from pkcs11 import Mechanism as CKM
from pkcs11 import MechanismFlag
from pkcs11 import exceptions as pkx

from ...core import messages as msg
from ...core.dukpt import (
    InitialKeyOrder,
    KeyUsage,
    ik_attributes,
    initial_key_data,
    ksn_order,
    working_key_steps,
)
from ...core.errors import PolicyRefused, Unsupported
from ...core.keys import FLAG_DIVERSIFIED, FLAG_ED25519, KeyHeader, KeyType
from ...core.klp1 import (
    KENC,
    KMAC,
    KSAS,
    LABEL_DL,
    LABEL_SAS,
    LABEL_T1,
    LABEL_TA,
    Exported,
    cas_message,
    dl_context,
    lv,
    rct_message,
    sas_message_ed25519_of_digest,
)
from ...core.primitives import aes_kwp_unwrap, ecbdiv_blocks
from ...core.secret import scrub
from ...core.suites import SUITE_ECBDIV
from ..authority import KeyInfo
from .index import KeyEntry, TokenIndex
from .objects import (
    EPHEMERAL,
    KENC_SESSION,
    KMAC_SESSION,
    KSAS_SESSION,
    T1_SESSION,
    TA_DIV_SESSION,
    Scope,
    derive,
    scope,
    sign,
    wrap,
)
from .session import Pkcs11Error, token_error

CLEAR_SAS_REFUSED = ("this PKCS#11 authority signs with Ed25519; a symmetric SAS needs the key "
                     "in clear outside the token (open the keystore with clear_sas=True to "
                     "allow it, or make the set a signed one)")


def _t1(sc: Scope, t: pkcs11.Object, sn: bytes) -> pkcs11.Object:
    """T1 = KDF(T, "KLP1-T1", SN, 256), a session object kept by ``sc``."""
    return sc.keep(derive(t, ecbdiv_blocks(LABEL_T1, sn, 2), T1_SESSION, 256))


def host_copy(session: pkcs11.Session, sc: Scope, key: pkcs11.Object) -> bytes:
    """The value of ``key`` in host memory (the caller scrubs it): wrapped under an
    ephemeral extractable session key (kept by ``sc``, destroyed once used), unwrapped
    here."""
    eph = sc.keep(session.generate_key(CKK.AES, 256, mechanism=CKM.AES_KEY_GEN,
                                       capabilities=MechanismFlag(0), template=EPHEMERAL))
    ev = bytes(eph[A.VALUE])
    try:
        wrapped = wrap(eph, key)
        sc.drop(eph)
        return aes_kwp_unwrap(ev, wrapped)
    finally:
        scrub(ev)


class Exporting(TokenIndex):
    """The :class:`~keyload.units.authority.AuthorityBackend` calls that use keys."""

    def export(self, req: msg.ExportRequest, *,
               initial_key: InitialKeyOrder | None = None) -> Exported:
        """docs/protocol.md §4, suite 0x02, in the token; every derived object is destroyed.
        With ``initial_key`` (REF1 a BDK), the IK is derived in the token (AES-ECB of the
        X9.24-3 derivation data under the BDK, ``CKM_AES_ECB_ENCRYPT_DATA``), a session
        object wrapped in place of the BDK, then destroyed (docs/protocol.md Appendix D)."""
        if req.suite != SUITE_ECBDIV:
            raise Unsupported(f"suite {req.suite:#04x} not offered by this PKCS#11 authority")
        with self._lock:
            t = self._set(req.set_id)
            k = self._key(req.ref1)
            signed = t.info.signed
            if signed and self._signer is None:
                raise Pkcs11Error("a signed set, but the token holds no SAS key")
            if not signed and not self.clear_sas:
                raise PolicyRefused(CLEAR_SAS_REFUSED)
            self._exportable(k.info)
            try:
                if initial_key is None:
                    return self._export(req, t.key, k, signed)
                with scope() as sc:
                    return self._export(req, t.key, self._initial_key(sc, k, initial_key),
                                        signed)
            except pkx.PKCS11Error as e:
                raise token_error("export the key", e) from e

    def _initial_key(self, sc: Scope, k: KeyEntry, order: InitialKeyOrder) -> KeyEntry:
        """The IK of ``order`` from BDK ``k``: a session object kept by ``sc``, its KCV by
        CMAC in the token; described as the key to export (usage B1, never exportable)."""
        i = k.info
        kt = order.key_type(i.key_type)
        ik = sc.keep(derive(k.key, initial_key_data(kt, order.initial_key_id), TA_DIV_SESSION,
                            8 * kt.default_length))
        check = sign(ik, bytes(16), CKM.AES_CMAC)[:5]
        info = KeyInfo(i.ref1, kt, kt.default_length, ik_attributes(i.attrs), i.version,
                       False, i.policy, check, i.label)
        return KeyEntry(info, ik, k.meta, k.key_id)

    def dukpt_kcv(self, ref1: bytes, ksn: bytes, usage: KeyUsage,
                  ik_type: KeyType | None = None) -> tuple[KeyType, bytes]:
        """The type and KCV of the working key of ``usage`` for ``ksn`` under BDK ``ref1``:
        the IK, each intermediate derivation key and the working key are session objects
        derived in the token (X9.24-3 on ``CKM_AES_ECB_ENCRYPT_DATA``), its KCV a CMAC
        there; all destroyed."""
        with self._lock:
            k = self._key(ref1)
            order = ksn_order(k.info.attrs.usage, ksn, ik_type)
            kt = order.key_type(k.info.key_type)
            steps = working_key_steps(kt, ksn, usage)
            try:
                with scope() as sc:
                    key = sc.keep(derive(k.key, initial_key_data(kt, order.initial_key_id),
                                         T1_SESSION, 8 * kt.default_length))
                    for n, (data, step_type) in enumerate(steps, 1):
                        template = KMAC_SESSION if n == len(steps) else T1_SESSION
                        nxt = sc.keep(derive(key, data, template, 8 * step_type.default_length))
                        sc.drop(key)
                        key = nxt
                    return kt, sign(key, bytes(16), CKM.AES_CMAC)[:5]
            except pkx.PKCS11Error as e:
                raise token_error("derive a DUKPT key", e) from e

    def _exportable(self, i: KeyInfo) -> None:
        """What this token cannot do as KLP1 says (its self-test): PolicyRefused (6986)."""
        if i.diversify and i.key_type == KeyType.AES192 and not self._aes192_div:
            raise PolicyRefused("this token does not truncate ECB derivations to "
                                "CKA_VALUE_LEN: AES-192 keys cannot be diversified in it")
        if i.length % 8 and not self._wrap_any_length:
            raise PolicyRefused(f"this token cannot wrap a {i.length}-byte key as "
                                "RFC 5649 says (CKM_AES_KEY_WRAP_PAD defect)")

    def _ta_prime(self, sc: Scope, k: KeyEntry, sn: bytes) -> tuple[pkcs11.Object, bytes, int]:
        """TA' (a session object kept by ``sc`` when diversified, else TA), its KCV and the
        header flag: TA' = ECBDIV(TA, "KLP1-TA", lv(SN), 8*len(TA)), its KCV by CMAC in
        the token (docs/protocol.md §4)."""
        i = k.info
        if not i.diversify:
            return k.key, i.kcv, 0
        blocks = ecbdiv_blocks(LABEL_TA, lv(sn), -(-i.length // 16))
        ta = sc.keep(derive(k.key, blocks, TA_DIV_SESSION, 8 * i.length))
        return ta, sign(ta, bytes(16), CKM.AES_CMAC)[:5], FLAG_DIVERSIFIED

    def _export(self, req: msg.ExportRequest, t: pkcs11.Object, k: KeyEntry,
                signed: bool) -> Exported:
        i = k.info
        sn, r, ref2 = req.sn, req.r, req.ref2
        dl = ecbdiv_blocks(LABEL_DL, dl_context(sn, r, ref2), 6)
        with scope() as sc:
            t1 = _t1(sc, t, sn)
            kenc = sc.keep(derive(t1, dl[KENC], KENC_SESSION, 256))
            kmac = sc.keep(derive(t1, dl[KMAC], KMAC_SESSION, 256))
            ksas = None if signed else sc.keep(derive(t1, dl[KSAS], KSAS_SESSION, 256))
            sc.drop(t1)  # T1 is no longer needed
            ta, check, flags = self._ta_prime(sc, k, sn)
            flags |= FLAG_ED25519 if signed else 0
            h = KeyHeader(suite=SUITE_ECBDIV, key_type=i.key_type, key_length=i.length,
                          usage=i.attrs.usage, mode=i.attrs.mode, version=i.version,
                          exportability=i.attrs.exportability, flags=flags).encode()
            w = wrap(kenc, ta)
            sc.drop(kenc)
            if ksas is None:
                assert self._signer is not None
                digest = bytes(self.session.digest(cast(pkcs11.Key, ta), mechanism=CKM.SHA256))
                sas = sign(self._signer, sas_message_ed25519_of_digest(h, sn, ref2, digest),
                           CKM.EDDSA)
            else:
                sas = self._clear_sas(sc, ksas, h, ta)
            cas = sign(kmac, cas_message(sn, r, ref2, h, w, sas), CKM.AES_CMAC)
        return Exported(msg.ImportData(ref2, h, w, sas, cas).encode(), h, check)

    def _clear_sas(self, sc: Scope, ksas: pkcs11.Object, h: bytes,
                   ta: pkcs11.Object) -> bytes:
        """SAS = AES-CMAC(Ksas, "KLP1-SAS" || H || TA') with TA' briefly in host memory
        (``clear_sas=True`` only): wrapped under an ephemeral session key, unwrapped here,
        MACed by Ksas in the token, then overwritten.
        """
        clear = b""
        try:
            clear = host_copy(self.session, sc, ta)
            return sign(ksas, iter((LABEL_SAS + h, clear)), CKM.AES_CMAC)
        finally:
            scrub(clear)

    def receipt(self, suite: int, set_id: bytes, sn: bytes, r: bytes, ref2: int, h: bytes,
                kcv_: bytes) -> bytes:
        """RCT = AES-CMAC(Kmac, "KLP1-RCT" || …) with a freshly derived Kmac (SIGN only)."""
        if suite != SUITE_ECBDIV:
            raise Unsupported(f"suite {suite:#04x} not offered by this PKCS#11 authority")
        with self._lock:
            t = self._set(set_id)
            dl = ecbdiv_blocks(LABEL_DL, dl_context(sn, r, ref2), 4)
            try:
                with scope() as sc:
                    t1 = _t1(sc, t.key, sn)
                    kmac = sc.keep(derive(t1, dl[KMAC], KMAC_SESSION, 256))
                    sc.drop(t1)
                    return sign(kmac, rct_message(sn, r, ref2, h, kcv_), CKM.AES_CMAC)
            except pkx.PKCS11Error as e:
                raise token_error("compute a receipt", e) from e
