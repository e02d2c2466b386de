"""KLP1 over real PC/SC: pcscd + vpcd readers + keyload's virtual cards (units, authority).

Needs pcscd, the vpcd driver and pyscard: skipped with the reason on a laptop without
them, a failure in CI. The module starts its own pcscd (or reuses a running one) and
stops what it started; every card is removed, and its removal seen by pcscd, before the
next test.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from keyload.core.aids import INS_IMPORT
from keyload.core.apdu import CommandAPDU
from keyload.core.errors import TransportError
from keyload.lab.cards import CardFeeder, CardOS, LongApdus, VirtualCard, make_atr
from keyload.lab.pcscd import VPCD_PORTS, Pcscd, running_pcscd
from keyload.station.customize import customize
from keyload.station.load import AuthorityClient, LoadFailed, LoadResult, UnitClient, load_key
from keyload.transports import Connection
from keyload.transports.iso7816 import CommandChaining, GetResponse
from keyload.transports.local import CardApplication, LocalConnection
from keyload.transports.pcsc import (
    CardProtocol,
    NoCard,
    PcscConnection,
    PcscError,
    PcscUnitSource,
    cards_in_reader,
    list_readers,
    parse_atr,
    wait_for_card,
    wait_for_removal,
)
from keyload.transports.wrappers import LockedConnection
from keyload.units.unit import Unit

from .fixtures import World, make_world, slots_snapshot

pytestmark = pytest.mark.hardware  # SoftHSM2, pcscd + vpcd or PostgreSQL (skips without)

PORT_A, PORT_B = VPCD_PORTS
PLAN = [(b"AES", 1), (b"MAC", 2)]


# -- helpers -----------------------------------------------------------------------------
@dataclass
class Counting:
    """Counts the C-APDUs a station sends on one connection."""

    inner: Connection
    count: int = 0

    def transmit(self, apdu: bytes) -> bytes:
        self.count += 1
        return self.inner.transmit(apdu)


@dataclass
class FlipImportBit:
    """A malicious station: flips one bit of the wrapped key W in IMPORTKEY's data."""

    inner: Connection

    def transmit(self, apdu: bytes) -> bytes:
        if apdu[1] == INS_IMPORT:
            cmd = CommandAPDU.decode(apdu)
            data = bytearray(cmd.data)
            # C7 01 ref2 | C8 0C h(12) | C9 len W...
            assert data[0] == 0xC7 and data[3] == 0xC8 and data[17] == 0xC9
            data[19 + 5] ^= 0x10
            apdu = CommandAPDU(cmd.cla, cmd.ins, cmd.p1, cmd.p2, bytes(data), ne=cmd.ne).encode()
        return self.inner.transmit(apdu)


class Recording:
    """A card application wrapper that keeps every whole command the application got."""

    def __init__(self, app: Unit) -> None:
        self.app = app
        self.received: list[bytes] = []

    @property
    def sn(self) -> bytes:
        return self.app.sn

    def reset(self) -> None:
        self.app.reset()

    def process_apdu(self, apdu: bytes) -> bytes:
        self.received.append(apdu)
        return self.app.process_apdu(apdu)


class PulledOutOnImport:
    """The card is pulled out of the reader when IMPORTKEY arrives, before it is run."""

    def __init__(self, app: Unit) -> None:
        self.app = app
        self.card: VirtualCard | None = None

    def reset(self) -> None:
        self.app.reset()

    def process_apdu(self, apdu: bytes) -> bytes:
        if apdu[1] == INS_IMPORT and self.card is not None:
            self.card.remove()
            return b"\x6f\x00"  # never sent: the card is gone
        return self.app.process_apdu(apdu)


@contextmanager
def inserted(app: CardApplication, reader: str, port: int, *, t0: bool = False,
             long_apdus: LongApdus = "extended") -> Iterator[VirtualCard]:
    """A card in the reader for the block; at the end it is removed and pcscd knows it."""
    card = VirtualCard(app, port, t0=t0, long_apdus=long_apdus).start()
    try:
        wait_for_card(reader, 5)
        yield card
    finally:
        card.stop()
        wait_for_removal(reader, 5)


def _verify(world: World, res: LoadResult) -> None:
    world.authority.verify_receipt(suite=res.suite, set_id=res.set_id, sn=res.sn, r=res.r,
                                   ref2=res.ref2, h=res.header, kcv=res.kcv, rct=res.rct)


# -- fixtures ----------------------------------------------------------------------------
@pytest.fixture
def world() -> World:
    return make_world()


# -- offline: ATR and the ISO 7816-4 wrappers against the card OS -------------------------
@dataclass
class _OsApp:
    os: CardOS

    def process_apdu(self, apdu: bytes) -> bytes:
        return self.os.command(apdu)


def test_atr_says_protocols_and_long_command_support() -> None:
    ext = parse_atr(make_atr())
    assert (ext.protocols, ext.extended, ext.chaining) == (frozenset({1}), True, False)
    ch = parse_atr(make_atr(extended=False, chaining=True))
    assert (ch.extended, ch.chaining) == (False, True)
    t0 = parse_atr(make_atr(t0=True, extended=False, chaining=True))
    assert t0.protocols == frozenset({0})
    assert parse_atr(bytes.fromhex("3b8080010101")).extended is None  # says nothing


def test_chaining_and_get_response_wrappers_offline(world: World) -> None:
    unit = Recording(world.unit(b"OFFLINE"))
    card = CardOS(unit, long_apdus="chaining", t0=True)
    conn = CommandChaining(GetResponse(LocalConnection(_OsApp(card))))
    UnitClient(conn).select()
    init = UnitClient(conn).initialize()  # Le 00 -> 6Cxx -> resent with the exact Le
    assert init.sn == b"OFFLINE"
    data = os.urandom(300)
    r = conn.transmit(CommandAPDU(0x80, INS_IMPORT, 0, 0, data, ne=65536).encode())
    assert r == b"\x6a\x80"
    assert CommandAPDU.decode(unit.received[-1]).data == data  # arrived whole
    assert card.stats.commands == 1 + 2 + 2  # SELECT, INIT + resend, two chained pieces


@dataclass
class _Answers:
    """An application that answers every command with ``data`` and 9000."""

    data: bytes

    def process_apdu(self, apdu: bytes) -> bytes:
        return self.data + b"\x90\x00"


@pytest.mark.parametrize("t0", [False, True], ids=["t1", "t0"])
def test_a_short_apdu_card_answers_over_256_bytes_in_pieces_offline(t0: bool) -> None:
    """A card without extended length (chaining, T=1 or T=0) gives an answer longer than
    256 bytes as the first Ne bytes with 61xx, the rest by GET RESPONSE; the station's
    GetResponse puts it back together. An extended-length card answers it in one."""
    data = os.urandom(600)
    card = CardOS(_Answers(data), long_apdus="chaining", t0=t0)
    first = card.command(bytes.fromhex("8010000000"))  # Le 00: at most 256
    assert first[:-2] == data[:256] and first[-2:] == b"\x61\x00"
    assert GetResponse(LocalConnection(_OsApp(card))).transmit(
        bytes.fromhex("8010000000")) == data + b"\x90\x00"
    assert card.stats.delivered == 2 and card.stats.commands == 1 + 3  # 256 + 256 + 88
    ext = CardOS(_Answers(data))  # extended Le 00 00 00: all of it at once
    assert ext.command(bytes.fromhex("80100000000000")) == data + b"\x90\x00"


# -- pcscd -------------------------------------------------------------------------------
def test_pcscd_has_two_vpcd_readers_and_is_reused(pcscd: Pcscd) -> None:
    assert len(pcscd.readers) == 2
    assert set(pcscd.readers) <= set(list_readers())
    with running_pcscd() as again:
        assert not again.started and again.pid is None
        assert again.readers == pcscd.readers
    assert set(pcscd.readers) <= set(list_readers())  # the reuse stopped nothing


def test_empty_reader_is_a_clear_transport_error(pcscd: Pcscd) -> None:
    reader = pcscd.reader_for_port(PORT_A)
    with pytest.raises(NoCard, match="no card in the reader"):
        PcscConnection(reader)
    with pytest.raises(PcscError, match="no reader with this name"):
        PcscConnection("no such reader 00 00")


# -- one unit, authority in process ------------------------------------------------------
def test_load_over_pcsc_kcv_receipt_and_three_apdus_per_load(pcscd: Pcscd,
                                                            world: World) -> None:
    reader = pcscd.reader_for_port(PORT_A)
    unit = world.unit(b"PCSC-UNIT-1")
    with inserted(unit, reader, PORT_A) as card, PcscConnection(reader) as pc:
        assert pc.protocol == CardProtocol.T1 and pc.long_apdus == "extended"
        conn = Counting(pc)
        auth = Counting(LocalConnection(world.authority))
        ac = AuthorityClient(auth, suites=world.authority.capabilities().suites, select=False)
        first = load_key(UnitClient(conn), ac, b"AES", 1)
        assert (conn.count, auth.count) == (3, 1)  # SELECT + INIT + IMPORT; EXPORT
        second = load_key(UnitClient(conn), ac, b"MAC", 2, select=False)
        assert (conn.count, auth.count) == (5, 2)  # 3 APDUs for a load after SELECT
        assert card.stats.commands == 5  # T=1: no GET RESPONSE, nothing else on the wire
    for res in (first, second):
        assert res.sn == b"PCSC-UNIT-1"
        assert unit.state.slots[res.ref2].kcv == res.kcv
        _verify(world, res)
    assert [r.sn for r in world.log.records] == [b"PCSC-UNIT-1"] * 2


# -- authority as a card in the second reader --------------------------------------------
def test_authority_card_on_second_reader(pcscd: Pcscd, world: World) -> None:
    ra, rb = pcscd.reader_for_port(PORT_A), pcscd.reader_for_port(PORT_B)
    unit = world.unit(b"PCSC-UNIT-2")
    with inserted(unit, ra, PORT_A), inserted(world.authority, rb, PORT_B) as auth_card, \
            PcscConnection(ra) as pu, PcscConnection(rb) as pa:
        uc, ac_conn = Counting(pu), Counting(pa)
        ac = AuthorityClient(ac_conn, suites=world.authority.capabilities().suites)
        assert ac_conn.count == 1  # SELECT F04B4C50314153
        results = [load_key(UnitClient(uc), ac, ref1, ref2, select=i == 0)
                   for i, (ref1, ref2) in enumerate(PLAN)]
        assert uc.count == 1 + 2 * len(PLAN)
        assert ac_conn.count == 1 + len(PLAN)  # one EXPORTKEY per load, over PC/SC
        assert auth_card.stats.delivered == 1 + len(PLAN)
    for res in results:
        assert unit.state.slots[res.ref2].kcv == res.kcv
        _verify(world, res)
    assert len(world.log.records) == len(PLAN)


# -- a feed of units through one reader ---------------------------------------------------
def test_feeder_cards_customized_in_turn(pcscd: Pcscd, world: World) -> None:
    reader = pcscd.reader_for_port(PORT_A)
    n = 4
    units = [world.unit(b"FEED-%02d" % i) for i in range(n)]
    results: list[LoadResult] = []
    labels: list[str] = []

    def sources() -> Iterator[PcscUnitSource]:
        for src in cards_in_reader(reader, n, 10):
            labels.append(src.label)
            yield src

    with CardFeeder(units, PORT_A) as feeder:
        summary = customize(sources(), PLAN, world.client(), on_result=results.append)
        assert feeder.wait(5)
        assert feeder.error is None
    assert summary.units == n and summary.customized == n and not summary.failures
    assert summary.loads_ok == n * len(PLAN)
    assert feeder.fed == [u.sn for u in units] and feeder.finished == n
    assert labels == [f"{reader}#{i}" for i in range(1, n + 1)]
    by_sn = {(r.sn, r.ref2): r for r in results}
    for u in units:
        for _, ref2 in PLAN:
            res = by_sn[(u.sn, ref2)]
            assert u.state.slots[ref2].kcv == res.kcv
            _verify(world, res)
    wait_for_removal(reader, 5)


def test_two_readers_driven_from_two_threads(pcscd: Pcscd, world: World) -> None:
    n = 3
    lock = threading.Lock()
    authority = AuthorityClient(LockedConnection(LocalConnection(world.authority), lock),
                                suites=world.authority.capabilities().suites, select=False)
    feeds = {port: [world.unit(b"R%d-%02d" % (port, i)) for i in range(n)]
             for port in VPCD_PORTS}
    summaries = {}

    def station(port: int) -> None:
        reader = pcscd.reader_for_port(port)
        summaries[port] = customize(cards_in_reader(reader, n, 10), PLAN, authority)

    with CardFeeder(feeds[PORT_A], PORT_A) as fa, CardFeeder(feeds[PORT_B], PORT_B) as fb:
        threads = [threading.Thread(target=station, args=(p,)) for p in VPCD_PORTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert fa.wait(5) and fb.wait(5)
    assert sum(s.customized for s in summaries.values()) == 2 * n
    for units in feeds.values():
        assert all(u.state.slots[ref2].kcv is not None for u in units for _, ref2 in PLAN)
    for port in VPCD_PORTS:
        wait_for_removal(pcscd.reader_for_port(port), 5)


# -- refusals and failures ---------------------------------------------------------------
def test_tampered_importkey_refused_and_nothing_stored(pcscd: Pcscd, world: World) -> None:
    reader = pcscd.reader_for_port(PORT_A)
    unit = world.unit(b"PCSC-TAMPER")
    before = slots_snapshot(unit)
    with inserted(unit, reader, PORT_A), PcscConnection(reader) as pc, \
            pytest.raises(LoadFailed) as ei:
        load_key(UnitClient(FlipImportBit(pc)), world.client(), b"AES", 1)
    assert ei.value.step == "unit IMPORTKEY" and ei.value.sw == 0x6982
    assert slots_snapshot(unit) == before
    assert unit.pending is None  # the challenge was consumed


def test_card_removed_mid_load_is_transport_error(pcscd: Pcscd, world: World) -> None:
    reader = pcscd.reader_for_port(PORT_A)
    unit = world.unit(b"PCSC-PULLED")
    before = slots_snapshot(unit)
    app = PulledOutOnImport(unit)
    with inserted(app, reader, PORT_A) as card, PcscConnection(reader) as pc:
        app.card = card
        with pytest.raises(LoadFailed) as ei:
            load_key(UnitClient(pc), world.client(), b"AES", 1)
        assert ei.value.step == "unit IMPORTKEY"
        assert isinstance(ei.value.cause, TransportError)
        assert reader in str(ei.value.cause)
        wait_for_removal(reader, 5)
        with pytest.raises(TransportError):  # the connection is dead, says so again
            pc.transmit(bytes.fromhex("8016000100"))
    assert slots_snapshot(unit) == before


# -- long commands: extended length, or chaining when the card says so ---------------------
def _long_import(conn: Connection) -> tuple[bytes, bytes]:
    UnitClient(conn).select()
    UnitClient(conn).initialize()  # a pending challenge: IMPORTKEY gets to parse its data
    data = os.urandom(300)
    r = conn.transmit(CommandAPDU(0x80, INS_IMPORT, 0, 0, data, ne=65536).encode())
    return data, r


def test_long_importkey_extended_arrives_whole(pcscd: Pcscd, world: World) -> None:
    reader = pcscd.reader_for_port(PORT_A)
    unit = world.unit(b"PCSC-EXT")
    app = Recording(unit)
    before = slots_snapshot(unit)
    with inserted(app, reader, PORT_A) as card, PcscConnection(reader) as pc:
        assert pc.long_apdus == "extended"
        data, r = _long_import(pc)
        assert card.stats.commands == 3  # one APDU for 300 bytes
    assert r[-2:] == b"\x6a\x80"  # malformed content, but it came whole
    got = CommandAPDU.decode(app.received[-1])
    assert got.data == data and got.ne == 65536 and len(app.received[-1]) == 4 + 3 + 300 + 2
    assert slots_snapshot(unit) == before


def test_long_importkey_chained_when_card_has_no_extended_length(pcscd: Pcscd,
                                                                 world: World) -> None:
    reader = pcscd.reader_for_port(PORT_A)
    unit = world.unit(b"PCSC-CHAIN")
    app = Recording(unit)
    with inserted(app, reader, PORT_A, long_apdus="chaining") as card:
        with PcscConnection(reader) as pc:
            assert pc.atr_info.extended is False and pc.atr_info.chaining is True
            assert pc.long_apdus == "chaining"
            data, r = _long_import(pc)
            assert r[-2:] == b"\x6a\x80"
            assert CommandAPDU.decode(app.received[-1]).data == data
            assert card.stats.commands == 2 + 2  # SELECT, INIT, two pieces
            assert card.stats.delivered == 3
        with PcscConnection(reader, long_apdus="extended") as forced:
            delivered = card.stats.delivered
            r = forced.transmit(CommandAPDU(0x80, INS_IMPORT, 0, 0, data, ne=65536).encode())
            assert r == b"\x67\x00" and card.stats.delivered == delivered  # refused whole


def test_t0_card_get_response_and_wrong_le(pcscd: Pcscd, world: World) -> None:
    reader = pcscd.reader_for_port(PORT_A)
    unit = world.unit(b"PCSC-T0")
    with inserted(unit, reader, PORT_A, t0=True, long_apdus="chaining") as card:
        with pytest.raises(PcscError, match="does not offer the requested protocol"):
            PcscConnection(reader, protocols=CardProtocol.T1)
        with PcscConnection(reader) as pc:
            assert pc.protocol == CardProtocol.T0
            conn = Counting(pc)
            res = load_key(UnitClient(conn), world.client(), b"AES", 1)
            assert conn.count == 3  # the station still sees SELECT, INIT, IMPORT
            # on the wire: INIT answered 6Cxx and resent; IMPORTKEY answered 61xx + GET RESPONSE
            assert card.stats.commands == 5
    assert unit.state.slots[1].kcv == res.kcv
    _verify(world, res)
