"""Rotating an application key: its next version in the authority, the older versions
kept beside it (``keyload key rotate``, ``key list``), and the campaign that brings the
new version to exactly the units whose slot holds an older one (``keyload campaign create
--rotate``), found in the station's records and the campaigns' ledgers.

An export always sends a REF1's current version. A unit already holding it is not
planned, and one found holding it when the campaign runs is counted done
(:mod:`keyload.station.campaign`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.ref1 import display_ref1, parse_ref1
from ..records.ledger import LedgerEntry
from ..units.authority import KeyInfo
from .admin import new_version_of, read_keystore
from .home import Home, Keystore
from .journal.model import Campaign, Journal, PlannedLoad
from .plan import open_home_journal, plan_loads, read_manifest, record_campaign
from .records import LoadRecords
from .report import campaign_entries, station_entries
from .verify import ledger_journal


def key_versions(home: Home) -> list[tuple[KeyInfo, bool]]:
    """Every version of every REF1, oldest first, each with whether it is the current one
    (the one exported)."""
    def read(ks: Keystore) -> list[tuple[KeyInfo, bool]]:
        older = ks.older_key_infos()
        out: list[tuple[KeyInfo, bool]] = []
        for k in ks.key_infos():
            out += [(o, False) for o in older if o.ref1 == k.ref1]
            out.append((k, True))
        return out
    return read_keystore(home, read)


def fill_options(options: dict[str, Any], home: Home, ref1: bytes) -> None:
    """``key rotate``'s options (as ``key generate|import`` name them) with those not
    given (None, False or empty) taken from :func:`next_version_options` (from a key
    block, ``tr31``, when one is given)."""
    for name, value in next_version_options(home, ref1,
                                            from_block=options.get("tr31") is not None).items():
        given = options.get(name)
        if given is None or given is False or given == "":  # (a --key-version 0 is given)
            options[name] = value


def next_version_options(home: Home, ref1: bytes, *, from_block: bool) -> dict[str, object]:
    """What ``key rotate`` takes from the current version of ``ref1`` when it is not told
    otherwise, as ``key generate|import`` options: the next version number, the type,
    usage, mode, exportability, the sets and slots policy, diversification and label
    (``from_block``: a key block's header gives type, attributes and version). Refused as
    :func:`~.admin.new_version_of` refuses; an unknown REF1: 6A88."""
    def read(ks: Keystore) -> KeyInfo:
        info = ks.key_info(ref1)
        new_version_of(ks, ref1)
        return info
    info = read_keystore(home, read)
    p = info.policy
    out: dict[str, object] = {
        "sets": "any" if p.sets is None else ",".join(sorted(s.hex() for s in p.sets)),
        "slots": "any" if p.slots is None else ",".join(map(str, sorted(p.slots))),
        "diversify": info.diversify, "label": info.label}
    if not from_block:
        a = info.attrs
        out.update(key_version=info.version + 1, type=info.key_type.label, usage=a.usage,
                   mode=a.mode, exportability=a.exportability,
                   length=None if info.key_type.is_aes else info.length)
    return out


@dataclass(frozen=True)
class RotationPlan:
    """The units of a rotation campaign, each holding an older version of the key."""

    serials: list[bytes]
    plan: tuple[PlannedLoad, ...]
    source: dict[str, object]
    held: dict[int, int]  # older version -> how many of the units hold it

    def line(self, campaign: Campaign) -> str:
        p = self.plan[0]
        olds = ", ".join(f"v{v}: {n:,}" for v, n in sorted(self.held.items()))
        n = campaign.units
        holds = "1 unit holds" if n == 1 else f"{n:,} units hold"
        return (f"campaign {campaign.id}: {holds} an older version of "
                f"{display_ref1(p.ref1)} ({olds}); version {p.version} planned into slot "
                f"{p.ref2}")


def deliveries(home: Home, journal: Journal | None) -> Iterator[LedgerEntry]:
    """Every load a unit receipted (or was reconciled on): the station's single loads
    (``station.db``) and the campaigns' of ``journal``."""
    if home.station_db.exists():
        records = LoadRecords(home.station_db)
        try:
            yield from station_entries(records)
        finally:
            records.close()
    for name in journal.campaigns() if journal is not None else []:
        assert journal is not None
        yield from campaign_entries(journal, name)


def rotation_plan(home: Home, journal: Journal | None, set_id: bytes, ref1: bytes,
                  manifest: list[bytes] | None = None) -> RotationPlan:
    """The units of set ``set_id`` (of ``manifest`` only, when given) whose last load of
    ``ref1`` delivered an older version than the current one, and the load of the current
    version into that slot. Refused (ValueError), nothing planned: no such unit, or units
    holding the key in several slots (one campaign a slot: give a manifest)."""
    info = read_keystore(home, lambda ks: (ks.set_info(set_id), ks.key_info(ref1))[1])
    last: dict[tuple[bytes, int], LedgerEntry] = {}  # by unit and slot
    for e in deliveries(home, journal):
        at = (e.sn, e.ref2)
        if e.set_id == set_id and e.ref1 == ref1 and (
                at not in last or (e.time or 0.0) >= (last[at].time or 0.0)):
            last[at] = e
    wanted = None if manifest is None else set(manifest)
    old = {at: e for at, e in last.items() if (wanted is None or at[0] in wanted)
           and (e.delivered_version or 0) < info.version}
    name = display_ref1(ref1)
    if not old:
        raise ValueError(f"no unit of set {set_id.hex()} holds an older version of {name} "
                         f"than its current version {info.version} (station records and "
                         "campaign ledgers): nothing to rotate")
    slots = sorted({e.ref2 for e in old.values()})
    if len(slots) > 1:
        raise ValueError(f"units of set {set_id.hex()} hold {name} in slots "
                         f"{', '.join(map(str, slots))}: plan one rotation campaign a slot, "
                         "each with a --manifest of its units")
    held: dict[int, int] = {}
    for e in old.values():
        v = e.delivered_version or 0
        held[v] = held.get(v, 0) + 1
    serials = sorted({sn for sn, _ in old})
    plan = plan_loads(home, set_id, [(ref1, slots[0])], units=len(serials))
    return RotationPlan(serials, plan, {"rotate": name, "to_version": info.version,
                                        "held": {str(v): n for v, n in sorted(held.items())}},
                        held)


def create_rotation(home: Home, where: str | None, name: str, set_id: bytes, ref1: str,
                    manifest: Path | None) -> tuple[Campaign, RotationPlan]:
    """Campaign ``name`` of :func:`rotation_plan` (``ref1`` as the operator writes it) in
    the journal ``where`` (or the home's), read first: refused, nothing is created, not
    even the journal."""
    wanted = None if manifest is None else read_manifest(manifest).serials
    reading = ledger_journal(home, where)
    try:
        rot = rotation_plan(home, reading, set_id, parse_ref1(ref1), wanted)
    finally:
        if reading is not None:
            reading.close()
    with contextlib.closing(open_home_journal(home, where)) as journal:
        camp = record_campaign(home, journal, name, set_id, rot.plan, rot.serials, rot.source)
    return camp, rot
