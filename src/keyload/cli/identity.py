"""The handlers for a unit of an identity set (suite 0x03): create one left for enrolment
as a card, enrol a card in a reader, revoke a unit, certify one."""

from __future__ import annotations

import argparse

from ..core.notation import parse_hex, parse_sn
from ..station.admin import parse_slots
from ..station.identity import (
    certify_unit,
    create_unenrolled,
    enrol_card,
    record_json,
    revoke_unit,
)
from . import commands
from .args import home_of
from .output import emitted


def unit_create(args: argparse.Namespace) -> int:
    """``unit create``; with ``--unenrolled``, a unit of an identity set without its key
    and certificate, to be served as a card and enrolled by ``unit enrol --reader``."""
    if not args.unenrolled:
        return commands.unit_create(args)
    if args.suites is not None or args.components:
        raise ValueError("--unenrolled makes a unit of an identity set: it takes neither "
                         "--suites nor --components")
    set_id = parse_hex(args.set_id, "set id")
    sn = parse_sn(args.sn)
    slots = parse_slots(args.slot, args.lock)
    create_unenrolled(home_of(args), set_id, sn, slots)
    if not emitted(args, {"sn": sn.hex(), "set_id": set_id.hex(), "slots": sorted(slots),
                          "enrolled": False}):
        print(f"unit {sn.hex()} created for set {set_id.hex()} with slots "
              f"{', '.join(map(str, sorted(slots)))}, not enrolled: serve it as a card "
              "(unit serve-card) and enrol it (unit enrol --reader)")
    return 0


def unit_enrol(args: argparse.Namespace) -> int:
    set_id = parse_hex(args.set_id, "set id")
    sn = parse_sn(args.sn)
    cert = enrol_card(home_of(args), args.reader, set_id, sn)
    if not emitted(args, {"set_id": set_id.hex(), "sn": sn.hex(), "reader": args.reader,
                          "certificate": cert.encode().hex()}):
        print(f"unit {sn.hex()} in reader {args.reader!r} enrolled in set {set_id.hex()}")
    return 0


def unit_revoke(args: argparse.Namespace) -> int:
    rec = revoke_unit(home_of(args), parse_hex(args.set_id, "set id"),
                      parse_sn(args.sn))
    if not emitted(args, record_json(rec)):
        print(f"unit {rec.sn.hex()} of set {rec.set_id.hex()} revoked: its exports are "
              "refused (6983)")
    return 0


def unit_certify(args: argparse.Namespace) -> int:
    set_id = parse_hex(args.set_id, "set id")
    sn = parse_sn(args.sn)
    cert = certify_unit(home_of(args), set_id, sn, parse_hex(args.public_key, "--public-key"))
    c_u = cert.encode().hex()
    if not emitted(args, {"set_id": set_id.hex(), "sn": sn.hex(), "certificate": c_u}):
        print(c_u)
    return 0
