"""``keyload dashboard``: its JSON (``/api/state``) and its page in headless Chromium,
each checked against the campaign journal while a campaign is half done.

The campaign runs in a thread over emulated units; the station is held at one unit (its
connector waits) so that the page is read mid-way, then let go. Some units refuse the
MAC key (their slot 2 takes AES-128 only), so failures by status word, by station and
the failing SNs have something to show. The browser's screenshot is kept in
``test-artifacts/dashboard.png`` (ignored by git).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import sqlite3
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from keyload.core.keys import KeyType
from keyload.dashboard.serve import Dashboard, Tls, open_dashboard
from keyload.dashboard.state import Gatherer, ServiceProbe
from keyload.records.audit import AuditLog
from keyload.service.pki import init_pki
from keyload.service.server import ServerThread
from keyload.station.campaign import RunOptions, RunSummary, run_campaign
from keyload.station.home import Home
from keyload.station.journal.model import FAILED, IMPORTED, Campaign, PlannedLoad
from keyload.station.journal.sqlite import SqliteJournal
from keyload.transports import Connection
from keyload.transports.local import LocalConnection
from keyload.units.unit import Slot, Unit

from ..conftest import require
from .cli_helpers import KEYLOAD
from .fixtures import World, make_world

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
PLAN = (PlannedLoad(b"DIV", 1, 1), PlannedLoad(b"MAC", 2, 1))
UNITS, HOLD_AT = 24, 14  # the station waits at unit 14 (0-based) until let go
REFUSING = {3, 7, 11, 20}  # units whose slot 2 takes no HMAC key


@dataclass
class Running:
    home: Home
    world: World
    go: threading.Event
    waiting: threading.Event
    thread: threading.Thread
    summary: list[RunSummary]

    def finish(self) -> None:
        self.go.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def _unit(w: World, i: int) -> Unit:
    slots = {1: Slot(1, frozenset({KeyType.AES256})),
             2: Slot(2, frozenset({KeyType.AES128 if i in REFUSING else KeyType.HMAC_SHA256}))}
    return w.unit(f"U{i:04d}".encode(), slots=slots)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    """A home whose campaign ``c`` is held mid-way, with an audit chain of 3 records."""
    home = Home.resolve(str(tmp_path / "home"))
    home.ensure()
    audit = AuditLog(home.audit_path, actor="station")
    for i in range(3):
        audit.append("test", {"n": i})
    audit.close()
    w = make_world()
    units = {u.state.sn: u for u in (_unit(w, i) for i in range(UNITS))}
    serials = list(units)
    j = SqliteJournal(home.journal_path)
    j.create_campaign(Campaign("c", w.set_a, time.time(), PLAN, {}, UNITS), serials)
    go, waiting = threading.Event(), threading.Event()

    @contextmanager
    def connect(sn: bytes) -> Iterator[Connection]:
        if sn == serials[HOLD_AT]:
            waiting.set()
            go.wait(60)
        yield LocalConnection(units[sn])

    ticks = count()
    t0 = time.time()

    def clock() -> float:  # 0.25 s a call: a throughput sample every few loads
        return t0 + 0.25 * next(ticks)

    summary: list[RunSummary] = []
    opts = RunOptions(station="bench-1", batch_units=2, lease_s=1e6, retries=1, clock=clock)
    th = threading.Thread(target=lambda: summary.append(
        run_campaign(j, "c", w.client(), connect, opts)), daemon=True)
    th.start()
    assert waiting.wait(30), "the station never reached the held unit"
    run = Running(home, w, go, waiting, th, summary)
    try:
        yield run
    finally:
        go.set()
        th.join(30)
        j.close()


def _serve(d: Dashboard) -> ServerThread:
    return ServerThread(d.config, d.sock).start()


def _get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as r:  # noqa: S310
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _journal_facts(home: Home) -> dict[str, Any]:
    """What the journal holds, read with SQLite directly (not through keyload)."""
    db = sqlite3.connect(home.journal_path)
    try:
        states = dict(db.execute("SELECT state, COUNT(*) FROM loads GROUP BY state").fetchall())
        by_sw = dict(db.execute("SELECT sw, COUNT(*) FROM loads WHERE state = 'failed' "
                                "GROUP BY sw").fetchall())
        failing = set(db.execute("SELECT sn, reason FROM loads WHERE state = 'failed'"))
        # a failed load keeps no station: the stations' counters (one run here) say it
        by_station = dict(db.execute("SELECT station, MAX(loads_failed) FROM events "
                                     "GROUP BY station HAVING MAX(loads_failed) > 0").fetchall())
    finally:
        db.close()
    return {"imported": states.get(IMPORTED, 0), "failed": states.get(FAILED, 0),
            "by_sw": by_sw, "failing": failing, "by_station": by_station}


def test_api_state_matches_the_journal_mid_campaign(running: Running) -> None:
    d = open_dashboard(running.home, port=0)
    assert d.url.startswith("http://127.0.0.1:") and not d.url.endswith(":0/")
    srv = _serve(d)
    try:
        status, s = _get(d.url + "api/state")
        assert status == 200
        facts = _journal_facts(running.home)
        (c,) = s["campaigns"]
        assert c["campaign"] == "c" and c["units"] == UNITS and c["loads"] == 2 * UNITS
        # mid-way: some loads done, some failed, some still open
        assert 0 < c["states"]["imported"] == facts["imported"] < 2 * UNITS
        assert c["states"]["failed"] == facts["failed"] == len(REFUSING & set(range(HOLD_AT)))
        assert c["remaining"] == 2 * UNITS - facts["imported"] - facts["failed"] > 0
        assert {f["sw"]: f["count"] for f in c["failures_by_sw"]} == facts["by_sw"]
        assert c["failures_by_station"] == facts["by_station"]
        assert 0 < facts["by_station"]["bench-1"] <= facts["failed"]
        assert {(f["sn"], f["reason"]) for f in c["failures"]} == facts["failing"]
        assert c["throughput"] and c["rate"] > 0 and c["eta_s"] > 0
        # the ledger without the authority: every receipt (suite 0x01/0x02) not checked
        led = s["ledger"]
        assert led["not_checked_without_authority"] == facts["imported"]
        assert led["receipts_verified"] == led["receipts_invalid"] == 0
        assert led["service"] is None  # no service.db in this home
        assert s["audit"] == {"state": "verified", "records": 3, "broken_at": None,
                              "problems": []}
        assert s["service"] is None
        running.finish()
        time.sleep(0.6)  # past the state's shared interval
        status, s = _get(d.url + "api/state")
        done = _journal_facts(running.home)
        (c,) = s["campaigns"]
        assert c["states"]["imported"] == done["imported"] == 2 * UNITS - len(REFUSING)
        assert c["remaining"] == 0 and c["eta_s"] == 0
    finally:
        srv.stop()


def test_the_dashboard_only_reads(running: Running) -> None:
    """POST is refused (405); reading changes neither the journal nor the audit chain."""
    running.finish()
    before = (running.home.journal_path.read_bytes(), running.home.audit_path.read_bytes())
    d = open_dashboard(running.home, port=0)
    srv = _serve(d)
    try:
        req = urllib.request.Request(d.url + "api/state", data=b"{}",  # noqa: S310
                                     method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)  # noqa: S310
        assert e.value.code == 405
        assert _get(d.url + "api/state")[0] == 200
    finally:
        srv.stop()
    assert (running.home.journal_path.read_bytes(),
            running.home.audit_path.read_bytes()) == before


def test_another_journal_is_read_with_journal(running: Running, tmp_path: Path) -> None:
    other = Home.resolve(str(tmp_path / "other"))
    other.ensure()
    g = Gatherer(other, journal=str(running.home.journal_path)).gather(time.time())
    assert [c["campaign"] for c in g["campaigns"]] == ["c"]
    assert Gatherer(other).gather(time.time())["campaigns"] == []  # its own: none yet
    assert not other.journal_path.exists()  # and none made by looking


def test_an_edited_audit_record_shows_where_the_chain_breaks(running: Running) -> None:
    running.finish()
    db = sqlite3.connect(running.home.audit_path)
    db.execute("UPDATE audit SET detail = '{\"n\": 9}' WHERE seq = 2")
    db.commit()
    db.close()
    d = open_dashboard(running.home, port=0)
    srv = _serve(d)
    try:
        a = _get(d.url + "api/state")[1]["audit"]
        assert a["state"] == "broken" and a["broken_at"] == 2
    finally:
        srv.stop()


def test_off_loopback_it_is_https_and_refuses_without_a_client_certificate(
        running: Running, tmp_path: Path) -> None:
    running.finish()
    pki = tmp_path / "pki"
    init_pki(pki, clients=("viewer", "stranger"))
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"clients": {"viewer": {"sets": [], "ref1": []}}}))
    with pytest.raises(ValueError, match="HTTPS only"):
        open_dashboard(running.home, host="0.0.0.0", port=0)  # noqa: S104
    d = open_dashboard(running.home, host="0.0.0.0", port=0,  # noqa: S104
                       tls=Tls(pki / "server.pem", pki / "server.key", pki / "ca.pem", policy))
    assert d.url.startswith("https://0.0.0.0:")
    url = d.url.replace("0.0.0.0", "127.0.0.1") + "api/state"  # noqa: S104
    srv = _serve(d)
    try:
        # plain HTTP gets no answer
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(url.replace("https", "http"), timeout=5)  # noqa: S310

        def ctx(client: str | None) -> ssl.SSLContext:
            c = ssl.create_default_context(cafile=str(pki / "ca.pem"))
            if client:
                c.load_cert_chain(pki / "clients" / f"{client}.pem",
                                  pki / "clients" / f"{client}.key")
            return c

        assert _get(url, ctx(None))[0] == 401
        assert _get(url, ctx("stranger"))[0] == 403
        status, s = _get(url, ctx("viewer"))
        assert status == 200 and s["campaigns"][0]["campaign"] == "c"
    finally:
        srv.stop()


# -- the page in a real browser ---------------------------------------------------------
def _browser() -> Any:
    """Playwright's sync API, or a skip (a failure in CI) naming what is missing."""
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        require(False, "the dashboard's browser test needs playwright (the test extra)")
    require(shutil.which("chromium") is not None or Path(CHROMIUM).exists(),
            f"the dashboard's browser test needs Debian's chromium ({CHROMIUM})")
    return sync_playwright, expect


def _number(text: str) -> int:
    return int(text.replace(",", ""))


@pytest.mark.slow  # starts a headless browser
def test_the_page_in_chromium_shows_the_journal_mid_campaign(running: Running) -> None:
    sync_playwright, expect = _browser()
    d = open_dashboard(running.home, port=0)
    srv = _serve(d)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 1400})
                outside: list[str] = []
                page.on("request", lambda r: None if r.url.startswith(d.url)
                        else outside.append(r.url))
                page.goto(d.url)
                art = page.locator('article[data-campaign="c"]')
                art.wait_for(timeout=10_000)
                # (locator waits: the page's CSP forbids the eval of wait_for_function)
                expect(page.locator("#audit [data-k=audit]")).not_to_have_text("")
                facts = _journal_facts(running.home)

                def shown(k: str) -> str:
                    return str(art.locator(f'[data-k="{k}"]').inner_text())

                assert _number(shown("imported")) == facts["imported"]
                assert _number(shown("failed")) == facts["failed"] > 0
                assert _number(shown("loads")) == 2 * UNITS
                assert _number(shown("remaining")) == \
                    2 * UNITS - facts["imported"] - facts["failed"]
                assert shown("eta") not in ("–", "done")
                rows = art.locator(".by-sw tbody tr")
                by_sw = {rows.nth(i).locator("td").nth(0).inner_text():
                         _number(rows.nth(i).locator("td").nth(2).inner_text())
                         for i in range(rows.count())}
                assert by_sw == facts["by_sw"]
                st = art.locator(".by-station tbody tr td")
                assert [st.nth(0).inner_text(), _number(st.nth(1).inner_text())] == \
                    ["bench-1", facts["by_station"]["bench-1"]]
                failing = art.locator(".failing tbody tr")
                assert {(failing.nth(i).locator("td").nth(0).inner_text(),
                         failing.nth(i).locator("td").nth(4).inner_text())
                        for i in range(failing.count())} == facts["failing"]
                assert art.locator(".chart polyline").count() == 1
                assert page.locator("#audit [data-k=audit]").inner_text() == \
                    "verified (3 records)"
                assert _number(page.locator('#ledger [data-k="not_checked_without_'
                                            'authority"]').inner_text()) == facts["imported"]
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
                # live: the page follows the campaign to its end without a reload
                running.finish()
                done = _journal_facts(running.home)
                expect(art.locator('[data-k="imported"]')).to_have_text(
                    str(done["imported"]), timeout=10_000)
                assert shown("eta") == "done"
                assert outside == []  # nothing fetched from anywhere else
            finally:
                browser.close()
    finally:
        srv.stop()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000



# -- a running service, and the command ---------------------------------------------------
def test_a_service_shows_its_health_and_requests_and_refusals_per_second(
        tmp_path: Path) -> None:
    from .test_service import build_world, export_json, init, policy_doc, raw, start_service

    w = build_world(tmp_path, units=1)
    run = start_service(w, policy_doc(w))
    ticks = iter([100.0, 110.0])
    probe = ServiceProbe(run.url, ca=w.pki / "ca.pem", cert=w.pki / "clients" / "monitor.pem",
                         key=w.pki / "clients" / "monitor.key", clock=lambda: next(ticks))
    try:
        first = probe.read()
        assert first["health"] == "ok" and first["checks"] == {"state": "ok", "authority": "ok"}
        assert first["requests_per_s"] is None and first["error"] is None  # one read: no rate
        for client in (None, None, "intruder"):  # 401, 401, 403
            assert raw(run, "POST", "/v1/exportkey", b"{}", client=client)[0] in (401, 403)
        second = probe.read()
        # between the two renders: the first read's metrics request, three refusals and
        # the second read's health request, over 10 s of the probe's clock
        assert second["requests"] - first["requests"] == 5
        assert second["refusals"] - first["refusals"] == 3
        assert (second["requests_per_s"], second["refusals_per_s"]) == (0.5, 0.3)
        # an export no receipt followed is in the ledger's service part, by age
        i = init(w, w.units_a[0])
        assert raw(run, "POST", "/v1/exportkey", export_json(i, b"TMK-1", 1))[0] == 200
        svc_ledger = Gatherer(Home.resolve(str(w.home))).gather(time.time())["ledger"]
        assert svc_ledger["service"]["total"] == 1 and svc_ledger["service"]["entries"] == 0
        assert svc_ledger["service"]["by_age"] == {"under_1h": 1, "1h_to_1d": 0,
                                                   "1d_to_7d": 0, "7d_or_more": 0}
        # a client the policy does not let read metrics: health only, and why
        other = ServiceProbe(run.url, ca=w.pki / "ca.pem", cert=w.pki / "clients" / "other.pem",
                             key=w.pki / "clients" / "other.key")
        seen = other.read()
        other.close()
        assert seen["health"] == "ok" and seen["requests"] is None
        assert seen["error"].startswith("metrics: HTTP 403")
    finally:
        probe.close()
        run.stop()
    gone = ServiceProbe(run.url, ca=w.pki / "ca.pem").read()
    assert gone["health"] == "unreachable" and "unreachable" in gone["error"]


@pytest.mark.slow  # runs the console script
def test_keyload_dashboard_prints_its_url_and_serves(running: Running) -> None:
    running.finish()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([KEYLOAD, "dashboard", "--home", str(running.home.root), "--port",
                          "0"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()
        m = re.fullmatch(r"keyload dashboard on (http://127\.0\.0\.1:(\d+)/) \(read-only; "
                         r"Ctrl-C stops it\)\n", line)
        assert m and int(m[2]) > 0, line
        for _ in range(100):  # the line comes just before the server listens
            with contextlib.suppress(OSError):
                status, s = _get(m[1] + "api/state")
                break
            time.sleep(0.05)
        assert status == 200 and s["campaigns"][0]["states"]["imported"] == \
            _journal_facts(running.home)["imported"]
        with urllib.request.urlopen(m[1], timeout=10) as r:  # noqa: S310
            page = r.read().decode()
        assert '<script src="/app.js"' in page and "http" not in page.split("<body>")[1]
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(10)
    off = subprocess.run([KEYLOAD, "dashboard", "--home", str(running.home.root), "--host",
                          "0.0.0.0", "--port", "0"], capture_output=True, text=True,  # noqa: S104
                         timeout=60)
    assert off.returncode == 3 and "HTTPS only" in off.stderr


def test_the_page_is_package_data() -> None:
    """The page and its script ship in the package (pyproject's package data), and the
    page names no script or style but its own."""
    import tomllib

    from keyload.dashboard.app import STATIC, static_file

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "dashboard/static/*" in data["package-data"]["keyload"]
    page = static_file("index.html").decode()
    assert re.findall(r'(?:src|href)="([^"]+)"', page) == ["/app.css", "/app.js"]
    assert all(static_file(name) for name, _ in STATIC.values())
    assert "http" not in static_file("app.js").decode().replace(
        "http://www.w3.org/2000/svg", "")  # the SVG namespace is a name, not a fetch
