"""Campaign status, the ledger (who holds which key, with the unit's receipt) and reports
for people (HTML with a chart, tables) and programs (JSON, CSV)."""

from __future__ import annotations

import csv
import html
import io
import itertools
import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import SW
from ..core.ref1 import display_ref1
from ..records.ledger import (
    LEDGER_FIELDS,
    LedgerCheck,
    LedgerEntry,
    ReceiptChecker,
    verify_entries,
)
from ..units.storage import atomic_write
from .charts import Bar, bar_chart, nice_step, time_chart, utc
from .dukpt import campaign_initial_key
from .journal.model import FAILED, IMPORTED, Journal, PlannedLoad
from .records import LoadRecords
from .records import LoadRow as StationRow


def campaign_entries(journal: Journal, campaign: str) -> Iterator[LedgerEntry]:
    """A campaign's imported loads as ledger entries (reconciled ones without ``rct``)."""
    camp = journal.campaign(campaign)
    for row in journal.rows(campaign, [IMPORTED]):
        ik = campaign_initial_key(camp, row)
        yield LedgerEntry("campaign", row.updated, row.ref1, row.version, row.suite,
                          camp.set_id, row.sn, row.r, row.ref2, row.header, row.kcv, row.rct,
                          campaign=row.campaign, station=row.station,
                          reconciled=row.reconciled, e_a=row.e_a, c_u=row.c_u,
                          initial_key_id=None if ik is None else ik.value)


def station_entry(row: StationRow) -> LedgerEntry:
    """A single load the station recorded (``station.db``) as a ledger entry."""
    return LedgerEntry("station", row.time, row.ref1, row.key_version, row.suite,
                       row.set_id or b"", row.sn, row.r, row.ref2, row.header, row.kcv,
                       row.rct, station=row.station, e_a=row.e_a, c_u=row.c_u,
                       initial_key_id=row.initial_key_id)


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


def plan_json(p: PlannedLoad) -> dict[str, Any]:
    """A planned load for ``campaign status``: a BDK's says where its units' initial key
    IDs come from (the base, or ``"manifest"``) and the IK's type when not the BDK's."""
    out: dict[str, Any] = {"ref1": display_ref1(p.ref1), "ref2": p.ref2, "version": p.version}
    if p.initial_key_id_base is not None:
        out["initial_key_id_base"] = p.initial_key_id_base.hex().upper()
    elif p.initial_key:
        out["initial_key_ids"] = "manifest"
    if p.ik_type is not None:
        out["ik_type"] = p.ik_type.label
    return out


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
                "plan": [plan_json(p) for p in self.plan],
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
    attempts: int = 0
    time: float | None = None  # when it failed for good (UTC seconds)
    station: str | None = None  # the station it failed on (None: failed before this was kept)

    def to_json(self) -> dict[str, Any]:
        return {"sn": self.sn.hex(), "ref2": self.ref2, "ref1": display_ref1(self.ref1),
                "sw": self.sw, "meaning": sw_meaning(self.sw), "reason": self.reason,
                "attempts": self.attempts, "time": iso(self.time), "station": self.station}


@dataclass(frozen=True, slots=True)
class Throughput:
    """Loads per second in the ``width`` seconds from ``time`` (UTC seconds), ``t`` seconds
    after the first sample's start: ``loads`` imported then."""

    t: float
    rate: float
    time: float = 0.0
    width: float = 0.0
    loads: int = 0
    stretch: int = 0  # which active stretch (pauses between them: ``CampaignReport.pauses``)


@dataclass(frozen=True, slots=True)
class Pause:
    """No load imported from ``start`` to ``end`` (UTC seconds), longer than
    :data:`PAUSE_S`: the campaign was paused, interrupted or waiting for units."""

    start: float
    end: float


@dataclass(frozen=True, slots=True)
class StationThroughput:
    """One station's imports and mean loads/s over its active time (pauses left out; None
    when it imported too little to time). A failed load keeps no station."""

    station: str
    loads: int
    first: float | None
    last: float | None
    rate: float | None


@dataclass(frozen=True, slots=True)
class CampaignReport:
    """A campaign's status with its outcome: reconciliations, loads by station, failures
    by status word (and the first :data:`MAX_FAILURES` failed loads of ``failures_total``),
    throughput over time with its pauses, and by station."""

    status: CampaignStatus
    reconciled: int
    by_station: dict[str, int]
    failures_by_sw: tuple[FailureCount, ...]
    failures: tuple[FailedLoad, ...]
    throughput: tuple[Throughput, ...]
    failures_total: int = 0
    pauses: tuple[Pause, ...] = ()
    stations: tuple[StationThroughput, ...] = ()

    @property
    def failures_cut(self) -> bool:
        """Fewer failed loads listed than there are."""
        return len(self.failures) < self.failures_total

    def to_json(self) -> dict[str, Any]:
        return {**self.status.to_json(), "reconciled": self.reconciled,
                "by_station": dict(self.by_station),
                "failures_by_sw": [{"sw": f.sw, "step": f.step, "count": f.count,
                                    "meaning": sw_meaning(f.sw)}
                                   for f in self.failures_by_sw],
                "failures": [f.to_json() for f in self.failures],
                "failures_total": self.failures_total, "failures_cut": self.failures_cut,
                "throughput": [{"t": p.t, "rate": p.rate, "time": iso(p.time),
                                "width_s": p.width, "loads": p.loads,
                                "stretch": p.stretch}
                               for p in self.throughput],
                "pauses": [{"start": iso(p.start), "end": iso(p.end),
                            "seconds": round(p.end - p.start, 3)} for p in self.pauses],
                "stations": [{"station": s.station, "loads": s.loads,
                              "first": iso(s.first), "last": iso(s.last), "rate": s.rate}
                             for s in self.stations]}


MAX_FAILURES = 1000
"""Failed loads listed one by one in a report (all are counted by status word)."""

PAUSE_S = 30.0
"""No import for longer than this (seconds) is a pause: a gap in the throughput."""

BUCKETS = 60
"""About how many throughput samples a report draws over the campaign's active time."""


def iso(t: float | None) -> str | None:
    """UTC seconds as ISO 8601 with milliseconds (None stays None)."""
    return None if t is None else utc(t).isoformat(timespec="milliseconds")


def sw_meaning(sw: str | None) -> str:
    """What a status word stored as hex text means (``-``/None: no status word)."""
    if sw is None or sw == "-":
        return "no status word (transport, KCV, station)"
    try:
        return SW(int(sw, 16)).meaning
    except ValueError:
        return "unknown status word"


def status(journal: Journal, campaign: str) -> CampaignStatus:
    camp = journal.campaign(campaign)
    counts = journal.counts(campaign)
    return CampaignStatus(campaign, camp.set_id, camp.units, sum(counts.values()), counts,
                          camp.plan)


def build_report(journal: Journal, campaign: str) -> CampaignReport:
    """The report, from the loads' own rows: each import's time gives the throughput
    (a run of any length has samples, whatever its events)."""
    st = status(journal, campaign)
    by_sw: Counter[tuple[str, str]] = Counter()
    failures: list[FailedLoad] = []
    reconciled = 0
    by_station: Counter[str] = Counter()
    times: dict[str, list[float]] = {}
    for row in journal.rows(campaign, [IMPORTED, FAILED]):
        if row.state == FAILED:
            by_sw[(row.sw or "-", (row.reason or "").split(":")[0])] += 1
            if len(failures) < MAX_FAILURES:
                failures.append(FailedLoad(row.sn, row.ref2, row.ref1, row.sw, row.reason,
                                           row.attempts, row.updated, row.station))
        else:
            reconciled += int(row.reconciled)
            by_station[row.station or "-"] += 1
            if row.updated is not None:
                times.setdefault(row.station or "-", []).append(row.updated)
    series, pauses = throughput([t for ts in times.values() for t in ts])
    stations = tuple(_station(s, sorted(times.get(s, [])), n)
                     for s, n in sorted(by_station.items()))
    return CampaignReport(st, reconciled, dict(by_station),
                          tuple(FailureCount(sw, step, n)
                                for (sw, step), n in by_sw.most_common()),
                          tuple(failures), tuple(series), sum(by_sw.values()),
                          tuple(pauses), stations)


def _segments(times: list[float], pause_s: float) -> list[list[float]]:
    """Sorted times split where none came for longer than ``pause_s``."""
    segs: list[list[float]] = []
    for t in times:
        if segs and t - segs[-1][-1] <= pause_s:
            segs[-1].append(t)
        else:
            segs.append([t])
    return segs


def throughput(times: list[float], *, pause_s: float = PAUSE_S,
               buckets: int = BUCKETS) -> tuple[list[Throughput], list[Pause]]:
    """Loads/s from the loads' times: counted in buckets of one width (a round number of
    seconds, about ``buckets`` over the active time), each active stretch apart; the
    stretches between are the pauses."""
    segs = _segments(sorted(times), pause_s)
    if not segs:
        return [], []
    active = sum(s[-1] - s[0] for s in segs)
    width = float(nice_step(max(active / buckets, 0.01)))
    t0 = math.floor(segs[0][0] / width) * width
    out: list[Throughput] = []
    for k, seg in enumerate(segs):
        start = math.floor(seg[0] / width) * width
        counts = Counter(int((t - start) // width) for t in seg)
        for i in range(max(counts) + 1):
            b = start + i * width
            out.append(Throughput(round(b - t0, 3), counts[i] / width, b, width, counts[i], k))
    return out, [Pause(a[-1], b[0]) for a, b in itertools.pairwise(segs)]


def _station(name: str, times: list[float], loads: int) -> StationThroughput:
    active = sum(s[-1] - s[0] for s in _segments(times, PAUSE_S))
    return StationThroughput(name, loads, times[0] if times else None,
                             times[-1] if times else None,
                             round(len(times) / active, 3) if active > 0 else None)


def _rows(cells: Iterable[Sequence[object]]) -> str:
    return "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in cells)


def _table(head: Sequence[str], cells: Iterable[Sequence[object]], empty: str = "none") -> str:
    body = _rows(cells) or f'<tr><td colspan="{len(head)}">{html.escape(empty)}</td></tr>'
    return ("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head)
            + f"</tr></thead><tbody>{body}</tbody></table>")


def _when(t: float | None) -> str:
    return "-" if t is None else utc(t).strftime("%Y-%m-%d %H:%M:%S UTC")


def _dates(ts: Sequence[float]) -> str:
    days = sorted({utc(t).date().isoformat() for t in ts})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def _pauses(n: int) -> str:
    return f"{n:,} pause" if n == 1 else f"{n:,} pauses"


def _failure_bars(rep: CampaignReport) -> list[Bar]:
    by: Counter[str] = Counter()
    for f in rep.failures_by_sw:
        by[f.sw] += f.count
    return [Bar(f"{sw} {sw_meaning(sw)}", n) for sw, n in by.most_common()]


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:60em}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;
text-align:left}th{background:#f4f4f4}figure{margin:1em 0}figcaption{font-size:.9em;color:#444}
svg{max-width:100%;height:auto}
@page{size:A4;margin:15mm}
@media print{body{margin:0;font-size:10pt;max-width:none}h2{break-after:avoid}
figure,tr{break-inside:avoid}thead{display:table-header-group}th{background:none}}"""


def render_html(rep: CampaignReport) -> str:
    """The report for people: plan and result, charts (throughput over UTC time with its
    pauses, failures by status word, loads/s by station), the failed loads; printable.
    Everything from the journal is escaped."""
    e = html.escape
    st = rep.status
    plan = _table(["REF1", "REF2", "version"],
                  [(display_ref1(p.ref1), p.ref2, "any" if p.version is None else p.version)
                   for p in st.plan])
    states = _table(["state", "loads"], [(k, f"{v:,}") for k, v in st.states.items()])
    tp = rep.throughput
    if tp:
        segs: dict[int, list[tuple[float, float]]] = {}
        for p in tp:
            segs.setdefault(p.stretch, []).append((p.time + p.width / 2, p.rate))
        width = tp[0].width
        chart = time_chart(list(segs.values()), [(p.start, p.end) for p in rep.pauses],
                           y_label="loads/s", title="loads per second over time")
        total = sum(p.loads for p in tp)
        span = f"from {_when(tp[0].time)} to {_when(tp[-1].time + width)}"
        tp_html = (f"<figure>{chart}<figcaption>Loads imported per second, in buckets of "
                   f"{width:g} s; times UTC, {_dates([tp[0].time, tp[-1].time])}. "
                   f"{total:,} loads {span}. Shaded: {_pauses(len(rep.pauses))}, no load "
                   f"for more than {PAUSE_S:g} s (paused, interrupted or waiting for units)."
                   f"</figcaption></figure>"
                   + _table(["paused from", "to", "seconds"],
                            [(_when(p.start), _when(p.end), f"{p.end - p.start:,.1f}")
                             for p in rep.pauses], "no pause"))
    else:
        tp_html = "<p>No load imported yet: no throughput to show.</p>"
    bars = _failure_bars(rep)
    fails = (f"<figure>{bar_chart(bars, x_label='failed loads', title='failures by SW')}"
             f"<figcaption>Loads failed for good, by status word.</figcaption></figure>"
             if bars else "")
    fails += _table(["SW", "meaning", "step", "loads"],
                    [(f.sw, sw_meaning(f.sw), f.step, f"{f.count:,}")
                     for f in rep.failures_by_sw])
    per = ""
    if timed := [Bar(s.station, s.rate, f"loads/s ({s.loads:,} loads)")
                 for s in rep.stations if s.rate is not None]:
        chart = bar_chart(timed, x_label="loads/s (active time)", title="throughput by station")
        per = (f"<figure>{chart}<figcaption>Mean loads imported per second by each station "
               "over its active time (pauses left out).</figcaption></figure>")
    per += _table(["station", "imported", "first import", "last import", "loads/s"],
                  [(s.station, f"{s.loads:,}", _when(s.first), _when(s.last),
                    "-" if s.rate is None else f"{s.rate:,.2f}") for s in rep.stations])
    cut = (f"<p>The first {len(rep.failures):,} of {rep.failures_total:,} failed loads.</p>"
           if rep.failures_cut else "")
    failed = cut + _table(
        ["SN", "REF2", "REF1", "SW", "reason", "attempts", "failed at", "station"],
        [(f.sn.hex(), f.ref2, display_ref1(f.ref1), f.sw or "-", f.reason or "-",
          f.attempts, _when(f.time), f.station or "-") for f in rep.failures])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>keyload campaign {e(st.campaign)}</title>
<style>{_CSS}</style></head><body>
<h1>Campaign {e(st.campaign)}</h1>
<h2>Result</h2>
<p>Set {e(st.set_id.hex())}: {st.units:,} units, {st.loads:,} planned loads;
{st.states['imported']:,} imported ({rep.reconciled:,} reconciled with the unit after
an interruption), {st.states['failed']:,} failed. {'Complete.' if st.done else ''}</p>
{states}
<h2>Plan</h2>{plan}
<h2>Throughput</h2>{tp_html}
<h2>Failures by status word</h2>{fails}
<h2>Stations</h2>{per}
<h2>Failed loads</h2>{failed}
</body></html>
"""


def _csv(rows: Iterable[Sequence[object]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode()


def report_tables(rep: CampaignReport) -> dict[str, list[Sequence[object]]]:
    """The report's tables for CSV, by file suffix (``""``: the loads by state); times
    in ISO 8601 (UTC)."""
    st = rep.status
    return {
        "": [("state", "loads"), *st.states.items()],
        "-plan": [("ref1", "ref2", "version"),
                  *((display_ref1(p.ref1), p.ref2, "any" if p.version is None else p.version)
                    for p in st.plan)],
        "-failures-by-sw": [("sw", "meaning", "step", "count"),
                            *((f.sw, sw_meaning(f.sw), f.step, f.count)
                              for f in rep.failures_by_sw)],
        "-failures": [("sn", "ref2", "ref1", "sw", "meaning", "reason", "attempts", "time",
                       "station"),
                      *((f.sn.hex(), f.ref2, display_ref1(f.ref1), f.sw or "",
                         sw_meaning(f.sw), f.reason or "", f.attempts, iso(f.time) or "",
                         f.station or "") for f in rep.failures)],
        "-throughput": [("start", "end", "loads", "loads_per_s"),
                        *((iso(p.time), iso(p.time + p.width), p.loads, p.rate)
                          for p in rep.throughput)],
        "-pauses": [("start", "end", "seconds"),
                    *((iso(p.start), iso(p.end), round(p.end - p.start, 3))
                      for p in rep.pauses)],
        "-stations": [("station", "imported", "first", "last", "loads_per_s"),
                      *((s.station, s.loads, iso(s.first) or "", iso(s.last) or "",
                         "" if s.rate is None else s.rate) for s in rep.stations)]}


def write_report(rep: CampaignReport, out_dir: Path) -> list[Path]:
    """The report as ``NAME.json`` (:meth:`CampaignReport.to_json`), ``NAME.html``, and
    one CSV per table (:func:`report_tables`): ``NAME.csv`` (loads by state),
    ``NAME-plan.csv``, ``NAME-failures-by-sw.csv``, ``NAME-failures.csv`` (the listed
    ones: ``failures_cut`` in the JSON says whether that is all), ``NAME-throughput.csv``,
    ``NAME-pauses.csv``, ``NAME-stations.csv``, in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = rep.status.campaign
    files = [(out_dir / f"{name}.json", json.dumps(rep.to_json(), indent=1).encode()),
             *((out_dir / f"{name}{suffix}.csv", _csv(rows))
               for suffix, rows in report_tables(rep).items()),
             (out_dir / f"{name}.html", render_html(rep).encode())]
    for path, data in files:
        atomic_write(path, data, mode=0o644)
    return [p for p, _ in files]
