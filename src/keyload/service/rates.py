"""Rate limits kept in this process's memory: sliding logs of admitted requests."""

from __future__ import annotations

from collections import deque

from .policy import Rate


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


__all__ = ["MemoryRates"]
