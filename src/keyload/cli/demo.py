"""``keyload demo``: an authority, a set of emulated units, two loads per unit, set up and
run by :mod:`keyload.station.demo` with what :mod:`keyload.lab.demo` starts."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..lab.demo import DEMO_PIN, PIN_ENV, authority_connect, feed_units, make_authority
from ..station.campaign import sigint_deferred
from ..station.demo import open_demo, removed_unless_kept, run_demo
from .output import aligned, shown, table
from .progress import bars


def run(args: argparse.Namespace) -> int:
    if args.units < 1:
        raise ValueError("--units must be at least 1")
    want = {"units": args.units, "authority": args.authority, "transport": args.transport,
            "suite": args.suite}

    def say(text: str) -> None:
        if not args.json:
            print(text, flush=True)

    if args.home and args.workdir and Path(args.home).resolve() != Path(args.workdir).resolve():
        args.usage_error("--home and --workdir both name the demo's directory: give one")
    workdir = args.workdir or args.home
    home, resume = open_demo(workdir, want, say=say)
    show = not args.quiet and not args.json
    if args.authority == "pkcs11" and not os.environ.get(PIN_ENV):
        os.environ[PIN_ENV] = DEMO_PIN
        say(f"demo token PIN in use (set {PIN_ENV} for your own)")
    # Ctrl-C during the setup and the campaign: stop at the next safe point, never within a
    # write (a journal commit, an audit record, a unit's file)
    with sigint_deferred() as intr, removed_unless_kept(home, workdir):
        done = run_demo(home, want, resume, authority=lambda: make_authority(args.authority, home),
                        connect=authority_connect(args.authority),
                        feed=None if args.transport != "pcsc" else
                        lambda stack: feed_units(home, stack),
                        say=say, note=say if show else lambda text: None,
                        progress=bars(show),
                        interrupt=intr)
        intr.check()
    shown(args, done.to_json(workdir=str(home.root) if workdir else None, authority=args.authority,
                             transport=args.transport, suite=args.suite),
          "", *aligned(done.rows()), *(["", *table(done.FAILURE_HEADERS, done.failure_rows())]
                                       if done.failure_rows() else []), "", done.line())
    return 0 if done.ok else 1
