"""The handlers behind ``keyload`` subcommands: parse, call, print. No logic of their own."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.keys import KeyAttributes, KeyType, kcv
from ..core.messages import check_ref2
from ..core.notation import parse_hex, parse_ranges, parse_sets, parse_sn
from ..core.ref1 import display_ref1, parse_ref1
from ..core.secret import Secret
from ..dashboard.serve import from_options
from ..station import admin, bulk, identity, rotation
from ..station.dukpt import initial_key_order, working_kcv
from ..station.keyblocks import export_key_block, import_key_block
from ..station.readers import ReaderCard, survey
from ..station.run import load_in_reader, load_one, unit_slots
from ..station.verify import check_home_receipts
from ..units.authority import ExportPolicy, KeyInfo
from ..units.conformance import run_files
from ..units.keystore import check_usage
from .args import home_of
from .context import read_components, read_secret_hex
from .output import aligned, listed, shown


def _suites(suites: list[int]) -> str:
    return ", ".join(f"{s:#04x}" for s in suites)


# -- authority -------------------------------------------------------------------------
def authority_init(args: argparse.Namespace) -> int:
    made = admin.create_authority(home_of(args), pkcs11=args.pkcs11, token=args.token,
                                  clear_sas=args.clear_sas, signing_key=args.signing_key)
    pub = made.signing_public_key
    return shown(args, made.to_json(), f"authority created in {made.where} ({made.backend}; "
                 f"suites {_suites(made.suites)})",
                 *([] if pub is None else [f"Ed25519 SAS public key: {pub.hex()}"]))


def authority_show(args: argparse.Namespace) -> int:
    info = admin.authority_facts(home_of(args))
    return shown(args, info, *aligned([
        ("backend", info["backend"]), ("suites", _suites(info["suites"])),
        ("signing key", info["signing_public_key"] or "none"), ("sets", len(info["sets"])),
        ("application keys", len(info["keys"]))]))


def authority_exports(args: argparse.Namespace) -> int:
    total, rows = admin.export_rows(home_of(args), args.limit)
    return listed(args, {"total": total, "records": rows},
                  ["set id", "SN", "REF1", "REF2", "suite", "version", "KCV", "initial key ID"],
                  [[r["set_id"], r["sn"], r["ref1"], r["ref2"], r["suite"], r["key_version"],
                    r["kcv"], r["initial_key_id"] or ""] for r in rows],
                  f"{total} exports recorded")


# -- sets ----------------------------------------------------------------------------
def set_create(args: argparse.Namespace) -> int:
    if args.identity:
        if args.components or args.signed:
            raise ValueError("an identity set has no transport key: --identity takes neither "
                             "--components nor --signed")
        made = identity.create_identity_set(home_of(args), args.name)
        return shown(args, admin.set_json(made), f"identity set {made.name} created: set id "
                     f"{made.set_id.hex()} (from the set CA's key)")
    info, kcvs = admin.create_set(home_of(args), args.name, signed=args.signed, typed=(
        (lambda: read_components(args.components, 32)) if args.components else None))
    kcv_json = [k.hex().upper() for k in kcvs]
    return shown(args, {**admin.set_json(info), "component_kcvs": kcv_json}, *_kcv_lines(kcvs),
                 f"set {info.name} created: set id {info.set_id.hex()} (= KCV of T)")


def _kcv_lines(kcvs: list[bytes]) -> list[str]:
    return [f"component {i} KCV  {k.hex().upper()}" for i, k in enumerate(kcvs, 1)]


def set_list(args: argparse.Namespace) -> int:
    sets = admin.read_keystore(home_of(args), lambda ks: ks.set_infos())
    return listed(args, [admin.set_json(s) for s in sets], ["set id", "name", "kind", "SAS"],
                  [[s.set_id.hex(), s.name, "identity" if s.identity else "transport key",
                    "ecdsa" if s.identity else "ed25519" if s.signed else "cmac"]
                   for s in sets])


# -- keys ----------------------------------------------------------------------------
def _key_common(args: argparse.Namespace) -> tuple[bytes, KeyType, KeyAttributes,
                                                   ExportPolicy]:
    ref1 = parse_ref1(args.ref1)
    kt = KeyType.parse(args.type)
    attrs = KeyAttributes(check_usage(args.usage), args.mode, args.exportability)
    return ref1, kt, attrs, _policy(args)


def _policy(args: argparse.Namespace) -> ExportPolicy:
    return ExportPolicy(parse_sets(args.sets), parse_ranges(args.slots, "--slots"))


def _print_key(args: argparse.Namespace, info: KeyInfo, kcvs: list[bytes]) -> int:
    a = info.attrs
    return shown(args, {**admin.key_json(info), **({"component_kcvs": [
        k.hex().upper() for k in kcvs]} if kcvs else {})}, *_kcv_lines(kcvs),
                 f"key {display_ref1(info.ref1)}: {info.key_type.label}, {a.usage}/{a.mode}/"
                 f"{a.exportability}, version {info.version}, KCV {info.kcv.hex().upper()}")


def key_generate(args: argparse.Namespace) -> int:
    return _print_key(args, *admin.add_key(home_of(args), *_key_common(args),
                                           version=args.key_version, diversify=args.diversify,
                                           label=args.label, length=args.length))


_FROM_HEADER = ("type", "usage", "mode", "exportability")


def key_import(args: argparse.Namespace) -> int:
    """A key typed in (value or ``--components``); with ``--tr31``, an X9.143 key block
    (version D) under KBPK ``--kbpk``, whose header gives the type, usage, mode and
    exportability."""
    if args.tr31 is not None:
        return _key_import_tr31(args)
    missing = [f"--{a}" for a in _FROM_HEADER if getattr(args, a) is None]
    if args.key_version is None:
        missing.append("--version")
    if missing or args.kbpk is not None:
        args.usage_error(f"the following arguments are required: {', '.join(missing)}"
                         if missing else "--kbpk goes with --tr31")

    def typed(length: int | None) -> tuple[Secret, list[bytes]]:
        if args.components > 1:
            return read_components(args.components, length, kcv_of=lambda b: kcv(kt, b))
        return read_secret_hex("key value (hex): ", length=length), []

    ref1, kt, attrs, policy = _key_common(args)
    return _print_key(args, *admin.add_key(home_of(args), ref1, kt, attrs, policy,
                                           version=args.key_version, diversify=args.diversify,
                                           label=args.label, typed=typed))


def _key_import_tr31(args: argparse.Namespace) -> int:
    given = [f"--{a}" for a in _FROM_HEADER if getattr(args, a) is not None]
    if given or args.kbpk is None or args.components != 1:
        args.usage_error("--tr31 needs --kbpk; the key block's header gives the type, usage, "
                         "mode and exportability, and it takes no --components")
    return _print_key(args, import_key_block(
        home_of(args), parse_ref1(args.ref1), args.tr31, parse_ref1(args.kbpk), _policy(args),
        version=args.key_version, diversify=args.diversify, label=args.label,
        open_in_host=args.open_in_host), [])


def key_export(args: argparse.Namespace) -> int:
    """``key export --tr31``: an X9.143 key block (version D) under KBPK ``--kbpk``."""
    info, block = export_key_block(home_of(args), parse_ref1(args.ref1),
                                   parse_ref1(args.kbpk), open_in_host=args.open_in_host)
    return shown(args, {"ref1": display_ref1(info.ref1), "kbpk": args.kbpk,
                        "kcv": info.kcv.hex().upper(), "key_block": block}, block)


def key_rotate(args: argparse.Namespace) -> int:
    """REF1's next version, generated or as ``key import`` takes it; the rest as now."""
    rotation.fill_options(vars(args), home_of(args), parse_ref1(args.ref1))
    typed = args.typed or args.components > 1 or args.tr31 is not None
    return key_import(args) if typed else key_generate(args)


def key_list(args: argparse.Namespace) -> int:
    keys = rotation.key_versions(home_of(args))
    return listed(args, [admin.key_json(k, now) for k, now in keys], admin.KEY_COLUMNS,
                  [admin.key_row(k, now) for k, now in keys])


# -- units ---------------------------------------------------------------------------
def unit_create(args: argparse.Namespace) -> int:
    """``unit create``; with ``--unenrolled``, a unit of an identity set without its key
    and certificate, to be served as a card and enrolled by ``unit enrol --reader``; with
    ``--sn-start`` and ``--count``, or ``--manifest``, many units (:mod:`.station.bulk`)."""
    if args.unenrolled and (args.suites is not None or args.components):
        raise ValueError("--unenrolled makes a unit of an identity set: it takes neither "
                         "--suites nor --components")
    if [args.sn, args.sn_start, args.manifest].count(None) != 2 or (args.count is None) != (
            args.sn_start is None) or (args.unenrolled and args.sn is None):
        args.usage_error("give --sn SN, --sn-start HEX with --count N, or --manifest CSV "
                         "(--unenrolled: --sn)")
    home = home_of(args)
    set_id, slots = parse_hex(args.set_id, "set id"), admin.parse_slots(args.slot, args.lock)
    suites = None if args.suites is None else tuple(int(x) for x in args.suites.split(","))
    typed = (lambda: read_components(args.components, 32)) if args.components else None
    if args.sn is None:
        made = bulk.create_units(home, set_id, bulk.serials_of(
            sn_start=args.sn_start, count=args.count, manifest=args.manifest), slots, suites,
            typed=typed)
        return shown(args, made.to_json(), made.told())
    sn = parse_sn(args.sn)
    if args.unenrolled:
        identity.create_unenrolled(home, set_id, sn, slots)
        return shown(args, {"sn": sn.hex(), "set_id": set_id.hex(), "slots": sorted(slots),
                            "enrolled": False},
                     f"unit {sn.hex()} created for set {set_id.hex()} with slots "
                     f"{', '.join(map(str, sorted(slots)))}, not enrolled: serve it as a card "
                     "(unit serve-card) and enrol it (unit enrol --reader)")
    cert = admin.create_unit(home, set_id, sn, slots, suites, typed=typed)
    out: dict[str, object] = {"sn": sn.hex(), "set_id": set_id.hex(), "slots": sorted(slots)}
    if cert is not None:
        out["certificate"] = cert.encode().hex()
    return shown(args, out, f"unit {sn.hex()} {'created' if cert is None else 'enrolled'} in "
                 f"set {set_id.hex()} with slots {', '.join(map(str, sorted(slots)))}")


def unit_enrol(args: argparse.Namespace) -> int:
    set_id, sn = parse_hex(args.set_id, "set id"), parse_sn(args.sn)
    cert = identity.enrol_card(home_of(args), args.reader, set_id, sn)
    return shown(args, {"set_id": set_id.hex(), "sn": sn.hex(), "reader": args.reader,
                        "certificate": cert.encode().hex()},
                 f"unit {sn.hex()} in reader {args.reader!r} enrolled in set {set_id.hex()}")


def unit_revoke(args: argparse.Namespace) -> int:
    rec = identity.revoke_unit(home_of(args), parse_hex(args.set_id, "set id"),
                               parse_sn(args.sn))
    return shown(args, identity.record_json(rec), f"unit {rec.sn.hex()} of set "
                 f"{rec.set_id.hex()} revoked: its exports are refused (6983)")


def unit_certify(args: argparse.Namespace) -> int:
    set_id, sn = parse_hex(args.set_id, "set id"), parse_sn(args.sn)
    cert = identity.certify_unit(home_of(args), set_id, sn,
                                 parse_hex(args.public_key, "--public-key"))
    c_u = cert.encode().hex()
    return shown(args, {"set_id": set_id.hex(), "sn": sn.hex(), "certificate": c_u}, c_u)


def unit_status(args: argparse.Namespace) -> int:
    home = home_of(args)
    sn = parse_sn(args.sn)
    set_id, rows = unit_slots(home, sn)
    if not args.json:
        print(f"unit {sn.hex()}, set {set_id.hex()}")
    return listed(args, {"sn": sn.hex(), "set_id": set_id.hex(), "slots": rows},
                  ["REF2", "state", "accepts", "type", "usage", "version", "KCV"],
                  [[r["ref2"], r["state"], ",".join(r["accepts"]), r["type"] or "-",
                    r["usage"] or "-", "-" if r["version"] is None else r["version"],
                    r["kcv"] or "-"] for r in rows])


def unit_list(args: argparse.Namespace) -> int:
    if args.set_id is not None:
        records = identity.unit_records(home_of(args), parse_hex(args.set_id, "set id"))
        return listed(args, [identity.record_json(r) for r in records], ["SN", "status"],
                      [[r.sn.hex(), "revoked" if r.revoked else "active"] for r in records])
    serials = admin.unit_serials(home_of(args))
    return shown(args, [s.hex() for s in serials], *(s.hex() for s in serials),
                 f"{len(serials)} units")


def unit_serve_card(args: argparse.Namespace) -> int:
    """Serve emulated units as virtual cards to pcscd's vpcd reader, one after another."""
    from ..lab.demo import serve_cards

    home = home_of(args)
    given = [parse_sn(x) for x in args.sn]
    served = serve_cards(home, given, args.port, lambda n: print(
        f"feeding {n} units to the vpcd reader on port {args.port} (Ctrl-C stops)",
        flush=True))
    print(f"{served} units served")
    return 0


def readers(args: argparse.Namespace) -> int:
    seen = survey()
    return listed(args, {"readers": [r.to_json() for r in seen]}, ReaderCard.COLUMNS,
                  [r.row() for r in seen], *([] if seen else ["pcscd lists no reader"]))


# -- loads ---------------------------------------------------------------------------
def load(args: argparse.Namespace) -> int:
    """One key into one unit: the emulated unit ``--unit`` names, or (``--reader``) the
    card in that PC/SC reader, which must then be ``--unit`` when it is given; with
    ``--initial-key-id``, the unit's IK of BDK ``--ref1``."""
    order = initial_key_order(args.initial_key_id, args.ik_type, reader=args.reader,
                              unit=args.unit)
    if args.reader is None and args.unit is None:
        args.usage_error("one of --unit or --reader is required")
    sn = None if args.unit is None else parse_sn(args.unit)
    ref1 = parse_ref1(args.ref1)
    check_ref2(args.ref2)
    if args.reader is None:
        assert sn is not None
        res, where = load_one(home_of(args), sn, ref1, args.ref2, order), ""
    else:
        res = load_in_reader(home_of(args), args.reader, ref1, args.ref2, sn, order)
        where = f" in reader {args.reader!r}"
    return shown(args, res.to_json(), f"{res.told(where)}, receipt {res.rct.hex()}")


def dukpt_derive(args: argparse.Namespace) -> int:
    ref1, ksn = parse_ref1(args.ref1), parse_hex(args.ksn, "KSN")
    ik_type = None if args.ik_type is None else KeyType.parse(args.ik_type)
    out = admin.read_keystore(home_of(args),
                              lambda ks: working_kcv(ks, ref1, ksn, args.usage, ik_type))
    return shown(args, out, f"{out['usage']} key of KSN {out['ksn']} under BDK {out['ref1']}: "
                 f"{out['type']}, KCV {out['kcv']}")


def receipts_verify(args: argparse.Namespace) -> int:
    """Single loads (``station.db``) and every campaign's ledger (``journal.db``), each
    receipt against the authority's export record and MAC; then the exports left with
    neither a receipt nor a reconciliation (the service's ledger, ``service.db``,
    accounts for its own exports: ``keyload ledger verify`` checks it)."""
    from ..service.ledger import service_exports

    home = home_of(args)
    chk = check_home_receipts(home, lambda: service_exports(home.root, home.audit_path))
    shown(args, chk.to_json(), *chk.lines())
    return 0 if chk.invalid == 0 else 1


# -- dashboard -----------------------------------------------------------------------
def dashboard(args: argparse.Namespace) -> int:
    """``keyload dashboard``: a read-only web page of the home's campaigns, ledger and
    audit chain (:mod:`keyload.dashboard`)."""
    d = from_options(home_of(args), host=args.host, port=args.port, journal=args.journal,
                     cert=args.cert, key=args.key, ca=args.ca, policy=args.policy,
                     service=args.service, service_cert=args.service_cert,
                     service_key=args.service_key)
    print(f"keyload dashboard on {d.url} (read-only; Ctrl-C stops it)", flush=True)
    d.serve()
    return 0


# -- conformance ---------------------------------------------------------------------
def conformance(args: argparse.Namespace) -> int:
    failures: list[dict[str, str]]
    passed, failures = 0, []
    for r in run_files([Path(f) for f in args.files]):
        passed += r.passed
        if not r.passed:
            failures.append({"file": r.file, "case": r.name, "reason": r.reason})
            if not args.json:
                print(f"FAIL {r.name} ({Path(r.file).name}): {r.reason}")
    shown(args, {"passed": passed, "failed": len(failures), "failures": failures},
          f"{passed} passed, {len(failures)} failed")
    sys.stdout.flush()
    return 0 if not failures else 1
