"""What ``keyload demo`` starts besides the station: a private SoftHSM2 token for its
authority, pcscd with vpcd readers, the authority as a virtual card and the units fed
through a reader one after another; and the feed of ``keyload unit serve-card``."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from ..core.errors import KeyloadError
from ..station.fleet import EmulatedFleet
from ..station.home import Home, Keystore
from ..station.run import units_in_turn
from ..transports import Connection
from ..transports.local import LocalConnection
from ..units.authority import Authority

DEMO_PIN = "246810"  # the demo token's user PIN, announced likewise
PIN_ENV = "KEYLOAD_PKCS11_PIN"
UNIT_PORT, AUTHORITY_PORT = 35963, 35964  # the two vpcd readers


def make_authority(kind: str, home: Home) -> Keystore:
    """The demo's authority: a software keystore, or (``pkcs11``) a SoftHSM2 token made
    in the home."""
    if kind != "pkcs11":
        return home.create_authority()
    from .softhsm import make_token, softhsm_available, softhsm_missing_reason

    if not softhsm_available():
        raise KeyloadError(f"--authority pkcs11: {softhsm_missing_reason()} (as root: "
                           "make system-deps)")
    pin = os.environ.get(PIN_ENV) or DEMO_PIN
    if "SOFTHSM2_CONF" in os.environ and os.environ["SOFTHSM2_CONF"] != \
            str(home.root / "softhsm" / "softhsm2.conf"):
        os.environ.pop("SOFTHSM2_CONF")  # this process talks to the demo token only
    tok = make_token(home.root / "softhsm", label="keyload-demo", user_pin=pin,
                     so_pin=os.urandom(8).hex())
    return home.create_authority({"backend": "pkcs11", "module": tok.module,
                                  "token": tok.label, "softhsm2_conf": str(tok.conf.resolve()),
                                  "clear_sas": False}, pin=pin)


def _pcscd(stack: ExitStack) -> Any:
    from .pcscd import pcsc_available, running_pcscd

    avail = pcsc_available()
    if not avail.ok:
        raise KeyloadError(f"PC/SC is not available: {avail.reason} (as root: make "
                           "system-deps; then pip install 'keyload[pcsc]')")
    return stack.enter_context(running_pcscd())


def authority_connect(kind: str) -> Callable[[Authority, ExitStack], Connection]:
    """How the campaign reaches the authority: in-process, or (``card``) as a virtual
    card over PC/SC."""
    if kind != "card":
        return lambda authority, stack: LocalConnection(authority)

    def card(authority: Authority, stack: ExitStack) -> Connection:
        from ..transports.pcsc import PcscConnection, wait_for_card
        from .cards import VirtualCard

        pcscd = _pcscd(stack)
        vc = VirtualCard(authority, AUTHORITY_PORT).start()
        stack.callback(vc.stop)
        reader = pcscd.reader_for_port(AUTHORITY_PORT)
        wait_for_card(reader, timeout=10)
        pconn = PcscConnection(reader)
        stack.callback(pconn.close)
        return pconn

    return card


def feed_units(home: Home, stack: ExitStack) -> tuple[str, int]:
    """The home's units fed through a vpcd reader one after another, as cards in a
    personalization machine (stopped with ``stack``): the reader, and how many."""
    from .cards import CardFeeder

    fleet = EmulatedFleet.open(home.units_dir, home.source)
    stack.callback(fleet.close)
    pcscd = _pcscd(stack)
    serials = fleet.serials()
    feeder = CardFeeder(units_in_turn(fleet, serials), UNIT_PORT).start()
    stack.callback(feeder.stop)
    return pcscd.reader_for_port(UNIT_PORT), len(serials)


def serve_cards(home: Home, given: list[bytes], port: int,
                started: Callable[[int], None]) -> int:
    """Serve the home's emulated units ``given`` (default all) to pcscd's vpcd reader on
    ``port``, one after another, until stopped; ``started`` is told how many once the
    feeder runs. How many were served (KeyloadError when the feeder failed)."""
    from .cards import CardFeeder

    fleet = EmulatedFleet.open(home.units_dir, home.source)
    try:
        serials = given or fleet.serials()
        for sn in serials:
            fleet.open_unit(sn).close()  # every unit exists and opens, before any is fed
        feeder = CardFeeder(units_in_turn(fleet, serials), port, remove=True)
        # the feeder logs the failure that stops it, and keeps it: it is the caller's
        # error, so it is not logged too (one line, not two)
        thread = f"feeder:{port}"
        log = logging.getLogger("keyload.vcard")

        def kept(r: logging.LogRecord) -> bool:
            return r.threadName != thread or r.levelno < logging.ERROR

        log.addFilter(kept)
        feeder.start()
        started(len(serials))
        try:
            feeder.wait()
        finally:
            feeder.stop()
            log.removeFilter(kept)
        if feeder.error is not None:
            raise KeyloadError(f"the card feeder stopped: {feeder.error}")
    finally:
        fleet.close()
    return feeder.finished
