"""PostgreSQL helpers shared by the campaign journal and the service state.

This module imports psycopg (the ``postgres`` extra): import it only where a PostgreSQL
store is opened (:func:`~keyload.records.sql.is_postgres_url` tells which, without it).
"""

from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict

from ..core.errors import StoreError


def describe_url(url: str) -> str:
    """The URL without its password (for messages)."""
    try:
        d = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql journal"
    host = d.get("host") or "localhost"
    port = f":{d['port']}" if d.get("port") else ""
    return f"postgresql://{d.get('user') or ''}@{host}{port}/{d.get('dbname') or ''}"


def connect_error(what: str, url: str, e: psycopg.Error) -> StoreError:
    """A failed connection as one line: ``what``, the URL without its password, and the
    server's (or the network's) reason."""
    return StoreError(f"{what} {describe_url(url)}: cannot connect ({pg_reason(e)})")


def pg_reason(e: psycopg.Error) -> str:
    """The first line of a psycopg error (its class name when it has no text)."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
