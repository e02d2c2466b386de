"""KLP1 throughput: keyload against the bare `cryptography` calls it cannot avoid.

Run ``python benchmarks/throughput.py [--seconds S] [--json]``. One run measures:

1. the floors, i.e. the `cryptography` calls themselves, made directly on `cryptography`
   objects in a tight loop with the same inputs and sizes as keyload's (suite 0x01,
   AES-256 key, not diversified, symmetric SAS), nothing of keyload in the loop:

   (a) one EXPORTKEY: KBKDF-CMAC T1 (32 bytes), KBKDF-CMAC Kenc||Kmac||Ksas (96 bytes),
       AES-KWP wrap, CMAC for SAS, CMAC for CAS, CMAC for the KCV;
   (b) one whole load, both sides: (a) plus the unit's KBKDF-CMAC T1, KBKDF-CMAC session
       keys, CMAC for the CAS check, AES-KWP unwrap, CMAC for the SAS check, CMAC for the
       KCV and CMAC for the receipt RCT;

2. authority EXPORTKEY/s: ``Authority(SoftwareKeystore.ephemeral()).export(request)``;
3. end-to-end loads/s: ``load_key`` between that authority and in-memory units over
   ``LocalConnection`` (INITIALIZE DOWNLOAD, EXPORTKEY, IMPORTKEY, KCV check);
4. suite 0x03 (docs/protocol.md §10; ``--suites 1`` leaves it out), an identity set,
   the same AES-256 key: its floors are the `cryptography` calls of one EXPORTKEY (the
   curve check of D0 and E_U, two ECDSA verifications: C_U and sigU, one P-256 key
   generation, one ECDH, the symmetric part, ECBDIV instead of KBKDF, one ECDSA signature:
   the SAS) and of one whole load (those, and the unit's: a key generation and sigU at
   INITIALIZE DOWNLOAD, then C_A and the SAS verified, ECDH, the symmetric part, CMAC,
   unwrap, the KCV and the receipt signed); keyload's EXPORTKEY and end-to-end load
   (``load_key3``), each for a unit in the authority's register (its C_U is the one the
   authority issued: not verified again) and for a unit certified elsewhere (C_U
   verified).

Each measurement is warmed up, then run for ``--seconds`` (default 2 s) of timed work,
three times; the best repetition counts. The measurements take turns in chunks of
about 50 ms, so that a floor and what is compared with it see the same machine (a shared
machine's speed drifts by tens of percent over seconds). A ratio is time per operation of
the measured thing over time per operation of its floor (export over floor (a), end to end
over floor (b), for each suite); targets: export within 1.5 of its floor, end to end
within 3.0. The last line printed is always ``ratio end_to_end/floor: X.XX``, suite
0x01's (with ``--json``: the JSON object, nothing after it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat
from time import perf_counter
from typing import Any

import cryptography
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers import Cipher, modes
from cryptography.hazmat.primitives.ciphers.algorithms import AES
from cryptography.hazmat.primitives.cmac import CMAC
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFCMAC, CounterLocation, Mode
from cryptography.hazmat.primitives.keywrap import (
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from keyload.core import klp1, suite3
from keyload.core import messages as msg
from keyload.core.aids import INS_GENERATE_KEY, INS_INIT, INS_PUT_CERTIFICATE
from keyload.core.apdu import encode_command
from keyload.core.ecc import EcdsaKey, public_point, scalar_from
from keyload.core.identity import (
    LABEL_CRT,
    ROLE_AUTHORITY,
    ROLE_UNIT,
    Certificate,
    PutCertificate,
    identity_set_id,
    issue_certificate,
)
from keyload.core.keys import KeyAttributes, KeyHeader, KeyType
from keyload.core.messages3 import ExportRequest3, ImportData3, InitResponse3
from keyload.core.primitives import ecbdiv_blocks
from keyload.core.secret import Secret
from keyload.core.suite3 import SUITE_ECDH
from keyload.core.suites import SUITE_KBKDF, get_suite
from keyload.station.load import AuthorityClient, UnitClient, load_key, load_key3
from keyload.transports.local import LocalConnection
from keyload.units.authority import Authority, ExportPolicy
from keyload.units.keystore import SoftwareKeystore
from keyload.units.unit import MemoryUnitStore, Slot, Unit, UnitState

TARGET_EXPORT = 1.5
TARGET_END_TO_END = 3.0
REPETITIONS = 3

REF1 = b"BENCH-AES256"
REF2 = 1
SN = b"KL" + (1).to_bytes(6, "big")  # 8 bytes, like the demo's serials
KEY_VERSION = 1
USAGE, MODE, EXPORTABILITY = "K0", "B", "E"

# A batch runs ``n`` operations and returns the seconds they took (setup excluded).
Batch = Callable[[int], float]


# -- measuring ---------------------------------------------------------------------------
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


@dataclass(frozen=True, slots=True)
class Bench:
    """One measurement: ``batch(chunk)`` times ``chunk`` operations (about 50 ms of work)."""

    name: str
    batch: Batch
    chunk: int


def measure_all(benches: list[Bench], seconds: float) -> dict[str, Rate]:
    """Warm up, then REPETITIONS rounds; the best round of each measurement counts.

    Within a round the measurements take turns, one chunk at a time, until each has run
    ``seconds`` of timed work: a floor and the thing compared with it see the same
    machine (frequency, other load), so their ratio is steadier than if measured apart.
    """
    warmup = min(0.5, seconds / 4)
    for b in benches:
        spent = 0.0
        while spent < warmup:
            spent += b.batch(b.chunk)
    best = dict.fromkeys((b.name for b in benches), 0.0)
    for _ in range(REPETITIONS):
        ops = dict.fromkeys(best, 0)
        elapsed = dict.fromkeys(best, 0.0)
        while True:
            pending = [b for b in benches if elapsed[b.name] < seconds]
            if not pending:
                break
            for b in pending:
                elapsed[b.name] += b.batch(b.chunk)
                ops[b.name] += b.chunk
        for name in best:
            best[name] = max(best[name], ops[name] / elapsed[name])
    return {name: Rate(rate) for name, rate in best.items()}


# -- the KLP1 inputs shared by every measurement -----------------------------------------
@dataclass(frozen=True, slots=True)
class Inputs:
    t: bytes  # transport key T
    ta: bytes  # the application key TA (AES-256, not diversified)
    sn: bytes
    r: bytes
    h: bytes  # the key header H the authority sends for TA

    @classmethod
    def new(cls) -> Inputs:
        h = KeyHeader(suite=SUITE_KBKDF, key_type=KeyType.AES256, key_length=32, usage=USAGE,
                      mode=MODE, version=KEY_VERSION, exportability=EXPORTABILITY,
                      flags=0).encode()
        return cls(os.urandom(32), os.urandom(32), SN, os.urandom(16), h)


# -- (1) the floors: cryptography calls only ---------------------------------------------
_CTR = Mode.CounterMode
_BEFORE = CounterLocation.BeforeFixed
_ZERO16 = bytes(16)


def _messages(i: Inputs) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """T1 and DL contexts, and the SAS, CAS and RCT messages (what keyload MACs).

    Computed once: the floor loops feed the very same bytes to `cryptography` on every
    iteration (inputs are fixed there), so building them is not part of a floor.
    """
    ctx_dl = klp1.dl_context(i.sn, i.r, REF2)
    t1 = KBKDFCMAC(algorithm=AES, mode=_CTR, length=32, rlen=1, llen=2, location=_BEFORE,
                   label=klp1.LABEL_T1, context=i.sn, fixed=None).derive(i.t)
    sess = KBKDFCMAC(algorithm=AES, mode=_CTR, length=96, rlen=1, llen=2, location=_BEFORE,
                     label=klp1.LABEL_DL, context=ctx_dl, fixed=None).derive(t1)
    w = aes_key_wrap_with_padding(sess[0:32], i.ta)
    sas_msg = klp1.LABEL_SAS + i.h + i.ta
    c = CMAC(AES(sess[64:96]))
    c.update(sas_msg)
    sas = c.finalize()
    cas_msg = klp1.cas_message(i.sn, i.r, REF2, i.h, w, sas)
    c = CMAC(AES(i.ta))
    c.update(_ZERO16)
    kcv = c.finalize()[:5]
    rct_msg = klp1.rct_message(i.sn, i.r, REF2, i.h, kcv)
    return ctx_dl, sas_msg, cas_msg, rct_msg, w


def floor_export_batch(i: Inputs) -> Batch:
    """Floor (a): the six `cryptography` calls of one EXPORTKEY.

    ``derive_into`` (what keyload calls) rather than ``derive``: it is the faster of the
    two, so the floor is the lower one. Keys are views into the derived buffer, made once.
    """
    ctx_dl, sas_msg, cas_msg, _, _ = _messages(i)
    t, ta, sn = i.t, i.ta, i.sn
    t1 = bytearray(32)
    sess = bytearray(96)
    view = memoryview(sess)
    kenc, kmac, ksas = view[0:32], view[32:64], view[64:96]  # views: slicing costs nothing

    def batch(n: int) -> float:
        start = perf_counter()
        for _ in repeat(None, n):
            KBKDFCMAC(algorithm=AES, mode=_CTR, length=32, rlen=1, llen=2, location=_BEFORE,
                      label=b"KLP1-T1", context=sn, fixed=None).derive_into(t, t1)
            KBKDFCMAC(algorithm=AES, mode=_CTR, length=96, rlen=1, llen=2, location=_BEFORE,
                      label=b"KLP1-DL", context=ctx_dl, fixed=None).derive_into(t1, sess)
            aes_key_wrap_with_padding(kenc, ta)
            c = CMAC(AES(ksas))
            c.update(sas_msg)
            c.finalize()
            c = CMAC(AES(kmac))
            c.update(cas_msg)
            c.finalize()
            c = CMAC(AES(ta))
            c.update(_ZERO16)
            c.finalize()
        return perf_counter() - start

    return batch


def floor_load_batch(i: Inputs) -> Batch:
    """Floor (b): the export's six calls and the unit's seven, for one whole load."""
    ctx_dl, sas_msg, cas_msg, rct_msg, w = _messages(i)
    t, ta, sn = i.t, i.ta, i.sn
    a_t1, a_sess, u_t1, u_sess = bytearray(32), bytearray(96), bytearray(32), bytearray(96)
    av, uv = memoryview(a_sess), memoryview(u_sess)
    a_kenc, a_kmac, a_ksas = av[0:32], av[32:64], av[64:96]
    u_kenc, u_kmac, u_ksas = uv[0:32], uv[32:64], uv[64:96]

    def batch(n: int) -> float:
        start = perf_counter()
        for _ in repeat(None, n):
            # authority: EXPORTKEY
            KBKDFCMAC(algorithm=AES, mode=_CTR, length=32, rlen=1, llen=2, location=_BEFORE,
                      label=b"KLP1-T1", context=sn, fixed=None).derive_into(t, a_t1)
            KBKDFCMAC(algorithm=AES, mode=_CTR, length=96, rlen=1, llen=2, location=_BEFORE,
                      label=b"KLP1-DL", context=ctx_dl, fixed=None).derive_into(a_t1, a_sess)
            aes_key_wrap_with_padding(a_kenc, ta)
            c = CMAC(AES(a_ksas))
            c.update(sas_msg)
            c.finalize()
            c = CMAC(AES(a_kmac))
            c.update(cas_msg)
            c.finalize()
            c = CMAC(AES(ta))
            c.update(_ZERO16)
            c.finalize()
            # unit: IMPORTKEY
            KBKDFCMAC(algorithm=AES, mode=_CTR, length=32, rlen=1, llen=2, location=_BEFORE,
                      label=b"KLP1-T1", context=sn, fixed=None).derive_into(t, u_t1)
            KBKDFCMAC(algorithm=AES, mode=_CTR, length=96, rlen=1, llen=2, location=_BEFORE,
                      label=b"KLP1-DL", context=ctx_dl, fixed=None).derive_into(u_t1, u_sess)
            c = CMAC(AES(u_kmac))
            c.update(cas_msg)
            c.finalize()
            key = aes_key_unwrap_with_padding(u_kenc, w)
            c = CMAC(AES(u_ksas))
            c.update(sas_msg)
            c.finalize()
            c = CMAC(AES(key))
            c.update(_ZERO16)
            c.finalize()
            c = CMAC(AES(u_kmac))
            c.update(rct_msg)
            c.finalize()
        return perf_counter() - start

    return batch


def check_floor_inputs(i: Inputs) -> None:
    """The floors MAC and wrap exactly what keyload does: compare with klp1.export_key."""
    ctx_dl, sas_msg, cas_msg, rct_msg, w = _messages(i)
    out = klp1.export_key(get_suite(SUITE_KBKDF), i.t, i.sn, i.r, REF2,
                          key_type=KeyType.AES256, key=i.ta, usage=USAGE, mode=MODE,
                          version=KEY_VERSION, exportability=EXPORTABILITY, diversify=False)
    d = msg.ImportData.decode(out.import_data)
    want_cas = klp1.cas_message(i.sn, i.r, REF2, d.h, d.w, d.sas)
    want_rct = klp1.rct_message(i.sn, i.r, REF2, d.h, out.kcv)
    if (d.h, d.w, cas_msg, rct_msg) != (i.h, w, want_cas, want_rct) or \
            sas_msg != klp1.LABEL_SAS + d.h + i.ta or ctx_dl != klp1.dl_context(i.sn, i.r, REF2):
        raise SystemExit("floor inputs differ from keyload's export: benchmark is wrong")


# -- (2) authority EXPORTKEY ---------------------------------------------------------------
def new_authority() -> tuple[Authority, SoftwareKeystore, bytes]:
    """A software authority with one unsigned set and one AES-256 key; returns the set id."""
    ks = SoftwareKeystore.ephemeral()
    set_id = ks.generate_set("bench").set_id
    ks.generate_key(REF1, KeyType.AES256, KeyAttributes(USAGE, MODE, EXPORTABILITY),
                    version=KEY_VERSION, diversify=False, policy=ExportPolicy(None, None))
    return Authority(ks), ks, set_id


def export_batch(authority: Authority, set_id: bytes, count: int = 1000) -> Bench:
    """EXPORTKEY requests, precomputed (setup): one per fresh R, sent in turn."""
    requests = [msg.ExportRequest(SN, os.urandom(16), set_id, SUITE_KBKDF, REF1, REF2).encode()
                for _ in range(count)]
    export = authority.export
    export(requests[0])  # fails loudly here if the request were refused

    def batch(n: int) -> float:
        assert n == len(requests)
        start = perf_counter()
        for request in requests:
            export(request)
        return perf_counter() - start

    return Bench("export", batch, count)


# -- (3) end to end ------------------------------------------------------------------------
def end_to_end_batch(authority: Authority, ks: SoftwareKeystore, set_id: bytes) -> Bench:
    """Loads into fresh units, one load per unit (slot 1 empty, so version 1 is accepted).

    Excluded from the timing, as setup only: building the emulated units (as a card
    manufacturer delivers them: SN, T, one empty slot) and collecting the previous batch's
    units (the emulator's objects hold reference cycles; a real station has no unit
    objects to free). Inside the timing: everything a station does per unit, i.e. opening
    the client over its connection and the whole ``load_key`` (INITIALIZE DOWNLOAD with
    the unit's random R, EXPORTKEY, IMPORTKEY, KCV check), both sides' work included.
    """
    t = ks.transport_key_copy(set_id)
    client = AuthorityClient(LocalConnection(authority), suites=authority.capabilities().suites,
                             select=False)
    accepts = frozenset({KeyType.AES256})
    serial = 0

    def fresh_units(n: int) -> list[Unit]:
        nonlocal serial
        units = []
        for _ in range(n):
            serial += 1
            sn = b"KL" + serial.to_bytes(6, "big")
            units.append(Unit(MemoryUnitStore(UnitState.new(
                sn, Secret(t.buffer), {REF2: Slot(REF2, accepts)}, suites=(0x01, 0x02)))))
        return units

    def batch(n: int) -> float:
        units = fresh_units(n)  # setup
        gc.collect()  # setup: free the previous batch now, not inside the timing
        start = perf_counter()
        for unit in units:
            load_key(UnitClient(LocalConnection(unit)), client, REF1, REF2, select=False)
        elapsed = perf_counter() - start
        for unit in units:  # after the timing: every load really stored the key
            if unit.state.slots[REF2].header is None:
                raise SystemExit("a load did not store its key: benchmark is wrong")
        return elapsed

    return Bench("end_to_end", batch, 400)


# -- suite 0x03 (docs/protocol.md §10) -------------------------------------------------------
_CURVE = ec.SECP256R1()
_VERIFY = ec.ECDSA(hashes.SHA256())
_SIGN = ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
_ECDH = ec.ECDH()
_X962, _UNCOMPRESSED = Encoding.X962, PublicFormat.UncompressedPoint
_ECB = modes.ECB()  # noqa: S305 - KLP1 ECBDIV


def _rs(sig: bytes) -> tuple[int, int]:
    return int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")


def _cmac(key: bytes, data: bytes) -> bytes:
    """One AES-CMAC, as the suite 0x03 floors make it (a call costs ~0.1 µs of ~250)."""
    c = CMAC(AES(key))
    c.update(data)
    return c.finalize()


def _key(scalar: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(scalar, "big"), _CURVE)


@dataclass(frozen=True, slots=True)
class Inputs3:
    """One identity set, one unit and one download's fixed values, as §10 computes them.

    The floors feed `cryptography` these bytes on every iteration (the T1 blocks and the
    SAS, CAS and RCT messages of the reference download: building them is not part of a
    floor, as for suite 0x01); their fresh keys are real, so each floor iteration is a
    download that works (the unit unwraps what the authority wrapped)."""

    ca: bytes
    authority: bytes
    unit: bytes
    c_u: Certificate
    c_a: Certificate
    q_ca: bytes
    e_u_ref: bytes  # e_U and e_A of the reference download
    e_a_ref: bytes
    ta: bytes
    r: bytes
    h: bytes
    set_id: bytes

    @classmethod
    def new(cls) -> Inputs3:
        ca, authority, unit = (bytes(scalar_from(os.urandom)) for _ in range(3))
        q_ca = public_point(ca)
        set_id = identity_set_id(q_ca)
        signer = EcdsaKey(ca)
        c_u = issue_certificate(signer, role=ROLE_UNIT, set_id=set_id, subject=SN,
                                public_key=public_point(unit))
        c_a = issue_certificate(signer, role=ROLE_AUTHORITY, set_id=set_id,
                                subject=b"bench authority", public_key=public_point(authority))
        h = KeyHeader(suite=SUITE_ECDH, key_type=KeyType.AES256, key_length=32, usage=USAGE,
                      mode=MODE, version=KEY_VERSION, exportability=EXPORTABILITY,
                      flags=0).encode()
        return cls(ca, authority, unit, c_u, c_a, q_ca, bytes(scalar_from(os.urandom)),
                   bytes(scalar_from(os.urandom)), os.urandom(32), os.urandom(16), h, set_id)


@dataclass(frozen=True, slots=True)
class Fixed3:
    """What the floors precompute from :class:`Inputs3` (cryptography objects and bytes)."""

    ca_pub: ec.EllipticCurvePublicKey
    a_key: ec.EllipticCurvePrivateKey
    u_key: ec.EllipticCurvePrivateKey
    crt_u: bytes
    crt_u_rs: tuple[int, int]
    crt_a: bytes
    crt_a_rs: tuple[int, int]
    q_u: bytes
    q_a: bytes
    e_u_ref: bytes  # E_U of the reference download
    ini: bytes
    ini_rs: tuple[int, int]
    t1_blocks: bytes
    dl_blocks: bytes
    sas_msg: bytes
    cas_msg: bytes
    rct_msg: bytes
    # the reference download's results, to check the floor against keyload
    e_a_ref: bytes
    w: bytes
    sas: bytes
    cas: bytes
    kcv: bytes


def _fixed3(i: Inputs3) -> Fixed3:
    """The reference download computed with `cryptography` alone (plus the message layouts
    of :mod:`keyload.core.suite3`); :func:`check_floor3` compares it with keyload's."""
    a_key, u_key = _key(i.authority), _key(i.unit)
    e_u = public_point(i.e_u_ref)
    e_a_key = _key(i.e_a_ref)
    e_a = e_a_key.public_key().public_bytes(_X962, _UNCOMPRESSED)
    ini = suite3.sig_u_message(SN, i.r, i.set_id, e_u)
    z = e_a_key.exchange(_ECDH, ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, e_u))
    t1_blocks = ecbdiv_blocks(klp1.LABEL_T1, suite3.t1_context(SN, i.r, e_u, e_a), 2)
    dl_blocks = ecbdiv_blocks(klp1.LABEL_DL, klp1.dl_context(SN, i.r, REF2), 6)
    t1 = Cipher(AES(z), _ECB).encryptor().update(t1_blocks)
    sess = Cipher(AES(t1), _ECB).encryptor().update(dl_blocks)
    w = aes_key_wrap_with_padding(sess[0:32], i.ta)
    sas_msg = suite3.sas3_message(SN, i.r, REF2, REF1, i.h, w, e_u, e_a)
    r_, s_ = decode_dss_signature(a_key.sign(sas_msg, _SIGN))
    sas = r_.to_bytes(32, "big") + s_.to_bytes(32, "big")
    cas_msg = suite3.cas3_message(SN, i.r, REF2, REF1, i.h, w, sas, e_a)
    cas = _cmac(sess[32:64], cas_msg)
    kcv = _cmac(i.ta, _ZERO16)[:5]
    ini_sig = u_key.sign(ini, _SIGN)
    return Fixed3(
        ec.EllipticCurvePublicKey.from_encoded_point(_CURVE, i.q_ca), a_key, u_key,
        LABEL_CRT + i.c_u.signed_part(), _rs(i.c_u.signature),
        LABEL_CRT + i.c_a.signed_part(), _rs(i.c_a.signature), i.c_u.public_key,
        i.c_a.public_key, e_u, ini, decode_dss_signature(ini_sig), t1_blocks, dl_blocks,
        sas_msg, cas_msg, suite3.rct3_message(SN, i.r, REF2, REF1, i.h, kcv, e_a), e_a, w,
        sas, cas, kcv)


def check_floor3(i: Inputs3, f: Fixed3) -> None:
    """The floors compute what keyload's export does: the same E_A, W, SAS, CAS and KCV
    from the same inputs and e_A (deterministic signatures make the SAS comparable)."""
    req = ExportRequest3(msg.ExportRequest(SN, i.r, i.set_id, SUITE_ECDH, REF1, REF2),
                         f.e_u_ref, i.c_u, EcdsaKey(i.unit).sign(f.ini))
    out = suite3.export_key3(req, authority=EcdsaKey(i.authority), c_a=i.c_a,
                             e_a_scalar=bytearray(i.e_a_ref), key_type=KeyType.AES256,
                             key=i.ta, attributes=KeyAttributes(USAGE, MODE, EXPORTABILITY),
                             version=KEY_VERSION, diversify=False)
    want = ImportData3(REF1, REF2, i.h, f.w, f.e_a_ref, i.c_a, f.sas, f.cas).encode()
    if out.import_data != want or out.kcv != f.kcv:
        raise SystemExit("suite 0x03 floor differs from keyload's export: benchmark is wrong")


Exported = tuple[bytes, bytes, int, int, bytes]  # E_A, W, the SAS as (r, s), CAS


def _exporter(i: Inputs3, f: Fixed3) -> Callable[[bytes, int, int], Exported]:
    """The `cryptography` calls of one EXPORTKEY (§10.4, §10.3) for the unit's E_U and sigU
    (r, s): C_U's D0 and E_U made public-key objects (the curve check), C_U verified under
    Q_CA and sigU under Q_U (r || s to DER first), a fresh P-256 key pair for e_A and E_A's
    bytes, ECDH, T1 and Kenc||Kmac||Ksas by AES-ECB over the precomputed ECBDIV blocks,
    AES-KWP wrap, the SAS signed (deterministic ECDSA, DER to r || s), CMAC for the CAS and
    the KCV. One call per export: ~0.2 us of a floor of ~250."""
    ca_pub, a_key, ta = f.ca_pub, f.a_key, i.ta
    crt_u, (cr, cs), ini, q_u = f.crt_u, f.crt_u_rs, f.ini, f.q_u
    t1_blocks, dl_blocks, sas_msg, cas_msg = f.t1_blocks, f.dl_blocks, f.sas_msg, f.cas_msg
    load = ec.EllipticCurvePublicKey.from_encoded_point
    generate = ec.generate_private_key
    cmac = _cmac

    def export(e_u: bytes, ur: int, us: int) -> Exported:
        ca_pub.verify(encode_dss_signature(cr, cs), crt_u, _VERIFY)
        load(_CURVE, q_u).verify(encode_dss_signature(ur, us), ini, _VERIFY)
        peer = load(_CURVE, e_u)
        e_a = generate(_CURVE)
        e_a_pub = e_a.public_key().public_bytes(_X962, _UNCOMPRESSED)
        z = e_a.exchange(_ECDH, peer)
        t1 = Cipher(AES(z), _ECB).encryptor().update(t1_blocks)
        sess = Cipher(AES(t1), _ECB).encryptor().update(dl_blocks)
        w = aes_key_wrap_with_padding(sess[0:32], ta)
        sr, ss = decode_dss_signature(a_key.sign(sas_msg, _SIGN))
        cas = cmac(sess[32:64], cas_msg)
        cmac(ta, _ZERO16)
        return e_a_pub, w, sr, ss, cas

    return export


def floor_export3_batch(i: Inputs3) -> Batch:
    """Floor (a) of suite 0x03: the `cryptography` calls of one EXPORTKEY (:func:`_exporter`)
    for the reference download's E_U and sigU."""
    f = _fixed3(i)
    export, e_u, (ur, us) = _exporter(i, f), f.e_u_ref, f.ini_rs

    def batch(n: int) -> float:
        start = perf_counter()
        for _ in repeat(None, n):
            export(e_u, ur, us)
        return perf_counter() - start

    return batch


def floor_load3_batch(i: Inputs3) -> Batch:
    """Floor (b) of suite 0x03: one whole download, both sides. The unit's INITIALIZE
    DOWNLOAD (a fresh e_U key pair, sigU signed), the export of floor (a) with that E_U
    and sigU, and the unit's IMPORTKEY: C_A's D0 and E_A made public-key objects, C_A
    verified under Q_CA, ECDH, T1 and the session keys, the CAS checked (CMAC), the SAS
    verified, AES-KWP unwrap, the KCV (CMAC) and the receipt signed."""
    f = _fixed3(i)
    export, ca_pub, u_key = _exporter(i, f), f.ca_pub, f.u_key
    crt_a, (car, cas_), q_a, ini = f.crt_a, f.crt_a_rs, f.q_a, f.ini
    t1_blocks, dl_blocks, sas_msg, cas_msg = f.t1_blocks, f.dl_blocks, f.sas_msg, f.cas_msg
    rct_msg = f.rct_msg
    load = ec.EllipticCurvePublicKey.from_encoded_point
    generate = ec.generate_private_key
    cmac = _cmac

    def batch(n: int) -> float:
        start = perf_counter()
        for _ in repeat(None, n):
            # unit: INITIALIZE DOWNLOAD
            e_u = generate(_CURVE)
            e_u_pub = e_u.public_key().public_bytes(_X962, _UNCOMPRESSED)
            ur, us = decode_dss_signature(u_key.sign(ini, _SIGN))
            # authority: EXPORTKEY
            e_a_pub, w, sr, ss, cas = export(e_u_pub, ur, us)
            # unit: IMPORTKEY
            authority_pub = load(_CURVE, q_a)
            ca_pub.verify(encode_dss_signature(car, cas_), crt_a, _VERIFY)
            z = e_u.exchange(_ECDH, load(_CURVE, e_a_pub))
            t1 = Cipher(AES(z), _ECB).encryptor().update(t1_blocks)
            sess = Cipher(AES(t1), _ECB).encryptor().update(dl_blocks)
            c = CMAC(AES(sess[32:64]))
            c.update(cas_msg)
            c.verify(cas)
            authority_pub.verify(encode_dss_signature(sr, ss), sas_msg, _VERIFY)
            key = aes_key_unwrap_with_padding(sess[0:32], w)
            cmac(key, _ZERO16)
            decode_dss_signature(u_key.sign(rct_msg, _SIGN))
        return perf_counter() - start

    return batch


class World3:
    """A software authority with one identity set (its CA key also the benchmark's, to
    certify units outside the register) and one AES-256 key; units made on demand."""

    def __init__(self) -> None:
        self.ks = SoftwareKeystore.ephemeral()
        ca = bytes(scalar_from(os.urandom))
        info = self.ks.add_identity_set(Secret(ca), Secret(bytes(scalar_from(os.urandom))),
                                        "bench3", authority_id=b"bench authority")
        self.ks.generate_key(REF1, KeyType.AES256, KeyAttributes(USAGE, MODE, EXPORTABILITY),
                             version=KEY_VERSION, diversify=False,
                             policy=ExportPolicy(None, None))
        self.set_id, self.ca, self.serial = info.set_id, EcdsaKey(ca), 0
        self.q_ca = self.ks.identity_set(self.set_id).q_ca
        self.authority = Authority(self.ks)

    def units(self, n: int, *, registered: bool) -> list[Unit]:
        """``n`` units enrolled (GENERATE UNIT KEY, C_U, PUT CERTIFICATE), one empty
        AES-256 slot each; ``registered``: certified by the authority (in its register),
        else by the set CA outside it (a unit certified elsewhere)."""
        units, keys = [], []
        for _ in range(n):
            self.serial += 1
            sn = b"KL" + self.serial.to_bytes(6, "big")
            unit = Unit(MemoryUnitStore(UnitState.new_identity(
                sn, {REF2: Slot(REF2, frozenset({KeyType.AES256}))})))
            q_u = _apdu(unit, INS_GENERATE_KEY)[2:]
            units.append(unit)
            keys.append((sn, q_u))
        certs = self.ks.certify_units(self.set_id, keys) if registered else [
            issue_certificate(self.ca, role=ROLE_UNIT, set_id=self.set_id, subject=sn,
                              public_key=q_u) for sn, q_u in keys]
        for unit, cert in zip(units, certs, strict=True):
            _apdu(unit, INS_PUT_CERTIFICATE, PutCertificate(cert, self.q_ca).encode())
        return units


def _apdu(unit: Unit, ins: int, data: bytes = b"") -> bytes:
    answer = unit.process_apdu(encode_command(0x80, ins, 0, 0, data, 65536))
    if answer[-2:] != b"\x90\x00":
        raise SystemExit(f"unit answered {answer[-2:].hex()}: benchmark is wrong")
    return answer[:-2]


def export3_batch(world: World3, *, registered: bool, count: int = 150) -> Bench:
    """EXPORTKEY requests of one unit, each with its own challenge (R, E_U, sigU): made
    before the timing (the authority serves each challenge once), sent in turn."""
    (unit,) = world.units(1, registered=registered)
    export = world.authority.export

    def batch(n: int) -> float:
        requests = []
        for _ in range(n):  # setup
            ini = InitResponse3.decode(_apdu(unit, INS_INIT))
            requests.append(ExportRequest3(
                msg.ExportRequest(ini.sn, ini.r, ini.set_id, SUITE_ECDH, REF1, REF2),
                ini.e_u, ini.c_u, ini.sig_u).encode())
        start = perf_counter()
        for request in requests:
            export(request)
        return perf_counter() - start

    return Bench("export3" if registered else "export3_unregistered", batch, count)


def end_to_end3_batch(world: World3, *, registered: bool, count: int = 60) -> Bench:
    """Loads into fresh units of the identity set, one per unit, as :func:`end_to_end_batch`
    (``load_key3``); enrolling the units is setup, outside the timing."""
    client = AuthorityClient(LocalConnection(world.authority),
                             suites=world.authority.capabilities().suites, select=False)

    def batch(n: int) -> float:
        units = world.units(n, registered=registered)  # setup
        gc.collect()
        start = perf_counter()
        for unit in units:
            load_key3(UnitClient(LocalConnection(unit)), client, REF1, REF2, select=False)
        elapsed = perf_counter() - start
        for unit in units:
            if unit.state.slots[REF2].header is None:
                raise SystemExit("a load did not store its key: benchmark is wrong")
        return elapsed

    return Bench("end_to_end3" if registered else "end_to_end3_unregistered", batch, count)


# -- report --------------------------------------------------------------------------------
SUITE3_FIGURES = ("floor_export3", "floor_load3", "export3", "export3_unregistered",
                  "end_to_end3", "end_to_end3_unregistered")


def suite3_rows(rates: dict[str, Rate], show: Callable[[str], None]) -> dict[str, float]:
    """Print suite 0x03's figures beside suite 0x01's; its ratios, by name."""
    f_exp, f_load = rates["floor_export3"], rates["floor_load3"]
    show(f"suite 0x03 floor export (cryptography calls): {f_exp.text()}")
    show(f"suite 0x03 floor load (cryptography calls, both sides): {f_load.text()}")
    show(f"suite 0x03 authority EXPORTKEY, unit in the register: "
         f"{rates['export3'].text('exports/s')}")
    show(f"suite 0x03 authority EXPORTKEY, unit certified elsewhere (C_U verified): "
         f"{rates['export3_unregistered'].text('exports/s')}")
    show(f"suite 0x03 end-to-end load, unit in the register: "
         f"{rates['end_to_end3'].text('loads/s')}")
    show(f"suite 0x03 end-to-end load, unit certified elsewhere: "
         f"{rates['end_to_end3_unregistered'].text('loads/s')}")
    show(f"suite 0x03 exports/s over suite 0x01's: "
         f"{rates['export3'].ops_per_s / rates['export'].ops_per_s:.3f}")
    return {
        "ratio_export_floor": rates["export3"].us_per_op / f_exp.us_per_op,
        "ratio_export_unregistered_floor":
            rates["export3_unregistered"].us_per_op / f_exp.us_per_op,
        "ratio_end_to_end_floor": rates["end_to_end3"].us_per_op / f_load.us_per_op,
        "ratio_end_to_end_unregistered_floor":
            rates["end_to_end3_unregistered"].us_per_op / f_load.us_per_op,
    }
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=2.0,
                    help="timed seconds per repetition of each measurement (default 2)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--suites", choices=["1", "1,3"], default="1,3", metavar="{1 | 1,3}",
                    help="suite 0x01 only, or suite 0x03 as well (default)")
    args = ap.parse_args(argv)
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    seconds: float = args.seconds
    args.suites = {int(x) for x in args.suites.split(",")}

    env = {"python": f"{platform.python_version()} ({platform.python_implementation()})",
           "cryptography": cryptography.__version__, "cpu_count": os.cpu_count() or 0}
    if not args.json:
        print(f"python: {env['python']}")
        print(f"cryptography: {env['cryptography']}")
        print(f"cpus: {env['cpu_count']}")
        print(f"each figure: best of {REPETITIONS} runs of {seconds:g} s after a warm-up "
              "(measurements interleaved)", flush=True)

    def show(line: str) -> None:
        if not args.json:
            print(line, flush=True)

    inputs = Inputs.new()
    check_floor_inputs(inputs)
    inputs3 = Inputs3.new()
    check_floor3(inputs3, _fixed3(inputs3))
    authority, ks, set_id = new_authority()
    world = World3()
    benches = [Bench("floor_export", floor_export_batch(inputs), 2000),
               Bench("floor_load", floor_load_batch(inputs), 1000),
               export_batch(authority, set_id),
               end_to_end_batch(authority, ks, set_id)]
    if SUITE_ECDH in args.suites:
        benches += [Bench("floor_export3", floor_export3_batch(inputs3), 200),
                    Bench("floor_load3", floor_load3_batch(inputs3), 100),
                    export3_batch(world, registered=True),
                    export3_batch(world, registered=False),
                    end_to_end3_batch(world, registered=True),
                    end_to_end3_batch(world, registered=False)]
    rates = measure_all(benches, seconds)
    ks.close()
    world.ks.close()
    floor_export, floor_load = rates["floor_export"], rates["floor_load"]
    export, end_to_end = rates["export"], rates["end_to_end"]
    show(f"floor export (cryptography calls): {floor_export.text()}")
    show(f"floor load (cryptography calls, both sides): {floor_load.text()}")
    show(f"authority EXPORTKEY: {export.text('exports/s')}")
    show(f"end-to-end load: {end_to_end.text('loads/s')}")
    ratios3 = suite3_rows(rates, show) if SUITE_ECDH in args.suites else {}

    ratio_export = export.us_per_op / floor_export.us_per_op
    ratio_e2e = end_to_end.us_per_op / floor_load.us_per_op
    if args.json:
        out: dict[str, Any] = {
            **env, "seconds": seconds, "repetitions": REPETITIONS,
            "floor_export": floor_export.to_json(), "floor_load": floor_load.to_json(),
            "export": export.to_json(), "end_to_end": end_to_end.to_json(),
            "targets": {"export": TARGET_EXPORT, "end_to_end": TARGET_END_TO_END},
            "ratio_export_floor": round(ratio_export, 3),
            "ratio_end_to_end_floor": round(ratio_e2e, 3),
        }
        if ratios3:
            out["suite3"] = {**{name: rates[name].to_json() for name in SUITE3_FIGURES},
                             **{k: round(v, 3) for k, v in ratios3.items()}}
        print(json.dumps(out))
    else:
        print(f"targets: export/floor <= {TARGET_EXPORT:.2f}, "
              f"end_to_end/floor <= {TARGET_END_TO_END:.2f}")
        for name, value in ratios3.items():
            print(f"suite 0x03 {name.replace('_', ' ')}: {value:.2f}")
        print(f"ratio export/floor: {ratio_export:.2f}")
        print(f"ratio end_to_end/floor: {ratio_e2e:.2f}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
