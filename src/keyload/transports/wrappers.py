"""Connection wrappers that add no protocol: each is a
:class:`~keyload.transports.Connection` around another one.

- :class:`TracingConnection` logs each command's name, length and status word (STYLE:
  tracing is a wrapper; it logs events, never APDU data);
- :class:`LockedConnection` lets several threads share one connection, one exchange at a
  time (a card, or an in-process authority whose keystore is not thread-safe).

The ISO/IEC 7816-4 wrappers (GET RESPONSE, chaining) are in :mod:`.iso7816`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..core.aids import COMMAND_NAMES
from . import Connection

log = logging.getLogger("keyload.transport")



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
        ins = COMMAND_NAMES.get(apdu[1], f"INS {apdu[1]:02X}") if len(apdu) > 1 else "?"
        log.debug("%s %s: %d bytes out, %d bytes back, SW %s", self.name, ins, len(apdu),
                  len(r), r[-2:].hex().upper() if len(r) >= 2 else "--")
        return r


@dataclass
class LockedConnection:
    """One exchange at a time on a connection shared by several threads."""

    inner: Connection
    lock: threading.Lock = field(default_factory=threading.Lock)

    def transmit(self, apdu: bytes) -> bytes:
        with self.lock:
            return self.inner.transmit(apdu)


__all__ = ["LockedConnection", "TracingConnection"]
