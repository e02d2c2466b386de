"""Suite 0x03 (docs/protocol.md §10) over real PC/SC: a unit of an identity set and the
authority as virtual cards behind pcscd + vpcd, and enrolment of a card in a reader.

- A whole download card to card, in each way a card takes long messages (every suite-0x03
  message but IMPORTKEY's answer is over 255 bytes): extended APDUs (the card's ATR says
  extended length: one APDU per command), command chaining with ``61xx`` + GET RESPONSE
  (the ATR says chaining and no extended length), and a T=0 card (chaining, ``61xx``,
  GET RESPONSE). The unit application receives whole commands each time; the KCV, the
  slot and the unit's ECDSA receipt (verified from the export record and certificates)
  are the same.
- :func:`keyload.station.identity.enrol` over a reader: GENERATE UNIT KEY, the authority
  certifies, PUT CERTIFICATE; a wrong SN refused by the card (6982, nothing stored in
  it), a card of a transport-key set refused (6985, nothing registered).
- The command path: ``unit create --unenrolled``, ``unit serve-card``, ``unit enrol
  --reader``, then ``load`` and ``receipts``; and the refusals made before a card is
  touched.

Needs pcscd, the vpcd driver and pyscard: skipped with the reason on a laptop without
them, a failure in CI.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keyload.core.errors import IntegrityError, StatusError
from keyload.core.identity import Certificate
from keyload.core.keys import KeyAttributes, KeyType, kcv
from keyload.core.secret import Secret
from keyload.lab.cards import LongApdus, VirtualCard
from keyload.lab.pcscd import VPCD_PORTS, Pcscd
from keyload.station.identity import enrol
from keyload.station.load import AuthorityClient, UnitClient, load_key3
from keyload.transports import Connection
from keyload.transports.local import CardApplication, LocalConnection
from keyload.transports.pcsc import PcscConnection, wait_for_card, wait_for_removal
from keyload.units.authority import Authority, ExportPolicy, MemoryExportLog
from keyload.units.keystore import SoftwareKeystore
from keyload.units.unit import MemoryUnitStore, Slot, Unit, UnitState

from .cli_helpers import KEYLOAD, PASSPHRASE, Result, assert_error, cli_env, ok, run

pytestmark = pytest.mark.hardware  # SoftHSM2, pcscd + vpcd or PostgreSQL (skips without)

UNIT_PORT, AUTHORITY_PORT = VPCD_PORTS
KEY = bytes(range(0x40, 0x60))
EXIT_INPUT, EXIT_REFUSED = 3, 6


@dataclass
class IdWorld:
    ks: SoftwareKeystore
    set_id: bytes
    t_set: bytes
    log: MemoryExportLog = field(default_factory=MemoryExportLog)

    @property
    def authority(self) -> Authority:
        return Authority(self.ks, log=self.log)

    def blank(self, sn: bytes) -> Unit:
        return Unit(MemoryUnitStore(UnitState.new_identity(
            sn, {1: Slot(1, frozenset({KeyType.AES256}))})))


@pytest.fixture
def world() -> Iterator[IdWorld]:
    ks = SoftwareKeystore.ephemeral()
    set_id = ks.generate_identity_set("plant", authority_id=b"AS-1").set_id
    t_set = ks.generate_set("plain").set_id
    ks.add_key(b"K1", KeyType.AES256, Secret(KEY), KeyAttributes("K0", "B", "E"), version=1,
               diversify=False, policy=ExportPolicy(None, None))
    yield IdWorld(ks, set_id, t_set)
    ks.close()


@dataclass
class Lengths:
    """The longest command and answer a station carried (to show they were long)."""

    inner: Connection
    longest_out: int = 0
    longest_in: int = 0

    def transmit(self, apdu: bytes) -> bytes:
        r = self.inner.transmit(apdu)
        self.longest_out = max(self.longest_out, len(apdu))
        self.longest_in = max(self.longest_in, len(r))
        return r


@contextmanager
def in_reader(pcscd: Pcscd, app: CardApplication, port: int, *, t0: bool = False,
              long_apdus: LongApdus = "extended") -> Iterator[tuple[VirtualCard, str]]:
    """A card in the reader of ``port`` for the block; at the end it is out, and pcscd
    knows it."""
    reader = pcscd.reader_for_port(port)
    card = VirtualCard(app, port, t0=t0, long_apdus=long_apdus).start()
    try:
        wait_for_card(reader, 5)
        yield card, reader
    finally:
        card.stop()
        wait_for_removal(reader, 5)


# (ATR options, (unit, authority) C-APDUs received, the first reader protocol)
MODES = {
    # one APDU per command: SELECT, INITIALIZE DOWNLOAD, IMPORTKEY | SELECT, EXPORTKEY
    "extended": ({}, (3, 2)),
    # INITIALIZE's answer by GET RESPONSE, IMPORTKEY in two pieces | EXPORTKEY in two
    # pieces, its answer by GET RESPONSE
    "chaining": ({"long_apdus": "chaining"}, (5, 4)),
    # T=0: the same, and IMPORTKEY's short answer by GET RESPONSE too
    "t0": ({"long_apdus": "chaining", "t0": True}, (6, 5)),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_suite3_download_card_to_card(pcscd: Pcscd, world: IdWorld, mode: str) -> None:
    opts, (unit_apdus, authority_apdus) = MODES[mode]
    unit = world.blank(b"ID-CARD-1")
    enrol(LocalConnection(unit), world.ks, world.set_id, unit.sn)
    authority = world.authority
    with in_reader(pcscd, unit, UNIT_PORT, **opts) as (ucard, ureader), \
            in_reader(pcscd, authority, AUTHORITY_PORT, **opts) as (acard, areader), \
            PcscConnection(ureader) as uconn, PcscConnection(areader) as aconn:
        assert uconn.long_apdus == ("extended" if mode == "extended" else "chaining")
        ulen, alen = Lengths(uconn), Lengths(aconn)
        res = load_key3(UnitClient(ulen), AuthorityClient(alen), b"K1", 1)
        assert ucard.stats.commands == unit_apdus and ucard.stats.delivered == 3
        assert acard.stats.commands == authority_apdus and acard.stats.delivered == 2
    # the station carried messages over 255 bytes, whole, both ways
    assert ulen.longest_in > 256 + 2 and ulen.longest_out > 255 + 7
    assert alen.longest_in > 256 + 2 and alen.longest_out > 255 + 7
    slot = unit.state.slots[1]
    assert slot.key is not None and slot.key.equals(KEY)
    assert res.kcv == slot.kcv == kcv(KeyType.AES256, KEY)
    assert res.suite == 3 and slot.ref1 == b"K1" and len(res.rct) == 64
    (record,) = world.log.records
    assert record.c_u is not None and record.e_a is not None
    args = dict(set_id=res.set_id, c_u=Certificate.decode(record.c_u), r=res.r, ref2=1,
                ref1=b"K1", h=res.header, kcv=res.kcv, e_a=record.e_a)
    authority.verify_receipt3(**args, rct=res.rct)
    with pytest.raises(IntegrityError):
        authority.verify_receipt3(**args, rct=bytes((res.rct[0] ^ 1,)) + res.rct[1:])


def test_enrol_a_card_in_a_reader_then_load_it(pcscd: Pcscd, world: IdWorld) -> None:
    unit = world.blank(b"ID-CARD-2")
    with in_reader(pcscd, unit, UNIT_PORT) as (_, reader):
        with PcscConnection(reader) as conn:
            cert = enrol(conn, world.ks, world.set_id, unit.sn)
        st = unit.state
        assert st.certificate == cert.encode() and st.set_id == world.set_id
        assert st.q_ca == world.ks.identity_set(world.set_id).q_ca
        rec = world.ks.unit_record(world.set_id, unit.sn)
        assert rec is not None and not rec.revoked and rec.certificate == cert
        with PcscConnection(reader) as conn:  # enrolled: it loads by suite 0x03
            res = load_key3(UnitClient(conn), AuthorityClient(LocalConnection(world.authority)),
                            b"K1", 1)
        assert res.sn == unit.sn and res.kcv == unit.state.slots[1].kcv
        with PcscConnection(reader) as conn, \
                pytest.raises(StatusError, match="GENERATE UNIT KEY: 6985 "):
            enrol(conn, world.ks, world.set_id, b"ID-CARD-OTHER")  # a key made once only
    assert world.ks.unit_record(world.set_id, b"ID-CARD-OTHER") is None


def test_a_card_refuses_a_certificate_for_another_sn(pcscd: Pcscd, world: IdWorld) -> None:
    """The operator names a card's SN; the card checks it (C1 = its SN) and stores
    nothing; the authority, which certified before the card could check, has the SN in
    its register (module docstring of keyload.station.identity)."""
    unit = world.blank(b"ID-CARD-3")
    with in_reader(pcscd, unit, UNIT_PORT) as (_, reader), PcscConnection(reader) as conn, \
            pytest.raises(StatusError, match=r"PUT CERTIFICATE: 6982 .* SN") as refused:
        enrol(conn, world.ks, world.set_id, b"NOT-ITS-SN")
    assert refused.value.sw == 0x6982
    assert unit.state.certificate is None and unit.state.q_ca is None
    assert unit.state.unit_key is not None  # made once, kept (§10.2)
    assert world.ks.unit_record(world.set_id, b"NOT-ITS-SN") is not None
    assert world.ks.unit_record(world.set_id, unit.sn) is None


def test_a_card_of_a_transport_key_set_is_not_enrolled(pcscd: Pcscd, world: IdWorld) -> None:
    t_unit = Unit(MemoryUnitStore(UnitState.new(
        b"T-CARD-1", world.ks.transport_key_copy(world.t_set),
        {1: Slot(1, frozenset({KeyType.AES256}))})))
    with in_reader(pcscd, t_unit, UNIT_PORT) as (_, reader), PcscConnection(reader) as conn, \
            pytest.raises(StatusError, match=r"GENERATE UNIT KEY: 6985 ") as refused:
        enrol(conn, world.ks, world.set_id, t_unit.sn)
    assert refused.value.sw == 0x6985
    assert world.ks.unit_records(world.set_id) == []


# -- the command path ------------------------------------------------------------------
@contextmanager
def serving(home: Path, sn: str, times: int = 1) -> Iterator[subprocess.Popen[str]]:
    """``keyload unit serve-card --sn SN`` in the background for the block; the card is
    fed ``times`` times (taken out after each station's use, and put in again)."""
    p = subprocess.Popen([str(KEYLOAD), "unit", "serve-card", *["--sn", sn] * times, "--port",
                          str(UNIT_PORT), "--home", str(home)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=cli_env(PASSPHRASE))
    try:
        yield p
    finally:
        if p.poll() is None:
            p.terminate()
        p.communicate(timeout=10)


@pytest.mark.slow
def test_cli_unit_enrol_a_card_served_from_an_unenrolled_unit(pcscd: Pcscd,
                                                               tmp_path: Path) -> None:
    if not KEYLOAD.is_file():
        pytest.skip(f"the keyload console script is not installed at {KEYLOAD}")
    home = tmp_path / "home"
    sn = "1dc0000001"

    def k(*args: str) -> Result:
        return run(*args, home=home)

    ok(k("authority", "init"))
    id_set = ok(k("set", "create", "--name", "plant", "--identity", "--json")).json()["set_id"]
    t_set = ok(k("set", "create", "--name", "plain", "--json")).json()["set_id"]
    ok(k("key", "generate", "--ref1", "TMK-1", "--type", "aes256", "--usage", "K0", "--mode",
         "B", "--exportability", "E", "--key-version", "1", "--sets", "any", "--slots", "any"))
    made = ok(k("unit", "create", "--set", id_set, "--sn", sn, "--slot", "1=aes256",
                "--slot", "2=aes256", "--unenrolled", "--json")).json()
    assert made == {"sn": sn, "set_id": id_set, "slots": [1, 2], "enrolled": False}
    assert ok(k("unit", "list", "--set", id_set, "--json")).json()["units"] == []
    # refused before any card is touched (no card is in the reader yet)
    reader = pcscd.reader_for_port(UNIT_PORT)
    assert_error(k("unit", "enrol", "--reader", reader, "--set", t_set, "--sn", sn),
                 EXIT_INPUT, "transport-key set")
    assert_error(k("unit", "create", "--set", id_set, "--sn", "1dc0000002", "--unenrolled",
                   "--suites", "3"), EXIT_INPUT, "--unenrolled")
    with serving(home, sn) as served:
        wait_for_card(reader, 10)
        out = ok(k("unit", "enrol", "--reader", reader, "--set", id_set, "--sn", sn,
                   "--json")).json()
        stdout, _ = served.communicate(timeout=15)
        assert served.returncode == 0 and stdout.splitlines()[-1] == "1 unit served"
    wait_for_removal(reader, 5)
    assert out["sn"] == sn and out["set_id"] == id_set and out["reader"] == reader
    assert ok(k("unit", "list", "--set", id_set, "--json")).json()["units"] == [
        {"set_id": id_set, "sn": sn, "status": "active", "certificate": out["certificate"]}]
    assert_error(k("unit", "enrol", "--reader", reader, "--set", id_set, "--sn", sn),
                 EXIT_INPUT, "already certified")
    # the enrolled card loads over PC/SC by suite 0x03 (keyload load --reader) ...
    with serving(home, sn, times=2) as served:
        wait_for_card(reader, 10)
        assert_error(k("load", "--reader", reader, "--sn", "1dc0000009", "--ref1", "TMK-1",
                       "--ref2", "1"), EXIT_INPUT, "is unit 1dc0000001, not 1dc0000009")
        wait_for_card(reader, 10)
        by_card = ok(k("load", "--reader", reader, "--sn", sn, "--ref1", "TMK-1", "--ref2",
                       "1", "--json")).json()
        stdout, _ = served.communicate(timeout=15)
        assert served.returncode == 0 and stdout.splitlines()[-1] == "2 units served"
    wait_for_removal(reader, 5)
    # ... and it is the emulated unit behind the card: it loads in process too
    loaded = ok(k("load", "--sn", sn, "--ref1", "TMK-1", "--ref2", "2", "--json")).json()
    for out, ref2 in ((by_card, 1), (loaded, 2)):
        assert out["suite"] == 3 and out["set_id"] == id_set and out["sn"] == sn
        assert out["ref2"] == ref2 and len(bytes.fromhex(out["receipt"])) == 64
    assert ok(k("receipts")).last_line() == "2 receipts verified, 0 invalid"
    status = ok(k("unit", "status", "--sn", sn, "--json")).json()
    assert status["set_id"] == id_set
    assert [s["kcv"] for s in status["slots"]] == [by_card["kcv"], loaded["kcv"]]
    # a card of a transport-key set in the same reader loads by suite 0x01
    ok(k("unit", "create", "--set", t_set, "--sn", "0dc0000001", "--slot", "1=aes256"))
    with serving(home, "0dc0000001"):
        wait_for_card(reader, 10)
        by_t_card = ok(k("load", "--reader", reader, "--ref1", "TMK-1", "--ref2", "1",
                         "--json")).json()
    wait_for_removal(reader, 5)
    assert (by_t_card["sn"], by_t_card["set_id"], by_t_card["suite"]) == (
        "0dc0000001", t_set, 1)
    assert ok(k("receipts")).last_line() == "3 receipts verified, 0 invalid"
    usage = k("load", "--ref1", "TMK-1", "--ref2", "1")
    assert usage.rc == 2 and usage.stderr.splitlines()[-1] == \
        "keyload load: error: one of --sn or --reader is required"


@pytest.mark.slow
def test_cli_campaign_run_over_a_reader_of_identity_cards(pcscd: Pcscd, tmp_path: Path) -> None:
    """``campaign run --reader`` (run_reader) customizes enrolled cards of an identity set
    fed through a reader, by suite 0x03; their ECDSA receipts verify."""
    if not KEYLOAD.is_file():
        pytest.skip(f"the keyload console script is not installed at {KEYLOAD}")
    home = tmp_path / "home"
    sns = ["1dc1000001", "1dc1000002"]

    def k(*args: str) -> Result:
        return run(*args, home=home)

    ok(k("authority", "init"))
    id_set = ok(k("set", "create", "--name", "plant", "--identity", "--json")).json()["set_id"]
    ok(k("key", "generate", "--ref1", "TMK-1", "--type", "aes256", "--usage", "K0", "--mode",
         "B", "--exportability", "E", "--key-version", "1", "--sets", "any", "--slots", "1"))
    for sn in sns:
        ok(k("unit", "create", "--set", id_set, "--sn", sn, "--slot", "1=aes256"))
    ok(k("campaign", "create", "c3", "--set", id_set, "--load", "TMK-1:1"))
    reader = pcscd.reader_for_port(UNIT_PORT)
    p = subprocess.Popen([str(KEYLOAD), "unit", "serve-card", "--port", str(UNIT_PORT),
                          "--home", str(home)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=cli_env(PASSPHRASE))
    try:
        res = k("campaign", "run", "c3", "--reader", reader, "--cards", str(len(sns)),
                "--quiet")
    finally:
        if p.poll() is None:
            p.terminate()
        p.communicate(timeout=10)
    wait_for_removal(reader, 5)
    ok(res)
    assert res.last_line() == f"{len(sns)} of {len(sns)} loads imported, 0 failed"
    for sn in sns:
        slots = ok(k("unit", "status", "--sn", sn, "--json")).json()["slots"]
        assert slots[0]["state"] == "loaded"
    assert "0 invalid" in ok(k("ledger", "verify")).stdout
