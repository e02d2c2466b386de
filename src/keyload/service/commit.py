"""Group commit: the requests handled in one pass of the event loop share one transaction.

A request's writes (rate counters, the replay-cache claim, the authority's export record,
the challenge's state, its audit record) are small; committing each on its own costs far
more than writing it. So the first request of a pass opens a batch — ``BEGIN IMMEDIATE``
on every database, always in the same order, so that processes sharing the files cannot
deadlock — and every request handled in that pass writes into it. The commit runs as
the next callback of the loop, before any new input is read; each request's answer
waits for it. Nothing is answered before its records are committed, exactly as with one
transaction per write: a crash loses only requests that were never answered.

Processes sharing the files (``keyload serve --workers N``, or instances started on one
home) take turns through an exclusive ``flock`` on a lock file, held from the batch's
begin to its commit: a waiting process is woken the moment the lock is free, instead of
polling SQLite's busy handler (which sleeps up to 100 ms between tries).

When a commit fails, every database of the batch is rolled back and every request in it
is answered 503 (no key leaves without its records). Commits go in a fixed order, the
authority's export records first: if a later one fails, an export is recorded that was
never delivered, never the other way round.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ..core.errors import StoreError

log = logging.getLogger("keyload.service")


class Batched(Protocol):
    """A database that can group-commit (:class:`~keyload.units.storage.SqliteBatch`)."""

    def begin_batch(self) -> None: ...

    def commit_batch(self) -> None: ...

    def rollback_batch(self) -> None: ...


class GroupCommit:
    """One open batch at a time over ``parts`` (begun and committed in this order)."""

    def __init__(self, parts: Sequence[Batched], *, lock_path: Path | None = None) -> None:
        self.parts = tuple(parts)
        self._waiting: list[asyncio.Future[None]] | None = None
        self._lock_fd = None if lock_path is None else \
            os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        self.batches = 0
        self.requests = 0

    @property
    def open(self) -> bool:
        return self._waiting is not None

    def join(self) -> asyncio.Future[None]:
        """Open a batch unless one is open; the future is done once it is committed
        (or fails with :class:`StoreError`). Call before the request's first write."""
        if self._waiting is None:
            begun: list[Batched] = []
            self._take_turn()
            try:
                for p in self.parts:
                    p.begin_batch()
                    begun.append(p)
            except Exception as e:
                for p in reversed(begun):
                    _quietly_rollback(p)
                self._end_turn()
                raise StoreError(f"cannot begin a batch ({e.__class__.__name__})") from None
            self._waiting = []
            asyncio.get_running_loop().call_soon(self._commit)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        self.requests += 1
        return fut

    def _commit(self) -> None:
        waiting, self._waiting = self._waiting or [], None
        self.batches += 1
        error: StoreError | None = None
        done = 0
        try:
            for p in self.parts:
                p.commit_batch()
                done += 1
        except Exception as e:
            log.error("group commit failed: %s", e.__class__.__name__)
            for p in self.parts[done:]:
                _quietly_rollback(p)
            error = StoreError("the batch could not be committed")
        self._end_turn()
        for f in waiting:
            if not f.done():
                if error is None:
                    f.set_result(None)
                else:
                    f.set_exception(error)

    def _take_turn(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)

    def _end_turn(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Roll back a batch still open (the loop stopped before its commit)."""
        if self._waiting is not None:
            for p in self.parts:
                _quietly_rollback(p)
            self._waiting = None
            self._end_turn()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _quietly_rollback(p: Batched) -> None:
    try:
        p.rollback_batch()
    except Exception as e:  # the connection is unusable; its next statement will say so
        log.error("rollback failed: %s", e.__class__.__name__)


__all__ = ["Batched", "GroupCommit"]
