"""What the dashboard shows, gathered from a home's records as one JSON document
(``GET /api/state``), read-only and without any secret.

- ``campaigns``: each campaign of the journal (the home's ``journal.db`` or the one
  named), from :func:`keyload.station.report.build_report`: its loads by state, loads/s
  over time (the stations' counters), the rate now and the ETA, failures by status word
  and by station, and the failing SNs with their reasons;
- ``ledger``: the campaigns' receipts checked without the authority (suite 0x03 by the
  unit's signature, its C_U not checked against a Q_CA; suites 0x01/0x02, MACs under the
  set's keys, counted as not checked without the authority), and the service's exports
  without a receipt by age when the home has a ``service.db``;
- ``audit``: the home's hash chain verified, or the record where it breaks;
- ``service``: with ``--service URL``, its ``/v1/health`` and, with a client certificate
  the service's policy lets read metrics, requests and refusals per second from
  ``/v1/metrics`` between two reads.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.errors import KeyloadError
from ..records.ledger import CertificatesOnly
from ..service.client import ServiceClient
from ..service.ledger import exports_without_receipt, open_service_state, verify_audit
from ..station.home import Home
from ..station.journal.model import Journal
from ..station.plan import open_home_journal
from ..station.report import build_report
from ..station.verify import verify_campaigns

#: Throughput samples averaged for the rate now (and the ETA).
RECENT = 5
#: Invalid receipts listed one by one (all are counted).
MAX_ROWS = 100


def failures_by_station(events: list[tuple[float, str, int, int]]) -> dict[str, int]:
    """Loads failed for good by station, from the stations' counters (a failed load's
    row keeps no station): each run counts from zero, so a station's total is the sum of
    its runs' last counts (a run ends where a counter goes down). Between two events a
    station's latest failures are not counted yet."""
    total: Counter[str] = Counter()
    last: dict[str, tuple[int, int]] = {}
    for _, station, done, failed in events:
        prev = last.get(station)
        if prev is not None and (done < prev[0] or failed < prev[1]):
            total[station] += prev[1]
        last[station] = (done, failed)
    for station, (_, failed) in last.items():
        total[station] += failed
    return {s: n for s, n in total.most_common() if n}


def campaign_state(journal: Journal, name: str) -> dict[str, Any]:
    """One campaign: its report's JSON, with ``failures_by_station``, ``rate`` (loads/s
    over the last samples; None before two samples) and ``eta_s`` (seconds to the last
    open load at that rate; None without a rate, 0 when nothing is open)."""
    rep = build_report(journal, name).to_json()
    by_station = failures_by_station(journal.events(name))
    states = rep["states"]
    remaining = rep["loads"] - states["imported"] - states["failed"]
    recent = [p["rate"] for p in rep["throughput"][-RECENT:]]
    rate = sum(recent) / len(recent) if recent else None
    eta = 0.0 if remaining == 0 else (round(remaining / rate, 1) if rate else None)
    return {**rep, "failures_by_station": by_station,
            "remaining": remaining, "rate": rate, "eta_s": eta}


def ledger_state(home: Home, journal: Journal | None, names: list[str],
                 now: float) -> dict[str, Any]:
    chk = verify_campaigns(journal, names, CertificatesOnly({}))
    out: dict[str, Any] = {
        "receipts_verified": chk.verified, "receipts_invalid": chk.invalid,
        "not_checked_without_authority": chk.unverifiable,
        "reconciled_without_receipt": chk.reconciled,
        "invalid_rows": chk.invalid_rows[:MAX_ROWS], "service": None}
    store = open_service_state(None, home.root, home.audit_path)
    if store is not None:
        try:
            wr = exports_without_receipt(store.unreceipted_exports(), now)
            out["service"] = {"entries": len(store.ledger()), **wr.to_json()}
        finally:
            store.close()
    return out


def audit_state(home: Home) -> dict[str, Any]:
    """``verified`` (every record chained), ``broken`` (at the first problem's record)
    or ``none`` (no audit log yet)."""
    if not home.audit_path.exists():
        return {"state": "none", "records": 0, "problems": []}
    n, problems = verify_audit(None, home.audit_path, home.audit)
    return {"state": "broken" if problems else "verified", "records": n,
            "broken_at": problems[0].seq if problems else None,
            "problems": [{"seq": p.seq, "problem": p.problem} for p in problems[:MAX_ROWS]]}


_SAMPLE = re.compile(r'^keyload_requests_total\{[^}]*status="(\d+)"[^}]*\} (\d+)$', re.M)


class ServiceProbe:
    """A running service read over HTTPS: ``/v1/health`` (anyone) and ``/v1/metrics``
    (a client the policy lets read metrics: ``cert`` and ``key``). Rates are counted
    between two reads of the counters, so the first read has none."""

    def __init__(self, url: str, *, ca: Path, cert: Path | None = None,
                 key: Path | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.client = ServiceClient(url, ca=ca, cert=cert, key=key, timeout=3.0)
        self.metrics = cert is not None
        self.clock = clock
        self._last: tuple[float, int, int] | None = None

    def read(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "health": "unreachable", "checks": {},
                               "requests_per_s": None, "refusals_per_s": None,
                               "requests": None, "refusals": None, "error": None}
        try:
            h = self.client.request("GET", "/v1/health")
            out["health"] = "ok" if h.status == 200 else "unavailable"
            out["checks"] = h.problem().get("checks", {}) if h.status == 200 else {}
            if self.metrics:
                m = self.client.request("GET", "/v1/metrics")
                if m.status != 200:
                    out["error"] = f"metrics: {m.describe()}"
                else:
                    self._counters(m.body.decode(errors="replace"), out)
        except KeyloadError as e:
            out["error"] = " ".join(str(e).split())[:200]
        return out

    def _counters(self, text: str, out: dict[str, Any]) -> None:
        samples = [(int(s), int(n)) for s, n in _SAMPLE.findall(text)]
        total = sum(n for _, n in samples)
        refused = sum(n for s, n in samples if s >= 400)
        now = self.clock()
        out["requests"], out["refusals"] = total, refused
        if self._last is not None and now > self._last[0]:
            dt = now - self._last[0]
            out["requests_per_s"] = round((total - self._last[1]) / dt, 3)
            out["refusals_per_s"] = round((refused - self._last[2]) / dt, 3)
        self._last = (now, total, refused)

    def close(self) -> None:
        self.client.close()


class Gatherer:
    """The whole state of one home, made at most once per ``min_interval`` seconds
    whoever asks (every open page polls)."""

    def __init__(self, home: Home, *, journal: str | None = None,
                 service: ServiceProbe | None = None, min_interval: float = 0.5,
                 clock: Callable[[], float] = time.time) -> None:
        self.home, self.journal, self.service = home, journal, service
        self.min_interval, self.clock = min_interval, clock
        self._lock = threading.Lock()
        self._made: tuple[float, dict[str, Any]] | None = None

    def state(self) -> dict[str, Any]:
        with self._lock:
            now = self.clock()
            if self._made is None or now - self._made[0] >= self.min_interval:
                self._made = (now, self.gather(now))
            return self._made[1]

    def gather(self, now: float) -> dict[str, Any]:
        home = self.home
        journal = None
        if self.journal is not None or home.journal_path.exists():
            journal = open_home_journal(home, self.journal, create=False)
        try:
            names = journal.campaigns() if journal is not None else []
            campaigns = [campaign_state(journal, n) for n in names] if journal else []
            ledger = ledger_state(home, journal, names, now)
        finally:
            if journal is not None:
                journal.close()
        return {"time": now, "home": str(home.root), "campaigns": campaigns,
                "ledger": ledger, "audit": audit_state(home),
                "service": self.service.read() if self.service is not None else None}
