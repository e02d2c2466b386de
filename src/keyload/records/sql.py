"""SQL helpers shared by the record databases (SQLite files, PostgreSQL URLs)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeGuard


def is_postgres_url(where: str | Path | None) -> TypeGuard[str]:
    """Whether a ``--journal`` / ``--state`` value names a PostgreSQL database (a
    ``postgresql://`` URL) rather than a SQLite file."""
    return where is not None and str(where).startswith(("postgresql://", "postgres://"))
