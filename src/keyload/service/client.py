"""The field-side client: EXPORTKEY and receipts over HTTPS with a client certificate.

:class:`HttpsAuthority` is an :class:`~keyload.station.load.AuthorityClient` whose
``export`` goes to the service, so the station's :func:`~keyload.station.load.load_key`
drives the local unit unchanged (INITIALIZE DOWNLOAD, EXPORTKEY remote, IMPORTKEY local).
A problem+json refusal that carries a status word becomes the same typed error a local
authority would raise; other refusals become :class:`ServiceRefused`.

The connection is kept alive and reopened once if the server closed it between requests.
Only the standard library is used (``http.client`` + ``ssl``).
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..core import messages as msg
from ..core.errors import SW, KeyloadError, StatusError, TransportError, error_for_sw
from ..station.load import AuthorityClient, LoadResult


class ServiceRefused(StatusError):
    """The service refused (HTTP status and problem type kept); exit code: refused."""

    sw = SW.POLICY

    def __init__(self, status: int, slug: str, detail: str) -> None:
        self.status = status
        self.slug = slug
        KeyloadError.__init__(self, f"service refused (HTTP {status} {slug}): {detail}")
        self.detail = f"HTTP {status} {slug}: {detail}"


def client_context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    content_type: str
    body: bytes

    def problem(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.body)
            return doc if isinstance(doc, dict) else {}
        except ValueError:
            return {}


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
            try:
                conn = self._connection()
                conn.request(method, self.base + path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.close()
                return Reply(r.status, (r.getheader("content-type") or "").split(";")[0],
                             data)
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

    def _refusal(self, reply: Reply) -> KeyloadError:
        p = reply.problem()
        sw = p.get("sw")
        detail = str(p.get("detail") or p.get("title") or f"HTTP {reply.status}")
        if isinstance(sw, str) and len(sw) == 4:
            try:
                return error_for_sw(int(sw, 16), detail)
            except ValueError:
                pass
        slug = str(p.get("type", "")).rpartition(":")[2] or "refused"
        return ServiceRefused(reply.status, slug, " ".join(detail.split())[:200])

    def export(self, req: msg.ExportRequest) -> msg.ExportResponse:
        reply = self.request("POST", "/v1/exportkey", req.encode(), "application/octet-stream")
        if reply.status != 200:
            raise self._refusal(reply)
        return msg.ExportResponse.decode(reply.body)

    def post_receipt(self, res: LoadResult) -> dict[str, Any]:
        body = json.dumps({"sn": res.sn.hex(), "r": res.r.hex(), "ref2": res.ref2,
                           "kcv": res.kcv.hex(), "rct": res.rct.hex()}).encode()
        reply = self.request("POST", "/v1/receipts", body, "application/json")
        if reply.status not in (200, 201):  # 200: recorded already (a retry)
            raise self._refusal(reply)
        out = json.loads(reply.body)
        assert isinstance(out, dict)
        return out

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
