"""A minimal PostgreSQL lexer: exact statement boundaries and the first keyword.

sqlglot's tokenizer swallows the rest of some statements (EXPLAIN, SHOW, DO, ...) as one
string, so statement boundaries must not come from it.  This scanner follows PostgreSQL's
own lexer for everything that can hide a ``;``: '...' strings (standard_conforming_strings
on; the proxy refuses changing it), E'...' strings with backslash escapes, "..."
identifiers, $tag$...$tag$ dollar quotes, -- comments and nested /* */ comments.

Entry point: :func:`split_statements` -> list of (start, end) spans without the ``;``.
"""

from __future__ import annotations

import re

from proxy.policy.errors import SYNTAX_ERROR, PolicyRefusal

_DOLLAR_TAG = re.compile(r"\$([A-Za-z_\x80-\U0010ffff][A-Za-z_0-9\x80-\U0010ffff]*)?\$")
_IDENT_CHAR = re.compile(r"[A-Za-z_0-9$\x80-\U0010ffff]")
# PostgreSQL 15's whitespace (scan.l: space [ \t\n\r\f]); a -- comment ends at \n or \r.
PG_SPACE = " \t\n\r\f"
_COMMENT_END = re.compile(r"[\n\r]")


def _comment_end(sql: str, i: int, n: int) -> int:
    """Index just past the -- comment starting at ``i`` (PostgreSQL ends it at \\n or \\r)."""
    m = _COMMENT_END.search(sql, i, n)
    return n if m is None else m.end()


def _unterminated(what: str) -> PolicyRefusal:
    return PolicyRefusal(SYNTAX_ERROR, f"unterminated {what}")


def split_statements(sql: str) -> list[tuple[int, int]]:
    return _split(sql, None)


def _scan_quoted_u(sql: str) -> list[tuple[int, int]]:
    found: list[tuple[int, int]] = []
    _split(sql, found)
    return found


def _split(sql: str, ufound: list | None) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    n = len(sql)
    i = 0
    start = 0
    while i < n:
        c = sql[i]
        i_open = i
        if c in "'\"" and i >= 2 and sql[i - 1] == "&" and sql[i - 2] in "Uu" and (
            i < 3 or not _IDENT_CHAR.match(sql[i - 3])
        ):
            i = _skip_quoted(sql, i + 1, c)
            m = _UESCAPE.match(sql, i)
            if m:
                i = m.end()
            if ufound is not None:
                ufound.append((i_open - 2, i))
        elif c == "'":
            prev = sql[i - 1] if i > 0 else ""
            escaped = prev in ("E", "e") and (i < 2 or not _IDENT_CHAR.match(sql[i - 2]))
            i = _skip_string(sql, i + 1, escaped)
        elif c == '"':
            j = i + 1
            while True:
                k = sql.find('"', j)
                if k < 0:
                    raise _unterminated("quoted identifier")
                if k + 1 < n and sql[k + 1] == '"':
                    j = k + 2
                    continue
                i = k + 1
                break
        elif c == "-" and sql.startswith("--", i):
            i = _comment_end(sql, i, n)
        elif c == "/" and sql.startswith("/*", i):
            depth = 1
            j = i + 2
            while depth:
                a = sql.find("/*", j)
                b = sql.find("*/", j)
                if b < 0:
                    raise _unterminated("/* comment")
                if 0 <= a < b:
                    depth += 1
                    j = a + 2
                else:
                    depth -= 1
                    j = b + 2
            i = j
        elif c == "$" and (i == 0 or not _IDENT_CHAR.match(sql[i - 1])):
            m = _DOLLAR_TAG.match(sql, i)
            if m:
                tag = m.group(0)
                k = sql.find(tag, m.end())
                if k < 0:
                    raise _unterminated("dollar-quoted string")
                i = k + len(tag)
            else:
                i += 1
        elif c == ";":
            spans.append((start, i))
            i += 1
            start = i
        else:
            if c.isspace() and c not in PG_SPACE:
                # sqlglot would skip it as whitespace; PostgreSQL reads it as part of an
                # identifier (non-ASCII) or rejects it: the two would see different statements
                raise PolicyRefusal(
                    SYNTAX_ERROR,
                    f"character U+{ord(c):04X} is not whitespace to PostgreSQL; "
                    "use spaces, tabs or newlines between tokens",
                )
            i += 1
    spans.append((start, n))
    out = []
    for s, e in spans:
        s2, e2 = _trim(sql, s, e)
        if s2 < e2:
            out.append((s2, e2))
    return out


_UESCAPE = re.compile(r"\s*[Uu][Ee][Ss][Cc][Aa][Pp][Ee]\s*'([^']|'')'")


def _skip_quoted(sql: str, i: int, q: str) -> int:
    n = len(sql)
    while True:
        k = sql.find(q, i)
        if k < 0:
            raise _unterminated("quoted string or identifier")
        if k + 1 < n and sql[k + 1] == q:
            i = k + 2
            continue
        return k + 1


def decode_unicode_escapes(sql: str) -> str:
    """Rewrite U&"..." identifiers and U&'...' strings (with optional UESCAPE) to plain ones.

    Only occurrences outside strings, identifiers, comments and dollar quotes are decoded;
    the result means exactly the same to PostgreSQL (standard_conforming_strings is on).
    """
    if "&" not in sql:
        return sql
    out: list[str] = []
    pos = 0
    for start, end in _scan_quoted_u(sql):
        q = sql[start + 2]
        close = _skip_quoted(sql, start + 3, q)
        body = sql[start + 3 : close - 1].replace(q + q, q)
        esc = "\\"
        m = _UESCAPE.match(sql, close)
        if m:
            esc = m.group(1).replace("''", "'")
            if len(esc) != 1 or esc in "0123456789abcdefABCDEF+'\" \t\r\n":
                raise PolicyRefusal(SYNTAX_ERROR, "invalid Unicode escape character")
        decoded = _decode_body(body, esc)
        out.append(sql[pos:start])
        out.append(q + decoded.replace(q, q + q) + q)
        pos = end
    out.append(sql[pos:])
    return "".join(out)


def _decode_body(body: str, esc: str) -> str:
    res: list[str] = []
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c != esc:
            res.append(c)
            i += 1
            continue
        if body.startswith(esc, i + 1):
            res.append(esc)
            i += 2
            continue
        if body.startswith("+", i + 1):
            hx, width = body[i + 2 : i + 8], 6
        else:
            hx, width = body[i + 1 : i + 5], 4
        if len(hx) != width or any(ch not in "0123456789abcdefABCDEF" for ch in hx):
            raise PolicyRefusal(SYNTAX_ERROR, "invalid Unicode escape value")
        cp = int(hx, 16)
        if cp == 0 or cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
            raise PolicyRefusal(SYNTAX_ERROR, "invalid Unicode escape value")
        res.append(chr(cp))
        i += 1 + width + (1 if width == 6 else 0)
    return "".join(res)


def _skip_string(sql: str, i: int, escaped: bool) -> int:
    n = len(sql)
    while i < n:
        c = sql[i]
        if escaped and c == "\\":
            i += 2
            continue
        if c == "'":
            if i + 1 < n and sql[i + 1] == "'":
                i += 2
                continue
            return i + 1
        i += 1
    raise _unterminated("quoted string")


def _trim(sql: str, s: int, e: int) -> tuple[int, int]:
    """Shrink a span to exclude surrounding whitespace and comments."""
    while True:
        while s < e and sql[s] in PG_SPACE:
            s += 1
        if sql.startswith("--", s):
            s = _comment_end(sql, s, e)
            continue
        if sql.startswith("/*", s):
            depth, j = 1, s + 2
            while depth and j < e:
                if sql.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif sql.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            s = j
            continue
        break
    while e > s and sql[e - 1] in PG_SPACE:
        e -= 1
    return s, e


_WORD = re.compile(r"[A-Za-z_][A-Za-z_0-9$]*")


def first_word(sql: str, start: int) -> str:
    m = _WORD.match(sql, start)
    return m.group(0).upper() if m else sql[start : start + 1]
