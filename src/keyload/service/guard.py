"""What a client without an authorized certificate may cost the service, and no more.

Anyone can open a TLS connection to the service (``/v1/health`` answers load-balancer
probes without a certificate), so an anonymous client must not be able to take it down:

- **before TLS** (:class:`Doorway`): at most ``per_peer`` open sockets from one address
  (an IPv6 client counts by its /64), handshakes included, at most ``connect_rate`` new
  connections from it, and at most ``anonymous_connect_rate`` that turn out to have no
  authorized certificate; the rest are closed at once, before a handshake costs
  anything (the handshake is what a flood costs the server: most of its CPU). A
  handshake must complete within ``handshake_timeout``;
- **after TLS** (:class:`Connections`): connections with an authorized certificate and
  the others are admitted to two pools (``authorized``, ``anonymous``), so a flood of
  anonymous connections never starves authorized clients; when the anonymous pool is
  full its oldest connection is closed to make room (a load balancer's probe still gets
  in), and one address may hold ``anonymous_per_peer`` anonymous connections (429).
  Every request head must complete within ``head_timeout`` (:mod:`.server`);
- **requests** (:class:`~.rates.MemoryRates` per address, ``anonymous_rate``):
  requests that no authorized client makes are limited per address before they cost
  anything but parsing (429);
- **evidence** (:class:`AnonymousAudit`): they are audited as one record per address and
  minute with counts by status and route, so the audit log grows by a bounded amount
  whatever an anonymous client sends; authorized clients' requests keep one record each.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .policy import Rate
from .rates import MemoryRates


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The service's connection limits (``keyload serve`` flags of the same names)."""

    handshake_timeout: float = 10.0  # TLS handshake, from accept
    head_timeout: float = 10.0  # request line and headers, from the first byte (or accept)
    body_timeout: float = 10.0  # a request's body, from the end of its head
    authorized: int = 4096  # connections with an authorized certificate, all addresses
    anonymous: int = 1024  # the others, all addresses
    per_peer: int = 256  # connections from one address, handshakes included
    anonymous_per_peer: int = 8  # of which without an authorized certificate
    anonymous_rate: Rate = Rate(20, 1.0)  # noqa: RUF009  (frozen: one shared value is fine)
    connect_rate: Rate = Rate(200, 10.0)  # noqa: RUF009  new connections from one address
    # connections without an authorized certificate from one address; past it, the
    # address gets no handshake until the window lets one more in
    anonymous_connect_rate: Rate = Rate(30, 60.0)  # noqa: RUF009

    def __post_init__(self) -> None:
        for name in ("handshake_timeout", "head_timeout", "body_timeout"):
            v = getattr(self, name)
            if not 0.1 <= v <= 3600:
                raise ValueError(f"--{name.replace('_', '-')}: seconds in 0.1..3600")
        for name in ("authorized", "anonymous", "per_peer", "anonymous_per_peer"):
            if getattr(self, name) < 1:
                raise ValueError(f"connection limit {name}: at least 1")

    @classmethod
    def from_flags(cls, *, handshake_timeout: float, head_timeout: float,
                   body_timeout: float, max_connections: int, max_anonymous: int,
                   max_per_address: int, max_anonymous_per_address: int,
                   anonymous_rate: str, connect_rate: str,
                   anonymous_connect_rate: str) -> ConnectionLimits:
        """The limits of the ``keyload serve`` flags of these names; a rate is ``N/S``
        (``N`` per ``S`` seconds). ValueError names the flag that is wrong."""
        rate = rate_flag("--anonymous-rate", anonymous_rate)
        return cls(handshake_timeout=handshake_timeout, head_timeout=head_timeout,
                   body_timeout=body_timeout, authorized=max_connections,
                   anonymous=max_anonymous, per_peer=max_per_address,
                   anonymous_per_peer=max_anonymous_per_address, anonymous_rate=rate,
                   connect_rate=rate_flag("--connect-rate", connect_rate),
                   anonymous_connect_rate=rate_flag("--anonymous-connect-rate",
                                                    anonymous_connect_rate))


#: The ``keyload serve`` flags of :meth:`ConnectionLimits.from_flags`, in the order its
#: ``--help`` lists them: (name, type, default, metavar, what it limits).
LIMIT_FLAGS: tuple[tuple[str, type[Any], float | int | str, str, str], ...] = (
    ("handshake_timeout", float, 10.0, "S",
     "a TLS handshake not done S seconds after accept is dropped (10)"),
    ("head_timeout", float, 10.0, "S", "a request head not complete S seconds after its first "
     "byte (or the handshake) is answered 408 and the connection closed (10)"),
    ("body_timeout", float, 10.0, "S",
     "a request body not complete S seconds after its head: 408 (10)"),
    ("max_connections", int, 4096, "N",
     "connections with an authorized client certificate (4096)"),
    ("max_anonymous", int, 1024, "N",
     "connections without one; when full, the oldest is closed (1024)"),
    ("max_per_address", int, 256, "N", "open sockets from one address, TLS handshakes "
     "included, an IPv6 /64 counting as one; more are closed before TLS (256)"),
    ("anonymous_connect_rate", str, "30/60", "N/S", "connections without an authorized "
     "certificate per S seconds from one address; past it the address is refused before TLS "
     "until the window lets one more in (30/60)"),
    ("connect_rate", str, "200/10", "N/S", "new connections per S seconds from one address; "
     "more are closed before TLS (200/10)"),
    ("max_anonymous_per_address", int, 8, "N", "of which without an authorized certificate (8)"),
    ("anonymous_rate", str, "20/1", "N/S", "requests per S seconds from one address without "
     "an authorized certificate, health probes included (20/1)"))


def rate_flag(flag: str, value: str) -> Rate:
    """``N/S`` (or ``N``: per second) given for ``flag``."""
    try:
        limit, _, window = value.partition("/")
        rate = Rate(int(limit), float(window or 1))
    except ValueError:
        raise ValueError(f"{flag}: N/SECONDS, e.g. 20/1") from None
    if rate.limit < 1 or not 0.001 <= rate.window_s <= 86400:
        raise ValueError(f"{flag}: N >= 1 per 0.001..86400 s")
    return rate


@functools.lru_cache(maxsize=4096)
def peer_of(host: str | None) -> str:
    """The address a limit counts by: IPv4 as is, IPv6 by its /64 (one host has many)."""
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class Doorway:
    """Admission before the TLS handshake, by address: at most ``per_peer`` open sockets
    (handshakes included: every one is a descriptor and may cost a handshake) and
    ``connect_rate`` new connections. A socket refused here is closed at once, before
    the server spends anything on it (no answer can be sent before TLS)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.open: dict[str, int] = {}
        self._rates = MemoryRates()
        self._anonymous = MemoryRates()
        self.refused = 0

    def enter(self, peer: str, now: float) -> bool:
        lim = self.limits
        if self.open.get(peer, 0) >= lim.per_peer or \
                self._anonymous.retry_after(peer, lim.anonymous_connect_rate, now) > 0 or \
                not self._rates.hit(peer, lim.connect_rate, now):
            self.refused += 1
            return False
        self.open[peer] = self.open.get(peer, 0) + 1
        return True

    def anonymous(self, peer: str, now: float) -> bool:
        """Charge a connection that turned out to have no authorized certificate to its
        address; False when the address is over ``anonymous_connect_rate`` (a handshake
        already under way when the budget ran out)."""
        return self._anonymous.hit(peer, self.limits.anonymous_connect_rate, now)

    def leave(self, peer: str) -> None:
        _dec(self.open, peer)


class Connections:
    """Open connections by pool and address (one event loop: no locking)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.anonymous_per_peer: dict[str, int] = {}
        self.anonymous: OrderedDict[object, str] = OrderedDict()  # oldest first
        self.authorized: dict[object, str] = {}
        self.refused = 0
        self.evicted = 0

    def admit(self, conn: object, peer: str, authorized: bool) -> tuple[str, list[object]]:
        """``("", evict)`` to keep ``conn`` (closing ``evict`` first), else the reason it
        is refused: ``"peer"`` (its address has too many anonymous ones) or ``"full"``
        (the authorized pool is). Sockets per address are the :class:`Doorway`'s."""
        lim = self.limits
        evict: list[object] = []
        if authorized:
            if len(self.authorized) >= lim.authorized:
                self.refused += 1
                return "full", []
            self.authorized[conn] = peer
        else:
            if self.anonymous_per_peer.get(peer, 0) >= lim.anonymous_per_peer:
                self.refused += 1
                return "peer", []
            if len(self.anonymous) >= lim.anonymous:
                old, _ = next(iter(self.anonymous.items()))
                self.release(old)
                evict.append(old)
                self.evicted += 1
            self.anonymous[conn] = peer
            self.anonymous_per_peer[peer] = self.anonymous_per_peer.get(peer, 0) + 1
        return "", evict

    def release(self, conn: object) -> None:
        peer = self.anonymous.pop(conn, None)
        if peer is not None:
            _dec(self.anonymous_per_peer, peer)
        else:
            self.authorized.pop(conn, None)

    def counts(self) -> dict[str, int]:
        return {"authorized": len(self.authorized), "anonymous": len(self.anonymous),
                "refused": self.refused, "evicted": self.evicted}



def _dec(d: dict[str, int], k: str) -> None:
    n = d.get(k, 0) - 1
    if n > 0:
        d[k] = n
    else:
        d.pop(k, None)


@dataclass
class _Minute:
    requests: int = 0
    status: dict[str, int] = field(default_factory=dict)
    routes: dict[str, int] = field(default_factory=dict)
    clients: set[str] = field(default_factory=set)


class AnonymousAudit:
    """Anonymous requests and connection-level answers, counted per address and minute;
    :meth:`due` gives one audit record per (address, minute) once the minute is over.
    At most ``max_peers`` addresses a minute are kept apart; the rest are counted
    together as ``"other"``, so the records per minute are bounded."""

    MAX_CLIENTS = 8  # certificate CNs named in one record (unauthorized ones)

    def __init__(self, *, max_peers: int = 1024) -> None:
        self.max_peers = max_peers
        self._m: dict[tuple[int, str], _Minute] = {}
        self._peers: dict[int, int] = {}  # minute -> addresses kept apart

    def note(self, peer: str, route: str, status: int, *, client: str | None = None,
             now: float | None = None) -> None:
        minute = int((time.time() if now is None else now) // 60)
        key = (minute, peer)
        m = self._m.get(key)
        if m is None:
            if self._peers.get(minute, 0) >= self.max_peers:
                key = (minute, "other")
                m = self._m.get(key)
            else:
                self._peers[minute] = self._peers.get(minute, 0) + 1
            if m is None:
                m = self._m[key] = _Minute()
        m.requests += 1
        s = str(status)
        m.status[s] = m.status.get(s, 0) + 1
        m.routes[route] = m.routes.get(route, 0) + 1
        if client is not None and len(m.clients) < self.MAX_CLIENTS:
            m.clients.add(client[:64])

    def due(self, now: float | None = None, *, everything: bool = False) -> list[dict[str, Any]]:
        """The records of minutes that are over (of every minute with ``everything``),
        removed from what is kept."""
        current = int((time.time() if now is None else now) // 60)
        out = []
        for (minute, peer) in sorted(k for k in self._m if everything or k[0] < current):
            m = self._m.pop((minute, peer))
            rec: dict[str, Any] = {
                "peer": peer, "minute": time.strftime("%Y-%m-%dT%H:%MZ",
                                                      time.gmtime(minute * 60)),
                "requests": m.requests, "status": dict(sorted(m.status.items())),
                "routes": dict(sorted(m.routes.items()))}
            if m.clients:
                rec["clients"] = sorted(m.clients)
            out.append(rec)
        for minute in [k for k in self._peers if everything or k < current]:
            del self._peers[minute]
        return out

    def __len__(self) -> int:
        return len(self._m)


__all__ = ["AnonymousAudit", "ConnectionLimits", "Connections", "Doorway", "peer_of"]
