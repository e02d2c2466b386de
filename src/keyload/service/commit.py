"""Group commit on a database thread: the event loop never waits for a database.

A request's writes (rate counters, the replay-cache claim, the authority's export record,
the challenge's state, its audit record) are small; committing each on its own costs far
more than writing it. So a request hands its work — everything from the rate check to
its audit record, as one function — to :meth:`GroupCommit.run` and awaits the answer.
The jobs handed over in one pass of the event loop reach the database thread together;
the thread runs every job waiting for it in one batch — ``BEGIN IMMEDIATE`` on every
database, always in the same order, so that processes sharing the files cannot
deadlock — then commits and hands the answers back to the loop. Nothing is answered
before its records are committed, exactly as with one transaction per write: a crash
loses only requests that were never answered.

The event loop keeps serving (TLS handshakes, parsing, health, refusals) while the
thread waits for a lock or a disk. A lock held elsewhere — another process, an
operator's ``sqlite3`` shell — fails the batch after the databases' busy timeout
(:class:`Busy`, a :class:`StoreError`): every request in it is answered 503 at once
instead of stalling the service, and ``/v1/health`` says ``busy``.

Processes sharing the files (``keyload serve --workers N``, or instances started on one
home) take turns through an exclusive ``flock`` on a lock file, held from the batch's
begin to its commit, and waited for no longer than the busy timeout.

When a commit fails, every database of the batch not yet committed is rolled back and
every request in it is answered 503 (no key leaves without its records). Commits go in
a fixed order, the authority's export records first: if a later one fails, an export is
recorded that was never delivered, never the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from ..core.errors import StoreError

log = logging.getLogger("keyload.service")

T = TypeVar("T")


class Busy(StoreError):
    """A database (or the turn-taking lock) stayed locked for the whole busy timeout."""


class Batched(Protocol):
    """A database that can group-commit (:class:`~keyload.units.storage.SqliteBatch`)."""

    def begin_batch(self) -> None: ...

    def commit_batch(self) -> None: ...

    def rollback_batch(self) -> None: ...


@dataclass(eq=False)
class _Job(Generic[T]):
    fn: Callable[[], T]
    loop: asyncio.AbstractEventLoop
    fut: asyncio.Future[T]
    cancelled: bool = False
    ok: bool = False
    value: Any = None
    error: BaseException | None = None


@dataclass
class _Handover:
    """Jobs of one loop pass, waiting for the thread."""

    jobs: list[_Job[Any]] = field(default_factory=list)


def _is_busy(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, Busy) or "locked" in text or "busy" in text or "lock timeout" in text \
        or e.__class__.__name__ == "LockNotAvailable"


class GroupCommit:
    """One database thread running batches over ``parts`` (begun and committed in this
    order). ``busy_timeout``: how long the turn-taking lock is waited for."""

    def __init__(self, parts: Sequence[Batched], *, lock_path: Path | None = None,
                 busy_timeout: float = 2.0) -> None:
        self.parts = tuple(parts)
        self.busy_timeout = busy_timeout
        self._lock_fd = None if lock_path is None else \
            os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._cv = threading.Condition()
        self._queue: list[_Job[Any]] = []
        self._pending: dict[asyncio.AbstractEventLoop, _Handover] = {}
        self._thread: threading.Thread | None = None
        self._closed = False
        self._in_batch = False
        self.batches = 0
        self.requests = 0
        self.busy = 0  # batches refused because a lock stayed held
        self.failed = 0  # batches that could not begin or commit (busy included)
        self.last_failure: tuple[float, str] | None = None  # (monotonic time, busy|error)

    @property
    def open(self) -> bool:
        """A batch is being run."""
        return self._in_batch

    # -- the loop's side -------------------------------------------------------------
    async def run(self, fn: Callable[[], T], *, timeout: float | None = None) -> T:
        """Run ``fn`` on the database thread inside a batch; its value once the batch is
        committed. Raises what ``fn`` raised, :class:`StoreError` when the batch could
        not begin or commit (:class:`Busy` for a lock), or :class:`Busy` when ``timeout``
        passes first (a job not yet started is then dropped; one started runs on, and
        its records are committed with its batch)."""
        loop = asyncio.get_running_loop()
        job: _Job[T] = _Job(fn, loop, loop.create_future())
        hand = self._pending.get(loop)
        if hand is None:
            hand = self._pending[loop] = _Handover()
            loop.call_soon(self._hand_over, loop)
        hand.jobs.append(job)
        self.requests += 1
        if timeout is None:
            return await job.fut
        try:
            return await asyncio.wait_for(asyncio.shield(job.fut), timeout)
        except TimeoutError:
            job.cancelled = True
            raise Busy("the service's state did not answer in time") from None

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        hand = self._pending.pop(loop, None)
        if hand is None or not hand.jobs:
            return
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, daemon=True,
                                                name="keyload-db")
                self._thread.start()
            self._queue.extend(hand.jobs)
            self._cv.notify()

    # -- the thread's side -----------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue and self._closed:
                    return
                jobs, self._queue = self._queue, []
            jobs = [j for j in jobs if not j.cancelled]
            if jobs:
                self._batch(jobs)

    def _batch(self, jobs: list[_Job[Any]]) -> None:
        self.batches += 1
        error: StoreError | None = None
        try:
            self._begin()
        except StoreError as e:
            error = e
        if error is None:
            for job in jobs:
                try:
                    job.value, job.ok = job.fn(), True
                except BaseException as e:  # handed back to the request that raised it
                    job.error = e
            error = self._commit()
        self._end_turn()
        self._in_batch = False
        if error is not None:
            self.failed += 1
            busy = isinstance(error, Busy)
            self.busy += busy
            self.last_failure = (time.monotonic(), "busy" if busy else "error")
        by_loop: dict[asyncio.AbstractEventLoop, list[_Job[Any]]] = {}
        for job in jobs:
            by_loop.setdefault(job.loop, []).append(job)
        for loop, js in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop has closed
                loop.call_soon_threadsafe(_settle, js, error)

    def _begin(self) -> None:
        self._take_turn()
        begun: list[Batched] = []
        try:
            for p in self.parts:
                p.begin_batch()
                begun.append(p)
        except Exception as e:
            for p in reversed(begun):
                _quietly_rollback(p)
            self._end_turn()
            log.error("cannot begin a batch: %s", e.__class__.__name__)
            cls = Busy if _is_busy(e) else StoreError
            raise cls(f"cannot begin a batch ({e.__class__.__name__})") from None
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
            cls = Busy if _is_busy(e) else StoreError
            return cls("the batch could not be committed")
        return None

    def _take_turn(self) -> None:
        if self._lock_fd is None:
            return
        deadline = time.monotonic() + self.busy_timeout
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

    def recently_failed(self, within: float = 10.0) -> str | None:
        """``busy`` or ``error`` when a batch failed in the last ``within`` seconds."""
        lf = self.last_failure
        if lf is not None and time.monotonic() - lf[0] < within:
            return lf[1]
        return None

    def close(self) -> None:
        """Finish the jobs handed over, then stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(30)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _settle(jobs: list[_Job[Any]], error: StoreError | None) -> None:
    for job in jobs:
        if job.fut.done():
            continue
        if job.cancelled:  # its request was answered 503 already: nobody waits
            job.fut.cancel()
            continue
        if error is not None:
            job.fut.set_exception(error)
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


__all__ = ["Batched", "Busy", "GroupCommit"]
