"""Campaign status, the ledger (who holds which key, with the unit's receipt) and reports
for people (HTML with a chart, tables) and programs (JSON, CSV)."""

from __future__ import annotations

import csv
import html
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import KeyloadError
from ..core.ref1 import display_ref1
from ..records.exportlog import ExportRecord
from ..records.ledger import (
    LEDGER_FIELDS,
    Export,
    KeyFacts,
    LedgerCheck,
    LedgerEntry,
    ReceiptChecker,
    verify_entries,
)
from ..units.authority import Authority
from ..units.storage import atomic_write
from .journal.model import FAILED, IMPORTED, Journal, PlannedLoad
from .records import LoadRecords
from .records import LoadRow as StationRow


def campaign_entries(journal: Journal, campaign: str) -> Iterator[LedgerEntry]:
    """A campaign's imported loads as ledger entries (reconciled ones without ``rct``)."""
    set_id = journal.campaign(campaign).set_id
    for row in journal.rows(campaign, [IMPORTED]):
        yield LedgerEntry("campaign", row.updated, row.ref1, row.version, row.suite, set_id,
                          row.sn, row.r, row.ref2, row.header, row.kcv, row.rct,
                          campaign=row.campaign, station=row.station,
                          reconciled=row.reconciled, e_a=row.e_a, c_u=row.c_u)


def station_entry(row: StationRow) -> LedgerEntry:
    """A single load the station recorded (``station.db``) as a ledger entry."""
    return LedgerEntry("station", row.time, row.ref1, row.key_version, row.suite,
                       row.set_id or b"", row.sn, row.r, row.ref2, row.header, row.kcv,
                       row.rct, station=row.station, e_a=row.e_a, c_u=row.c_u)


def station_entries(records: LoadRecords) -> Iterator[LedgerEntry]:
    """The single loads ``station.db`` recorded as loaded, as ledger entries."""
    return (station_entry(row) for row in records.rows() if row.status == "loaded")


def ledger(journal: Journal, campaign: str) -> Iterator[dict[str, Any]]:
    """A campaign's ledger in the export's shape (:data:`LEDGER_FIELDS`)."""
    for e in campaign_entries(journal, campaign):
        yield e.to_row(display_ref1(e.ref1))


def verify_ledger(journal: Journal, campaign: str, checker: ReceiptChecker) -> LedgerCheck:
    """The authority verifies every receipt (docs/protocol.md §8), or an auditor those of
    suite 0x03 (§10.3). Reconciled loads whose receipt was lost in a crash are counted
    apart: the unit's slot status backs them."""
    return verify_entries(campaign_entries(journal, campaign), checker)


def invalid_rows(chk: LedgerCheck) -> list[dict[str, Any]]:
    """A campaign's or the station's invalid entries as rows (SN, REF2, REF1, why)."""
    return [{"sn": i.entry.sn.hex(), "ref2": i.entry.ref2, "ref1": display_ref1(i.entry.ref1),
             "reason": i.reason} for i in chk.invalid_entries]


def write_ledger_csv(entries: Iterable[dict[str, Any]], stream: io.TextIOBase | Any) -> int:
    """One header line, then the entries (campaigns' and the service's alike)."""
    w = csv.DictWriter(stream, fieldnames=LEDGER_FIELDS)
    w.writeheader()
    n = 0
    for e in entries:
        w.writerow(e)
        n += 1
    return n


@dataclass(frozen=True, slots=True)
class CampaignStatus:
    """Where a campaign stands: its plan and its loads by state (every state present)."""

    campaign: str
    set_id: bytes
    units: int
    loads: int
    states: dict[str, int]
    plan: tuple[PlannedLoad, ...]

    @property
    def done(self) -> bool:
        """Every planned load imported."""
        return self.states[IMPORTED] == self.loads

    def to_json(self) -> dict[str, Any]:
        return {"campaign": self.campaign, "set_id": self.set_id.hex(), "units": self.units,
                "loads": self.loads, "states": dict(self.states),
                "plan": [{"ref1": display_ref1(p.ref1), "ref2": p.ref2, "version": p.version}
                         for p in self.plan],
                "done": self.done}

    def rows(self) -> list[tuple[str, object]]:
        """The campaign and its loads by state, for people, as (name, value)."""
        return [("campaign", self.campaign), ("set", self.set_id.hex()), ("units", self.units),
                ("loads", self.loads)] + [(k, f"{v:,}") for k, v in self.states.items()]

    def line(self) -> str:
        return (f"{self.states['imported']:,} of {self.loads:,} loads imported, "
                f"{self.states['failed']:,} failed")


@dataclass(frozen=True, slots=True)
class FailureCount:
    """Loads failed for good with one status word (``-``: none) at one step."""

    sw: str
    step: str
    count: int


@dataclass(frozen=True, slots=True)
class FailedLoad:
    sn: bytes
    ref2: int
    ref1: bytes
    sw: str | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class Throughput:
    """Loads per second at ``t`` seconds after the campaign's first event."""

    t: float
    rate: float


@dataclass(frozen=True, slots=True)
class CampaignReport:
    """A campaign's status with its outcome: reconciliations, loads by station, failures
    by status word (and the first :data:`MAX_FAILURES` failed loads), throughput."""

    status: CampaignStatus
    reconciled: int
    by_station: dict[str, int]
    failures_by_sw: tuple[FailureCount, ...]
    failures: tuple[FailedLoad, ...]
    throughput: tuple[Throughput, ...]

    def to_json(self) -> dict[str, Any]:
        return {**self.status.to_json(), "reconciled": self.reconciled,
                "by_station": dict(self.by_station),
                "failures_by_sw": [{"sw": f.sw, "step": f.step, "count": f.count}
                                   for f in self.failures_by_sw],
                "failures": [{"sn": f.sn.hex(), "ref2": f.ref2, "ref1": display_ref1(f.ref1),
                              "sw": f.sw, "reason": f.reason} for f in self.failures],
                "throughput": [{"t": p.t, "rate": p.rate} for p in self.throughput]}


MAX_FAILURES = 1000
"""Failed loads listed one by one in a report (all are counted by status word)."""


def status(journal: Journal, campaign: str) -> CampaignStatus:
    camp = journal.campaign(campaign)
    counts = journal.counts(campaign)
    return CampaignStatus(campaign, camp.set_id, camp.units, sum(counts.values()), counts,
                          camp.plan)


def build_report(journal: Journal, campaign: str) -> CampaignReport:
    st = status(journal, campaign)
    by_sw: Counter[tuple[str, str]] = Counter()
    failures: list[FailedLoad] = []
    reconciled = 0
    by_station: Counter[str] = Counter()
    for row in journal.rows(campaign, [IMPORTED, FAILED]):
        if row.state == FAILED:
            by_sw[(row.sw or "-", (row.reason or "").split(":")[0])] += 1
            if len(failures) < MAX_FAILURES:
                failures.append(FailedLoad(row.sn, row.ref2, row.ref1, row.sw, row.reason))
        else:
            reconciled += int(row.reconciled)
            by_station[row.station or "-"] += 1
    return CampaignReport(st, reconciled, dict(by_station),
                          tuple(FailureCount(sw, step, n)
                                for (sw, step), n in by_sw.most_common()),
                          tuple(failures), tuple(_throughput(journal.events(campaign))))


def _throughput(events: list[tuple[float, str, int, int]]) -> list[Throughput]:
    """Loads/s over time, from each station's cumulative counters (per run)."""
    out: list[Throughput] = []
    last: dict[str, tuple[float, int]] = {}
    t0 = events[0][0] if events else 0.0
    for t, station, done, _ in events:
        prev = last.get(station)
        if prev is not None and done >= prev[1] and t > prev[0]:
            out.append(Throughput(round(t - t0, 3), (done - prev[1]) / (t - prev[0])))
        last[station] = (t, done)
    return out


def _svg_chart(series: Sequence[Throughput], width: int = 720, height: int = 220) -> str:
    if not series:
        return "<p>No throughput samples yet.</p>"
    tmax = max(p.t for p in series) or 1.0
    rmax = max(p.rate for p in series) or 1.0
    pad = 40
    pts = " ".join(f"{pad + (width - 2 * pad) * p.t / tmax:.1f},"
                   f"{height - pad - (height - 2 * pad) * p.rate / rmax:.1f}" for p in series)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'role="img" aria-label="loads per second over time">'
            f'<rect width="100%" height="100%" fill="#fff"/>'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
            f'stroke="#444"/><line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" '
            f'stroke="#444"/><polyline fill="none" stroke="#1f6feb" stroke-width="2" '
            f'points="{pts}"/><text x="{pad}" y="{pad - 8}" font-size="12">'
            f'{rmax:,.0f} loads/s</text><text x="{width - pad}" y="{height - pad + 16}" '
            f'font-size="12" text-anchor="end">{tmax:,.0f} s</text></svg>')


def render_html(rep: CampaignReport) -> str:
    e = html.escape
    st = rep.status
    states = "".join(f"<tr><td>{e(k)}</td><td>{v:,}</td></tr>" for k, v in st.states.items())
    fails = "".join(f"<tr><td>{e(str(f.sw))}</td><td>{e(f.step)}</td>"
                    f"<td>{f.count:,}</td></tr>" for f in rep.failures_by_sw) or \
        "<tr><td colspan=3>none</td></tr>"
    plan = "".join(f"<tr><td>{e(display_ref1(p.ref1))}</td><td>{p.ref2}</td>"
                   f"<td>{p.version}</td></tr>" for p in st.plan)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>keyload campaign {e(st.campaign)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px;
text-align:left}}th{{background:#f4f4f4}}</style></head><body>
<h1>Campaign {e(st.campaign)}</h1>
<p>Set {e(st.set_id.hex())}: {st.units:,} units, {st.loads:,} planned loads;
{st.states['imported']:,} imported ({rep.reconciled:,} reconciled with the unit after
an interruption), {st.states['failed']:,} failed. {'Complete.' if st.done else ''}</p>
<h2>Plan</h2><table><tr><th>REF1</th><th>REF2</th><th>version</th></tr>{plan}</table>
<h2>Loads by state</h2><table><tr><th>state</th><th>loads</th></tr>{states}</table>
<h2>Failures by status word</h2><table><tr><th>SW</th><th>step</th><th>count</th></tr>{fails}
</table><h2>Throughput</h2>{_svg_chart(rep.throughput)}
</body></html>
"""


def write_report(rep: CampaignReport, out_dir: Path) -> list[Path]:
    """The report as ``NAME.json`` (:meth:`CampaignReport.to_json`), ``NAME.csv`` (loads by
    state, failures by status word) and ``NAME.html``, in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = rep.status.campaign
    paths = [out_dir / f"{name}.json", out_dir / f"{name}.csv", out_dir / f"{name}.html"]
    atomic_write(paths[0], json.dumps(rep.to_json(), indent=1).encode(), mode=0o644)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["state", "loads"])
    for k, v in rep.status.states.items():
        w.writerow([k, v])
    w.writerow([])
    w.writerow(["sw", "step", "count"])
    for f in rep.failures_by_sw:
        w.writerow([f.sw, f.step, f.count])
    atomic_write(paths[1], buf.getvalue().encode(), mode=0o644)
    atomic_write(paths[2], render_html(rep).encode(), mode=0o644)
    return paths


# -- receipts against the authority's export records (``keyload receipts``) -------------
@dataclass
class ReceiptsCheck:
    """Every receipt checked against the export it claims and by the authority's MAC;
    the exports left with neither a receipt nor a reconciliation."""

    verified: int = 0
    invalid: int = 0
    reconciled: int = 0
    invalid_rows: list[dict[str, Any]] = field(default_factory=list)
    without_receipt: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """What ``keyload receipts --json`` prints."""
        return {"verified": self.verified, "invalid": self.invalid,
                "invalid_rows": self.invalid_rows, "reconciled": self.reconciled,
                "exports_without_receipt": len(self.without_receipt),
                "without_receipt": self.without_receipt}

    def lines(self) -> list[str]:
        """What ``keyload receipts`` prints."""
        lost = self.without_receipt
        return [*(f"INVALID receipt: {row['source']} unit {row['sn']} slot {row['ref2']} "
                  f"{row['ref1']}: {row['reason']}" for row in self.invalid_rows),
                *(f"export without receipt: unit {e['sn']} slot {e['ref2']} {e['ref1']} "
                  f"v{e['key_version']} KCV {e['kcv']} ({e['station'] or 'nothing recorded'})"
                  for e in lost),
                *([f"{len(lost)} exports without receipt"] if lost else []),
                *([f"{self.reconciled} loads reconciled with the unit after a crash: receipt "
                   "lost, slot status recorded"] if self.reconciled else []),
                f"{self.verified} receipts verified, {self.invalid} invalid"]


def _download(set_id: bytes, sn: bytes, ref1: bytes, ref2: int, kcv: bytes | None) -> tuple[
        bytes, bytes, bytes, int, bytes | None]:
    return set_id, sn, ref1, ref2, kcv


class _Exports:
    """The export records by download (set, SN, REF1, REF2, KCV), each taken once."""

    def __init__(self, records: Iterable[ExportRecord]) -> None:
        self.records = list(records)
        self.taken = [False] * len(self.records)
        self.by_download: dict[tuple[Any, ...], list[int]] = {}
        for i, e in enumerate(self.records):
            self.by_download.setdefault(_download(e.set_id, e.sn, e.ref1, e.ref2, e.kcv),
                                        []).append(i)

    def take(self, key: tuple[Any, ...], t: float) -> ExportRecord | None:
        """The latest export of ``key`` not taken yet made at or before ``t`` (else the
        earliest not taken): a retried download's receipt goes with its last export."""
        free = [i for i in self.by_download.get(key, ()) if not self.taken[i]]
        if not free:
            return None
        before = [i for i in free if self.records[i].time <= t]
        i = before[-1] if before else free[0]
        self.taken[i] = True
        return self.records[i]

    def export_of(self, e: LedgerEntry) -> Export | None:
        """The export ``e`` claims, taken (the authority records no header nor client)."""
        x = self.take(e.download, e.time or 0.0)
        return None if x is None else Export(
            x.set_id, x.ref1, x.ref2, x.suite, x.key_version, x.kcv,
            recorded=("set_id", "ref1", "ref2", "suite", "kcv", "key_version"),
            c_u=x.c_u, e_a=x.e_a)

    def left(self) -> Iterator[ExportRecord]:
        return (e for e, taken in zip(self.records, self.taken, strict=True) if not taken)


def key_facts(authority: Authority) -> Callable[[bytes], KeyFacts | None]:
    """The authority's keys as they are now, by REF1 (None: the key is gone: its
    receipts' MACs still count)."""
    def facts(ref1: bytes) -> KeyFacts | None:
        try:
            info = authority.backend.key_info(ref1)
        except KeyloadError:
            return None
        return KeyFacts(info.version, int(info.key_type), info.length, info.attrs.usage,
                        info.attrs.mode, info.attrs.exportability)
    return facts


def check_receipts(receipts: Iterable[LedgerEntry], exports: Iterable[ExportRecord],
                   authority: Authority, *, accounted: Iterable[tuple[Any, ...]] = (),
                   failures: dict[tuple[bytes, bytes, int], str] | None = None
                   ) -> ReceiptsCheck:
    """Check every receipt (reconciled loads, ``rct`` None, are counted apart) against
    the authority's export records and MAC (:func:`~keyload.records.ledger.verify_entries`);
    list the exports left over.

    The MAC binds SN, R, REF2, H and the KCV; the export record binds the rest to what
    the authority sent: set, REF1, suite and key version (the one in H and the row's
    own column), and H's key type, length, usage, mode and exportability to the key's
    while it is still at that version.

    ``accounted``: downloads (set, SN, REF1, REF2, KCV) whose receipt is kept and
    checked elsewhere (the service's ledger). ``failures``: what the station recorded
    for a download that did not end in a receipt, by (SN, REF1, REF2), shown with the
    exports left over."""
    ex = _Exports(exports)
    for key in accounted:
        ex.take(key, float("inf"))
    chk = verify_entries(sorted(receipts, key=lambda x: x.time or 0.0), authority,
                         export_of=ex.export_of, matched_by="unit, slot, key and KCV",
                         key_now=key_facts(authority))
    out = ReceiptsCheck(chk.verified, chk.invalid, chk.reconciled, [
        {"source": i.entry.label, "sn": i.entry.sn.hex(), "ref2": i.entry.ref2,
         "ref1": display_ref1(i.entry.ref1), "reason": i.reason}
        for i in chk.invalid_entries])
    for e in ex.left():
        out.without_receipt.append({
            "time": e.time, "set_id": e.set_id.hex(), "sn": e.sn.hex(),
            "ref1": display_ref1(e.ref1), "ref2": e.ref2, "suite": e.suite,
            "key_version": e.key_version, "kcv": e.kcv.hex().upper(),
            "station": (failures or {}).get((e.sn, e.ref1, e.ref2))})
    return out
