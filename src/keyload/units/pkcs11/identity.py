"""Identity sets (KLP1 suite 0x03, docs/protocol.md §10) in the token.

The set CA key d_CA and the authority key d_A are P-256 key pairs generated in the token
(sensitive, not extractable, not copyable, SIGN only); C_A and every C_U are signed there
(``CKM_ECDSA`` over SHA-256 of the public to-be-signed part, computed on the host). The set
id is that of Q_CA (§10.1), known only once the key is made: so the keys carry random
``CKA_ID`` values, named by the set's metadata (:mod:`~keyload.units.pkcs11.index`), which
also keeps its register of units.

One export (§10.3), all in the token: (e_A, E_A) generated as a *session* key pair (e_A
DERIVE only); Z = ``CKM_ECDH1_DERIVE`` (``CKD_NULL``) as a session AES-256 key; T1, Kenc and
Kmac by ``CKM_AES_ECB_ENCRYPT_DATA`` (the ECBDIV of suite 0x02); TA' likewise when
diversified; W by ``CKM_AES_KEY_WRAP_PAD``; SAS by ``CKM_ECDSA`` with d_A; CAS by
``CKM_AES_CMAC``. Every session object is destroyed as soon as it is no longer needed
and, whatever happens, before :meth:`IdentitySets.export3` returns or raises
(:func:`~keyload.units.pkcs11.objects.scope`). The host sees only public values: E_U, E_A,
the derivation data, W, the SAS, the CAS. The checks of §10.4 are the
:class:`~keyload.units.authority.Authority`'s, the same for every backend.

What is and is not enforced: the token draws the ECDSA nonces, so its signatures are not
the deterministic ones of the vectors; they verify (§10.3). Key objects left by a
generation that was interrupted before its metadata was written are not referenced and
stay in the token, unused. What becomes of a destroyed session object's memory is the
token's business.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pkcs11
from pkcs11 import Attribute as A
from pkcs11 import KeyType as CKK
from pkcs11 import Mechanism as CKM
from pkcs11 import exceptions as pkx

from ...core.ecc import ecdsa_verify
from ...core.errors import AuthenticityError, IntegrityError
from ...core.identity import (
    ROLE_AUTHORITY,
    ROLE_UNIT,
    Certificate,
    identity_set_id,
    issue_certificate,
    verify_certificate,
)
from ...core.klp1 import KENC, KMAC, LABEL_DL, LABEL_T1, dl_context, encode_header
from ...core.messages3 import ExportRequest3, ImportData3
from ...core.primitives import ecbdiv_blocks
from ...core.suite3 import SUITE_ECDH, Exported3, cas3_message, sas3_message, t1_context
from ..authority import (
    IdentitySetInfo,
    SetInfo,
    UnitRecord,
    check_new_unit,
    check_new_units,
    registered_unit,
)
from .export import Exporting
from .index import IdentityEntry, KeyEntry
from .objects import (
    EC_PRIV,
    EC_PUB,
    EPH_PRIV,
    EPH_PUB,
    ID_AS,
    ID_CA,
    KENC_SESSION,
    KMAC_SESSION,
    T1_SESSION,
    Z_SESSION,
    TokenEcdsa,
    derive,
    ecdh,
    modifiable_last,
    raw_p256_point,
    scope,
    sign,
    wrap,
)
from .session import Pkcs11Error, token_error

_SIGNING_KEY = {A.SENSITIVE: True, A.EXTRACTABLE: False, A.NEVER_EXTRACTABLE: True,
                A.ALWAYS_SENSITIVE: True, A.SIGN: True, A.DECRYPT: False, A.DERIVE: False,
                A.UNWRAP: False, A.COPYABLE: False, A.MODIFIABLE: False}


class IdentitySets(Exporting):
    """The :class:`~keyload.units.authority.IdentityAdministration` calls over the token."""

    def _require_p256(self) -> None:
        if not self._p256:
            raise Pkcs11Error(f"token {self.token_label!r} lacks P-256 key generation, "
                              "ECDSA or ECDH (needed for identity sets, suite 0x03)")

    # -- making a set -------------------------------------------------------------------
    def generate_identity_set(self, name: str, *, authority_id: bytes) -> SetInfo:
        """Generate d_CA and d_A in the token and sign C_A (subject ``authority_id``, 1 to
        32 bytes) with d_CA there; all or nothing. ValueError when the set id (of Q_CA)
        is one the token holds already (§10.1)."""
        if not 1 <= len(authority_id) <= 32:
            raise ValueError("the authority's id is 1 to 32 bytes")
        with self._lock:
            self._require_p256()
            made: list[pkcs11.Object] = []
            try:
                ca_id, as_id = ID_CA + os.urandom(8), ID_AS + os.urandom(8)
                ca, q_ca = self._signing_pair(ca_id, "keyload CA", made)
                d_a, q_a = self._signing_pair(as_id, "keyload authority", made)
                set_id = identity_set_id(q_ca)
                if set_id in self._sets or set_id in self._identities:
                    raise ValueError(f"set {set_id.hex()} already exists")
                c_a = issue_certificate(TokenEcdsa(ca), role=ROLE_AUTHORITY, set_id=set_id,
                                        subject=authority_id, public_key=q_a)
                self._probe(c_a, q_ca, d_a)
                meta = self._put_meta(f"keyload identity set {set_id.hex()}", {
                    "kind": "identity", "set_id": set_id.hex(), "name": name,
                    "ca_key": ca_id.hex(), "authority_key": as_id.hex(),
                    "c_a": c_a.encode().hex()})
                made.append(meta)
            except BaseException as e:
                self._destroy_quietly(*made)
                if isinstance(e, pkx.PKCS11Error):
                    raise token_error("make an identity set", e) from e
                raise
            info = SetInfo(set_id, name, identity=True)
            self._identities[set_id] = IdentityEntry(
                info, IdentitySetInfo(set_id, name, q_ca, c_a), ca, d_a, {})
            return info

    def _signing_pair(self, key_id: bytes, label: str,
                      made: list[pkcs11.Object]) -> tuple[pkcs11.Object, bytes]:
        """A P-256 signing key pair as token objects (``made`` gets both); its point Q."""
        ident: dict[A, Any] = {A.ID: key_id, A.LABEL: label}
        pub, priv = self.session.generate_keypair(
            CKK.EC, mechanism=CKM.EC_KEY_PAIR_GEN,
            public_template=modifiable_last({**EC_PUB, **ident}),
            private_template=modifiable_last({**EC_PRIV, **ident}))
        made += [pub, priv]
        self._check(priv, _SIGNING_KEY, label)
        return priv, raw_p256_point(bytes(pub[A.EC_POINT]))

    @staticmethod
    def _probe(c_a: Certificate, q_ca: bytes, d_a: pkcs11.Object) -> None:
        """C_A (signed by d_CA) is valid under Q_CA and a signature by d_A verifies under
        Q_A, else Pkcs11Error: the token's ECDSA is what §10.1 says."""
        probe = b"keyload authority key self-test"
        try:
            verify_certificate(c_a, q_ca=q_ca, role=ROLE_AUTHORITY, set_id=c_a.set_id)
            ecdsa_verify(c_a.public_key, TokenEcdsa(d_a).sign(probe), probe)
        except (IntegrityError, AuthenticityError):
            raise Pkcs11Error("the token's ECDSA signature does not verify with the public "
                              "key") from None

    # -- the register -------------------------------------------------------------------
    def identity_set(self, set_id: bytes) -> IdentitySetInfo:
        return self._identity(set_id).public

    def certify_unit(self, set_id: bytes, sn: bytes, public_key: bytes) -> Certificate:
        """Issue C_U for (SN, Q_U), signed by d_CA in the token, and register the unit as
        active. ValueError for an SN already in the register or a key that is not a
        P-256 point."""
        with self._lock:
            ident = self._identity(set_id)
            check_new_unit(ident.units, set_id, sn)
            try:
                cert = issue_certificate(TokenEcdsa(ident.ca), role=ROLE_UNIT, set_id=set_id,
                                         subject=sn, public_key=public_key)
                self._put_meta(f"keyload unit {set_id.hex()} {sn.hex()}", {
                    "kind": "unit", "set_id": set_id.hex(), "sn": sn.hex(),
                    "certificate": cert.encode().hex()})
            except pkx.PKCS11Error as e:
                raise token_error("certify a unit", e) from e
            ident.units[sn] = UnitRecord(set_id, sn, cert)
            return cert

    def certify_units(self, set_id: bytes, units: Sequence[tuple[bytes, bytes]]
                      ) -> list[Certificate]:
        """:meth:`certify_unit` for many (SN, Q_U): every SN and point is checked before
        the first is certified (a refusal certifies none); each certificate is then its own
        metadata object, so a token failure part way keeps those issued before it."""
        with self._lock:
            ident = self._identity(set_id)
            check_new_units(ident.units, set_id, units)
            return [self.certify_unit(set_id, sn, q_u) for sn, q_u in units]

    def revoke_unit(self, set_id: bytes, sn: bytes) -> UnitRecord:
        """Mark a certified unit revoked (a revocation document beside its certificate's):
        EXPORTKEY answers it 6983 from then on."""
        with self._lock:
            ident = self._identity(set_id)
            old = registered_unit(ident.units, set_id, sn)
            if not old.revoked:
                try:
                    self._put_meta(f"keyload revocation {set_id.hex()} {sn.hex()}", {
                        "kind": "revocation", "set_id": set_id.hex(), "sn": sn.hex()})
                except pkx.PKCS11Error as e:
                    raise token_error("revoke a unit", e) from e
            ident.units[sn] = UnitRecord(set_id, sn, old.certificate, True)
            return ident.units[sn]

    def unit_records(self, set_id: bytes) -> list[UnitRecord]:
        with self._lock:
            return list(self._identity(set_id).units.values())

    def unit_record(self, set_id: bytes, sn: bytes) -> UnitRecord | None:
        with self._lock:
            return self._identity(set_id).units.get(sn)

    # -- EXPORTKEY, suite 0x03 --------------------------------------------------------------
    def export3(self, req: ExportRequest3) -> Exported3:
        """docs/protocol.md §10.3 in the token, for a request the authority has checked
        (§10.4); a fresh (e_A, E_A); every session object destroyed on every path."""
        with self._lock:
            ident = self._identity(req.base.set_id)
            k = self._key(req.base.ref1)
            self._exportable(k.info)
            try:
                return self._export3(req, ident, k)
            except pkx.PKCS11Error as e:
                raise token_error("export the key", e) from e

    def _export3(self, req: ExportRequest3, ident: IdentityEntry, k: KeyEntry) -> Exported3:
        i = k.info
        sn, r, ref1, ref2 = req.base.sn, req.base.r, req.base.ref1, req.base.ref2
        dl = ecbdiv_blocks(LABEL_DL, dl_context(sn, r, ref2), 4)
        with scope() as sc:
            pub, e = self.session.generate_keypair(
                CKK.EC, mechanism=CKM.EC_KEY_PAIR_GEN, public_template=EPH_PUB,
                private_template=EPH_PRIV)
            sc.keep(pub)
            sc.keep(e)
            e_a = raw_p256_point(bytes(pub[A.EC_POINT]))
            sc.drop(pub)
            z = sc.keep(ecdh(e, req.e_u, Z_SESSION))
            sc.drop(e)
            t1 = sc.keep(derive(z, ecbdiv_blocks(LABEL_T1, t1_context(sn, r, req.e_u, e_a), 2),
                                T1_SESSION, 256))
            sc.drop(z)
            kenc = sc.keep(derive(t1, dl[KENC], KENC_SESSION, 256))
            kmac = sc.keep(derive(t1, dl[KMAC], KMAC_SESSION, 256))
            sc.drop(t1)
            ta, check, flags = self._ta_prime(sc, k, sn)
            h = encode_header(SUITE_ECDH, i.key_type, i.length, i.attrs.usage, i.attrs.mode,
                              i.version, i.attrs.exportability, flags)
            w = wrap(kenc, ta)
            sc.drop(kenc)
            sas = TokenEcdsa(ident.authority).sign(sas3_message(sn, r, ref2, ref1, h, w,
                                                                req.e_u, e_a))
            cas = sign(kmac, cas3_message(sn, r, ref2, ref1, h, w, sas, e_a), CKM.AES_CMAC)
        data = ImportData3(ref1, ref2, h, w, e_a, ident.public.c_a, sas, cas).encode()
        return Exported3(data, h, check, e_a, sas)

