"""Bytes in, bytes out: a connection is one method, ``transmit(apdu) -> rapdu``.

Everything else is a wrapper stacked around a connection: ISO/IEC 7816-4 GET RESPONSE
and chaining (:mod:`.iso7816`), tracing and locking (:mod:`.wrappers`). Connections:
in-process (:mod:`.local`) and PC/SC readers (:mod:`.pcsc`).
"""

from __future__ import annotations

from typing import Protocol


class Connection(Protocol):
    def transmit(self, apdu: bytes) -> bytes:
        """Send one C-APDU, return the R-APDU (data || SW1 SW2)."""
        ...
