r"""Numeric-literal normalisation for the rewrite cache.

``SELECT abalance FROM pgbench_accounts WHERE aid = 4711`` and ``... aid = 815`` get the same
cache entry: the template's segments mark where each numeric literal goes, and a hit only
substitutes the new literals (and the tenant).  This is sound because nothing the engine
decides depends on a numeric literal's value; templates where one could (a literal as the
tenant column value) are never normalised, and string literals are never normalised (the
function allowlist looks at some of them, e.g. ``set_config('name', ...)``).

Every pattern is ASCII (``re.ASCII``): PostgreSQL's scanner knows only the digits 0-9 and reads
every non-ASCII character as part of an identifier, while Python's ``\d`` and ``\w`` also match
other scripts' digits and letters (``٣``, ``５``), which would make a cache hit put an identifier
where the template has a number.

To stay lexically exact the fast scanner gives up (returns None) on anything it does not
model: block comments, dollar quotes, backslashes (E'' strings), U& escapes, NUL.  A normalised
template is only made on a cache miss where PostgreSQL's scanner confirmed that every
normalised span is exactly one numeric constant (pipeline.build, lexer.single_numbers); a hit
differs from that text only inside spans that fully match :data:`_NUMBER`, which PostgreSQL 15
reads as one numeric constant there, so cache hits need no scan (docs/security.md, "Two
opinions").
"""

from __future__ import annotations

import re

from proxy.policy.edits import TENANT

# what the scanner does not model: block comments, backslashes (E'' strings), dollar quotes,
# U& escapes, E'' strings; cheap substring tests first, a regex only when the character is there
_DOLLAR_QUOTE = re.compile(r"\$[^0-9]")
_U_ESCAPE = re.compile(r"[Uu]&")
_E_STRING = re.compile(r"(?<![\w$\x80-\U0010ffff])[Ee]'", re.ASCII)


def _unmodelled(sql: str) -> bool:
    return ("/*" in sql or "\\" in sql
            or ("$" in sql and _DOLLAR_QUOTE.search(sql) is not None)
            or ("&" in sql and _U_ESCAPE.search(sql) is not None)
            or ("'" in sql and _E_STRING.search(sql) is not None))
# Comments and quoted strings/identifiers are matched (and skipped) whole; group 1 is a token of
# identifier characters that starts with a digit or a dot (a numeric literal if _NUMBER matches it
# fully).  Tokens starting with a letter are never matched: the look-behind only lets a token start
# where the previous character cannot continue one.
_TOKENS = re.compile(r"""--[^\n\r]*|'[^']*(?:''[^']*)*'|"[^"]*(?:""[^"]*)*"|(?<![\w$.\x80-\U0010ffff])([\d.][\w$.\x80-\U0010ffff]*)""",
                     re.ASCII)
# digits first: a leading-dot form (.5) is one constant to PostgreSQL but not to sqlglot, so a
# cache hit never forwards a form that a cold rewrite would refuse
_NUMBER = re.compile(r"\d+(?:\.\d*)?(?:[eE]\d+)?", re.ASCII)
QUERY_KEYWORDS = frozenset({"SELECT", "WITH", "INSERT", "UPDATE", "DELETE", "VALUES", "TABLE", "MERGE"})


class Literal:
    """Marker for the k-th numeric literal in a normalised template."""

    __slots__ = ("k",)

    def __init__(self, k: int):
        self.k = k

    def __repr__(self) -> str:
        return f"LIT{self.k}"


def number_literals(sql: str) -> tuple[str, list[tuple[int, int]]] | None:
    """(key text with each numeric literal replaced by NUL, literal spans), or None."""
    if _unmodelled(sql) or "\x00" in sql:
        return None
    fullmatch = _NUMBER.fullmatch
    spans = [m.span(1) for m in _TOKENS.finditer(sql) if m.lastindex and fullmatch(m.group(1))]
    if not spans:
        return None
    out = []
    pos = 0
    for s, e in spans:
        out.append(sql[pos:s])
        out.append("\x00")
        pos = e
    out.append(sql[pos:])
    return "".join(out), spans


# The fast form of number_literals for the hot path (a cache lookup): in a statement without
# quotes, comments or anything _unmodelled looks for, _TOKENS can only match group-1 tokens, and
# a group-1 token that fully matches _NUMBER is exactly a match of this pattern (digits first, no
# identifier character or dot on either side).  One C-level split gives key and literals.
# The pattern starts with the digit and looks behind it afterwards (``(?<!X\d)`` after one digit
# is ``(?<!X)`` before it): a pattern that begins with a character class lets the regex engine
# skip ahead to the next digit instead of trying every position (half the time of a leading
# lookbehind).
_BARE_NUMBER = re.compile(r"(\d(?<![\w$.\x80-\U0010ffff]\d)\d*(?:\.\d*)?(?:[eE]\d+)?)(?![\w$.\x80-\U0010ffff])",
                          re.ASCII)
_NOT_BARE = ("'", '"', "--", "/*", "\\", "$", "&", "\x00")


def literals_key(sql: str) -> tuple[str, list[str]] | None:
    """(the key text of :func:`number_literals`, the literals' texts), or None when it returns None.
    One regex pass for statements without quotes or comments (the common case)."""
    for c in _NOT_BARE:
        if c in sql:
            norm = number_literals(sql)
            return None if norm is None else (norm[0], [sql[s:e] for s, e in norm[1]])
    parts = _BARE_NUMBER.split(sql)
    if len(parts) == 1:
        return None
    return "\x00".join(parts[0::2]), parts[1::2]


def render_plan(parts: tuple, tenant_literal: str) -> tuple[list[str], tuple[tuple[int, int], ...]]:
    """A normalised template with the tenant filled in: (segments, (index, literal number) slots);
    a hit copies the segments, puts each literal in its slot and joins (see :func:`render`)."""
    base: list[str] = []
    slots: list[tuple[int, int]] = []
    for p in parts:
        if isinstance(p, str):
            base.append(p)
        elif p is TENANT:
            base.append(tenant_literal)
        else:
            slots.append((len(base), p.k))
            base.append("")
    return base, tuple(slots)


def literal_parts(sql: str, edits, spans: list[tuple[int, int]]) -> tuple | None:
    """The spliced statement as strings, TENANT and :class:`Literal` markers; None if an edit
    touches a literal."""
    out: list = []
    pos = 0
    si = 0

    def copy(upto: int) -> bool:
        nonlocal pos, si
        while si < len(spans) and spans[si][0] < upto:
            s, e = spans[si]
            if s < pos or e > upto:
                return False
            out.append(sql[pos:s])
            out.append(Literal(si))
            pos = e
            si += 1
        out.append(sql[pos:upto])
        pos = upto
        return True

    for ed in sorted(edits, key=lambda e: (e.start, e.end)):
        if not copy(ed.start):
            return None
        out.extend(ed.parts)
        if si < len(spans) and spans[si][0] < ed.end:
            return None
        pos = ed.end
    if not copy(len(sql)):
        return None
    if si != len(spans):
        return None
    merged: list = []
    for p in out:
        if isinstance(p, str) and merged and isinstance(merged[-1], str):
            merged[-1] += p
        elif p != "":
            merged.append(p)
    return tuple(merged)


def render(parts: tuple, tenant_literal: str, literals: list[str]) -> str:
    return "".join(
        p if isinstance(p, str) else tenant_literal if p is TENANT else literals[p.k] for p in parts
    )
