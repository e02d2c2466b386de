"""``keyload demo``: an authority, a set of emulated units, two loads per unit.

``--authority``: ``software`` (a sealed keystore), ``pkcs11`` (a private SoftHSM2 token
made in the workdir; suite 0x02 and Ed25519 SAS entirely in the token) or ``card`` (the
software authority served as a virtual smart card, reached over PC/SC).
``--transport``: ``local`` (in-process) or ``pcsc`` (each unit is a virtual card fed
through a vpcd reader in turn, as a personalization machine feeds cards).

Everything (authority, units, records) lives in ``--workdir`` or a temporary directory
named in the output. The vaults use ``$KEYLOAD_PASSPHRASE`` (or ``$KEYLOAD_KEK``) when
set, else a fixed demo passphrase, which the output says plainly: demo keys are not for
production. The demo token's PIN is ``$KEYLOAD_PKCS11_PIN`` or a demo PIN, likewise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..core.errors import KeyloadError
from ..core.keys import KeyAttributes, KeyType
from ..core.secret import Secret
from ..station.customize import UnitSource, customize
from ..station.fleet import EmulatedFleet
from ..station.load import AuthorityClient
from ..station.progress import Progress
from ..station.records import LoadRecords
from ..transports import Connection
from ..transports.local import LocalConnection
from ..units.authority import Authority, ExportPolicy
from ..units.keystore import SoftwareKeystore, display_ref1
from ..units.storage import ENV_KEK, ENV_PASSPHRASE, KekSource
from ..units.unit import Slot, Unit
from .context import Home, Keystore, open_pkcs11
from .output import emit_json, kv, table

DEMO_PASSPHRASE = "keyload-demo"
DEMO_PIN = "246810"  # the demo token's user PIN, announced likewise
PIN_ENV = "KEYLOAD_PKCS11_PIN"
UNIT_PORT, AUTHORITY_PORT = 35963, 35964  # the two vpcd readers

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
        try:
            if not (row.set_id and row.r and row.header and row.kcv and row.rct and row.suite):
                raise KeyloadError("incomplete record")
            authority.verify_receipt(suite=row.suite, set_id=row.set_id, sn=row.sn, r=row.r,
                                     ref2=row.ref2, h=row.header, kcv=row.kcv, rct=row.rct)
            ok += 1
        except KeyloadError:  # a forged receipt, an unknown set, a damaged row
            bad += 1
            invalid.append({"sn": row.sn.hex(), "ref1": display_ref1(row.ref1),
                            "ref2": row.ref2})
    return ok, bad, invalid


def _source() -> tuple[KekSource, bool]:
    env = KekSource.from_env()
    if env.passphrase or env.kek_hex:
        return KekSource(passphrase=env.passphrase, kek_hex=env.kek_hex), False
    return KekSource(passphrase=DEMO_PASSPHRASE), True


def _make_authority(kind: str, home: Home, stack: ExitStack,
                    say: Callable[[str], None]) -> Keystore:
    if kind != "pkcs11":
        ks = SoftwareKeystore.create(home.authority_dir, home.source)
        stack.callback(ks.close)
        return ks
    from ..units.softhsm import make_token, softhsm_available, softhsm_missing_reason

    if not softhsm_available():
        raise KeyloadError(f"--authority pkcs11: {softhsm_missing_reason()} (as root: "
                           "make system-deps)")
    pin = os.environ.get(PIN_ENV) or DEMO_PIN
    if not os.environ.get(PIN_ENV):
        say(f"demo token PIN in use (set {PIN_ENV} for your own)")
    if "SOFTHSM2_CONF" in os.environ and os.environ["SOFTHSM2_CONF"] != \
            str(home.root / "softhsm" / "softhsm2.conf"):
        os.environ.pop("SOFTHSM2_CONF")  # this process talks to the demo token only
    tok = make_token(home.root / "softhsm", label="keyload-demo", user_pin=pin,
                     so_pin=os.urandom(8).hex())
    cfg = {"backend": "pkcs11", "module": tok.module, "token": tok.label,
           "softhsm2_conf": str(tok.conf.resolve()), "clear_sas": False}
    p11 = open_pkcs11(cfg, pin=pin)
    stack.callback(p11.close)
    home.write_backend_config(cfg)
    return p11


def _pcscd(stack: ExitStack) -> Any:
    from ..transports.pcscd import pcsc_available, running_pcscd

    avail = pcsc_available()
    if not avail.ok:
        raise KeyloadError(f"PC/SC is not available: {avail.reason} (as root: make "
                           "system-deps; then pip install 'keyload[pcsc]')")
    return stack.enter_context(running_pcscd())


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
    show = not args.quiet and not args.json
    say(f"workdir: {root}")
    say(f"authority: {args.authority}, transport: {args.transport}")
    if demo_pass:
        say(f"vaults sealed with the demo passphrase (set {ENV_PASSPHRASE} or {ENV_KEK} "
            "for your own)")

    t_setup = time.monotonic()
    with ExitStack() as stack:
        ks = _make_authority(args.authority, home, stack, say)
        fleet = EmulatedFleet.open(home.units_dir, source, create=True)
        stack.callback(fleet.close)
        records = LoadRecords(home.station_db, station=f"demo@{os.uname().nodename}")
        stack.callback(records.close)

        pub = ks.set_signing_key()
        # T as the key ceremony makes it: generated once, installed in the authority and
        # handed to the card manufacturer for the units (then wiped)
        t = Secret.take(os.urandom(32))
        stack.callback(t.wipe)
        set_a = ks.add_set(Secret(t.buffer), "operator-a", signed=True)
        set_b = ks.generate_set("operator-b", signed=True)
        for ref1, kt, usage, mode, exp, div, slot in DEMO_KEYS:
            ks.generate_key(ref1, kt, KeyAttributes(usage, mode, exp), version=1,
                            diversify=div,
                            policy=ExportPolicy(frozenset({set_a.set_id}), frozenset({slot})))
        ks.generate_key(b"PIN-B", KeyType.AES128, KeyAttributes("P0", "E", "N"), version=1,
                        diversify=False,
                        policy=ExportPolicy(frozenset({set_b.set_id}), frozenset({3})))
        caps = ks.capabilities()
        names = ", ".join(display_ref1(k.ref1) for k in ks.key_infos())
        say(f"authority ({caps.backend}, suites "
            f"{', '.join(f'{s:#04x}' for s in sorted(caps.suites))}): sets operator-a "
            f"{set_a.set_id.hex()}, operator-b {set_b.set_id.hex()} (Ed25519 SAS); "
            f"keys {names}")

        # the set's units, as a card manufacturer delivers them: SN, T, slots
        slots = {1: Slot(1, frozenset({KeyType.AES256})),
                 2: Slot(2, frozenset({KeyType.HMAC_SHA256})),
                 3: Slot(3, frozenset({KeyType.AES128, KeyType.AES256})),
                 4: Slot(4, frozenset({KeyType.AES256}), locked=True)}
        serials = [b"KL" + i.to_bytes(6, "big") for i in range(1, args.units + 1)]
        prog = Progress(len(serials), label="units created", stream=err, enabled=show)
        for sn in serials:
            fleet.create_unit(sn, t, dict(slots), verify_key=pub)
            prog.update(ok=True)
        prog.close()
        t.wipe()
        setup_s = time.monotonic() - t_setup

        authority = home.authority(ks)
        pcscd: Any = None
        if args.transport == "pcsc" or args.authority == "card":
            pcscd = _pcscd(stack)
        auth_conn: Connection
        if args.authority == "card":
            from ..transports.pcsc import PcscConnection
            from ..transports.vcard import VirtualCard

            card = VirtualCard(authority, AUTHORITY_PORT).start()
            stack.callback(card.stop)
            reader = pcscd.reader_for_port(AUTHORITY_PORT)
            from ..transports.pcsc import wait_for_card

            wait_for_card(reader, timeout=10)
            pconn = PcscConnection(reader)
            stack.callback(pconn.close)
            auth_conn = pconn
        else:
            auth_conn = LocalConnection(authority)
        client = AuthorityClient(auth_conn, suites=caps.suites)

        units: Iterator[UnitSource] | list[UnitSource]
        if args.transport == "pcsc":
            from ..transports.pcsc import cards_in_reader
            from ..transports.vcard import CardFeeder

            def unit_apps() -> Iterator[Unit]:
                for sn in serials:
                    u = fleet.open_unit(sn)
                    try:
                        yield u
                    finally:
                        u.close()

            feeder = CardFeeder(unit_apps(), UNIT_PORT).start()
            stack.callback(feeder.stop)
            units = cards_in_reader(pcscd.reader_for_port(UNIT_PORT), count=len(serials),
                                    timeout=15)
            say("units are fed through the reader one after another (pcscd polls a "
                "virtual reader every 400 ms: about 1 unit/s)")
        else:
            units = list(fleet.sources(serials))

        plan = [(ref1, slot) for ref1, *_, slot in DEMO_KEYS]
        prog = Progress(len(serials), label="units customized", stream=err, enabled=show)
        summary = customize(units, plan, client, total=len(serials),
                            on_result=records.add, on_failure=records.add_failure,
                            progress=prog)
        ok, bad, _ = verify_receipts(authority, records)

    rate = summary.units / summary.elapsed if summary.elapsed else 0.0
    if args.json:
        out = summary.to_json()
        out.update(workdir=str(root), authority=args.authority, transport=args.transport,
                   receipts_verified=ok, receipts_invalid=bad, setup_s=round(setup_s, 3))
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
                  1 for f in summary.failures if f.ref1 in (r1, b""))] for r1, r2 in plan])
        print()
        print(f"customized {summary.customized} of {summary.units} units, "
              f"{summary.failed_units} failed")
    return 0 if summary.failed_units == 0 and bad == 0 else 1
