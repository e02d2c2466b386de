"""Planning a campaign: its units (a manifest or the home's emulated units), its loads
checked against the authority's export policies, and the journal that records it."""

from __future__ import annotations

import contextlib
import csv
import json
import sqlite3
import time
from pathlib import Path

from ..core.dukpt import USAGE_BDK, InitialKeyId
from ..core.errors import PolicyRefused, StoreError
from ..core.ref1 import display_ref1
from ..records.sql import is_postgres_url
from .fleet import EmulatedFleet
from .home import Home
from .journal import open_journal
from .journal.model import Campaign, Journal, PlannedLoad


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


def read_manifest(path: Path) -> list[bytes]:
    """SNs in hex: a JSON list (of strings, or of objects with ``sn``), or a CSV with an
    ``sn`` column (or one SN per line)."""
    text = path.read_text()
    items: list[str]
    if path.suffix.lower() == ".json":
        doc = json.loads(text)
        items = [d["sn"] if isinstance(d, dict) else d for d in doc]
    else:
        rows = list(csv.reader(text.splitlines()))
        if rows and rows[0] and rows[0][0].strip().lower() == "sn":
            rows = rows[1:]
        items = [r[0].strip() for r in rows if r and r[0].strip()]
    out = []
    seen = set()
    for x in items:
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
    return out


def campaign_units(home: Home, manifest: Path | None) -> tuple[list[bytes], dict[str, object]]:
    """The units of a new campaign and where they come from: the manifest's, or every
    emulated unit of the home. None is refused (ValueError)."""
    if manifest is not None:
        serials = read_manifest(manifest)
        source: dict[str, object] = {"manifest": str(manifest)}
    else:
        fleet = EmulatedFleet.open(home.units_dir, home.source)
        serials = fleet.serials()
        fleet.close()
        source = {"emulated": str(home.units_dir)}
    if not serials:
        raise ValueError("no units to customize")
    return serials, source


def create_campaign(home: Home, journal: Journal, name: str, set_id: bytes,
                    loads: list[tuple[bytes, int]], serials: list[bytes],
                    source: dict[str, object]) -> Campaign:
    """Plan every load (:func:`plan_loads`) in the journal."""
    return record_campaign(home, journal, name, set_id, plan_loads(home, set_id, loads),
                           serials, source)


def plan_campaign(home: Home, where: str | None, name: str, set_id: bytes,
                  loads: list[tuple[bytes, int]], *, manifest: Path | None,
                  initial_key_id_base: InitialKeyId | None) -> Campaign:
    """``keyload campaign create``: the units (:func:`campaign_units`), every load planned
    (:func:`plan_loads`) and then, nothing refused, the campaign recorded in the journal
    ``where`` (or the home's)."""
    serials, source = campaign_units(home, manifest)
    plan = plan_loads(home, set_id, loads, units=len(serials),
                      initial_key_id_base=initial_key_id_base)
    with contextlib.closing(open_home_journal(home, where)) as journal:
        return record_campaign(home, journal, name, set_id, plan, serials, source)


def record_campaign(home: Home, journal: Journal, name: str, set_id: bytes,
                    plan: tuple[PlannedLoad, ...], serials: list[bytes],
                    source: dict[str, object]) -> Campaign:
    camp = Campaign(name, set_id, time.time(), plan, source, len(serials))
    journal.create_campaign(camp, serials)
    audit = home.audit()
    audit.append("campaign create", {"campaign": name, "set_id": set_id.hex(),
                                     "units": len(serials),
                                     "plan": [[p.ref1.hex(), p.ref2, p.version] for p in plan]})
    audit.close()
    return camp


def plan_loads(home: Home, set_id: bytes, loads: list[tuple[bytes, int]], *,
               initial_key_id_base: InitialKeyId | None = None,
               units: int = 1) -> tuple[PlannedLoad, ...]:
    """Resolve each REF1's current version at the authority. A load the key's export
    policy forbids (the authority would refuse it, 6986, for every unit) is refused here,
    by the authority's own check (ValueError); so are two loads to one slot, and a load
    of a BDK without ``initial_key_id_base`` (each of the ``units`` receives the IK of the
    base counted up by its place) or that base without one."""
    if len({r2 for _, r2 in loads}) != len(loads):
        raise ValueError("two loads go to the same slot")
    ks = home.open_keystore()
    try:
        ks.set_info(set_id)
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
    bdks = [i.ref1 for i, _ in keys if i.attrs.usage == USAGE_BDK]
    if bdks and initial_key_id_base is None:
        raise ValueError(f"key {display_ref1(bdks[0])} is a BDK (usage {USAGE_BDK}): each "
                         "unit receives its initial key, give --initial-key-id-base")
    if initial_key_id_base is not None:
        if not bdks:
            raise ValueError(f"--initial-key-id-base: no load is of a BDK (usage {USAGE_BDK})")
        initial_key_id_base.plus(units - 1)  # the IDs must not run out
    return tuple(PlannedLoad(i.ref1, r2, i.version,
                             initial_key_id_base.value if i.ref1 in bdks and
                             initial_key_id_base is not None else None) for i, r2 in keys)
