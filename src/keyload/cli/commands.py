"""The handlers behind ``keyload`` subcommands: parse, call, print. No logic of their own."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.errors import KeyloadError
from ..core.keys import KeyAttributes, KeyType, kcv
from ..core.messages import check_ref2, check_sn
from ..core.ref1 import display_ref1, parse_ref1
from ..core.secret import Secret
from ..station.admin import (
    add_key,
    authority_facts,
    create_authority,
    create_set,
    create_unit,
    export_rows,
    key_json,
    read_keystore,
    set_json,
    unit_serials,
)
from ..station.identity import create_identity_set, record_json, unit_records
from ..station.run import load_one, unit_slots
from ..station.verify import check_home_receipts
from ..units.authority import ExportPolicy, KeyInfo
from ..units.conformance import run_files
from ..units.keystore import check_usage
from ..units.unit import Slot
from .args import home_of
from .context import read_components, read_secret_hex
from .output import emitted, kv, listed, table


def parse_hex(text: str, what: str) -> bytes:
    try:
        return bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise ValueError(f"{what} must be hex, got {text!r}") from None


def parse_ranges(text: str, what: str) -> frozenset[int] | None:
    """``any`` -> None; ``1,2,10-12`` -> {1, 2, 10, 11, 12}, each in 1..254."""
    if text.strip().lower() == "any":
        return None
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"{what}: {part!r} is not a number or range") from None
    for x in out:
        check_ref2(x)
    if not out:
        raise ValueError(f"{what}: empty list")
    return frozenset(out)


def parse_sets(text: str) -> frozenset[bytes] | None:
    if text.strip().lower() == "any":
        return None
    sets = frozenset(parse_hex(x.strip(), "set id") for x in text.split(",") if x.strip())
    if not sets or any(len(s) != 5 for s in sets):
        raise ValueError("set ids are 5 bytes (10 hex digits), comma separated, or 'any'")
    return sets


# -- authority -------------------------------------------------------------------------
def authority_init(args: argparse.Namespace) -> int:
    made = create_authority(home_of(args), pkcs11=args.pkcs11, token=args.token,
                            clear_sas=args.clear_sas, signing_key=args.signing_key)
    if not emitted(args, made.to_json()):
        print(f"authority created in {made.where} ({made.backend}; suites "
              f"{', '.join(f'{s:#04x}' for s in made.suites)})")
        if made.signing_public_key is not None:
            print(f"Ed25519 SAS public key: {made.signing_public_key.hex()}")
    return 0


def authority_show(args: argparse.Namespace) -> int:
    info = authority_facts(home_of(args))
    if not emitted(args, info):
        kv([("backend", info["backend"]), ("suites", ", ".join(f"{s:#04x}" for s in
                                                               info["suites"])),
            ("signing key", info["signing_public_key"] or "none"),
            ("sets", len(info["sets"])), ("application keys", len(info["keys"]))])
    return 0


def authority_exports(args: argparse.Namespace) -> int:
    total, rows = export_rows(home_of(args), args.limit)
    if not emitted(args, {"total": total, "records": rows}):
        table(["set id", "SN", "REF1", "REF2", "suite", "version", "KCV", "initial key ID"],
              [[r["set_id"], r["sn"], r["ref1"], r["ref2"], r["suite"], r["key_version"],
                r["kcv"], r["initial_key_id"] or ""] for r in rows])
        print(f"{total} exports recorded")
    return 0


# -- sets ----------------------------------------------------------------------------
def set_create(args: argparse.Namespace) -> int:
    if args.identity:
        if args.components or args.signed:
            raise ValueError("an identity set has no transport key: --identity takes neither "
                             "--components nor --signed")
        made = create_identity_set(home_of(args), args.name)
        if not emitted(args, set_json(made)):
            print(f"identity set {made.name} created: set id {made.set_id.hex()} (from the "
                  "set CA's key)")
        return 0
    info, kcvs = create_set(home_of(args), args.name, signed=args.signed, typed=(
        (lambda: read_components(args.components, 32)) if args.components else None))
    if not emitted(args, {**set_json(info), "component_kcvs": [k.hex().upper() for k in kcvs]}):
        _print_kcvs(kcvs)
        print(f"set {info.name} created: set id {info.set_id.hex()} (= KCV of T)")
    return 0


def _print_kcvs(kcvs: list[bytes]) -> None:
    for i, k in enumerate(kcvs, 1):
        print(f"component {i} KCV  {k.hex().upper()}")


def set_list(args: argparse.Namespace) -> int:
    sets = read_keystore(home_of(args), lambda ks: ks.set_infos())
    listed(args, [set_json(s) for s in sets], ["set id", "name", "kind", "SAS"],
           [[s.set_id.hex(), s.name, "identity" if s.identity else "transport key",
             "ecdsa" if s.identity else "ed25519" if s.signed else "cmac"] for s in sets])
    return 0


# -- keys ----------------------------------------------------------------------------
def _key_common(args: argparse.Namespace) -> tuple[bytes, KeyType, KeyAttributes,
                                                   ExportPolicy]:
    ref1 = parse_ref1(args.ref1)
    kt = KeyType.parse(args.type)
    attrs = KeyAttributes(check_usage(args.usage), args.mode, args.exportability)
    policy = ExportPolicy(parse_sets(args.sets), parse_ranges(args.slots, "--slots"))
    return ref1, kt, attrs, policy


def _print_key(args: argparse.Namespace, info: KeyInfo, kcvs: list[bytes]) -> None:
    if not emitted(args, {**key_json(info), **({"component_kcvs": [k.hex().upper()
                                                                    for k in kcvs]}
                                                if kcvs else {})}):
        _print_kcvs(kcvs)
        print(f"key {display_ref1(info.ref1)}: {info.key_type.label}, {info.attrs.usage}/"
              f"{info.attrs.mode}/{info.attrs.exportability}, version {info.version}, "
              f"KCV {info.kcv.hex().upper()}")


def key_generate(args: argparse.Namespace) -> int:
    _print_key(args, *add_key(home_of(args), *_key_common(args), version=args.key_version,
                              diversify=args.diversify, label=args.label, length=args.length))
    return 0


def key_import(args: argparse.Namespace) -> int:
    def typed(length: int | None) -> tuple[Secret, list[bytes]]:
        if args.components > 1:
            return read_components(args.components, length, kcv_of=lambda b: kcv(kt, b))
        return read_secret_hex("key value (hex): ", length=length), []

    ref1, kt, attrs, policy = _key_common(args)
    _print_key(args, *add_key(home_of(args), ref1, kt, attrs, policy, version=args.key_version,
                              diversify=args.diversify, label=args.label, typed=typed))
    return 0


def key_list(args: argparse.Namespace) -> int:
    keys = read_keystore(home_of(args), lambda ks: ks.key_infos())
    listed(args, [key_json(k) for k in keys],
           ["REF1", "type", "usage", "mode", "exp", "version", "div", "KCV", "policy"],
           [[display_ref1(k.ref1), k.key_type.label, k.attrs.usage, k.attrs.mode,
             k.attrs.exportability, k.version, "yes" if k.diversify else "no",
             k.kcv.hex().upper(), k.policy.describe()] for k in keys])
    return 0


# -- units ---------------------------------------------------------------------------
def parse_slots(specs: list[str], locked: list[int]) -> dict[int, Slot]:
    slots: dict[int, Slot] = {}
    for spec in specs or ["1=aes256"]:
        ref2_text, _, types = spec.partition("=")
        try:
            ref2 = int(ref2_text)
        except ValueError:
            raise ValueError(f"--slot {spec!r}: expected REF2=TYPES") from None
        check_ref2(ref2)
        if ref2 in slots:
            raise ValueError(f"slot {ref2} given twice")
        accepts = frozenset(int(KeyType.parse(t)) for t in types.split(",") if t.strip())
        if not accepts:
            raise ValueError(f"--slot {spec!r}: no key type")
        slots[ref2] = Slot(ref2, accepts)
    for ref2 in locked:
        if ref2 not in slots:
            raise ValueError(f"--lock {ref2}: no such slot")
        s = slots[ref2]
        slots[ref2] = Slot(ref2, s.accepts, True)
    return slots


def unit_create(args: argparse.Namespace) -> int:
    home = home_of(args)
    set_id = parse_hex(args.set_id, "set id")
    sn = check_sn(parse_hex(args.sn, "SN"))
    slots = parse_slots(args.slot, args.lock)
    suites = None if args.suites is None else tuple(int(x) for x in args.suites.split(","))
    cert = create_unit(home, set_id, sn, slots, suites,
                       typed=(lambda: read_components(args.components, 32))
                       if args.components else None)
    out: dict[str, object] = {"sn": sn.hex(), "set_id": set_id.hex(), "slots": sorted(slots)}
    if cert is not None:
        out["certificate"] = cert.encode().hex()
    if not emitted(args, out):
        print(f"unit {sn.hex()} {'created' if cert is None else 'enrolled'} in set "
              f"{set_id.hex()} with slots {', '.join(map(str, sorted(slots)))}")
    return 0


def unit_status(args: argparse.Namespace) -> int:
    home = home_of(args)
    sn = check_sn(parse_hex(args.sn, "SN"))
    set_id, rows = unit_slots(home, sn)
    if not emitted(args, {"sn": sn.hex(), "set_id": set_id.hex(), "slots": rows}):
        print(f"unit {sn.hex()}, set {set_id.hex()}")
        table(["REF2", "state", "accepts", "type", "usage", "version", "KCV"],
              [[r["ref2"], r["state"], ",".join(r["accepts"]), r["type"] or "-",
                r["usage"] or "-", "-" if r["version"] is None else r["version"],
                r["kcv"] or "-"] for r in rows])
    return 0


def unit_list(args: argparse.Namespace) -> int:
    if args.set_id is not None:
        records = unit_records(home_of(args), parse_hex(args.set_id, "set id"))
        listed(args, [record_json(r) for r in records], ["SN", "status"],
               [[r.sn.hex(), "revoked" if r.revoked else "active"] for r in records])
        return 0
    serials = unit_serials(home_of(args))
    if not emitted(args, [s.hex() for s in serials]):
        for s in serials:
            print(s.hex())
        print(f"{len(serials)} units")
    return 0


def unit_serve_card(args: argparse.Namespace) -> int:
    """Serve emulated units as virtual cards to pcscd's vpcd reader, one after another."""
    from ..lab.demo import serve_cards

    home = home_of(args)
    given = [check_sn(parse_hex(x, "SN")) for x in args.sn]
    served = serve_cards(home, given, args.port, lambda n: print(
        f"feeding {n} units to the vpcd reader on port {args.port} (Ctrl-C stops)",
        flush=True))
    print(f"{served} units served")
    return 0


# -- loads ---------------------------------------------------------------------------
def load(args: argparse.Namespace) -> int:
    home = home_of(args)
    sn = check_sn(parse_hex(args.unit, "SN"))
    ref1 = parse_ref1(args.ref1)
    check_ref2(args.ref2)
    out = load_one(home, sn, ref1, args.ref2).to_json()
    if not emitted(args, out):
        print(f"loaded {out['ref1']} v{out['key_version']} into unit {out['sn']} slot "
              f"{out['ref2']}: KCV {out['kcv']} (authority and unit agree), receipt "
              f"{out['receipt']}")
    return 0


def receipts_verify(args: argparse.Namespace) -> int:
    """Single loads (``station.db``) and every campaign's ledger (``journal.db``), each
    receipt against the authority's export record and MAC; then the exports left with
    neither a receipt nor a reconciliation (the service's ledger, ``service.db``,
    accounts for its own exports: ``keyload ledger verify`` checks it)."""
    from ..service.ledger import service_exports

    home = home_of(args)
    chk = check_home_receipts(home, lambda: service_exports(home.root, home.audit_path))
    lost = chk.without_receipt
    if not emitted(args, {"verified": chk.verified, "invalid": chk.invalid,
                          "invalid_rows": chk.invalid_rows, "reconciled": chk.reconciled,
                          "exports_without_receipt": len(lost), "without_receipt": lost}):
        for row in chk.invalid_rows:
            print(f"INVALID receipt: {row['source']} unit {row['sn']} slot {row['ref2']} "
                  f"{row['ref1']}: {row['reason']}")
        for e in lost:
            print(f"export without receipt: unit {e['sn']} slot {e['ref2']} {e['ref1']} "
                  f"v{e['key_version']} KCV {e['kcv']} ({e['station'] or 'nothing recorded'})")
        if lost:
            print(f"{len(lost)} exports without receipt")
        if chk.reconciled:
            print(f"{chk.reconciled} loads reconciled with the unit after a crash: receipt "
                  "lost, slot status recorded")
        print(f"{chk.verified} receipts verified, {chk.invalid} invalid")
    return 0 if chk.invalid == 0 else 1


# -- conformance ---------------------------------------------------------------------
def conformance(args: argparse.Namespace) -> int:
    paths = [Path(f) for f in args.files]
    for p in paths:
        if not p.is_file():
            raise ValueError(f"{p}: no such file")
    passed = failed = 0
    failures = []
    for r in run_files(paths):
        if r.passed:
            passed += 1
        else:
            failed += 1
            failures.append({"file": r.file, "case": r.name, "reason": r.reason})
            if not args.json:
                print(f"FAIL {r.name} ({Path(r.file).name}): {r.reason}")
    if not emitted(args, {"passed": passed, "failed": failed, "failures": failures}):
        print(f"{passed} passed, {failed} failed")
    sys.stdout.flush()
    return 0 if failed == 0 else 1


__all__ = ["KeyloadError"]
