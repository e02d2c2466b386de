"""The in-process transport and its tracing wrapper (STYLE: tracing is a wrapper stacked
around a one-method connection; it logs events, never APDU data)."""

from __future__ import annotations

import logging
import os

import pytest

from keyload.core.secret import Secret
from keyload.transports.local import LocalConnection
from keyload.transports.wrappers import TracingConnection
from keyload.units.unit import MemoryUnitStore, Slot, Unit, UnitState

STATUS_1 = bytes.fromhex("8016000100")  # GET SLOT STATUS, slot 1
STATUS_9 = bytes.fromhex("8016000900")  # no slot 9: 6A88


def _unit() -> Unit:
    return Unit(MemoryUnitStore(UnitState.new(b"SN-1", Secret(os.urandom(32)),
                                              {1: Slot(1, frozenset({3}))})))


def test_tracing_passes_bytes_through_and_logs_no_data(caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    unit = _unit()
    calls: list[None] = []
    traced = TracingConnection(LocalConnection(unit), name="unit A",
                               counter=lambda: calls.append(None))
    plain = LocalConnection(_unit())
    with caplog.at_level(logging.DEBUG, logger="keyload.transport"):
        answers = [traced.transmit(STATUS_1), traced.transmit(STATUS_9),
                   traced.transmit(b"\x80")]
    assert answers == [plain.transmit(STATUS_1), plain.transmit(STATUS_9),
                       plain.transmit(b"\x80")]
    assert answers[0] == bytes.fromhex("c70101ce01009000")
    assert len(calls) == 3
    assert [r.getMessage() for r in caplog.records] == [
        "unit A GET SLOT STATUS: 5 bytes out, 8 bytes back, SW 9000",
        f"unit A GET SLOT STATUS: 5 bytes out, 2 bytes back, SW {answers[1].hex().upper()}",
        f"unit A ?: 1 bytes out, 2 bytes back, SW {answers[2].hex().upper()}",
    ]
    text = caplog.text.lower()
    assert "c70101ce01" not in text and STATUS_1.hex() not in text  # no APDU data


def test_tracing_without_a_counter_names_an_unknown_ins(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    traced = TracingConnection(LocalConnection(_unit()))
    with caplog.at_level(logging.DEBUG, logger="keyload.transport"):
        r = traced.transmit(bytes.fromhex("80EE000000"))
    assert r[-2:] == bytes.fromhex("6D00")
    assert caplog.records[0].getMessage() == "card INS EE: 5 bytes out, 2 bytes back, SW 6D00"
