"""``keyload pki …``, ``keyload serve``, ``keyload fetch``: remote download over HTTPS."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

from ..core.errors import TransportError
from ..core.messages import InitResponse, check_ref2
from ..station.fleet import EmulatedFleet
from ..station.load import UnitClient, load_key
from ..transports import Connection
from ..transports.local import LocalConnection
from ..units.keystore import display_ref1, parse_ref1
from .context import Home
from .output import emit_json, table


def _home(args: argparse.Namespace) -> Home:
    return Home.resolve(args.home)


# -- pki -----------------------------------------------------------------------------
def pki_init(args: argparse.Namespace) -> int:
    from ..service.pki import init_pki

    issued = init_pki(Path(args.dir), clients=tuple(args.client or ["client"]),
                      hosts=tuple(args.host or ()))
    rows = [(i.name, str(i.cert), str(i.key), i.sha256[:16] + "…") for i in issued]
    if args.json:
        emit_json([{"name": i.name, "cert": str(i.cert), "key": str(i.key),
                    "sha256": i.sha256} for i in issued])
    else:
        table(["name", "certificate", "key (0600)", "sha256"], rows)
    return 0


def pki_client(args: argparse.Namespace) -> int:
    from ..service.pki import issue

    i = issue(Path(args.dir), args.name, server=False)
    if args.json:
        emit_json({"name": i.name, "cert": str(i.cert), "key": str(i.key), "sha256": i.sha256})
    else:
        print(f"client {i.name}: {i.cert} (key {i.key}), sha256 {i.sha256}")
    return 0


# -- serve ---------------------------------------------------------------------------
def serve(args: argparse.Namespace) -> int:
    """Serve until stopped. ``--workers N`` forks N-1 more processes that accept on the
    same listening socket; each opens its own keystore and store after the fork, so they
    share only what is meant to be shared: the state database (replay cache, rate
    counters, ledger) and the audit chain."""
    from ..service.ledger import describe_state
    from ..service.policy import Policy
    from ..service.server import bind, runs_on, server_context
    from ..station.pgserver import is_postgres_url

    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    home = _home(args)
    policy = Policy.load(Path(args.policy))
    ctx = server_context(Path(args.cert), Path(args.key), Path(args.ca))
    home.ensure()
    home.open_keystore().close()  # the passphrase or PIN is checked before anything listens
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    parser, loop = runs_on(args.http, args.loop)
    about = (f"  HTTP {parser}, event loop {loop}, state "
             f"{describe_state(args.state, home.root)}, audit "
             f"{'in the state' if is_postgres_url(args.state) else home.audit_path}")
    print(f"keyload service listening on https://{host}:{port}"
          + (f" ({args.workers} workers)" if args.workers > 1 else "") + "\n" + about,
          flush=True)
    children: list[int] = []
    parent = os.getpid()
    try:
        for _ in range(args.workers - 1):
            pid = os.fork()
            if pid == 0:  # a worker: serve, then leave without running the parent's cleanup
                code = 1
                try:
                    _die_with(parent)
                    _serve_one(args, home, policy, ctx, sock, port)
                    code = 0
                finally:
                    os._exit(code)
            children.append(pid)
        _serve_one(args, home, policy, ctx, sock, port)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        sock.close()
    return 0


def _die_with(parent: int) -> None:
    """A worker ends when the process that started it ends, however it ends (the server
    re-raises SIGTERM after its shutdown, so the parent may not get to stop its workers)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(0)


def _serve_one(args: argparse.Namespace, home: Home, policy: Any, ctx: Any,
               sock: socket.socket, port: int) -> None:
    import uvicorn

    from ..service.runtime import open_instance
    from ..service.server import make_config

    ks = home.open_keystore()
    try:
        inst = open_instance(ks, policy, home_root=home.root,
                             authority_dir=home.authority_dir, audit_path=home.audit_path,
                             state=args.state, instance=args.instance or socket.gethostname(),
                             processes=args.workers)
        try:
            config = make_config(inst.app, ctx, host=args.host, port=port, http=args.http,
                                 loop=args.loop)
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            inst.close()
    finally:
        ks.close()


# -- fetch ---------------------------------------------------------------------------
class _ExpectedUnit(UnitClient):
    """A unit in a reader that must be the one ``--unit`` names: stops before EXPORTKEY."""

    def __init__(self, conn: Connection, sn: bytes, reader: str) -> None:
        super().__init__(conn)
        self.expected, self.reader = sn, reader

    def initialize(self) -> InitResponse:
        init = super().initialize()
        if init.sn != self.expected:
            raise ValueError(f"the card in reader {self.reader!r} is unit {init.sn.hex()}, "
                             f"not {self.expected.hex()} (--unit)")
        return init


def fetch(args: argparse.Namespace) -> int:
    """Load one key into one unit from the service. The unit: ``--unit SN``, an emulated
    unit of the home; or ``--reader READER``, the card in that PC/SC reader (its SN comes
    from INITIALIZE DOWNLOAD; with ``--unit`` too, the card must be that unit)."""
    from ..service.client import HttpsAuthority, ServiceClient, ServiceRefused

    if not args.unit and not args.reader:
        args.usage_error("give --unit SN (an emulated unit of the home) or --reader READER "
                         "(the unit in a PC/SC reader)")
    sn = bytes.fromhex(args.unit.removeprefix("0x")) if args.unit else None
    ref1 = parse_ref1(args.ref1)
    check_ref2(args.ref2)
    client = ServiceClient(args.server, ca=Path(args.ca), cert=Path(args.cert),
                           key=Path(args.key))
    home = _home(args)
    fleet = None
    closer: list[object] = []
    try:
        conn: Connection
        if args.reader:
            from ..transports.pcsc import PcscConnection

            pc = PcscConnection(args.reader)
            closer.append(pc)
            conn = pc
        else:
            assert sn is not None
            fleet = EmulatedFleet.open(home.units_dir, home.source)
            unit = fleet.open_unit(sn)
            closer.append(unit)
            conn = LocalConnection(unit)
        unit_client = _ExpectedUnit(conn, sn, args.reader) if args.reader and sn is not None \
            else UnitClient(conn)
        res = load_key(unit_client, HttpsAuthority(client), ref1, args.ref2)
        recorded = None
        for attempt in range(3):  # the key is in the unit: the receipt must get through
            try:
                recorded = client.post_receipt(res)
                break
            except (TransportError, ServiceRefused) as e:
                unavailable = isinstance(e, TransportError) or e.status == 503
                if attempt == 2 or not unavailable:
                    raise
                time.sleep(0.5 * (attempt + 1))  # the service could not record it yet
    finally:
        for c in closer:
            c.close()  # type: ignore[attr-defined]
        if fleet is not None:
            fleet.close()
        client.close()
    out = {"sn": res.sn.hex(), "set_id": res.set_id.hex(), "ref1": display_ref1(ref1),
           "ref2": res.ref2, "suite": res.suite, "key_version": res.key_version,
           "kcv": res.kcv.hex().upper(), "receipt": res.rct.hex(),
           "ledger": bool(recorded and recorded.get("status") == "recorded")}
    if args.json:
        emit_json(out)
    else:
        print(f"loaded {out['ref1']} v{out['key_version']} into unit {out['sn']} slot "
              f"{out['ref2']} from {args.server}: KCV {out['kcv']} (authority and unit "
              f"agree), receipt {out['receipt']} recorded by the service")
    return 0


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                common: argparse.ArgumentParser) -> None:
    def add(parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
            fn: object, help_: str) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, parents=[common], help=help_, description=help_)
        sp.set_defaults(func=fn)
        return sp

    k = sub.add_parser("pki", help="a test CA, server and client certificates (mTLS)")
    ksub = k.add_subparsers(dest="sub", required=True, metavar="ACTION")
    p = add(ksub, "init", pki_init, "create a CA, a server certificate and client certificates")
    p.add_argument("--dir", required=True, help="where to write them (created, mode 0700)")
    p.add_argument("--client", action="append", metavar="NAME",
                   help="a client certificate with this CN (repeatable; default 'client')")
    p.add_argument("--host", action="append", metavar="NAME",
                   help="a DNS name or IP of the server (repeatable; default localhost, "
                        "127.0.0.1, ::1)")
    p = add(ksub, "client", pki_client, "issue one more client certificate")
    p.add_argument("--dir", required=True)
    p.add_argument("--name", required=True, help="the client's name (certificate CN)")

    p = add(sub, "serve", serve, "serve EXPORTKEY and receipts over HTTPS with mutual TLS")
    p.add_argument("--cert", required=True, help="the server's certificate (PEM)")
    p.add_argument("--key", required=True, help="the server's private key (PEM)")
    p.add_argument("--ca", required=True, help="the CA that issues client certificates")
    p.add_argument("--policy", required=True, help="authorization policy and limits (JSON)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8443, help="0: any free port (printed)")
    p.add_argument("--state", help="shared state: a SQLite file (default HOME/service.db) "
                                   "or a postgresql:// URL shared by several instances")
    p.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto",
                   help="HTTP parser (default auto: httptools when installed, else h11)")
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                   help="event loop (default auto: uvloop when installed)")
    p.add_argument("--instance", help="this instance's name in audit and metrics "
                                      "(default: the host name)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes accepting on the same socket (they share the state)")

    p = add(sub, "fetch", fetch,
            "load a key into a local unit from a remote keyload service")
    p.set_defaults(usage_error=p.error)  # --unit or --reader: checked by fetch()
    p.add_argument("--server", required=True, metavar="URL", help="https://host:port")
    p.add_argument("--unit", metavar="SN",
                   help="the unit's SN (hex): an emulated unit of the home; with --reader "
                        "(optional there), the SN the card in the reader must have")
    p.add_argument("--reader", help="reach the unit through this PC/SC reader instead (the "
                                    "SN comes from the card)")
    p.add_argument("--ref1", required=True)
    p.add_argument("--ref2", required=True, type=int)
    p.add_argument("--ca", required=True, help="the CA that issued the server certificate")
    p.add_argument("--cert", required=True, help="this client's certificate (PEM)")
    p.add_argument("--key", required=True, help="this client's private key (PEM)")
