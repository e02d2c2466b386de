"""``keyload campaign …``, ``keyload ledger …``, ``keyload audit verify``, and the trust
an auditor takes from the authority (``keyload set ca``)."""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ..core.notation import counted, parse_load, parse_trust
from ..service import ledger
from ..station import verify
from ..station.campaign import ATTEMPTS, RunOptions, sigint_deferred
from ..station.home import Home
from ..station.plan import open_home_journal, plan_campaign
from ..station.report import CampaignStatus, build_report, status, write_report
from ..station.rotation import create_rotation
from ..station.run import run_home
from .args import CAMPAIGN, JOURNAL, NAME, QUIET, SET_ID, STATE, Sub, cmd, group, home_of, opt
from .output import aligned, shown, table
from .progress import bars


def campaign_create(args: argparse.Namespace) -> int:
    if (args.rotate is None) == (args.load is None) or (args.rotate and (args.ik_base or
                                                                          args.ik_type)):
        args.usage_error("give --load REF1:REF2 (repeatable; a BDK's with "
                         "--initial-key-id-base) or --rotate REF1")
    if args.rotate is not None:
        camp, rot = create_rotation(home_of(args), args.journal, args.name,
                                    bytes.fromhex(args.set_id), args.rotate,
                                    args.manifest and Path(args.manifest))
        return shown(args, {"campaign": camp.id, "units": camp.units, "loads": camp.units,
                            **rot.source}, rot.line(camp))
    camp = plan_campaign(home_of(args), args.journal, args.name, bytes.fromhex(args.set_id),
                         [parse_load(x) for x in args.load], initial_key_id_base=args.ik_base,
                         manifest=Path(args.manifest) if args.manifest else None,
                         ik_type=args.ik_type)
    return shown(args, {"campaign": camp.id, "units": camp.units,
                        "loads": camp.units * len(camp.plan)},
                 f"campaign {camp.id}: {counted(camp.units, 'unit')} x "
                 f"{counted(len(camp.plan), 'load')} planned")


def campaign_run(args: argparse.Namespace) -> int:
    for flag, v in (("--threads", args.threads), ("--batch", args.batch),
                    ("--retries", args.retries)):
        if v < 1:
            raise ValueError(f"{flag} {v}: at least 1")
    home = home_of(args)
    show = not args.json and not args.quiet
    opts = RunOptions(station=str(args.station or socket.gethostname()),
                      batch_units=args.batch, lease_s=args.lease, retries=args.retries,
                      workers=args.threads)
    # Ctrl-C: the loads in flight finish and are journaled, the status is printed, then
    # "interrupted" (130); running again resumes
    with sigint_deferred() as intr:
        with contextlib.closing(open_home_journal(home, args.journal)) as journal:
            run = run_home(home, journal, args.name, opts, reader=args.reader,
                           cards=args.cards, progress=bars(show), interrupt=intr)
            st = status(journal, args.name)
        _shown(args, {"run": run.to_json(), "status": st.to_json()}, st)
        if run.interrupted or intr.stop.is_set():
            raise KeyboardInterrupt
    return 0 if st.states["failed"] == 0 else 1


def _shown(args: argparse.Namespace, obj: object, *sts: CampaignStatus) -> int:
    return shown(args, obj, *(line for st in sts for line in (*aligned(st.rows()), st.line())))


def campaign_status(args: argparse.Namespace) -> int:
    with contextlib.closing(open_home_journal(home_of(args), args.journal,
                                              create=False)) as journal:
        sts = [status(journal, n) for n in ([args.name] if args.name else journal.campaigns())]
    return _shown(args, sts[0].to_json() if args.name else
                  {"campaigns": [st.to_json() for st in sts]}, *sts)


def campaign_report(args: argparse.Namespace) -> int:
    with contextlib.closing(open_home_journal(home_of(args), args.journal,
                                              create=False)) as journal:
        rep = build_report(journal, args.name)
    paths = write_report(rep, Path(args.out))
    return shown(args, {"files": [str(p) for p in paths]}, *(f"wrote {p}" for p in paths))


def _state(args: argparse.Namespace, home: Home) -> Callable[[], ledger.ServiceState | None]:
    """How the ledger commands open the service's state, when they include it."""
    return lambda: ledger.ledger_state(args.state, home.root, home.audit_path,
                                       campaign_only=bool(args.campaign), ensure=home.ensure)


def ledger_verify(args: argparse.Namespace) -> int:
    home = home_of(args)
    if args.ca and not args.auditor:
        raise ValueError("--ca goes with --auditor (the authority knows its sets' Q_CA)")
    if args.auditor and args.state:
        raise ValueError("--auditor reads the campaigns' ledgers, not the service's state "
                         "(--state)")
    trust = parse_trust(args.ca) if args.auditor else None  # no service state then
    state = (lambda: None) if args.auditor else _state(args, home)
    with verify.ledgers(home, args.journal, state) as (store, journal):
        chk = verify.check_ledgers(home, journal, args.campaign, trust=trust, service=lambda c: (
            ledger.ServiceLedgerCheck() if store is None else ledger.verify_service_ledger(
                store, c, now=time.time(), state=ledger.describe_state(args.state, home.root))))
    camp, svc, wr = chk.campaigns, chk.service, chk.service.without_receipt
    shown(args, chk.to_json(), *camp.invalid_lines(), *svc.invalid_lines(), *camp.notes(),
          *wr.heading(), *(table(wr.HEADERS, wr.rows()) if wr.total else ()),
          f"campaign ledger: {counted(camp.verified, 'receipt')} verified, {camp.invalid:,} "
          "invalid",
          *svc.lines("--auditor checks the campaigns' ledgers" if args.auditor else
                     "--campaign given" if args.campaign else
                     f"no {home.root / ledger.SERVICE_DB}"),
          f"{counted(chk.verified, 'receipt')} verified, {chk.invalid:,} invalid")
    return 0 if chk.invalid == 0 else 1


def set_ca(args: argparse.Namespace) -> int:
    """An identity set's Q_CA and C_A: what to give an auditor."""
    t = verify.identity_trust(home_of(args), bytes.fromhex(args.set_id))
    return shown(args, t.to_json(), *aligned(t.rows()), t.hint())


def ledger_export(args: argparse.Namespace) -> int:
    """The ledger in ``--format`` to ``--out`` or stdout; with ``--json`` and no ``--out``,
    one JSON object holding the entries."""
    home = home_of(args)
    with verify.ledgers(home, args.journal, _state(args, home)) as (store, journal):
        camp = verify.campaigns_ledger(journal, verify.ledger_campaigns(home, journal,
                                                                        args.campaign))
        svc = ledger.service_ledger(store) if store is not None else ()
        if args.json and not args.out:
            return shown(args, verify.ledgers_json(camp, svc))
        with open(args.out, "w", newline="") if args.out else \
                contextlib.nullcontext(sys.stdout) as out:
            n_camp, n_svc = verify.write_ledgers(out, args.format or "csv", camp, svc)
    if args.out:
        shown(args, {"out": args.out, "entries": n_camp + n_svc, "from_campaigns": n_camp,
                     "from_service": n_svc},
              f"{counted(n_camp + n_svc, 'ledger entry', 'ledger entries')} written to "
              f"{args.out} ({n_camp:,} from campaigns, {n_svc:,} from the service)")
    return 0


def audit_verify(args: argparse.Namespace) -> int:
    home = home_of(args)
    n, problems = ledger.verify_audit(args.state, home.audit_path, home.audit)
    shown(args, {"records": n, "problems": [{"seq": p.seq, "problem": p.problem}
                                            for p in problems]},
          *(f"record {p.seq}: {p.problem}" for p in problems),
          f"{counted(n, 'audit record')} checked, {counted(len(problems), 'problem')}")
    return 0 if not problems else 1


def add_parsers(sub: Sub) -> None:
    c = group(sub, "campaign", "customize a whole set, crash-safe and resumable")
    cmd(c, "create", campaign_create, "plan a campaign", JOURNAL, NAME, SET_ID,
        opt("--load", action="append", metavar="REF1:REF2",
            help="a load per unit (repeatable); the key's current version is planned"),
        opt("--rotate", metavar="REF1", help="instead of --load: the key's current version, "
            "into the units whose slot holds an older one (station records, ledgers)"),
        opt("--manifest", help="units: a CSV (sn column) or JSON list of hex SNs; default: "
            "every emulated unit of the home"),
        opt("--initial-key-id-base", dest="ik_base", metavar="HEX", help="a BDK's load: the "
            "first unit's initial key ID (8 bytes), counted up per unit"),
        opt("--ik-type", help="a BDK's load: the initial keys' type (default the BDK's)"),
        usage_error=True)
    cmd(c, "run", campaign_run, "run or resume a campaign", JOURNAL, NAME,
        opt("--station", help="this station's name (default: the host name)"),
        opt("--threads", type=int, default=1, old=["--workers"],
            help="units served at once, each by a thread"),
        opt("--batch", type=int, default=32, help="units claimed per transaction"),
        opt("--lease", type=float, default=60.0, help="seconds a claim is held"),
        opt("--retries", type=int, default=ATTEMPTS, help="attempts per load on transport "
            "errors, memory failures and units that cannot be reached, before it fails "
            f"(default {ATTEMPTS})"),
        opt("--reader", help="customize the cards presented in this PC/SC reader (default: "
            "the home's emulated units, in-process)"),
        opt("--cards", type=int, help="with --reader: stop after this many cards (default: "
            "until the reader stays empty 30 s)"), QUIET)
    cmd(c, "status", campaign_status, "a campaign's progress", JOURNAL,
        opt("name", nargs="?", help="the campaign (default: every campaign)"))
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
        JOURNAL, CAMPAIGN, STATE, opt("--format", choices=["csv", "json"], help="the export's "
                                          "form: CSV, or a JSON list (default csv; with "
                                          "--json and no --out, one JSON object)"),
        opt("--out", help="file (default: standard output)"))

    a = group(sub, "audit", "the hash-chained audit log")
    cmd(a, "verify", audit_verify, "find edited, removed or reordered records", JOURNAL,
        opt("--state", metavar="URL", help="verify the audit chain of services sharing this "
            "postgresql:// state (keyload serve --state) instead of HOME/audit.db"))

