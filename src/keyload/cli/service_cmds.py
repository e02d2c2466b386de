"""``keyload pki …``, ``keyload serve``, ``keyload fetch``: remote download over HTTPS."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.messages import check_ref2
from ..core.notation import parse_sn
from ..core.ref1 import parse_ref1
from ..service.fetch import RECEIPT_RULES
from ..service.guard import LIMIT_FLAGS
from ..service.runtime import OPTIONS
from .args import Sub, cmd, given, group, home_of, opt, required
from .output import aligned, listed, shown


# -- pki -----------------------------------------------------------------------------
def pki_init(args: argparse.Namespace) -> int:
    from ..service.pki import init_pki

    issued = init_pki(Path(args.dir), clients=tuple(args.client or ["client"]),
                      hosts=tuple(args.host or ()))
    return listed(args, {"dir": args.dir, "issued": [i.to_json() for i in issued]},
                  ["name", "certificate", "key (0600)", "sha256"],
                  [(i.name, str(i.cert), str(i.key), i.sha256[:16] + "…") for i in issued])


def pki_client(args: argparse.Namespace) -> int:
    from ..service.pki import issue

    i = issue(Path(args.dir), args.client, server=False)
    return shown(args, i.to_json(), f"client {i.name}: {i.cert} (key {i.key}), sha256 {i.sha256}")


# -- serve ---------------------------------------------------------------------------
def serve(args: argparse.Namespace) -> int:
    """Serve until stopped (:func:`keyload.service.runtime.listen`, then ``--processes``)."""
    from ..service.guard import ConnectionLimits
    from ..service.runtime import listen

    if args.check_policy is not None:
        return check_policy(args)
    required(args, "cert", "key", "ca", "policy")
    flags = {n: getattr(args, n) for n, *_ in LIMIT_FLAGS}
    on = listen(lambda: home_of(args), limits=lambda: ConnectionLimits.from_flags(**flags),
                **given(args, OPTIONS))
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
def fetch(args: argparse.Namespace) -> int:
    """Load one key into one unit from the service (:func:`keyload.service.fetch.fetch_key`):
    the emulated unit ``--sn``, or the card in ``--reader`` (which must then be ``--sn``
    when it is given); with ``--resend``, only the server's pending receipts are sent."""
    from ..service.client import Outbox, ServiceClient
    from ..service.fetch import EXIT_PENDING, damaged_told, fetch_key, resent_told, unit_for

    deadline = args.receipt_deadline
    if not 0 <= deadline <= 86400:
        args.usage_error("--receipt-deadline: seconds in 0..86400")
    if args.resend:
        given = [f"--{n}" for n in ("sn", "reader", "ref1", "ref2")
                 if getattr(args, n) is not None]
        if given:
            args.usage_error(f"--resend sends the pending receipts only: not with "
                             f"{', '.join(given)}")
    else:
        if args.sn is None and not args.reader:
            args.usage_error("give --sn SN (an emulated unit of the home) or --reader "
                             "READER (the unit in a PC/SC reader)")
        required(args, "ref1", "ref2")
    sn = None if args.sn is None else parse_sn(args.sn)
    ref1 = b"" if args.resend else parse_ref1(args.ref1)
    if not args.resend:
        check_ref2(args.ref2)
    client = ServiceClient(args.server, ca=Path(args.ca), cert=Path(args.cert),
                           key=Path(args.key))
    home = home_of(args)
    got = fetch_key(client, Outbox(home.root), args.server, deadline=deadline,
                    unit=None if args.resend else
                    lambda: unit_for(home.units_dir, home.source, sn, args.reader),
                    ref1=ref1, ref2=args.ref2, on_damaged=lambda p: _warn(damaged_told(p)),
                    on_sent=None if args.json else
                    lambda p, e: print(resent_told(p, e), flush=True))
    d = got.delivery
    if d is not None:
        _warn(got.notice(args.server, deadline, EXIT_PENDING))
        if d.outcome == "refused":  # the receipt is kept as evidence all the same
            assert d.reply is not None
            raise client.refusal(d.reply)
    shown(args, got.to_json(), *got.lines(args.server))
    _warn(*got.warnings(args.server, resend_note=not args.json))
    return got.exit_code()


def _warn(*lines: str | None) -> None:
    for line in lines:
        if line is not None:
            print(line, file=sys.stderr, flush=True)


def add_parsers(sub: Sub) -> None:
    k = group(sub, "pki", "a test CA, server and client certificates (mTLS)")
    cmd(k, "init", pki_init, "create a CA, a server certificate and client certificates",
        opt("--dir", required=True, help="where to write them (created, mode 0700)"),
        opt("--client", action="append", metavar="NAME",
            help="a client certificate with this CN (repeatable; default 'client')"),
        opt("--host", action="append", metavar="NAME", help="a DNS name or IP of the server "
            "(repeatable; default localhost, 127.0.0.1, ::1)"))
    cmd(k, "client", pki_client, "issue one more client certificate",
        opt("--dir", required=True, help="the directory pki init wrote"),
        opt("--client", required=True, metavar="NAME", old=["--name"],
            help="the client's name (certificate CN)"))

    # --cert/--key/--ca/--policy: checked by serve()
    cmd(sub, "serve", serve, "serve EXPORTKEY and receipts over HTTPS with mutual TLS",
        opt("--check-policy", metavar="FILE", help="only check this policy file and print its "
            "summary (clients, deny list, limits, sha256 of the file): exit 0 when valid, 3 "
            "when not"),
        *(opt("--" + name.replace("_", "-"), type=kind, default=default, metavar=metavar,
              help=help_) for name, kind, default, metavar, help_ in LIMIT_FLAGS),
        *OPTIONS,
        usage_error=True)

    # --sn/--reader, --ref1, --ref2: checked by fetch()
    p = cmd(sub, "fetch", fetch, "load a key into a local unit from a remote keyload service",
            opt("--server", required=True, metavar="URL", help="https://host:port"),
            opt("--sn", old=["--unit"], help="the unit's SN (hex): an emulated unit of the "
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
    p.epilog = RECEIPT_RULES
