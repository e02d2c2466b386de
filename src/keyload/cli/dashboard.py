"""``keyload dashboard``: a read-only web page of the home's campaigns, ledger and audit
chain (:mod:`keyload.dashboard`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..dashboard.serve import Tls, open_dashboard
from ..dashboard.state import ServiceProbe
from ..service.server import Server
from .args import home_of


def _path(v: str | None) -> Path | None:
    return Path(v) if v else None


def run(args: argparse.Namespace) -> int:
    tls = None
    if args.cert or args.key or args.policy:
        if not (args.cert and args.key and args.ca and args.policy):
            raise ValueError("HTTPS needs --cert, --key, --ca and --policy together")
        tls = Tls(Path(args.cert), Path(args.key), Path(args.ca), Path(args.policy))
    probe = None
    if args.service:
        if not args.ca:
            raise ValueError("--service needs --ca (the CA that issued its certificate)")
        probe = ServiceProbe(args.service, ca=Path(args.ca), cert=_path(args.service_cert),
                             key=_path(args.service_key))
    d = open_dashboard(home_of(args), host=args.host, port=args.port, journal=args.journal,
                       tls=tls, service=probe)
    print(f"keyload dashboard on {d.url} (read-only; Ctrl-C stops it)", flush=True)
    try:
        Server(d.config).run(sockets=[d.sock])
    finally:
        d.sock.close()
        if probe is not None:
            probe.close()
    return 0
