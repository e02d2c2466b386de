"""``keyload dashboard``: a read-only web page of the home's campaigns, ledger and audit
chain (:mod:`keyload.dashboard`)."""

from __future__ import annotations

import argparse

from ..dashboard.serve import from_options
from .args import home_of


def run(args: argparse.Namespace) -> int:
    d = from_options(home_of(args), host=args.host, port=args.port, journal=args.journal,
                     cert=args.cert, key=args.key, ca=args.ca, policy=args.policy,
                     service=args.service, service_cert=args.service_cert,
                     service_key=args.service_key)
    print(f"keyload dashboard on {d.url} (read-only; Ctrl-C stops it)", flush=True)
    d.serve()
    return 0
