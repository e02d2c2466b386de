"""The journal's tables and the SQL every backend shares: the schema, a row's columns and
how they decode, campaigns as rows, and the outcome writes (``?`` placeholders)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from ...core.dukpt import INITIAL_KEY_ID_LEN
from ...core.keys import KeyType
from ...records.stored import (
    E_A_SIZE,
    H_SIZE,
    KCV_SIZE,
    R_SIZE,
    REF1_SIZE,
    SN_SIZE,
    DamagedRow,
    hex_col,
    int_col,
    opt_hex_col,
    opt_int_col,
    rct_size,
    text_col,
)
from .model import PLANNED, STATES, Campaign, LoadRow, LoadState, PlannedLoad

SCHEMA = """
CREATE TABLE IF NOT EXISTS campaigns (
    id TEXT PRIMARY KEY,
    set_id TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    plan TEXT NOT NULL,
    source TEXT NOT NULL,
    units INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS loads (
    campaign TEXT NOT NULL,
    seq BIGINT NOT NULL,
    sn TEXT NOT NULL,
    ref2 INTEGER NOT NULL,
    ref1 TEXT NOT NULL,
    version INTEGER,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    station TEXT,
    lease DOUBLE PRECISION,
    suite INTEGER,
    r TEXT,
    header TEXT,
    kcv TEXT,
    rct TEXT,
    reconciled INTEGER NOT NULL DEFAULT 0,
    sw TEXT,
    reason TEXT,
    updated DOUBLE PRECISION,
    PRIMARY KEY (campaign, sn, ref2)
);
CREATE INDEX IF NOT EXISTS loads_claim ON loads (campaign, state, seq);
CREATE INDEX IF NOT EXISTS loads_seq ON loads (campaign, seq, ref2);
CREATE TABLE IF NOT EXISTS events (
    campaign TEXT NOT NULL,
    time DOUBLE PRECISION NOT NULL,
    station TEXT NOT NULL,
    loads_done INTEGER NOT NULL,
    loads_failed INTEGER NOT NULL
);
"""


#: suite 0x03 (docs/protocol.md §10.3): E_A and the unit's C_U, kept with the receipt (NULL
#: for the other suites)
SUITE3_COLUMNS = ("e_a", "c_u")
#: the columns that came after the ``loads`` table, added by each backend to a table made
#: before them: suite 0x03's, and a BDK's load's initial key ID (docs/protocol.md Appendix D)
ADDED_COLUMNS = (*SUITE3_COLUMNS, "initial_key_id")

COLUMNS = ("campaign, seq, sn, ref2, ref1, version, state, attempts, station, lease, suite, r, "
           "header, kcv, rct, reconciled, sw, reason, updated, e_a, c_u, initial_key_id")
#: the columns a planned load is written with (:func:`planned_rows`)
PLANNED_COLUMNS = "campaign, seq, sn, ref2, ref1, version, state, initial_key_id"


def missing_columns(have: Iterable[str]) -> list[str]:
    """The columns of :data:`ADDED_COLUMNS` a ``loads`` table with columns ``have`` lacks."""
    got = set(have)
    return [c for c in ADDED_COLUMNS if c not in got]


def planned_rows(c: Campaign, serials: Iterable[bytes],
                 initial_key_ids: Mapping[bytes, bytes] | None) -> Iterator[tuple[Any, ...]]:
    """Every planned load of ``c`` (columns as in :data:`PLANNED_COLUMNS`), streamed: a
    load of a BDK with its unit's initial key ID (ValueError when it has none)."""
    plan = [(p.ref2, p.ref1.hex(), p.version, p.initial_key) for p in c.plan]
    ids = initial_key_ids or {}
    for seq, sn in enumerate(serials):
        h = sn.hex()
        ik = ids.get(sn)
        for ref2, ref1, version, initial_key in plan:
            if initial_key and ik is None:
                raise ValueError(f"unit {h}: no initial key ID for its load of a BDK")
            yield (c.id, seq, h, ref2, ref1, version, PLANNED,
                   ik.hex() if initial_key and ik is not None else None)


def row_of(t: Sequence[Any]) -> LoadRow:
    """A ``loads`` row (columns as in ``COLUMNS``); DamagedRow when a column does not decode."""
    if not isinstance(t[6], str) or t[6] not in STATES:
        raise DamagedRow("state is not a load state")
    suite = opt_int_col(t[10], "suite")
    return LoadRow(text_col(t[0], "campaign"), int_col(t[1], "seq"),
                   hex_col(t[2], "sn", SN_SIZE), int_col(t[3], "ref2"),
                   hex_col(t[4], "ref1", REF1_SIZE), opt_int_col(t[5], "version"),
                   LoadState(t[6]),
                   int_col(t[7], "attempts"), t[8], t[9], suite,
                   opt_hex_col(t[11], "r", R_SIZE), opt_hex_col(t[12], "header", H_SIZE),
                   opt_hex_col(t[13], "kcv", KCV_SIZE),
                   opt_hex_col(t[14], "rct", rct_size(suite)),
                   bool(t[15]), t[16], t[17], t[18], opt_hex_col(t[19], "e_a", E_A_SIZE),
                   opt_hex_col(t[20], "c_u"),
                   opt_hex_col(t[21], "initial_key_id", INITIAL_KEY_ID_LEN))


def campaign_to_row(c: Campaign) -> tuple[str, str, float, str, str, int]:
    plan = [{"ref1": p.ref1.hex(), "ref2": p.ref2, "version": p.version,
             **({} if p.initial_key_id_base is None else
                {"initial_key_id_base": p.initial_key_id_base.hex()}),
             **({"initial_key": True} if p.initial_key else {}),
             **({} if p.ik_type is None else {"ik_type": p.ik_type.label})} for p in c.plan]
    return (c.id, c.set_id.hex(), c.created, json.dumps(plan), json.dumps(c.source), c.units)


def campaign_from_row(t: Sequence[Any]) -> Campaign:
    """A campaign; a plan made before a BDK's load kept ``initial_key`` has the base alone."""
    plan = tuple(PlannedLoad(bytes.fromhex(p["ref1"]), int(p["ref2"]), p["version"],
                             None if p.get("initial_key_id_base") is None else
                             bytes.fromhex(p["initial_key_id_base"]),
                             p.get("initial_key") is True or
                             p.get("initial_key_id_base") is not None,
                             None if p.get("ik_type") is None else KeyType.parse(p["ik_type"]))
                 for p in json.loads(t[3]))
    return Campaign(t[0], bytes.fromhex(t[1]), float(t[2]), plan, json.loads(t[4]), int(t[5]))


# The outcome writes, the same on every backend (``?`` placeholders; PostgreSQL's
# journal turns them into ``%s`` with :func:`pg_params`).
def exported_write(row: LoadRow, suite: int, r: bytes, header: bytes, kcv: bytes,
                   now: float) -> tuple[str, tuple[Any, ...]]:
    return ("UPDATE loads SET state = 'exported', attempts = attempts + 1, suite = ?, r = ?, "
            "header = ?, kcv = ?, updated = ? WHERE campaign = ? AND sn = ? AND ref2 = ?",
            (suite, r.hex(), header.hex(), kcv.hex(), now, row.campaign, row.sn.hex(),
             row.ref2))


def imported_write(row: LoadRow, suite: int | None, r: bytes | None, header: bytes,
                   kcv: bytes, rct: bytes | None, reconciled: bool, now: float,
                   e_a: bytes | None = None,
                   c_u: bytes | None = None) -> tuple[str, tuple[Any, ...]]:
    return ("UPDATE loads SET state = 'imported', suite = ?, r = ?, header = ?, kcv = ?, "
            "rct = ?, reconciled = ?, sw = NULL, reason = NULL, updated = ?, e_a = ?, "
            "c_u = ? WHERE campaign = ? AND sn = ? AND ref2 = ?",
            (suite, *(None if v is None else v.hex() for v in (r, header, kcv, rct)),
             int(reconciled), now, *(None if v is None else v.hex() for v in (e_a, c_u)),
             row.campaign, row.sn.hex(), row.ref2))


def failed_write(row: LoadRow, sw: str | None, reason: str, now: float,
                 final: bool) -> tuple[str, tuple[Any, ...]]:
    """A failed attempt. Final: ``failed``, the row keeping the station it failed on. Else
    released for a retry: back to planned, or, once exported (the unit may hold the key),
    left exported with an expired lease, so that the next claim reconciles it with the
    unit before any new export."""
    if final:
        return ("UPDATE loads SET state = 'failed', sw = ?, reason = ?, "
                "attempts = attempts + 1, lease = NULL, updated = ? "
                "WHERE campaign = ? AND sn = ? AND ref2 = ?",
                (sw, reason, now, row.campaign, row.sn.hex(), row.ref2))
    return ("UPDATE loads SET state = CASE state WHEN 'exported' THEN 'exported' ELSE "
            "'planned' END, lease = CASE state WHEN 'exported' THEN 0 ELSE NULL END, "
            "sw = ?, reason = ?, attempts = attempts + 1, station = NULL, updated = ? "
            "WHERE campaign = ? AND sn = ? AND ref2 = ?",
            (sw, reason, now, row.campaign, row.sn.hex(), row.ref2))


COUNTS = "SELECT state, count(*) FROM loads WHERE campaign = ? GROUP BY state"


def counts_of(pairs: Iterable[Sequence[Any]]) -> dict[str, int]:
    """Loads by state, every state present, from the (state, count) rows of COUNTS."""
    out: dict[str, int] = dict.fromkeys(STATES, 0)
    for state, n in pairs:
        out[state] = int(n)
    return out


def pg_params(sql: str) -> str:
    """``?`` placeholders as PostgreSQL's ``%s`` (the statements above hold no literal ?)."""
    return sql.replace("?", "%s")
