"""Assembling one service instance: authority over a keystore, state store, policy."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..records.audit import AuditLog
from ..records.exportlog import SqliteExportLog
from ..records.sql import SqliteBatch, is_postgres_url
from ..units.authority import Authority, AuthorityBackend
from .app import ServiceApp
from .commit import Batched, Checkpointer, GroupCommit
from .guard import ConnectionLimits
from .policy import Policy
from .store import PostgresServiceStore, ServiceStore, SqliteServiceStore, open_store


@dataclass
class Instance:
    """A ready :class:`ServiceApp` and what to close after the server stops."""

    app: ServiceApp
    store: ServiceStore
    exports: SqliteExportLog
    checkpoints: Checkpointer | None = None

    def close(self) -> None:
        if self.app.commits is not None:
            self.app.commits.close()
        if self.checkpoints is not None:
            self.checkpoints.close()
        self.store.close()
        self.exports.close()


def open_instance(backend: AuthorityBackend, policy: Policy, *, home_root: Path,
                  authority_dir: Path, audit_path: Path, state: str | None = None,
                  instance: str = "keyload", group_commit: bool = True,
                  processes: int = 1, limits: ConnectionLimits | None = None,
                  policy_path: Path | None = None, busy_timeout: float = 2.0) -> Instance:
    """The authority records each export in ``authority_dir/exports.db`` (as ``keyload
    load`` does, so ``keyload authority exports`` lists them); the service records the
    request, the challenge and the ledger in its store (SQLite ``HOME/service.db`` with
    the home's audit chain, or PostgreSQL for several instances).

    With ``group_commit`` (the default) the SQLite databases — export records, and with
    a SQLite state the service's tables and the audit chain — are written in batches
    (:class:`~.commit.GroupCommit`), and so is a PostgreSQL state (one transaction per
    batch, holding the audit chain's lock).
    ``processes``: how many processes serve from this state here (``--processes``); with
    one and SQLite, the rate counters are kept in memory, else in the shared state.
    ``busy_timeout``: how long a database lock held elsewhere is waited for before the
    batch fails (503): short, so that a stuck writer cannot stall the service. With
    SQLite state the batches run on the event loop and never wait there (the busy
    timeout is waited out by a timer; checkpoints run on their own thread); with
    PostgreSQL they run on a database thread (:mod:`.commit`)."""
    pg = is_postgres_url(state)
    audit = None if pg else AuditLog(audit_path, actor="service")
    store = open_store(state, home_root, audit, shared_rates=processes > 1,
                       busy_timeout=busy_timeout)
    exports = SqliteExportLog(authority_dir / "exports.db")
    # on the loop (SQLite state, group commit): never wait for a lock there
    ms = int(busy_timeout * 1000) if pg or not group_commit else 0
    sqlite_dbs = [(exports.db, exports.path)]
    if isinstance(store, SqliteServiceStore):
        sqlite_dbs.append((store.db, store.path))
    if audit is not None:
        sqlite_dbs.append((audit.db, audit.path))
    for db, _ in sqlite_dbs:
        db.execute(f"PRAGMA busy_timeout = {ms}")
        if ms == 0:
            db.execute("PRAGMA wal_autocheckpoint = 0")  # the Checkpointer's work
    checkpoints = Checkpointer([p for _, p in sqlite_dbs]) if ms == 0 else None
    authority = Authority(backend, log=exports)
    parts: list[Batched] = [exports]
    if isinstance(store, SqliteBatch | PostgresServiceStore):
        parts.append(store)
    if audit is not None:
        parts.append(audit)
    # every process serving from this home (workers, or instances sharing it) takes turns
    commits = GroupCommit(parts, lock_path=home_root / "service.lock",
                          busy_timeout=busy_timeout, thread=pg) if group_commit else None
    return Instance(ServiceApp(authority, store, policy, instance=instance, commits=commits,
                               limits=limits, policy_path=policy_path),
                    store, exports, checkpoints)


class OwnedBackend(AuthorityBackend, Protocol):
    """A backend the worker opened and closes (a keystore)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class ServeOptions:
    """What every worker process serves with (the ``keyload serve`` flags)."""

    home_root: Path
    authority_dir: Path
    audit_path: Path
    policy_path: Path
    state: str | None
    instance: str
    limits: ConnectionLimits
    host: str
    port: int  # the bound port
    http: str = "auto"
    loop: str = "auto"
    workers: int = 1
    busy_timeout: float = 2.0


def serve(opts: ServeOptions, open_keystore: Callable[[], OwnedBackend], policy: Policy,
          ctx: ssl.SSLContext, sock: socket.socket) -> None:
    """Serve until stopped. ``opts.workers`` > 1 forks that many minus one more processes
    that accept on the same listening socket; each opens its own keystore and store after
    the fork, so they share only what is meant to be shared: the state database (replay
    cache, rate counters, ledger) and the audit chain. The socket is closed at the end."""
    children: list[int] = []
    parent = os.getpid()
    try:
        for _ in range(opts.workers - 1):
            pid = os.fork()
            if pid == 0:  # a worker: serve, then leave without running the parent's cleanup
                code = 1
                try:
                    _die_with(parent)
                    _serve_one(opts, open_keystore, policy, ctx, sock)
                    code = 0
                finally:
                    os._exit(code)
            children.append(pid)
        _serve_one(opts, open_keystore, policy, ctx, sock, children)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        sock.close()


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


def _serve_one(opts: ServeOptions, open_keystore: Callable[[], OwnedBackend],
               policy: Policy, ctx: ssl.SSLContext, sock: socket.socket,
               children: list[int] | None = None) -> None:
    from .server import Server, make_config

    ks = open_keystore()
    try:
        inst = open_instance(ks, policy, home_root=opts.home_root,
                             authority_dir=opts.authority_dir, audit_path=opts.audit_path,
                             state=opts.state, instance=opts.instance,
                             processes=opts.workers, limits=opts.limits,
                             policy_path=opts.policy_path, busy_timeout=opts.busy_timeout)
        if children:  # SIGHUP to the first process reloads every worker's policy
            def tell_workers() -> None:
                for pid in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGHUP)

            inst.app.after_reload = tell_workers
        try:
            config = make_config(inst.app, ctx, host=opts.host, port=opts.port,
                                 http=opts.http, loop=opts.loop)
            Server(config, handshake_timeout=opts.limits.handshake_timeout).run(sockets=[sock])
        finally:
            inst.close()
    finally:
        ks.close()


class ServeHome(Protocol):
    """What ``serve`` needs of a station home."""

    @property
    def root(self) -> Path: ...
    @property
    def authority_dir(self) -> Path: ...
    @property
    def audit_path(self) -> Path: ...
    def ensure(self) -> None: ...
    def open_keystore(self) -> OwnedBackend: ...


@dataclass
class Listening:
    """A bound socket and what to serve on it (:func:`listen`), and the lines that say so."""

    opts: ServeOptions
    open_keystore: Callable[[], OwnedBackend]
    policy: Policy
    ctx: ssl.SSLContext
    sock: socket.socket
    banner: str

    def serve(self) -> None:
        serve(self.opts, self.open_keystore, self.policy, self.ctx, self.sock)


def read_policy(path: Path) -> Policy:
    """The policy file given to ``keyload serve`` (``--policy``, ``--check-policy``): a
    :class:`~keyload.core.errors.StoreError` that names it when it cannot be read,
    ValueError naming what is wrong in it (:meth:`Policy.load`)."""
    from .pki import read_input_file

    read_input_file(path, "policy")
    return Policy.load(path)


#: ``keyload serve``'s options but the limits (:data:`~.guard.LIMIT_FLAGS`), as (flags,
#: argparse keywords): what :func:`listen` takes, by name.
OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--cert",), {"help": "the server's certificate (PEM; required to serve)"}),
    (("--key",), {"help": "the server's private key (PEM; required to serve)"}),
    (("--ca",), {"help": "the CA that issues client certificates (required to serve)"}),
    (("--policy",), {"help": "authorization policy and limits (JSON; required to serve)"}),
    (("--host",), {"default": "127.0.0.1", "help": "address to listen on"}),
    (("--port",), {"type": int, "default": 8443, "help": "TCP port (0: any free one, printed)"}),
    (("--state",), {"help": "shared state: a SQLite file (default HOME/service.db) or a "
                    "postgresql:// URL shared by several instances"}),
    (("--http",), {"choices": ["auto", "h11", "httptools"], "default": "auto",
                   "help": "HTTP parser (auto: httptools when installed, else h11)"}),
    (("--loop",), {"choices": ["auto", "asyncio", "uvloop"], "default": "auto",
                   "help": "event loop (auto: uvloop when installed)"}),
    (("--instance",), {"help": "this instance's name in audit and metrics (default: the host "
                       "name)"}),
    (("--busy-timeout",), {"type": float, "default": 2.0, "metavar": "S", "help": "how long a "
                           "database lock held elsewhere is waited for before requests are "
                           "answered 503"}),
    (("--processes",), {"type": int, "default": 1, "old": ["--workers"], "help": "processes "
                        "accepting on the same socket (they share the state)"}))


def listen(home_of: Callable[[], ServeHome], *, cert: str, key: str, ca: str,
           policy: str, limits: Callable[[], ConnectionLimits], state: str | None,
           instance: str | None, host: str, port: int, http: str, loop: str, processes: int,
           busy_timeout: float) -> Listening:
    """Everything ``keyload serve`` checks before it serves, in this order: the flags, the
    TLS files, the policy, the limits, the keystore's passphrase or PIN, a PostgreSQL
    state (reached, its tables made); then the socket is bound. SIGHUP is ignored from
    here until the server's own handler is in place."""
    from .ledger import describe_state
    from .pki import check_tls_files
    from .server import bind, raise_fd_limit, runs_on, server_context

    policy_file, workers = policy, processes
    policy_path = Path(policy_file)
    if workers < 1:
        raise ValueError("--processes must be at least 1")
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: a TCP port, 0..65535 (0: any free one)")
    home = home_of()
    check_tls_files(ca=Path(ca), cert=Path(cert), key=Path(key))
    rules = read_policy(policy_path)
    lim = limits()  # bad limits are refused before anything starts
    ctx = server_context(Path(cert), Path(key), Path(ca))
    home.ensure()
    home.open_keystore().close()  # the passphrase or PIN is checked before anything listens
    if is_postgres_url(state):  # and a shared state that cannot be reached (its schema made)
        open_store(state, home.root, None, busy_timeout=busy_timeout).close()
    sock = bind(host, port)
    port = sock.getsockname()[1]
    parser, ev = runs_on(http, loop)
    fds = raise_fd_limit()
    audit = "in the state" if is_postgres_url(state) else home.audit_path
    banner = (
        f"keyload service listening on https://{f'[{host}]' if ':' in host else host}:{port}"
        + (f" ({workers} processes)" if workers > 1 else "") + "\n"
        f"  HTTP {parser}, event loop {ev}, state {describe_state(state, home.root)}, audit "
        f"{audit}\n"
        f"  handshake and request-head timeouts {lim.handshake_timeout:g} s and "
        f"{lim.head_timeout:g} s; connections: {lim.authorized} authorized, "
        f"{lim.anonymous} anonymous, {lim.per_peer} per address "
        f"({lim.anonymous_per_peer} anonymous); open files {fds}; SIGHUP reloads "
        f"{policy_file}")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    opts = ServeOptions(
        home_root=home.root, authority_dir=home.authority_dir, audit_path=home.audit_path,
        policy_path=policy_path, state=state, instance=instance or socket.gethostname(),
        limits=lim, host=host, port=port, http=http, loop=loop, workers=workers,
        busy_timeout=busy_timeout)
    return Listening(opts, home.open_keystore, rules, ctx, sock, banner)
