"""Running the service on uvicorn with mutual TLS, and where the client's identity comes from.

uvicorn (0.54) does not implement the ASGI TLS extension: its scope has no
``extensions["tls"]``. Small pieces close the gap, without patching uvicorn:

1. the TLS context is ours (:func:`server_context`, handed to uvicorn through
   ``Config(ssl_context_factory=…)``): TLS 1.2 minimum with forward-secret AEAD suites
   only (ECDHE with AES-GCM or ChaCha20-Poly1305), no renegotiation, the CA's
   certificates as the only trust anchors, and ``CERT_OPTIONAL``. A certificate that is
   presented must verify, or the handshake fails and the connection is closed — without
   an alert: asyncio's and uvloop's TLS transports drop the alert OpenSSL queues when a
   handshake fails (with TLS 1.3 the client sees its first read fail, or end). A client
   without a certificate reaches the app, which serves it ``/v1/health`` and
   ``/openapi.json`` and answers 401 problem+json on everything else; a certificate
   without the clientAuth extended key usage is answered 401 the same way;
2. a protocol subclass (:class:`MtlsH11Protocol`, :class:`MtlsHttpToolsProtocol`) whose
   ``connection_made`` — called by asyncio's SSL transport only after the handshake, so
   the peer certificate is the verified one — reads the leaf with
   ``ssl_object.getpeercert(binary_form=True)`` and wraps the connection's ``self.app``
   so that every request on *this* connection carries the standard extension
   ``scope["extensions"]["tls"] = {"client_cert_chain": [PEM], "tls_version": …}``.
   uvicorn reads ``self.app`` for each request cycle, so the identity is bound to the
   connection it was verified on; a request can neither add nor forge it (headers are
   not consulted, ``proxy_headers`` is off). Renegotiation is disabled, so the peer
   certificate cannot change under a connection. The same subclass admits the
   connection into the app's pools (:mod:`.guard`), gives each request head a deadline
   (408), and answers what uvicorn would answer in text/plain (a malformed request) as
   problem+json, counted in the metrics and audited with the address's record;
3. :class:`Server`: uvicorn's server with a TLS handshake timeout (uvicorn leaves
   asyncio's 60 s) and its own concurrency limit off (the app's pools replace it).

The app (:class:`~keyload.service.app.ServiceApp`) only reads the standard extension,
so any server that implements it can host it unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .app import MAX_HEAD, ServiceApp
from .guard import Doorway, peer_of
from .problems import Problem

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL"


def server_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    # TLS 1.2: forward-secret AEAD suites only (TLS 1.3's are all AEAD and ECDHE)
    ctx.set_ciphers(TLS12_CIPHERS)
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


class _Corked:
    """A transport whose writes of one pass of the event loop leave as one: uvicorn
    writes a response's head and its body separately, which over TLS is two records
    and two system calls; here they are joined. Everything else is the transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._t = transport
        self._loop = loop
        self._buf: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._buf:
            self._loop.call_soon(self._flush)
        self._buf.append(bytes(data))

    def _flush(self) -> None:
        if self._buf:
            data, self._buf = b"".join(self._buf), []
            if not self._t.is_closing():
                self._t.write(data)

    def close(self) -> None:
        self._flush()
        self._t.close()

    def abort(self) -> None:
        self._buf = []
        self._t.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


_PHRASES = {400: "Bad Request", 408: "Request Timeout", 429: "Too Many Requests",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class _Guarded(asyncio.Protocol):
    """What both HTTP protocols add to uvicorn's (it comes first in their bases): the
    connection limits of the app's :class:`~.guard.Connections`, a deadline for every
    request head, and the server's own answers (a malformed head, a timeout, a refused
    connection) as problem+json, counted in the metrics and in the address's aggregated
    audit record."""

    app: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    client: tuple[str, int] | None
    service: ServiceApp | None = None  # the app, when it is ours (its limits apply)
    _peer = "unknown"
    _who: str | None = None
    _admitted = False
    _head_timer: asyncio.TimerHandle | None = None
    _door: Doorway | None = None  # admitted before TLS by this doorway, as _door_peer
    _door_peer = ""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """uvicorn's ``connection_made`` on a transport whose writes of one loop pass
        leave as one, then the guard's admission (on the real transport: socket, TLS
        object)."""
        super().connection_made(_Corked(transport, self.loop))  # type: ignore[arg-type]
        self._guard_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._guard_lost()
        super().connection_lost(exc)

    def _guard_made(self, transport: asyncio.Transport) -> bool:
        """After the handshake: classify, admit or refuse; arm the head deadline."""
        _nodelay(transport)
        ext = tls_extension(transport)
        svc = self.service = self.app if isinstance(self.app, ServiceApp) else None
        self.app = _wrap(self.app, ext)
        if svc is None:
            return True
        self._peer = peer_of(self.client[0] if self.client else None)
        self._who = svc.authorized_client(ext)
        if self._who is None and not svc.doorway.anonymous(self._peer, time.monotonic()):
            self._answer(429, "too-many-connections", "too many connections",
                         "too many connections without an authorized client certificate "
                         "from this address", retry_after=int(
                             svc.limits.anonymous_connect_rate.window_s))
            return False
        refused, evict = svc.connections.admit(self, self._peer, self._who is not None)
        for old in evict:  # the oldest anonymous connection makes room
            if isinstance(old, _Guarded):
                old._admitted = False
                old._close_quietly()
        if refused:
            if refused == "peer":
                self._answer(429, "too-many-connections", "too many connections",
                             "too many connections from this address", retry_after=5)
            else:
                self._answer(503, "unavailable", "service temporarily unavailable",
                             "the service is at its connection limit", retry_after=2)
            return False
        self._admitted = True
        self._arm_head()
        return True

    def _guard_lost(self) -> None:
        self._disarm_head()
        if self._door is not None:
            self._door.leave(self._door_peer)
            self._door = None
        if self._admitted and self.service is not None:
            self.service.connections.release(self)
            self._admitted = False

    def _arm_head(self) -> None:
        if self.service is not None and self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.service.limits.head_timeout, self._head_timeout)

    def _disarm_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.service is not None and not self.transport.is_closing():
            self._answer(408, "timeout", "request timeout",
                         f"the request head must arrive within "
                         f"{self.service.limits.head_timeout:g} s")

    def _answer(self, status: int, slug: str, title: str, detail: str, *,
                retry_after: int | None = None) -> None:
        """Answer on the connection itself and close it."""
        rid = os.urandom(8).hex()
        body = Problem(status, slug, title, detail).body(rid)
        head = [f"HTTP/1.1 {status} {_PHRASES.get(status, 'Error')}",
                "content-type: application/problem+json", f"content-length: {len(body)}",
                "cache-control: no-store", f"x-request-id: {rid}", "connection: close"]
        if retry_after is not None:
            head.append(f"retry-after: {retry_after}")
        if not self.transport.is_closing():
            self.transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        self._close_quietly()
        if self.service is not None:
            self.service.note_connection(self._peer, status, client=self._who)

    def _close_quietly(self) -> None:
        """Close (the answer, if any, is flushed first); abort if the peer does not read."""
        self._disarm_head()
        t = self.transport
        if not t.is_closing():
            t.close()
            self.loop.call_later(2.0, t.abort)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request its parser refuses, as problem+json."""
        self._answer(400, "malformed-http", "malformed HTTP request",
                     " ".join(msg.split())[:120] or "the request is not valid HTTP/1.1")


class MtlsH11Protocol(_Guarded, H11Protocol):
    """uvicorn's h11 protocol, with the ASGI TLS extension in every request's scope and
    the service's connection guard."""

    def data_received(self, data: bytes) -> None:
        if not self._admitted and self.service is not None:
            return  # refused: the answer is on its way out
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_head()  # the head is complete (or the connection is done)
        elif self._head_timer is None and self.conn.trailing_data[0]:
            self._arm_head()  # a head begun but not complete: it has a deadline

    def send_400_response(self, msg: str) -> None:
        _Guarded.send_400_response(self, msg)


def _httptools_protocol() -> type[asyncio.Protocol] | None:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class MtlsHttpToolsProtocol(_Guarded, HttpToolsProtocol):
        """uvicorn's httptools protocol, with the ASGI TLS extension, the connection
        guard and, as h11 has, a bound on a request's head while it arrives: more than
        ``MAX_HEAD`` bytes without the end of the headers is answered 400 and the
        connection closed. A head that arrives whole in one read and is too long is
        refused by the app (431)."""

        _in_head = True  # from a message's first byte to the end of its headers
        _head_bytes = 0

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes = True, 0

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._disarm_head()
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            if not self._admitted and self.service is not None:
                return
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():
                # a head begun but not complete in this read: it has a deadline (a head
                # that arrives whole, the usual case, costs no timer)
                if self._head_timer is None:
                    self._arm_head()
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD:
                    self.send_400_response("Request head too large.")

        def send_400_response(self, msg: str) -> None:
            _Guarded.send_400_response(self, msg)

    return MtlsHttpToolsProtocol


def protocol_class(http: str) -> type[asyncio.Protocol]:
    """``h11`` (pure Python), ``httptools`` (faster), or ``auto``: httptools when it is
    installed. Both bound a request's head while it arrives (``MAX_HEAD``); when the
    app is a :class:`~.app.ServiceApp`, its connection limits apply."""
    base: type[asyncio.Protocol] | None
    if http in ("httptools", "auto"):
        base = _httptools_protocol()
        if base is None:
            if http == "httptools":
                raise ValueError("--http httptools needs the httptools package")
            base = MtlsH11Protocol
    elif http == "h11":
        base = MtlsH11Protocol
    else:
        raise ValueError("--http: auto, h11 or httptools")
    return base


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
                log_level: str = "error") -> uvicorn.Config:
    """uvicorn's configuration. Its own concurrency limit is off (it would answer a
    text/plain 503 to everyone once anonymous connections fill it): the app's
    :class:`~.guard.Connections` admits connections by pool and address instead.
    uvicorn's warnings are off too: each is a line any anonymous client can make it
    write (an invalid request, an unsupported upgrade); those answers are counted in
    the metrics and in the address's audit record instead."""
    def factory(config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        return ctx

    return uvicorn.Config(
        app, host=host, port=port, http=protocol_class(http), loop=event_loop(loop),
        ssl_context_factory=factory,
        lifespan="on", proxy_headers=False, server_header=False, access_log=False,
        log_level=log_level, timeout_keep_alive=15, limit_concurrency=None,
        h11_max_incomplete_event_size=MAX_HEAD, ws="none")


class Server(uvicorn.Server):
    """uvicorn's server on given sockets, with a TLS handshake timeout: a connection
    whose handshake is not complete ``handshake_timeout`` seconds after it was accepted
    is closed (uvicorn leaves asyncio's default of 60 s), and a peer that does not
    answer the closing alert is let go after 5 s (instead of 30)."""

    def __init__(self, config: uvicorn.Config, *, handshake_timeout: float = 10.0) -> None:
        super().__init__(config)
        self.handshake_timeout = handshake_timeout

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if sockets is None:
            raise ValueError("keyload's server runs on sockets it was given (bind())")
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(3)
        config = self.config

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state,
                app_state=self.lifespan.state, _loop=_loop)

        loop = asyncio.get_running_loop()
        app = config.loaded_app
        self.servers = []
        for sock in sockets:
            if isinstance(app, ServiceApp):
                self.servers.append(_Acceptor(  # type: ignore[arg-type]
                    loop, sock, create_protocol, config.ssl, self.handshake_timeout,
                    app.doorway))
            else:
                self.servers.append(await loop.create_server(
                    create_protocol, sock=sock, ssl=config.ssl, backlog=config.backlog,
                    ssl_handshake_timeout=self.handshake_timeout, ssl_shutdown_timeout=5.0)
                    if config.ssl else await loop.create_server(  # plain HTTP (a dashboard)
                    create_protocol, sock=sock, backlog=config.backlog))
        self.started = True


class _Acceptor:
    """Accepts on a listening socket itself, so that an address is admitted (or the
    socket closed) before its TLS handshake costs anything (:class:`~.guard.Doorway`);
    then ``connect_accepted_socket`` runs the handshake under its timeout. ``close()``
    stops accepting (what uvicorn's shutdown calls on its servers)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 factory: Callable[[], asyncio.Protocol], ctx: ssl.SSLContext | None,
                 handshake_timeout: float, door: Doorway) -> None:
        self.loop, self.sock, self.factory, self.ctx = loop, sock, factory, ctx
        self.handshake_timeout = handshake_timeout
        self.door = door
        self._opening: set[asyncio.Task[None]] = set()
        sock.setblocking(False)
        self._task = loop.create_task(self._accept())

    async def _accept(self) -> None:
        while True:
            try:
                conn, addr = await self.loop.sock_accept(self.sock)
            except asyncio.CancelledError:
                raise
            except OSError:  # out of descriptors, a connection reset in the queue
                await asyncio.sleep(0.05)
                continue
            peer = peer_of(addr[0] if isinstance(addr, tuple) else None)
            if not self.door.enter(peer, time.monotonic()):
                conn.close()
                continue
            t = self.loop.create_task(self._open(conn, peer))
            self._opening.add(t)
            t.add_done_callback(self._opening.discard)

    async def _open(self, conn: socket.socket, peer: str) -> None:
        def factory() -> asyncio.Protocol:
            proto = self.factory()
            if isinstance(proto, _Guarded):
                proto._door, proto._door_peer = self.door, peer
            return proto

        try:
            await self.loop.connect_accepted_socket(
                factory, conn, ssl=self.ctx, ssl_handshake_timeout=self.handshake_timeout,
                ssl_shutdown_timeout=5.0)
        except Exception:  # the handshake failed or timed out: nothing was served
            self.door.leave(peer)
            conn.close()

    def close(self) -> None:
        self._task.cancel()
        for t in list(self._opening):
            t.cancel()

    async def wait_closed(self) -> None:
        """Done once accepting has stopped (open connections are uvicorn's to end)."""
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def raise_fd_limit() -> int:
    """Lift this process's open-file limit to its hard limit (every connection, even
    one still in its handshake, is a descriptor); the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return int(target)
        except (ValueError, OSError):
            pass
    return int(soft)


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

    def __init__(self, config: uvicorn.Config, sock: socket.socket, *,
                 handshake_timeout: float = 10.0) -> None:
        self.server = Server(config, handshake_timeout=handshake_timeout)
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
