"""A tiny progress line for long exports and imports: rows and bytes per table.

It draws only when the stream is a terminal (scripts and logs stay quiet) and
redraws at most a few times a second.  No dependency beyond the standard library.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _human_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


class Progress:
    """``start(table)``, ``update(rows, nbytes)`` (totals so far; ``rows`` is not shown), ``done(rows, nbytes)``."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None, interval_s: float = 0.2):
        from proxy.textsafe import unfiltered

        self.stream = unfiltered(stream if stream is not None else sys.stderr)  # "\r" redraws; names escaped below
        self.enabled = bool(self.stream.isatty()) if enabled is None else enabled
        self.interval_s = interval_s
        self._table = ""
        self._last = 0.0
        self._t0 = 0.0

    def start(self, table: str) -> None:
        from proxy.textsafe import safe_text

        self._table = safe_text(table)
        self._t0 = time.monotonic()
        self._last = 0.0
        self._draw(0, 0, final=False)

    def update(self, rows: int, nbytes: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._draw(rows, nbytes, final=False)

    def done(self, rows: int, nbytes: int) -> None:
        self._draw(rows, nbytes, final=True)

    def _draw(self, rows: int, nbytes: int, *, final: bool) -> None:
        """While a table streams only bytes are shown: a row count guessed from the stream (line
        breaks, a CSV header, newlines inside values) could exceed the exact count COPY reports
        at the end, and the line would then show the rows going down.  The final line has the
        exact count; the interim line is padded to the same width so nothing is left over."""
        if not self.enabled:
            return
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        if final:
            line = f"{self._table:<40} {rows:>12,} rows {_human_bytes(nbytes):>10}  {rows / elapsed:>10,.0f} rows/s"
        else:
            line = f"{self._table:<40} {'':>12} ...  {_human_bytes(nbytes):>10}  {nbytes / elapsed / 1024:>8,.0f} kB/s"
        self.stream.write("\r" + line + ("\n" if final else ""))
        self.stream.flush()
