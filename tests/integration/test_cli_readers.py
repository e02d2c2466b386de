"""``keyload readers`` over the real pcscd with vpcd virtual cards: each reader and the card
in it — its ATR, whether it answers keyload's SELECT (a unit, the authority, neither), a
unit's SN, set id and suites — as a table and as JSON; and what it says without pcscd.

Needs pcscd, the vpcd driver and pyscard: skipped with the reason on a laptop without
them, a failure in CI (``CI=true``)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from keyload.core.keys import KeyType
from keyload.lab.cards import DEFAULT_ATR, VirtualCard
from keyload.lab.pcscd import VPCD_PORTS, Pcscd
from keyload.transports.local import CardApplication
from keyload.transports.pcsc import wait_for_card, wait_for_removal
from keyload.units.unit import MemoryUnitStore, Slot, Unit, UnitState

from ..conftest import require
from .cli_helpers import KEYLOAD, ok, run
from .fixtures import make_world

pytestmark = pytest.mark.hardware  # pcscd + vpcd (skips without)

UNIT_PORT, OTHER_PORT = VPCD_PORTS


class Stranger:
    """A card that is not keyload's: every SELECT is answered 6A82."""

    def process_apdu(self, apdu: bytes) -> bytes:
        return b"\x6a\x82"


@contextmanager
def cards(pcscd: Pcscd, **by_port: CardApplication) -> Iterator[dict[int, str]]:
    """Each application as a card in the reader of its port (``p35963=…``) for the block;
    the readers' names by port."""
    with ExitStack() as stack:
        names = {}
        for key, app in by_port.items():
            port = int(key.removeprefix("p"))
            reader = pcscd.reader_for_port(port)
            card = VirtualCard(app, port).start()
            stack.callback(wait_for_removal, reader, 5)
            stack.callback(card.stop)
            wait_for_card(reader, 5)
            names[port] = reader
        yield names


def readers(**kw: Any) -> dict[str, dict[str, Any]]:
    out = ok(run("readers", "--json", **kw)).json()
    return {r["reader"]: r for r in out["readers"]}


@pytest.fixture(scope="module")
def script() -> None:
    require(KEYLOAD.is_file(), f"the keyload console script is not installed at {KEYLOAD}")


def test_a_unit_and_the_authority_in_two_readers(script: None, pcscd: Pcscd) -> None:
    w = make_world()
    unit = w.unit(bytes.fromhex("0a0b0c0d01"))
    before = unit.state
    with cards(pcscd, **{f"p{UNIT_PORT}": unit, f"p{OTHER_PORT}": w.authority}) as names:
        seen = readers()
        text = ok(run("readers")).stdout
    u, a = seen[names[UNIT_PORT]], seen[names[OTHER_PORT]]
    assert u == {"reader": names[UNIT_PORT], "card": "present",
                 "atr": DEFAULT_ATR.hex().upper(), "application": "unit",
                 "sn": "0a0b0c0d01", "set_id": w.set_a.hex(), "suites": [1, 2], "note": None}
    assert (a["card"], a["application"], a["sn"], a["suites"]) == ("present", "authority",
                                                                  None, None)
    header, _, *rows = text.splitlines()
    assert header.split() == ["reader", "card", "ATR", "keyload", "SN", "set", "id", "suites"]
    unit_row = next(r for r in rows if r.startswith(names[UNIT_PORT]))
    assert unit_row.split()[-6:] == ["present", DEFAULT_ATR.hex().upper(), "unit",
                                     "0a0b0c0d01", w.set_a.hex(), "0x01,0x02"]
    assert unit.state.slots == before.slots  # looked at, nothing stored


def test_a_stranger_an_unenrolled_unit_and_an_empty_reader(script: None,
                                                          pcscd: Pcscd) -> None:
    blank = Unit(MemoryUnitStore(UnitState.new_identity(
        b"\x1d\x01", {1: Slot(1, frozenset({KeyType.AES256}))})))
    with cards(pcscd, **{f"p{UNIT_PORT}": blank}) as names:
        seen = readers()
        other = next(r for r in seen if r != names[UNIT_PORT])
        assert seen[other] == {"reader": other, "card": "empty", "atr": None,
                               "application": None, "sn": None, "set_id": None,
                               "suites": None, "note": None}
    b = seen[names[UNIT_PORT]]
    assert (b["card"], b["application"], b["sn"]) == ("present", "unit", None)
    assert b["note"].startswith("INITIALIZE DOWNLOAD: ") and "6985" in b["note"]
    with cards(pcscd, **{f"p{UNIT_PORT}": Stranger()}) as names:
        s = readers()[names[UNIT_PORT]]
    assert (s["card"], s["application"], s["atr"]) == ("present", None,
                                                       DEFAULT_ATR.hex().upper())


def test_without_pcscd_one_line_saying_how_to_start_it(script: None, tmp_path: Path) -> None:
    """A socket where no pcscd listens (pcsc-lite reads $PCSCLITE_CSOCK_NAME)."""
    res = run("readers", env_extra={"PCSCLITE_CSOCK_NAME": str(tmp_path / "none.comm")})
    assert res.rc == 1 and res.stdout == "" and "Traceback" not in res.stderr, res.describe()
    (line,) = res.stderr.splitlines()
    missing = importlib.util.find_spec("smartcard") is None  # then that is what it says
    assert line.startswith("keyload: error: ") and (
        "pyscard is not installed" if missing else "start pcscd") in line, line
