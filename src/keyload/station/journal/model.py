"""What a campaign journal holds: campaigns, their planned loads and each load's state,
and the interface every journal (SQLite, PostgreSQL) gives a campaign."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from ...core.keys import KeyType


class LoadState(StrEnum):
    """Where a planned load stands (the diagram in :mod:`keyload.station.journal`); the
    value is what is stored."""

    PLANNED = "planned"
    CLAIMED = "claimed"
    EXPORTED = "exported"
    IMPORTED = "imported"
    FAILED = "failed"


PLANNED, CLAIMED, EXPORTED, IMPORTED, FAILED = LoadState
STATES = tuple(LoadState)


@dataclass(frozen=True, slots=True)
class PlannedLoad:
    ref1: bytes
    ref2: int
    version: int | None = None  # the key version to hold at the end (None: any)
    # a BDK's load: the initial key ID of the campaign's first unit; each next unit's
    # counts up (docs/protocol.md Appendix D). Kept in the plan, so older journals read as before
    initial_key_id_base: bytes | None = None
    # a BDK's load: each unit receives its initial key, of the ID its load row keeps
    # (from the base above, or the manifest's initial_key_id column), of type ``ik_type``
    # (None: the BDK's)
    initial_key: bool = False
    ik_type: KeyType | None = None


@dataclass(frozen=True, slots=True)
class Campaign:
    id: str
    set_id: bytes
    created: float
    plan: tuple[PlannedLoad, ...]
    source: dict[str, Any]
    units: int


@dataclass(frozen=True, slots=True)
class LoadRow:
    campaign: str
    seq: int
    sn: bytes
    ref2: int
    ref1: bytes
    version: int | None
    state: LoadState
    attempts: int
    station: str | None
    lease: float | None
    suite: int | None
    r: bytes | None
    header: bytes | None
    kcv: bytes | None
    rct: bytes | None
    reconciled: bool
    sw: str | None
    reason: str | None
    updated: float | None
    # suite 0x03 (docs/protocol.md §10.3): the authority's E_A and the unit's C_U (encoded)
    # that verify its receipt; None for the other suites
    e_a: bytes | None = None
    c_u: bytes | None = None
    # a BDK's load (docs/protocol.md Appendix D): the unit's initial key ID, planned with
    # the campaign; None for the other loads, and in journals made before it
    initial_key_id: bytes | None = None


class Journal(Protocol):
    """What a campaign needs from its journal (SQLite or PostgreSQL). Times (``now``) are
    the caller's clock; a lease runs until ``now + lease_s``."""

    def create_campaign(self, c: Campaign, serials: Iterable[bytes],
                        initial_key_ids: Mapping[bytes, bytes] | None = None) -> None:
        """Write the campaign and every planned load in one transaction (flat memory);
        each load of a BDK (:attr:`PlannedLoad.initial_key`) with its unit's initial key
        ID from ``initial_key_ids`` (by SN)."""
        ...

    def campaign(self, campaign_id: str) -> Campaign: ...
    def campaigns(self) -> list[str]: ...

    def claim(self, campaign_id: str, station: str, units: int, lease_s: float,
              now: float) -> list[LoadRow]:
        """Claim up to ``units`` units (all their open loads), committed before returning.

        First this station's own unfinished claims (a resume), then claims of stations
        whose lease expired (a take-over), then planned units. Rows come back with their
        state before the claim, so the caller reconciles loads claimed or exported before.
        """
        ...

    def claim_unit(self, campaign_id: str, sn: bytes, station: str, lease_s: float,
                   now: float) -> list[LoadRow]:
        """Claim one unit's open loads (a card that came into a reader), as :meth:`claim`
        would: planned ones, this station's own, or another's whose lease expired."""
        ...

    def renew(self, campaign_id: str, station: str, lease_s: float, now: float) -> None:
        """Extend this station's open claims."""
        ...

    def exported(self, row: LoadRow, suite: int, r: bytes, header: bytes, kcv: bytes,
                 now: float) -> None: ...
    def imported(self, row: LoadRow, *, suite: int | None, r: bytes | None, header: bytes,
                 kcv: bytes, rct: bytes | None, reconciled: bool, now: float,
                 e_a: bytes | None = None, c_u: bytes | None = None) -> None:
        """Record an import: the receipt (``rct``; of suite 0x03 with ``e_a`` and ``c_u``),
        or a load ``reconciled`` with the unit (no receipt)."""
        ...

    def failed(self, row: LoadRow, sw: str | None, reason: str, now: float, *,
               final: bool) -> None:
        """Record a failure; ``final`` False puts the load back to planned (retry later)."""
        ...

    def counts(self, campaign_id: str) -> dict[str, int]: ...

    def rows(self, campaign_id: str, states: Sequence[str] | None = None) -> Iterator[LoadRow]:
        """Every load of the campaign (optionally in ``states``), by (seq, REF2), streamed."""
        ...

    def event(self, campaign_id: str, station: str, now: float, done: int,
              failed: int) -> None: ...
    def events(self, campaign_id: str) -> list[tuple[float, str, int, int]]: ...

    def lock_station(self, campaign_id: str, station: str) -> None:
        """Be the only live process running ``station`` on this campaign (until close): a
        station resumes its own claims at once, so two processes must not share a name.
        Raise StoreError when another live process holds it. Idempotent."""
        ...

    def close(self) -> None: ...
