"""In-process transport: a card application's ``process_apdu`` called directly."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from . import Connection

log = logging.getLogger("keyload.transport")

_INS_NAMES = {0xA4: "SELECT", 0x10: "INITIALIZE DOWNLOAD", 0x12: "EXPORTKEY",
              0x14: "IMPORTKEY", 0x16: "GET SLOT STATUS"}


class CardApplication(Protocol):
    def process_apdu(self, apdu: bytes) -> bytes: ...


@dataclass
class LocalConnection:
    """Hands each APDU to an application object in the same process."""

    app: CardApplication

    def transmit(self, apdu: bytes) -> bytes:
        return self.app.process_apdu(apdu)


@dataclass
class TracingConnection:
    """Logs each command's name, length and status word: never its data."""

    inner: Connection
    name: str = "card"
    counter: Callable[[], None] | None = None

    def transmit(self, apdu: bytes) -> bytes:
        r = self.inner.transmit(apdu)
        if self.counter is not None:
            self.counter()
        ins = _INS_NAMES.get(apdu[1], f"INS {apdu[1]:02X}") if len(apdu) > 1 else "?"
        log.debug("%s %s: %d bytes out, %d bytes back, SW %s", self.name, ins, len(apdu),
                  len(r), r[-2:].hex().upper() if len(r) >= 2 else "--")
        return r
