"""Parameters declared ``void`` in a function call's arguments, which PostgreSQL drops.

PostgreSQL's parse analysis (``ParseFuncOrColumn`` in parse_func.c) removes every argument of a
function call that is a bare parameter of type ``void``: a hack for pgjdbc, whose
``CallableStatement`` sends ``{? = call upper(?)}`` as ``select * from upper($1,$2) as result``
with ``$1`` (the OUT parameter) declared ``void`` in the Parse message.  PostgreSQL runs
``upper($2)``; a parser that does not know the rule sees a call with one argument too many
(sqlglot refuses ``upper`` with two arguments).

:func:`drop_void_arguments` makes that step explicit before the policy sees the statement: it
removes those arguments from the text, so the policy checks and rewrites exactly what PostgreSQL
will run.  The parameters keep their numbers and their declared types (the Parse message is sent
with the client's type list), so Describe and Bind are unchanged.

The same rule, as PostgreSQL applies it: only a bare ``$n`` (parenthesised or not) that is a
positional argument of a function call (not a named argument ``a => $n``, not inside an
expression, not in an aggregate with WITHIN GROUP).  Which calls those are is read from
libpg_query's parse tree; the removal is checked by parsing the result again and requiring the
tree of the original statement minus those arguments (locations aside).  Anything else (the
SQL-syntax forms such as ``substring($1 from $2)``, an unparsable text) is refused: fail closed.
"""

from __future__ import annotations

import json

from pglast import parser as _pg

from proxy.policy.errors import FEATURE_NOT_SUPPORTED, PolicyRefusal

#: the OID of type void (pg_type)
VOID_OID = 2278
_COMMENTS = frozenset({"C_COMMENT", "SQL_COMMENT"})
#: statements PostgreSQL analyses with the Parse message's parameter types (where it drops them)
_ANALYSED = frozenset({"SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})


def _refusal(why: str) -> PolicyRefusal:
    return PolicyRefusal(
        FEATURE_NOT_SUPPORTED, f"a parameter declared void is used where tenantgate cannot drop it: {why}",
        hint="declare the parameter with another type (or leave it unspecified), or, for a pgjdbc "
             "CallableStatement, call the function with a PreparedStatement: SELECT f(?)")


def _void_args(node, void: frozenset[int], found: list[tuple[int, dict]]) -> None:
    """Collect (byte location, FuncCall body) of the void parameters PostgreSQL drops."""
    if type(node) is dict:
        call = node.get("FuncCall")
        if type(call) is dict:
            for arg in call.get("args") or ():
                ref = arg.get("ParamRef") if type(arg) is dict else None
                if ref is not None and ref.get("number") in void and not call.get("agg_within_group"):
                    if call.get("funcformat") != "COERCE_EXPLICIT_CALL":
                        raise _refusal("a function called with SQL syntax")
                    found.append((ref["location"], call))
        for value in node.values():
            _void_args(value, void, found)
    elif type(node) is list:
        for value in node:
            _void_args(value, void, found)


def _strip(node, void: frozenset[int]):
    """The tree without locations and without the void arguments PostgreSQL drops."""
    if type(node) is dict:
        out = {}
        for key, value in node.items():
            if key == "location":
                continue
            if key == "FuncCall" and type(value) is dict and not value.get("agg_within_group"):
                value = dict(value)
                value["args"] = [a for a in value.get("args") or ()
                                 if not (type(a) is dict and "ParamRef" in a and a["ParamRef"].get("number") in void)]
                if not value["args"]:
                    del value["args"]
            out[key] = _strip(value, void)
        return out
    if type(node) is list:
        return [_strip(v, void) for v in node]
    return node


def _is(tok, char: str) -> bool:
    return tok.name == f"ASCII_{ord(char)}"


def _without(sql: str, location: int) -> str:
    """``sql`` without the function argument whose parameter starts at byte ``location``, and one
    comma next to it (the one after it, else the one before it)."""
    start = len(sql.encode()[:location].decode())  # libpg_query: byte offsets; scan: characters
    tokens = [tok for tok in _pg.scan(sql) if tok.name not in _COMMENTS]
    at = next((k for k, tok in enumerate(tokens) if tok.start == start and tok.name == "PARAM"), None)
    if at is None:
        raise _refusal("its place in the text was not found")
    lo = hi = at
    # grouping parentheses around the parameter (a "(" right after "(" or ","; the call's own
    # "(" follows the function's name)
    while (lo >= 2 and hi + 1 < len(tokens) and _is(tokens[lo - 1], "(") and _is(tokens[hi + 1], ")")
           and (_is(tokens[lo - 2], "(") or _is(tokens[lo - 2], ","))):
        lo, hi = lo - 1, hi + 1
    if hi + 2 < len(tokens) and _is(tokens[hi + 1], ","):  # "$1, x": up to the next argument
        a, b = tokens[lo].start, tokens[hi + 2].start
    elif lo >= 1 and _is(tokens[lo - 1], ","):  # "x, $1": from the comma before it
        a, b = tokens[lo - 1].start, tokens[hi].end + 1
    else:  # the only argument
        a, b = tokens[lo].start, tokens[hi].end + 1
    return sql[:a] + sql[b:]


#: bounds of the work done on the event loop (pgjdbc sends one void parameter per OUT
#: parameter of a short call): longer statements or more void arguments are refused
MAX_SQL_CHARS = 8192
MAX_VOID_ARGUMENTS = 16


def drop_void_arguments(sql: str, param_types) -> str:
    """:func:`_drop_void_arguments`, bounded, and failing closed with 0A000 on anything unexpected."""
    if VOID_OID not in param_types:
        return sql
    if len(sql) > MAX_SQL_CHARS:
        raise _refusal(f"the statement is longer than {MAX_SQL_CHARS} characters")
    try:
        return _drop_void_arguments(sql, param_types)
    except PolicyRefusal:
        raise
    except Exception as e:  # noqa: BLE001 - RecursionError, a reparse that fails, ...: refuse
        raise _refusal(f"the statement could not be analysed ({type(e).__name__})") from None


def _drop_void_arguments(sql: str, param_types) -> str:
    """``sql`` as PostgreSQL will analyse it given the Parse message's ``param_types``: the
    void-declared parameters that are positional arguments of function calls removed.  Returns
    ``sql`` itself when there are none; raises :class:`PolicyRefusal` (0A000) when they cannot be
    removed exactly."""
    void = frozenset(i + 1 for i, oid in enumerate(param_types) if oid == VOID_OID)
    if not void:
        return sql
    try:
        tree = json.loads(_pg.parse_sql_json(sql))
    except _pg.ParseError:
        return sql  # PostgreSQL refuses it as well: the policy reports the syntax error
    found: list[tuple[int, dict]] = []
    _void_args(tree, void, found)
    if not found:
        return sql
    if len(found) > MAX_VOID_ARGUMENTS:
        raise _refusal(f"more than {MAX_VOID_ARGUMENTS} void arguments")
    if next(iter(tree["stmts"][0]["stmt"]), None) not in _ANALYSED or len(tree["stmts"]) != 1:
        raise _refusal("only in SELECT, INSERT, UPDATE, DELETE and MERGE")
    reduced = sql
    for _ in range(len(found)):  # one argument at a time, each with its own comma
        reduced = _without(reduced, found[0][0])
        found = []
        _void_args(json.loads(_pg.parse_sql_json(reduced)), void, found)
        if not found:
            break
    else:
        raise _refusal("its place in the text was not found")
    try:
        again = json.loads(_pg.parse_sql_json(reduced))
    except _pg.ParseError:
        raise _refusal("the statement without it does not parse") from None
    if _strip(again, frozenset()) != _strip(tree, void):
        raise _refusal("the statement without it is not the same statement")
    return reduced
