"""Group commit, and an event loop that never waits for a database.

A request's writes (rate counters, the replay-cache claim, the authority's export record,
the challenge's state, its audit record) are small; committing each on its own costs far
more than writing it. So a request hands its work — everything from the rate check to
its audit record, as one function — to :meth:`GroupCommit.run` and awaits the answer.
The jobs handed over in one pass of the event loop run in one batch — ``BEGIN
IMMEDIATE`` on every database, always in the same order, so that processes sharing the
files cannot deadlock — then the batch commits and every answer is released. Nothing
is answered before its records are committed, exactly as with one transaction per
write: a crash loses only requests that were never answered.

Where the batch runs depends on what a wait would be:

- **SQLite** (the default): on the event loop, where its statements cost microseconds
  and a batch costs no thread switch — but it never *waits* there. The databases' busy
  timeout is 0 and the turn-taking lock is tried without blocking: when another writer
  holds a lock, the batch is tried again a few milliseconds later, by a timer, while
  the loop goes on serving (TLS handshakes, health, other refusals); after
  ``busy_timeout`` its requests are answered 503 (:class:`Busy`) and ``/v1/health``
  says ``busy``. The disk's slow part, the WAL checkpoint with its fsyncs, runs on a
  thread of its own (:class:`Checkpointer`), never in a commit on the loop.
- **PostgreSQL** (``thread=True``): every statement is a network round trip, so batches
  run on a database thread; the loop awaits its answers, and a lock held elsewhere
  fails a statement after ``lock_timeout``.

Processes sharing the files (``keyload serve --processes N``, or instances started on one
home) take turns through an exclusive ``flock`` on a lock file, held from the batch's
begin to its commit.

When a commit fails, every database of the batch not yet committed is rolled back and
every request in it is answered 503 (no key leaves without its records). Commits go in
a fixed order, the authority's export records first: if a later one fails, an export is
recorded that was never delivered, never the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from ..core.errors import StoreError

log = logging.getLogger("keyload.service")

T = TypeVar("T")


class Busy(StoreError):
    """A database (or the turn-taking lock) stayed locked for the whole busy timeout."""


class Batched(Protocol):
    """A database that can group-commit (:class:`~keyload.records.sql.SqliteBatch`)."""

    def begin_batch(self) -> None: ...

    def commit_batch(self) -> None: ...

    def rollback_batch(self) -> None: ...


@dataclass(eq=False)
class _Job(Generic[T]):
    fn: Callable[[], T]
    loop: asyncio.AbstractEventLoop
    fut: asyncio.Future[T]
    deadline: float = 0.0  # monotonic: when waiting for a lock turns into 503
    cancelled: bool = False
    ok: bool = False
    value: Any = None
    error: BaseException | None = None


def _is_busy(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, Busy) or "locked" in text or "busy" in text or "lock timeout" in text \
        or e.__class__.__name__ == "LockNotAvailable"


class GroupCommit:
    """Batches over ``parts`` (begun and committed in this order), on the event loop or
    (``thread=True``) on a database thread. ``busy_timeout``: how long a lock held
    elsewhere is waited for, without blocking the loop, before the batch's requests are
    answered 503."""

    def __init__(self, parts: Sequence[Batched], *, lock_path: Path | None = None,
                 busy_timeout: float = 2.0, thread: bool = False) -> None:
        self.parts = tuple(parts)
        self.busy_timeout = busy_timeout
        self.thread = thread
        self._lock_fd = None if lock_path is None else \
            os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._pending: dict[asyncio.AbstractEventLoop, list[_Job[Any]]] = {}
        self._waiting: list[_Job[Any]] = []  # inline: jobs waiting for a lock
        self._retry: asyncio.TimerHandle | None = None
        self._delay = 0.0
        self._cv = threading.Condition()
        self._queue: list[_Job[Any]] = []  # thread: jobs handed over
        self._thread: threading.Thread | None = None
        self._closed = False
        self._in_batch = False
        self.batches = 0
        self.requests = 0
        self.busy = 0  # batches refused because a lock stayed held
        self.failed = 0  # batches that could not begin or commit (busy included)

    @property
    def open(self) -> bool:
        """A batch is being run."""
        return self._in_batch

    # -- handing work over ------------------------------------------------------------
    async def run(self, fn: Callable[[], T], *, timeout: float | None = None) -> T:
        """Run ``fn`` inside a batch; its value once the batch is committed. Raises what
        ``fn`` raised, :class:`StoreError` when the batch could not begin or commit
        (:class:`Busy` for a lock held past the busy timeout). On the database thread,
        ``timeout`` bounds the wait too (:class:`Busy`; a job not yet started is then
        dropped, one started runs on and its records are committed with its batch)."""
        loop = asyncio.get_running_loop()
        job: _Job[T] = _Job(fn, loop, loop.create_future(),
                            time.monotonic() + self.busy_timeout)
        pending = self._pending.get(loop)
        if pending is None:
            pending = self._pending[loop] = []
            loop.call_soon(self._hand_over, loop)
        pending.append(job)
        self.requests += 1
        if not self.thread or timeout is None:
            return await job.fut
        try:
            return await asyncio.wait_for(asyncio.shield(job.fut), timeout)
        except TimeoutError:
            job.cancelled = True
            raise Busy("the service's state did not answer in time") from None

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs = self._pending.pop(loop, None)
        if not jobs:
            return
        if not self.thread:
            self._waiting.extend(jobs)
            if self._retry is None:  # else the timer's try takes them too
                self._try_inline(loop)
            return
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, daemon=True,
                                                name="keyload-db")
                self._thread.start()
            self._queue.extend(jobs)
            self._cv.notify()

    # -- on the loop (SQLite) ----------------------------------------------------------
    def _try_inline(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin without waiting; on a held lock, try again by a timer (the loop serves
        on meanwhile) until the oldest job's deadline, then answer 503."""
        self._retry = None
        jobs, self._waiting = self._waiting, []
        if not jobs:
            return
        try:
            self._begin()
        except StoreError as e:
            if isinstance(e, Busy):
                now = time.monotonic()
                late = [j for j in jobs if j.deadline <= now]
                jobs = [j for j in jobs if j.deadline > now]
                if late:
                    self._failed(e)
                    _settle(late, e)
                if jobs:
                    self._waiting = jobs + self._waiting
                    self._delay = min(max(self._delay * 2, 0.002), 0.05)
                    self._retry = loop.call_later(self._delay, self._try_inline, loop)
                return
            self._failed(e)
            _settle(jobs, e)
            return
        self._delay = 0.0
        _settle(jobs, self._run_batch(jobs))

    # -- on the database thread (PostgreSQL) ----------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue and self._closed:
                    return
                jobs, self._queue = self._queue, []
            jobs = [j for j in jobs if not j.cancelled]
            if not jobs:
                continue
            error: StoreError | None
            try:
                self._begin(wait=True)
                error = self._run_batch(jobs)
            except StoreError as e:
                self._failed(e)
                error = e
            by_loop: dict[asyncio.AbstractEventLoop, list[_Job[Any]]] = {}
            for job in jobs:
                by_loop.setdefault(job.loop, []).append(job)
            for loop, js in by_loop.items():
                with contextlib.suppress(RuntimeError):  # that loop has closed
                    loop.call_soon_threadsafe(_settle, js, error)

    # -- a batch -----------------------------------------------------------------------
    def _run_batch(self, jobs: list[_Job[Any]]) -> StoreError | None:
        """Run the jobs in the begun batch and commit it; the commit's error, if any."""
        self.batches += 1
        for job in jobs:
            try:
                job.value, job.ok = job.fn(), True
            except BaseException as e:  # handed back to the request that raised it
                job.error = e
        error = self._commit()
        self._end_turn()
        self._in_batch = False
        if error is not None:
            self._failed(error)
        return error

    def _failed(self, error: StoreError) -> None:
        self.failed += 1
        self.busy += isinstance(error, Busy)

    def _begin(self, *, wait: bool = False) -> None:
        self._take_turn(wait)
        begun: list[Batched] = []
        try:
            for p in self.parts:
                p.begin_batch()
                begun.append(p)
        except Exception as e:
            for p in reversed(begun):
                _quietly_rollback(p)
            self._end_turn()
            busy = _is_busy(e)
            if not busy:
                log.error("cannot begin a batch: %s", e.__class__.__name__)
            raise (Busy if busy else StoreError)(
                f"cannot begin a batch ({e.__class__.__name__})") from None
        self._in_batch = True

    def _commit(self) -> StoreError | None:
        done = 0
        try:
            for p in self.parts:
                p.commit_batch()
                done += 1
        except Exception as e:
            log.error("group commit failed: %s", e.__class__.__name__)
            for p in self.parts[done:]:
                _quietly_rollback(p)
            return (Busy if _is_busy(e) else StoreError)("the batch could not be committed")
        return None

    def _take_turn(self, wait: bool) -> None:
        if self._lock_fd is None:
            return
        deadline = time.monotonic() + (self.busy_timeout if wait else 0.0)
        delay = 0.0005
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise Busy("another process holds the service's lock") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.01)

    def _end_turn(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Finish the jobs handed to the thread, then stop it; jobs still waiting for a
        lock on the loop are answered 503."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        waiting, self._waiting = self._waiting, []
        _settle(waiting, Busy("the service is stopping"))
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(30)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _settle(jobs: list[_Job[Any]], error: StoreError | None) -> None:
    """Each job's answer: its value, the error its own work raised, or the batch's error,
    copied for each request (one exception object raised in several requests would
    collect every one's frames in its traceback, and a context set in one would show in
    the others)."""
    for job in jobs:
        if job.fut.done():
            continue
        if job.cancelled:  # its request was answered 503 already: nobody waits
            job.fut.cancel()
        elif error is not None:
            job.fut.set_exception(copy.copy(error))
        elif job.ok:
            job.fut.set_result(job.value)
        else:
            assert job.error is not None
            job.fut.set_exception(job.error)


def _quietly_rollback(p: Batched) -> None:
    try:
        p.rollback_batch()
    except Exception as e:  # the connection is unusable; its next statement will say so
        log.error("rollback failed: %s", e.__class__.__name__)


class Checkpointer:
    """The WAL checkpoints of SQLite databases, on a thread of their own: their fsyncs
    never stall a commit on the event loop (the databases' own connections have
    ``wal_autocheckpoint`` off). A PASSIVE checkpoint every ``interval`` seconds: it
    waits for no lock and no writer waits for it."""

    def __init__(self, paths: Sequence[Path], *, interval: float = 1.0) -> None:
        self.paths = tuple(paths)
        self.interval = interval
        self.checkpoints = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="keyload-checkpoint")
        self._thread.start()

    def _run(self) -> None:
        conns = []
        try:
            for p in self.paths:
                c = sqlite3.connect(p, isolation_level=None, check_same_thread=False)
                c.execute("PRAGMA busy_timeout = 0")
                conns.append(c)
            while not self._stop.wait(self.interval):
                for c in conns:
                    with contextlib.suppress(sqlite3.Error):  # busy: the next round
                        c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                        self.checkpoints += 1
        except sqlite3.Error as e:
            log.error("checkpoints stopped: %s", e.__class__.__name__)
        finally:
            for c in conns:
                with contextlib.suppress(sqlite3.Error):
                    c.execute("PRAGMA wal_checkpoint(PASSIVE)")
                c.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)


__all__ = ["Batched", "Busy", "Checkpointer", "GroupCommit"]
