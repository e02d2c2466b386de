"""Two ``keyload serve`` instances sharing one PostgreSQL: a challenge served by one is
refused by the other; receipts, rate limits and the audit chain are shared too."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyload.lab.pgserver import postgres_available, private_postgres
from keyload.service.store import PostgresServiceStore

from ..conftest import require
from .test_service import (
    Running,
    World,
    build_world,
    export_json,
    init,
    policy_doc,
    problem,
    raw,
    start_service,
)

pytestmark = pytest.mark.hardware  # SoftHSM2, pcscd + vpcd or PostgreSQL (skips without)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, Running, str]]:
    ok, why = postgres_available()
    require(ok, f"PostgreSQL: {why}")
    d = Path(tmp_path_factory.mktemp("service-pg"))
    with private_postgres(d / "pg") as url:
        w = build_world(d, units=4)
        one = start_service(w, policy_doc(w), state=url, instance="one")
        two = start_service(w, policy_doc(w), state=url, instance="two")
        try:
            yield one, two, url
        finally:
            one.stop()
            two.stop()


def test_service_two_instances_share_the_replay_cache(pair: tuple[Running, Running, str]) -> None:
    one, two, _ = pair
    w = one.world
    i = init(w, w.units_a[0])
    req = export_json(i, b"TMK-1", 1)
    s, _, body = raw(one, "POST", "/v1/exportkey", req)
    assert s == 200, body
    problem(*raw(two, "POST", "/v1/exportkey", req), 409, "replay")
    problem(*raw(one, "POST", "/v1/exportkey", req), 409, "replay")


def _audit_count(url: str) -> int:
    store = PostgresServiceStore(url)
    try:
        return len(store.audit_records())
    finally:
        store.close()


def test_service_two_instances_share_ledger_and_limits(pair: tuple[Running, Running, str]) -> None:
    one, two, url = pair
    w = one.world
    before = _audit_count(url)  # the module's instances are shared: earlier tests' records
    from keyload.service.client import HttpsAuthority
    from keyload.station.load import UnitClient, load_key
    from keyload.transports.local import LocalConnection

    c1, c2 = w.client(one.url), w.client(two.url)
    try:
        fleet = w.fleet()
        unit = fleet.open_unit(w.units_a[1])
        res = load_key(UnitClient(LocalConnection(unit)), HttpsAuthority(c1), b"PIN-1", 2)
        unit.close()
        fleet.close()
        assert c2.post_receipt(res)["status"] == "recorded"  # exported by one, receipt at two
    finally:
        c1.close()
        c2.close()
    assert any(e.sn == w.units_a[1] and e.ref2 == 2 for e in two.inst.store.ledger())
    # per-SN limit (5 per minute) counted across both instances
    sn = w.units_a[2]
    codes = [raw(one if k % 2 else two, "POST", "/v1/exportkey",
                 export_json(init(w, sn), b"TMK-1", 1))[0] for k in range(6)]
    assert codes == [200] * 5 + [429], codes
    store = PostgresServiceStore(url)
    try:
        n, bad = store.verify_audit()
        # one record per request: the export and its receipt, then six exports (one 429)
        assert (n - before, bad) == (8, [])
        instances = {d.get("instance") for _, act, d in store.audit_records() if act == "request"}
        assert instances == {"one", "two"}
        assert json.dumps(store.audit_records()).find("import_data") < 0
    finally:
        store.close()


def test_service_two_instances_batch_concurrently_on_one_chain(
        pair: tuple[Running, Running, str]) -> None:
    """Both instances group-commit at once: every request answered, a challenge sent to
    both at the same moment served exactly once, the audit chain linear and whole."""
    from concurrent.futures import ThreadPoolExecutor

    one, two, url = pair
    w = one.world
    fresh = [_body(w, f"0C0C{k:04X}", os.urandom(16)) for k in range(40)]
    same = _body(w, "0D0D0001", os.urandom(16))  # one challenge, sent 8 times at once
    jobs = [(one if k % 2 else two, body) for k, body in enumerate([*fresh, *[same] * 8])]
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(
            lambda j: raw(j[0], "POST", "/v1/exportkey", j[1], client="other")[0], jobs))
    assert codes[:40] == [200] * 40, codes
    # per-SN limit 5: five reach the replay cache, one of them is served, four are replays
    assert sorted(codes[40:]) == [200, 409, 409, 409, 409, 429, 429, 429], codes
    store = PostgresServiceStore(url)
    try:
        n, bad = store.verify_audit()
        assert bad == [] and n >= 48
        served = [d for _, act, d in store.audit_records()
                  if act == "request" and d.get("sn") == "0d0d0001" and d["status"] == 200]
        assert len(served) == 1
    finally:
        store.close()
    for run in (one, two):
        s, _, b = raw(run, "GET", "/v1/metrics", client="monitor")
        assert s == 200 and b"keyload_commit_batches_total" in b


def _body(w: World, sn: str, r: bytes) -> bytes:
    return json.dumps({"sn": sn, "r": r.hex(), "set_id": w.set_a.hex(), "suite": 1,
                       "ref1": b"TMK-1".hex(), "ref2": 1}).encode()


def test_service_postgres_batch_commits_or_rolls_back_whole(
        pair: tuple[Running, Running, str]) -> None:
    from keyload.service.policy import Rate
    from keyload.service.store import Challenge

    _, _, url = pair
    store = PostgresServiceStore(url)
    try:
        def counts() -> tuple[int, int]:
            return (store._x("SELECT COUNT(*) FROM challenges")[0][0],
                    store._x("SELECT COUNT(*) FROM audit")[0][0])

        def work(tag: bytes) -> None:
            assert store.hit("client:batch-test", Rate(1000, 60), 1.0)
            assert store.claim(Challenge(b"\x0e" + tag, os.urandom(16), "other", b"\x01" * 5,
                                         b"TMK-1", 1, 1), 1.0)
            store.append("request", {"batch": tag.hex()})

        before = counts()
        store.begin_batch()
        work(b"\x01")
        work(b"\x02")
        store.rollback_batch()
        assert counts() == before  # nothing of a rolled-back batch remains
        store.begin_batch()
        work(b"\x03")
        work(b"\x04")
        store.commit_batch()
        assert counts() == (before[0] + 2, before[1] + 2)
        assert store.verify_audit()[1] == []
    finally:
        store.close()


def test_service_postgres_batch_with_a_failed_statement_commits_nothing(
        pair: tuple[Running, Running, str]) -> None:
    """PostgreSQL ends a transaction with a failed statement by rolling it back, even on
    COMMIT: the batch's commit must then fail, so that no request of it is answered."""
    from keyload.core.errors import StoreError

    _, _, url = pair
    store = PostgresServiceStore(url)
    try:
        before = store._x("SELECT COUNT(*) FROM audit")[0][0]
        store.begin_batch()
        store.append("request", {"batch": "doomed"})
        with pytest.raises(StoreError):
            store._x("SELECT 1 / 0")  # a statement fails inside the batch
        with pytest.raises(StoreError):
            store.commit_batch()
        store.rollback_batch()
        assert store._x("SELECT COUNT(*) FROM audit")[0][0] == before
        store.begin_batch()  # the connection is usable again
        store.append("request", {"batch": "next"})
        store.commit_batch()
        assert store._x("SELECT COUNT(*) FROM audit")[0][0] == before + 1
        assert store.verify_audit()[1] == []
    finally:
        store.close()


def test_service_postgres_admit_counts_and_claims_in_one_statement(
        pair: tuple[Running, Running, str]) -> None:
    from keyload.service.policy import Rate
    from keyload.service.store import ADMITTED, RATE_LIMITED, REPLAYED, Challenge

    _, _, url = pair
    store = PostgresServiceStore(url)
    rate = Rate(3, 3600)
    sn = os.urandom(8)

    def ch(r: bytes) -> Challenge:
        return Challenge(sn, r, "other", b"\x01" * 5, b"TMK-1", 1, 1)

    def claimed() -> int:
        return int(store._x("SELECT COUNT(*) FROM challenges WHERE sn = ?", (sn.hex(),))[0][0])

    try:
        r1, r2, r3 = os.urandom(16), os.urandom(16), os.urandom(16)
        store.begin_batch()
        verdicts = [store.admit(f"sn:{sn.hex()}", rate, ch(r), 10.0) for r in (r1, r1, r2, r3)]
        store.commit_batch()
        # each counts the window, logs itself and claims in one statement; statements of
        # the batch see each other's rows
        assert verdicts == [ADMITTED, REPLAYED, ADMITTED, RATE_LIMITED]
        assert claimed() == 2  # a rate-limited request claims nothing
        n = store._x("SELECT COUNT(*) FROM rate_log WHERE key = ?", (f"sn:{sn.hex()}",))[0][0]
        assert n == 3  # every admitted request logged once; the refused one not at all
        store.begin_batch()  # the next batch reads the shared count
        assert store.admit(f"sn:{sn.hex()}", rate, ch(os.urandom(16)), 10.0) == RATE_LIMITED
        store.commit_batch()
        assert claimed() == 2
    finally:
        store.close()


def test_service_postgres_audit_chain_verified_by_the_cli(
        pair: tuple[Running, Running, str]) -> None:
    from .test_service import run_cli

    one, _, url = pair
    raw(one, "GET", "/v1/health", client=None)  # at least one record
    p = run_cli("audit", "verify", "--home", str(one.world.home), "--state", url, "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["records"] >= 1 and out["problems"] == []
    store = PostgresServiceStore(url)
    try:
        detail = store._x("SELECT detail FROM audit WHERE seq = 1")[0][0]
        store._x("UPDATE audit SET detail = ? WHERE seq = 1", ('{"status":200}',))
        try:
            p = run_cli("audit", "verify", "--home", str(one.world.home), "--state", url)
            assert p.returncode == 1, p.stderr
            assert "record 1: edited" in p.stdout
        finally:
            store._x("UPDATE audit SET detail = ? WHERE seq = 1", (detail,))
        assert store.verify_audit()[1] == []
    finally:
        store.close()


def test_service_postgres_lock_held_elsewhere_is_a_prompt_503(
        pair: tuple[Running, Running, str]) -> None:
    """An instance stuck holding the audit chain's lock: the others' batches (on their
    database thread) fail after the busy timeout, not never; health says busy; released,
    all is served again."""
    import time

    import psycopg

    one, _, url = pair
    holder = psycopg.connect(url, autocommit=False)
    try:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (PostgresServiceStore.AUDIT_LOCK,))
        t0 = time.monotonic()
        i = init(one.world, one.world.units_a[3])
        s, h, b = raw(one, "POST", "/v1/exportkey", export_json(i, b"TMK-1", 1), client="other")
        assert time.monotonic() - t0 < 15  # lock_timeout is 2 s; waiting for ever was the bug
        problem(s, h, b, 503, "unavailable")
        s, h, b = raw(one, "GET", "/v1/health", client=None)
        problem(s, h, b, 503, "unavailable")
        assert "state (busy)" in json.loads(b)["detail"]
    finally:
        holder.rollback()
        holder.close()
    i = init(one.world, one.world.units_a[3])
    assert raw(one, "POST", "/v1/exportkey", export_json(i, b"TMK-1", 1),
               client="other")[0] == 200
