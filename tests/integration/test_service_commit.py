"""Group commit in the service: the requests of one event-loop pass share one transaction
per database, every answer waits for its commit, and a batch that cannot begin or commit
answers 503 with nothing delivered. Also the audit log's batches, the in-process rate
counters and the health check's probes.

The app is driven through its ASGI interface (what uvicorn calls), with real SQLite
databases and the real software authority; requests that must run in one pass are
started together with ``asyncio.gather``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keyload.core.errors import StoreError
from keyload.records.audit import AuditLog
from keyload.service.commit import Busy, GroupCommit
from keyload.service.policy import Policy, Rate
from keyload.service.rates import MemoryRates
from keyload.service.runtime import Instance, open_instance
from keyload.service.store import EXPORTED
from keyload.units.keystore import SoftwareKeystore

from ..helpers import copy_world
from .test_service import World, build_world, policy_doc

JSON_CT = (b"content-type", b"application/json")


@dataclass
class Harness:
    world: World
    ks: SoftwareKeystore
    inst: Instance
    pem: str

    def request(self, method: str, path: str, body: bytes = b"", *,
                client: bool = True) -> dict[str, Any]:
        return asyncio.run(self.call(method, path, body, client=client))

    async def call(self, method: str, path: str, body: bytes = b"", *,
                   client: bool = True) -> dict[str, Any]:
        tls = {"client_cert_chain": [self.pem] if client else []}
        scope = {"type": "http", "method": method, "path": path,
                 "headers": [JSON_CT, (b"content-length", str(len(body)).encode())],
                 "extensions": {"tls": tls}}
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(m: dict[str, Any]) -> None:
            sent.append(m)

        await self.inst.app(scope, receive, send)
        start, payload = sent
        return {"status": start["status"],
                "headers": {k.decode(): v.decode() for k, v in start["headers"]},
                "body": payload["body"]}

    def export_body(self, i: int) -> bytes:
        return json.dumps({"sn": self.world.units_a[i % 12].hex(), "r": os.urandom(16).hex(),
                           "set_id": self.world.set_a.hex(), "suite": 1,
                           "ref1": b"TMK-1".hex(), "ref2": 1}).encode()

    def rows(self, db: str, sql: str) -> list[Any]:
        c = sqlite3.connect(self.world.home / db)
        try:
            return c.execute(sql).fetchall()
        finally:
            c.close()

    def counts(self) -> tuple[int, int, int]:
        """(challenges, export records, audit records): what a request leaves behind."""
        return (self.rows("service.db", "SELECT COUNT(*) FROM challenges")[0][0],
                self.rows("authority/exports.db", "SELECT COUNT(*) FROM exports")[0][0],
                self.rows("audit.db", "SELECT COUNT(*) FROM audit")[0][0])

    def audit_ok(self) -> tuple[int, list[Any]]:
        log = AuditLog(self.world.home / "audit.db")
        try:
            return log.verify()
        finally:
            log.close()


@pytest.fixture(scope="module")
def prepared_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("commit-world"))


@pytest.fixture
def h(prepared_world: World, tmp_path: Path) -> Iterator[Harness]:
    w = copy_world(prepared_world, tmp_path / "world")  # a copy of its own for each test
    ks = w.open_keystore()
    inst = open_instance(ks, Policy.from_json(policy_doc(w)), home_root=w.home,
                         authority_dir=w.home / "authority", audit_path=w.home / "audit.db")
    pem = (w.pki / "clients" / "terminal-1.pem").read_text()
    yield Harness(w, ks, inst, pem)
    inst.close()
    ks.close()


def _problem(r: dict[str, Any], status: int, slug: str) -> dict[str, Any]:
    assert r["status"] == status, r
    assert r["headers"]["content-type"] == "application/problem+json"
    doc = json.loads(r["body"])
    assert doc["type"] == f"urn:keyload:problem:{slug}", doc
    return doc


# -- batching ------------------------------------------------------------------------
def test_service_requests_of_one_pass_share_one_commit(h: Harness) -> None:
    gc = h.inst.app.commits
    assert gc is not None
    before = h.counts()

    async def burst() -> list[dict[str, Any]]:
        return list(await asyncio.gather(
            *(h.call("POST", "/v1/exportkey", h.export_body(i)) for i in range(16))))

    out = asyncio.run(burst())
    assert [r["status"] for r in out] == [200] * 16
    assert (gc.batches, gc.requests) == (1, 16)  # 16 requests, one commit
    assert h.counts() == (before[0] + 16, before[1] + 16, before[2] + 16)
    states = h.rows("service.db", "SELECT state FROM challenges")
    assert states == [(EXPORTED,)] * 16
    n, problems = h.audit_ok()
    assert n == before[2] + 16 and problems == []
    head = json.loads((h.world.home / "audit.db.head").read_bytes())
    assert head["seq"] == n
    # a request alone is a batch of its own; the next pass opens a new one
    assert h.request("POST", "/v1/exportkey", h.export_body(0))["status"] == 200
    assert (gc.batches, gc.requests) == (2, 17)


def test_service_replay_within_one_batch_is_refused(h: Harness) -> None:
    body = h.export_body(3)

    async def twice() -> list[dict[str, Any]]:
        return list(await asyncio.gather(h.call("POST", "/v1/exportkey", body),
                                         h.call("POST", "/v1/exportkey", body)))

    first, second = asyncio.run(twice())
    assert first["status"] == 200
    _problem(second, 409, "replay")
    assert h.rows("service.db", "SELECT COUNT(*) FROM challenges") == [(1,)]


class _FailsOnce:
    """A database whose n-th commit fails (rolled back); every other one goes through."""

    def __init__(self, inner: Any, n: int) -> None:
        self.inner, self.n, self.commits = inner, n, 0

    def begin_batch(self) -> None:
        self.inner.begin_batch()

    def commit_batch(self) -> None:
        self.commits += 1
        if self.commits == self.n:
            self.inner.rollback_batch()
            raise sqlite3.OperationalError("disk I/O error")
        self.inner.commit_batch()

    def rollback_batch(self) -> None:
        self.inner.rollback_batch()


def test_service_failed_commit_of_first_database_answers_503_and_keeps_nothing(
        h: Harness) -> None:
    gc = h.inst.app.commits
    assert gc is not None
    exports, store, audit = gc.parts
    h.inst.app.commits = GroupCommit([_FailsOnce(exports, 1), store, audit])
    before = h.counts()
    head_before = (h.world.home / "audit.db.head").read_bytes() \
        if (h.world.home / "audit.db.head").exists() else None

    async def burst() -> list[dict[str, Any]]:
        return list(await asyncio.gather(
            *(h.call("POST", "/v1/exportkey", h.export_body(i)) for i in range(4))))

    for r in asyncio.run(burst()):
        doc = _problem(r, 503, "unavailable")
        assert r["headers"]["retry-after"] == "1"
        assert "import_data" not in doc and b"import" not in r["body"]
    assert h.counts() == before  # every database rolled back: nothing claimed, exported,
    n, problems = h.audit_ok()   # or audited, and the chain is whole
    assert problems == [] and n == before[2]
    head_now = (h.world.home / "audit.db.head").read_bytes() \
        if (h.world.home / "audit.db.head").exists() else None
    assert head_now == head_before
    # the databases are usable again: the next batch commits
    h.inst.app.commits = gc
    assert h.request("POST", "/v1/exportkey", h.export_body(5))["status"] == 200
    assert h.counts() == (before[0] + 1, before[1] + 1, before[2] + 1)


def test_service_failed_audit_commit_answers_503_and_records_the_export(h: Harness) -> None:
    gc = h.inst.app.commits
    assert gc is not None
    exports, store, audit = gc.parts
    h.inst.app.commits = GroupCommit([exports, store, _FailsOnce(audit, 1)])
    before = h.counts()
    r = h.request("POST", "/v1/exportkey", h.export_body(1))
    _problem(r, 503, "unavailable")
    # committed in order: the authority's export record and the claim are kept (an export
    # recorded but never delivered, never the reverse); the audit batch is rolled back
    assert h.counts() == (before[0] + 1, before[1] + 1, before[2])
    assert h.audit_ok()[1] == []
    h.inst.app.commits = gc


@pytest.mark.slow  # waits out a database lock
def test_service_batch_that_cannot_begin_is_503_and_changes_nothing(h: Harness) -> None:
    store = h.inst.store
    store.db.execute("PRAGMA busy_timeout = 50")  # type: ignore[attr-defined]
    blocker = sqlite3.connect(h.world.home / "service.db", isolation_level=None)
    before = h.counts()
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds service.db
        r = h.request("POST", "/v1/exportkey", h.export_body(2))
        _problem(r, 503, "unavailable")
        assert h.inst.app.commits is not None and not h.inst.app.commits.open
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert h.counts() == before
    assert h.request("POST", "/v1/exportkey", h.export_body(2))["status"] == 200


def test_service_without_group_commit_writes_each_request(h: Harness) -> None:
    h.inst.app.commits = None
    before = h.counts()
    assert h.request("POST", "/v1/exportkey", h.export_body(4))["status"] == 200
    assert h.counts() == (before[0] + 1, before[1] + 1, before[2] + 1)


# -- health ----------------------------------------------------------------------------
class _Refuses:
    """A database that cannot begin or cannot commit (``sqlite3`` says why)."""

    def __init__(self, *, begin: str | None = None, commit: str | None = None) -> None:
        self.begin, self.commit = begin, commit

    def begin_batch(self) -> None:
        if self.begin:
            raise sqlite3.OperationalError(self.begin)

    def commit_batch(self) -> None:
        if self.commit:
            raise sqlite3.OperationalError(self.commit)

    def rollback_batch(self) -> None:
        pass


async def _each_error(gc: GroupCommit, n: int, *, close: bool = False
                      ) -> list[BaseException | None]:
    """What each of ``n`` requests of one pass gets from a batch (``close``: the group
    commit is closed while they wait)."""
    async def one(i: int) -> BaseException | None:
        try:
            await gc.run(lambda: i, timeout=5.0)
        except StoreError as e:
            return e
        return None

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    if close:
        await asyncio.sleep(0.05)  # handed over, waiting for the lock
        gc.close()
    return list(await asyncio.gather(*tasks))


@pytest.mark.parametrize("thread", [False, True], ids=["loop", "thread"])
@pytest.mark.parametrize(("part", "kind"), [
    (_Refuses(begin="database is locked"), Busy),
    (_Refuses(begin="disk I/O error"), StoreError),
    (_Refuses(commit="disk I/O error"), StoreError),
], ids=["begin-busy", "begin-fails", "commit-fails"])
def test_service_batch_error_is_one_object_per_request(thread: bool, part: _Refuses,
                                                       kind: type[StoreError]) -> None:
    """No shared error objects: the requests of a failed batch each get an error of their
    own (one object raised in several requests would carry each one's traceback and
    context into the others)."""
    gc = GroupCommit([part], busy_timeout=0.02, thread=thread)
    try:
        errors = asyncio.run(_each_error(gc, 3))
    finally:
        gc.close()
    assert [type(e) for e in errors] == [kind] * 3
    assert len({id(e) for e in errors}) == 3
    assert len({str(e) for e in errors}) == 1
    assert all(e is not None and e.__context__ is None for e in errors)


def test_service_requests_waiting_at_close_each_get_their_own_busy() -> None:
    gc = GroupCommit([_Refuses(begin="database is locked")], busy_timeout=10.0)
    errors = asyncio.run(_each_error(gc, 3, close=True))
    assert [type(e) for e in errors] == [Busy] * 3
    assert [str(e) for e in errors] == ["the service is stopping"] * 3
    assert len({id(e) for e in errors}) == 3


def test_service_health_probes_the_state(h: Harness) -> None:
    r = h.request("GET", "/v1/health", client=False)
    assert r["status"] == 200
    assert json.loads(r["body"])["checks"] == {"state": "ok", "authority": "ok"}
    c = sqlite3.connect(h.world.home / "service.db", isolation_level=None)
    try:
        c.execute("ALTER TABLE challenges RENAME TO challenges_gone")  # a damaged state
    finally:
        c.close()
    doc = _problem(h.request("GET", "/v1/health", client=False), 503, "unavailable")
    assert doc["detail"] == "not available: state"
    # a probe is anonymous: counted in its address's record, written once a minute
    # (here: now), not one record per probe
    assert asyncio.run(h.inst.app.flush_anonymous(everything=True)) == 1
    rows = h.rows("audit.db", "SELECT action, detail FROM audit ORDER BY seq DESC LIMIT 1")
    assert rows[0][0] == "requests-anonymous"
    assert json.loads(rows[0][1])["status"] == {"200": 1, "503": 1}


# -- audit batches -----------------------------------------------------------------------
def test_audit_batch_commits_once_and_rolls_back_whole(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.db")
    try:
        log.append("one", {"n": 1})
        log.begin_batch()
        seqs = [log.append("batched", {"n": i}) for i in range(3)]
        assert seqs == [2, 3, 4]
        head = json.loads(log.head_path.read_bytes())
        assert head["seq"] == 1  # the head moves only after the commit
        log.commit_batch()
        assert json.loads(log.head_path.read_bytes())["seq"] == 4
        log.begin_batch()
        log.append("lost", {"n": 9})
        log.rollback_batch()
        assert log.append("after", {}) == 5  # the chain continues from the committed head
        n, problems = log.verify()
        assert (n, problems) == (5, [])
        actions = [a for (a,) in log.db.execute("SELECT action FROM audit ORDER BY seq")]
        assert actions == ["one", "batched", "batched", "batched", "after"]
    finally:
        log.close()


# -- rate counters in one process ----------------------------------------------------------
def test_service_memory_rates_count_per_key_and_window() -> None:
    rates = MemoryRates()
    r = Rate(3, 10.0)
    assert [rates.hit("sn:01", r, 100.0) for _ in range(4)] == [True, True, True, False]
    assert rates.hit("sn:02", r, 100.5)  # another key has its own count
    assert not rates.hit("sn:01", r, 109.9)  # same window
    assert rates.hit("sn:01", r, 110.0)  # the next window starts from zero
    assert [rates.hit("c", Rate(1, 1.0), 200.0 + i) for i in range(3)] == [True] * 3


def test_audit_head_behind_after_a_crash_is_not_a_cut(tmp_path: Path) -> None:
    """A crash between a commit and the head's write leaves the head behind: not a
    problem. A head past the last record, or naming another hash, is one."""
    log = AuditLog(tmp_path / "audit.db")
    try:
        for i in range(3):
            log.append("a", {"n": i})
        head = log.head_path.read_bytes()
        # records committed, head not written (the crash window)
        log.begin_batch()
        log.append("b", {"n": 3})
        log.append("b", {"n": 4})
        log.db.execute("COMMIT")  # and the process dies before the head is written
        log.close()
        log = AuditLog(tmp_path / "audit.db")
        assert log.head_path.read_bytes() == head
        assert log.verify() == (5, [])
        # records cut off past the head's position: found
        log.db.execute("DELETE FROM audit WHERE seq >= 3")
        n, problems = log.verify()
        assert n == 2 and [p.seq for p in problems] == [3]
        # cut, then new records appended over the cut: the head's hash is not there
        log.append("forged", {"n": 2})
        log.head_path.write_bytes(head)  # the head as it was before the appends
        n, problems = log.verify()
        assert n == 3 and [p.seq for p in problems] == [3]
        assert "cut off" in problems[0].problem
        log.head_path.unlink()
        assert [p.problem for p in log.verify()[1]] == ["the head file is missing"]
    finally:
        log.close()


@pytest.mark.slow  # runs the console script
def test_service_fetch_retries_a_receipt_the_service_could_not_record(tmp_path: Path) -> None:
    """The key is in the unit once IMPORTKEY succeeds: a 503 on the receipt is retried."""
    from .test_service import run_cli, slot_state, start_service

    w = build_world(tmp_path, units=1)
    run = start_service(w, policy_doc(w))
    try:
        gc = run.inst.app.commits
        assert gc is not None
        exports, store, audit = gc.parts
        flaky = _FailsOnce(audit, 2)  # batch 1: the export; 2: the receipt, lost; 3: again
        run.inst.app.commits = GroupCommit([exports, store, flaky])
        cert, key = w.client_paths("terminal-1")
        p = run_cli("fetch", "--home", str(w.home), "--server", run.url, "--sn",
                    w.units_a[0].hex(), "--ref1", "TMK-1", "--ref2", "1", "--ca",
                    str(w.pki / "ca.pem"), "--cert", str(cert), "--key", str(key), "--json")
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["ledger"] is True
        assert flaky.commits == 3
        assert len(run.inst.store.ledger()) == 1
        assert slot_state(w, w.units_a[0], 1).kcv is not None
    finally:
        run.stop()


def test_service_checkpoints_run_off_the_event_loop(h: Harness) -> None:
    """The loop's connections never checkpoint (the fsyncs); a thread of its own does."""
    cp = h.inst.checkpoints
    assert cp is not None and cp._thread.is_alive()
    for db in (h.inst.exports.db, h.inst.store.db, h.inst.store.audit.db):  # type: ignore[attr-defined]
        assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 0  # never waits on the loop
    before = cp.checkpoints
    for i in range(20):
        assert h.request("POST", "/v1/exportkey", h.export_body(i))["status"] == 200
    deadline = time.monotonic() + 5
    while cp.checkpoints < before + 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cp.checkpoints >= before + 3
    wal = h.world.home / "service.db-wal"
    frames = h.rows("service.db", "PRAGMA wal_checkpoint(PASSIVE)")[0]
    assert frames[0] == 0 and frames[1] == frames[2]  # everything written was checkpointed
    assert wal.exists()
