"""Running the service on uvicorn with mutual TLS, and where the client's identity comes from.

uvicorn (0.54) does not implement the ASGI TLS extension: its scope has no
``extensions["tls"]``. Two small pieces close the gap, without patching uvicorn:

1. the TLS context is ours (:func:`server_context`, handed to uvicorn through
   ``Config(ssl_context_factory=…)``): TLS 1.2 minimum, no renegotiation, the CA's
   certificates as the only trust anchors, and ``CERT_OPTIONAL``: a certificate that is
   presented must verify (or the handshake fails with an alert), and a client without
   one reaches the app, which answers 401 problem+json (and audits the attempt) on
   everything but ``/v1/health`` and ``/openapi.json``;
2. a protocol subclass (:class:`MtlsH11Protocol`, :class:`MtlsHttpToolsProtocol`) whose
   ``connection_made`` — called by asyncio's SSL transport only after the handshake, so
   the peer certificate is the verified one — reads the leaf with
   ``ssl_object.getpeercert(binary_form=True)`` and wraps the connection's ``self.app``
   so that every request on *this* connection carries the standard extension
   ``scope["extensions"]["tls"] = {"client_cert_chain": [PEM], "tls_version": …}``.
   uvicorn reads ``self.app`` for each request cycle, so the identity is bound to the
   connection it was verified on; a request can neither add nor forge it (headers are
   not consulted, ``proxy_headers`` is off). Renegotiation is disabled, so the peer
   certificate cannot change under a connection.

The app (:class:`~keyload.service.app.ServiceApp`) only reads the standard extension,
so any server that implements it can host it unchanged.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import MAX_HEAD

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(ca))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def tls_extension(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The ASGI TLS extension for a connection, from its (verified) SSL object."""
    so = transport.get_extra_info("ssl_object")
    if so is None:
        return None
    der = so.getpeercert(binary_form=True)
    cipher = so.cipher()
    return {"server_cert": None,
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
            "client_cert_name": None, "client_cert_error": None,
            "tls_version": _TLS_VERSIONS.get(so.version() or ""),
            "cipher_suite": None, "cipher_name": cipher[0] if cipher else None}


def _nodelay(transport: asyncio.BaseTransport) -> None:
    """Headers and body leave as two TLS records: without TCP_NODELAY the second waits
    for the client's delayed ACK (~40 ms on Linux)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _wrap(app: Any, ext: dict[str, Any] | None) -> Any:
    async def with_tls(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            exts = dict(scope.get("extensions") or {})
            if ext is not None:
                exts["tls"] = ext
            else:
                exts.pop("tls", None)
            scope["extensions"] = exts
        await app(scope, receive, send)
    return with_tls


class MtlsH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with the ASGI TLS extension in every request's scope."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        _nodelay(transport)
        self.app = _wrap(self.app, tls_extension(transport))


def _httptools_protocol() -> type[asyncio.Protocol] | None:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class MtlsHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol, with the ASGI TLS extension and, as h11 has, a
        bound on a request's head while it arrives: more than ``MAX_HEAD`` bytes without
        the end of the headers is answered 400 and the connection closed (a client
        without a certificate can send headers too). A head that arrives whole in one
        read and is too long is refused by the app (431)."""

        _in_head = True  # from a message's first byte to the end of its headers
        _head_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            _nodelay(transport)
            self.app = _wrap(self.app, tls_extension(transport))

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes = True, 0

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD:
                    self.send_400_response("Request head too large.")

    return MtlsHttpToolsProtocol


def protocol_class(http: str) -> type[asyncio.Protocol]:
    """``h11`` (pure Python), ``httptools`` (faster), or ``auto``: httptools when it is
    installed. Both bound a request's head while it arrives (``MAX_HEAD``)."""
    if http in ("httptools", "auto"):
        cls = _httptools_protocol()
        if cls is not None:
            return cls
        if http == "httptools":
            raise ValueError("--http httptools needs the httptools package")
        return MtlsH11Protocol
    if http != "h11":
        raise ValueError("--http: auto, h11 or httptools")
    return MtlsH11Protocol


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def event_loop(loop: str) -> str:
    """``auto`` (uvloop when installed, else asyncio), ``asyncio`` or ``uvloop``."""
    if loop not in ("auto", "asyncio", "uvloop"):
        raise ValueError("--loop: auto, asyncio or uvloop")
    if loop == "uvloop" and not _has_uvloop():
        raise ValueError("--loop uvloop needs the uvloop package")
    return loop


def runs_on(http: str, loop: str) -> tuple[str, str]:
    """The HTTP parser and event loop that ``http`` and ``loop`` (``auto`` resolved) give."""
    parser = "h11" if protocol_class(http) is MtlsH11Protocol else "httptools"
    if event_loop(loop) == "auto":
        loop = "uvloop" if _has_uvloop() else "asyncio"
    return parser, loop


def make_config(app: Any, ctx: ssl.SSLContext, *, host: str = "127.0.0.1", port: int = 8443,
                http: str = "h11", loop: str = "auto",
                log_level: str = "warning") -> uvicorn.Config:
    def factory(config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return ctx

    return uvicorn.Config(
        app, host=host, port=port, http=protocol_class(http), loop=event_loop(loop),
        ssl_context_factory=factory,
        lifespan="on", proxy_headers=False, server_header=False, access_log=False,
        log_level=log_level, timeout_keep_alive=15, limit_concurrency=1024,
        h11_max_incomplete_event_size=MAX_HEAD, ws="none")


def bind(host: str, port: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


class ServerThread:
    """The real server in a background thread on a bound socket (tests, benchmarks)."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket) -> None:
        self.server = uvicorn.Server(config)
        self.sock = sock
        self.port = int(sock.getsockname()[1])
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True, name="keyload-service")

    def start(self, timeout: float = 10.0) -> ServerThread:
        self.thread.start()
        ev = threading.Event()
        for _ in range(int(timeout / 0.01)):
            if self.server.started:
                return self
            if not self.thread.is_alive():
                break
            ev.wait(0.01)
        raise RuntimeError("the service did not start")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
