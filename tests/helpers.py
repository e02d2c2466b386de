"""Small helpers shared by the test packages (no fixtures: those are in conftest.py)."""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
from pathlib import Path
from typing import Any, TypeVar


def sqlite_count(db_path: Path, sql: str) -> int:
    """One count read on a read-only connection of its own, beside a process that writes
    the store; 0 while the file or its table is not there yet."""
    if not db_path.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            return int(db.execute(sql).fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error:  # the table is not there yet
        return 0


T = TypeVar("T")


def copy_world(world: T, dst: Path) -> T:
    """A copy in ``dst`` of a prepared world (a dataclass whose ``dir`` holds every file
    it names, such as the service tests' ``build_world``): the same sets, keys, units and
    PKI, in files of its own, so that a test can change them and the next one still gets
    them as prepared. The world's paths under ``dir`` are moved to the copy."""
    w: Any = world
    src: Path = w.dir
    shutil.copytree(src, dst)
    moved = {f.name: dst / value.relative_to(src) for f in dataclasses.fields(w)
             if isinstance(value := getattr(w, f.name), Path) and value.is_relative_to(src)}
    copy: T = dataclasses.replace(w, **moved)
    return copy
