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
from contextlib import ExitStack

from ..lab.demo import DEMO_PIN, PIN_ENV, authority_connect, feed_units, make_authority
from ..station.campaign import Interrupt, RunOptions, RunSummary, sigint_deferred
from ..station.demo import (
    CAMPAIGN,
    demo_source,
    prepare_workdir,
    setup_demo,
    verify_demo,
    write_marker,
)
from ..station.home import Home
from ..station.journal import open_journal
from ..station.journal.model import Journal
from ..station.run import journal_summary, open_work, run_emulated, run_reader
from ..units.storage import ENV_KEK, ENV_PASSPHRASE
from .output import emit_json, kv, table
from .progress import Progress


def run(args: argparse.Namespace) -> int:
    if args.units < 1:
        raise ValueError("--units must be at least 1")
    want = {"units": args.units, "authority": args.authority, "transport": args.transport,
            "suite": args.suite}
    root, resume = prepare_workdir(args.workdir, want)
    source, demo_pass = demo_source()
    home = Home(root, source)
    home.ensure()

    def say(text: str) -> None:
        if not args.json:
            print(text, flush=True)

    show = not args.quiet and not args.json
    say(f"workdir: {root}")
    say(f"authority: {args.authority}, transport: {args.transport}"
        + (f", suite {args.suite:#04x}" if args.suite is not None else ""))
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
                setup_demo(home, make_authority(args.authority, home), args.units, say=say,
                           on_unit=prog.update, interrupt=intr, suite=args.suite)
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
            chk = verify_demo(home, journal, ks)
        intr.check()
    ok, bad, reconciled, this_run, run_s = \
        chk.verified, chk.invalid, run.reconciled, run.loads_done, run.elapsed
    if args.json:
        out = summary.to_json()
        out.update(workdir=str(root), authority=args.authority, transport=args.transport,
                   suite=args.suite,
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


OPTS = RunOptions(station="demo", batch_units=32, lease_s=30.0)


def _run_campaign(args: argparse.Namespace, home: Home, journal: Journal,
                  stack: ExitStack, show: bool, intr: Interrupt) -> RunSummary:
    """The demo's campaign over the units in-process (resumable)."""
    units = open_work(journal, CAMPAIGN)[1]
    with Progress(max(units, 1), label="units customized", stream=sys.stderr,
                  enabled=show and units > 0) as prog:
        return run_emulated(home, journal, CAMPAIGN, OPTS, interrupt=intr,
                            connect=authority_connect(args.authority), on_unit=prog.update)


def _run_pcsc(args: argparse.Namespace, home: Home, journal: Journal,
              stack: ExitStack, show: bool, intr: Interrupt) -> RunSummary:
    """The demo's campaign over its units fed through a PC/SC reader one after another,
    as cards in a personalization machine."""
    reader, n = feed_units(home, stack)
    if show:
        print("units are fed through the reader one after another (pcscd polls a "
              "virtual reader every 400 ms: about 1 unit/s)", flush=True)
    with Progress(n, label="units customized", stream=sys.stderr, enabled=show) as prog:
        return run_reader(home, journal, CAMPAIGN, OPTS, reader, n, on_unit=prog.update,
                          interrupt=intr, connect=authority_connect(args.authority),
                          timeout=15)
