"""A private, throw-away PostgreSQL server for tests and demos.

:func:`private_postgres` makes a fresh cluster (``initdb``), starts it with ``pg_ctl`` on
a Unix socket in a private directory (no TCP listener; trust authentication is safe there
because only the owner of that 0700 directory, and root, can reach the socket), creates a
database and yields its ``postgresql://`` URL; at the end it stops the server
(``pg_ctl stop -m fast``, then ``immediate``) and removes the cluster.

``initdb`` refuses to run as root: as root, the server runs as the ``postgres`` user on a
directory it owns (a private temporary directory when the given one is out of its reach).
A server left running by an earlier run that was killed is stopped first: the directory
keeps a small state file naming its cluster.

>>> ok, why = postgres_available()
>>> # with private_postgres(Path("/tmp/x")) as url: PostgresJournal(url) ...
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import StoreError

ENV_BINDIR = "KEYLOAD_PG_BINDIR"
STATE_FILE = "pgserver.json"
DB_NAME = "keyload"
SUPERUSER = "keyload"
SERVER_USER = "postgres"  # who runs the server when we are root
_TOOLS = ("initdb", "pg_ctl", "postgres")
_SOCKET_MAX = 100  # sun_path is 108 bytes; leave room for "/.s.PGSQL.NNNNN"


def _version_key(p: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", p.parent.name)) or (0,)


def find_bindir() -> Path | None:
    """Where initdb, pg_ctl and postgres are: $KEYLOAD_PG_BINDIR, PATH, or Debian's
    /usr/lib/postgresql/<version>/bin (the newest)."""
    candidates: list[Path] = []
    if os.environ.get(ENV_BINDIR):
        candidates.append(Path(os.environ[ENV_BINDIR]))
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(Path(found).resolve().parent)
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key,
                         reverse=True)
    for d in candidates:
        if all(os.access(d / t, os.X_OK) for t in _TOOLS):
            return d
    return None


def _as_root() -> bool:
    return os.geteuid() == 0


def _switch_user() -> list[str] | None:
    """The command prefix that runs a program as the server user (root only)."""
    runuser = shutil.which("runuser") or next(
        (p for p in ("/usr/sbin/runuser", "/sbin/runuser") if os.access(p, os.X_OK)), None)
    if runuser:
        return [runuser, "-u", SERVER_USER, "--"]
    return None


def postgres_available() -> tuple[bool, str]:
    """(True, "") when a private server can be started here, else (False, why)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return False, "psycopg is not installed (pip install 'psycopg[binary]')"
    if find_bindir() is None:
        return False, ("PostgreSQL server binaries not found (apt-get install postgresql, "
                       f"or set {ENV_BINDIR})")
    if _as_root():
        try:
            pwd.getpwnam(SERVER_USER)
        except KeyError:
            return False, f"running as root and there is no {SERVER_USER!r} user to run initdb"
        if _switch_user() is None:
            return False, "running as root and runuser is missing (util-linux)"
    return True, ""


class _Runner:
    """Runs the server tools as the right user, in a directory that user can enter."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.prefix: list[str] = []
        self.uid = self.gid = -1
        if _as_root():
            prefix = _switch_user()
            if prefix is None:
                raise StoreError("running as root and runuser is missing (util-linux)")
            pw = pwd.getpwnam(SERVER_USER)
            self.prefix, self.uid, self.gid = prefix, pw.pw_uid, pw.pw_gid

    def own(self, path: Path) -> None:
        if self.uid >= 0:
            os.chown(path, self.uid, self.gid)

    def run(self, tool: str, *args: str, cwd: Path, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [*self.prefix, str(self.bindir / tool), *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=timeout, check=False)
        if check and p.returncode != 0:
            raise StoreError(f"{tool} failed ({p.returncode}): "
                             f"{(p.stderr or p.stdout).strip()[-2000:]}")
        return p

    def reaches(self, directory: Path) -> bool:
        """Can the server user enter ``directory`` (where we make it a home of its own)?"""
        if self.uid < 0:
            return os.access(directory, os.W_OK | os.X_OK)
        p = subprocess.run([*self.prefix, "test", "-x", str(directory)], capture_output=True,
                           check=False, timeout=30)
        return p.returncode == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(runner: _Runner, data: Path, cwd: Path) -> None:
    """Stop a server on ``data`` if one runs (fast, then immediate)."""
    if not (data / "postmaster.pid").exists():
        return
    for mode in ("fast", "immediate"):
        p = runner.run("pg_ctl", "-D", str(data), "-m", mode, "-w", "-t", "30", "stop",
                       cwd=cwd, check=False, timeout=60)
        if p.returncode == 0 or not (data / "postmaster.pid").exists():
            return


def _cleanup_leftover(runner: _Runner, directory: Path) -> None:
    """Stop and remove the cluster an earlier, killed run left behind."""
    state = directory / STATE_FILE
    if not state.exists():
        return
    try:
        info = json.loads(state.read_text())
        base = Path(info["base"])
        temporary = bool(info.get("temporary"))
    except (OSError, ValueError, KeyError, TypeError):
        state.unlink(missing_ok=True)
        return
    if base.is_dir():
        with contextlib.suppress(StoreError, OSError, subprocess.TimeoutExpired):
            _stop(runner, base / "data", base)
        shutil.rmtree(base if temporary else base / "data", ignore_errors=True)
        if not temporary:
            shutil.rmtree(base / "sock", ignore_errors=True)
    state.unlink(missing_ok=True)


def make_database(url: str, name: str) -> str:
    """Create database ``name`` on the server of ``url`` (as a user allowed to); its URL."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(url, name)


def with_database(url: str, name: str) -> str:
    """``url`` (``postgresql://…``) naming database ``name`` instead."""
    from urllib.parse import quote, urlsplit

    u = urlsplit(url)
    query = f"?{u.query}" if u.query else ""
    return f"{u.scheme}://{u.netloc}/{quote(name, safe='')}{query}"


def _url(sockdir: str, port: int, user: str, dbname: str) -> str:
    from urllib.parse import quote

    return (f"postgresql:///{quote(dbname, safe='')}?host={quote(sockdir, safe='')}"
            f"&port={port}&user={quote(user, safe='')}")


@contextlib.contextmanager
def private_postgres(directory: Path, *, durable: bool = False,
                     keep: bool = False) -> Iterator[str]:
    """Run a private PostgreSQL server for the duration of the block; yield its URL.

    ``durable`` False (tests, demos) turns fsync off. ``keep`` leaves the (stopped)
    cluster in place at the end instead of removing it.
    """
    ok, why = postgres_available()
    if not ok:
        raise StoreError(f"no private PostgreSQL here: {why}")
    bindir = find_bindir()
    assert bindir is not None
    runner = _Runner(bindir)
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    _cleanup_leftover(runner, directory)

    # the cluster's home: in ``directory`` when the server user can reach it and the
    # socket path is short enough, else in a private temporary directory
    base = directory / "pg"
    temporary = not (runner.reaches(directory) and
                     len(str(base / "sock")) <= _SOCKET_MAX - 20)
    if temporary:
        base = Path(tempfile.mkdtemp(prefix="keyload-pg-"))
    else:
        if (base / "data").is_dir():  # a cluster without its state file: stop it first
            with contextlib.suppress(StoreError, OSError, subprocess.TimeoutExpired):
                _stop(runner, base / "data", base)
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(mode=0o700)
    (directory / STATE_FILE).write_text(json.dumps({"base": str(base),
                                                    "temporary": temporary}))
    data, sock, log = base / "data", base / "sock", base / "postgres.log"
    try:
        base.chmod(0o700)
        runner.own(base)
        for d in (data, sock):
            d.mkdir(mode=0o700)
            runner.own(d)
        runner.run("initdb", "-D", str(data), "-U", SUPERUSER, "--auth=trust",
                   "--encoding=UTF8", "--locale=C", "--no-instructions", cwd=base)
        opts = [f"-c unix_socket_directories='{sock}'", "-c listen_addresses=''",
                "-c max_connections=200", "-c shared_buffers=32MB"]
        if not durable:
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        last = ""
        port = 0
        for _ in range(5):  # a port taken between free_port() and the start: try another
            port = free_port()
            p = runner.run("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60",
                           "-o", " ".join([f"-p {port}", *opts]), "start", cwd=base,
                           check=False)
            if p.returncode == 0:
                break
            last = _tail(log) or (p.stderr or p.stdout)
            _stop(runner, data, base)
        else:
            raise StoreError(f"PostgreSQL did not start: {last.strip()[-2000:]}")
        if (bindir / "createdb").exists():
            runner.run("createdb", "-h", str(sock), "-p", str(port), "-U", SUPERUSER,
                       DB_NAME, cwd=base)
        else:
            make_database(_url(str(sock), port, SUPERUSER, "postgres"), DB_NAME)
        yield _url(str(sock), port, SUPERUSER, DB_NAME)
    finally:
        with contextlib.suppress(StoreError, OSError, subprocess.TimeoutExpired):
            _stop(runner, data, base)
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
            (directory / STATE_FILE).unlink(missing_ok=True)


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""
