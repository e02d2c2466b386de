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
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from ..core.errors import KeyloadError
from ..station.campaign import Interrupt, RunOptions, RunSummary, sigint_deferred
from ..station.demo import CAMPAIGN, demo_source, prepare_workdir, setup_demo, write_marker
from ..station.fleet import EmulatedFleet
from ..station.home import Home, Keystore
from ..station.journal import open_journal
from ..station.journal.model import Journal
from ..station.report import verify_ledger
from ..station.run import journal_summary, open_work, run_emulated, run_reader, units_in_turn
from ..transports import Connection
from ..transports.local import LocalConnection
from ..units.authority import Authority
from ..units.storage import ENV_KEK, ENV_PASSPHRASE
from .output import emit_json, kv, table
from .progress import Progress

DEMO_PIN = "246810"  # the demo token's user PIN, announced likewise
PIN_ENV = "KEYLOAD_PKCS11_PIN"
UNIT_PORT, AUTHORITY_PORT = 35963, 35964  # the two vpcd readers


def _make_authority(kind: str, home: Home) -> Keystore:
    if kind != "pkcs11":
        return home.create_authority()
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
    return home.create_authority({"backend": "pkcs11", "module": tok.module,
                                  "token": tok.label, "softhsm2_conf": str(tok.conf.resolve()),
                                  "clear_sas": False}, pin=pin)


def _pcscd(stack: ExitStack) -> Any:
    from ..lab.pcscd import pcsc_available, running_pcscd

    avail = pcsc_available()
    if not avail.ok:
        raise KeyloadError(f"PC/SC is not available: {avail.reason} (as root: make "
                           "system-deps; then pip install 'keyload[pcsc]')")
    return stack.enter_context(running_pcscd())


def run(args: argparse.Namespace) -> int:
    if args.units < 1:
        raise ValueError("--units must be at least 1")
    want = {"units": args.units, "authority": args.authority, "transport": args.transport}
    root, resume = prepare_workdir(args.workdir, want)
    source, demo_pass = demo_source()
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
            write_marker(root, want, "setup")
            with Progress(args.units, label="units created", stream=sys.stderr,
                          enabled=show) as prog:
                setup_demo(home, _make_authority(args.authority, home), args.units, say=say,
                           on_unit=prog.update, interrupt=intr)
            write_marker(root, want, "ready")
        setup_s = time.monotonic() - t_setup
        with ExitStack() as stack:
            journal = open_journal(home.journal_path)
            stack.callback(journal.close)
            run = _run_campaign(args, home, journal, stack, show, intr) \
                if args.transport != "pcsc" else _run_pcsc(args, home, journal, stack, show,
                                                           intr)
            if run.interrupted:
                raise KeyboardInterrupt
            summary = journal_summary(journal, CAMPAIGN, run)
            ks = home.open_keystore()
            stack.callback(ks.close)
            chk = verify_ledger(journal, CAMPAIGN, home.authority(ks))
        intr.check()
    ok, bad, reconciled, this_run, run_s = \
        chk.verified, chk.invalid, run.reconciled, run.loads_done, run.elapsed
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


def _authority_conn(args: argparse.Namespace
                    ) -> Callable[[Authority, ExitStack], Connection]:
    """How the campaign reaches the authority: in-process, or as a virtual card."""
    if args.authority != "card":
        return lambda authority, stack: LocalConnection(authority)

    def card(authority: Authority, stack: ExitStack) -> Connection:
        from ..lab.cards import VirtualCard
        from ..transports.pcsc import PcscConnection, wait_for_card

        pcscd = _pcscd(stack)
        vc = VirtualCard(authority, AUTHORITY_PORT).start()
        stack.callback(vc.stop)
        reader = pcscd.reader_for_port(AUTHORITY_PORT)
        wait_for_card(reader, timeout=10)
        pconn = PcscConnection(reader)
        stack.callback(pconn.close)
        return pconn

    return card


OPTS = RunOptions(station="demo", batch_units=32, lease_s=30.0)


def _run_campaign(args: argparse.Namespace, home: Home, journal: Journal,
                  stack: ExitStack, show: bool, intr: Interrupt) -> RunSummary:
    """The demo's campaign over the units in-process (resumable)."""
    units = open_work(journal, CAMPAIGN)[1]
    with Progress(max(units, 1), label="units customized", stream=sys.stderr,
                  enabled=show and units > 0) as prog:
        return run_emulated(home, journal, CAMPAIGN, OPTS, interrupt=intr,
                            connect=_authority_conn(args), on_unit=prog.update)


def _run_pcsc(args: argparse.Namespace, home: Home, journal: Journal,
              stack: ExitStack, show: bool, intr: Interrupt) -> RunSummary:
    """The demo's campaign over its units fed through a PC/SC reader one after another,
    as cards in a personalization machine."""
    from ..lab.cards import CardFeeder

    fleet = EmulatedFleet.open(home.units_dir, home.source)
    stack.callback(fleet.close)
    pcscd = _pcscd(stack)
    serials = fleet.serials()
    feeder = CardFeeder(units_in_turn(fleet, serials), UNIT_PORT).start()
    stack.callback(feeder.stop)
    if show:
        print("units are fed through the reader one after another (pcscd polls a "
              "virtual reader every 400 ms: about 1 unit/s)", flush=True)
    with Progress(len(serials), label="units customized", stream=sys.stderr,
                  enabled=show) as prog:
        return run_reader(home, journal, CAMPAIGN, OPTS, pcscd.reader_for_port(UNIT_PORT),
                          len(serials), on_unit=prog.update, interrupt=intr,
                          connect=_authority_conn(args), timeout=15)
