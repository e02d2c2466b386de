"""The service's state with a damaged row (SQLite and PostgreSQL): reading the challenge,
the receipt or the ledger is one DamagedStore naming the state, never a stray ValueError
or a row taken as good."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keyload.core.errors import DamagedStore
from keyload.records.audit import AuditLog
from keyload.records.postgres import describe_url
from keyload.service.store import Challenge, PostgresServiceStore, ServiceStore, SqliteServiceStore

from .test_postgres_journal import pg_server, pg_url, raw_sql  # noqa: F401  (its server)

SN, R = bytes.fromhex("0a0b0c0d01"), bytes(range(16))
CH = Challenge(SN, R, "client-1", bytes(5), b"TMK", 1, 0x01)

Opened = tuple[ServiceStore, str, Callable[[str], None]]


@pytest.fixture
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opened]:
    """A state holding one exported, receipted download; its name; a raw SQL writer."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("pg_url")
        store: ServiceStore = PostgresServiceStore(url)
        where, execute = describe_url(url), raw_sql(url)
    else:
        path = tmp_path / "service.db"
        store = SqliteServiceStore(path, AuditLog(tmp_path / "audit.db"))
        where, execute = str(path), raw_sql(path)
    try:
        assert store.claim(CH, 1.0)
        store.exported(SN, R, bytes(12), bytes(5), 1)
        exported = store.challenge(SN, R)
        assert exported is not None and store.add_receipt(exported, bytes(16), 2.0)
        assert [e.sn for e in store.ledger()] == [SN]  # as written, it reads back
        yield store, where, execute
    finally:
        store.close()


def _read_damaged(state: Opened, damage: str, read: str) -> None:
    """Damage the state by ``damage``, then read it by ``read``: one DamagedStore naming it."""
    store, where, execute = state
    execute(damage)
    with pytest.raises(DamagedStore) as info:
        if read == "challenge":
            store.challenge(SN, R)
        elif read == "receipt":
            store.receipt_of(SN, R)
        else:
            store.ledger()
    assert "damaged" in str(info.value) and where in str(info.value), str(info.value)


@pytest.mark.parametrize("state", ["sqlite", pytest.param("postgres",
                                                            marks=pytest.mark.hardware)],
                         indirect=True)
@pytest.mark.parametrize(("damage", "read"), [
    ("UPDATE challenges SET set_id = 'not hex'", "challenge"),
    ("UPDATE ledger SET rct = 'zz'", "receipt"),
    ("UPDATE ledger SET kcv = 'zz'", "ledger"),
], ids=["challenge-set-id", "receipt", "ledger-kcv"])
def test_a_damaged_row_is_a_damaged_store_naming_the_state(state: Opened, damage: str,
                                                           read: str) -> None:
    _read_damaged(state, damage, read)


@pytest.mark.parametrize("state", ["sqlite"], indirect=True)  # PostgreSQL's columns are typed
@pytest.mark.parametrize(("damage", "read"), [
    ("UPDATE challenges SET ref2 = 'two'", "challenge"),
    ("UPDATE ledger SET time = 'yesterday'", "ledger"),
], ids=["challenge-ref2", "ledger-time"])
def test_a_value_of_the_wrong_kind_in_sqlite_is_a_damaged_store(state: Opened, damage: str,
                                                                read: str) -> None:
    _read_damaged(state, damage, read)
