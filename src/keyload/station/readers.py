"""The PC/SC readers a station sees and the card in each (``keyload readers``): its ATR,
whether it answers keyload's SELECT (the unit application, or the authority's), and for a
unit its SN, set id and suites, from one INITIALIZE DOWNLOAD.

That INITIALIZE DOWNLOAD draws a challenge in the unit; the card is unpowered at the end,
so the challenge is gone (docs/protocol.md §7) and nothing is stored in it. A card that is
mute or in another application's exclusive use is listed as such, not touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..core.errors import KeyloadError, StatusError, TransportError
from .load import AuthorityClient, UnitClient
from .run import card_facts

EMPTY, PRESENT, MUTE, IN_USE, UNAVAILABLE = "empty", "present", "mute", "in use", "unavailable"
UNIT, AUTHORITY = "unit", "authority"
START_PCSCD = ("start pcscd (as root: `pcscd`, or `systemctl start pcscd.socket`; see the "
               "README's PC/SC section)")


@dataclass(frozen=True)
class ReaderCard:
    """One reader and what is in it. ``card``: empty, present, mute, in use (another
    application holds it exclusively) or unavailable (the reader); ``application``: what
    the card answers keyload's SELECT as (unit, authority), None when neither; ``unit``:
    a unit's SN, set id (when it gives one) and suites; ``note``: what stopped the survey
    of this card, if anything."""

    COLUMNS: ClassVar[tuple[str, ...]] = ("reader", "card", "ATR", "keyload", "SN", "set id",
                                          "suites")  # of row()

    reader: str
    card: str
    atr: bytes | None = None
    application: str | None = None
    unit: tuple[bytes, bytes | None, bytes] | None = None
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        sn, set_id, suites = self.unit or (None, None, None)
        return {"reader": self.reader, "card": self.card,
                "atr": None if self.atr is None else self.atr.hex().upper(),
                "application": self.application, "sn": None if sn is None else sn.hex(),
                "set_id": None if set_id is None else set_id.hex(),
                "suites": None if suites is None else list(suites), "note": self.note}

    def row(self) -> list[str]:
        """The reader's line of the table (:attr:`COLUMNS`): keyload is what the card
        answers as, with the note."""
        j = self.to_json()
        answers = self.application or ("no" if self.card == PRESENT else "-")
        return [self.reader, self.card, j["atr"] or "-",
                answers + (f" ({self.note})" if self.note else ""), j["sn"] or "-",
                j["set_id"] or "-", ",".join(f"{s:#04x}" for s in j["suites"] or []) or "-"]


def survey() -> list[ReaderCard]:
    """Every reader pcscd knows, in its order, and the card in it. pyscard missing or
    pcscd not running: TransportError saying so (and how pcscd is started)."""
    from ..transports.pcsc import PcscContext, ReaderUnavailable, ServiceUnavailable

    try:
        ctx = PcscContext()
    except ServiceUnavailable as e:
        raise TransportError(f"{e}: {START_PCSCD}") from None
    with ctx:
        found = []
        for reader in ctx.readers():
            try:
                found.append(_look(ctx, reader))
            except ReaderUnavailable as e:
                found.append(ReaderCard(reader, UNAVAILABLE, note=str(e)))
        return found


def _look(ctx: Any, reader: str) -> ReaderCard:
    from ..transports.pcsc import (
        STATE_EXCLUSIVE,
        STATE_MUTE,
        STATE_PRESENT,
        STATE_UNAWARE,
        PcscConnection,
        PcscError,
    )

    state, atr = ctx.status_change(reader, STATE_UNAWARE, 0)
    if not state & STATE_PRESENT:
        return ReaderCard(reader, EMPTY)
    if state & (STATE_MUTE | STATE_EXCLUSIVE):
        return ReaderCard(reader, MUTE if state & STATE_MUTE else IN_USE, atr or None)
    try:
        with PcscConnection(reader, context=ctx, atr=atr or None) as conn:
            return _ask(reader, conn)
    except PcscError as e:
        return ReaderCard(reader, PRESENT, atr or None, note=str(e))


def _ask(reader: str, conn: Any) -> ReaderCard:
    """SELECT the unit application (then INITIALIZE DOWNLOAD), else the authority's."""
    atr: bytes = conn.atr
    unit = UnitClient(conn)
    try:
        unit.select()
    except StatusError:
        try:
            AuthorityClient(conn)
        except StatusError:
            return ReaderCard(reader, PRESENT, atr)
        return ReaderCard(reader, PRESENT, atr, AUTHORITY)
    try:
        sn, suites, set_id = card_facts(unit, reader)
    except StatusError as e:  # e.g. a unit of an identity set not enrolled yet (6985)
        return ReaderCard(reader, PRESENT, atr, UNIT, note=f"INITIALIZE DOWNLOAD: {e}")
    except KeyloadError as e:
        return ReaderCard(reader, PRESENT, atr, UNIT, note=str(e))
    return ReaderCard(reader, PRESENT, atr, UNIT, (sn, set_id, suites))
