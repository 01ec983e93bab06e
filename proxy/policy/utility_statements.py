"""The statement kinds sqlglot does not model, parsed by the proxy itself.

The parser works on sqlglot tokens that :mod:`proxy.policy.crosscheck` has checked against
PostgreSQL's own scanner (same spans, same string and identifier values), so a decision here
is a decision on what PostgreSQL reads.

SET / RESET / SHOW (a safe list of parameters), transaction control, PREPARE / EXECUTE /
DEALLOCATE, EXPLAIN, DECLARE / FETCH / MOVE / CLOSE, COPY (see :mod:`proxy.policy.copy`).
Anything in these statements the parser does not recognise is refused.

Entry point: :func:`command_piece`.  ``inner`` is the pipeline's statement handler, used for
the statement inside EXPLAIN / PREPARE / DECLARE.
"""

from __future__ import annotations

from typing import Callable

from sqlglot.tokens import Token, TokenType

from proxy.policy.catalog_views import setting_hidden
from proxy.policy.errors import FEATURE_NOT_SUPPORTED, INSUFFICIENT_PRIVILEGE, SYNTAX_ERROR, VOID_TYPE_REFUSAL, PolicyRefusal
from proxy.policy.edits import TENANT, TENANT_LASTING, Edit
from proxy.policy.parse import tokenize_span
from proxy.policy.statement_result import Piece
from proxy.seam import client_encoding_is_safe
from proxy.policy.resolve import fold_identifier

InnerHandler = Callable[[str, int, int], Piece]

# Parameters a tenant session may SET / RESET (lower case).  search_path, role, session
# authorization, row_security, standard_conforming_strings and every tenantgate.* are not here.
SAFE_PARAMETERS = frozenset(
    {
        "application_name", "client_encoding", "datestyle", "timezone", "extra_float_digits",
        "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout", "idle_session_timeout",
        "intervalstyle", "bytea_output", "client_min_messages", "default_transaction_isolation",
        "default_transaction_read_only", "default_transaction_deferrable", "transaction_isolation",
        "transaction_read_only", "transaction_deferrable", "synchronous_commit", "xmloption",
        "work_mem", "jit", "lc_monetary", "lc_numeric", "lc_time", "geqo", "plan_cache_mode",
        "default_with_oids", "escape_string_warning", "enable_seqscan", "enable_indexscan",
        "enable_bitmapscan", "enable_hashjoin", "enable_mergejoin", "enable_nestloop",
    }
)
READ_ONLY_PARAMS = frozenset({"default_transaction_read_only", "transaction_read_only"})

FALSY = frozenset({"off", "false", "0", "no", "f", "n"})
TOKEN_PARAMETER = "tenantgate.tenant"

_WORDISH = {TokenType.VAR, TokenType.IDENTIFIER}


def _refuse(msg: str, state: str = INSUFFICIENT_PRIVILEGE) -> PolicyRefusal:
    return PolicyRefusal(state, msg, reason="parse" if state == SYNTAX_ERROR else "unsupported")


def _word(t: Token) -> str:
    """Upper-cased keyword text, or '' for strings/quoted identifiers."""
    if t.token_type in (TokenType.STRING, TokenType.IDENTIFIER, TokenType.HEREDOC_STRING):
        return ""
    return t.text.upper()


def _name(t: Token) -> str:
    if t.token_type == TokenType.IDENTIFIER:
        return fold_identifier_quoted(t.text)
    if not t.text.replace("_", "a").replace("$", "a").isalnum():
        raise _refuse(f"unexpected {t.text!r} where a name was expected", SYNTAX_ERROR)
    return fold_identifier(t.text)


#: the prefix of the server-side names tenantgate gives protocol-level statements of pooled
#: sessions (proxy/session/statements.py): SQL PREPARE / EXECUTE / DEALLOCATE of such a name
#: would reach a statement whose Bind checks EXECUTE skips
RESERVED_STATEMENT_PREFIX = "tg_"


def _statement_name(t: Token) -> str:
    name = _name(t)
    if name.startswith(RESERVED_STATEMENT_PREFIX):
        raise _refuse(f'prepared statement names beginning with "{RESERVED_STATEMENT_PREFIX}" are reserved for '
                      "tenantgate's own statements", INSUFFICIENT_PRIVILEGE)
    return name


def fold_identifier_quoted(text: str) -> str:
    from proxy.policy.resolve import truncate_identifier

    return truncate_identifier(text)


def _only_simple(tokens: list[Token], what: str) -> None:
    for t in tokens:
        if t.token_type in (TokenType.L_PAREN, TokenType.R_PAREN, TokenType.SELECT) or t.text in ("(", ")"):
            raise _refuse(f"unsupported form of {what}", FEATURE_NOT_SUPPORTED)


def _kw_end(sql: str, start: int) -> int:
    """End of the statement's first token (PostgreSQL's scanner)."""
    from proxy.policy.lexer import token_at

    t = token_at(sql, start)
    if t is None:
        raise _refuse("statement could not be read", SYNTAX_ERROR)
    return t.end


def command_piece(sql: str, start: int, end: int, kw: str, inner: InnerHandler) -> Piece:
    toks = tokenize_span(sql, _kw_end(sql, start), end)
    handler = _HANDLERS.get(kw)
    if handler is None:
        raise _refuse(f"{kw} is not allowed in a tenant session")
    return handler(sql, start, end, toks, inner)


# ---- SET / RESET / SHOW ---------------------------------------------------------------------
def _transaction_modes(tokens: list[Token], what: str) -> Piece:
    _only_simple(tokens, what)
    words = [_word(t) for t in tokens]
    piece = Piece(statement_class="tcl")
    allowed = {"ISOLATION", "LEVEL", "SERIALIZABLE", "REPEATABLE", "READ", "COMMITTED", "UNCOMMITTED",
               "WRITE", "ONLY", "NOT", "DEFERRABLE", "TRANSACTION", "WORK", ","}
    for w in words:
        if w not in allowed:
            raise _refuse(f"unsupported transaction mode {w or '?'} in {what}", FEATURE_NOT_SUPPORTED)
    for a, b in zip(words, words[1:]):
        if a == "READ" and b == "WRITE":
            piece.read_write_request = True
    return piece


def _set(sql, start, end, toks, inner) -> Piece:
    local = False
    i = 0
    if toks and _word(toks[0]) in ("SESSION", "LOCAL"):
        if _word(toks[0]) == "SESSION" and len(toks) > 1 and _word(toks[1]) in ("AUTHORIZATION", "CHARACTERISTICS"):
            if _word(toks[1]) == "AUTHORIZATION":
                raise _refuse("SET SESSION AUTHORIZATION is not allowed in a tenant session")
            # SET SESSION CHARACTERISTICS AS TRANSACTION modes
            if len(toks) < 4 or _word(toks[2]) not in ("AS", "ALIAS") and toks[2].token_type != TokenType.ALIAS:
                raise _refuse("unsupported SET SESSION CHARACTERISTICS", FEATURE_NOT_SUPPORTED)
            p = _transaction_modes(toks[3:], "SET SESSION CHARACTERISTICS")
            p.statement_class = "set"
            return p
        local = _word(toks[0]) == "LOCAL"
        i = 1
    rest = toks[i:]
    if not rest:
        raise _refuse("SET without a parameter", SYNTAX_ERROR)
    first = _word(rest[0])
    if first == "ROLE":
        raise _refuse("SET ROLE is not allowed in a tenant session")
    if first == "TRANSACTION":
        if len(rest) > 1 and _word(rest[1]) == "SNAPSHOT":
            raise _refuse("SET TRANSACTION SNAPSHOT is not supported", FEATURE_NOT_SUPPORTED)
        p = _transaction_modes(rest[1:], "SET TRANSACTION")
        p.statement_class = "set"
        return p
    if first == "CONSTRAINTS":
        _only_simple(rest, "SET CONSTRAINTS")
        return Piece(statement_class="set")
    if first == "TIME" and len(rest) > 1 and _word(rest[1]) == "ZONE":
        _check_value(rest[2:], "SET TIME ZONE")
        return Piece(statement_class="set")
    # name [. name] {TO | =} value
    j = 0
    parts = [_name(rest[0])]
    j = 1
    while j + 1 < len(rest) and rest[j].token_type == TokenType.DOT:
        parts.append(_name(rest[j + 1]))
        j += 2
    name = ".".join(parts)
    if j >= len(rest) or not (rest[j].token_type == TokenType.EQ or _word(rest[j]) == "TO"):
        if j < len(rest) and _word(rest[j]) == "FROM":
            raise _refuse("SET ... FROM CURRENT is not supported", FEATURE_NOT_SUPPORTED)
        raise _refuse(f"unsupported form of SET {name}", FEATURE_NOT_SUPPORTED)
    value = rest[j + 1 :]
    if name == TOKEN_PARAMETER:
        if len(value) != 1 or value[0].token_type != TokenType.STRING:
            raise PolicyRefusal("28000", "SET tenantgate.tenant needs the token as one plain quoted string")
        return Piece(statement_class="set", tenant_token=(value[0].text, local))
    if name.startswith("tenantgate."):
        raise _refuse(f'parameter "{name}" cannot be set by clients')
    if name not in SAFE_PARAMETERS:
        raise _refuse(f'parameter "{name}" cannot be set in a tenant session')
    _check_value(value, f"SET {name}")
    if name == "client_encoding":
        words = [(t.text if t.token_type == TokenType.STRING else (_word(t) or t.text)).lower() for t in value]
        if len(words) != 1 or not client_encoding_is_safe(words[0]):
            # PostgreSQL would read the statement text differently from the proxy (see the function)
            raise _refuse(f"client_encoding {' '.join(words)!r} is not supported through tenantgate; use UTF8",
                          FEATURE_NOT_SUPPORTED)
    piece = Piece(statement_class="set")
    if name in READ_ONLY_PARAMS:
        words = {(_word(t) or t.text).lower() for t in value}
        if words & FALSY:
            piece.read_write_request = True
        elif not words <= {"on", "true", "1", "yes", "t", "y"}:
            piece.read_write_request = True  # DEFAULT etc.: may mean read-write
    return piece


def _check_value(value: list[Token], what: str) -> None:
    if not value:
        raise _refuse(f"{what} without a value", SYNTAX_ERROR)
    ok = {TokenType.STRING, TokenType.NUMBER, TokenType.VAR, TokenType.IDENTIFIER, TokenType.COMMA,
          TokenType.DASH, TokenType.PLUS, TokenType.DEFAULT, TokenType.TRUE, TokenType.FALSE, TokenType.ON}
    for t in value:
        if t.token_type not in ok and not t.text.isalpha():
            raise _refuse(f"unsupported value in {what}: {t.text!r}", FEATURE_NOT_SUPPORTED)


def _reset(sql, start, end, toks, inner) -> Piece:
    if len(toks) == 1 and _word(toks[0]) == "ALL":
        # the client's settings only: the tenant binding is not a setting (proxy.policy.resets)
        return Piece(statement_class="set", resets_settings=True)
    if len(toks) == 2 and _word(toks[0]) == "TIME" and _word(toks[1]) == "ZONE":
        return Piece(statement_class="set")
    if len(toks) == 2 and _word(toks[0]) == "SESSION" and _word(toks[1]) == "AUTHORIZATION":
        raise _refuse("RESET SESSION AUTHORIZATION is not allowed in a tenant session")
    if len(toks) == 1 and _word(toks[0]) == "ROLE":
        raise _refuse("RESET ROLE is not allowed in a tenant session")
    parts = [_name(toks[0])] if toks else []
    j = 1
    while j + 1 < len(toks) and toks[j].token_type == TokenType.DOT:
        parts.append(_name(toks[j + 1]))
        j += 2
    if not parts or j != len(toks):
        raise _refuse("unsupported form of RESET", FEATURE_NOT_SUPPORTED)
    name = ".".join(parts)
    if name not in SAFE_PARAMETERS:
        raise _refuse(f'parameter "{name}" cannot be reset in a tenant session')
    piece = Piece(statement_class="set")
    if name in READ_ONLY_PARAMS:
        piece.read_write_request = True
    return piece


def _show(sql, start, end, toks, inner) -> Piece:
    if not toks:
        raise _refuse("SHOW without a parameter", SYNTAX_ERROR)
    for t in toks:
        if t.token_type not in (TokenType.VAR, TokenType.IDENTIFIER, TokenType.DOT) and not t.text.isalpha():
            raise _refuse("unsupported form of SHOW", FEATURE_NOT_SUPPORTED)
    name = "".join(t.text for t in toks)
    # PostgreSQL compares the name with "all" ignoring case, quoted or not: SHOW "all" is SHOW ALL
    if name.lower() == "all":
        raise _refuse("SHOW ALL is not allowed in a tenant session: it lists server paths and commands",
                      INSUFFICIENT_PRIVILEGE)
    if setting_hidden(name):
        raise _refuse(f'parameter "{name}" is not readable in a tenant session (server paths and commands are '
                      "hidden)", INSUFFICIENT_PRIVILEGE)
    return Piece(statement_class="read")


# ---- transaction control -------------------------------------------------------------------
def _begin(sql, start, end, toks, inner) -> Piece:
    return _transaction_modes(toks, "BEGIN")


def _start(sql, start, end, toks, inner) -> Piece:
    if not toks or _word(toks[0]) != "TRANSACTION":
        raise _refuse("unsupported START statement", FEATURE_NOT_SUPPORTED)
    return _transaction_modes(toks[1:], "START TRANSACTION")


def _end_tx(sql, start, end, toks, inner) -> Piece:
    _only_simple(toks, "transaction control")
    words = [_word(t) for t in toks]
    if "PREPARED" in words:
        raise _refuse("two-phase commit is not supported through tenantgate", FEATURE_NOT_SUPPORTED)
    allowed = {"WORK", "TRANSACTION", "AND", "NO", "CHAIN", "TO", "SAVEPOINT"}
    for k, t in enumerate(toks):
        w = words[k]
        if w in allowed:
            continue
        if k > 0 and words[k - 1] in ("TO", "SAVEPOINT"):
            _name(t)
            continue
        raise _refuse(f"unsupported transaction control {w or t.text!r}", FEATURE_NOT_SUPPORTED)
    return Piece(statement_class="tcl")


def _savepoint(sql, start, end, toks, inner) -> Piece:
    names = [t for t in toks if _word(t) != "SAVEPOINT"]
    if len(names) != 1:
        raise _refuse("unsupported SAVEPOINT/RELEASE form", FEATURE_NOT_SUPPORTED)
    _name(names[0])
    return Piece(statement_class="tcl")


# ---- prepared statements ----------------------------------------------------------------------
def _prepare(sql, start, end, toks, inner) -> Piece:
    if not toks:
        raise _refuse("PREPARE without a name", SYNTAX_ERROR)
    if _word(toks[0]) == "TRANSACTION":
        raise _refuse("two-phase commit is not supported through tenantgate", FEATURE_NOT_SUPPORTED)
    name = _statement_name(toks[0])
    j = 1
    if j < len(toks) and toks[j].token_type == TokenType.L_PAREN:
        depth = 0
        while j < len(toks):
            if toks[j].token_type == TokenType.L_PAREN:
                depth += 1
            elif toks[j].token_type == TokenType.R_PAREN:
                depth -= 1
                if depth == 0:
                    break
            elif toks[j].token_type == TokenType.SELECT:
                raise _refuse("unsupported PREPARE parameter types", FEATURE_NOT_SUPPORTED)
            elif toks[j].text.lower() == "void":  # PostgreSQL drops void parameters from calls
                raise _refuse(VOID_TYPE_REFUSAL, FEATURE_NOT_SUPPORTED)
            j += 1
        j += 1
    if j >= len(toks) or not (toks[j].token_type == TokenType.ALIAS or _word(toks[j]) == "AS"):
        raise _refuse("PREPARE needs AS before the statement", SYNTAX_ERROR)
    if j + 1 >= len(toks):
        raise _refuse("PREPARE without a statement", SYNTAX_ERROR)
    body = inner(sql, toks[j + 1].start, end)
    if body.statement_class not in ("read", "write"):
        raise _refuse("only SELECT, INSERT, UPDATE and DELETE can be prepared", FEATURE_NOT_SUPPORTED)
    if body.setting_params:
        raise _refuse(
            "current_setting($n) is not supported in SQL-level PREPARE: tenantgate checks the setting's name "
            "when it is bound, and EXECUTE's arguments are not checked; write the name as a string literal",
            FEATURE_NOT_SUPPORTED,
        )
    if body.param_checks:
        raise _refuse(
            "a parameter as the tenant column value is not supported in SQL-level PREPARE; "
            "omit the tenant column (tenantgate adds it) or use the extended protocol",
            FEATURE_NOT_SUPPORTED,
        )
    piece = Piece(statement_class=body.statement_class)
    piece.absorb(body)
    piece.edits = [
        Edit(e.start, e.end, tuple(TENANT_LASTING if p is TENANT else p for p in e.parts)) for e in piece.edits
    ]
    piece.prepared = (name,)
    piece.pins_session = True
    return piece


_EXECUTE_ARG_TYPES = {TokenType.STRING, TokenType.NUMBER, TokenType.NULL, TokenType.TRUE, TokenType.FALSE,
                      TokenType.COMMA, TokenType.DASH, TokenType.PLUS, TokenType.DCOLON}


def _execute(sql, start, end, toks, inner) -> Piece:
    if not toks:
        raise _refuse("EXECUTE without a name", SYNTAX_ERROR)
    name = _statement_name(toks[0])
    args = toks[1:]
    if args:
        if args[0].token_type != TokenType.L_PAREN or args[-1].token_type != TokenType.R_PAREN:
            raise _refuse("unsupported EXECUTE arguments", FEATURE_NOT_SUPPORTED)
        body = args[1:-1]
        for k, t in enumerate(body):
            if t.token_type in _EXECUTE_ARG_TYPES:
                continue
            if k > 0 and body[k - 1].token_type == TokenType.DCOLON and t.text.replace("_", "a").isalnum():
                continue  # type name after ::
            raise _refuse(
                "EXECUTE arguments must be literals (optionally cast); "
                f"found {t.text!r}", FEATURE_NOT_SUPPORTED
            )
    return Piece(statement_class="other", requires_prepared=(name,))


def _deallocate(sql, start, end, toks, inner) -> Piece:
    rest = toks[1:] if toks and _word(toks[0]) == "PREPARE" else toks
    if len(rest) != 1:
        raise _refuse("unsupported DEALLOCATE form", FEATURE_NOT_SUPPORTED)
    # on a transaction-pooled connection other clients' statements live too: the session keeps
    # (pins) the connection, which is then never lent to anybody else
    if _word(rest[0]) == "ALL":
        return Piece(statement_class="other", deallocate_all=True, pins_session=True)
    return Piece(statement_class="other", deallocated=(_statement_name(rest[0]),), pins_session=True)


# ---- EXPLAIN, cursors -----------------------------------------------------------------------
_EXPLAIN_WORDS = {"ANALYZE", "ANALYSE", "VERBOSE"}
# PostgreSQL 15's EXPLAIN options (case-insensitive identifiers, quoted or not)
_EXPLAIN_OPTIONS = frozenset({"analyze", "analyse", "verbose", "costs", "settings", "buffers", "wal", "timing",
                              "summary", "format"})
_EXPLAIN_VALUE_TYPES = {TokenType.STRING, TokenType.NUMBER, TokenType.VAR, TokenType.IDENTIFIER, TokenType.TRUE,
                        TokenType.FALSE, TokenType.ON}


def _option_name(t: Token) -> str:
    """An option name as PostgreSQL folds it: a quoted identifier exactly, a word lower-cased."""
    if t.token_type == TokenType.IDENTIFIER:
        return t.text
    if t.token_type in (TokenType.STRING, TokenType.HEREDOC_STRING) or not t.text[:1].isalpha():
        raise _refuse(f"unsupported EXPLAIN option {t.text!r}", FEATURE_NOT_SUPPORTED)
    return fold_identifier(t.text)


def _explain_options(toks: list[Token]) -> tuple[bool, int]:
    """(ANALYZE requested, index after the option list) for ``( option [value] [, ...] )``."""
    analyze = False
    j = 1
    while True:
        if j >= len(toks):
            raise _refuse("unterminated EXPLAIN option list", SYNTAX_ERROR)
        name = _option_name(toks[j])
        if name not in _EXPLAIN_OPTIONS:
            raise _refuse(f'unrecognized EXPLAIN option "{name}"', FEATURE_NOT_SUPPORTED)
        j += 1
        value = None
        if j < len(toks) and toks[j].token_type not in (TokenType.COMMA, TokenType.R_PAREN):
            v = toks[j]
            if v.token_type not in _EXPLAIN_VALUE_TYPES and not v.text[:1].isalpha():
                raise _refuse(f"unsupported value of EXPLAIN option {name}", FEATURE_NOT_SUPPORTED)
            value = v.text if v.token_type in (TokenType.STRING, TokenType.IDENTIFIER) else v.text.lower()
            j += 1
        if name in ("analyze", "analyse") and value not in ("false", "off", "0"):
            # no value, true, on, 1, and anything PostgreSQL might read as true
            analyze = True
        if j >= len(toks):
            raise _refuse("unterminated EXPLAIN option list", SYNTAX_ERROR)
        if toks[j].token_type == TokenType.R_PAREN:
            return analyze, j + 1
        if toks[j].token_type != TokenType.COMMA:
            raise _refuse("unsupported EXPLAIN option list", FEATURE_NOT_SUPPORTED)
        j += 1


def _explain(sql, start, end, toks, inner) -> Piece:
    j = 0
    analyze = False
    if toks and toks[0].token_type == TokenType.L_PAREN:
        analyze, j = _explain_options(toks)
    else:
        while j < len(toks) and _word(toks[j]) in _EXPLAIN_WORDS:
            analyze |= _word(toks[j]) in ("ANALYZE", "ANALYSE")
            j += 1
    if j >= len(toks):
        raise _refuse("EXPLAIN without a statement", SYNTAX_ERROR)
    if analyze:
        # the executed plan's counters ("Rows Removed by Filter") count the rows the tenant
        # filter removed: other tenants' rows, and with a filter on another column, whether
        # another tenant has a given value
        raise _refuse("EXPLAIN ANALYZE is not allowed in a tenant session: its row counters reveal other "
                      "tenants' rows; use EXPLAIN without ANALYZE")
    body = inner(sql, toks[j].start, end)
    if body.statement_class not in ("read", "write"):
        raise _refuse("EXPLAIN of this statement kind is not supported", FEATURE_NOT_SUPPORTED)
    piece = Piece(statement_class="read")
    piece.absorb(body)
    if analyze and body.writes:
        piece.statement_class = "write"
    else:
        piece.writes = False
    return piece


def _declare(sql, start, end, toks, inner) -> Piece:
    if not toks:
        raise _refuse("DECLARE without a name", SYNTAX_ERROR)
    _name(toks[0])
    j = 1
    allowed = {"BINARY", "ASENSITIVE", "INSENSITIVE", "NO", "SCROLL", "CURSOR", "WITH", "WITHOUT", "HOLD"}
    while j < len(toks) and toks[j].token_type != TokenType.FOR:
        if _word(toks[j]) not in allowed:
            raise _refuse(f"unsupported DECLARE option {toks[j].text!r}", FEATURE_NOT_SUPPORTED)
        j += 1
    if j + 1 >= len(toks):
        raise _refuse("DECLARE needs FOR and a query", SYNTAX_ERROR)
    body = inner(sql, toks[j + 1].start, end)
    if body.statement_class != "read" or body.writes:
        raise _refuse("DECLARE CURSOR needs a SELECT without data-modifying parts", FEATURE_NOT_SUPPORTED)
    piece = Piece(statement_class="read")
    piece.absorb(body)
    words = [_word(t) for t in toks[1:j]]
    piece.pins_session = any(w == "HOLD" and k > 0 and words[k - 1] == "WITH" for k, w in enumerate(words))
    return piece


def _fetch(sql, start, end, toks, inner) -> Piece:
    _only_simple(toks, "FETCH/MOVE")
    if not toks:
        raise _refuse("FETCH without a cursor", SYNTAX_ERROR)
    for t in toks:
        if t.token_type not in (TokenType.VAR, TokenType.IDENTIFIER, TokenType.NUMBER, TokenType.DASH, TokenType.PLUS) \
                and not t.text.isalpha():
            raise _refuse(f"unsupported FETCH/MOVE form {t.text!r}", FEATURE_NOT_SUPPORTED)
    return Piece(statement_class="read")


def _close(sql, start, end, toks, inner) -> Piece:
    if len(toks) != 1:
        raise _refuse("unsupported CLOSE form", FEATURE_NOT_SUPPORTED)
    _name(toks[0])
    return Piece(statement_class="other")


def _discard(sql, start, end, toks, inner) -> Piece:
    """DISCARD ALL | PLANS | SEQUENCES | TEMP | TEMPORARY: the client's own session state
    (proxy.policy.resets); ALL also drops every prepared statement, as DEALLOCATE ALL does."""
    words = [_word(t) for t in toks]
    if words == ["ALL"]:
        return Piece(statement_class="set", deallocate_all=True, resets_settings=True)
    if words in (["PLANS"], ["SEQUENCES"], ["TEMP"], ["TEMPORARY"]):
        return Piece(statement_class="other")
    raise _refuse("unsupported form of DISCARD (ALL, PLANS, SEQUENCES or TEMP)", SYNTAX_ERROR)


def _unlisten(sql, start, end, toks, inner) -> Piece:
    """UNLISTEN * | channel: a tenant session cannot LISTEN, so there is nothing to stop
    listening to; PostgreSQL answers it on the session's own backend (drivers' resets send it)."""
    if len(toks) != 1:
        raise _refuse("unsupported form of UNLISTEN", SYNTAX_ERROR)
    if toks[0].text != "*":
        _name(toks[0])
    return Piece(statement_class="other")


def _copy(sql, start, end, toks, inner) -> Piece:
    from proxy.policy.copy import copy_piece

    return copy_piece(sql, start, end, toks, inner)


_HANDLERS = {
    "SET": _set, "RESET": _reset, "SHOW": _show, "BEGIN": _begin, "START": _start,
    "COMMIT": _end_tx, "END": _end_tx, "ROLLBACK": _end_tx, "ABORT": _end_tx,
    "SAVEPOINT": _savepoint, "RELEASE": _savepoint,
    "PREPARE": _prepare, "EXECUTE": _execute, "DEALLOCATE": _deallocate,
    "EXPLAIN": _explain, "DECLARE": _declare, "FETCH": _fetch, "MOVE": _fetch, "CLOSE": _close,
    "DISCARD": _discard, "COPY": _copy, "UNLISTEN": _unlisten,
}
