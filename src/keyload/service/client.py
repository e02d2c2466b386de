"""The field-side client: EXPORTKEY and receipts over HTTPS with a client certificate.

:class:`HttpsAuthority` is an :class:`~keyload.station.load.AuthorityClient` whose
``export`` goes to the service, so the station's :func:`~keyload.station.load.load_key`
drives the local unit unchanged (INITIALIZE DOWNLOAD, EXPORTKEY remote, IMPORTKEY local).
A problem+json refusal that carries a status word becomes the same typed error a local
authority would raise; other refusals become :class:`ServiceRefused`.

The connection is kept alive and reopened once if the server closed it between requests.
Only the standard library is used (``http.client`` + ``ssl``).

Receipts are evidence, and the key is already in the unit when its receipt is sent:
:func:`deliver_receipt` retries one that the service cannot take yet (429 after its
``Retry-After``, 5xx, a lost connection) within a deadline, and one that still cannot be
delivered is kept in the home's :class:`Outbox` (``HOME/outbox/``, one JSON file per
receipt, 0600 in a 0700 directory) until ``keyload fetch`` sends it again. A receipt is
not secret (it proves a load, it reveals no key), but it is never lost.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import http.client
import json
import os
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from ..core import messages as msg
from ..core import messages3 as msg3
from ..core.errors import SW, KeyloadError, StatusError, TransportError, error_for_sw
from ..core.ref1 import display_ref1
from ..station.load import AuthorityClient, LoadResult
from ..units.storage import atomic_write, ensure_private_dir
from .pki import check_tls_files


class ServiceRefused(StatusError):
    """The service refused (HTTP status and problem type kept); exit code: refused."""

    sw = SW.POLICY

    def __init__(self, status: int, slug: str, detail: str,
                 retry_after: float | None = None) -> None:
        self.status = status
        self.slug = slug
        self.retry_after = retry_after  # seconds, from the answer's Retry-After
        super().__init__(f"HTTP {status} {slug}: {detail}",
                         message=f"service refused (HTTP {status} {slug}): {detail}")


class ServiceUnreachable(TransportError):
    """No answer from the service: no connection, or the TLS handshake failed (exit code:
    service unreachable). A connection lost after a request was sent is a plain
    :class:`TransportError`."""


def client_context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """TLS 1.2+, the server verified against ``ca``, this client's certificate and key;
    a missing or wrong file is named (:func:`~keyload.service.pki.check_tls_files`)."""
    check_tls_files(ca=ca, cert=cert, key=key)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds from now: delta-seconds or an HTTP date; None when the
    header is absent or unreadable."""
    if value is None or not value.strip():
        return None
    v = value.strip()
    if v.isascii() and v.isdigit():
        return float(int(v))
    try:
        when = email.utils.parsedate_to_datetime(v)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    content_type: str
    body: bytes
    retry_after: float | None = None  # seconds (the answer's Retry-After header)

    def problem(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.body)
            return doc if isinstance(doc, dict) else {}
        except ValueError:
            return {}

    def describe(self) -> str:
        """One line for an operator: status, problem type and detail."""
        p = self.problem()
        slug = str(p.get("type", "")).rpartition(":")[2]
        detail = " ".join(str(p.get("detail") or p.get("title") or "").split())[:200]
        return f"HTTP {self.status}" + (f" {slug}" if slug else "") + \
            (f": {detail}" if detail else "")


class ServiceClient:
    """One keep-alive HTTPS connection to the service."""

    def __init__(self, url: str, *, ca: Path, cert: Path | None = None,
                 key: Path | None = None, timeout: float = 15.0,
                 context: ssl.SSLContext | None = None) -> None:
        u = urlsplit(url)
        if u.scheme != "https" or not u.hostname:
            raise ValueError(f"--server {url!r}: an https:// URL (TLS always)")
        self.host, self.port = u.hostname, u.port or 443
        self.base = u.path.rstrip("/")
        self.ctx = context or client_context(ca, cert, key)
        self.timeout = timeout
        self._conn: http.client.HTTPSConnection | None = None

    def _connection(self) -> http.client.HTTPSConnection:
        if self._conn is None:
            conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx,
                                               timeout=self.timeout)
            conn.connect()
            # requests are small and synchronous: no Nagle delay against delayed ACKs
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn
        return self._conn

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str | None = None) -> Reply:
        headers = {"Content-Type": content_type} if content_type else {}
        for attempt in (1, 2):
            conn = self._connect()
            try:
                conn.request(method, self.base + path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.close()
                return Reply(r.status, (r.getheader("content-type") or "").split(";")[0],
                             data, parse_retry_after(r.getheader("retry-after")))
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as e:
                self.close()
                if attempt == 2:
                    raise TransportError(f"service {self.host}:{self.port}: "
                                         f"{e.__class__.__name__}") from None
            except ssl.SSLError as e:
                self.close()
                raise TransportError(f"TLS with {self.host}:{self.port}: "
                                     f"{e.reason or e.__class__.__name__}") from None
            except OSError as e:
                self.close()
                raise TransportError(f"service {self.host}:{self.port}: "
                                     f"{e.strerror or e.__class__.__name__}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _connect(self) -> http.client.HTTPSConnection:
        """The open connection, or a new one: :class:`ServiceUnreachable` when no TCP
        connection is made or the TLS handshake fails."""
        try:
            return self._connection()
        except ssl.SSLError as e:
            self.close()
            raise ServiceUnreachable(f"service {self.host}:{self.port} unreachable: TLS "
                                     f"handshake failed ({e.reason or e.__class__.__name__})"
                                     ) from None
        except OSError as e:
            self.close()
            raise ServiceUnreachable(f"service {self.host}:{self.port} unreachable: "
                                     f"{e.strerror or e.__class__.__name__}") from None

    def refusal(self, reply: Reply) -> KeyloadError:
        """The typed error for a refusal: the status word's error when the problem carries
        one, else :class:`ServiceRefused` (with the answer's Retry-After)."""
        p = reply.problem()
        sw = p.get("sw")
        detail = str(p.get("detail") or p.get("title") or f"HTTP {reply.status}")
        if isinstance(sw, str) and len(sw) == 4:
            try:
                return error_for_sw(int(sw, 16), detail)
            except ValueError:
                pass
        slug = str(p.get("type", "")).rpartition(":")[2] or "refused"
        return ServiceRefused(reply.status, slug, " ".join(detail.split())[:200],
                              reply.retry_after)

    def _exportkey(self, data: bytes) -> bytes:
        reply = self.request("POST", "/v1/exportkey", data, "application/octet-stream")
        if reply.status != 200:
            raise self.refusal(reply)
        return reply.body

    def export(self, req: msg.ExportRequest) -> msg.ExportResponse:
        return msg.ExportResponse.decode(self._exportkey(req.encode()))

    def export3(self, req: msg3.ExportRequest3) -> msg3.ExportResponse3:
        """EXPORTKEY of suite 0x03 (a unit of an identity set): E0 and KCV back."""
        return msg3.ExportResponse3.decode(self._exportkey(req.encode()))

    def send_receipt(self, receipt: Receipt | LoadResult) -> Reply:
        """POST the receipt; the service's answer as it is (no error raised for a refusal)."""
        rc = receipt if isinstance(receipt, Receipt) else Receipt.of(receipt)
        return self.request("POST", "/v1/receipts", json.dumps(rc.body()).encode(),
                            "application/json")

    def post_receipt(self, res: Receipt | LoadResult) -> dict[str, Any]:
        reply = self.send_receipt(res)
        if reply.status not in (200, 201):  # 200: recorded already (a retry)
            raise self.refusal(reply)
        return _answer(reply)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _NoApdu:
    def transmit(self, apdu: bytes) -> bytes:
        raise TransportError("the remote authority is reached over HTTPS, not by APDUs")


class HttpsAuthority(AuthorityClient):
    """``load_key``'s authority, over the service (suites unknown: 6A81 moves on)."""

    def __init__(self, client: ServiceClient) -> None:
        super().__init__(_NoApdu(), suites=None, select=False)
        self.client = client

    def export(self, req: msg.ExportRequest) -> msg.ExportResponse:
        return self.client.export(req)

    def export3(self, req: msg3.ExportRequest3) -> msg3.ExportResponse3:
        return self.client.export3(req)


# -- receipts: delivery within a deadline, and the outbox ---------------------------------
def _answer(reply: Reply) -> dict[str, Any]:
    try:
        out = json.loads(reply.body)
    except ValueError:
        out = None
    return out if isinstance(out, dict) else {}


def _hex(d: Mapping[str, Any], name: str, size: int | None = None) -> bytes:
    v = d.get(name)
    if not isinstance(v, str):
        raise ValueError(f"{name}: hex expected")
    b = bytes.fromhex(v)
    if not b or (size is not None and len(b) != size):
        raise ValueError(f"{name}: wrong length")
    return b


@dataclass(frozen=True, slots=True)
class Receipt:
    """What ``POST /v1/receipts`` takes: the unit's receipt for one challenge."""

    sn: bytes
    r: bytes
    ref2: int
    kcv: bytes
    rct: bytes

    @classmethod
    def of(cls, res: LoadResult) -> Receipt:
        return cls(res.sn, res.r, res.ref2, res.kcv, res.rct)

    def body(self) -> dict[str, Any]:
        return {"sn": self.sn.hex(), "r": self.r.hex(), "ref2": self.ref2,
                "kcv": self.kcv.hex(), "rct": self.rct.hex()}

    @classmethod
    def from_body(cls, d: Mapping[str, Any]) -> Receipt:
        """From :meth:`body`'s fields (ValueError when one is missing or malformed)."""
        ref2 = d.get("ref2")
        if not isinstance(ref2, int) or isinstance(ref2, bool):
            raise ValueError("ref2: an integer expected")
        return cls(_hex(d, "sn"), _hex(d, "r"), ref2, _hex(d, "kcv"), _hex(d, "rct"))


Outcome = Literal["recorded", "refused", "pending"]


def receipt_outcome(status: int) -> Outcome | None:
    """What an answer to a receipt means: ``recorded`` (200: already; 201: now),
    ``refused`` (any other 4xx but 408 and 429: the service will never take it), or
    None: not now (429, 408, 5xx), try again later."""
    if status in (200, 201):
        return "recorded"
    if 400 <= status < 500 and status not in (408, 429):
        return "refused"
    return None


@dataclass(frozen=True, slots=True)
class Delivery:
    """How one receipt's delivery ended."""

    outcome: Outcome
    attempts: int
    answer: dict[str, Any]  # the service's answer (``recorded``), else {}
    error: str  # the last failure, in one line ("" when recorded)
    reply: Reply | None  # the last answer (None: the last attempt got no answer)

    @property
    def status(self) -> int | None:
        return None if self.reply is None else self.reply.status


def deliver_receipt(client: ServiceClient, receipt: Receipt | LoadResult, *, until: float,
                    clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep) -> Delivery:
    """Send a receipt until the service answers for good or ``until`` (a ``clock`` time)
    passes. A 429 is tried again after its ``Retry-After``; a 5xx, 408 or lost connection
    after a short backoff; never sleeping past ``until`` (one last try at the deadline).
    Never raises for the service's answer or the network: the outcome says what happened.
    """
    attempts = 0
    while True:
        attempts += 1
        reply: Reply | None = None
        try:
            reply = client.send_receipt(receipt)
        except TransportError as e:
            error = str(e)
            wait = min(0.5 * attempts, 5.0)
        else:
            outcome = receipt_outcome(reply.status)
            if outcome == "recorded":
                return Delivery("recorded", attempts, _answer(reply), "", reply)
            if outcome == "refused":
                return Delivery("refused", attempts, {}, reply.describe(), reply)
            error = reply.describe()
            wait = reply.retry_after if reply.retry_after is not None \
                else min(0.5 * attempts, 5.0)
        remaining = until - clock()
        if remaining <= 0:
            return Delivery("pending", attempts, {}, error, reply)
        sleep(min(max(wait, 0.0), remaining))


def server_id(url: str) -> str:
    """The service a URL names, spelled one way (scheme, host, port, path)."""
    u = urlsplit(url.strip())
    host = (u.hostname or "").lower()
    host = f"[{host}]" if ":" in host else host
    return f"{u.scheme.lower()}://{host}:{u.port or 443}{u.path.rstrip('/')}"


@dataclass(frozen=True, slots=True)
class Pending:
    """A receipt kept in the outbox: its file and what the file says."""

    path: Path
    doc: dict[str, Any]
    receipt: Receipt

    @property
    def label(self) -> str:
        d = self.doc
        return (f"unit {d.get('sn')} slot {d.get('ref2')} ({d.get('ref1')} "
                f"v{d.get('key_version')}, loaded {d.get('time')})")


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Outbox:
    """``HOME/outbox/``: receipts not delivered yet, one JSON file each (0600, written
    atomically and durably), named so that the oldest sorts first;
    ``HOME/outbox/refused/``: those the service refused for good, with its reason."""

    VERSION = 1

    def __init__(self, home_root: Path) -> None:
        self.dir = home_root / "outbox"
        self.refused_dir = self.dir / "refused"

    def _write(self, directory: Path, name: str, doc: dict[str, Any]) -> Path:
        if not directory.parent.exists():
            ensure_private_dir(directory.parent)
        ensure_private_dir(directory)
        path = directory / name
        atomic_write(path, (json.dumps(doc, indent=1) + "\n").encode(), mode=0o600)
        return path

    def keep(self, server: str, res: LoadResult, *, error: str, attempts: int,
             refused: int | None = None) -> Path:
        """Keep the receipt of ``res`` (pending, or in ``refused/`` when the service
        refused it with status ``refused``); its path."""
        now = _now_iso()
        doc: dict[str, Any] = {
            "keyload_outbox": self.VERSION, "server": server_id(server),
            "url": server, **Receipt.of(res).body(), "ref1": display_ref1(res.ref1),
            "set_id": res.set_id.hex(), "suite": res.suite, "key_version": res.key_version,
            "time": now, "attempts": attempts, "last_try": now, "last_error": error}
        name = f"{time.time_ns():020d}-{res.sn.hex()}-{res.ref2}-{res.r.hex()[:8]}.json"
        if refused is not None:
            doc["refused"] = {"status": refused, "reason": error, "time": now}
            return self._write(self.refused_dir, name, doc)
        return self._write(self.dir, name, doc)

    def pending(self, server: str) -> tuple[list[Pending], list[Path]]:
        """The receipts kept for ``server``, oldest first; and the files of the outbox
        that cannot be read as one (left as they are)."""
        if not self.dir.is_dir():
            return [], []
        want = server_id(server)
        out: list[Pending] = []
        damaged: list[Path] = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                doc = json.loads(path.read_bytes())
                if not isinstance(doc, dict) or doc.get("keyload_outbox") != self.VERSION:
                    raise ValueError("not an outbox file")
                receipt = Receipt.from_body(doc)
                if not isinstance(doc.get("server"), str):
                    raise ValueError("server")
            except (OSError, ValueError):
                damaged.append(path)
                continue
            if doc["server"] == want:
                out.append(Pending(path, doc, receipt))
        return out, damaged

    def retried(self, p: Pending, d: Delivery) -> Pending:
        """Still pending after another delivery: the file says so (attempts, last error)."""
        doc = dict(p.doc, attempts=int(p.doc.get("attempts", 0)) + d.attempts,
                   last_try=_now_iso(), last_error=d.error)
        atomic_write(p.path, (json.dumps(doc, indent=1) + "\n").encode(), mode=0o600)
        return Pending(p.path, doc, p.receipt)

    def remove(self, p: Pending) -> None:
        """Delivered: the file goes (another fetch may have removed it already)."""
        with contextlib.suppress(FileNotFoundError):
            p.path.unlink()
        _fsync_dir(p.path.parent)

    def refuse(self, p: Pending, d: Delivery) -> Path:
        """Refused for good: moved to ``refused/`` with the service's reason."""
        now = _now_iso()
        doc = dict(p.doc, attempts=int(p.doc.get("attempts", 0)) + d.attempts,
                   last_try=now, last_error=d.error,
                   refused={"status": d.status, "reason": d.error, "time": now})
        path = self._write(self.refused_dir, p.path.name, doc)
        self.remove(p)
        return path
