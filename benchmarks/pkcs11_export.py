"""PKCS#11 authority throughput: keyload's EXPORTKEY in SoftHSM2 against the bare token calls.

Run ``python benchmarks/pkcs11_export.py [--seconds S] [--diversified] [--json]``. One run, on a
private SoftHSM2 token made in a temporary directory (removed at the end), with one
AES-256 application key (not diversified; ``--diversified`` for a diversified one), suite
0x02, measures:

1. the bare rate: the python-pkcs11 calls one EXPORTKEY of
   :meth:`keyload.units.pkcs11.Pkcs11Keystore.export` makes, in the same order, with the
   same mechanisms and templates, made directly on python-pkcs11 objects in a tight loop
   (their own session on the same token; nothing of keyload in the loop):

   (a) signed set (Ed25519 SAS, the default in-token path): ``C_DeriveKey`` T1,
       ``C_DeriveKey`` Kenc and Kmac, destroy T1, [``C_DeriveKey`` TA' and its CMAC KCV
       when diversified], ``C_WrapKey`` (AES-KWP, RFC 5649), destroy Kenc,
       ``C_DigestKey`` SHA-256(TA'), ``CKM_EDDSA`` SAS, ``CKM_AES_CMAC`` CAS, destroy Kmac
       [and TA'];
   (b) unsigned set with ``clear_sas=True``: the same with Ksas derived too, and for the
       symmetric SAS an ephemeral AES key generated and read, TA' wrapped under it and
       unwrapped on the host (`cryptography`), SAS = CMAC by Ksas in the token over
       "KLP1-SAS" || H and the clear TA' (two ``C_SignUpdate``), destroy Ksas;

   (c) suite 0x03, an identity set (docs/protocol.md §10): on the host, with
       `cryptography`, the two ECDSA verifications the authority makes (C_U under Q_CA,
       sigU under Q_U); then in the token ``C_GenerateKeyPair`` (e_A, E_A) as session
       objects, read E_A, destroy E_A's object, ``C_DeriveKey`` Z (``CKM_ECDH1_DERIVE``,
       ``CKD_NULL``), destroy e_A, ``C_DeriveKey`` T1 from Z (its data hashed on the
       host: it holds E_A), destroy Z, Kenc and Kmac, destroy T1, [TA' and its CMAC KCV],
       ``C_WrapKey`` W, destroy Kenc, ``CKM_ECDSA`` SAS by d_A over SHA-256 of the
       message (hashed on the host), ``CKM_AES_CMAC`` CAS, destroy Kmac [and TA'];

2. authority EXPORTKEY/s: ``Authority(Pkcs11Keystore).export(request)`` for the same key
   and sets (the signed set, then the unsigned one with ``clear_sas=True``, then the
   identity set by suite 0x03, each request a fresh challenge of an emulated unit);
3. for scale: ``Authority(SoftwareKeystore.ephemeral()).export(request)``, suite 0x02,
   signed set, and suite 0x03, an identity set; same key type.

Before measuring, the bare calls' W, SAS and CAS are checked to be byte for byte those of
``Pkcs11Keystore.export`` for the same request (suite 0x03, whose e_A and ECDSA nonces
are fresh each time: the bare calls' answer is imported by the emulated unit, which
checks CAS and SAS and unwraps the key); after it, that no session object is left.

Each measurement is warmed up, then run for ``--seconds`` (default 2 s) of timed work,
three times; the best repetition counts. The measurements take turns in chunks of about
50 ms, so that a bare rate and what is compared with it see the same machine. The ratio is
rate over rate (keyload's EXPORTKEY/s over the bare calls' /s); target at least 0.80. The
last line printed is always ``ratio pkcs11/bare: X.XX`` for the signed path (with
``--json``: the JSON object, nothing after it); the suite-0x03 ratio is printed before.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from time import perf_counter
from typing import Any

from keyload.core import messages as msg
from keyload.core.aids import INS_GENERATE_KEY, INS_IMPORT, INS_INIT, INS_PUT_CERTIFICATE
from keyload.core.apdu import CommandAPDU, ResponseAPDU
from keyload.core.identity import LABEL_CRT, PutCertificate
from keyload.core.keys import FLAG_DIVERSIFIED, FLAG_ED25519, KeyAttributes, KeyHeader, KeyType
from keyload.core.klp1 import LABEL_CAS, LABEL_DL, LABEL_SAS, LABEL_T1, LABEL_TA, cas_message, lv
from keyload.core.messages3 import ExportRequest3, ExportResponse3, ImportData3, InitResponse3
from keyload.core.suite3 import LABEL_INI, LABEL_SAS3, SUITE_ECDH
from keyload.core.suites import SUITE_ECBDIV
from keyload.lab.softhsm import make_token, softhsm_available, softhsm_missing_reason
from keyload.units.authority import Authority, ExportPolicy
from keyload.units.keystore import SoftwareKeystore
from keyload.units.unit import MemoryUnitStore, Slot, Unit, UnitState

TARGET_RATIO = 0.80
REPETITIONS = 3
CHUNK_SECONDS = 0.05

PIN = "24681357"
LABEL = "keyload-bench"
REF1 = b"BENCH-AES256"
REF2 = 1
SN = b"KL" + (1).to_bytes(6, "big")  # 8 bytes, like the demo's serials
KEY_VERSION = 1
USAGE, MODE, EXPORTABILITY = "K0", "B", "E"
KEY_LENGTH = 32
ANY = ExportPolicy(None, None)

# A batch runs ``n`` operations and returns the seconds they took (setup excluded).
Batch = Callable[[int], float]


# -- measuring (as benchmarks/throughput.py) ---------------------------------------------
@dataclass(frozen=True, slots=True)
class Rate:
    ops_per_s: float

    @property
    def us_per_op(self) -> float:
        return 1e6 / self.ops_per_s

    def text(self, unit: str = "ops/s") -> str:
        return f"{self.ops_per_s:,.0f} {unit} ({self.us_per_op:.1f} us/op)"

    def to_json(self) -> dict[str, float]:
        return {"ops_per_s": round(self.ops_per_s, 1), "us_per_op": round(self.us_per_op, 3)}


@dataclass
class Bench:
    """One measurement: ``batch(chunk)`` times ``chunk`` operations (about 50 ms of work)."""

    name: str
    batch: Batch
    chunk: int


def measure_all(benches: list[Bench], seconds: float) -> dict[str, Rate]:
    """Warm up (and size each chunk to ~50 ms), then REPETITIONS rounds; the best round
    of each measurement counts. Within a round the measurements take turns, one chunk at
    a time, until each has run ``seconds`` of timed work.
    """
    warmup = min(0.5, seconds / 4)
    for b in benches:
        spent = ops = 0.0
        while spent < warmup:
            spent += b.batch(b.chunk)
            ops += b.chunk
        b.chunk = max(1, round(ops / spent * CHUNK_SECONDS))
    best = dict.fromkeys((b.name for b in benches), 0.0)
    for _ in range(REPETITIONS):
        ops_done = dict.fromkeys(best, 0)
        elapsed = dict.fromkeys(best, 0.0)
        while True:
            pending = [b for b in benches if elapsed[b.name] < seconds]
            if not pending:
                break
            for b in pending:
                elapsed[b.name] += b.batch(b.chunk)
                ops_done[b.name] += b.chunk
        for name in best:
            best[name] = max(best[name], ops_done[name] / elapsed[name])
    return {name: Rate(rate) for name, rate in best.items()}


# -- the inputs shared by every measurement ------------------------------------------------
def ecbdiv_data(label: bytes, context: bytes, nblocks: int) -> bytes:
    """``B_1 || … || B_n`` of KLP1 ECBDIV (docs/protocol.md §4): the data the token encrypts."""
    h = hashlib.sha256(label + b"\x00" + context).digest()[:15]
    return b"".join(h + bytes((i,)) for i in range(1, nblocks + 1))


@dataclass(frozen=True, slots=True)
class Inputs:
    """One request's derivation data and header, computed once (setup, not measured)."""

    r: bytes
    diversify: bool
    d_t1: bytes  # T1 = ECB_T(d_t1)
    dl: bytes  # Kenc || Kmac || Ksas = ECB_T1(dl)
    d_ta: bytes  # TA' = ECB_TA(d_ta), diversified only
    h_signed: bytes
    h_clear: bytes
    h3: bytes  # suite 0x03

    @classmethod
    def new(cls, diversify: bool) -> Inputs:
        r = os.urandom(16)
        flags = FLAG_DIVERSIFIED if diversify else 0

        def header(f: int) -> bytes:
            return KeyHeader(suite=SUITE_ECBDIV, key_type=KeyType.AES256,
                             key_length=KEY_LENGTH, usage=USAGE, mode=MODE,
                             version=KEY_VERSION, exportability=EXPORTABILITY,
                             flags=f).encode()

        return cls(r, diversify, ecbdiv_data(LABEL_T1, SN, 2),
                   ecbdiv_data(LABEL_DL, lv(SN) + r + bytes((REF2,)), 6),
                   ecbdiv_data(LABEL_TA, lv(SN), -(-KEY_LENGTH // 16)),
                   header(flags | FLAG_ED25519), header(flags),
                   header(flags)[:1] + bytes((SUITE_ECDH,)) + header(flags)[2:])

    def request(self, set_id: bytes) -> msg.ExportRequest:
        return msg.ExportRequest(SN, self.r, set_id, SUITE_ECBDIV, REF1, REF2)


# -- the token ------------------------------------------------------------------------------
@dataclass
class Token:
    """The private SoftHSM2 token, its keystore and, for the bare calls, their own session
    with the token objects found by ``CKA_ID``."""

    ks: Any  # Pkcs11Keystore
    session: Any  # pkcs11.Session for the bare calls
    t_signed: Any
    t_clear: Any
    ta: Any
    signer: Any
    d_a: Any  # the identity set's authority key (suite 0x03)
    set_signed: bytes
    set_clear: bytes
    set3: bytes
    q_ca: bytes
    library: str


def open_token(directory: Path, stack: ExitStack, diversify: bool) -> Token:
    """Make the token (before the module is loaded in this process: SoftHSM reads
    SOFTHSM2_CONF once), open a keystore with ``clear_sas=True``, and fill it: the SAS key,
    a signed and an unsigned set (T generated in the token), an identity set (d_CA and d_A
    generated in the token), the application key."""
    tok = make_token(directory, label=LABEL, user_pin=PIN, so_pin=os.urandom(8).hex())
    import pkcs11
    from pkcs11 import Attribute as A
    from pkcs11 import ObjectClass as CKO

    from keyload.units.pkcs11 import ID_KEY, ID_SAS, ID_T, Pkcs11Keystore
    from keyload.units.pkcs11.objects import ID_AS

    ks = Pkcs11Keystore.open(tok.module, tok.label, pin=PIN, clear_sas=True)
    stack.callback(ks.close)
    ks.set_signing_key()
    set_signed = ks.generate_set("bench signed", signed=True).set_id
    set_clear = ks.generate_set("bench clear").set_id
    set3 = ks.generate_identity_set("bench identity", authority_id=b"keyload bench").set_id
    ks.generate_key(REF1, KeyType.AES256, KeyAttributes(USAGE, MODE, EXPORTABILITY),
                    version=KEY_VERSION, diversify=diversify, policy=ANY, length=KEY_LENGTH)

    lib = pkcs11.lib(tok.module)
    session = lib.get_token(token_label=tok.label).open(rw=True)  # shares the login
    stack.callback(session.close)  # runs before ks.close (the login's end)

    def one(template: dict[Any, Any]) -> Any:
        found = list(session.get_objects(template))
        if len(found) != 1:
            raise SystemExit(f"bare setup: {len(found)} objects for {template}")
        return found[0]

    version = KEY_VERSION.to_bytes(2, "big")
    v = lib.library_version
    d_a = [o for o in session.get_objects({A.CLASS: CKO.PRIVATE_KEY})
           if bytes(o[A.ID]).startswith(ID_AS)]  # its CKA_ID: ID_AS || 8 random bytes
    if len(d_a) != 1:
        raise SystemExit(f"bare setup: {len(d_a)} authority keys of identity sets")
    return Token(ks, session,
                 one({A.CLASS: CKO.SECRET_KEY, A.ID: ID_T + set_signed}),
                 one({A.CLASS: CKO.SECRET_KEY, A.ID: ID_T + set_clear}),
                 one({A.CLASS: CKO.SECRET_KEY, A.ID: ID_KEY + version + REF1}),
                 one({A.CLASS: CKO.PRIVATE_KEY, A.ID: ID_SAS}), d_a[0],
                 set_signed, set_clear, set3, ks.identity_set(set3).q_ca,
                 f"{lib.manufacturer_id.strip()} {lib.library_description.strip()} "
                 f"{v[0]}.{v[1]}")


# -- (1) the bare calls -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Out:
    w: bytes
    sas: bytes
    cas: bytes
    sas_msg: bytes | None  # what was signed (Ed25519) or None (symmetric SAS)
    cas_msg: bytes


BareExport = Callable[[bytes | None, bytes | None], Out]


def bare_ta_prime(tok: Token, d_ta: bytes, diversify: bool) -> Callable[[], Any]:
    """TA' as ``Pkcs11Keystore._ta_prime`` makes it: when diversified, ``C_DeriveKey``
    from TA and its CMAC KCV (destroyed by the caller), else TA itself."""
    from pkcs11 import Attribute as A
    from pkcs11 import KeyType as CKK
    from pkcs11 import Mechanism as CKM
    from pkcs11 import MechanismFlag

    from keyload.units.pkcs11 import secret_template

    t_ta = secret_template(CKK.AES, token=False, extractable=True, allow=(A.SIGN,))
    k, ecb, cmac, aes, none = tok.ta, CKM.AES_ECB_ENCRYPT_DATA, CKM.AES_CMAC, CKK.AES, \
        MechanismFlag(0)
    zero16 = bytes(16)

    def ta_prime() -> Any:
        if not diversify:
            return k
        ta = k.derive_key(aes, 8 * KEY_LENGTH, mechanism=ecb, mechanism_param=d_ta,
                          capabilities=none, template=t_ta)
        ta.sign(zero16, mechanism=cmac)  # its KCV
        return ta

    return ta_prime


def bare_export(tok: Token, i: Inputs, signed: bool) -> BareExport:
    """One EXPORTKEY's python-pkcs11 calls, as ``Pkcs11Keystore._export`` makes them.

    The returned function takes the Ed25519 SAS message and the CAS message, or None to
    build them from what the token returned (the reference run); the timed loop passes
    them precomputed, as the `cryptography` floors of throughput.py do (W, SAS and CAS are
    deterministic for fixed inputs, so the token gets the very same bytes).
    """
    from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
    from pkcs11 import Attribute as A
    from pkcs11 import KeyType as CKK
    from pkcs11 import Mechanism as CKM
    from pkcs11 import MechanismFlag

    from keyload.units.pkcs11 import secret_template

    # the templates of keyload.units.pkcs11 (every usage flag explicit)
    t_t1 = secret_template(CKK.AES, token=False, extractable=False, allow=(A.DERIVE,))
    t_kenc = secret_template(CKK.AES, token=False, extractable=False, allow=(A.WRAP,))
    t_kmac = secret_template(CKK.AES, token=False, extractable=False, allow=(A.SIGN,))
    t_eph = secret_template(CKK.AES, token=False, extractable=True, allow=(A.WRAP,),
                            sensitive=False)

    session = tok.session
    t = tok.t_signed if signed else tok.t_clear
    signer, ta_prime = tok.signer, bare_ta_prime(tok, i.d_ta, i.diversify)
    h = i.h_signed if signed else i.h_clear
    d_t1, d_enc, d_mac, d_sas = i.d_t1, i.dl[0:32], i.dl[32:64], i.dl[64:96]
    diversify = i.diversify
    ecb, kwp, cmac = CKM.AES_ECB_ENCRYPT_DATA, CKM.AES_KEY_WRAP_PAD, CKM.AES_CMAC
    sha256, eddsa, keygen = CKM.SHA256, CKM.EDDSA, CKM.AES_KEY_GEN
    aes, none = CKK.AES, MechanismFlag(0)
    sas_head = LABEL_SAS + h + lv(SN) + bytes((REF2,))  # signed: || SHA-256(TA')
    sym_head = LABEL_SAS + h  # symmetric: || TA'

    def once(sas_msg: bytes | None, cas_msg: bytes | None) -> Out:
        t1 = t.derive_key(aes, 256, mechanism=ecb, mechanism_param=d_t1, capabilities=none,
                          template=t_t1)
        kenc = t1.derive_key(aes, 256, mechanism=ecb, mechanism_param=d_enc,
                             capabilities=none, template=t_kenc)
        kmac = t1.derive_key(aes, 256, mechanism=ecb, mechanism_param=d_mac,
                             capabilities=none, template=t_kmac)
        ksas = None if signed else t1.derive_key(aes, 256, mechanism=ecb,
                                                 mechanism_param=d_sas, capabilities=none,
                                                 template=t_kmac)
        t1.destroy()
        ta = ta_prime()
        w = bytes(kenc.wrap_key(ta, mechanism=kwp))
        kenc.destroy()
        if ksas is None:
            digest = session.digest(ta, mechanism=sha256)
            if sas_msg is None:
                sas_msg = sas_head + bytes(digest)
            sas = bytes(signer.sign(sas_msg, mechanism=eddsa))
        else:
            eph = session.generate_key(aes, 256, mechanism=keygen, capabilities=none,
                                       template=t_eph)
            ev = bytes(eph[A.VALUE])
            wrapped = bytes(eph.wrap_key(ta, mechanism=kwp))
            eph.destroy()
            clear = aes_key_unwrap_with_padding(ev, wrapped)
            sas = bytes(ksas.sign(iter((sym_head, clear)), mechanism=cmac))
        if cas_msg is None:
            cas_msg = cas_message(SN, i.r, REF2, h, w, sas)
        cas = bytes(kmac.sign(cas_msg, mechanism=cmac))
        if diversify:
            ta.destroy()
        if ksas is not None:
            ksas.destroy()
        kmac.destroy()
        return Out(w, sas, cas, sas_msg, cas_msg)

    return once


def bare_batch(tok: Token, i: Inputs, signed: bool) -> Batch:
    once = bare_export(tok, i, signed)
    ref = once(None, None)  # the reference run: messages built from the token's answers
    sas_msg, cas_msg = ref.sas_msg, ref.cas_msg
    if once(sas_msg, cas_msg) != ref:
        raise SystemExit("the bare calls are not deterministic: benchmark is wrong")

    def batch(n: int) -> float:
        start = perf_counter()
        for _ in repeat(None, n):
            once(sas_msg, cas_msg)
        return perf_counter() - start

    return batch


def check_bare(tok: Token, i: Inputs) -> None:
    """The bare calls produce what keyload's export produces, byte for byte."""
    for signed, set_id in ((True, tok.set_signed), (False, tok.set_clear)):
        out = bare_export(tok, i, signed)(None, None)
        got = msg.ImportData.decode(tok.ks.export(i.request(set_id)).import_data)
        h = i.h_signed if signed else i.h_clear
        if (got.h, got.w, got.sas, got.cas) != (h, out.w, out.sas, out.cas):
            raise SystemExit(f"bare calls differ from Pkcs11Keystore.export "
                             f"({'signed' if signed else 'clear_sas'}): benchmark is wrong")
    if tok.ks.session_object_count():
        raise SystemExit("session objects left in the token: benchmark is wrong")


# -- suite 0x03: an emulated unit of an identity set, and the bare calls of one export --------
class Enrolled:
    """An emulated unit enrolled in identity set ``set_id`` of authority keystore ``ks``
    (GENERATE UNIT KEY, the authority certifies, PUT CERTIFICATE), with an SN of its own.
    :meth:`request` is a fresh challenge (INITIALIZE DOWNLOAD) made into an EXPORTKEY of
    suite 0x03."""

    made = 0

    def __init__(self, ks: Any, set_id: bytes) -> None:
        Enrolled.made += 1
        sn = b"KI" + Enrolled.made.to_bytes(6, "big")
        slots = {REF2: Slot(REF2, frozenset({KeyType.AES256}))}
        self.unit = Unit(MemoryUnitStore(UnitState.new_identity(sn, slots)))
        cert = ks.certify_unit(set_id, sn, self.call(INS_GENERATE_KEY)[2:])
        self.call(INS_PUT_CERTIFICATE,
                  PutCertificate(cert, ks.identity_set(set_id).q_ca).encode())

    def call(self, ins: int, data: bytes = b"") -> bytes:
        apdu = CommandAPDU(0x80, ins, 0, 0, data, ne=65536).encode()
        return ResponseAPDU.decode(self.unit.process_apdu(apdu)).check("benchmark unit")

    def request(self) -> ExportRequest3:
        ini = InitResponse3.decode(self.call(INS_INIT))
        return ExportRequest3(msg.ExportRequest(ini.sn, ini.r, ini.set_id, SUITE_ECDH, REF1,
                                                REF2), ini.e_u, ini.c_u, ini.sig_u)


@dataclass(frozen=True, slots=True)
class Out3:
    e_a: bytes
    w: bytes
    sas: bytes
    cas: bytes


def bare_export3(tok: Token, i: Inputs, req: ExportRequest3) -> Callable[[], Out3]:
    """One suite-0x03 EXPORTKEY's calls, as ``Authority.export_request3`` and
    ``Pkcs11Keystore.export3`` make them: the two host verifications (`cryptography`), then
    the token calls. e_A and the ECDSA nonce are fresh each time, so the data and messages
    that hold E_A, W or the SAS are built in the loop (as bytes, with precomputed heads)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    from pkcs11 import KDF, MechanismFlag
    from pkcs11 import Attribute as A
    from pkcs11 import KeyType as CKK
    from pkcs11 import Mechanism as CKM

    from keyload.units.pkcs11 import secret_template
    from keyload.units.pkcs11.objects import EPH_PRIV, EPH_PUB  # the templates of keyload

    def der(sig: bytes) -> bytes:
        return encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                    int.from_bytes(sig[32:], "big"))

    curve, ecdsa = ec.SECP256R1(), ec.ECDSA(hashes.SHA256())
    ca_pub = ec.EllipticCurvePublicKey.from_encoded_point(curve, tok.q_ca)
    unit_pub = ec.EllipticCurvePublicKey.from_encoded_point(curve, req.c_u.public_key)
    sn, r, e_u, h = req.base.sn, req.base.r, req.e_u, i.h3
    crt_sig, crt_msg = der(req.c_u.signature), LABEL_CRT + req.c_u.signed_part()
    ini_sig, ini_msg = der(req.sig_u), LABEL_INI + lv(sn) + r + tok.set3 + e_u
    t_z = secret_template(CKK.AES, token=False, extractable=False, allow=(A.DERIVE,))
    t_kenc = secret_template(CKK.AES, token=False, extractable=False, allow=(A.WRAP,))
    t_kmac = secret_template(CKK.AES, token=False, extractable=False, allow=(A.SIGN,))
    dl = ecbdiv_data(LABEL_DL, lv(sn) + r + bytes((REF2,)), 4)
    d_enc, d_mac, diversify = dl[0:32], dl[32:64], i.diversify
    ta_prime = bare_ta_prime(tok, ecbdiv_data(LABEL_TA, lv(sn), -(-KEY_LENGTH // 16)),
                             diversify)
    t1_hash_head = LABEL_T1 + b"\x00" + lv(sn) + r + e_u  # || E_A: ECBDIV's hash input
    tail = lv(sn) + r + bytes((REF2,)) + lv(REF1) + h
    sas_head, cas_head = LABEL_SAS3 + tail, LABEL_CAS + tail
    session, d_a = tok.session, tok.d_a
    ecb, kwp, cmac = CKM.AES_ECB_ENCRYPT_DATA, CKM.AES_KEY_WRAP_PAD, CKM.AES_CMAC
    ec_gen, ecdh, ecdsa_m = CKM.EC_KEY_PAIR_GEN, CKM.ECDH1_DERIVE, CKM.ECDSA
    aes, ec_key, none, kdf_null = CKK.AES, CKK.EC, MechanismFlag(0), KDF.NULL
    sha256 = hashlib.sha256

    def once() -> Out3:
        ca_pub.verify(crt_sig, crt_msg, ecdsa)  # C_U under Q_CA
        unit_pub.verify(ini_sig, ini_msg, ecdsa)  # sigU under Q_U
        pub, e = session.generate_keypair(ec_key, mechanism=ec_gen, public_template=EPH_PUB,
                                          private_template=EPH_PRIV)
        e_a = bytes(pub[A.EC_POINT])[2:]  # DER OCTET STRING: 04 41 || the point
        pub.destroy()
        z = e.derive_key(aes, 256, mechanism=ecdh, mechanism_param=(kdf_null, None, e_u),
                         capabilities=none, template=t_z)
        e.destroy()
        hd = sha256(t1_hash_head + e_a).digest()[:15]
        t1 = z.derive_key(aes, 256, mechanism=ecb, mechanism_param=hd + b"\x01" + hd + b"\x02",
                          capabilities=none, template=t_z)
        z.destroy()
        kenc = t1.derive_key(aes, 256, mechanism=ecb, mechanism_param=d_enc,
                             capabilities=none, template=t_kenc)
        kmac = t1.derive_key(aes, 256, mechanism=ecb, mechanism_param=d_mac,
                             capabilities=none, template=t_kmac)
        t1.destroy()
        ta = ta_prime()
        w = bytes(kenc.wrap_key(ta, mechanism=kwp))
        kenc.destroy()
        sas = bytes(d_a.sign(sha256(sas_head + w + e_u + e_a).digest(), mechanism=ecdsa_m))
        cas = bytes(kmac.sign(cas_head + w + sas + e_a, mechanism=cmac))
        if diversify:
            ta.destroy()
        kmac.destroy()
        return Out3(e_a, w, sas, cas)

    return once


def bare_batch3(tok: Token, i: Inputs, req: ExportRequest3) -> Batch:
    once = bare_export3(tok, i, req)

    def batch(n: int) -> float:
        start = perf_counter()
        for _ in repeat(None, n):
            once()
        return perf_counter() - start

    return batch


def check_bare3(tok: Token, i: Inputs) -> None:
    """The bare calls' answer is a genuine suite-0x03 export: the unit whose challenge it
    answers imports it (CAS, the SAS under C_A, the unwrap) and agrees on the KCV with
    ``Pkcs11Keystore.export3``, whose H is the same (not diversified: the same KCV)."""
    unit = Enrolled(tok.ks, tok.set3)
    got = ExportResponse3.decode(Authority(tok.ks).export(unit.request().encode()))
    out = bare_export3(tok, i, unit.request())()
    c_a = tok.ks.identity_set(tok.set3).c_a
    data = ImportData3(REF1, REF2, i.h3, out.w, out.e_a, c_a, out.sas, out.cas).encode()
    answer = ResponseAPDU.decode(unit.unit.process_apdu(
        CommandAPDU(0x80, INS_IMPORT, 0, 0, data, ne=65536).encode()))
    same_kcv = answer.data[2:7] == got.kcv  # the same unit: the same TA'
    if answer.sw != 0x9000 or not same_kcv or ImportData3.decode(got.import_data).h != i.h3:
        raise SystemExit("bare calls (suite 0x03) are not a genuine export: benchmark is wrong")


# -- (2), (3) authority EXPORTKEY ------------------------------------------------------------
def export_batch(name: str, authority: Authority, set_id: bytes, count: int) -> Bench:
    """EXPORTKEY requests, precomputed (setup): one per fresh R, sent in turn."""
    requests = [msg.ExportRequest(SN, os.urandom(16), set_id, SUITE_ECBDIV, REF1, REF2).encode()
                for _ in range(count)]
    export = authority.export
    export(requests[0])  # fails loudly here if the request were refused
    pos = 0

    def batch(n: int) -> float:
        nonlocal pos
        chunk = [requests[(pos + j) % count] for j in range(n)]
        pos = (pos + n) % count
        start = perf_counter()
        for request in chunk:
            export(request)
        return perf_counter() - start

    return Bench(name, batch, 20)


def export3_batch(name: str, backend: Any, unit: Enrolled, count: int) -> Bench:
    """EXPORTKEY requests of suite 0x03, precomputed (setup): ``count`` fresh challenges of
    ``unit``, sent in turn; once all are served (an authority serves a challenge once,
    docs/protocol.md §10.4), a new ``Authority`` over the same backend, outside the timing."""
    requests = [unit.request().encode() for _ in range(count)]
    export = Authority(backend).export
    export(requests[0])  # fails loudly here if the request were refused
    pos = 1

    def batch(n: int) -> float:
        nonlocal pos, export
        if n > count:
            raise SystemExit(f"{name}: a chunk of {n} needs more than {count} challenges")
        if pos + n > count:
            export, pos = Authority(backend).export, 0
        chunk = requests[pos:pos + n]
        pos += n
        start = perf_counter()
        for request in chunk:
            export(request)
        return perf_counter() - start

    return Bench(name, batch, 20)


def software_authority(diversify: bool) -> tuple[Authority, SoftwareKeystore, bytes, bytes]:
    ks = SoftwareKeystore.ephemeral()
    ks.set_signing_key()
    set_id = ks.generate_set("bench signed", signed=True).set_id
    set3 = ks.generate_identity_set("bench identity", authority_id=b"keyload bench").set_id
    ks.generate_key(REF1, KeyType.AES256, KeyAttributes(USAGE, MODE, EXPORTABILITY),
                    version=KEY_VERSION, diversify=diversify, policy=ANY, length=KEY_LENGTH)
    return Authority(ks), ks, set_id, set3


# -- report ----------------------------------------------------------------------------------
def keep_own_dir_off_path() -> None:
    """This file is named like python-pkcs11's package: run as a script, its directory is
    ``sys.path[0]`` and ``import pkcs11`` (here and in keyload.units.pkcs11) would find this
    file. Called before anything imports pkcs11."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != here]


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=2.0,
                    help="timed seconds per repetition of each measurement (default 2)")
    ap.add_argument("--diversified", action="store_true",
                    help="a diversified application key (TA' derived per unit)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    seconds: float = args.seconds
    diversify: bool = args.diversified
    keep_own_dir_off_path()
    signal.signal(signal.SIGTERM, _terminate)  # unwind: the cleanup runs

    if not softhsm_available():
        reason = f"skipped: SoftHSM2 is not available ({softhsm_missing_reason()})"
        print(json.dumps({"skipped": reason}) if args.json else reason)
        return 0
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        reason = "skipped: python-pkcs11 is not installed (pip install 'keyload[pkcs11]')"
        print(json.dumps({"skipped": reason}) if args.json else reason)
        return 0

    def show(line: str) -> None:
        if not args.json:
            print(line, flush=True)

    key = (f"AES-256, {'diversified' if diversify else 'not diversified'}, suites 0x02 "
           "and 0x03")
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="keyload-bench-softhsm-"))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        tok = open_token(workdir, stack, diversify)
        from importlib.metadata import version

        env = {"python": f"{platform.python_version()} ({platform.python_implementation()})",
               "pkcs11_library": tok.library, "python_pkcs11": version("python-pkcs11"),
               "cpu_count": os.cpu_count() or 0, "key": key}
        show(f"python: {env['python']}")
        show(f"PKCS#11 library: {env['pkcs11_library']}; python-pkcs11 {env['python_pkcs11']}")
        show(f"cpus: {env['cpu_count']}")
        show(f"key: {key}")
        show(f"each figure: best of {REPETITIONS} runs of {seconds:g} s after a warm-up "
             "(measurements interleaved)")

        inputs = Inputs.new(diversify)
        check_bare(tok, inputs)
        check_bare3(tok, inputs)
        authority = Authority(tok.ks)
        soft, soft_ks, soft_set, soft_set3 = software_authority(diversify)
        stack.callback(soft_ks.close)
        rates = measure_all([
            Bench("bare_signed", bare_batch(tok, inputs, True), 20),
            export_batch("pkcs11_signed", authority, tok.set_signed, 500),
            Bench("bare_clear", bare_batch(tok, inputs, False), 20),
            export_batch("pkcs11_clear", authority, tok.set_clear, 500),
            Bench("bare_suite3", bare_batch3(tok, inputs, Enrolled(tok.ks, tok.set3).request()),
                  20),
            export3_batch("pkcs11_suite3", tok.ks, Enrolled(tok.ks, tok.set3), 500),
            export_batch("software_signed", soft, soft_set, 2000),
            export3_batch("software_suite3", soft_ks, Enrolled(soft_ks, soft_set3), 2000),
        ], seconds)
        if tok.ks.session_object_count():
            raise SystemExit("session objects left in the token: benchmark is wrong")

    show(f"bare python-pkcs11 calls, signed set: {rates['bare_signed'].text('exports/s')}")
    show("authority EXPORTKEY, Pkcs11Keystore, signed set: "
         f"{rates['pkcs11_signed'].text('exports/s')}")
    show(f"bare python-pkcs11 calls, clear_sas: {rates['bare_clear'].text('exports/s')}")
    show("authority EXPORTKEY, Pkcs11Keystore, unsigned set, clear_sas: "
         f"{rates['pkcs11_clear'].text('exports/s')}")
    show(f"bare calls, suite 0x03 (2 host verifications + token): "
         f"{rates['bare_suite3'].text('exports/s')}")
    show("authority EXPORTKEY, Pkcs11Keystore, identity set, suite 0x03: "
         f"{rates['pkcs11_suite3'].text('exports/s')}")
    show("authority EXPORTKEY, SoftwareKeystore (for scale), signed set: "
         f"{rates['software_signed'].text('exports/s')}")
    show("authority EXPORTKEY, SoftwareKeystore (for scale), identity set, suite 0x03: "
         f"{rates['software_suite3'].text('exports/s')}")
    ratio_signed = rates["pkcs11_signed"].ops_per_s / rates["bare_signed"].ops_per_s
    ratio_clear = rates["pkcs11_clear"].ops_per_s / rates["bare_clear"].ops_per_s
    ratio3 = rates["pkcs11_suite3"].ops_per_s / rates["bare_suite3"].ops_per_s
    if args.json:
        out: dict[str, Any] = {
            **env, "seconds": seconds, "repetitions": REPETITIONS,
            **{name: rate.to_json() for name, rate in rates.items()},
            "target_ratio": TARGET_RATIO,
            "ratio_pkcs11_bare_clear_sas": round(ratio_clear, 3),
            "ratio_pkcs11_bare_suite3": round(ratio3, 3),
            "ratio_pkcs11_bare": round(ratio_signed, 3),
        }
        print(json.dumps(out))
    else:
        print(f"target: pkcs11/bare >= {TARGET_RATIO:.2f} (rate over rate)")
        print(f"ratio pkcs11/bare, clear_sas: {ratio_clear:.2f}")
        print(f"ratio pkcs11/bare, suite 0x03: {ratio3:.2f}")
        print(f"ratio pkcs11/bare: {ratio_signed:.2f}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the cleanup has run while unwinding
        print("interrupted", file=sys.stderr)
        sys.exit(130)
