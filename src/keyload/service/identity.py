"""Who asks: a connection's verified client certificate, and the policy's rule for it.

The certificate comes from the ASGI TLS extension (set by :mod:`.server` from the
handshake, never from a header). A request is *authorized* when the certificate names
exactly one CN, has the clientAuth extended key usage, is not on the policy's deny list
and names a client of the policy; otherwise the refusal is a 401 or 403 problem, made
for the request that asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import problems as P
from .pki import fingerprint
from .policy import ClientRule, Policy
from .requests import Req


@dataclass(frozen=True, slots=True)
class ClientId:
    """A client as its verified certificate names it."""

    cn: str
    sha256: str
    serial: int
    client_auth: bool  # the certificate's extended key usage includes clientAuth


class Identities:
    """Certificates to rules, each certificate parsed once (a bounded cache)."""

    MAX_CACHED = 4096

    def __init__(self) -> None:
        self._ids: dict[str, ClientId | None] = {}

    def rule(self, tls: dict[str, Any] | None, policy: Policy, req: Req | None) -> ClientRule:
        """The policy's rule for a verified certificate, or the refusal (401, 403); the
        certificate's CN goes into ``req`` for its audit record."""
        chain = (tls or {}).get("client_cert_chain") or []
        if not chain:
            raise P.unauthenticated()
        cid = self.identity(str(chain[0]))
        if cid is None:
            raise P.unauthenticated("the client certificate must name exactly one CN")
        if req is not None:
            req.client = cid.cn
        if not cid.client_auth:
            raise P.unauthenticated("the client certificate is not for client "
                                    "authentication (no clientAuth extended key usage)")
        if policy.revoked(cid.sha256, cid.serial):
            raise P.client_revoked()
        rule = policy.client(cid.cn, cid.sha256)
        if rule is None:
            raise P.forbidden_client()
        return rule

    def identity(self, pem: str) -> ClientId | None:
        """What the certificate says, or None when it does not name exactly one CN."""
        if pem in self._ids:
            return self._ids[pem]
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            try:
                eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
                client_auth = ExtendedKeyUsageOID.CLIENT_AUTH in eku
            except x509.ExtensionNotFound:
                client_auth = False
            cid = ClientId(str(cns[0].value), fingerprint(pem.encode()), cert.serial_number,
                           client_auth) if len(cns) == 1 else None
        except (ValueError, IndexError):
            cid = None
        if len(self._ids) > self.MAX_CACHED:
            self._ids.clear()
        self._ids[pem] = cid
        return cid


__all__ = ["ClientId", "Identities"]
