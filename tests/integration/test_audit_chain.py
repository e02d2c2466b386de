"""One audit chain over SQLite and PostgreSQL: on both, an edited, removed or reordered
record is found, and so is a cut tail (records removed from the end), through the head
each store keeps (a file beside the SQLite log, a row beside the PostgreSQL table)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from keyload.records.audit import CUT, AuditLog, AuditProblem
from keyload.service.store import PostgresServiceStore

# a private PostgreSQL server for the module, a fresh database per test
from .test_postgres_journal import pg_server, pg_url  # noqa: F401


class Chain:
    """An audit chain under test: append, verify, and raw SQL on its records."""

    def __init__(self, append: Callable[[str, dict[str, object]], int],
                 verify: Callable[[], tuple[int, list[AuditProblem]]],
                 sql: Callable[[str], object], drop_head: Callable[[], None]) -> None:
        self.append, self.verify, self.sql, self.drop_head = append, verify, sql, drop_head


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.hardware)])
def chain(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Chain]:
    if request.param == "sqlite":
        log = AuditLog(tmp_path / "audit.db")
        try:
            yield Chain(log.append, log.verify, log.db.execute, log.head_path.unlink)
        finally:
            log.close()
        return
    url: str = request.getfixturevalue("pg_url")
    store = PostgresServiceStore(url)
    try:
        yield Chain(store.append, store.verify_audit, store._x,
                    lambda: store._x("DELETE FROM audit_head"))
    finally:
        store.close()


def test_audit_chain_whole_verifies(chain: Chain) -> None:
    for i in range(5):
        assert chain.append("a", {"n": i}) == i + 1
    assert chain.verify() == (5, [])


def test_audit_chain_finds_an_edited_record(chain: Chain) -> None:
    for i in range(3):
        chain.append("a", {"n": i})
    chain.sql("UPDATE audit SET detail = '{\"n\":9}' WHERE seq = 2")
    n, problems = chain.verify()
    assert n == 3 and [(p.seq, p.problem) for p in problems] == [
        (2, "edited: its hash does not match")]


def test_audit_chain_finds_a_removed_record(chain: Chain) -> None:
    for i in range(4):
        chain.append("a", {"n": i})
    chain.sql("DELETE FROM audit WHERE seq = 2")
    n, problems = chain.verify()
    assert n == 3 and [p.seq for p in problems] == [3, 3]
    assert "records 2..2 are missing" in problems[0].problem


def test_audit_chain_finds_a_cut_tail(chain: Chain) -> None:
    """Records removed from the end leave a chain that links: only the head tells."""
    for i in range(5):
        chain.append("a", {"n": i})
    chain.sql("DELETE FROM audit WHERE seq >= 4")
    n, problems = chain.verify()
    assert n == 3 and [(p.seq, p.problem) for p in problems] == [(5, CUT)]


def test_audit_chain_finds_a_tail_cut_then_appended_over(chain: Chain) -> None:
    """Cut, then new records appended: the head's sequence number is there again, with
    another hash."""
    for i in range(5):
        chain.append("a", {"n": i})
    chain.sql("DELETE FROM audit WHERE seq >= 4")
    chain.append("forged", {"n": 3})
    n, problems = chain.verify()
    # the forged record is seq 4; the head still names 5 (SQLite: the file never moves
    # backwards; PostgreSQL: the row never does)
    assert n == 4 and [(p.seq, p.problem) for p in problems] == [(5, CUT)]


def test_audit_chain_without_its_head_is_a_problem(chain: Chain) -> None:
    for i in range(2):
        chain.append("a", {"n": i})
    chain.drop_head()
    n, problems = chain.verify()
    assert n == 2 and len(problems) == 1 and problems[0].seq == 0
    assert problems[0].problem in ("the head file is missing", "the head record is missing")


@pytest.mark.hardware
def test_postgres_head_made_over_an_older_chain_starts_at_its_last_record(
        request: pytest.FixtureRequest) -> None:
    """A state whose chain was written before it kept a head: opening it anchors the head
    at the last record there, and from then on a cut tail is found."""
    url: str = request.getfixturevalue("pg_url")
    store = PostgresServiceStore(url)
    try:
        for i in range(4):
            store.append("a", {"n": i})
        store._x("DROP TABLE audit_head")  # as written before the head existed
    finally:
        store.close()
    store = PostgresServiceStore(url)
    try:
        assert store.verify_audit() == (4, [])
        store._x("DELETE FROM audit WHERE seq = 4")
        assert [(p.seq, p.problem) for p in store.verify_audit()[1]] == [(4, CUT)]
    finally:
        store.close()


@pytest.mark.hardware
def test_postgres_batch_writes_the_head_of_its_records(request: pytest.FixtureRequest) -> None:
    url: str = request.getfixturevalue("pg_url")
    store = PostgresServiceStore(url)
    try:
        store.append("a", {"n": 0})
        store.begin_batch()
        store.append("b", {"n": 1})
        store.append("b", {"n": 2})
        store.commit_batch()
        assert store._x("SELECT seq FROM audit_head") == [(3,)]
        store.begin_batch()
        store.append("c", {"n": 3})
        store.rollback_batch()
        assert store._x("SELECT seq FROM audit_head") == [(3,)]
        assert store.verify_audit() == (3, [])
        store._x("DELETE FROM audit WHERE seq = 3")
        assert [p.seq for p in store.verify_audit()[1]] == [3]
    finally:
        store.close()
