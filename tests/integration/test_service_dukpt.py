"""``keyload serve`` and a BDK (usage B0, docs/protocol.md Appendix D): its clients send
EXPORTKEY alone, which has no field for a unit's initial key ID, so an EXPORTKEY of a BDK
is refused 6986 (403 ``export-policy``), in JSON and in octets, with a detail that says
why; nothing is exported, recorded or stored in the unit, and no key material is in the
answer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from keyload.core import messages as msg
from keyload.core.errors import PolicyRefused
from keyload.core.keys import KeyAttributes, KeyType
from keyload.core.secret import Secret
from keyload.service.client import HttpsAuthority
from keyload.station.load import LoadFailed, UnitClient, load_key
from keyload.transports.local import LocalConnection
from keyload.units.authority import ExportPolicy

from .test_service import (
    Running,
    build_world,
    export_json,
    init,
    ledger_count,
    policy_doc,
    problem,
    raw,
    slot_state,
    start_service,
)

BDK = bytes.fromhex("FEDCBA9876543210F1F1F1F1F1F1F1F1")  # the X9.24-3 supplement's
WHY = ("a BDK is never exported", "initial key ID", "EXPORTKEY cannot carry it")


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    w = build_world(tmp_path_factory.mktemp("service-dukpt"), units=2)
    ks = w.open_keystore()
    try:
        ks.add_key(b"BDK-1", KeyType.AES128, Secret(BDK), KeyAttributes("B0", "X", "N"),
                   version=1, diversify=False,
                   policy=ExportPolicy(None, frozenset({2}), initial_keys_only=True))
    finally:
        ks.close()
    run = start_service(w, policy_doc(w))
    yield run
    run.stop()


def test_an_exportkey_of_a_bdk_is_refused_and_says_why(svc: Running) -> None:
    w = svc.world
    sn = w.units_a[0]
    before = ledger_count(svc)
    i = init(w, sn)
    status, headers, body = raw(svc, "POST", "/v1/exportkey", export_json(i, b"BDK-1", 2),
                                client="other")
    doc = problem(status, headers, body, 403, "export-policy")
    assert doc["sw"] == "6986"
    for words in WHY:
        assert words in doc["detail"], doc
    i = init(w, sn)
    req = msg.ExportRequest(i.sn, i.r, i.set_id, 1, b"BDK-1", 2).encode()
    octets = raw(svc, "POST", "/v1/exportkey", req, ctype="application/octet-stream",
                 client="other")
    assert problem(*octets, 403, "export-policy")["detail"] == doc["detail"]
    for answer in (body, octets[2]):
        assert BDK.hex() not in answer.decode().lower()
    assert slot_state(w, sn, 2).state == msg.SLOT_EMPTY
    assert ledger_count(svc) == before


def test_a_field_client_gets_the_refusal_as_a_final_error(svc: Running) -> None:
    w = svc.world
    sn = w.units_a[1]
    client = w.client(svc.url, "other")
    fleet = w.fleet()
    unit = fleet.open_unit(sn)
    try:
        with pytest.raises(LoadFailed) as ei:
            load_key(UnitClient(LocalConnection(unit)), HttpsAuthority(client), b"BDK-1", 2)
    finally:
        unit.close()
        fleet.close()
        client.close()
    cause = ei.value.cause
    # the same typed error a local authority raises, with the service's detail
    assert isinstance(cause, PolicyRefused) and cause.sw == 0x6986
    assert all(words in str(cause) for words in WHY), str(cause)
    assert slot_state(w, sn, 2).state == msg.SLOT_EMPTY
    assert BDK.hex() not in str(cause).lower()
