"""The service's authorization policy and limits: which client may ask for what.

A JSON file (``keyload serve --policy FILE``)::

    {
      "limits": {"max_body": 4096,
                 "per_client": {"limit": 100, "window_s": 1},
                 "per_sn": {"limit": 10, "window_s": 60}},
      "clients": {
        "terminal-0042": {"sets": ["7b568eb721"], "ref1": ["TMK-1", "0x504e"],
                          "sha256": "…optional fingerprint pin…",
                          "per_client": {"limit": 20, "window_s": 1}},
        "monitoring":    {"sets": [], "ref1": [], "metrics": true}
      },
      "deny": {"sha256": ["…64 hex digits: a lost terminal's certificate…"],
               "serials": ["0x3a0f9c…"]}
    }

A client is named by the CN of its (CA-verified) TLS client certificate; ``sha256``, when
given, also pins that exact certificate. ``sets`` and ``ref1`` list what it may ask the
authority for (``"any"`` must be written out: there is no default). REF1 uses the CLI's
notation: ASCII text or ``0x``-hex. ``metrics``: may read ``/v1/metrics`` (false by
default). The authority's own export policy (per key: sets, slots) applies on top of this.

``deny`` (optional) cuts certificates off whatever their CN: ``sha256`` lists certificate
fingerprints (SHA-256 of the DER, as :func:`keyload.service.pki.fingerprint` gives them),
``serials`` certificate serial numbers in hex (``0x`` optional, any case).
:meth:`Policy.revoked` says whether a certificate is denied; the server asks it for every
verified client certificate, before :meth:`Policy.client`.

Unknown fields and repeated keys are refused, so that a typo never widens access
silently. ``keyload serve --check-policy FILE`` checks a file and prints
:meth:`Policy.summary`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..core.ref1 import parse_ref1

ANY = "any"


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``limit`` requests per fixed window of ``window_s`` seconds."""

    limit: int
    window_s: float

    @classmethod
    def parse(cls, d: Any, where: str) -> Rate:
        if not isinstance(d, dict) or set(d) != {"limit", "window_s"}:
            raise ValueError(f"{where}: expected {{\"limit\": N, \"window_s\": S}}")
        limit, window = d["limit"], d["window_s"]
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"{where}.limit: a positive integer")
        if not isinstance(window, int | float) or isinstance(window, bool) or \
                not 0.001 <= window <= 86400:
            raise ValueError(f"{where}.window_s: seconds in 0.001..86400")
        return cls(limit, float(window))


@dataclass(frozen=True, slots=True)
class Limits:
    max_body: int = 4096
    per_client: Rate = Rate(100, 1.0)
    per_sn: Rate = Rate(10, 60.0)


@dataclass(frozen=True, slots=True)
class ClientRule:
    name: str
    sets: frozenset[bytes] | None  # None: any set
    ref1s: frozenset[bytes] | None  # None: any REF1
    sha256: str | None = None
    metrics: bool = False
    per_client: Rate | None = None

    def allows_set(self, set_id: bytes) -> bool:
        return self.sets is None or set_id in self.sets

    def allows_ref1(self, ref1: bytes) -> bool:
        return self.ref1s is None or ref1 in self.ref1s


@dataclass(frozen=True, slots=True)
class Policy:
    clients: dict[str, ClientRule] = field(default_factory=dict)
    limits: Limits = Limits()
    deny_sha256: frozenset[str] = frozenset()  # lower-case hex fingerprints
    deny_serials: frozenset[int] = frozenset()
    sha256: str | None = None  # of the file's bytes, when loaded from a file

    def revoked(self, sha256: str, serial: int) -> bool:
        """True when the certificate with this fingerprint (SHA-256 of its DER, hex) or
        this serial number is on the deny list: refuse it, whatever its CN."""
        return sha256.lower() in self.deny_sha256 or serial in self.deny_serials

    def summary(self) -> dict[str, Any]:
        """What the policy says, JSON-able and without secrets (no fingerprint is listed,
        only how many are denied)."""
        def rate(r: Rate) -> dict[str, Any]:
            return {"limit": r.limit, "window_s": r.window_s}

        return {
            "sha256": self.sha256,
            "clients": len(self.clients),
            "client_names": sorted(self.clients),
            "metrics_clients": sorted(n for n, r in self.clients.items() if r.metrics),
            "pinned_clients": sorted(n for n, r in self.clients.items() if r.sha256),
            "denied_sha256": len(self.deny_sha256),
            "denied_serials": len(self.deny_serials),
            "limits": {"max_body": self.limits.max_body,
                       "per_client": rate(self.limits.per_client),
                       "per_sn": rate(self.limits.per_sn),
                       "per_client_overrides": {n: rate(r.per_client)
                                                for n, r in sorted(self.clients.items())
                                                if r.per_client is not None}},
        }

    def summary_rows(self) -> list[tuple[str, str]]:
        """:meth:`summary` as (name, text) rows, for people."""
        s = self.summary()
        lim = s["limits"]

        def rate(r: dict[str, Any]) -> str:
            return f"{r['limit']} per {r['window_s']:g} s"

        names = ", ".join(s["client_names"]) or "(none)"
        rows = [("sha256", s["sha256"]),
                ("clients", f"{s['clients']}: {names}"),
                ("metrics", ", ".join(s["metrics_clients"]) or "(none)"),
                ("pinned", ", ".join(s["pinned_clients"]) or "(none)"),
                ("deny", f"{s['denied_sha256']} certificate fingerprint(s), "
                         f"{s['denied_serials']} serial number(s)"),
                ("max_body", f"{lim['max_body']} bytes"),
                ("per_client", rate(lim["per_client"])),
                ("per_sn", rate(lim["per_sn"]))]
        return rows + [(f"per_client {n}", rate(r))
                       for n, r in lim["per_client_overrides"].items()]

    def client(self, name: str, sha256: str) -> ClientRule | None:
        """The rule for a verified certificate, or None when it is not authorized."""
        rule = self.clients.get(name)
        if rule is None:
            return None
        if rule.sha256 is not None and rule.sha256 != sha256:
            return None
        return rule

    @classmethod
    def load(cls, path: Path) -> Policy:
        """The policy in a file; its ``sha256`` is the digest of the file's bytes.
        ValueError names the file and the path in the document of what is wrong."""
        data = path.read_bytes()
        try:
            doc = json.loads(data, object_pairs_hook=_no_repeats)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not JSON (not UTF-8 text)") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        try:
            policy = cls.from_json(doc)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return replace(policy, sha256=hashlib.sha256(data).hexdigest())

    @classmethod
    def from_json(cls, doc: Any, *, where: str = "policy") -> Policy:
        if not isinstance(doc, dict) or not set(doc) <= {"clients", "limits", "deny"}:
            raise ValueError(f"{where}: expected an object with 'clients' and 'limits' "
                             f"(and optionally 'deny')")
        lim = doc.get("limits", {})
        if not isinstance(lim, dict) or not set(lim) <= {"max_body", "per_client", "per_sn"}:
            raise ValueError(f"{where}.limits: only max_body, per_client, per_sn")
        d = Limits()
        max_body = lim.get("max_body", d.max_body)
        if not isinstance(max_body, int) or isinstance(max_body, bool) or \
                not 256 <= max_body <= 1 << 20:
            raise ValueError(f"{where}.limits.max_body: bytes in 256..1048576")
        limits = Limits(
            max_body,
            Rate.parse(lim["per_client"], f"{where}.limits.per_client")
            if "per_client" in lim else d.per_client,
            Rate.parse(lim["per_sn"], f"{where}.limits.per_sn") if "per_sn" in lim else d.per_sn)
        clients = doc.get("clients", {})
        if not isinstance(clients, dict):
            raise ValueError(f"{where}.clients: an object, client CN -> rule")
        rules = {name: _rule(name, c, f"{where}.clients.{name}") for name, c in clients.items()}
        deny_sha256, deny_serials = _deny(doc.get("deny", {}), f"{where}.deny")
        return cls(rules, limits, deny_sha256, deny_serials)


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"{k!r} given twice in one object")
        out[k] = v
    return out


HEX = frozenset("0123456789abcdef")


def _is_fingerprint(v: Any) -> bool:
    """A certificate's SHA-256 fingerprint: 64 hex digits, either case."""
    return isinstance(v, str) and len(v) == 64 and set(v.lower()) <= HEX


def _deny(d: Any, where: str) -> tuple[frozenset[str], frozenset[int]]:
    if not isinstance(d, dict) or not set(d) <= {"sha256", "serials"}:
        raise ValueError(f"{where}: an object with 'sha256' and/or 'serials' (lists)")
    shas, serials = d.get("sha256", []), d.get("serials", [])
    if not isinstance(shas, list):
        raise ValueError(f"{where}.sha256: a list of certificate fingerprints (64 hex digits)")
    if not isinstance(serials, list):
        raise ValueError(f"{where}.serials: a list of certificate serial numbers (hex)")
    fps: set[str] = set()
    for i, fp in enumerate(shas):
        if not _is_fingerprint(fp):
            raise ValueError(f"{where}.sha256[{i}]: 64 hex digits")
        fps.add(fp.lower())
    nums: set[int] = set()
    for i, sv in enumerate(serials):
        digits = sv[2:] if isinstance(sv, str) and sv[:2].lower() == "0x" else sv
        if not isinstance(digits, str) or not 1 <= len(digits) <= 64 or \
                not set(digits.lower()) <= HEX or int(digits, 16) >= 1 << 160:
            raise ValueError(f"{where}.serials[{i}]: a serial number in hex (a string of "
                             f"hex digits, optional 0x; at most 20 bytes, RFC 5280)")
        nums.add(int(digits, 16))
    return frozenset(fps), frozenset(nums)


def _rule(name: str, c: Any, where: str) -> ClientRule:
    allowed = {"sets", "ref1", "sha256", "metrics", "per_client"}
    if not isinstance(c, dict) or not set(c) <= allowed or "sets" not in c or "ref1" not in c:
        raise ValueError(f"{where}: needs 'sets' and 'ref1' (lists, or \"any\"); "
                         f"optional 'sha256', 'metrics', 'per_client'")
    sets: frozenset[bytes] | None
    if c["sets"] == ANY:
        sets = None
    elif isinstance(c["sets"], list):
        try:
            sets = frozenset(bytes.fromhex(str(s)) for s in c["sets"])
        except ValueError:
            raise ValueError(f"{where}.sets: set ids in hex") from None
        if any(len(s) != 5 for s in sets):
            raise ValueError(f"{where}.sets: a set id is 5 bytes (10 hex digits)")
    else:
        raise ValueError(f"{where}.sets: a list of set ids, or \"any\"")
    ref1s: frozenset[bytes] | None
    if c["ref1"] == ANY:
        ref1s = None
    elif isinstance(c["ref1"], list) and all(isinstance(x, str) for x in c["ref1"]):
        ref1s = frozenset(parse_ref1(x) for x in c["ref1"])
    else:
        raise ValueError(f"{where}.ref1: a list of REF1s (text or 0x-hex), or \"any\"")
    sha = c.get("sha256")
    if sha is not None and not _is_fingerprint(sha):
        raise ValueError(f"{where}.sha256: 64 hex digits")
    metrics = c.get("metrics", False)
    if not isinstance(metrics, bool):
        raise ValueError(f"{where}.metrics: true or false")
    rate = Rate.parse(c["per_client"], f"{where}.per_client") if "per_client" in c else None
    return ClientRule(name, sets, ref1s, None if sha is None else sha.lower(), metrics, rate)
