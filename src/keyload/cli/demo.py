"""``keyload demo``: a software authority, a set of emulated units, two loads per unit.

Everything (authority, units, records) lives in ``--workdir`` or a temporary directory
named in the output. The vaults use ``$KEYLOAD_PASSPHRASE`` (or ``$KEYLOAD_KEK``) when
set, else a fixed demo passphrase, which the output says plainly: demo keys are not for
production.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..core.errors import IntegrityError, StoreError
from ..core.keys import KeyAttributes, KeyType
from ..station.customize import customize
from ..station.fleet import EmulatedFleet
from ..station.load import AuthorityClient
from ..station.progress import Progress
from ..station.records import LoadRecords
from ..transports.local import LocalConnection
from ..units.authority import Authority, ExportPolicy
from ..units.keystore import display_ref1
from ..units.storage import ENV_KEK, ENV_PASSPHRASE, KekSource
from ..units.unit import Slot
from .context import Home
from .output import emit_json, kv, table

DEMO_PASSPHRASE = "keyload-demo"

# (REF1, type, usage, mode, exportability, diversify, slot)
DEMO_KEYS = [
    (b"TMK-A", KeyType.AES256, "K0", "B", "E", True, 1),
    (b"MAC-A", KeyType.HMAC_SHA256, "M7", "C", "N", False, 2),
]


def verify_receipts(authority: Authority, records: LoadRecords
                    ) -> tuple[int, int, list[dict[str, Any]]]:
    """The authority checks every recorded receipt: (verified, invalid, invalid rows)."""
    ok = bad = 0
    invalid: list[dict[str, Any]] = []
    for row in records.rows():
        if row.status != "loaded":
            continue
        assert row.set_id and row.r and row.header and row.kcv and row.rct and row.suite
        try:
            authority.verify_receipt(suite=row.suite, set_id=row.set_id, sn=row.sn, r=row.r,
                                     ref2=row.ref2, h=row.header, kcv=row.kcv, rct=row.rct)
            ok += 1
        except (IntegrityError, StoreError):
            bad += 1
            invalid.append({"sn": row.sn.hex(), "ref1": display_ref1(row.ref1),
                            "ref2": row.ref2})
        except Exception:  # an unknown set etc.: counted as invalid, reason kept short
            bad += 1
            invalid.append({"sn": row.sn.hex(), "ref1": display_ref1(row.ref1),
                            "ref2": row.ref2})
    return ok, bad, invalid


def _source() -> tuple[KekSource, bool]:
    env = KekSource.from_env()
    if env.passphrase or env.kek_hex:
        return KekSource(passphrase=env.passphrase, kek_hex=env.kek_hex), False
    return KekSource(passphrase=DEMO_PASSPHRASE), True


def run(args: argparse.Namespace) -> int:
    if args.units < 1:
        raise ValueError("--units must be at least 1")
    if args.workdir:
        root = Path(args.workdir)
        if root.exists() and any(root.iterdir()):
            raise ValueError(f"{root} is not empty: give a new or empty --workdir")
    else:
        root = Path(tempfile.mkdtemp(prefix="keyload-demo-"))
    source, demo_pass = _source()
    home = Home(root, source)
    home.ensure()
    def say(text: str) -> None:
        if not args.json:
            print(text, flush=True)

    err = sys.stderr
    say(f"workdir: {root}")
    if demo_pass:
        say(f"vaults sealed with the demo passphrase (set {ENV_PASSPHRASE} or {ENV_KEK} "
            "for your own)")

    from ..units.keystore import SoftwareKeystore

    t_setup = time.monotonic()
    ks = SoftwareKeystore.create(home.authority_dir, source)
    fleet = EmulatedFleet.open(home.units_dir, source, create=True)
    records = LoadRecords(home.station_db, station=f"demo@{os.uname().nodename}")
    try:
        pub = ks.set_signing_key()
        set_a = ks.generate_set("operator-a", signed=True)
        set_b = ks.generate_set("operator-b")
        for ref1, kt, usage, mode, exp, div, slot in DEMO_KEYS:
            ks.generate_key(ref1, kt, KeyAttributes(usage, mode, exp), version=1,
                            diversify=div,
                            policy=ExportPolicy(frozenset({set_a.set_id}), frozenset({slot})))
        ks.generate_key(b"PIN-B", KeyType.AES128, KeyAttributes("P0", "E", "N"), version=1,
                        diversify=False,
                        policy=ExportPolicy(frozenset({set_b.set_id}), frozenset({3})))
        names = ", ".join(display_ref1(k.ref1) for k in ks.key_infos())
        say(f"authority: sets operator-a {set_a.set_id.hex()} (Ed25519 SAS), operator-b "
            f"{set_b.set_id.hex()}; keys {names}")

        # the set's units, as a card manufacturer would deliver them: SN, T, slots
        slots = {1: Slot(1, frozenset({KeyType.AES256})),
                 2: Slot(2, frozenset({KeyType.HMAC_SHA256})),
                 3: Slot(3, frozenset({KeyType.AES128, KeyType.AES256})),
                 4: Slot(4, frozenset({KeyType.AES256}), locked=True)}
        t = ks.transport_key_copy(set_a.set_id)
        serials = [b"KL" + i.to_bytes(6, "big") for i in range(1, args.units + 1)]
        prog = Progress(len(serials), label="units created", stream=err,
                        enabled=not args.quiet and not args.json)
        try:
            for sn in serials:
                fleet.create_unit(sn, t, dict(slots), verify_key=pub)
                prog.update(ok=True)
        finally:
            t.wipe()
            prog.close()
        setup_s = time.monotonic() - t_setup

        authority = home.authority(ks)
        client = AuthorityClient(LocalConnection(authority), suites=ks.capabilities().suites)
        plan = [(ref1, slot) for ref1, *_, slot in DEMO_KEYS]
        prog = Progress(len(serials), label="units customized", stream=err,
                        enabled=not args.quiet and not args.json)
        summary = customize(fleet.sources(serials), plan, client, total=len(serials),
                            on_result=records.add, on_failure=records.add_failure,
                            progress=prog)
        ok, bad, _ = verify_receipts(authority, records)
    finally:
        records.close()
        fleet.close()
        ks.close()

    rate = summary.units / summary.elapsed if summary.elapsed else 0.0
    if args.json:
        out = summary.to_json()
        out.update(workdir=str(root), receipts_verified=ok, receipts_invalid=bad,
                   setup_s=round(setup_s, 3))
        emit_json(out)
    else:
        print()
        kv([("units", summary.units), ("customized", summary.customized),
            ("failed", summary.failed_units), ("loads", f"{summary.loads_ok} ok, "
                                                        f"{summary.loads_failed} failed"),
            ("receipts", f"{ok} verified by the authority, {bad} invalid"),
            ("suites", ", ".join(f"{k:#04x}: {v}" for k, v in sorted(summary.by_suite.items()))),
            ("time", f"{summary.elapsed:.2f} s ({rate:,.0f} units/s, "
                     f"{summary.loads_ok / summary.elapsed if summary.elapsed else 0:,.0f} "
                     f"loads/s)")])
        if summary.failures:
            print()
            table(["SW", "step", "count"],
                  [[sw, step, n] for (sw, step), n in summary.failures_by_sw().most_common()])
        print()
        table(["REF1", "slot", "loaded"],
              [[display_ref1(r1), r2, summary.units - sum(
                  1 for f in summary.failures if f.ref1 == r1)] for r1, r2 in plan])
        print()
        print(f"customized {summary.customized} of {summary.units} units, "
              f"{summary.failed_units} failed")
    return 0 if summary.failed_units == 0 and bad == 0 else 1
