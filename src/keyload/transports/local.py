"""In-process transport: a card application's ``process_apdu`` called directly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class CardApplication(Protocol):
    def process_apdu(self, apdu: bytes) -> bytes: ...


@dataclass
class LocalConnection:
    """Hands each APDU to an application object in the same process."""

    app: CardApplication

    def transmit(self, apdu: bytes) -> bytes:
        return self.app.process_apdu(apdu)
