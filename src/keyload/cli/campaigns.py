"""``keyload campaign …``, ``keyload ledger …``, ``keyload audit verify``, and the trust
an auditor takes from the authority (``keyload set ca``)."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..core.dukpt import InitialKeyId
from ..core.ref1 import display_ref1, parse_ref1
from ..records.ledger import CertificatesOnly, ReceiptChecker
from ..service.ledger import (
    AGE_BUCKETS,
    SERVICE_DB,
    ServiceLedgerCheck,
    ServiceState,
    WithoutReceipt,
    describe_state,
    human_age,
    iso_utc,
    ledger_state,
    service_ledger,
    verify_audit,
    verify_service_ledger,
)
from ..station.campaign import ATTEMPTS, RunOptions, sigint_deferred
from ..station.home import Home
from ..station.journal.model import Journal
from ..station.plan import campaign_units, open_home_journal, plan_loads, record_campaign
from ..station.report import (
    CampaignStatus,
    build_report,
    status,
    write_ledger_csv,
    write_report,
)
from ..station.run import open_work, run_emulated, run_reader
from ..station.verify import (
    LedgersCheck,
    campaigns_ledger,
    identity_trust,
    ledger_campaigns,
    ledger_journal,
    verify_campaigns,
)
from .args import CAMPAIGN, JOURNAL, NAME, QUIET, SET_ID, STATE, Sub, cmd, group, home_of, opt
from .output import emitted, kv, table
from .progress import Progress


def _journal(args: argparse.Namespace, home: Home, *, create: bool = True) -> Journal:
    return open_home_journal(home, args.journal, create=create)


def parse_load(text: str) -> tuple[bytes, int]:
    ref1, sep, ref2 = text.rpartition(":")
    if not sep:
        raise ValueError(f"--load {text!r}: expected REF1:REF2")
    try:
        r2 = int(ref2)
    except ValueError:
        raise ValueError(f"--load {text!r}: REF2 must be a number") from None
    if not 1 <= r2 <= 254:
        raise ValueError(f"--load {text!r}: REF2 must be in 1..254")
    return parse_ref1(ref1), r2


def campaign_create(args: argparse.Namespace) -> int:
    home = home_of(args)
    set_id = bytes.fromhex(args.set_id)
    loads = [parse_load(x) for x in args.load]
    serials, source = campaign_units(home, Path(args.manifest) if args.manifest else None)
    plan = plan_loads(home, set_id, loads, units=len(serials), initial_key_id_base=None if
                      args.ik_base is None else InitialKeyId.parse(args.ik_base))
    journal = _journal(args, home)
    try:
        camp = record_campaign(home, journal, args.name, set_id, plan, serials, source)
    finally:
        journal.close()
    if not emitted(args, {"campaign": camp.id, "units": camp.units,
                          "loads": camp.units * len(loads)}):
        print(f"campaign {camp.id}: {camp.units:,} units x {len(loads)} loads planned")
    return 0


def campaign_run(args: argparse.Namespace) -> int:
    for flag, v in (("--workers", args.workers), ("--batch", args.batch),
                    ("--retries", args.retries)):
        if v < 1:
            raise ValueError(f"{flag} {v}: at least 1")
    home = home_of(args)
    show = not args.json and not args.quiet
    opts = RunOptions(station=str(args.station or socket.gethostname()),
                      batch_units=args.batch, lease_s=args.lease, retries=args.retries,
                      workers=args.workers)
    # Ctrl-C: the loads in flight finish and are journaled, the status is printed, then
    # "interrupted" (130); running again resumes
    with sigint_deferred() as intr:
        journal = _journal(args, home)
        try:
            if args.reader:
                with Progress(args.cards or 1, label="cards",
                              enabled=show and args.cards is not None) as prog:
                    run = run_reader(home, journal, args.name, opts, args.reader, args.cards,
                                     on_unit=prog.update, interrupt=intr)
            else:
                units = open_work(journal, args.name)[2]
                with Progress(max(units, 1), enabled=show) as prog:
                    run = run_emulated(home, journal, args.name, opts, interrupt=intr,
                                       on_unit=prog.update)
            st = status(journal, args.name)
        finally:
            journal.close()
        if not emitted(args, {"run": run.to_json(), "status": st.to_json()}):
            _print_status(st)
        if run.interrupted or intr.stop.is_set():
            raise KeyboardInterrupt
    return 0 if st.states["failed"] == 0 else 1


def _print_status(st: CampaignStatus) -> None:
    states = st.states
    kv([("campaign", st.campaign), ("set", st.set_id.hex()), ("units", st.units),
        ("loads", st.loads)] + [(k, f"{v:,}") for k, v in states.items()])
    print(f"{states['imported']:,} of {st.loads:,} loads imported, {states['failed']:,} "
          "failed")


def campaign_status(args: argparse.Namespace) -> int:
    home = home_of(args)
    journal = _journal(args, home, create=False)
    try:
        names = [args.name] if args.name else journal.campaigns()
        sts = [status(journal, n) for n in names]
    finally:
        journal.close()
    if not emitted(args, [st.to_json() for st in sts] if not args.name else sts[0].to_json()):
        for st in sts:
            _print_status(st)
    return 0


def campaign_report(args: argparse.Namespace) -> int:
    home = home_of(args)
    journal = _journal(args, home, create=False)
    try:
        rep = build_report(journal, args.name)
    finally:
        journal.close()
    paths = write_report(rep, Path(args.out))
    if not emitted(args, {"files": [str(p) for p in paths]}):
        for p in paths:
            print(f"wrote {p}")
    return 0


def _ledgers(stack: contextlib.ExitStack, args: argparse.Namespace,
             home: Home) -> tuple[ServiceState | None, Journal | None]:
    """The service's state (if included) and the journal (if any), closed with ``stack``."""
    home.existing()  # a typo must not leave a new home behind
    store = ledger_state(args.state, home.root, home.audit_path,
                         campaign_only=bool(args.campaign), ensure=home.ensure)
    if store is not None:
        stack.callback(store.close)
    journal = ledger_journal(home, args.journal)
    if journal is not None:
        stack.callback(journal.close)
    return store, journal


def parse_trust(values: list[str]) -> dict[bytes, bytes]:
    """``--ca SETID=Q_CA`` (hex, repeatable): the Q_CA an auditor trusts for each set."""
    out: dict[bytes, bytes] = {}
    for v in values:
        set_id, sep, q_ca = v.partition("=")
        try:
            if not sep:
                raise ValueError
            out[bytes.fromhex(set_id)] = bytes.fromhex(q_ca)
        except ValueError:
            raise ValueError(f"--ca {v[:24]!r}: expected SETID=Q_CA, both hex") from None
    return out


def ledger_verify(args: argparse.Namespace) -> int:
    home = home_of(args)
    if args.ca and not args.auditor:
        raise ValueError("--ca goes with --auditor (the authority knows its sets' Q_CA)")
    if args.auditor and args.state:
        raise ValueError("--auditor reads the campaigns' ledgers, not the service's state "
                         "(--state)")
    with contextlib.ExitStack() as stack:
        checker: ReceiptChecker
        if args.auditor:  # certificates only: no keystore, no passphrase, no service state
            checker = CertificatesOnly(parse_trust(args.ca))
            home.existing()
            store, journal = None, ledger_journal(home, args.journal)
            if journal is not None:
                stack.callback(journal.close)
        else:
            store, journal = _ledgers(stack, args, home)
            ks = home.open_keystore()
            stack.callback(ks.close)
            checker = home.verifier(ks)
        camp = verify_campaigns(journal, ledger_campaigns(home, journal, args.campaign),
                                checker)
        svc = ServiceLedgerCheck() if store is None else verify_service_ledger(
            store, checker, now=time.time(), state=describe_state(args.state, home.root))
    chk = LedgersCheck(camp, svc)
    if not emitted(args, chk.to_json()):
        for r in camp.invalid_rows:
            print(f"INVALID receipt: campaign {r['campaign']} unit {r['sn']} slot {r['ref2']}: "
                  f"{r['reason']}")
        for r in svc.invalid_rows:
            print(f"INVALID receipt: service client {r['client']} unit {r['sn']} slot "
                  f"{r['ref2']}: {r['reason']}")
        if camp.reconciled:
            print(f"{camp.reconciled} loads reconciled with the unit after a crash: receipt "
                  "lost, slot status recorded")
        if camp.unverifiable:
            print(f"{camp.unverifiable} receipts of suites 0x01/0x02 not verifiable without "
                  "the authority (MACs under the set's keys)")
        _print_without_receipt(svc.without_receipt)
        print(f"campaign ledger: {camp.verified} receipts verified, {camp.invalid} invalid")
        if svc.state is None:
            why = "--auditor checks the campaigns' ledgers" if args.auditor else \
                "--campaign given" if args.campaign else f"no {home.root / SERVICE_DB}"
            print(f"service ledger: not checked ({why})")
        else:
            print(f"service ledger ({svc.state}): {svc.verified} receipts verified, "
                  f"{svc.invalid} invalid")
            wr = svc.without_receipt
            if wr.total:
                print(f"service exports without receipt: {wr.total} (" + ", ".join(
                    f"{label}: {wr.by_age[key]}" for key, label, _ in AGE_BUCKETS) + ")")
            if wr.claimed:
                print("service challenges left claimed (never exported nor refused): "
                      f"{wr.claimed}")
        print(f"{chk.verified} receipts verified, {chk.invalid} invalid")
    return 0 if chk.invalid == 0 else 1


def set_ca(args: argparse.Namespace) -> int:
    """An identity set's Q_CA and C_A: what to give an auditor."""
    info = identity_trust(home_of(args), bytes.fromhex(args.set_id))
    trust = f"{info.set_id.hex()}={info.q_ca.hex()}"
    if not emitted(args, {"set_id": info.set_id.hex(), "name": info.name,
                          "q_ca": info.q_ca.hex(), "c_a": info.c_a.encode().hex(),
                          "ca": trust}):
        kv([("set id", info.set_id.hex()), ("name", info.name), ("Q_CA", info.q_ca.hex()),
            ("C_A", info.c_a.encode().hex())])
        print(f"an auditor verifies this set's receipts with: keyload ledger verify "
              f"--auditor --ca {trust}")
    return 0


def _print_without_receipt(wr: WithoutReceipt) -> None:
    """The service's exports without a receipt, a row per client and their total (nothing
    when there are none)."""
    if not wr.total:
        return
    print(f"{wr.total} service exports without receipt (the key left the service, no "
          "receipt was posted), by client:")
    rows: list[list[object]] = [
        [c.client, c.count, iso_utc(c.oldest), human_age(wr.now - c.oldest),
         iso_utc(c.newest), human_age(wr.now - c.newest)] for c in wr.by_client]
    oldest, newest = wr.oldest, wr.newest
    assert oldest is not None and newest is not None
    rows.append(["total", wr.total, iso_utc(oldest), human_age(wr.now - oldest),
                 iso_utc(newest), human_age(wr.now - newest)])
    table(["client", "exports", "oldest", "age", "newest", "age"], rows)


def _counted(entries: Iterable[dict[str, Any]], n: list[int]) -> Iterator[dict[str, Any]]:
    for e in entries:
        n[0] += 1
        yield e


def ledger_export(args: argparse.Namespace) -> int:
    home = home_of(args)
    n_camp, n_svc = [0], [0]
    with contextlib.ExitStack() as stack:
        store, journal = _ledgers(stack, args, home)
        names = ledger_campaigns(home, journal, args.campaign)
        entries = itertools.chain(
            _counted(campaigns_ledger(journal, names), n_camp),
            _counted(service_ledger(store) if store is not None else (), n_svc))
        out = open(args.out, "w", newline="") if args.out else sys.stdout  # noqa: SIM115
        try:
            if args.format == "csv":
                write_ledger_csv(entries, out)
            else:
                out.write(json.dumps(list(entries), indent=1) + "\n")
        finally:
            if args.out:
                out.close()
    if args.out:
        print(f"{n_camp[0] + n_svc[0]} ledger entries written to {args.out} "
              f"({n_camp[0]} from campaigns, {n_svc[0]} from the service)")
    return 0


def audit_verify(args: argparse.Namespace) -> int:
    home = home_of(args)
    n, problems = verify_audit(args.state, home.audit_path, home.audit)
    if not emitted(args, {"records": n, "problems": [{"seq": p.seq, "problem": p.problem}
                                                     for p in problems]}):
        for p in problems:
            print(f"record {p.seq}: {p.problem}")
        print(f"{n} audit records checked, {len(problems)} problems")
    return 0 if not problems else 1


def add_parsers(sub: Sub) -> None:
    c = group(sub, "campaign", "customize a whole set, crash-safe and resumable")
    cmd(c, "create", campaign_create, "plan a campaign", JOURNAL, NAME, SET_ID,
        opt("--load", action="append", required=True, metavar="REF1:REF2",
            help="a load per unit (repeatable); the key's current version is planned"),
        opt("--manifest", help="units: a CSV (sn column) or JSON list of hex SNs; default: "
            "every emulated unit of the home"),
        opt("--initial-key-id-base", dest="ik_base", metavar="HEX", help="a BDK's load: the "
            "first unit's initial key ID (8 bytes), counted up per unit"))
    cmd(c, "run", campaign_run, "run or resume a campaign", JOURNAL, NAME,
        opt("--station", help="this station's name (default: the host name)"),
        opt("--workers", type=int, default=1, help="units served at once"),
        opt("--batch", type=int, default=32, help="units claimed per transaction"),
        opt("--lease", type=float, default=60.0, help="seconds a claim is held"),
        opt("--retries", type=int, default=ATTEMPTS, help="attempts per load on transport "
            "errors, memory failures and units that cannot be reached, before it fails "
            f"(default {ATTEMPTS})"),
        opt("--reader", help="customize the cards presented in this PC/SC reader (default: "
            "the home's emulated units, in-process)"),
        opt("--cards", type=int, help="with --reader: stop after this many cards (default: "
            "until the reader stays empty 30 s)"), QUIET)
    cmd(c, "status", campaign_status, "a campaign's progress", JOURNAL, opt("name", nargs="?"))
    cmd(c, "report", campaign_report, "JSON, CSV and HTML report", JOURNAL, NAME,
        opt("--out", default="reports", help="output directory"))

    g = group(sub, "ledger", "which unit holds which key, with receipts")
    cmd(g, "verify", ledger_verify,
        "the authority verifies every receipt (campaigns' and the service's); with "
        "--auditor, anyone verifies the campaigns' suite-0x03 receipts with certificates "
        "alone", JOURNAL, CAMPAIGN, STATE,
        opt("--auditor", action="store_true", help="no authority, no passphrase, no secret: "
            "each suite-0x03 receipt is checked with the E_A and the unit's certificate C_U "
            "the journal keeps, C_U under its set's Q_CA given with --ca; receipts of suites "
            "0x01/0x02 (MACs) are counted as not verifiable without the authority; the "
            "service's ledger is not read"),
        opt("--ca", action="append", default=[], metavar="SETID=Q_CA", help="with --auditor: "
            "the set CA's public key (65-byte point, hex) trusted for identity set SETID "
            "(repeatable), as `keyload set ca --set SETID` prints it at the authority; the "
            "set id is SHA-256(\"KLP1-SET\" || Q_CA)[0:5], so a wrong key is refused"))
    cmd(g, "export", ledger_export, "the ledger as CSV or JSON (campaigns' and the service's)",
        JOURNAL, CAMPAIGN, STATE, opt("--format", choices=["csv", "json"], default="csv"),
        opt("--out", help="file (default: standard output)"))

    a = group(sub, "audit", "the hash-chained audit log")
    cmd(a, "verify", audit_verify, "find edited, removed or reordered records", JOURNAL,
        opt("--state", metavar="URL", help="verify the audit chain of services sharing this "
            "postgresql:// state (keyload serve --state) instead of HOME/audit.db"))


__all__ = ["add_parsers", "display_ref1"]
