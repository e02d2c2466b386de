"""The handlers behind ``keyload`` subcommands: parse, call, print. No logic of their own."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.keys import KeyAttributes, KeyType, kcv
from ..core.messages import check_ref2
from ..core.notation import counted, parse_hex, parse_ranges, parse_sets, parse_sn
from ..core.ref1 import display_ref1, parse_ref1
from ..core.secret import Secret
from ..dashboard.serve import OPTIONS, from_options
from ..station import admin, bulk, identity, rotation
from ..station.dukpt import initial_key_order, working_kcv
from ..station.keyblocks import export_key_block, import_key_block
from ..station.readers import ReaderCard, survey
from ..station.run import load_unit, unit_slots
from ..station.verify import check_home_receipts
from ..units.authority import ExportPolicy
from ..units.conformance import Tally, run_files
from ..units.keystore import check_usage
from .args import given, home_of, required
from .context import read_components, read_secret_hex
from .output import aligned, listed, shown, table


# -- authority -------------------------------------------------------------------------
def authority_init(args: argparse.Namespace) -> int:
    made = admin.create_authority(home_of(args), pkcs11=args.pkcs11, token=args.token,
                                  clear_sas=args.clear_sas, signing_key=args.signing_key)
    return shown(args, made.to_json(), *made.lines())


def authority_show(args: argparse.Namespace) -> int:
    info = admin.authority_facts(home_of(args))
    return shown(args, info, *aligned(admin.facts_rows(info)))


def authority_exports(args: argparse.Namespace) -> int:
    total, rows = admin.export_rows(home_of(args), args.limit)
    return listed(args, {"total": total, "records": rows}, admin.EXPORT_HEADERS,
                  admin.export_table(rows), f"{counted(total, 'export')} recorded")


# -- sets ----------------------------------------------------------------------------
def set_create(args: argparse.Namespace) -> int:
    made = admin.create_set(home_of(args), args.name, signed=args.signed, identity=args.identity,
                            typed=(lambda: read_components(args.components, 32))
                            if args.components else None)
    return shown(args, made.to_json(), *made.lines())


def set_list(args: argparse.Namespace) -> int:
    sets = admin.read_keystore(home_of(args), lambda ks: ks.set_infos())
    return listed(args, {"sets": [admin.set_json(s) for s in sets]},
                  ["set id", "name", "kind", "SAS"],
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


def _print_key(args: argparse.Namespace, added: admin.KeyAdded) -> int:
    return shown(args, added.to_json(), *added.lines())


def key_generate(args: argparse.Namespace) -> int:
    return _print_key(args, admin.add_key(home_of(args), *_key_common(args),
                                           version=args.key_version, diversify=args.diversify,
                                           label=args.label, length=args.length))


_FROM_HEADER = ("type", "usage", "mode", "exportability")


def key_import(args: argparse.Namespace) -> int:
    """A key typed in (value or ``--components``); with ``--tr31``, an X9.143 key block
    (version D) under KBPK ``--kbpk``, whose header gives the type, usage, mode and
    exportability."""
    if args.tr31 is not None:
        return _key_import_tr31(args)
    required(args, *_FROM_HEADER, "key_version")
    if args.kbpk is not None:
        args.usage_error("--kbpk goes with --tr31")

    def typed(length: int | None) -> tuple[Secret, list[bytes]]:
        if args.components > 1:
            return read_components(args.components, length, kcv_of=lambda b: kcv(kt, b))
        return read_secret_hex("key value (hex): ", length=length), []

    ref1, kt, attrs, policy = _key_common(args)
    return _print_key(args, admin.add_key(home_of(args), ref1, kt, attrs, policy,
                                           version=args.key_version, diversify=args.diversify,
                                           label=args.label, typed=typed))


def _key_import_tr31(args: argparse.Namespace) -> int:
    given = [f"--{a}" for a in _FROM_HEADER if getattr(args, a) is not None]
    if given or args.kbpk is None or args.components != 1:
        args.usage_error("--tr31 needs --kbpk; the key block's header gives the type, usage, "
                         "mode and exportability, and it takes no --components")
    return _print_key(args, admin.KeyAdded(import_key_block(
        home_of(args), parse_ref1(args.ref1), args.tr31, parse_ref1(args.kbpk), _policy(args),
        version=args.key_version, diversify=args.diversify, label=args.label,
        open_in_host=args.open_in_host)))


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
    return listed(args, {"keys": [admin.key_json(k, now) for k, now in keys]},
                  admin.KEY_COLUMNS, [admin.key_row(k, now) for k, now in keys])


# -- units ---------------------------------------------------------------------------
def unit_create(args: argparse.Namespace) -> int:
    """``unit create``: one unit (``--sn``; with ``--unenrolled``, a unit of an identity set
    without its key and certificate, to be served as a card and enrolled by ``unit enrol
    --reader``), or many (``--sn-start`` and ``--count``, or ``--manifest``)."""
    if [args.sn, args.sn_start, args.manifest].count(None) != 2 or (args.count is None) != (
            args.sn_start is None) or (args.unenrolled and args.sn is None):
        args.usage_error("give --sn SN, --sn-start HEX with --count N, or --manifest CSV "
                         "(--unenrolled: --sn)")
    home, set_id = home_of(args), parse_hex(args.set_id, "set id")
    slots = admin.parse_slots(args.slot, args.lock)
    suites = None if args.suites is None else tuple(int(x) for x in args.suites.split(","))
    typed = (lambda: read_components(args.components, 32)) if args.components else None
    made: admin.UnitMade | bulk.UnitsMade = bulk.create_units(
        home, set_id, bulk.serials_of(sn_start=args.sn_start, count=args.count,
                                      manifest=args.manifest), slots, suites, typed=typed
    ) if args.sn is None else admin.create_unit(home, set_id, parse_sn(args.sn), slots, suites,
                                                typed=typed, unenrolled=args.unenrolled)
    return shown(args, made.to_json(), made.told())


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
    st = unit_slots(home_of(args), parse_sn(args.sn))
    return shown(args, st.to_json(), st.heading(), *table(st.HEADERS, st.rows()))


def unit_list(args: argparse.Namespace) -> int:
    if args.set_id is not None:
        set_id = parse_hex(args.set_id, "set id")
        records = identity.unit_records(home_of(args), set_id)
        return listed(args, {"set_id": set_id.hex(), "units": [
            identity.record_json(r) for r in records]}, ["SN", "status"],
                      [[r.sn.hex(), "revoked" if r.revoked else "active"] for r in records])
    serials = admin.unit_serials(home_of(args))
    return shown(args, {"units": [s.hex() for s in serials]}, *(s.hex() for s in serials),
                 counted(len(serials), "unit"))


def unit_serve_card(args: argparse.Namespace) -> int:
    """Serve emulated units as virtual cards to pcscd's vpcd reader, one after another."""
    from ..lab.demo import serve_cards

    served = serve_cards(home_of(args), [parse_sn(x) for x in args.sn], args.port, lambda n: print(
        f"feeding {counted(n, 'unit')} to the vpcd reader on port {args.port} (Ctrl-C stops)",
        flush=True))
    return shown(args, {"served": served}, f"{counted(served, 'unit')} served")


def readers(args: argparse.Namespace) -> int:
    seen = survey()
    return listed(args, {"readers": [r.to_json() for r in seen]}, ReaderCard.COLUMNS,
                  [r.row() for r in seen], *([] if seen else ["pcscd lists no reader"]))


# -- loads ---------------------------------------------------------------------------
def load(args: argparse.Namespace) -> int:
    """One key into one unit: the emulated unit ``--sn`` names, or (``--reader``) the
    card in that PC/SC reader, which must then be ``--sn`` when it is given; with
    ``--initial-key-id``, the unit's IK of BDK ``--ref1``."""
    order = initial_key_order(args.initial_key_id, args.ik_type, reader=args.reader,
                              unit=args.sn)
    if args.reader is None and args.sn is None:
        args.usage_error("one of --sn or --reader is required")
    ref1 = parse_ref1(args.ref1)
    check_ref2(args.ref2)
    res = load_unit(home_of(args), ref1, args.ref2, reader=args.reader, initial_key=order,
                    sn=None if args.sn is None else parse_sn(args.sn))
    where = "" if args.reader is None else f" in reader {args.reader!r}"
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
    d = from_options(home_of(args), journal=args.journal, **given(args, OPTIONS))
    print(f"keyload dashboard on {d.url} (read-only; Ctrl-C stops it)", flush=True)
    d.serve()
    return 0


# -- conformance ---------------------------------------------------------------------
def conformance(args: argparse.Namespace) -> int:
    tally = Tally()
    for r in run_files([Path(f) for f in args.files]):
        if not tally.add(r) and not args.json:
            print(r.told())
    shown(args, tally.to_json(), tally.line())
    return 0 if not tally.failures else 1
