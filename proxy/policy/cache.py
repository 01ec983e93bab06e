"""Bounded LRU cache of tenant-independent rewrite templates.

Key: ``(statement text, origin, catalog version)``, or for templates whose numeric literals
can vary (see :mod:`proxy.policy.normalize`) ``("#", text with literals blanked, origin, version)`` — rules are fixed per engine, and a
catalog refresh that changes anything bumps the version.  Value: a
:class:`~proxy.policy.pipeline.Template`, whose SQL is a tuple of text segments joined with
the quoted tenant literal, so a hit costs a dict lookup and a ``str.join``.
Hits and misses are counted here and in Prometheus (tenantgate_rewrite_cache_*_total).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable

from proxy.metrics import REWRITE_CACHE_HITS_TOTAL, REWRITE_CACHE_MISSES_TOTAL


class RewriteCache:
    def __init__(self, maxsize: int = 20000):
        self.maxsize = maxsize
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self._hit_counter = REWRITE_CACHE_HITS_TOTAL
        self._miss_counter = REWRITE_CACHE_MISSES_TOTAL

    def get(self, key: Hashable) -> Any | None:
        value = self._data.get(key)
        if value is None:
            self.misses += 1
            self._miss_counter.inc()
            return None
        self._data.move_to_end(key)
        self.hits += 1
        self._hit_counter.inc()
        return value

    def lookup(self, key: Hashable) -> Any | None:
        """Like get() without counting (the caller counts once per statement)."""
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def count(self, hit: bool) -> None:
        if hit:
            self.hits += 1
            self._hit_counter.inc()
        else:
            self.misses += 1
            self._miss_counter.inc()

    def put(self, key: Hashable, value: Any) -> None:
        if self.maxsize <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
