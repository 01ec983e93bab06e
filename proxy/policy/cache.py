"""Bounded LRU cache of tenant-independent rewrite templates.

Keys: ``(statement text, origin, catalog version)`` -> ``(template, numeric literals or None)``,
and for templates whose numeric literals can vary (see :mod:`proxy.policy.normalize`)
``("#", text with literals blanked, origin, version)`` -> template.  Rules are fixed per engine,
and a catalog refresh that changes anything bumps the version.  A
:class:`~proxy.policy.pipeline.Template`'s SQL is a tuple of text segments joined with the
quoted tenant literal, so a hit costs a dict lookup and a ``str.join``.
Hits and misses are counted here and in Prometheus (tenantgate_rewrite_cache_*_total).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable

from proxy.metrics import REWRITE_CACHE_ENTRIES, REWRITE_CACHE_HITS_TOTAL, REWRITE_CACHE_MISSES_TOTAL


# Hits are published to Prometheus in batches: a hit costs about a microsecond, and each
# Counter.inc takes a lock.  Misses (a cold rewrite, ~200 us) are published at once.
HIT_PUBLISH_EVERY = 64


class RewriteCache:
    def __init__(self, maxsize: int = 20000):
        self.maxsize = maxsize
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        # the same mapping, read directly by the hot path (Pipeline.template: get, move_to_end)
        self.entries = self._data
        self.misses = 0
        self._published_hits = 0
        self.unpublished_hits = 0  # the hot path adds 1 per hit and calls publish() at HIT_PUBLISH_EVERY

    @property
    def hits(self) -> int:
        return self._published_hits + self.unpublished_hits

    def lookup(self, key: Hashable) -> Any | None:
        """The cached value (marked as recently used), or None; the caller counts once per statement."""
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def count(self, hit: bool) -> None:
        if hit:
            self.unpublished_hits += 1
            if self.unpublished_hits >= HIT_PUBLISH_EVERY:
                self.publish()
        else:
            self.misses += 1
            REWRITE_CACHE_MISSES_TOTAL.inc()

    def publish(self) -> None:
        """Add the hits counted since the last publication to the Prometheus counter."""
        n = self.unpublished_hits
        if n:
            REWRITE_CACHE_HITS_TOTAL.inc(n)
            self._published_hits += n
            self.unpublished_hits = 0

    def put(self, key: Hashable, value: Any) -> None:
        if self.maxsize <= 0:
            return
        before = len(self._data)
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)
        if len(self._data) != before:  # tenantgate_rewrite_cache_entries (puts are cache misses: not hot)
            REWRITE_CACHE_ENTRIES.inc(len(self._data) - before)

    def clear(self) -> None:
        REWRITE_CACHE_ENTRIES.dec(len(self._data))
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
