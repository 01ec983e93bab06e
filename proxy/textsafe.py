"""Escaping text for terminals and line-based readers: the one helper every CLI output goes through.

Anything a person or a client chose (a grant's reason, a tenant or operator
name, SQL text, an error message that quotes them) can carry control
characters.  Printed raw, ANSI escape sequences repaint an approver's screen
(a globex/write/8h request shown as acme/read/30m), a carriage return
overwrites a line, a newline forges a table row, bidirectional overrides
reorder what is shown, and U+2028/U+2029/U+0085 split one JSON record into
several lines for line-based readers.

* :func:`safe_text` escapes all of these, newlines and tabs included: for
  one value (a table cell, a ``key: value`` field).
* :func:`safe_lines` keeps ``\\n`` and ``\\t`` (output a command formats
  itself) and escapes the rest.
* :func:`json_line_safe` makes one JSON text safe as one line: the characters
  above become ``\\uXXXX`` escapes, which is the same JSON value.
* :func:`install` wraps ``sys.stdout`` and ``sys.stderr`` of the CLI in
  :class:`SafeStream`, so nothing reaches the terminal unescaped even where a
  command prints a value directly.

Escapes are ``\\uXXXX`` (``\\u001b`` for ESC), valid inside JSON strings too.
Backslashes are left alone: a value that merely looks like an escape is
harmless, and doubling them would garble SQL text.
"""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

# C0 controls, DEL, C1 controls (0x9b is a one-byte CSI), bidi embeddings/overrides/isolates and marks,
# line/paragraph separators, NEL, BOM/zero-width no-break space.
_BIDI = "\u200e\u200f\u061c\u202a-\u202e\u2066-\u2069"
_ALL = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}\u2028\u2029\ufeff]")
_LINES = re.compile(f"[\x00-\x08\x0b-\x1f\x7f-\x9f{_BIDI}\u2028\u2029\ufeff]")  # keeps \t and \n
_JSON_LINE = re.compile(f"[\x00-\x1f\x7f-\x9f{_BIDI}\u2028\u2029\ufeff]")


def _esc(m: re.Match) -> str:
    return f"\\u{ord(m.group()):04x}"


def safe_text(value: Any) -> str:
    """One value, shown on one line: every control and line-breaking character escaped."""
    s = value if isinstance(value, str) else ("" if value is None else str(value))
    return _ALL.sub(_esc, s)


def safe_lines(text: str) -> str:
    """Text a command laid out itself: keeps newlines and tabs, escapes every other control."""
    return _LINES.sub(_esc, text)


def json_line_safe(line: str) -> str:
    """One JSON text (as from ``json.dumps(..., ensure_ascii=False)``) safe to print as one line.

    Such characters can only occur inside JSON strings, where ``\\uXXXX`` means the same."""
    return _JSON_LINE.sub(_esc, line)


class SafeStream:
    """A text stream that escapes what it writes with :func:`safe_lines` (see :func:`install`)."""

    def __init__(self, inner: TextIO):
        self.unfiltered = inner

    def write(self, s: str) -> int:
        self.unfiltered.write(safe_lines(s))
        return len(s)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):  # flush, fileno, isatty, encoding, buffer, ...
        return getattr(self.unfiltered, name)


def install() -> None:
    """Route the process's standard output and error through :class:`SafeStream` (idempotent)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, SafeStream):
            setattr(sys, name, SafeStream(stream))


def unfiltered(stream: TextIO) -> TextIO:
    """The stream below a SafeStream (for output that is escaped field by field, e.g. a progress line)."""
    return getattr(stream, "unfiltered", stream) if isinstance(stream, SafeStream) else stream
