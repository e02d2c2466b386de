"""``keyload demo``: an authority, a set of emulated units, two loads per unit.

``--authority``: ``software`` (a sealed keystore), ``pkcs11`` (a private SoftHSM2 token
made in the workdir; suite 0x02 and Ed25519 SAS entirely in the token) or ``card`` (the
software authority served as a virtual smart card, reached over PC/SC).
``--transport``: ``local`` (in-process) or ``pcsc`` (each unit is a virtual card fed
through a vpcd reader in turn, as a personalization machine feeds cards).

Everything (authority, units, records) lives in ``--workdir`` (or ``--home``, the same) or
a temporary directory named in the output and removed at the end. The vaults use
``$KEYLOAD_PASSPHRASE`` (or ``$KEYLOAD_KEK``) when set, else a fixed demo passphrase,
which the output prints: demo keys are not for production. The demo token's PIN is
``$KEYLOAD_PKCS11_PIN`` or a demo PIN, likewise.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..lab.demo import DEMO_PIN, PIN_ENV, authority_connect, feed_units, make_authority
from ..station.campaign import sigint_deferred
from ..station.demo import open_demo, removed_unless_kept, run_demo
from .output import aligned, emitted, said, table
from .progress import Progress


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
                        progress=lambda n, label: Progress(max(n, 1), label=label,
                                                           enabled=show and n > 0),
                        interrupt=intr)
        intr.check()
    s = done.summary
    if not emitted(args, done.to_json(workdir=str(home.root), authority=args.authority,
                                      transport=args.transport, suite=args.suite)):
        said("", *aligned(done.rows()))
        if s.failures:
            print()
            table(["SW", "step", "count"],
                  [[sw, step, n] for (sw, step), n in s.failures_by_sw().most_common()])
        said("", f"customized {s.customized} of {s.units} units, {s.failed_units} failed")
    return 0 if done.ok else 1
