"""Human durations: ``90s``, ``30m``, ``1h``, ``2h30m``, ``1d`` (and plain seconds)."""

from __future__ import annotations

import re
from datetime import timedelta

_PART = re.compile(r"(\d+)([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """Parse a duration; raises ValueError with a helpful message."""
    t = str(text).strip().lower().replace(" ", "")
    if t.isdigit():
        seconds = int(t)
    else:
        pos, seconds = 0, 0
        for m in _PART.finditer(t):
            if m.start() != pos:
                break
            seconds += int(m.group(1)) * _UNIT[m.group(2)]
            pos = m.end()
        if pos != len(t) or not t:
            raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 30m, 1h, 2h30m, 1d")
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be positive")
    return timedelta(seconds=seconds)


def format_duration(td: timedelta | float) -> str:
    s = int(td.total_seconds() if isinstance(td, timedelta) else td)
    if s <= 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            parts.append(f"{s // size}{unit}")
            s %= size
    return "".join(parts)
