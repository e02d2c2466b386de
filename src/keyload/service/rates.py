"""The service's rate counters, all sliding logs of admitted requests: in this process's
memory (:class:`MemoryRates`), or in a table of the shared state (:class:`LogRates`, on
SQLite or PostgreSQL) that every process and instance serving from it counts in.

A sliding log admits a request when fewer than ``limit`` requests of its key were
admitted in ``(now - window, now]``, so no interval of the window's length ever admits
more than the limit (a fixed window lets twice the limit through across its boundary).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from .policy import Rate

RATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_log (
    key TEXT NOT NULL,
    t DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS rate_log_key_t ON rate_log (key, t);
"""

Rows = Callable[[str, tuple[Any, ...]], list[Any]]  # one statement (``?`` style): its rows
Send = Callable[[str, tuple[Any, ...]], None]  # one statement whose result is not needed


class MemoryRates:
    """Sliding-log limits in this process (one process owns the state: nothing to share).

    A key keeps the times of its last ``limit`` admitted requests; a request is admitted
    when the oldest of them has left the window, so no interval of ``window_s`` admits
    more than ``limit`` (fixed windows let twice the limit through across a boundary).
    Keys idle for longer than their window are dropped once a second."""

    def __init__(self) -> None:
        self._log: dict[str, tuple[deque[float], float]] = {}  # key -> (times, window)
        self._purge_at = 0.0

    def hit(self, key: str, rate: Rate, now: float) -> bool:
        if now >= self._purge_at:
            self._log = {k: v for k, v in self._log.items() if v[0] and v[0][-1] > now - v[1]}
            self._purge_at = now + 1.0
        entry = self._log.get(key)
        if entry is None:
            entry = self._log[key] = (deque(maxlen=rate.limit), rate.window_s)
        times = entry[0]
        if times.maxlen != rate.limit:  # the policy changed this limit: keep what fits
            times = deque(times, maxlen=rate.limit)
            self._log[key] = (times, rate.window_s)
        if len(times) == rate.limit and times[0] > now - rate.window_s:
            return False
        times.append(now)
        return True

    def retry_after(self, key: str, rate: Rate, now: float) -> float:
        entry = self._log.get(key)
        if entry is None or len(entry[0]) < rate.limit:
            return 0.0
        return max(0.0, entry[0][0] + rate.window_s - now)

    def __len__(self) -> int:
        return len(self._log)


class LogRates:
    """Sliding-log limits in the state's ``rate_log`` table (:data:`RATE_SCHEMA`: one row
    per admitted request), through the store's statements (``x`` for rows, ``w`` for a
    statement without), in the caller's transaction (a batch, or one of its own).

    ``one_statement`` (PostgreSQL): the count and the log in one statement, one round
    trip. Rows older than the longest window seen are deleted every 4,096 hits."""

    #: the count (``w``) and the log (``h``: one row when admitted) as the start of one
    #: statement; what follows selects from them (PostgreSQL's ``admit`` claims too)
    COUNT_AND_LOG = ("WITH w AS (SELECT COUNT(*) AS n FROM rate_log WHERE key = ? AND t > ?), "
                     "h AS (INSERT INTO rate_log (key, t) SELECT ?, ? WHERE (SELECT n FROM w) "
                     "< ? RETURNING 1)")
    _HIT = COUNT_AND_LOG + " SELECT (SELECT COUNT(*) FROM h)"  # noqa: S608 (constants)

    def __init__(self, x: Rows, w: Send, *, one_statement: bool = False) -> None:
        self._x, self._w = x, w
        self.one_statement = one_statement
        self._hits = 0
        self._horizon = 0.0  # the longest window seen: older rows are of no use

    @classmethod
    def args(cls, key: str, rate: Rate, now: float) -> tuple[Any, ...]:
        """The arguments of :data:`COUNT_AND_LOG`."""
        return key, now - rate.window_s, key, now, rate.limit

    def hit(self, key: str, rate: Rate, now: float) -> bool:
        if self.one_statement:
            rows = self._x(self._HIT, self.args(key, rate, now))
            self.tidy(rate, now)
            return int(rows[0][0]) == 1
        n = int(self._x("SELECT COUNT(*) FROM rate_log WHERE key = ? AND t > ?",
                        (key, now - rate.window_s))[0][0])
        if n >= rate.limit:
            return False
        self._w("INSERT INTO rate_log (key, t) VALUES (?, ?)", (key, now))
        self.tidy(rate, now)
        return True

    def retry_after(self, key: str, rate: Rate, now: float) -> float:
        rows = self._x("SELECT t FROM rate_log WHERE key = ? AND t > ? ORDER BY t DESC "
                       "LIMIT 1 OFFSET ?", (key, now - rate.window_s, rate.limit - 1))
        return max(0.0, float(rows[0][0]) + rate.window_s - now) if rows else 0.0

    def tidy(self, rate: Rate, now: float) -> None:
        """One more hit counted against ``rate``: now and then, drop the rows no window
        can see any more."""
        self._horizon = max(self._horizon, rate.window_s)
        self._hits += 1
        if self._hits % 4096 == 0:
            self._w("DELETE FROM rate_log WHERE t <= ?", (now - self._horizon,))


__all__ = ["RATE_SCHEMA", "LogRates", "MemoryRates"]
