"""Small statistics for the benchmarks: median with min and max, percentiles, ratios.

Every figure the benchmark prints is a :class:`Spread` over interleaved rounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if not n:
        raise ValueError("median of no values")
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def percentile(sorted_xs: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already sorted values, nearest rank."""
    if not sorted_xs:
        raise ValueError("percentile of no values")
    rank = max(1, min(len(sorted_xs), math.ceil(q * len(sorted_xs) - 1e-9)))
    return sorted_xs[rank - 1]


@dataclass(frozen=True)
class Spread:
    """One figure measured in several rounds."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: list[float]) -> "Spread | None":
        return cls(tuple(values)) if values else None

    @property
    def median(self) -> float:
        return median(list(self.values))

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def fmt(self, unit_format: str = "{:.0f}") -> str:
        """``median [min-max]``; just the value when there is one round."""
        med = unit_format.format(self.median)
        if len(self.values) == 1:
            return med
        return f"{med} [{unit_format.format(self.min)}-{unit_format.format(self.max)}]"


def ratio(a: Spread | None, b: Spread | None) -> str:
    """``a / b`` of the medians as ``0.93x``, or ``-`` when either is missing."""
    if a is None or b is None or b.median == 0:
        return "-"
    return f"{a.median / b.median:.2f}x"
