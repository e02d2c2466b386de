"""``keyload pki …``, ``keyload serve``, ``keyload fetch``: remote download over HTTPS."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.messages import check_ref2
from ..core.notation import parse_sn
from ..core.ref1 import parse_ref1
from ..service.guard import LIMIT_FLAGS
from .args import Sub, cmd, group, home_of, opt, required
from .output import aligned, listed, shown

if TYPE_CHECKING:
    from ..service.fetch import Fetched


# -- pki -----------------------------------------------------------------------------
def pki_init(args: argparse.Namespace) -> int:
    from ..service.pki import init_pki

    issued = init_pki(Path(args.dir), clients=tuple(args.client or ["client"]),
                      hosts=tuple(args.host or ()))
    return listed(args, [i.to_json() for i in issued],
                  ["name", "certificate", "key (0600)", "sha256"],
                  [(i.name, str(i.cert), str(i.key), i.sha256[:16] + "…") for i in issued])


def pki_client(args: argparse.Namespace) -> int:
    from ..service.pki import issue

    i = issue(Path(args.dir), args.name, server=False)
    return shown(args, i.to_json(), f"client {i.name}: {i.cert} (key {i.key}), sha256 {i.sha256}")


# -- serve ---------------------------------------------------------------------------
def serve(args: argparse.Namespace) -> int:
    """Serve until stopped (:func:`keyload.service.runtime.listen`, then ``--workers``
    processes)."""
    from ..service.guard import ConnectionLimits
    from ..service.runtime import listen

    if args.check_policy is not None:
        return check_policy(args)
    required(args, "cert", "key", "ca", "policy")
    flags = {n: getattr(args, n) for n, *_ in LIMIT_FLAGS}
    on = listen(lambda: home_of(args), cert=Path(args.cert), key=Path(args.key),
                ca=Path(args.ca), policy_file=args.policy,
                limits=lambda: ConnectionLimits.from_flags(**flags), state=args.state,
                instance=args.instance, host=args.host, port=args.port, http=args.http,
                loop=args.loop, workers=args.workers, busy_timeout=args.busy_timeout)
    print(on.banner, flush=True)
    on.serve()
    return 0


def check_policy(args: argparse.Namespace) -> int:
    """``serve --check-policy FILE``: 0 and the policy's summary when FILE is valid; else
    ValueError names what is wrong (exit 3, as ``serve --policy`` with that file)."""
    from ..service.runtime import read_policy

    path = Path(args.check_policy)
    policy = read_policy(path)
    return shown(args, {"policy": str(path), "valid": True, **policy.summary()},
                 f"policy {path}: valid", *aligned(policy.summary_rows(), indent="  "))


# -- fetch ---------------------------------------------------------------------------
EXIT_FAILED = 1  # cli.main: the job ran but something failed (here: a receipt refused)
EXIT_PENDING = 8  # done, evidence pending: the key is loaded, its receipt kept in HOME/outbox

FETCH_EPILOG = (
    "Receipts are evidence: the key is in the unit before its receipt is sent, so fetch "
    "retries a receipt the service cannot take yet (429 after its Retry-After, 503, a "
    "lost connection) for --receipt-deadline seconds, then keeps it in HOME/outbox/ and "
    "exits 8 (done, evidence pending). Every fetch to a server first sends that server's "
    "pending receipts, oldest first; --resend sends only those. A pending receipt the "
    "service refuses for good (409, 404, 422...) moves to HOME/outbox/refused/ with the "
    "reason, and fetch exits 1. Exit codes: 0 done, 8 done but a receipt is pending, "
    "1 a pending receipt was refused, 9 the service is unreachable (no connection, or the "
    "TLS handshake failed), others as for every keyload command.")


def fetch(args: argparse.Namespace) -> int:
    """Load one key into one unit from the service. The unit: ``--unit SN``, an emulated
    unit of the home; or ``--reader READER``, the card in that PC/SC reader (its SN comes
    from INITIALIZE DOWNLOAD; with ``--unit`` too, the card must be that unit).

    The server's pending receipts (``HOME/outbox``) are sent first; with ``--resend``,
    only they are (:func:`keyload.service.fetch.fetch_key`). Exit :data:`EXIT_PENDING`
    when a receipt stays pending, :data:`EXIT_FAILED` when the service refused a pending
    one for good."""
    from ..service.client import Outbox, ServiceClient
    from ..service.fetch import fetch_key, resent_told, unit_for

    deadline = args.receipt_deadline
    if not 0 <= deadline <= 86400:
        args.usage_error("--receipt-deadline: seconds in 0..86400")
    if args.resend:
        given = [f"--{n}" for n in ("unit", "reader", "ref1", "ref2")
                 if getattr(args, n) is not None]
        if given:
            args.usage_error(f"--resend sends the pending receipts only: not with "
                             f"{', '.join(given)}")
    else:
        if args.unit is None and not args.reader:
            args.usage_error("give --unit SN (an emulated unit of the home) or --reader "
                             "READER (the unit in a PC/SC reader)")
        required(args, "ref1", "ref2")
    sn = None if args.unit is None else parse_sn(args.unit)
    ref1 = b"" if args.resend else parse_ref1(args.ref1)
    if not args.resend:
        check_ref2(args.ref2)
    client = ServiceClient(args.server, ca=Path(args.ca), cert=Path(args.cert),
                           key=Path(args.key))
    home = home_of(args)
    got = fetch_key(client, Outbox(home.root), args.server, deadline=deadline,
                    unit=None if args.resend else
                    lambda: unit_for(home.units_dir, home.source, sn, args.reader),
                    ref1=ref1, ref2=args.ref2, on_damaged=_damaged,
                    on_sent=None if args.json else
                    lambda p, e: print(resent_told(p, e), flush=True))
    d = got.delivery
    if d is None:
        return _resend_report(args, got)
    notice = got.notice(args.server, deadline, EXIT_PENDING)
    if notice is not None:
        print(notice, file=sys.stderr, flush=True)
    if d.outcome == "refused":  # the receipt is kept as evidence all the same, then the error
        assert d.reply is not None
        raise client.refusal(d.reply)
    shown(args, got.to_json(), got.told(args.server))
    return _fetch_rc(got)


def _fetch_rc(got: Fetched) -> int:
    refused = got.refused_resent()
    if refused:
        print(f"keyload: the service refused {len(refused)} pending receipt(s) for good; "
              f"kept with its reason in {Path(refused[0]['path']).parent}/ (exit "
              f"{EXIT_FAILED})", file=sys.stderr, flush=True)
        return EXIT_FAILED
    return EXIT_PENDING if got.pending() else 0


def _damaged(path: Path) -> None:
    print(f"keyload: warning: {path} is not a readable pending receipt (left as it is)",
          file=sys.stderr, flush=True)


def _resend_report(args: argparse.Namespace, got: Fetched) -> int:
    shown(args, {"server": args.server, "resent": got.resent},
          *([] if got.resent else [f"no pending receipts for {args.server}"]))
    rc = _fetch_rc(got)
    if rc == EXIT_PENDING and not args.json:
        print(f"keyload: receipts are still pending for {args.server} (exit {EXIT_PENDING}: "
              f"evidence pending)", file=sys.stderr)
    return rc


def add_parsers(sub: Sub) -> None:
    k = group(sub, "pki", "a test CA, server and client certificates (mTLS)")
    cmd(k, "init", pki_init, "create a CA, a server certificate and client certificates",
        opt("--dir", required=True, help="where to write them (created, mode 0700)"),
        opt("--client", action="append", metavar="NAME",
            help="a client certificate with this CN (repeatable; default 'client')"),
        opt("--host", action="append", metavar="NAME", help="a DNS name or IP of the server "
            "(repeatable; default localhost, 127.0.0.1, ::1)"))
    cmd(k, "client", pki_client, "issue one more client certificate", opt("--dir", required=True),
        opt("--name", required=True, help="the client's name (certificate CN)"))

    # --cert/--key/--ca/--policy: checked by serve()
    cmd(sub, "serve", serve, "serve EXPORTKEY and receipts over HTTPS with mutual TLS",
        opt("--cert", help="the server's certificate (PEM; required to serve)"),
        opt("--key", help="the server's private key (PEM; required to serve)"),
        opt("--ca", help="the CA that issues client certificates (required to serve)"),
        opt("--policy", help="authorization policy and limits (JSON; required to serve)"),
        opt("--check-policy", metavar="FILE", help="only check this policy file and print its "
            "summary (clients, deny list, limits, sha256 of the file): exit 0 when valid, 3 "
            "when not"),
        opt("--host", default="127.0.0.1"),
        opt("--port", type=int, default=8443, help="0: any free port (printed)"),
        opt("--state", help="shared state: a SQLite file (default HOME/service.db) or a "
            "postgresql:// URL shared by several instances"),
        opt("--http", choices=["auto", "h11", "httptools"], default="auto",
            help="HTTP parser (default auto: httptools when installed, else h11)"),
        opt("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
            help="event loop (default auto: uvloop when installed)"),
        opt("--instance", help="this instance's name in audit and metrics (default: the host "
            "name)"),
        *(opt("--" + name.replace("_", "-"), type=kind, default=default, metavar=metavar,
              help=help_) for name, kind, default, metavar, help_ in LIMIT_FLAGS),
        opt("--busy-timeout", type=float, default=2.0, metavar="S", help="how long a database "
            "lock held elsewhere is waited for before requests are answered 503 (2)"),
        opt("--workers", type=int, default=1,
            help="processes accepting on the same socket (they share the state)"),
        usage_error=True)

    # --unit/--reader, --ref1, --ref2: checked by fetch()
    p = cmd(sub, "fetch", fetch, "load a key into a local unit from a remote keyload service",
            opt("--server", required=True, metavar="URL", help="https://host:port"),
            opt("--unit", metavar="SN", help="the unit's SN (hex): an emulated unit of the "
                "home; with --reader (optional there), the SN the card in the reader must "
                "have"),
            opt("--reader", help="reach the unit through this PC/SC reader instead (the SN "
                "comes from the card)"),
            opt("--ref1", help="the key to load (required unless --resend)"),
            opt("--ref2", type=int, help="the unit's slot (required unless --resend)"),
            opt("--ca", required=True, help="the CA that issued the server certificate"),
            opt("--cert", required=True, help="this client's certificate (PEM)"),
            opt("--key", required=True, help="this client's private key (PEM)"),
            opt("--resend", action="store_true", help="only send this server's pending "
                "receipts (HOME/outbox), oldest first; no unit, --ref1 or --ref2"),
            opt("--receipt-deadline", type=float, default=30.0, metavar="SECONDS",
                help="how long to keep trying to deliver receipts (default 30) before "
                     "keeping them in HOME/outbox (exit 8)"), usage_error=True)
    p.epilog = FETCH_EPILOG
