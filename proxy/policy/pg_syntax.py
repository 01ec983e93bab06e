"""PostgreSQL syntax that sqlglot does not parse, reduced to a form it does — for sqlglot's eyes only.

The statement text that PostgreSQL receives is never changed by this module: only the token list
handed to sqlglot (and to the injector, which places its edits by text position) is.  Every
reduction below drops or replaces tokens whose meaning cannot matter to tenant scoping:

* ``ORDER BY x USING <`` / ``USING >``: the sort operator (only the two built-in ordering
  operators; anything else stays and is refused as before);
* ``ONLY (name)``: the parentheses;
* ``JOIN ... USING (a, b) AS j``: the join-using alias ``AS j`` (it names the merged columns;
  it hides no relation, so every predicate the injector places keeps its meaning);
* ``xmlparse(DOCUMENT|CONTENT x)``, ``xmlserialize(DOCUMENT|CONTENT x AS type)``,
  ``xmlexists(x PASSING [BY REF|BY VALUE] y [BY REF|BY VALUE])``: the keywords (and the target
  type), so the call reads as a plain call with the same expression arguments.

A dropped token's text is absorbed into the span of a neighbouring token (``ONLY`` spans
``ONLY (``, the name spans ``t)``, the USING list's ``)`` spans ``) AS j``), so the injector's
edits, which are placed by text position around tokens, land around the whole construct.

Whatever sqlglot then decides is checked afterwards on PostgreSQL's own parse of the real text
(:mod:`proxy.policy.pg_verify`), so a wrong reduction can only cause a refusal, never a leak.
Entry point: :func:`reduce_tokens`.
"""

from __future__ import annotations

from sqlglot.tokens import Token, TokenType

_XML_KEYWORDS = {"DOCUMENT", "CONTENT"}
_BY_WHAT = {"REF", "VALUE"}
_NAME_TYPES = (TokenType.VAR, TokenType.IDENTIFIER)


def _close(tokens: list[Token], i: int) -> int:
    """Index of the parenthesis closing the one at ``i`` (len(tokens) if unbalanced)."""
    depth = 0
    for j in range(i, len(tokens)):
        t = tokens[j].token_type
        if t == TokenType.L_PAREN:
            depth += 1
        elif t == TokenType.R_PAREN:
            depth -= 1
            if depth == 0:
                return j
    return len(tokens)


def _is_name(tok: Token) -> bool:
    return tok.token_type in _NAME_TYPES or (tok.text.isidentifier() and tok.token_type != TokenType.STRING)


def reduce_tokens(tokens: list[Token]) -> list[Token]:
    """The token list with the reductions of the module docstring applied (the same list if none)."""
    words = {t.text.upper() for t in tokens if t.token_type in (TokenType.USING, TokenType.ONLY)} | {
        t.text.lower() for t in tokens if t.token_type == TokenType.VAR and t.text.lower().startswith("xml")
    }
    if not words & {"USING", "ONLY", "xmlparse", "xmlserialize", "xmlexists"}:
        return tokens
    drop: set[int] = set()
    replace: dict[int, Token] = {}

    def absorb(keep: int, gone: range) -> None:
        """Drop the tokens ``gone`` and let token ``keep`` span their text, so an edit placed after
        (or around) ``keep`` lands after them in the real text too."""
        base = replace.get(keep, tokens[keep])
        lo = min(base.start, *(tokens[j].start for j in gone))
        hi = max(base.end, *(tokens[j].end for j in gone))
        replace[keep] = Token(base.token_type, base.text, base.line, base.col, lo, hi, base.comments)
        drop.update(gone)

    n = len(tokens)
    for i, tok in enumerate(tokens):
        tt = tok.token_type
        nxt = tokens[i + 1] if i + 1 < n else None
        if tt == TokenType.USING and nxt is not None:
            if nxt.token_type in (TokenType.LT, TokenType.GT) and i > 0:
                absorb(i - 1, range(i, i + 2))
            elif nxt.token_type == TokenType.L_PAREN:
                close = _close(tokens, i + 1)
                inner = tokens[i + 2:close]
                names_only = inner and all(
                    (k % 2 == 0 and _is_name(t)) or (k % 2 == 1 and t.token_type == TokenType.COMMA)
                    for k, t in enumerate(inner)
                )
                if (names_only and close + 2 < n and tokens[close + 1].token_type == TokenType.ALIAS
                        and _is_name(tokens[close + 2])):
                    absorb(close, range(close + 1, close + 3))
        elif tt == TokenType.ONLY and nxt is not None and nxt.token_type == TokenType.L_PAREN:
            close = _close(tokens, i + 1)
            inner = tokens[i + 2:close]
            if 1 <= len(inner) <= 3 and all(
                (k % 2 == 0 and _is_name(t)) or (k % 2 == 1 and t.token_type == TokenType.DOT)
                for k, t in enumerate(inner)
            ):
                absorb(i, range(i + 1, i + 2))  # ONLY spans "ONLY (", the last name part "t)"
                absorb(close - 1, range(close, close + 1))
        elif tt == TokenType.VAR and nxt is not None and nxt.token_type == TokenType.L_PAREN \
                and (i == 0 or tokens[i - 1].token_type != TokenType.DOT):
            word = tok.text.lower()
            if word not in ("xmlparse", "xmlserialize", "xmlexists"):
                continue
            close = _close(tokens, i + 1)
            first = i + 2
            if word in ("xmlparse", "xmlserialize") and first < close and tokens[first].text.upper() in _XML_KEYWORDS:
                drop.add(first)
            if word == "xmlserialize":
                depth = 0
                for j in range(first, close):
                    t = tokens[j].token_type
                    depth += t == TokenType.L_PAREN
                    depth -= t == TokenType.R_PAREN
                    if depth == 0 and t == TokenType.ALIAS:
                        drop.update(range(j, close))
                        break
            if word == "xmlexists":
                depth = 0
                for j in range(first, close):
                    t = tokens[j]
                    depth += t.token_type == TokenType.L_PAREN
                    depth -= t.token_type == TokenType.R_PAREN
                    if depth:
                        continue
                    if t.text.upper() == "PASSING":
                        replace[j] = Token(TokenType.COMMA, ",", t.line, t.col, t.start, t.end)
                    if t.text.upper() == "BY" and j + 1 < close and tokens[j + 1].text.upper() in _BY_WHAT:
                        drop.update((j, j + 1))
    if not drop and not replace:
        return tokens
    return [replace.get(i, t) for i, t in enumerate(tokens) if i not in drop]
