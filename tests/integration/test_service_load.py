"""A bounded load test of the real service: 64 concurrent field clients on loopback.

Fixed count (64 clients x 6 downloads) and a time bound; each download is a full KLP1
download (INITIALIZE DOWNLOAD on an in-memory unit, EXPORTKEY over HTTPS with mTLS,
IMPORTKEY, receipt back to the service). Every one must succeed and be in the ledger.
Figures are for benchmarks/service.py, never asserted here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyload.core.keys import KeyType
from keyload.service.client import HttpsAuthority
from keyload.station.load import UnitClient, load_key
from keyload.transports.local import LocalConnection
from keyload.units.unit import MemoryUnitStore, Slot, Unit, UnitState

from .test_service import Running, build_world, policy_doc, start_service

pytestmark = pytest.mark.slow  # 64 concurrent clients against a real service

CLIENTS, PER_CLIENT, BOUND_S = 64, 6, 120.0


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    w = build_world(Path(tmp_path_factory.mktemp("service-load")), units=1)
    run = start_service(w, policy_doc(w))
    yield run
    run.stop()


def test_service_load_64_concurrent_clients_zero_errors(svc: Running) -> None:
    w = svc.world
    errors: list[str] = []
    done = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(CLIENTS)

    def worker(k: int) -> None:
        client = w.client(svc.url)
        try:
            barrier.wait(30)
            for j in range(PER_CLIENT):
                sn = bytes.fromhex(f"5E{k:04X}{j:04X}")
                unit = Unit(MemoryUnitStore(UnitState.new(
                    sn, svc.ks.transport_key_copy(w.set_a),
                    {1: Slot(1, frozenset({KeyType.AES256}))})))
                res = load_key(UnitClient(LocalConnection(unit)), HttpsAuthority(client),
                               b"TMK-1", 1)
                client.post_receipt(res)
                with lock:
                    done[0] += 1
        except Exception as e:  # collected, reported below
            with lock:
                errors.append(f"client {k}: {e.__class__.__name__}: {e}")
        finally:
            client.close()

    before = len(svc.inst.store.ledger())
    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND_S)
    assert not any(t.is_alive() for t in threads), "the load test exceeded its time bound"
    assert errors == [], errors[:5]
    assert done[0] == CLIENTS * PER_CLIENT
    assert len(svc.inst.store.ledger()) == before + CLIENTS * PER_CLIENT
