"""Bytes in, bytes out: a connection is one method, ``transmit(apdu) -> rapdu``.

Tracing and (later) chaining or GET RESPONSE are wrappers stacked around a connection.
"""

from __future__ import annotations

from typing import Protocol


class Connection(Protocol):
    def transmit(self, apdu: bytes) -> bytes:
        """Send one C-APDU, return the R-APDU (data || SW1 SW2)."""
        ...
