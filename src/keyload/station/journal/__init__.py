"""The campaign journal: every planned load and its state, crash-safe and shared.

One row per planned load (campaign, unit SN, REF2), in ``loads``. States::

    planned -> claimed -> exported -> imported        (receipt held; verified later)
                      \\-> failed (SW, reason)     \\-> imported, reconciled (no receipt)

*Claims are the durability barrier.* A station claims a batch of units (all their loads)
in one committed transaction before it sends anything to them, with a lease. Later
writes (exported, imported) are committed one by one but need not reach the disk before
the next command: SQLite runs in WAL mode with ``synchronous=NORMAL``, which survives a
crash of the station process; after a power loss the last commits may be missing.
Either way, any load left ``claimed`` or ``exported`` (by this station, or by a station
whose lease expired) is *reconciled* before anything is sent again: the unit is asked
(GET SLOT STATUS) and, if it already holds the planned key version, the load is marked
imported without a new export (its receipt, if it was lost, is recorded as lost).

SQLite is the default (:mod:`.sqlite`: one machine; several processes may share the
file). PostgreSQL (:mod:`.postgres`: several machines) implements the same interface
(:class:`~.model.Journal`) with ``FOR UPDATE SKIP LOCKED`` claims; both share the schema
and the outcome writes (:mod:`.sql`).
"""

from __future__ import annotations

from pathlib import Path

from ...core.errors import StoreError
from ...records.sql import is_postgres_url
from .model import Journal
from .sqlite import SqliteJournal


def open_journal(where: str | Path) -> Journal:
    """``postgresql://…`` opens the shared PostgreSQL journal, anything else a SQLite file."""
    text = str(where)
    if is_postgres_url(text):
        try:
            from .postgres import PostgresJournal
        except ImportError as e:
            raise StoreError(f"the PostgreSQL journal needs psycopg ({e})") from None
        return PostgresJournal(text)
    return SqliteJournal(Path(text))
