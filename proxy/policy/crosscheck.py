"""Two opinions on one text: sqlglot's tokens must be PostgreSQL's tokens.

The rewriter reasons on sqlglot's tree; PostgreSQL runs what its own scanner reads.  Before
a statement is parsed with sqlglot, :func:`sqlglot_tokens` tokenizes it and compares every
sqlglot token with PostgreSQL's tokens (:mod:`proxy.policy.lexer`); any disagreement refuses
the statement (42601 when PostgreSQL's reading is what an attacker would exploit, 0A000 for a
form sqlglot cannot model).  What must agree, token by token:

* the span: a sqlglot token starts where a PostgreSQL token starts and ends where one ends;
  a sqlglot token may cover several PostgreSQL tokens only when they are all words separated
  by whitespace (sqlglot's ``ORDER BY``, ``DOUBLE PRECISION``); ``$n`` is PostgreSQL's one
  PARAM token and sqlglot's ``$`` + ``n``;
* the category: string, quoted identifier, number, parameter, word, operator/punctuation
  (on the tree, :func:`reserved_names` refuses a PostgreSQL reserved keyword that sqlglot
  took for a plain name);
* the value: a string constant's value (continuations joined, E'' escapes decoded) and a
  quoted identifier's name equal sqlglot's token text;
* the name: sqlglot looks keywords and built-in function names up with Python's Unicode
  ``str.upper()``, PostgreSQL folds only the ASCII letters of an unquoted name and never a
  quoted one (downcase_identifier; every keyword is ASCII).  So ``ſum(x)`` and ``"SUM"(x)``
  are sqlglot's built-in SUM, while PostgreSQL calls a function named ``ſum`` or ``SUM`` (a
  user-defined one if it exists, past the function allowlist); ``falſe``, ``ıs``, ``ınt`` are
  keywords to sqlglot and names to PostgreSQL.  Refused: a non-ASCII unquoted word that Python's
  case mapping turns into an ASCII word (:func:`_case_alias`: ı ſ ß ﬁ ﬆ K ...), and a quoted
  name called as a function that sqlglot maps to a built-in of another name.

So a string continuation that sqlglot reads as two strings, ``0x1F`` that sqlglot reads as
a hex number, a comment sqlglot misses, or an operator split differently never reaches the
rewriter.  sqlglot's tokenizer cannot read ``$1,$2`` without spaces: where PostgreSQL's tokens
show a PARAM, the text handed to sqlglot gets a space on either side (a space next to a PARAM
token cannot change PostgreSQL's tokens), and the token positions are mapped back to the
original text, into which the rewrite is spliced.
"""

from __future__ import annotations

from sqlglot.errors import TokenError
from sqlglot.tokens import Token, TokenType

from proxy.policy.errors import FEATURE_NOT_SUPPORTED, SYNTAX_ERROR, VOID_TYPE_REFUSAL, PolicyRefusal
from proxy.policy.lexer import PG_SPACE, NUMBERS, STRINGS, PgToken, identifier_value, is_word, string_value, tokens_in

_SG_STRINGS = frozenset({
    TokenType.STRING, TokenType.BYTE_STRING, TokenType.NATIONAL_STRING, TokenType.BIT_STRING,
    TokenType.HEX_STRING, TokenType.HEREDOC_STRING, TokenType.RAW_STRING,
} | ({TokenType.UNICODE_STRING} if hasattr(TokenType, "UNICODE_STRING") else set()))
_SPLIT_OPS = frozenset({"!~", "!~*", "!~~", "!~~*"})
_PG_OPS = frozenset({"Op", "TYPECAST", "DOT_DOT", "COLON_EQUALS", "EQUALS_GREATER", "LESS_EQUALS",
                     "GREATER_EQUALS", "NOT_EQUALS"})


def _pg_category(sql: str, t: PgToken) -> str:
    name = t.name
    if name in STRINGS:
        return "str"
    if name in NUMBERS:
        return "num"
    if name == "PARAM":
        return "param"
    if name == "IDENT" and sql[t.start] == '"':
        return "qident"
    if name in _PG_OPS or name.startswith("ASCII_"):
        return "op"
    if is_word(sql, t):
        return "word"
    return "other:" + name


def _sg_category(t: Token) -> str:
    tt = t.token_type
    if tt in _SG_STRINGS:
        return "str"
    if tt == TokenType.IDENTIFIER:
        return "qident"
    if tt == TokenType.NUMBER:
        return "num"
    if tt == TokenType.PARAMETER:
        return "param"
    txt = t.text
    if txt and (txt[0].isalpha() or txt[0] == "_" or ord(txt[0]) >= 0x80):
        return "word"
    return "op"


def _case_alias(word: str) -> str | None:
    """The ASCII word Python's Unicode case mapping makes of a non-ASCII ``word`` (``ſum`` ->
    ``SUM``, ``ıs`` -> ``IS``, ``straße`` -> ``STRASSE``, ``\u212aey`` -> ``key``), else None.
    sqlglot (``text.upper()``) and the proxy's keyword checks compare such a result with ASCII
    keywords and function names; PostgreSQL folds ASCII A-Z only, so to it the word stays a name."""
    if word.isascii():
        return None
    for fold in (str.upper, str.lower, str.casefold):
        folded = fold(word)
        if folded.isascii():
            return folded
    return None


def _sqlglot_function_names() -> frozenset[str]:
    """Upper-case names sqlglot's parser maps to a modelled function (it looks them up with
    ``text.upper()``, for quoted names too)."""
    from sqlglot.dialects.postgres import Postgres  # the dialect proxy/policy/parse.py parses with

    p = Postgres.parser_class
    return frozenset(p.FUNCTIONS) | frozenset(p.FUNCTION_PARSERS) | frozenset(p.NO_PAREN_FUNCTION_PARSERS)


_SG_FUNCTION_NAMES: frozenset[str] | None = None


def _quoted_call_differs(name: str) -> bool:
    """A quoted name before ``(`` that sqlglot takes for the built-in ``name.upper()``, while
    PostgreSQL calls exactly ``name`` (the built-in's name is lower-case ASCII)."""
    global _SG_FUNCTION_NAMES
    if _SG_FUNCTION_NAMES is None:
        _SG_FUNCTION_NAMES = _sqlglot_function_names()
    upper = name.upper()
    return upper in _SG_FUNCTION_NAMES and name != upper.lower()


def _refuse(msg: str, state: str = SYNTAX_ERROR) -> PolicyRefusal:
    return PolicyRefusal(state, f"tenantgate and PostgreSQL read this statement differently: {msg}; "
                                "rewrite it in a plainer form", reason="parse")


def padded_text(sql: str, start: int, end: int, pg: list[PgToken]) -> tuple[str, list[int]]:
    """(text for sqlglot with the prefix blanked and spaces around PARAM tokens, sorted padded
    positions at which one space was inserted)."""
    parts = [" " * start]
    inserted: list[int] = []
    pos = start
    length = start
    for t in pg:
        if t.name != "PARAM":
            continue
        if t.start > start and sql[t.start - 1] not in PG_SPACE:
            parts.append(sql[pos : t.start])
            length += t.start - pos
            inserted.append(length)
            parts.append(" ")
            length += 1
            pos = t.start
        if t.end < end and sql[t.end] not in PG_SPACE:
            parts.append(sql[pos : t.end])
            length += t.end - pos
            inserted.append(length)
            parts.append(" ")
            length += 1
            pos = t.end
    parts.append(sql[pos:end])
    return "".join(parts), inserted


def sqlglot_tokens(dialect, sql: str, start: int, end: int) -> list[Token]:
    """sqlglot's tokens of ``sql[start:end]`` at absolute positions, checked against PostgreSQL's."""
    pg = tokens_in(sql, start, end)
    text, inserted = padded_text(sql, start, end, pg)
    try:
        tokens = dialect.tokenize(text)
    except TokenError as e:
        raise PolicyRefusal(FEATURE_NOT_SUPPORTED, f"statement could not be tokenized: {e}", reason="parse") from None
    if inserted:
        import bisect

        for tok in tokens:
            # a token never starts or ends on an inserted space (it is whitespace)
            tok.start -= bisect.bisect_right(inserted, tok.start)
            tok.end -= bisect.bisect_right(inserted, tok.end)
    compare(sql, pg, tokens)
    return tokens


def compare(sql: str, pg: list[PgToken], sg: list[Token]) -> None:
    """Refuse unless sqlglot's tokens ``sg`` (inclusive ends) read ``sql`` as PostgreSQL's ``pg``."""
    i = 0
    j = 0
    npg, nsg = len(pg), len(sg)
    while j < nsg:
        s = sg[j]
        s_end = s.end + 1
        if i >= npg or pg[i].start != s.start:
            raise _refuse(f"token {sql[s.start:s_end][:30]!r} at offset {s.start}")
        p = pg[i]
        pc = _pg_category(sql, p)
        sc = _sg_category(s)
        if pc == "param":
            # PostgreSQL's $n is sqlglot's PARAMETER '$' followed by NUMBER n
            if not (sc == "param" and s.text == "$" and j + 1 < nsg and sg[j + 1].token_type == TokenType.NUMBER
                    and sg[j + 1].start == s_end and sg[j + 1].end + 1 == p.end):
                raise _refuse(f"parameter {sql[p.start:p.end]!r}")
            i += 1
            j += 2
            continue
        if pc == "op" and p.name == "Op" and sql[p.start:p.end] in _SPLIT_OPS:
            # sqlglot reads PostgreSQL's one operator !~ (and !~*, !~~, !~~*) as ! followed by ~...
            while j < nsg and sg[j].end + 1 < p.end and _sg_category(sg[j]) == "op" and sg[j + 1].start == sg[j].end + 1:
                j += 1
            if j >= nsg or sg[j].end + 1 != p.end or _sg_category(sg[j]) != "op":
                raise _refuse(f"operator {sql[p.start:p.end]!r}")
            i += 1
            j += 1
            continue
        if pc != sc:
            raise _refuse(f"{sql[p.start:p.end][:30]!r} is a {pc} to PostgreSQL and a {sc} to tenantgate's parser")
        k = i
        if pc == "word":
            for t in pg[i:]:
                if t.start >= s_end:
                    break
                alias = _case_alias(sql[t.start:t.end])
                if alias is not None:
                    raise _refuse(f"{sql[t.start:t.end][:30]!r} is a name to PostgreSQL, but Unicode case mapping "
                                  f"makes it {alias[:30]!r} to tenantgate's parser (quote the name)")
            while pg[k].end < s_end:
                k += 1
                if k >= npg or _pg_category(sql, pg[k]) != "word" or not _is_space(sql, pg[k - 1].end, pg[k].start):
                    raise _refuse(f"words {sql[s.start:s_end][:30]!r}")
        if pg[k].end != s_end:
            raise _refuse(f"token {sql[p.start:p.end][:30]!r} at offset {p.start}")
        if pc == "str":
            if string_value(sql, p) != s.text:
                raise _refuse(f"string constant at offset {p.start}")
        elif pc == "qident":
            if identifier_value(sql, p) != s.text:
                raise _refuse(f"quoted identifier at offset {p.start}")
            if k + 1 < npg and pg[k + 1].name == "ASCII_40" and _quoted_call_differs(s.text):
                raise _refuse(f"function {sql[p.start:p.end][:30]} is not {s.text.upper().lower()}() to PostgreSQL "
                              "(a quoted name is exact), but tenantgate's parser reads it as that built-in")
        i = k + 1
        j += 1
    if i != npg:
        raise _refuse(f"token {sql[pg[i].start:pg[i].end][:30]!r} at offset {pg[i].start}")
    _interval_words(sql, pg)


def _is_space(sql: str, a: int, b: int) -> bool:
    return b > a and not sql[a:b].strip(PG_SPACE)


def reserved_names(tree) -> None:
    """Refuse an unquoted name in sqlglot's tree that PostgreSQL reads as a reserved keyword
    (sqlglot takes some of them for column or table names; PostgreSQL never does), and a
    parameter that sqlglot took for an alias."""
    from sqlglot import exp

    for node in tree.find_all(exp.Identifier):
        if not node.quoted and node.this.lower() in _RESERVED and node.this.lower() != "default":
            raise _refuse(f"{node.this!r} is a reserved word to PostgreSQL, not a name")
    # PostgreSQL reads INTERVAL as a constant only before a string constant (with an optional
    # field list); otherwise ``interval`` is a column name and the next word its alias
    for node in tree.find_all(exp.Interval):
        this = node.this
        if not (isinstance(this, exp.Literal) and this.is_string):
            raise _refuse("INTERVAL is a constant to PostgreSQL only before a quoted string; "
                          "write '...'::interval")
    # a cast to void: PostgreSQL drops a void parameter from a function call's arguments, so the
    # call it runs has fewer arguments than the one checked (proxy/policy/void_params.py)
    for node in tree.find_all(exp.DataType):
        if any(i.this.lower() == "void" for i in node.find_all(exp.Identifier)):
            raise _refuse(VOID_TYPE_REFUSAL, FEATURE_NOT_SUPPORTED)
    # ``name $1``: PostgreSQL reads a typed constant ($1 cast to type "name"), sqlglot an alias
    for node in tree.find_all(exp.Parameter, exp.Placeholder):
        if node.arg_key == "alias" or isinstance(node.parent, exp.TableAlias):
            raise _refuse("a parameter after a name is a typed constant to PostgreSQL; write $n::type")


_INTERVAL_FIELDS = frozenset({"YEAR_P", "MONTH_P", "DAY_P", "HOUR_P", "MINUTE_P", "SECOND_P"})


def _interval_words(sql: str, pg: list[PgToken]) -> None:
    """``INTERVAL 'x' word``: PostgreSQL reads a word other than an interval field as an alias,
    sqlglot as a unit; and INTERVAL not followed by a string constant is a column name to
    PostgreSQL.  Refuse both."""
    for k, t in enumerate(pg):
        if t.name != "INTERVAL":
            continue
        j = k + 1
        if j < len(pg) and pg[j].name == "ASCII_40":  # INTERVAL (p) 'x'
            while j < len(pg) and pg[j].name != "ASCII_41":
                j += 1
            j += 1
        if j >= len(pg) or pg[j].name != "SCONST":
            raise _refuse("INTERVAL is a constant to PostgreSQL only before a quoted string; write '...'::interval")
        if j + 1 < len(pg):
            nxt = pg[j + 1]
            if is_word(sql, nxt) and nxt.name not in _INTERVAL_FIELDS and nxt.kind != "RESERVED_KEYWORD":
                raise _refuse(f"{sql[nxt.start:nxt.end]!r} after an interval constant is an alias to PostgreSQL")


def _reserved() -> frozenset[str]:
    from pglast.keywords import RESERVED_KEYWORDS

    return frozenset(RESERVED_KEYWORDS)


_RESERVED = _reserved()
