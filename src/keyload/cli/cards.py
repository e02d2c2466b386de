"""The handler of ``keyload load`` for a card in a PC/SC reader (``--reader``); without
it, the emulated unit ``--unit`` names, as before."""

from __future__ import annotations

import argparse

from ..core.messages import check_ref2
from ..core.notation import parse_sn
from ..core.ref1 import parse_ref1
from ..station.run import load_in_reader
from . import commands
from .args import home_of
from .output import emitted


def load(args: argparse.Namespace) -> int:
    if args.reader is None:
        if args.unit is None:
            args.usage_error("one of --unit or --reader is required")
        return commands.load(args)
    sn = None if args.unit is None else parse_sn(args.unit)
    ref1 = parse_ref1(args.ref1)
    check_ref2(args.ref2)
    out = load_in_reader(home_of(args), args.reader, ref1, args.ref2, sn).to_json()
    if not emitted(args, out):
        print(f"loaded {out['ref1']} v{out['key_version']} into unit {out['sn']} slot "
              f"{out['ref2']} in reader {args.reader!r}: KCV {out['kcv']} (authority and "
              f"unit agree), receipt {out['receipt']}")
    return 0
