"""The ISO/IEC 7816-4 wrappers (GET RESPONSE, 6Cxx, command chaining) around the
in-process connection, to the lab's card OS set to short APDUs: chaining instead of
extended length, and T=0 answers (61xx, 6Cxx). No reader, no pcscd."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from keyload.core.apdu import CommandAPDU
from keyload.core.errors import TransportError
from keyload.lab.cards import CardOS, LongApdus
from keyload.transports import Connection
from keyload.transports.iso7816 import CommandChaining, GetResponse, is_long
from keyload.transports.local import LocalConnection


@dataclass
class Echo:
    """A card application: answers INS 0x20 with N bytes (N = P1 P2), anything else with
    the length of the data it got (2 bytes); keeps every whole command."""

    received: list[bytes] = field(default_factory=list)

    def process_apdu(self, apdu: bytes) -> bytes:
        self.received.append(apdu)
        cmd = CommandAPDU.decode(apdu)
        if cmd.ins == 0x20:
            return bytes(i & 0xFF for i in range(cmd.p1 << 8 | cmd.p2)) + b"\x90\x00"
        return len(cmd.data).to_bytes(2, "big") + b"\x90\x00"


class Card:
    """The card OS as an in-process card application; keeps every C-APDU it got (the
    wire: chained pieces, GET RESPONSE)."""

    def __init__(self, card: CardOS) -> None:
        self.card = card
        self.sent: list[bytes] = []

    def process_apdu(self, apdu: bytes) -> bytes:
        self.sent.append(apdu)
        return self.card.command(apdu)


def _stack(long_apdus: LongApdus, *, t0: bool = False
           ) -> tuple[Echo, CardOS, Card, Connection]:
    """The card application behind the card OS, the wire, and the wrappers on it."""
    app = Echo()
    card = CardOS(app, long_apdus=long_apdus, t0=t0)
    wire = Card(card)
    return app, card, wire, CommandChaining(GetResponse(LocalConnection(wire)))


def test_a_short_apdu_card_refuses_extended_length_without_the_wrappers() -> None:
    app = Echo()
    conn = LocalConnection(Card(CardOS(app, long_apdus="chaining", t0=True)))
    long_cmd = CommandAPDU(0x80, 0x30, 0, 0, bytes(300), ne=256).encode()
    assert is_long(long_cmd)
    assert conn.transmit(long_cmd) == b"\x67\x00"
    assert app.received == []


def test_get_response_collects_announced_data_over_several_rounds() -> None:
    app, card, wire, conn = _stack(long_apdus="chaining", t0=True)
    r = conn.transmit(CommandAPDU(0x80, 0x20, 0x02, 0x58, b"\x01", ne=256).encode())  # 600
    assert r == bytes(i & 0xFF for i in range(600)) + b"\x90\x00"
    assert len(app.received) == 1
    # the command, then GET RESPONSE for 256, 256 and 88 bytes (61 00, 61 00, 61 58)
    assert wire.sent[1:] == [bytes.fromhex("00C0000000"), bytes.fromhex("00C0000000"),
                             bytes.fromhex("00C0000058")]
    assert card.stats.commands == 4


def test_get_response_keeps_the_logical_channel() -> None:
    _, _, wire, conn = _stack(long_apdus="chaining", t0=True)
    r = conn.transmit(CommandAPDU(0x01, 0x20, 0x00, 0x10, b"\x01", ne=256).encode())
    assert r == bytes(range(16)) + b"\x90\x00"
    assert wire.sent[1] == bytes.fromhex("01C0000010")


def test_wrong_le_is_sent_again_once_with_the_le_the_card_gives() -> None:
    app, _, wire, conn = _stack(long_apdus="chaining", t0=True)
    r = conn.transmit(CommandAPDU(0x80, 0x20, 0x00, 0x07, ne=256).encode())  # Le 00
    assert r == bytes(range(7)) + b"\x90\x00"
    assert wire.sent == [bytes.fromhex("8020000700"), bytes.fromhex("8020000707")]
    assert len(app.received) == 1  # the card kept its answer for the corrected command


def test_a_long_command_goes_as_a_chain_of_short_ones_and_arrives_whole() -> None:
    app, card, wire, conn = _stack(long_apdus="chaining")
    data = bytes(i & 0xFF for i in range(600))
    r = conn.transmit(CommandAPDU(0x80, 0x30, 0x01, 0x02, data, ne=65536).encode())
    assert r == (600).to_bytes(2, "big") + b"\x90\x00"
    assert [CommandAPDU.decode(a).data for a in app.received] == [data]
    assert [a[0] for a in wire.sent] == [0x90, 0x90, 0x80]  # CLA bit 0x10 but the last
    assert all(not is_long(a) for a in wire.sent)
    assert [len(CommandAPDU.decode(a).data) for a in wire.sent] == [255, 255, 90]
    assert [CommandAPDU.decode(a).ne for a in wire.sent] == [0, 0, 256]
    assert card.stats.commands == 3 and card.stats.delivered == 1


def test_a_piece_not_answered_9000_ends_the_chain_with_its_answer() -> None:
    app, _, wire, conn = _stack(long_apdus="extended")  # the card does no chaining
    r = conn.transmit(CommandAPDU(0x80, 0x30, 0, 0, bytes(600), ne=256).encode())
    assert r == b"\x68\x84"
    assert len(wire.sent) == 1 and app.received == []


def test_short_commands_pass_unchanged() -> None:
    app, _, wire, conn = _stack(long_apdus="chaining")
    cmd = CommandAPDU(0x80, 0x30, 0, 0, bytes(255), ne=256).encode()
    assert conn.transmit(cmd) == (255).to_bytes(2, "big") + b"\x90\x00"
    assert wire.sent == [cmd] and app.received == [cmd]


def test_a_card_that_never_stops_announcing_data_is_a_transport_error() -> None:
    calls: list[bytes] = []

    class Endless:
        def process_apdu(self, apdu: bytes) -> bytes:
            calls.append(apdu)
            return b"\x00\x61\x01"

    with pytest.raises(TransportError, match="61xx"):
        GetResponse(LocalConnection(Endless())).transmit(bytes.fromhex("8020000100"))
    assert len(calls) == 1 + GetResponse.MAX_ROUNDS


def test_chaining_refuses_what_it_cannot_cut() -> None:
    conn = CommandChaining(LocalConnection(Echo()))
    with pytest.raises(TransportError, match="no chaining bit"):  # a proprietary CLA
        conn.transmit(CommandAPDU(0xE0, 0x30, 0, 0, bytes(300)).encode())
    with pytest.raises(ValueError, match="malformed extended"):
        conn.transmit(bytes.fromhex("80300000000300") + bytes(2))
