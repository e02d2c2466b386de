"""Campaign reports from real runs: throughput with its pauses, failures by status word,
stations, the failed loads, the CSV tables and the JSON's failure list."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest

from keyload.core.errors import SW, TransportError
from keyload.station import report
from keyload.station.campaign import RunOptions, run_campaign
from keyload.station.journal.model import FAILED, IMPORTED, Campaign
from keyload.station.journal.sqlite import SqliteJournal
from keyload.station.report import build_report, render_html, write_report
from keyload.transports import Connection
from keyload.transports.local import LocalConnection
from keyload.units.unit import Slot, Unit

from .fixtures import World, make_world
from .test_campaign import PLAN


class Page(HTMLParser):
    """Tags (with attributes, in order) and text of an HTML page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def count(self, tag: str, cls: str) -> int:
        return sum(1 for t, a in self.tags if t == tag and a.get("class") == cls)

    def svgs(self) -> list[str]:
        return [a.get("aria-label") or "" for t, a in self.tags if t == "svg"]

    @property
    def all_text(self) -> str:
        return "".join(self.text)


def _campaign(tmp_path: Path, n: int, *,
              locked: int = 0) -> tuple[World, SqliteJournal, dict[bytes, Unit]]:
    """``n`` emulated units; the first ``locked`` refuse slot 1 (6986)."""
    w = make_world()
    sns = [f"U{i:04d}".encode() for i in range(n)]
    units = {sn: w.unit(sn) for sn in sns}
    for sn in sns[:locked]:
        s1 = units[sn].state.slots[1]
        units[sn].state.slots[1] = Slot(1, s1.accepts, True)
    j = SqliteJournal(tmp_path / "journal.db")
    j.create_campaign(Campaign("c", w.set_a, time.time(), PLAN, {}, n), sns)
    return w, j, units


def _connector(units: dict[bytes, Unit], on_connect: list[float] | None = None,
               step: float = 0.0, pause_at: int = -1, pause_s: float = 0.0,
               jammed: frozenset[bytes] = frozenset()):  # type: ignore[no-untyped-def]
    """Units in-process; with ``on_connect`` (the run's clock), each unit takes ``step``
    seconds and the ``pause_at``-th waits ``pause_s`` first; ``jammed`` never answer."""
    seen = [0]

    @contextmanager
    def connect(sn: bytes) -> Iterator[Connection]:
        if sn in jammed:
            raise TransportError("reader jammed")
        if on_connect is not None:
            on_connect[0] += step + (pause_s if seen[0] == pause_at else 0.0)
        seen[0] += 1
        yield LocalConnection(units[sn])
    return connect


def test_a_fast_finished_campaign_has_its_throughput(tmp_path: Path) -> None:
    """300 units loaded in well under a second (one run event, at its end) still have
    throughput samples: they come from each load's import time."""
    w, j, units = _campaign(tmp_path, 300)
    s = run_campaign(j, "c", w.client(), _connector(units), RunOptions(station="s1"))
    assert s.loads_done == 600
    rep = build_report(j, "c")
    assert rep.status.done
    assert len(rep.throughput) >= 2 and sum(p.loads for p in rep.throughput) == 600
    assert all(p.rate == p.loads / p.width for p in rep.throughput)
    assert rep.pauses == ()
    text = render_html(rep)
    assert "@media print" in text and "break-inside:avoid" in text  # printable
    page = Page(text)
    assert "No throughput samples yet." not in page.all_text
    assert page.count("polyline", "segment") == 1 and page.count("rect", "gap") == 0
    assert "loads/s" in page.all_text and "time (UTC)" in page.all_text
    assert page.count("line", "xtick") >= 2 and page.count("line", "ytick") >= 2
    day = datetime.fromtimestamp(rep.throughput[0].time, UTC).strftime("%Y-%m-%d")
    assert day in page.all_text  # the date (UTC) is in the caption
    assert [st.station for st in rep.stations] == ["s1"] and rep.stations[0].loads == 600
    assert (rep.stations[0].rate or 0) > 0


def test_a_pause_is_a_gap_in_the_throughput(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    w, j, units = _campaign(tmp_path, 40)
    run_campaign(j, "c", w.client(), _connector(units, now, 1.0, pause_at=20, pause_s=3600.0),
                 RunOptions(station="s1", lease_s=7200.0, clock=lambda: now[0]))
    rep = build_report(j, "c")
    assert len(rep.pauses) == 1
    p = rep.pauses[0]
    assert 3600.0 <= p.end - p.start <= 3602.0
    assert sum(t.loads for t in rep.throughput) == 80
    assert {t.stretch for t in rep.throughput} == {0, 1}
    assert not any(p.start < t.time and t.time + t.width < p.end for t in rep.throughput)
    page = Page(render_html(rep))
    assert page.count("rect", "gap") == 1 and page.count("polyline", "segment") == 2
    assert "08:00:00" in page.all_text or "09:00:00" in page.all_text  # UTC clock ticks
    assert "2027-01-15" in page.all_text  # the date (UTC) in the caption
    # a station's loads/s is over its active time: the pause is left out
    assert rep.stations[0].rate is not None and 1.9 <= rep.stations[0].rate <= 2.2


def test_failures_by_sw_stations_and_the_failed_loads(tmp_path: Path) -> None:
    w, j, units = _campaign(tmp_path, 12, locked=3)
    hostile = '<script>alert("s")</script>&x'
    run_campaign(j, "c", w.client(), _connector(units, jammed=frozenset({b"U0011"})),
                 RunOptions(station=hostile))
    rep = build_report(j, "c")
    failed = list(j.rows("c", [FAILED]))
    sws = {r.sw or "-" for r in failed}
    assert sws == {"6986", "-"} and rep.failures_total == len(failed) == len(rep.failures)
    assert not rep.failures_cut
    page = Page(render_html(rep))
    assert page.count("rect", "bar") == len(sws) + 1  # one per SW, one for the station
    assert "failures by SW" in page.svgs() and "throughput by station" in page.svgs()
    assert SW.POLICY.meaning in page.all_text and "failed loads" in page.all_text
    assert all(r.sn.hex() in page.all_text for r in failed)
    assert {(f.sn, f.ref2, f.attempts) for f in rep.failures} == \
        {(r.sn, r.ref2, r.attempts) for r in failed}
    # the station's name is text, never markup
    assert not any(t == "script" for t, _ in page.tags)
    assert hostile in page.all_text
    assert page.all_text.count(hostile) >= 2  # in the table and on the station's bar
    js = rep.to_json()
    assert js["failures_total"] == len(failed) and js["failures_cut"] is False
    assert {(f["sn"], f["ref2"]) for f in js["failures"]} == {(r.sn.hex(), r.ref2)
                                                            for r in failed}
    assert all(f["attempts"] >= 1 for f in js["failures"])
    assert j.counts("c")[IMPORTED] == rep.by_station[hostile]
    # a load that failed for good names the station it failed on, in the journal and the
    # report (an operator asks which station's reader or feeder to look at)
    assert {r.station for r in failed} == {hostile}
    assert {f["station"] for f in js["failures"]} == {hostile}
    assert {f.station for f in rep.failures} == {hostile}


def test_the_failure_list_says_when_it_is_cut(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    w, j, units = _campaign(tmp_path, 6, locked=5)
    run_campaign(j, "c", w.client(), _connector(units), RunOptions(station="s"))
    monkeypatch.setattr(report, "MAX_FAILURES", 3)
    rep = build_report(j, "c")
    assert rep.failures_total == 5 and len(rep.failures) == 3 and rep.failures_cut
    js = rep.to_json()
    assert len(js["failures"]) == 3 and js["failures_total"] == 5 and js["failures_cut"]
    assert "The first 3 of 5 failed loads" in Page(render_html(rep)).all_text


def test_report_files_one_csv_per_table_with_iso_times(tmp_path: Path) -> None:
    now = [1_800_000_000.0]
    w, j, units = _campaign(tmp_path, 10, locked=2)
    run_campaign(j, "c", w.client(), _connector(units, now, 2.0, pause_at=5, pause_s=600.0),
                 RunOptions(station="s1", lease_s=7200.0, clock=lambda: now[0]))
    rep = build_report(j, "c")
    paths = write_report(rep, tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == sorted(["c.json", "c.html", "c.csv", "c-plan.csv", "c-failures-by-sw.csv",
                            "c-failures.csv", "c-throughput.csv", "c-pauses.csv",
                            "c-stations.csv"])
    assert all(p.exists() for p in paths)

    def table(name: str) -> list[dict[str, str]]:
        with (tmp_path / "out" / name).open(newline="") as f:
            return list(csv.DictReader(f))

    assert {r["state"]: int(r["loads"]) for r in table("c.csv")} == j.counts("c")
    assert [(r["ref1"], r["ref2"]) for r in table("c-plan.csv")] == [("DIV", "1"), ("MAC", "2")]
    fails = table("c-failures.csv")
    assert len(fails) == 2 and {r["sw"] for r in fails} == {"6986"}
    assert {r["station"] for r in fails} == {"s1"}
    tp = table("c-throughput.csv")
    assert sum(int(r["loads"]) for r in tp) == j.counts("c")[IMPORTED]
    pauses = table("c-pauses.csv")
    assert len(pauses) == 1 and float(pauses[0]["seconds"]) >= 600
    stations = table("c-stations.csv")
    assert [r["station"] for r in stations] == ["s1"]
    for r in fails:
        assert datetime.fromisoformat(r["time"]).utcoffset() is not None
    for rows, cols in ((tp, ("start", "end")), (pauses, ("start", "end")),
                       (stations, ("first", "last"))):
        for r in rows:
            for c in cols:
                t = datetime.fromisoformat(r[c])
                assert t.utcoffset() is not None and t.year == 2027
    js = json.loads((tmp_path / "out" / "c.json").read_text())
    assert js["failures_total"] == 2 and js["failures_cut"] is False
    assert datetime.fromisoformat(js["pauses"][0]["start"]).timestamp() >= now[0] - 10_000
