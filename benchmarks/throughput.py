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
   ``LocalConnection`` (INITIALIZE DOWNLOAD, EXPORTKEY, IMPORTKEY, KCV check).

Each measurement is warmed up, then run for ``--seconds`` (default 2 s) of timed work,
three times; the best repetition counts. The four measurements take turns in chunks of
about 50 ms, so that a floor and what is compared with it see the same machine (a shared
machine's speed drifts by tens of percent over seconds). A ratio is time per operation of
the measured thing over time per operation of its floor (export over floor (a), end to end
over floor (b)); targets: export within 1.5 of its floor, end to end within 3.0. The last
line printed is always ``ratio end_to_end/floor: X.XX`` (with ``--json``: the JSON object,
nothing after it).
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
from cryptography.hazmat.primitives.ciphers.algorithms import AES
from cryptography.hazmat.primitives.cmac import CMAC
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFCMAC, CounterLocation, Mode
from cryptography.hazmat.primitives.keywrap import (
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from keyload.core import klp1
from keyload.core import messages as msg
from keyload.core.keys import KeyAttributes, KeyHeader, KeyType
from keyload.core.secret import Secret
from keyload.core.suites import SUITE_KBKDF, get_suite
from keyload.station.load import AuthorityClient, UnitClient, load_key
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


# -- report --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=2.0,
                    help="timed seconds per repetition of each measurement (default 2)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.seconds <= 0:
        ap.error("--seconds must be positive")
    seconds: float = args.seconds

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
    authority, ks, set_id = new_authority()
    rates = measure_all([Bench("floor_export", floor_export_batch(inputs), 2000),
                         Bench("floor_load", floor_load_batch(inputs), 1000),
                         export_batch(authority, set_id),
                         end_to_end_batch(authority, ks, set_id)], seconds)
    ks.close()
    floor_export, floor_load = rates["floor_export"], rates["floor_load"]
    export, end_to_end = rates["export"], rates["end_to_end"]
    show(f"floor export (cryptography calls): {floor_export.text()}")
    show(f"floor load (cryptography calls, both sides): {floor_load.text()}")
    show(f"authority EXPORTKEY: {export.text('exports/s')}")
    show(f"end-to-end load: {end_to_end.text('loads/s')}")

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
        print(json.dumps(out))
    else:
        print(f"targets: export/floor <= {TARGET_EXPORT:.2f}, "
              f"end_to_end/floor <= {TARGET_END_TO_END:.2f}")
        print(f"ratio export/floor: {ratio_export:.2f}")
        print(f"ratio end_to_end/floor: {ratio_e2e:.2f}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
