"""Small helpers shared by the test packages (no fixtures: those are in conftest.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path


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
