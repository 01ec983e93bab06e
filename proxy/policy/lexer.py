"""The authoritative lexer: PostgreSQL's own scanner (libpg_query through pglast).

Every decision the proxy takes on statement *text* starts here, so the proxy and
PostgreSQL never read the same bytes differently: statement boundaries, where strings,
quoted identifiers, comments, parameters and dollar quotes begin and end, string
continuation (two literals separated by whitespace containing a newline are one string;
a continued ``E'...'`` stays in escape mode), nested ``/* */`` comments, ``$1,$2`` without
spaces, ``\\r`` as a newline, and numbers as PostgreSQL 15 reads them (``0x1F`` is ``0``
followed by the alias ``x1F``).

pglast 5.x embeds libpg_query 15, the grammar of the backend (see docs/security.md, "Two
opinions").  It scans with libpg_query's defaults, which are the settings the proxy keeps
every session on: ``standard_conforming_strings = on`` and ``backslash_quote =
safe_encoding`` (clients cannot change either, see utility_statements.SAFE_PARAMETERS) and a UTF-8
client encoding (other encodings are refused).

Entry points:

* :func:`scan` -> tuple of :class:`PgToken` (character offsets, exclusive end), memoised;
* :func:`split_statements` -> list of (start, end) statement spans without the ``;``;
* :func:`first_word` -> the upper-cased first keyword of a statement;
* :func:`string_value` / :func:`identifier_value` -> what PostgreSQL reads in a token;
* :func:`decode_unicode_escapes` -> the text with ``U&'...'``/``U&"..."`` replaced by plain
  literals of the same meaning.

The comparison of sqlglot's tokens with these is in :mod:`proxy.policy.crosscheck`.
"""

from __future__ import annotations

import bisect
import functools
import re
from typing import NamedTuple

from pglast import parser as _pg

from proxy.policy.errors import FEATURE_NOT_SUPPORTED, SYNTAX_ERROR, PolicyRefusal

# PostgreSQL 15's whitespace (scan.l: space [ \t\n\r\f]).
PG_SPACE = " \t\n\r\f"

COMMENTS = frozenset({"C_COMMENT", "SQL_COMMENT"})
STRINGS = frozenset({"SCONST", "USCONST", "BCONST", "XCONST"})
NUMBERS = frozenset({"ICONST", "FCONST"})


class PgToken(NamedTuple):
    start: int  # character offset of the first character
    end: int  # one past the last character
    name: str  # libpg_query token name: SCONST, IDENT, PARAM, Op, ASCII_44, SELECT, ...
    kind: str  # NO_KEYWORD, UNRESERVED_KEYWORD, COL_NAME_KEYWORD, TYPE_FUNC_NAME_KEYWORD, RESERVED_KEYWORD


@functools.lru_cache(maxsize=8)
def scan(sql: str) -> tuple[PgToken, ...]:
    """PostgreSQL's tokens of ``sql`` (comments included); a scanner error is a 42601 refusal."""
    if "\x00" in sql:
        raise PolicyRefusal(SYNTAX_ERROR, "statement contains a NUL character")
    try:
        raw = _pg.scan(sql)
    except _pg.ParseError as e:
        raise PolicyRefusal(SYNTAX_ERROR, str(e).split(", at index")[0], reason="parse") from None
    toks: list[PgToken] = []
    n = len(raw)
    for k, t in enumerate(raw):
        end = t.end + 1
        if t.name in ("USCONST", "UIDENT"):
            # libpg_query reports no usable end for U& tokens: they end where the next token
            # starts, less the whitespace in between (a comment is a token of its own)
            nxt = raw[k + 1].start if k + 1 < n else len(sql)
            end = nxt
            while end > t.start and sql[end - 1] in PG_SPACE:
                end -= 1
        toks.append(PgToken(t.start, end, t.name, t.kind))
    _check_offsets(sql, toks)
    _check_comment_continuation(sql, toks)
    return tuple(toks)


def _check_comment_continuation(sql: str, toks: list[PgToken]) -> None:
    """libpg_query's scanner (changed to report comments as tokens) ends a string at a ``--``
    comment, while the PostgreSQL 15 server joins ``'a' -- c<newline>'b'`` into one string
    (scan.l: a -- comment is horizontal whitespace in a continuation).  Refuse that form."""
    for k, t in enumerate(toks):
        if t.name != "SQL_COMMENT" or k == 0:
            continue
        j = k - 1
        while j >= 0 and toks[j].name in COMMENTS:
            j -= 1
        if j < 0 or toks[j].name not in STRINGS or sql[toks[j].start] == "$":
            continue
        m = k + 1
        while m < len(toks) and toks[m].name in COMMENTS:
            m += 1
        if m < len(toks) and sql[toks[m].start] == "'":
            raise PolicyRefusal(SYNTAX_ERROR, "a -- comment between two string constants is not supported by "
                                "tenantgate (PostgreSQL may join the strings); remove the comment", reason="parse")


def _check_offsets(sql: str, toks: list[PgToken]) -> None:
    """Offsets must be character offsets: every gap between tokens is PostgreSQL whitespace."""
    pos = 0
    for t in toks:
        if t.start < pos or t.end <= t.start or t.end > len(sql):
            raise PolicyRefusal(SYNTAX_ERROR, "statement could not be scanned (token offsets)")
        if sql[pos : t.start].strip(PG_SPACE):
            raise PolicyRefusal(SYNTAX_ERROR, f"statement could not be scanned near {sql[pos:t.start][:20]!r}")
        pos = t.end
    if sql[pos:].strip(PG_SPACE):
        raise PolicyRefusal(SYNTAX_ERROR, "statement could not be scanned at its end")


def tokens_in(sql: str, start: int, end: int, *, comments: bool = False) -> list[PgToken]:
    """The tokens of ``sql`` inside [start, end); a token cut by a boundary is a refusal."""
    toks = scan(sql)
    starts = _starts(sql)
    i = bisect.bisect_left(starts, start)
    if i > 0 and toks[i - 1].end > start:
        raise PolicyRefusal(SYNTAX_ERROR, "statement boundary inside a token")
    out = []
    while i < len(toks) and toks[i].start < end:
        t = toks[i]
        if t.end > end:
            raise PolicyRefusal(SYNTAX_ERROR, "statement boundary inside a token")
        if comments or t.name not in COMMENTS:
            out.append(t)
        i += 1
    return out


@functools.lru_cache(maxsize=8)
def _starts(sql: str) -> list[int]:
    return [t.start for t in scan(sql)]


def split_statements(sql: str) -> list[tuple[int, int]]:
    """Statement spans (first token start, last token end), split at PostgreSQL's ``;`` tokens.

    (PostgreSQL's grammar only accepts ``;`` inside a statement in a ``BEGIN ATOMIC`` body of
    CREATE FUNCTION/PROCEDURE, which the proxy refuses whatever the split.)
    """
    spans: list[tuple[int, int]] = []
    first = last = None
    for t in scan(sql):
        if t.name in COMMENTS:
            continue
        if t.name == "ASCII_59":
            if first is not None:
                spans.append((first, last))
            first = last = None
            continue
        if first is None:
            first = t.start
        last = t.end
    if first is not None:
        spans.append((first, last))
    return spans


def statement_texts(sql: str) -> list[str]:
    """The statements of ``sql`` as text (split by :func:`split_statements`), each comment replaced
    by a space, stripped; for parsers of command words such as the admin console's."""
    out: list[str] = []
    for start, end in split_statements(sql):
        parts, pos = [], start
        for t in tokens_in(sql, start, end, comments=True):
            if t.name in COMMENTS:
                parts += [sql[pos:t.start], " "]
                pos = t.end
        parts.append(sql[pos:end])
        out.append("".join(parts).strip())
    return out


def token_at(sql: str, start: int) -> PgToken | None:
    toks = scan(sql)
    i = bisect.bisect_left(_starts(sql), start)
    return toks[i] if i < len(toks) and toks[i].start == start else None


def first_word(sql: str, start: int) -> str:
    """Upper-cased first keyword of the statement at ``start`` ('' if it is not a word).

    Only ASCII letters are upper-cased, as PostgreSQL's keywords are ASCII: ``ſet`` is a name to
    PostgreSQL and must not be routed as SET (Python's ``"ſet".upper()`` is ``"SET"``)."""
    t = token_at(sql, start)
    if t is None or not is_word(sql, t):
        return sql[start : start + 1]
    word = sql[t.start : t.end]
    return word.upper() if word.isascii() else word


_WORD_RE = re.compile(r"[A-Za-z_\x80-\U0010ffff][A-Za-z_0-9$\x80-\U0010ffff]*")


def is_word(sql: str, t: PgToken) -> bool:
    """An unquoted keyword or identifier."""
    return (t.kind != "NO_KEYWORD" or t.name == "IDENT") and _WORD_RE.fullmatch(sql, t.start, t.end) is not None


# ---- values -------------------------------------------------------------------------------
_CONT_GAP = re.compile(r"[ \t\f]*[\n\r](?:[ \t\n\r\f]+|--[^\n\r]*[\n\r])*")


def string_value(sql: str, t: PgToken) -> str:
    """The value PostgreSQL reads in a SCONST/BCONST/XCONST token (continuations joined,
    escapes of E'' strings decoded; B''/X'' give the digits).  Refuses what it cannot decode
    exactly (invalid escapes, NUL)."""
    text = sql[t.start : t.end]
    if text.startswith("$"):
        tag_end = text.index("$", 1) + 1
        return text[tag_end : len(text) - tag_end]
    i = 0
    escaped = False
    if text[0] in "EeBbXx":
        escaped = text[0] in "Ee"
        i = 1
    pieces: list[str] = []
    n = len(text)
    while True:
        if i >= n or text[i] != "'":
            raise PolicyRefusal(SYNTAX_ERROR, "string constant could not be read")
        j = i + 1
        buf: list[str] = []
        while True:
            if j >= n:
                raise PolicyRefusal(SYNTAX_ERROR, "unterminated quoted string")
            c = text[j]
            if c == "'":
                if j + 1 < n and text[j + 1] == "'":
                    buf.append("'")
                    j += 2
                    continue
                j += 1
                break
            if escaped and c == "\\":
                if j + 1 >= n:
                    raise PolicyRefusal(SYNTAX_ERROR, "unterminated quoted string")
                buf.append(text[j : j + 2])
                j += 2
                continue
            buf.append(c)
            j += 1
        body = "".join(buf)
        pieces.append(_decode_escapes(body) if escaped else body)
        if j == n:
            return "".join(pieces)
        m = _CONT_GAP.match(text, j)
        if m is None or m.end() >= n or text[m.end()] != "'":
            raise PolicyRefusal(SYNTAX_ERROR, "string constant could not be read")
        i = m.end()


_SIMPLE_ESC = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_OCT = re.compile(r"[0-7]{1,3}")
_HEX = re.compile(r"[0-9A-Fa-f]{1,2}")


def _decode_escapes(body: str) -> str:
    """Backslash escapes of an E'' string (PostgreSQL 15 scan.l, UTF-8)."""
    if "\\" not in body:
        return body
    out = bytearray()
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c != "\\":
            out += c.encode("utf-8")
            i += 1
            continue
        d = body[i + 1]
        if d in _SIMPLE_ESC:
            out += _SIMPLE_ESC[d].encode()
            i += 2
        elif (m := _OCT.match(body, i + 1)) is not None:
            out.append(int(m.group(0), 8) & 0xFF)
            i = m.end()
        elif d == "x" and (m := _HEX.match(body, i + 2)) is not None:
            out.append(int(m.group(0), 16))
            i = m.end()
        elif d in "uU":
            width = 4 if d == "u" else 8
            hx = body[i + 2 : i + 2 + width]
            if len(hx) != width or any(ch not in "0123456789abcdefABCDEF" for ch in hx):
                raise PolicyRefusal(SYNTAX_ERROR, "invalid Unicode escape")
            cp = int(hx, 16)
            i += 2 + width
            if 0xD800 <= cp <= 0xDBFF and body.startswith("\\u", i):
                lo = body[i + 2 : i + 6]
                if len(lo) == 4 and all(ch in "0123456789abcdefABCDEF" for ch in lo) and 0xDC00 <= int(lo, 16) <= 0xDFFF:
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (int(lo, 16) - 0xDC00)
                    i += 6
            if cp == 0 or cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
                raise PolicyRefusal(SYNTAX_ERROR, "invalid Unicode escape value")
            out += chr(cp).encode("utf-8")
        else:
            out += d.encode("utf-8")
            i += 2
    if 0 in out:
        raise PolicyRefusal(SYNTAX_ERROR, 'invalid byte sequence for encoding "UTF8": 0x00')
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyRefusal("22021", 'invalid byte sequence for encoding "UTF8" in an escape string') from None


def identifier_value(sql: str, t: PgToken) -> str:
    """A quoted identifier's name (before truncation to 63 bytes)."""
    text = sql[t.start : t.end]
    if not (text.startswith('"') and text.endswith('"')):
        raise PolicyRefusal(SYNTAX_ERROR, "quoted identifier could not be read")
    return text[1:-1].replace('""', '"')


# ---- U& escapes ------------------------------------------------------------------------------
_UESCAPE_CLAUSE = re.compile(r"[Uu][Ee][Ss][Cc][Aa][Pp][Ee]")


def decode_unicode_escapes(sql: str) -> str:
    """Rewrite U&"..." identifiers and U&'...' strings (with optional UESCAPE) to plain ones.

    Works on PostgreSQL's tokens; the result means exactly the same to PostgreSQL
    (standard_conforming_strings is on).  A continued U&'' string is refused.
    """
    if "&" not in sql:
        return sql
    toks = scan(sql)
    out: list[str] = []
    pos = 0
    k = 0
    while k < len(toks):
        t = toks[k]
        if t.name not in ("USCONST", "UIDENT"):
            k += 1
            continue
        q = sql[t.start + 2]
        close = _skip_quoted(sql, t.start + 3, q)
        if close != t.end:
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "a continued U&'' string is not supported by tenantgate; "
                                "write it as one literal")
        body = sql[t.start + 3 : close - 1].replace(q + q, q)
        esc = "\\"
        end = t.end
        k += 1
        # skip comments between the literal and UESCAPE, as the grammar does
        j = k
        while j < len(toks) and toks[j].name in COMMENTS:
            j += 1
        if j < len(toks) and toks[j].name == "UESCAPE":
            if j + 1 >= len(toks) or toks[j + 1].name != "SCONST" or sql[toks[j + 1].start] != "'":
                raise PolicyRefusal(SYNTAX_ERROR, "UESCAPE must be followed by a simple string literal")
            esc = string_value(sql, toks[j + 1])
            if len(esc) != 1 or esc in "0123456789abcdefABCDEF+'\" \t\r\n":
                raise PolicyRefusal(SYNTAX_ERROR, "invalid Unicode escape character")
            end = toks[j + 1].end
            k = j + 2
        decoded = _decode_body(body, esc)
        if q == '"' and not decoded:
            raise PolicyRefusal(SYNTAX_ERROR, "zero-length delimited identifier")
        out.append(sql[pos : t.start])
        out.append(q + decoded.replace(q, q + q) + q)
        pos = end
    if not out:
        return sql
    out.append(sql[pos:])
    return "".join(out)


def _skip_quoted(sql: str, i: int, q: str) -> int:
    n = len(sql)
    while True:
        k = sql.find(q, i)
        if k < 0:
            raise PolicyRefusal(SYNTAX_ERROR, "unterminated quoted string or identifier")
        if k + 1 < n and sql[k + 1] == q:
            i = k + 2
            continue
        return k + 1


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
        i += 1 + width + (1 if width == 6 else 0)
        if 0xD800 <= cp <= 0xDBFF and body.startswith(esc, i):
            # a surrogate pair written as two escapes
            lo = body[i + 1 : i + 5] if not body.startswith("+", i + 1) else body[i + 2 : i + 8]
            step = 5 if not body.startswith("+", i + 1) else 8
            if lo and all(ch in "0123456789abcdefABCDEF" for ch in lo) and 0xDC00 <= int(lo, 16) <= 0xDFFF:
                cp = 0x10000 + ((cp - 0xD800) << 10) + (int(lo, 16) - 0xDC00)
                i += step
        if cp == 0 or cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
            raise PolicyRefusal(SYNTAX_ERROR, "invalid Unicode escape value")
        res.append(chr(cp))
    return "".join(res)


def statement_count(sql: str) -> int:
    """How many statements PostgreSQL's grammar reads in ``sql``; a syntax error that
    PostgreSQL would report is a 42601 refusal (so nothing that sqlglot accepts and PostgreSQL
    reads otherwise, e.g. ``x BETWEEN 1 2`` without AND, is forwarded)."""
    import json

    try:
        out = _pg.parse_sql_json(sql)
    except _pg.ParseError as e:
        raise PolicyRefusal(SYNTAX_ERROR, str(e).split(", at index")[0], reason="parse") from None
    return len(json.loads(out).get("stmts", ()))


def single_numbers(sql: str, spans: list[tuple[int, int]]) -> bool:
    """True when every span is exactly one ICONST/FCONST token of PostgreSQL's."""
    for s, e in spans:
        t = token_at(sql, s)
        if t is None or t.name not in NUMBERS or t.end != e:
            return False
    return True
