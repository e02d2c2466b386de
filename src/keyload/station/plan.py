"""Planning a campaign: its units (a manifest or the home's emulated units), its loads
checked against the authority's export policies, and the journal that records it."""

from __future__ import annotations

import contextlib
import csv
import json
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..core.dukpt import USAGE_BDK, InitialKeyId, check_derivable
from ..core.errors import PolicyRefused, StoreError
from ..core.keys import KeyType
from ..core.ref1 import display_ref1
from ..records.sql import is_postgres_url
from ..units.authority import KeyInfo
from .fleet import EmulatedFleet
from .home import Home
from .journal import open_journal
from .journal.model import Campaign, Journal, PlannedLoad

INITIAL_KEY_ID = "initial_key_id"  # a manifest's column: each unit's initial key ID


def open_home_journal(home: Home, where: str | None, *, create: bool = True) -> Journal:
    """The campaign journal: ``where`` (a SQLite file or a postgresql:// URL) or the
    home's. Opened to read only (``create=False``), a missing home or journal is refused,
    naming it, and nothing is created."""
    path = where or home.journal_path
    if not create:
        if where is None:
            home.existing()
        if not is_postgres_url(str(path)):
            check_journal_file(Path(path))
        return open_journal(path)
    home.ensure()
    return open_journal(path)


def check_journal_file(path: Path) -> None:
    """``path`` is a campaign journal, looked at read-only: a file that is not one (a text
    file, an empty file, another database) is refused as it is; opened as the journal, it
    would be made 0600 and given the journal's tables."""
    if not path.is_file():
        raise StoreError(f"no campaign journal at {path} (no campaign was created there)")
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro",
                                                uri=True)) as db:
            tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master")}
    except sqlite3.Error:
        tables = set()
    if not {"campaigns", "loads"} <= tables:
        raise StoreError(f"{path} is not a campaign journal")


@dataclass(frozen=True)
class Units:
    """A new campaign's units: their SNs, where they come from, and each unit's initial
    key ID (SN -> ID) when the manifest has an ``initial_key_id`` column (else None)."""

    serials: list[bytes]
    source: dict[str, object]
    initial_key_ids: dict[bytes, bytes] | None = None


def _manifest_items(path: Path) -> tuple[list[tuple[str, str | None]], bool]:
    """(SN, initial key ID) texts of a manifest, and whether it has the ID column."""
    text = path.read_text()
    if path.suffix.lower() == ".json":
        doc = json.loads(text)
        has_ids = any(isinstance(d, dict) and INITIAL_KEY_ID in d for d in doc)
        return [(str(d["sn"]), d.get(INITIAL_KEY_ID)) if isinstance(d, dict) else (str(d), None)
                for d in doc], has_ids
    rows = [r for r in csv.reader(text.splitlines()) if any(c.strip() for c in r)]
    names = [c.strip().lower() for c in rows[0]] if rows else []
    if "sn" not in names:  # one SN per line
        return [(r[0].strip(), None) for r in rows], False
    at, ik_at = names.index("sn"), names.index(INITIAL_KEY_ID) if INITIAL_KEY_ID in names else None
    return [(r[at].strip() if at < len(r) else "",
             None if ik_at is None or ik_at >= len(r) else r[ik_at].strip())
            for r in rows[1:]], ik_at is not None


def read_manifest(path: Path) -> Units:
    """SNs in hex: a JSON list (of strings, or of objects with ``sn`` and, for a BDK's
    load, ``initial_key_id``), or a CSV with an ``sn`` column (and ``initial_key_id``) or
    one SN per line. ValueError for an SN or initial key ID that is not hex or not of its
    length, listed twice, or a unit without its ID where the column is given."""
    items, has_ids = _manifest_items(path)
    out: list[bytes] = []
    seen: set[bytes] = set()
    ids: dict[bytes, bytes] = {}
    holder: dict[bytes, str] = {}
    for x, ik_text in items:
        try:
            sn = bytes.fromhex(str(x))
        except ValueError:
            raise ValueError(f"{path}: {x!r} is not a hex SN") from None
        if not 1 <= len(sn) <= 32:
            raise ValueError(f"{path}: SN {x!r} must be 1 to 32 bytes")
        if sn in seen:
            raise ValueError(f"{path}: SN {x} is listed twice")
        seen.add(sn)
        out.append(sn)
        if not has_ids:
            continue
        if not ik_text:
            raise ValueError(f"{path}: SN {x} has no {INITIAL_KEY_ID}")
        try:
            ik = InitialKeyId.parse(str(ik_text)).value
        except ValueError as e:
            raise ValueError(f"{path}: SN {x}: {e}") from None
        if ik in holder:
            raise ValueError(f"{path}: initial key ID {ik.hex().upper()} is given to units "
                             f"{holder[ik]} and {x}: each unit's is its own")
        holder[ik] = str(x)
        ids[sn] = ik
    return Units(out, {"manifest": str(path)}, ids if has_ids else None)


def campaign_units(home: Home, manifest: Path | None) -> Units:
    """The units of a new campaign and where they come from: the manifest's (with their
    initial key IDs when it gives them), or every emulated unit of the home. None is
    refused (ValueError)."""
    if manifest is not None:
        units = read_manifest(manifest)
    else:
        fleet = EmulatedFleet.open(home.units_dir, home.source)
        units = Units(fleet.serials(), {"emulated": str(home.units_dir)})
        fleet.close()
    if not units.serials:
        raise ValueError("no units to customize")
    return units


def plan_campaign(home: Home, journal: str | None, name: str, set_id: bytes,
                  loads: list[tuple[bytes, int]], *, manifest: Path | None,
                  initial_key_id_base: str | None = None,
                  ik_type: str | None = None) -> Campaign:
    """``keyload campaign create``: the units (:func:`campaign_units`) and their loads
    (:func:`plan_loads`), each unit's initial key ID for a BDK's load (the base counted
    up by the unit's place, or the manifest's), all checked before the journal (``journal``,
    or the home's) is opened; then recorded (:func:`record_campaign`)."""
    units = campaign_units(home, manifest)
    base = None if initial_key_id_base is None else InitialKeyId.parse(initial_key_id_base)
    plan = plan_loads(home, set_id, loads, units=len(units.serials),
                      initial_key_id_base=base, initial_key_ids=units.initial_key_ids,
                      ik_type=None if ik_type is None else KeyType.parse(ik_type))
    ids = units.initial_key_ids if base is None else \
        {sn: base.plus(i).value for i, sn in enumerate(units.serials)}
    with contextlib.closing(open_home_journal(home, journal)) as j:
        return record_campaign(home, j, name, set_id, plan, units.serials, units.source, ids)


def create_campaign(home: Home, journal: Journal, name: str, set_id: bytes,
                    loads: list[tuple[bytes, int]], serials: list[bytes],
                    source: dict[str, object]) -> Campaign:
    """Plan every load (:func:`plan_loads`) in the journal."""
    return record_campaign(home, journal, name, set_id, plan_loads(home, set_id, loads),
                           serials, source)


def record_campaign(home: Home, journal: Journal, name: str, set_id: bytes,
                    plan: tuple[PlannedLoad, ...], serials: list[bytes],
                    source: dict[str, object],
                    initial_key_ids: Mapping[bytes, bytes] | None = None) -> Campaign:
    """The campaign in the journal (each BDK's load with its unit's initial key ID from
    ``initial_key_ids``) and in the audit chain."""
    camp = Campaign(name, set_id, time.time(), plan, source, len(serials))
    journal.create_campaign(camp, serials, initial_key_ids)
    audit = home.audit()
    audit.append("campaign create", {"campaign": name, "set_id": set_id.hex(),
                                     "units": len(serials),
                                     "plan": [[p.ref1.hex(), p.ref2, p.version] for p in plan]})
    audit.close()
    return camp


def plan_loads(home: Home, set_id: bytes, loads: list[tuple[bytes, int]], *,
               initial_key_id_base: InitialKeyId | None = None,
               initial_key_ids: Mapping[bytes, bytes] | None = None,
               ik_type: KeyType | None = None, units: int = 1) -> tuple[PlannedLoad, ...]:
    """Resolve each REF1's current version at the authority. A load the key's export
    policy forbids (the authority would refuse it, 6986, for every unit) is refused here,
    by the authority's own check (ValueError); so are two loads to one slot, and a load
    of a BDK without its units' initial key IDs: ``initial_key_id_base`` (each of the
    ``units`` receives the IK of the base counted up by its place) or ``initial_key_ids``
    (the manifest's column), not both. Either of them, or ``ik_type``, without a BDK's
    load is refused, and so is an ``ik_type`` longer than a BDK's, and a BDK's load for an
    identity set (its EXPORTKEY has no initial key ID)."""
    if len({r2 for _, r2 in loads}) != len(loads):
        raise ValueError("two loads go to the same slot")
    ks = home.open_keystore()
    try:
        identity = ks.set_info(set_id).identity
        keys = [(ks.key_info(r1), r2) for r1, r2 in loads]
    finally:
        ks.close()
    for info, r2 in keys:
        try:
            info.policy.check(set_id, r2)
        except PolicyRefused:
            name = display_ref1(info.ref1)
            raise ValueError(f"--load {name}:{r2}: the export policy of key {name} "
                             f"({info.policy.describe()}) does not allow set "
                             f"{set_id.hex()} slot {r2}") from None
    bdks = [i for i, _ in keys if i.attrs.usage == USAGE_BDK]
    if bdks and identity:  # the authority would refuse every unit's load (6986)
        raise ValueError(f"key {display_ref1(bdks[0].ref1)} is a BDK (usage {USAGE_BDK}): "
                         f"set {set_id.hex()} is an identity set, whose EXPORTKEY (suite "
                         "0x03) carries no initial key ID; a BDK's initial keys go to units "
                         "of a transport-key set (docs/protocol.md Appendix D)")
    _check_initial_keys(bdks, initial_key_id_base, initial_key_ids, ik_type, units)
    for bdk in bdks:
        if ik_type is not None:
            check_derivable(bdk.key_type, ik_type)
    base = None if initial_key_id_base is None else initial_key_id_base.value
    return tuple(PlannedLoad(i.ref1, r2, i.version, base, True, ik_type) if i in bdks else
                 PlannedLoad(i.ref1, r2, i.version) for i, r2 in keys)


def _check_initial_keys(bdks: list[KeyInfo], base: InitialKeyId | None,
                        ids: Mapping[bytes, bytes] | None, ik_type: KeyType | None,
                        units: int) -> None:
    """The initial key IDs of a campaign: given, once, for a BDK's load only."""
    if bdks and base is None and ids is None:
        raise ValueError(f"key {display_ref1(bdks[0].ref1)} is a BDK (usage {USAGE_BDK}): "
                         "each unit receives its initial key, give --initial-key-id-base "
                         f"(or the manifest's {INITIAL_KEY_ID} column)")
    if base is not None and ids is not None:
        raise ValueError(f"--initial-key-id-base and the manifest's {INITIAL_KEY_ID} column "
                         "both give the units' initial key IDs: give one")
    for given, what in ((base, "--initial-key-id-base"), (ids, f"the manifest's "
                                                               f"{INITIAL_KEY_ID} column"),
                        (ik_type, "--ik-type")):
        if given is not None and not bdks:
            raise ValueError(f"{what}: no load is of a BDK (usage {USAGE_BDK})")
    if base is not None:
        base.plus(units - 1)  # the IDs must not run out
