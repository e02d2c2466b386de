"""``keyload load --initial-key-id`` (a BDK's load delivers a unit's IK) and ``keyload dukpt
derive`` (a working key's KCV, to check a terminal's first transaction)."""

from __future__ import annotations

import argparse

from ..core.dukpt import InitialKeyId, InitialKeyOrder
from ..core.keys import KeyType
from ..core.messages import check_ref2
from ..core.notation import parse_hex, parse_sn
from ..core.ref1 import parse_ref1
from ..station.admin import read_keystore
from ..station.dukpt import working_kcv
from ..station.run import load_one
from . import commands
from .args import home_of
from .output import emitted


def load(args: argparse.Namespace) -> int:
    """``keyload load``; with ``--initial-key-id``, the IK of BDK ``--ref1`` for the
    emulated unit ``--unit``."""
    if args.initial_key_id is None:
        if args.ik_type is not None:
            raise ValueError("--ik-type goes with --initial-key-id")
        return commands.load(args)
    if args.reader is not None or args.unit is None:
        raise ValueError("--initial-key-id loads into an emulated unit (--unit), not a "
                         "reader")
    order = InitialKeyOrder(InitialKeyId.parse(args.initial_key_id),
                            None if args.ik_type is None else KeyType.parse(args.ik_type))
    check_ref2(args.ref2)
    res = load_one(home_of(args), parse_sn(args.unit), parse_ref1(args.ref1),
                   args.ref2, order)
    if not emitted(args, res.to_json()):
        print("loaded the initial key {initial_key_id} of BDK {ref1} v{key_version} into unit "
              "{sn} slot {ref2}: KCV {kcv} (authority and unit agree), receipt "
              "{receipt}".format(**res.to_json()))
    return 0


def derive(args: argparse.Namespace) -> int:
    ref1, ksn = parse_ref1(args.ref1), parse_hex(args.ksn, "KSN")
    ik_type = None if args.ik_type is None else KeyType.parse(args.ik_type)
    out = read_keystore(home_of(args),
                        lambda ks: working_kcv(ks, ref1, ksn, args.usage, ik_type))
    if not emitted(args, out):
        print(f"{out['usage']} key of KSN {out['ksn']} under BDK {out['ref1']}: "
              f"{out['type']}, KCV {out['kcv']}")
    return 0
