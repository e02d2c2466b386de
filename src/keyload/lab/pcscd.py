"""pcscd with the vpcd reader, for tests and an emulated station: start, wait, stop by PID.

:func:`running_pcscd` reuses a pcscd that already answers on its socket (a system one
started by systemd socket activation, or CI's), else starts ``pcscd -f`` (foreground,
logs to a file) in the background with a private reader configuration directory
(``-c DIR``) holding one vpcd entry, records its PID, waits until the socket accepts and
both vpcd readers are listed, and at the end stops that PID (SIGTERM, then SIGKILL).

One vpcd entry gives two readers: ``Virtual PCD 00 00`` (virtual cards connect to TCP
35963) and ``Virtual PCD 00 01`` (35964). ``--force-reader-polling`` is not needed: it
only makes pcscd ignore a USB driver's hotplug capability, and vpcd is a reader.conf
(serial) driver; card presence is polled by pcscd every 400 ms regardless.

Not supported: a second pcscd beside a running one. It would overwrite
``/run/pcscd/pcscd.pid`` and its vpcd would fight for the same TCP ports; that needs its
own mount namespace, ``PCSCLITE_CSOCK_NAME`` and another CHANNELID.
Starting pcscd needs root (it creates ``/run/pcscd``); reusing one does not.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import TransportError

PCSCD = "/usr/sbin/pcscd"
VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
VPCD_NAME = "Virtual PCD"
VPCD_PORTS = (35963, 35964)
RUN_DIR = Path("/run/pcscd")

_READER_CONF = """\
# written by keyload: one vpcd entry = two readers, TCP ports CHANNELID and CHANNELID+1
FRIENDLYNAME "{name}"
DEVICENAME   /dev/null:0x{port:04X}
LIBPATH      {driver}
CHANNELID    0x{port:04X}
"""


def socket_path() -> Path:
    """pcsc-lite's socket: ``$PCSCLITE_CSOCK_NAME`` when set, as the library does."""
    return Path(os.environ.get("PCSCLITE_CSOCK_NAME") or RUN_DIR / "pcscd.comm")


def socket_answers(path: Path | None = None, timeout: float = 1.0) -> bool:
    """True when something accepts connections on pcscd's socket."""
    p = path or socket_path()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(p))
        except OSError:
            return False
    return True


def pcscd_binary() -> str | None:
    if os.access(PCSCD, os.X_OK):
        return PCSCD
    return shutil.which("pcscd")


def _pyscard_missing() -> str | None:
    try:
        import smartcard.scard  # type: ignore[import-untyped,unused-ignore]  # noqa: F401
    except ImportError as e:
        return f"pyscard is not installed ({e}); pip install pyscard (needs swig, gcc, " \
               "libpcsclite-dev)"
    return None


def vpcd_readers(readers: list[str]) -> tuple[str, ...]:
    """The vpcd readers among ``readers``, in port order (35963 first)."""
    return tuple(sorted(r for r in readers if r.startswith(VPCD_NAME)))


@dataclass(frozen=True, slots=True)
class Availability:
    """Whether PC/SC with virtual cards can run here; ``reason`` says why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def pcsc_available() -> Availability:
    """Check pyscard, the vpcd driver, and a pcscd to reuse or the means to start one."""
    missing = _pyscard_missing()
    if missing:
        return Availability(False, missing)
    if not VPCD_DRIVER.is_file():
        return Availability(False, f"the vpcd driver {VPCD_DRIVER} is missing "
                                   "(apt-get install vsmartcard-vpcd)")
    if socket_answers():
        from ..transports.pcsc import list_readers

        try:
            found = vpcd_readers(list_readers())
        except TransportError as e:
            return Availability(False, f"a pcscd answers on {socket_path()} but: {e}")
        if len(found) < 2:
            return Availability(False, f"the running pcscd ({socket_path()}) has no vpcd "
                                       "readers: add /etc/reader.conf.d/vpcd and restart it")
        return Availability(True, "reusing the running pcscd")
    if pcscd_binary() is None:
        return Availability(False, "pcscd is not installed (apt-get install pcscd)")
    run_parent = RUN_DIR if RUN_DIR.exists() else RUN_DIR.parent
    if not os.access(run_parent, os.W_OK):
        return Availability(False, f"no pcscd is running and starting one needs write access "
                                   f"to {run_parent} (root)")
    return Availability(True, "pcscd will be started")


class PcscdError(TransportError):
    """pcscd could not be started, or has not the vpcd readers."""


@dataclass
class Pcscd:
    """A pcscd with the vpcd readers; ``pid`` is None when an already running one is
    reused (and then :meth:`stop` leaves it alone)."""

    socket: Path
    readers: tuple[str, ...]
    pid: int | None = None
    log_path: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _workdir: Path | None = field(default=None, repr=False)

    @property
    def started(self) -> bool:
        return self._proc is not None

    def reader_for_port(self, port: int) -> str:
        """The reader a virtual card on ``port`` shows up in."""
        try:
            return self.readers[VPCD_PORTS.index(port)]
        except (ValueError, IndexError):
            raise ValueError(f"no vpcd reader for port {port}") from None

    def log_tail(self, n: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the pcscd this object started, by its PID (SIGTERM, then SIGKILL)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            self.log_path = None


def _wait_ready(proc: subprocess.Popen[bytes] | None, deadline: float) -> tuple[str, ...]:
    from ..transports.pcsc import list_readers

    last = "the socket does not answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise PcscdError(f"pcscd exited with status {proc.returncode}")
        if socket_answers(timeout=0.2):
            try:
                found = vpcd_readers(list_readers())
            except TransportError as e:
                last = str(e)
            else:
                if len(found) >= 2:
                    return found
                last = f"readers listed: {found}"
        time.sleep(0.05)
    raise PcscdError(f"pcscd not ready in time: {last}")


def start_pcscd(*, timeout: float = 10.0, port: int = VPCD_PORTS[0]) -> Pcscd:
    """Reuse the running pcscd, or start one with the vpcd readers (see module doc)."""
    sock = socket_path()
    if socket_answers(sock):
        return Pcscd(sock, _wait_ready(None, time.monotonic() + timeout))
    binary = pcscd_binary()
    if binary is None:
        raise PcscdError("pcscd is not installed")
    if not VPCD_DRIVER.is_file():
        raise PcscdError(f"the vpcd driver {VPCD_DRIVER} is missing")
    workdir = Path(tempfile.mkdtemp(prefix="keyload-pcscd-"))
    conf = workdir / "reader.conf.d"
    conf.mkdir()
    (conf / "vpcd").write_text(_READER_CONF.format(name=VPCD_NAME, port=port,
                                                   driver=VPCD_DRIVER))
    log_path = workdir / "pcscd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([binary, "--foreground", "--config", str(conf)],
                                stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, close_fds=True)
    d = Pcscd(sock, (), proc.pid, log_path, proc, workdir)
    try:
        d.readers = _wait_ready(proc, time.monotonic() + timeout)
    except BaseException as e:
        tail = d.log_tail()
        d.stop()
        if isinstance(e, PcscdError):
            raise PcscdError(f"{e}; pcscd log:\n{tail}" if tail else str(e)) from None
        raise
    return d


def lock_path() -> Path:
    return Path(tempfile.gettempdir()) / "keyload-vpcd.lock"


@contextmanager
def vpcd_lock(timeout: float = 600.0) -> Iterator[None]:
    """Exclusive use of the vpcd readers by this process, across processes (flock).

    The vpcd ports are one per machine: two test runs feeding cards into the same reader
    would see each other's cards, and the one that started pcscd would stop it under the
    other. Waits up to ``timeout`` seconds for the holder to finish."""
    path = lock_path()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise PcscdError(f"the vpcd readers stay in use by another process "
                                     f"(lock {path}) after {timeout} s") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def running_pcscd(*, timeout: float = 10.0, lock_timeout: float = 600.0) -> Iterator[Pcscd]:
    """A pcscd with the vpcd readers, used by this process alone (:func:`vpcd_lock`) for
    the duration of the block; a pcscd started here is stopped at the end, a reused one
    is left running. Nesting in one process is fine (the inner block reuses)."""
    with _process_lock(lock_timeout):
        d = start_pcscd(timeout=timeout)
        try:
            yield d
        finally:
            with contextlib.suppress(OSError):
                d.stop()


_process_guard = threading.Lock()
_process_users = 0
_process_stack = contextlib.ExitStack()


@contextmanager
def _process_lock(timeout: float) -> Iterator[None]:
    """:func:`vpcd_lock`, taken once per process however deeply nested (a second flock
    from the same process would wait for itself)."""
    global _process_users
    with _process_guard:
        if _process_users == 0:
            _process_stack.enter_context(vpcd_lock(timeout))
        _process_users += 1
    try:
        yield
    finally:
        with _process_guard:
            _process_users -= 1
            if _process_users == 0:
                _process_stack.close()


__all__ = ["VPCD_DRIVER", "VPCD_PORTS", "Availability", "Pcscd", "PcscdError",
           "pcsc_available", "running_pcscd", "socket_answers", "start_pcscd", "vpcd_lock"]
