"""``keyload fetch --reader``: remote download into a unit reached through a PC/SC reader.

Real parts end to end: the real service on loopback with real mutual TLS
(:func:`start_service`), pcscd with the vpcd readers, an emulated unit of the world's set
served as a virtual card in the first vpcd reader, and ``keyload fetch --reader`` run
through the real CLI in a subprocess (which talks to pcscd itself). The unit's slots are
read back over PC/SC (GET SLOT STATUS) and, once the card is out of the reader, from the
unit's own stored state; the service's ledger and the authority's export records are
checked too.

Then the refusals through the reader: a REF1, a set or a client the policy refuses
(exit 6, nothing exported, nothing loaded, nothing in the ledger), an empty reader and a
reader that does not exist (a one-line transport error, exit 1, the service never
asked), a card that is not the unit ``--sn`` names (exit 3, nothing asked), and the
same key version fetched twice (the unit refuses with 6986, the ledger is unchanged).

Needs pcscd, the vpcd driver and pyscard: skipped with the reason on a laptop without
them, a failure in CI. The module starts its own pcscd (or reuses a running one) under
the vpcd lock shared with the other PC/SC tests and the benchmarks, and stops what it
started; every card is removed, and its removal seen by pcscd, before the next test.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from keyload.core import messages as msg
from keyload.core.keys import KeyHeader
from keyload.lab.cards import VirtualCard
from keyload.lab.pcscd import VPCD_PORTS, Pcscd
from keyload.station.load import UnitClient
from keyload.transports.pcsc import PcscConnection, wait_for_card, wait_for_removal
from keyload.units.unit import Unit

from .test_service import (
    Running,
    World,
    build_world,
    ledger_count,
    policy_doc,
    run_cli,
    slot_state,
    start_service,
)

pytestmark = pytest.mark.hardware  # SoftHSM2, pcscd + vpcd or PostgreSQL (skips without)

PORT = VPCD_PORTS[0]
EXIT_FAILED, EXIT_USAGE, EXIT_INPUT, EXIT_REFUSED = 1, 2, 3, 6  # keyload.cli.main


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    w = build_world(tmp_path_factory.mktemp("service-pcsc"), units=6)
    run = start_service(w, policy_doc(w), instance="pcsc")
    yield run
    run.stop()


@pytest.fixture
def reader(pcscd: Pcscd) -> str:
    name = pcscd.reader_for_port(PORT)
    wait_for_removal(name, 5)  # empty at the start of every test
    return name


# -- helpers -----------------------------------------------------------------------------
@contextmanager
def unit_card(w: World, sn: bytes, reader: str) -> Iterator[Unit]:
    """The emulated unit ``sn`` of the world's fleet as a virtual card in ``reader`` for
    the block; at the end the card is out, pcscd knows it, and the unit is closed."""
    fleet = w.fleet()
    try:
        unit = fleet.open_unit(sn)
        try:
            card = VirtualCard(unit, PORT).start()
            try:
                wait_for_card(reader, 5)
                yield unit
            finally:
                card.stop()
                wait_for_removal(reader, 5)
        finally:
            unit.close()
    finally:
        fleet.close()


def fetch(run: Running, reader: str | None, ref1: str, ref2: int, *,
          unit: bytes | None = None, client: str = "terminal-1",
          home: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``keyload fetch … --json`` through the real CLI, in a subprocess."""
    w = run.world
    cert, key = w.client_paths(client)
    args = ["fetch", "--home", str(home or w.dir / "terminal-home"), "--server", run.url,
            "--ref1", ref1, "--ref2", str(ref2), "--ca", str(w.pki / "ca.pem"),
            "--cert", str(cert), "--key", str(key), "--json"]
    if reader is not None:
        args += ["--reader", reader]
    if unit is not None:
        args += ["--sn", unit.hex()]
    return run_cli(*args)


def failed(p: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """The command failed with ``code`` and one clear line on stderr (no traceback); on
    stdout (``--json``) only that error as JSON."""
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    err = p.stderr.strip()
    assert "Traceback" not in p.stderr and len(err.splitlines()) == 1, p.stderr
    for n in needles:
        assert n in err, err
    js = json.loads(p.stdout)["error"]
    assert js == {"code": js["code"], "exit": code,
                  "message": err.removeprefix("keyload: error: ")}, p.stdout
    return err


def status_over_pcsc(reader: str, ref2: int) -> msg.SlotStatus:
    with PcscConnection(reader) as pc:
        uc = UnitClient(pc)
        uc.select()
        return uc.slot_status(ref2)


def exports_count(run: Running) -> int:
    return run.inst.exports.count()


# -- end to end --------------------------------------------------------------------------
def test_service_fetch_reader_end_to_end(svc: Running, reader: str) -> None:
    w = svc.world
    sn = w.units_a[0]
    home = w.dir / "terminal-e2e"
    n_ledger, n_exports = ledger_count(svc), exports_count(svc)
    outs = {}
    with unit_card(w, sn, reader) as unit:
        # the SN comes from the card: no --unit, and no home (a field terminal has none)
        p = fetch(svc, reader, "TMK-1", 1, home=home)
        assert p.returncode == 0, p.stderr
        outs[1] = json.loads(p.stdout)
        # --sn with --reader: the card must be that unit
        p = fetch(svc, reader, "PIN-1", 2, unit=sn, home=home)
        assert p.returncode == 0, p.stderr
        outs[2] = json.loads(p.stdout)
        over_pcsc = {ref2: status_over_pcsc(reader, ref2) for ref2 in (1, 2)}
    assert not home.exists()
    versions = {1: ("TMK-1", 1), 2: ("PIN-1", 3)}
    exports = svc.inst.exports.records()
    assert len(exports) == n_exports + 2
    entries = svc.inst.store.ledger()
    assert len(entries) == n_ledger + 2
    for ref2, out in outs.items():
        ref1, version = versions[ref2]
        assert out["sn"] == sn.hex() and out["set_id"] == w.set_a.hex()
        assert (out["ref1"], out["ref2"], out["key_version"]) == (ref1, ref2, version)
        assert out["ledger"] is True
        # the authority's KCV for this export (it computed it from the key it wrapped)
        rec = [e for e in exports if e.sn == sn and e.ref1 == ref1.encode()][-1]
        assert (rec.ref2, rec.key_version) == (ref2, version)
        assert out["kcv"] == rec.kcv.hex().upper()
        # the unit, over PC/SC while in the reader, and from its stored state afterwards
        for st in (over_pcsc[ref2], slot_state(w, sn, ref2)):
            assert st.state == msg.SLOT_LOADED and st.kcv == rec.kcv and st.h is not None
            assert KeyHeader.decode(st.h).version == version
        assert unit.state.slots[ref2].kcv == rec.kcv
        # the ledger: the receipt the unit gave, verified again by the authority
        (e,) = [e for e in entries if e.sn == sn and e.ref2 == ref2]
        assert (e.ref1, e.key_version, e.kcv, e.client) == (ref1.encode(), version, rec.kcv,
                                                           "terminal-1")
        assert e.rct.hex() == out["receipt"]
        svc.inst.app.authority.verify_receipt(suite=e.suite, set_id=e.set_id, sn=e.sn, r=e.r,
                                              ref2=e.ref2, h=e.header, kcv=e.kcv, rct=e.rct)


# -- refusals ----------------------------------------------------------------------------
def test_service_fetch_reader_unauthorized_is_refused_and_nothing_loaded(
        svc: Running, reader: str) -> None:
    w = svc.world
    n_ledger, n_exports = ledger_count(svc), exports_count(svc)
    sn = w.units_a[1]
    with unit_card(w, sn, reader):
        # a REF1 this client may not ask for (the authority itself would export it)
        failed(fetch(svc, reader, "SECRET-9", 1), EXIT_REFUSED, "HTTP 403 ref1-not-authorized")
        # a client the policy does not know
        failed(fetch(svc, reader, "TMK-1", 1, client="intruder"), EXIT_REFUSED,
               "HTTP 403 client-not-authorized")
        assert status_over_pcsc(reader, 1).state == msg.SLOT_EMPTY
    # a unit of a set this client may not serve
    with unit_card(w, w.unit_b, reader):
        failed(fetch(svc, reader, "TMK-1", 1), EXIT_REFUSED, "HTTP 403 set-not-authorized")
        assert status_over_pcsc(reader, 1).state == msg.SLOT_EMPTY
    for s in (sn, w.unit_b):
        assert all(slot_state(w, s, ref2).state == msg.SLOT_EMPTY for ref2 in (1, 2))
    assert ledger_count(svc) == n_ledger
    assert exports_count(svc) == n_exports


def test_service_fetch_reader_without_a_card_is_a_transport_error(svc: Running,
                                                                  reader: str) -> None:
    n_ledger, n_exports = ledger_count(svc), exports_count(svc)
    failed(fetch(svc, reader, "TMK-1", 1), EXIT_FAILED, repr(reader), "no card in the reader")
    failed(fetch(svc, "No Such Reader 00 00", "TMK-1", 1), EXIT_FAILED,
           "'No Such Reader 00 00'", "no reader with this name")
    assert ledger_count(svc) == n_ledger
    assert exports_count(svc) == n_exports


def test_service_fetch_reader_card_is_not_the_unit_named(svc: Running, reader: str) -> None:
    w = svc.world
    sn, other = w.units_a[3], w.units_a[4]
    n_ledger, n_exports = ledger_count(svc), exports_count(svc)
    with unit_card(w, sn, reader):
        failed(fetch(svc, reader, "TMK-1", 1, unit=other), EXIT_INPUT, sn.hex(), other.hex())
    assert exports_count(svc) == n_exports  # refused before the service was asked
    assert ledger_count(svc) == n_ledger
    assert slot_state(w, sn, 1).state == msg.SLOT_EMPTY
    assert slot_state(w, other, 1).state == msg.SLOT_EMPTY


def test_service_fetch_reader_same_version_twice_is_refused_by_the_unit(
        svc: Running, reader: str) -> None:
    w = svc.world
    sn = w.units_a[2]
    with unit_card(w, sn, reader):
        p = fetch(svc, reader, "TMK-1", 1)
        assert p.returncode == 0, p.stderr
        first = json.loads(p.stdout)
        n_ledger = ledger_count(svc)
        failed(fetch(svc, reader, "TMK-1", 1), EXIT_REFUSED, "unit IMPORTKEY", "6986")
        assert ledger_count(svc) == n_ledger
        st = status_over_pcsc(reader, 1)
    assert st.kcv is not None and st.kcv.hex().upper() == first["kcv"]
    assert slot_state(w, sn, 1).kcv == st.kcv
    assert [e.rct.hex() for e in svc.inst.store.ledger() if e.sn == sn] == [first["receipt"]]


# -- arguments (no reader needed) ----------------------------------------------------------
def test_service_fetch_needs_unit_or_reader(svc: Running) -> None:
    n_exports = exports_count(svc)
    p = fetch(svc, None, "TMK-1", 1)
    assert p.returncode == EXIT_USAGE, p.stderr
    assert "Traceback" not in p.stderr
    usage, *_, last = p.stderr.strip().splitlines()  # as argparse reports a usage error
    assert json.loads(p.stdout)["error"] == {
        "code": "usage", "exit": EXIT_USAGE, "message": last.removeprefix("keyload fetch: error: ")}
    assert usage.startswith("usage: keyload fetch") and "[--sn SN]" in p.stderr
    assert last == ("keyload fetch: error: give --sn SN (an emulated unit of the home) or "
                    "--reader READER (the unit in a PC/SC reader)")
    assert exports_count(svc) == n_exports
