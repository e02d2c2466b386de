"""Reading keyload's record databases: a damaged file or row is one StoreError naming it.

The record databases (the authority's export records, the audit log, the station's
records, the campaign journal) open with :func:`open_records` and decode their rows
inside :func:`reading`. Then each of these becomes a :class:`DamagedStore` whose message,
one line, names the file (``damaged store HOME/station.db: …``):

- a file that is not a SQLite database, or is cut short (not a whole number of pages:
  SQLite would read the missing bytes as zeros and go on);
- SQLite's own findings (``database disk image is malformed``, ``file is not a
  database``) at any read;
- a row that does not decode: a hex column that is not hex, has an odd length or the
  wrong length, a NULL or a value of the wrong type where a value must be (the
  ``*_col`` helpers name the column).

Other database errors (a lock held too long, an I/O error) are a plain StoreError naming
the file. Nothing here writes: a damaged file is left as it is.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..core.ecc import POINT_LEN, SIGNATURE_LEN
from ..core.errors import DamagedStore, StoreError
from ..core.suite3 import SUITE_ECDH
from .sql import open_sqlite

SQLITE_MAGIC = b"SQLite format 3\x00"
# the sizes of the stored fields (docs/protocol.md §3, §5): bytes, or (least, most)
SN_SIZE = REF1_SIZE = (1, 32)
SET_ID_SIZE = KCV_SIZE = 5
R_SIZE = RCT_SIZE = 16
H_SIZE = 12
E_A_SIZE = POINT_LEN  # suite 0x03 (§10.1): an uncompressed P-256 point
_DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)  # primary result codes


class DamagedRow(ValueError):
    """A stored row's column does not decode (the message names the column)."""


def _kind(value: object) -> str:
    return "NULL" if value is None else type(value).__name__


def rct_size(suite: int | None) -> int:
    """A receipt's size: the unit's ECDSA signature ``r || s`` in suite 0x03 (§10.3), a
    MAC in the others (§5)."""
    return SIGNATURE_LEN if suite == SUITE_ECDH else RCT_SIZE


def hex_col(value: object, column: str, size: int | tuple[int, int] | None = None) -> bytes:
    """The bytes of a hex column: ``size`` bytes exactly, or (least, most)."""
    if not isinstance(value, str):
        raise DamagedRow(f"{column} is {_kind(value)}, not hex")
    try:
        out = bytes.fromhex(value)
    except ValueError:
        raise DamagedRow(f"{column} is not hex") from None
    least, most = (size, size) if isinstance(size, int) else size or (0, len(out))
    if not least <= len(out) <= most:
        raise DamagedRow(f"{column} is {len(out)} bytes")
    return out


def opt_hex_col(value: object, column: str,
                size: int | tuple[int, int] | None = None) -> bytes | None:
    return None if value is None else hex_col(value, column, size)


def int_col(value: object, column: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DamagedRow(f"{column} is {_kind(value)}, not an integer")
    return value


def opt_int_col(value: object, column: str) -> int | None:
    return None if value is None else int_col(value, column)


def num_col(value: object, column: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DamagedRow(f"{column} is {_kind(value)}, not a number")
    return float(value)


def text_col(value: object, column: str) -> str:
    if not isinstance(value, str):
        raise DamagedRow(f"{column} is {_kind(value)}, not text")
    return value


@contextmanager
def decoding(where: str | Path) -> Iterator[None]:
    """Rows of the record store ``where`` (a file, or a PostgreSQL URL without its
    password) being decoded: one that does not decode is a DamagedStore naming it."""
    try:
        yield
    except DamagedRow as e:
        raise DamagedStore(f"damaged store {where}: a record's {e}") from None
    except (ValueError, TypeError, KeyError, IndexError):
        raise DamagedStore(f"damaged store {where}: a record does not decode") from None


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """Reads of the record database at ``path``: damage becomes a DamagedStore naming
    it, any other database error a StoreError naming it."""
    try:
        with decoding(path):
            yield
    except sqlite3.Error as e:
        if getattr(e, "sqlite_errorcode", 0) & 0xFF in _DAMAGED:
            raise DamagedStore(f"damaged store {path}: {e}") from None
        raise StoreError(f"store {path}: {e}") from None  # locked, full, I/O, constraint


def check_file(path: Path) -> None:
    """A SQLite file of whole pages, or no file or an empty one (to be created)."""
    try:
        with path.open("rb") as f:
            head = f.read(100)
            f.seek(0, 2)
            size = f.tell()
    except FileNotFoundError:
        return
    except OSError as e:
        raise StoreError(f"store {path}: {e.strerror or e}") from None
    if not head:
        return
    if len(head) < 100 or head[:16] != SQLITE_MAGIC:
        raise DamagedStore(f"damaged store {path}: not a SQLite database")
    page = int.from_bytes(head[16:18], "big")
    page = 65536 if page == 1 else page
    if page < 512 or page & (page - 1) or size % page:
        raise DamagedStore(f"damaged store {path}: cut short or padded ({size} bytes, not "
                           f"whole {page}-byte pages)")


def open_records(path: Path, schema: str) -> sqlite3.Connection:
    """:func:`~keyload.records.sql.open_sqlite` for a record database, after :func:`check_file`."""
    check_file(path)
    with reading(path):
        return open_sqlite(path, schema)
