"""Serving the dashboard on uvicorn (the service's server): plain HTTP on a loopback
address; anywhere else HTTPS with the service's TLS context (its CA, TLS 1.2+, AEAD
suites) and the service's policy deciding who may look (:mod:`.app`)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from ..service.pki import check_tls_files
from ..service.runtime import read_policy
from ..service.server import Server, bind, make_config, server_context
from ..station.home import Home
from .app import DashboardApp
from .state import Gatherer, ServiceProbe


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Dashboard:
    """A bound socket, the server's configuration and the URL to open."""

    config: uvicorn.Config
    sock: socket.socket
    url: str
    app: DashboardApp
    probe: ServiceProbe | None = None

    def serve(self) -> None:
        """Serve until stopped; then the socket and the service probe are closed."""
        try:
            Server(self.config).run(sockets=[self.sock])
        finally:
            self.sock.close()
            if self.probe is not None:
                self.probe.close()


@dataclass(frozen=True)
class Tls:
    """The HTTPS settings off loopback: the server's certificate and key, the CA that
    issues client certificates (and the service's), the policy naming who may look."""

    cert: Path
    key: Path
    ca: Path
    policy: Path


def open_dashboard(home: Home, *, host: str = "127.0.0.1", port: int = 0,
                   journal: str | None = None, tls: Tls | None = None,
                   service: ServiceProbe | None = None) -> Dashboard:
    """Check the settings, bind the socket (``port`` 0: a free one) and make the app.
    Off loopback ``tls`` is required (ValueError otherwise)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: a TCP port, 0..65535 (0: any free one)")
    home.existing()
    app_policy = None
    ctx = None
    if not is_loopback(host):
        if tls is None:
            raise ValueError(f"--host {host} is not a loopback address: the dashboard is "
                             "served there in HTTPS only (--cert, --key, --ca, --policy)")
        check_tls_files(ca=tls.ca, cert=tls.cert, key=tls.key)
        app_policy = read_policy(tls.policy)
        ctx = server_context(tls.cert, tls.key, tls.ca)
    app = DashboardApp(Gatherer(home, journal=journal, service=service), policy=app_policy)
    sock = bind(host, port)
    port = sock.getsockname()[1]
    where = f"[{host}]" if ":" in host else host
    if ctx is not None:
        config = make_config(app, ctx, host=host, port=port, http="h11")
        url = f"https://{where}:{port}/"
    else:
        config = uvicorn.Config(app, host=host, port=port, http="h11", lifespan="on",
                                proxy_headers=False, server_header=False, access_log=False,
                                log_level="error", ws="none")
        url = f"http://{where}:{port}/"
    return Dashboard(config, sock, url, app)


def _path(v: str | None) -> Path | None:
    return Path(v) if v else None


#: ``keyload dashboard``'s options, (flags, argparse keywords), read by :func:`from_options`.
OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--host",), {"default": "127.0.0.1", "help": "address to listen on (127.0.0.1: plain "
                   "HTTP; any other: HTTPS with mutual TLS)"}),
    (("--port",), {"type": int, "default": 8080, "help": "TCP port (0: a free one)"}),
    (("--cert",), {"help": "off loopback: the dashboard's certificate (PEM)"}),
    (("--key",), {"help": "off loopback: its private key (PEM)"}),
    (("--ca",), {"help": "the CA of client certificates (and of --service's certificate)"}),
    (("--policy",), {"help": "off loopback: the service's policy; its clients may look"}),
    (("--service",), {"metavar": "URL", "help": "a running service: its /v1/health, and its "
                      "/v1/metrics with --service-cert and --service-key"}),
    (("--service-cert",), {"help": "a client certificate the service lets read metrics"}),
    (("--service-key",), {"help": "that certificate's private key"}))


def from_options(home: Home, *, host: str, port: int, journal: str | None,
                 cert: str | None, key: str | None, ca: str | None, policy: str | None,
                 service: str | None, service_cert: str | None = None,
                 service_key: str | None = None) -> Dashboard:
    """:func:`open_dashboard` from ``keyload dashboard``'s options: HTTPS from ``cert``,
    ``key``, ``ca`` and ``policy`` together; a running service probed at ``service``
    through ``ca``. ValueError names an option given without its companions."""
    tls = None
    if cert or key or policy:
        if not (cert and key and ca and policy):
            raise ValueError("HTTPS needs --cert, --key, --ca and --policy together")
        tls = Tls(Path(cert), Path(key), Path(ca), Path(policy))
    probe = None
    if service:
        if not ca:
            raise ValueError("--service needs --ca (the CA that issued its certificate)")
        probe = ServiceProbe(service, ca=Path(ca), cert=_path(service_cert),
                             key=_path(service_key))
    d = open_dashboard(home, host=host, port=port, journal=journal, tls=tls, service=probe)
    d.probe = probe
    return d
