"""Two ``keyload serve`` instances sharing one PostgreSQL: a challenge served by one is
refused by the other; receipts, rate limits and the audit chain are shared too."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyload.service.store import PostgresServiceStore
from keyload.station.pgserver import postgres_available, private_postgres

from ..conftest import require
from .test_service import (
    Running,
    build_world,
    export_json,
    init,
    policy_doc,
    problem,
    raw,
    start_service,
)


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


def test_service_two_instances_share_ledger_and_limits(pair: tuple[Running, Running, str]) -> None:
    one, two, url = pair
    w = one.world
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
        assert n >= 9 and bad == []
        instances = {d.get("instance") for _, act, d in store.audit_records() if act == "request"}
        assert instances == {"one", "two"}
        assert json.dumps(store.audit_records()).find("import_data") < 0
    finally:
        store.close()
