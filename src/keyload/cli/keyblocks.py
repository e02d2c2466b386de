"""The handlers of ``keyload key import --tr31`` and ``keyload key export --tr31``
(X9.143 key blocks, version D); without ``--tr31``, ``key import`` is as before."""

from __future__ import annotations

import argparse

from ..core.notation import parse_ranges, parse_sets
from ..core.ref1 import display_ref1, parse_ref1
from ..station.keyblocks import export_key_block, import_key_block
from ..units.authority import ExportPolicy
from . import commands
from .args import home_of
from .output import emitted

_FROM_HEADER = ("type", "usage", "mode", "exportability")


def key_import(args: argparse.Namespace) -> int:
    if args.tr31 is None:
        missing = [f"--{a}" for a in _FROM_HEADER if getattr(args, a) is None]
        if args.key_version is None:
            missing.append("--version")
        if missing or args.kbpk is not None:
            args.usage_error(f"the following arguments are required: {', '.join(missing)}"
                             if missing else "--kbpk goes with --tr31")
        return commands.key_import(args)
    given = [f"--{a}" for a in _FROM_HEADER if getattr(args, a) is not None]
    if given or args.kbpk is None or args.components != 1:
        args.usage_error("--tr31 needs --kbpk; the key block's header gives the type, usage, "
                         "mode and exportability, and it takes no --components")
    policy = ExportPolicy(parse_sets(args.sets), parse_ranges(args.slots, "--slots"))
    info = import_key_block(home_of(args), parse_ref1(args.ref1), args.tr31,
                            parse_ref1(args.kbpk), policy, version=args.key_version,
                            diversify=args.diversify, label=args.label,
                            open_in_host=args.open_in_host)
    commands._print_key(args, info, [])
    return 0


def key_export(args: argparse.Namespace) -> int:
    info, block = export_key_block(home_of(args), parse_ref1(args.ref1),
                                   parse_ref1(args.kbpk), open_in_host=args.open_in_host)
    if not emitted(args, {"ref1": display_ref1(info.ref1), "kbpk": args.kbpk,
                          "kcv": info.kcv.hex().upper(), "key_block": block}):
        print(block)
    return 0
