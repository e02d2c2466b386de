"""The handlers for a unit of an identity set (suite 0x03): revoke it, certify it."""

from __future__ import annotations

import argparse

from ..core.messages import check_sn
from ..core.notation import parse_hex
from ..station.identity import certify_unit, record_json, revoke_unit
from .args import home_of
from .output import emitted


def unit_revoke(args: argparse.Namespace) -> int:
    rec = revoke_unit(home_of(args), parse_hex(args.set_id, "set id"),
                      check_sn(parse_hex(args.sn, "SN")))
    if not emitted(args, record_json(rec)):
        print(f"unit {rec.sn.hex()} of set {rec.set_id.hex()} revoked: its exports are "
              "refused (6983)")
    return 0


def unit_certify(args: argparse.Namespace) -> int:
    set_id = parse_hex(args.set_id, "set id")
    sn = check_sn(parse_hex(args.sn, "SN"))
    cert = certify_unit(home_of(args), set_id, sn, parse_hex(args.public_key, "--public-key"))
    c_u = cert.encode().hex()
    if not emitted(args, {"set_id": set_id.hex(), "sn": sn.hex(), "certificate": c_u}):
        print(c_u)
    return 0
