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
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..core.errors import KeyloadError
from ..core.keys import KeyAttributes, KeyType
from ..core.ref1 import display_ref1
from ..core.secret import Secret
from ..records.ledger import verify_entries
from ..station.campaign import Interrupt, RunOptions, run_campaign, sigint_deferred
from ..station.customize import Failure, Summary, customize
from ..station.fleet import EmulatedFleet, EmulatedUnitSource
from ..station.journal import open_journal
from ..station.load import AuthorityClient
from ..station.records import LoadRecords
from ..station.report import station_entries, verify_ledger
from ..transports import Connection
from ..transports.local import LocalConnection
from ..units.authority import Authority, ExportPolicy
from ..units.keystore import SoftwareKeystore
from ..units.storage import ENV_KEK, ENV_PASSPHRASE, KekSource, atomic_write
from ..units.unit import Slot, Unit
from .context import Home, Keystore, open_pkcs11
from .output import emit_json, kv, table
from .progress import Progress

DEMO_PASSPHRASE = "keyload-demo"
DEMO_PIN = "246810"  # the demo token's user PIN, announced likewise
PIN_ENV = "KEYLOAD_PKCS11_PIN"
UNIT_PORT, AUTHORITY_PORT = 35963, 35964  # the two vpcd readers

# (REF1, type, usage, mode, exportability, diversify, slot)
DEMO_KEYS = [
    (b"TMK-A", KeyType.AES256, "K0", "B", "E", True, 1),
    (b"MAC-A", KeyType.HMAC_SHA256, "M7", "C", "N", False, 2),
]


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
    from ..lab.softhsm import make_token, softhsm_available, softhsm_missing_reason

    if not softhsm_available():
        raise KeyloadError(f"--authority pkcs11: {softhsm_missing_reason()} (as root: "
                           "make system-deps)")
    pin = os.environ.get(PIN_ENV) or DEMO_PIN
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
    from ..lab.pcscd import pcsc_available, running_pcscd

    avail = pcsc_available()
    if not avail.ok:
        raise KeyloadError(f"PC/SC is not available: {avail.reason} (as root: make "
                           "system-deps; then pip install 'keyload[pcsc]')")
    return stack.enter_context(running_pcscd())


MARKER = "demo.json"
SETUP_PARTS = ("authority", "units", "softhsm", "journal.db", "audit.db", "station.db")


def _prepare_workdir(args: argparse.Namespace) -> tuple[Path, bool]:
    """The workdir, and whether a finished setup is there to resume.

    A workdir holding a demo made with the same arguments is resumed; one whose setup
    was interrupted (no load has run yet) is set up again; anything else is refused.
    """
    if not args.workdir:
        return Path(tempfile.mkdtemp(prefix="keyload-demo-")), False
    root = Path(args.workdir)
    if not root.exists() or not any(root.iterdir()):
        return root, False
    want = {"units": args.units, "authority": args.authority, "transport": args.transport}
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        raise ValueError(f"{root} is not empty: give a new or empty --workdir") from None
    if {k: marker.get(k) for k in want} != want:
        raise ValueError(f"{root} holds a demo made with other arguments "
                         f"({', '.join(f'--{k} {v}' for k, v in marker.items() if k in want)})")
    if marker.get("state") == "ready":
        return root, True
    for part in SETUP_PARTS:  # an interrupted setup: nothing was loaded yet, start over
        path = root / part
        if path.is_dir():
            shutil.rmtree(path)
        else:
            for p in root.glob(part + "*"):
                p.unlink()
    return root, False


def _write_marker(root: Path, args: argparse.Namespace, state: str) -> None:
    atomic_write(root / MARKER, json.dumps(
        {"units": args.units, "authority": args.authority, "transport": args.transport,
         "state": state}).encode())


def _setup(args: argparse.Namespace, home: Home, stack: ExitStack,
           say: Callable[[str], None], show: bool, intr: Interrupt) -> list[bytes]:
    """Authority, sets, keys, the set's units and the planned campaign."""
    ks = _make_authority(args.authority, home, stack, say)
    fleet = EmulatedFleet.open(home.units_dir, home.source, create=True)
    stack.callback(fleet.close)
    pub = ks.set_signing_key()
    # T as the key ceremony makes it: generated once, installed in the authority and
    # handed to the card manufacturer for the units (then wiped)
    t = Secret.take(os.urandom(32))
    stack.callback(t.wipe)
    set_a = ks.add_set(Secret(t.buffer), "operator-a", signed=True)
    set_b = ks.generate_set("operator-b", signed=True)
    for ref1, kt, usage, mode, exp, div, slot in DEMO_KEYS:
        ks.generate_key(ref1, kt, KeyAttributes(usage, mode, exp), version=1, diversify=div,
                        policy=ExportPolicy(frozenset({set_a.set_id}), frozenset({slot})))
    ks.generate_key(b"PIN-B", KeyType.AES128, KeyAttributes("P0", "E", "N"), version=1,
                    diversify=False,
                    policy=ExportPolicy(frozenset({set_b.set_id}), frozenset({3})))
    caps = ks.capabilities()
    names = ", ".join(display_ref1(k.ref1) for k in ks.key_infos())
    say(f"authority ({caps.backend}, suites "
        f"{', '.join(f'{s:#04x}' for s in sorted(caps.suites))}): sets operator-a "
        f"{set_a.set_id.hex()}, operator-b {set_b.set_id.hex()} (Ed25519 SAS); keys {names}")
    # the set's units, as a card manufacturer delivers them: SN, T, slots
    slots = {1: Slot(1, frozenset({KeyType.AES256})),
             2: Slot(2, frozenset({KeyType.HMAC_SHA256})),
             3: Slot(3, frozenset({KeyType.AES128, KeyType.AES256})),
             4: Slot(4, frozenset({KeyType.AES256}), locked=True)}
    serials = [b"KL" + i.to_bytes(6, "big") for i in range(1, args.units + 1)]
    prog = Progress(len(serials), label="units created", stream=sys.stderr, enabled=show)
    for sn in serials:
        intr.check()  # Ctrl-C: the setup is made again by the next run
        fleet.create_unit(sn, t, dict(slots), verify_key=pub)
        prog.update(ok=True)
    prog.close()
    t.wipe()
    ks.close()
    journal = open_journal(home.journal_path)
    try:
        from .campaigns import create_campaign

        create_campaign(home, journal, CAMPAIGN, set_a.set_id,
                        [(ref1, slot) for ref1, *_, slot in DEMO_KEYS], serials,
                        {"demo": args.units})
    finally:
        journal.close()
    return serials


CAMPAIGN = "demo"


def run(args: argparse.Namespace) -> int:
    if args.units < 1:
        raise ValueError("--units must be at least 1")
    root, resume = _prepare_workdir(args)
    source, demo_pass = _source()
    home = Home(root, source)
    home.ensure()

    def say(text: str) -> None:
        if not args.json:
            print(text, flush=True)

    show = not args.quiet and not args.json
    say(f"workdir: {root}")
    say(f"authority: {args.authority}, transport: {args.transport}")
    if demo_pass:
        say(f"vaults sealed with the demo passphrase (set {ENV_PASSPHRASE} or {ENV_KEK} "
            "for your own)")
    if args.authority == "pkcs11" and not os.environ.get(PIN_ENV):
        os.environ[PIN_ENV] = DEMO_PIN
        say(f"demo token PIN in use (set {PIN_ENV} for your own)")
    t_setup = time.monotonic()
    # Ctrl-C during the setup and the campaign: stop at the next safe point, never within a
    # write (a journal commit, an audit record, a unit's file)
    with sigint_deferred() as intr:
        if resume:
            say("resuming the campaign in this workdir")
        else:
            _write_marker(root, args, "setup")
            with ExitStack() as stack:
                _setup(args, home, stack, say, show, intr)
            _write_marker(root, args, "ready")
        setup_s = time.monotonic() - t_setup
        if args.transport != "pcsc":
            summary, run_s, reconciled, this_run = _run_campaign(args, home, show, intr)
        intr.check()
    if args.transport == "pcsc":
        summary = _run_pcsc(args, home, show)
        run_s, reconciled, this_run = summary.elapsed, 0, summary.loads_ok
    ks = home.open_keystore()
    journal = open_journal(home.journal_path)
    try:
        chk = verify_ledger(journal, CAMPAIGN, home.authority(ks)) \
            if args.transport != "pcsc" else None
        ok = chk.verified if chk else 0
        bad = chk.invalid if chk else 0
        if args.transport == "pcsc":
            records = LoadRecords(home.station_db)
            chk = verify_entries(station_entries(records), home.authority(ks))
            ok, bad = chk.verified, chk.invalid
            records.close()
    finally:
        journal.close()
        ks.close()

    if args.json:
        out = summary.to_json()
        out.update(workdir=str(root), authority=args.authority, transport=args.transport,
                   receipts_verified=ok, receipts_invalid=bad, reconciled=reconciled,
                   loads_this_run=this_run, run_s=round(run_s, 3), setup_s=round(setup_s, 3))
        emit_json(out)
    else:
        print()
        kv([("units", summary.units), ("customized", summary.customized),
            ("failed", summary.failed_units), ("loads", f"{summary.loads_ok} ok, "
                                                        f"{summary.loads_failed} failed"),
            ("receipts", f"{ok} verified by the authority, {bad} invalid"
                         + (f", {reconciled} loads reconciled after an interruption"
                            if reconciled else "")),
            ("suites", ", ".join(f"{k:#04x}: {v}" for k, v in sorted(summary.by_suite.items()))),
            ("this run", f"{this_run} loads in {run_s:.2f} s"
                         + (f" ({this_run / run_s:,.0f} loads/s)" if run_s and this_run else
                            ""))])
        if summary.failures:
            print()
            table(["SW", "step", "count"],
                  [[sw, step, n] for (sw, step), n in summary.failures_by_sw().most_common()])
        print()
        print(f"customized {summary.customized} of {summary.units} units, "
              f"{summary.failed_units} failed")
    return 0 if summary.failed_units == 0 and bad == 0 else 1


def _authority_conn(args: argparse.Namespace, authority: Authority, stack: ExitStack
                    ) -> Connection:
    if args.authority != "card":
        return LocalConnection(authority)
    from ..lab.cards import VirtualCard
    from ..transports.pcsc import PcscConnection, wait_for_card

    pcscd = _pcscd(stack)
    card = VirtualCard(authority, AUTHORITY_PORT).start()
    stack.callback(card.stop)
    reader = pcscd.reader_for_port(AUTHORITY_PORT)
    wait_for_card(reader, timeout=10)
    pconn = PcscConnection(reader)
    stack.callback(pconn.close)
    return pconn


def _run_campaign(args: argparse.Namespace, home: Home, show: bool, intr: Interrupt
                  ) -> tuple[Summary, float, int, int]:
    """The demo's campaign (resumable): run, then read the outcome from the journal."""
    with ExitStack() as stack:
        journal = open_journal(home.journal_path)
        stack.callback(journal.close)
        journal.lock_station(CAMPAIGN, "demo")
        ks = home.open_keystore()
        stack.callback(ks.close)
        fleet = EmulatedFleet.open(home.units_dir, home.source)
        stack.callback(fleet.close)
        audit = home.audit()
        stack.callback(audit.close)
        authority = home.authority(ks, audit)
        client = AuthorityClient(_authority_conn(args, authority, stack),
                                 suites=ks.capabilities().suites)
        camp = journal.campaign(CAMPAIGN)
        counts = journal.counts(CAMPAIGN)
        open_units = -(-(counts["planned"] + counts["claimed"] + counts["exported"])
                       // len(camp.plan))
        prog = Progress(max(open_units, 1), label="units customized", stream=sys.stderr,
                        enabled=show and open_units > 0)
        audit.append("campaign run", {"campaign": CAMPAIGN, "station": "demo"})
        with prog:
            run = run_campaign(journal, CAMPAIGN, client,
                               lambda sn: EmulatedUnitSource(fleet, sn).connect(),
                               RunOptions(station="demo", batch_units=32, lease_s=30.0),
                               on_unit=prog.update, interrupt=intr)
        if run.interrupted:
            raise KeyboardInterrupt
        s = Summary(units=camp.units)
        bad_units: set[bytes] = set()
        for row in journal.rows(CAMPAIGN):
            if row.state == "imported":
                s.loads_ok += 1
                if row.suite is not None:
                    s.by_suite[row.suite] += 1
            else:
                s.loads_failed += 1
                bad_units.add(row.sn)
                step, _, reason = (row.reason or "").partition(": ")
                s.failures.append(Failure(row.sn.hex(), row.ref1, row.ref2, step or row.state,
                                          row.sw, reason or row.state))
        s.customized = camp.units - len(bad_units)
        s.elapsed = run.elapsed
        return s, run.elapsed, run.reconciled, run.loads_done


def _run_pcsc(args: argparse.Namespace, home: Home, show: bool) -> Summary:
    """Units fed through a PC/SC reader one after another (not a resumable campaign: the
    feeder presents cards in its own order)."""
    from ..lab.cards import CardFeeder
    from ..transports.pcsc import cards_in_reader

    with ExitStack() as stack:
        ks = home.open_keystore()
        stack.callback(ks.close)
        fleet = EmulatedFleet.open(home.units_dir, home.source)
        stack.callback(fleet.close)
        records = LoadRecords(home.station_db, station=f"demo@{os.uname().nodename}")
        stack.callback(records.close)
        authority = home.authority(ks)
        client = AuthorityClient(_authority_conn(args, authority, stack),
                                 suites=ks.capabilities().suites)
        pcscd = _pcscd(stack)
        serials = fleet.serials()

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
        if show:
            print("units are fed through the reader one after another (pcscd polls a "
                  "virtual reader every 400 ms: about 1 unit/s)", flush=True)
        plan = [(ref1, slot) for ref1, *_, slot in DEMO_KEYS]
        prog = Progress(len(serials), label="units customized", stream=sys.stderr,
                        enabled=show)
        with prog:
            return customize(units, plan, client, on_result=records.add,
                             on_failure=records.add_failure, on_unit=prog.update)
