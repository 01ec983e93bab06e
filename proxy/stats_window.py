"""SHOW STATS averages over the last 60 seconds, as PgBouncer's ``stats_period``.

The pool janitor (:mod:`proxy.pool`) records each pool's running totals once a
second with :meth:`StatsWindow.record`; :meth:`StatsWindow.since` gives, for a
database, the totals as they were about ``span_s`` ago and when, so the console
divides what happened in between by the time it took.  Sans-IO: the caller
passes the clock.
"""

from __future__ import annotations

from collections import deque

#: PgBouncer's default stats_period
SPAN_S = 60.0


class StatsWindow:
    def __init__(self, span_s: float = SPAN_S):
        self.span_s = span_s
        self._samples: deque[tuple[float, dict[str, dict[str, int]]]] = deque()

    def record(self, now: float, totals: dict[str, dict[str, int]]) -> None:
        """Remember ``{database: {counter: total}}`` as of ``now`` (seconds, monotonic)."""
        self._samples.append((now, totals))
        # keep the newest sample that is at least span_s old: it is where the window starts
        while len(self._samples) > 1 and self._samples[1][0] <= now - self.span_s:
            self._samples.popleft()

    def since(self, now: float, database: str) -> tuple[float, dict[str, int]] | None:
        """(seconds covered, totals at the window's start) for ``database``, or None before the
        first sample.  A database first seen inside the window starts from zero."""
        if not self._samples:
            return None
        t0, totals = self._samples[0]
        return max(now - t0, 0.0), dict(totals.get(database, {}))
