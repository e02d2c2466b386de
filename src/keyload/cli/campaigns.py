"""``keyload campaign …``, ``keyload ledger …``, ``keyload audit verify``."""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import socket
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..core.errors import PolicyRefused, StoreError
from ..core.ref1 import display_ref1, parse_ref1
from ..records.sql import is_postgres_url
from ..service.ledger import (
    AGE_BUCKETS,
    SERVICE_DB,
    ServiceLedgerCheck,
    ServiceState,
    WithoutReceipt,
    describe_state,
    human_age,
    iso_utc,
    open_service_state,
    service_ledger,
    verify_service_ledger,
)
from ..station.campaign import (
    ATTEMPTS,
    Interrupt,
    RunOptions,
    RunSummary,
    run_campaign,
    sigint_deferred,
)
from ..station.fleet import EmulatedFleet, EmulatedUnitSource
from ..station.journal import open_journal
from ..station.journal.model import Campaign, Journal, PlannedLoad
from ..station.load import AuthorityClient
from ..station.report import (
    CampaignStatus,
    build_report,
    invalid_rows,
    ledger,
    status,
    verify_ledger,
    write_ledger_csv,
    write_report,
)
from ..transports.local import LocalConnection
from .context import Home
from .output import emit_json, kv, table
from .progress import Progress


def _home(args: argparse.Namespace) -> Home:
    return Home.resolve(args.home)


def _journal(args: argparse.Namespace, home: Home, *, create: bool = True) -> Journal:
    """The campaign journal; a command that only reads (``create=False``) refuses a
    missing home or journal, naming it, and creates nothing."""
    where = args.journal or home.journal_path
    if not create:
        if args.journal is None:
            _existing_home(home)
        if not is_postgres_url(str(where)):
            _check_journal_file(Path(where))
        return open_journal(where)
    home.ensure()
    return open_journal(where)


def _check_journal_file(path: Path) -> None:
    """``path`` is a campaign journal, looked at read-only: a file that is not one (a text
    file, an empty file, another database) is refused as it is; opened as the journal, it
    would be made 0600 and given the journal's tables."""
    if not path.is_file():
        raise StoreError(f"no campaign journal at {path} (no campaign was created there)")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro",
                                                uri=True)) as db:
            tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master")}
    except sqlite3.Error:
        tables = set()
    if not {"campaigns", "loads"} <= tables:
        raise StoreError(f"{path} is not a campaign journal")


def _existing_home(home: Home) -> None:
    if not home.root.is_dir():
        raise StoreError(f"no keyload home at {home.root}")


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


def read_manifest(path: Path) -> list[bytes]:
    """SNs in hex: a JSON list (of strings, or of objects with ``sn``), or a CSV with an
    ``sn`` column (or one SN per line)."""
    text = path.read_text()
    items: list[str]
    if path.suffix.lower() == ".json":
        doc = json.loads(text)
        items = [d["sn"] if isinstance(d, dict) else d for d in doc]
    else:
        rows = list(csv.reader(text.splitlines()))
        if rows and rows[0] and rows[0][0].strip().lower() == "sn":
            rows = rows[1:]
        items = [r[0].strip() for r in rows if r and r[0].strip()]
    out = []
    seen = set()
    for x in items:
        try:
            sn = bytes.fromhex(str(x))
        except ValueError:
            raise ValueError(f"{path}: {x!r} is not a hex SN") from None
        if not 1 <= len(sn) <= 32:
            raise ValueError(f"{path}: SN {x!r} must be 1 to 32 bytes")
        if sn in seen:
            raise ValueError(f"{path}: SN {x} is listed twice")
        seen.add(sn)
        out.append(sn)
    return out


def create_campaign(home: Home, journal: Journal, name: str, set_id: bytes,
                    loads: list[tuple[bytes, int]], serials: list[bytes],
                    source: dict[str, object]) -> Campaign:
    """Plan every load (:func:`plan_loads`) in the journal."""
    return record_campaign(home, journal, name, set_id, plan_loads(home, set_id, loads),
                           serials, source)


def record_campaign(home: Home, journal: Journal, name: str, set_id: bytes,
                    plan: tuple[PlannedLoad, ...], serials: list[bytes],
                    source: dict[str, object]) -> Campaign:
    camp = Campaign(name, set_id, time.time(), plan, source, len(serials))
    journal.create_campaign(camp, serials)
    audit = home.audit()
    audit.append("campaign create", {"campaign": name, "set_id": set_id.hex(),
                                     "units": len(serials),
                                     "plan": [[p.ref1.hex(), p.ref2, p.version] for p in plan]})
    audit.close()
    return camp


def plan_loads(home: Home, set_id: bytes,
               loads: list[tuple[bytes, int]]) -> tuple[PlannedLoad, ...]:
    """Resolve each REF1's current version at the authority. A load the key's export
    policy forbids (the authority would refuse it, 6986, for every unit) is refused here,
    by the authority's own check (ValueError); so are two loads to one slot."""
    if len({r2 for _, r2 in loads}) != len(loads):
        raise ValueError("two loads go to the same slot")
    ks = home.open_keystore()
    try:
        ks.set_info(set_id)
        keys = [(ks.key_info(r1), r2) for r1, r2 in loads]
    finally:
        ks.close()
    for info, r2 in keys:
        try:
            info.policy.check(set_id, r2)
        except PolicyRefused:
            name = display_ref1(info.ref1)
            raise ValueError(f"--load {name}:{r2}: the export policy of key {name} "
                             f"({info.policy.describe()}) does not allow set "
                             f"{set_id.hex()} slot {r2}") from None
    return tuple(PlannedLoad(i.ref1, r2, i.version) for i, r2 in keys)


def campaign_create(args: argparse.Namespace) -> int:
    home = _home(args)
    set_id = bytes.fromhex(args.set_id)
    loads = [parse_load(x) for x in args.load]
    if args.manifest:
        serials = read_manifest(Path(args.manifest))
        source: dict[str, object] = {"manifest": str(args.manifest)}
    else:
        fleet = EmulatedFleet.open(home.units_dir, home.source)
        serials = fleet.serials()
        fleet.close()
        source = {"emulated": str(home.units_dir)}
    if not serials:
        raise ValueError("no units to customize")
    plan = plan_loads(home, set_id, loads)  # refused before the journal is created
    journal = _journal(args, home)
    try:
        camp = record_campaign(home, journal, args.name, set_id, plan, serials, source)
    finally:
        journal.close()
    if args.json:
        emit_json({"campaign": camp.id, "units": camp.units, "loads": camp.units * len(loads)})
    else:
        print(f"campaign {camp.id}: {camp.units:,} units x {len(loads)} loads planned")
    return 0


def run_emulated(home: Home, journal: Journal, name: str, opts: RunOptions, *,
                 show: bool, interrupt: Interrupt) -> tuple[RunSummary, CampaignStatus, int]:
    """Run (or resume) a campaign over the home's emulated units, in-process."""
    camp = journal.campaign(name)
    journal.lock_station(name, opts.station)
    ks = home.open_keystore()
    fleet = EmulatedFleet.open(home.units_dir, home.source)
    audit = home.audit()
    try:
        authority = home.authority(ks, audit)
        client = AuthorityClient(LocalConnection(authority), suites=ks.capabilities().suites)
        counts = journal.counts(name)
        left_units = camp.units if not counts["imported"] else None
        todo = counts["planned"] + counts["claimed"] + counts["exported"]
        total_units = left_units if left_units is not None else \
            -(-todo // max(len(camp.plan), 1))
        prog = Progress(max(total_units, 1), label="units", enabled=show)
        audit.append("campaign run", {"campaign": name, "station": opts.station,
                                      "open_loads": todo})

        def connect(sn: bytes) -> EmulatedUnitSource:
            return EmulatedUnitSource(fleet, sn)

        with prog:
            summary = run_campaign(journal, name, client, lambda sn: connect(sn).connect(),
                                   opts, on_unit=prog.update, interrupt=interrupt)
        audit.append("campaign stop", {"campaign": name, "station": opts.station,
                                       **{k: v for k, v in summary.to_json().items()
                                          if k != "failures"}})
    finally:
        audit.close()
        fleet.close()
        ks.close()
    return summary, status(journal, name), (130 if summary.interrupted else 0)


def _station_name(args: argparse.Namespace) -> str:
    return str(args.station or socket.gethostname())


def _opts(args: argparse.Namespace) -> RunOptions:
    return RunOptions(station=_station_name(args), batch_units=args.batch,
                      lease_s=args.lease, retries=args.retries, workers=args.workers)


def run_reader(home: Home, journal: Journal, name: str, opts: RunOptions, reader: str,
               cards: int | None, *, show: bool,
               interrupt: Interrupt) -> tuple[RunSummary, CampaignStatus, int]:
    """Run a campaign over the cards presented in a PC/SC reader, in any order."""
    from ..station.campaign import run_campaign_cards
    from ..transports.pcsc import cards_in_reader

    journal.campaign(name)
    journal.lock_station(name, opts.station)
    ks = home.open_keystore()
    audit = home.audit()
    try:
        authority = home.authority(ks, audit)
        client = AuthorityClient(LocalConnection(authority), suites=ks.capabilities().suites)
        audit.append("campaign run", {"campaign": name, "station": opts.station,
                                      "reader": reader})
        prog = Progress(cards or 1, label="cards", enabled=show and cards is not None)
        with prog:
            summary = run_campaign_cards(journal, name, client,
                                         cards_in_reader(reader, count=cards, timeout=30.0),
                                         opts, on_unit=prog.update, interrupt=interrupt)
        audit.append("campaign stop", {"campaign": name, "station": opts.station,
                                       **{k: v for k, v in summary.to_json().items()
                                          if k != "failures"}})
    finally:
        audit.close()
        ks.close()
    return summary, status(journal, name), (130 if summary.interrupted else 0)


def campaign_run(args: argparse.Namespace) -> int:
    for flag, v in (("--workers", args.workers), ("--batch", args.batch),
                    ("--retries", args.retries)):
        if v < 1:
            raise ValueError(f"{flag} {v}: at least 1")
    home = _home(args)
    show = not args.json and not args.quiet
    # Ctrl-C: the loads in flight finish and are journaled, the status is printed, then
    # "interrupted" (130); running again resumes
    with sigint_deferred() as intr:
        journal = _journal(args, home)
        try:
            if args.reader:
                summary, st, rc = run_reader(home, journal, args.name, _opts(args),
                                             args.reader, args.cards, show=show,
                                             interrupt=intr)
            else:
                summary, st, rc = run_emulated(home, journal, args.name, _opts(args),
                                               show=show, interrupt=intr)
        finally:
            journal.close()
        if args.json:
            emit_json({"run": summary.to_json(), "status": st.to_json()})
        else:
            _print_status(st)
        if rc or intr.stop.is_set():
            raise KeyboardInterrupt
    return 0 if st.states["failed"] == 0 else 1


def _print_status(st: CampaignStatus) -> None:
    states = st.states
    kv([("campaign", st.campaign), ("set", st.set_id.hex()), ("units", st.units),
        ("loads", st.loads)] + [(k, f"{v:,}") for k, v in states.items()])
    print(f"{states['imported']:,} of {st.loads:,} loads imported, {states['failed']:,} "
          "failed")


def campaign_status(args: argparse.Namespace) -> int:
    home = _home(args)
    journal = _journal(args, home, create=False)
    try:
        names = [args.name] if args.name else journal.campaigns()
        sts = [status(journal, n) for n in names]
    finally:
        journal.close()
    if args.json:
        emit_json([st.to_json() for st in sts] if not args.name else sts[0].to_json())
    else:
        for st in sts:
            _print_status(st)
    return 0


def campaign_report(args: argparse.Namespace) -> int:
    home = _home(args)
    journal = _journal(args, home, create=False)
    try:
        rep = build_report(journal, args.name)
    finally:
        journal.close()
    paths = write_report(rep, Path(args.out))
    if args.json:
        emit_json({"files": [str(p) for p in paths]})
    else:
        for p in paths:
            print(f"wrote {p}")
    return 0


def _service_state(args: argparse.Namespace, home: Home) -> ServiceState | None:
    """The service's state, when the ledger commands include it: ``--state`` given, or
    no ``--campaign`` and the home has a ``service.db`` (never created here)."""
    if args.campaign and args.state is None:
        return None
    if args.state is not None:
        home.ensure()
    return open_service_state(args.state, home.root, home.audit_path)


def _ledgers(stack: contextlib.ExitStack, args: argparse.Namespace,
             home: Home) -> tuple[ServiceState | None, Journal | None]:
    """The service's state (if included) and the journal, closed with ``stack``. None for
    the journal when the home has none and no ``--journal`` is given (no campaign was
    created here; none is created by reading)."""
    _existing_home(home)  # a typo must not leave a new home behind
    store = _service_state(args, home)
    if store is not None:
        stack.callback(store.close)
    if args.journal is None and not home.journal_path.exists():
        return store, None
    journal = _journal(args, home, create=False)
    stack.callback(journal.close)
    return store, journal


def _campaign_names(args: argparse.Namespace, home: Home,
                    journal: Journal | None) -> list[str]:
    if journal is None:
        if args.campaign:
            raise StoreError(f"no campaign {args.campaign!r}: no campaign journal at "
                             f"{home.journal_path}")
        return []
    return [args.campaign] if args.campaign else journal.campaigns()


def ledger_verify(args: argparse.Namespace) -> int:
    home = _home(args)
    with contextlib.ExitStack() as stack:
        store, journal = _ledgers(stack, args, home)
        ks = home.open_keystore()
        stack.callback(ks.close)
        authority = home.verifier(ks)
        ok = bad = lost = 0
        invalid: list[dict[str, object]] = []
        for n in _campaign_names(args, home, journal):
            assert journal is not None
            chk = verify_ledger(journal, n, authority)
            ok, bad, lost = ok + chk.verified, bad + chk.invalid, lost + chk.reconciled
            invalid += [{"source": "campaign", "campaign": n, **r} for r in invalid_rows(chk)]
        svc = ServiceLedgerCheck() if store is None else verify_service_ledger(
            store, authority, now=time.time(), state=describe_state(args.state, home.root))
    svc_rows = [{"source": "service", "campaign": None, **r} for r in svc.invalid_rows]
    if args.json:
        emit_json({"verified": ok + svc.verified, "invalid": bad + svc.invalid,
                   "reconciled_without_receipt": lost, "invalid_rows": invalid + svc_rows,
                   "campaigns": {"verified": ok, "invalid": bad,
                                 "reconciled_without_receipt": lost, "invalid_rows": invalid},
                   "service": svc.to_json()})
    else:
        for r in invalid:
            print(f"INVALID receipt: campaign {r['campaign']} unit {r['sn']} slot {r['ref2']}")
        for r in svc.invalid_rows:
            print(f"INVALID receipt: service client {r['client']} unit {r['sn']} slot "
                  f"{r['ref2']}: {r['reason']}")
        if lost:
            print(f"{lost} loads reconciled with the unit after a crash: receipt lost, "
                  "slot status recorded")
        _print_without_receipt(svc.without_receipt)
        print(f"campaign ledger: {ok} receipts verified, {bad} invalid")
        if svc.state is None:
            why = "--campaign given" if args.campaign else \
                f"no {home.root / SERVICE_DB}"
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
        print(f"{ok + svc.verified} receipts verified, {bad + svc.invalid} invalid")
    return 0 if bad + svc.invalid == 0 else 1


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
    home = _home(args)
    n_camp, n_svc = [0], [0]
    with contextlib.ExitStack() as stack:
        store, journal = _ledgers(stack, args, home)
        names = _campaign_names(args, home, journal)
        entries = itertools.chain(
            _counted((e for c in names if journal is not None for e in ledger(journal, c)),
                     n_camp),
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
    home = _home(args)
    if is_postgres_url(args.state):  # the services' chain, in their shared PostgreSQL state
        from ..service.store import PostgresServiceStore

        pg = PostgresServiceStore(args.state)
        try:
            n, problems = pg.verify_audit()
        finally:
            pg.close()
    else:
        if not home.audit_path.exists():
            raise StoreError(f"no audit log at {home.audit_path}")
        audit = home.audit()
        try:
            n, problems = audit.verify()
        finally:
            audit.close()
    if args.json:
        emit_json({"records": n, "problems": [{"seq": p.seq, "problem": p.problem}
                                              for p in problems]})
    else:
        for p in problems:
            print(f"record {p.seq}: {p.problem}")
        print(f"{n} audit records checked, {len(problems)} problems")
    return 0 if not problems else 1


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                common: argparse.ArgumentParser) -> None:
    def add(parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
            fn: object, help_: str) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, parents=[common], help=help_, description=help_)
        sp.set_defaults(func=fn)
        sp.add_argument("--journal", help="journal: a SQLite file (default HOME/journal.db) "
                                          "or a postgresql:// URL shared by stations")
        return sp

    c = sub.add_parser("campaign", help="customize a whole set, crash-safe and resumable")
    csub = c.add_subparsers(dest="sub", required=True, metavar="ACTION")
    p = add(csub, "create", campaign_create, "plan a campaign")
    p.add_argument("name")
    p.add_argument("--set", required=True, dest="set_id", help="set id (hex)")
    p.add_argument("--load", action="append", required=True, metavar="REF1:REF2",
                   help="a load per unit (repeatable); the key's current version is planned")
    p.add_argument("--manifest", help="units: a CSV (sn column) or JSON list of hex SNs; "
                                      "default: every emulated unit of the home")
    p = add(csub, "run", campaign_run, "run or resume a campaign")
    p.add_argument("name")
    p.add_argument("--station", help="this station's name (default: the host name)")
    p.add_argument("--workers", type=int, default=1, help="units served at once")
    p.add_argument("--batch", type=int, default=32, help="units claimed per transaction")
    p.add_argument("--lease", type=float, default=60.0, help="seconds a claim is held")
    p.add_argument("--retries", type=int, default=ATTEMPTS,
                   help="attempts per load on transport errors, memory failures and units "
                        f"that cannot be reached, before it fails (default {ATTEMPTS})")
    p.add_argument("--reader", help="customize the cards presented in this PC/SC reader "
                                    "(default: the home's emulated units, in-process)")
    p.add_argument("--cards", type=int, help="with --reader: stop after this many cards "
                                             "(default: until the reader stays empty 30 s)")
    p.add_argument("--quiet", action="store_true")
    p = add(csub, "status", campaign_status, "a campaign's progress")
    p.add_argument("name", nargs="?")
    p = add(csub, "report", campaign_report, "JSON, CSV and HTML report")
    p.add_argument("name")
    p.add_argument("--out", default="reports", help="output directory")

    g = sub.add_parser("ledger", help="which unit holds which key, with receipts")
    gsub = g.add_subparsers(dest="sub", required=True, metavar="ACTION")
    state_help = ("the service's state (keyload serve --state): a SQLite file or a "
                  "postgresql:// URL; default HOME/service.db when it exists. Without it, "
                  "--campaign leaves the service's ledger out")
    p = add(gsub, "verify", ledger_verify,
            "the authority verifies every receipt (campaigns' and the service's)")
    p.add_argument("--campaign", help="only this campaign")
    p.add_argument("--state", help=state_help)
    p = add(gsub, "export", ledger_export,
            "the ledger as CSV or JSON (campaigns' and the service's)")
    p.add_argument("--campaign", help="only this campaign")
    p.add_argument("--state", help=state_help)
    p.add_argument("--format", choices=["csv", "json"], default="csv")
    p.add_argument("--out", help="file (default: standard output)")

    a = sub.add_parser("audit", help="the hash-chained audit log")
    asub = a.add_subparsers(dest="sub", required=True, metavar="ACTION")
    p = add(asub, "verify", audit_verify, "find edited, removed or reordered records")
    p.add_argument("--state", metavar="URL",
                   help="verify the audit chain of services sharing this postgresql:// "
                        "state (keyload serve --state) instead of HOME/audit.db")


__all__ = ["add_parsers", "display_ref1"]
