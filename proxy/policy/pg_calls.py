"""Pass 6b: the second opinion on function calls, on PostgreSQL's own parse tree.

The function allowlist (:mod:`proxy.policy.allowlist`) judges the calls sqlglot sees.  PostgreSQL
calls functions sqlglot does not see as calls, and reads argument values sqlglot may read
differently, so every call is judged again here, on libpg_query's tree of the statement
PostgreSQL will run:

* every ``FuncCall``, by the name PostgreSQL's parser gives it (folded, with its schema), through
  :meth:`FunctionChecker.check_function`.  An unqualified name that a function outside pg_catalog
  also has (:attr:`CatalogSnapshot.user_functions`) may resolve to that function, so it must be
  declared safe even when a built-in has the same name;
* attribute notation: PostgreSQL reads ``x.name`` (a ``ColumnRef`` of two or more names) and
  ``(expr).name`` (an ``A_Indirection``) as the call ``name(x)`` when ``x`` has no column ``name``
  (``('ssl_cert_file'::text).current_setting``, ``('SELECT ...'::text).ts_stat``).  The last name
  is judged as a call unless it cannot name a refused function: it must be on the allowlist, or
  be neither a built-in (allowed or excluded) nor a function outside pg_catalog;
* the arguments the allowlist judges by value, as PostgreSQL's parser decoded them:
  ``current_setting``'s name (a string constant that is not a hidden setting, or a parameter the
  sqlglot pass also found, checked at Bind) and ``set_config``'s name (a string constant on the
  safe SET list).

Entry point: :func:`check_calls`, called by :func:`proxy.policy.pg_verify.pg_verify`.
"""

from __future__ import annotations

from proxy.policy.allowlist_rules import _refuse

#: names whose calls are judged by their arguments; as attributes they are refused outright
_JUDGED_BY_ARGUMENTS = frozenset({"current_setting", "set_config"})
#: ``$n::text`` and ``$n::varchar`` as PostgreSQL's parser names the types
_TEXT_TYPE_NAMES = (["text"], ["pg_catalog", "text"], ["varchar"], ["pg_catalog", "varchar"])


def _node(node) -> tuple[str, dict]:
    if type(node) is dict and len(node) == 1:
        for k, v in node.items():
            if type(v) is dict and k[:1].isupper():
                return k, v
    return "", {}


def _names(items) -> list[str] | None:
    """A list of String nodes -> their values; None when anything else is in it."""
    out = []
    for item in items or ():
        t, b = _node(item)
        if t != "String":
            return None
        out.append(b.get("sval", ""))
    return out


def _string_constant(node) -> str | None:
    t, b = _node(node)
    if t == "A_Const" and isinstance(b.get("sval"), dict):
        return b["sval"].get("sval", "")
    return None


def _parameter(node) -> int | None:
    """The 0-based index of ``$n``, ``$n::text`` or ``$n::varchar`` (no type modifier)."""
    t, b = _node(node)
    if t == "TypeCast":
        tn = b.get("typeName") or {}
        if _names(tn.get("names")) not in _TEXT_TYPE_NAMES or tn.get("typmods") or tn.get("arrayBounds"):
            return None
        t, b = _node(b.get("arg"))
    if t == "ParamRef" and isinstance(b.get("number"), int):
        return b["number"] - 1
    return None


#: operators PostgreSQL also uses where a statement does not write them (ORDER BY, GROUP BY,
#: DISTINCT, UNION, IN, JOIN USING, CASE x WHEN, min/max, ...)
_IMPLICIT_OPERATORS = frozenset({"=", "<>", "<", ">", "<=", ">="})
_BETWEEN_KINDS = frozenset({"AEXPR_BETWEEN", "AEXPR_NOT_BETWEEN", "AEXPR_BETWEEN_SYM", "AEXPR_NOT_BETWEEN_SYM"})


class _Calls:
    def __init__(self, checker, snapshot, setting_params: frozenset[int]):
        self.checker = checker
        self.user_functions = snapshot.user_functions
        self.sql_functions = snapshot.sql_functions
        self.setting_params = setting_params
        declared = checker.declared_safe_functions
        # what x.name may resolve to through the search path: an unqualified declaration, or one
        # in a schema of the path (a declared hid.f does not make public.f safe)
        path = set(snapshot.search_path)
        self.declared_names = frozenset(
            d.rpartition(".")[2] for d in declared if "." not in d or d.rpartition(".")[0] in path)
        # operators and casts whose function runs SQL and is not declared safe
        self.operators: dict[str, str] = {}
        self.explicit_casts: dict[str, str] = {}
        for kind, name, func, context in snapshot.hidden_calls:
            if func in declared or func.rpartition(".")[2] in declared:
                continue
            if kind == "operator":
                self.operators.setdefault(name, func)
                if name in _IMPLICIT_OPERATORS:
                    raise _hidden_call(f"the database defines the operator {name} with the function {func}, which "
                                       "PostgreSQL may call where a statement only sorts, groups or compares", func)
            elif kind == "opclass":
                raise _hidden_call(f"the database defines the operator family {name} with the function {func}, "
                                   "which PostgreSQL may call where a statement only sorts, groups or compares", func)
            elif context in ("i", "a"):
                raise _hidden_call(f"the database defines an implicit cast to {name} with the function {func}, which "
                                   "PostgreSQL may call where a statement writes no cast", func)
            else:
                self.explicit_casts.setdefault(name, func)
        self.param_uses: dict[int, int] = {}  # $n -> how often the statement uses it
        self.setting_names: set[int] = set()  # parameters that name a setting

    def call(self, body: dict) -> None:
        names = _names(body.get("funcname"))
        if not names or len(names) > 2:
            raise _refuse("a function call with a name tenantgate does not understand")
        schema, name = (names[0], names[1]) if len(names) == 2 else (None, names[0])
        if name in self.explicit_casts and len(body.get("args") or ()) == 1:  # int4(x): a cast
            raise _hidden_call(f"{name}(...) may be the cast to {name} with the function {self.explicit_casts[name]}",
                               self.explicit_casts[name])
        if schema is None and name in self.sql_functions and name not in self.checker.declared_safe_functions:
            raise _refuse(
                f"function {name} is not allowed: a function of that name exists in a schema of the search path, "
                "PostgreSQL may call it instead of a built-in, and user-defined functions run SQL unrewritten",
                hint=f"declare it safe in the rules (safe_functions: [{name}]), or call pg_catalog.{name}(...)",
            )
        self.checker.check_function(schema, name, judge_arguments=False)
        if name not in _JUDGED_BY_ARGUMENTS:
            return
        args = body.get("args") or []
        if body.get("func_variadic") or body.get("agg_star") or not args:
            raise _refuse(f"this form of {name}() is not allowed")
        if name == "set_config":
            self.checker.check_set_config_name(_string_constant(args[0]))
            return
        index = _parameter(args[0])
        if index is None:
            self.checker.check_setting_read(_string_constant(args[0]))
        elif index not in self.setting_params:  # the sqlglot pass did not see it: no Bind check
            raise _refuse("current_setting() with this parameter is not allowed: tenantgate and PostgreSQL "
                          "read the statement differently")
        else:
            self.setting_names.add(index)

    def attribute(self, name: str) -> None:
        if name in _JUDGED_BY_ARGUMENTS:
            raise _refuse(f".{name} is a call of {name}() in PostgreSQL's attribute notation, which tenantgate "
                          "does not allow", hint=f"call {name}('...') with the setting's name as a string literal")
        if name in self.user_functions and name not in self.declared_names:
            raise _refuse(f".{name} may be a call of the user-defined function {name}() in PostgreSQL's attribute "
                          "notation, and it is not declared safe in the rules",
                          hint="declare the function safe, or rename the column or field")
        if self.checker.function_allowed(name):
            return
        group = self.checker.allowlist.exclusion(name)
        if group is not None:  # every built-in is either allowed or excluded (rules/generate_functions.py)
            raise _refuse(f".{name} may be a call of {name}() in PostgreSQL's attribute notation, and {name} is "
                          f"not allowed: {group.reason}", hint="name the column or field differently")

    def operator(self, body: dict) -> None:
        if not self.operators:
            return
        names = _names(body.get("name")) or [""]
        if body.get("kind") in _BETWEEN_KINDS:
            symbols = ["<", ">", "<=", ">="]
        elif len(names) == 2 and names[0] == "pg_catalog":
            return  # OPERATOR(pg_catalog.op): the built-in
        else:
            symbols = names[-1:]
        for symbol in symbols:
            func = self.operators.get(symbol)
            if func is not None:
                raise _hidden_call(f"the operator {symbol} may be the one the database defines with the function "
                                   f"{func}", func)

    def cast(self, body: dict) -> None:
        if not self.explicit_casts:
            return
        names = _names((body.get("typeName") or {}).get("names")) or [""]
        func = self.explicit_casts.get(names[-1])
        t, b = _node(body.get("arg"))
        if func is not None and not (t == "A_Const" and "sval" in b):  # a string constant's cast is its type's input
            raise _hidden_call(f"the cast to {names[-1]} may be the one the database defines with the function {func}",
                               func)

    def walk(self, node) -> None:
        stack = [node]
        while stack:
            item = stack.pop()
            if type(item) is list:
                stack.extend(item)
                continue
            if type(item) is not dict:
                continue
            for key, body in item.items():
                if key == "FuncCall":
                    self.call(body)
                elif key == "ColumnRef":
                    fields = body.get("fields") or []
                    if len(fields) >= 2:
                        last = _names(fields[-1:])
                        if last:
                            self.attribute(last[0])
                elif key == "A_Expr":
                    self.operator(body)
                elif key == "SubLink" and body.get("operName"):  # x op ANY / ALL (subquery)
                    self.operator({"name": body["operName"]})
                elif key == "TypeCast":
                    self.cast(body)
                elif key == "ParamRef" and isinstance(body.get("number"), int):
                    self.param_uses[body["number"] - 1] = self.param_uses.get(body["number"] - 1, 0) + 1
                elif key == "A_Indirection":
                    for item2 in body.get("indirection") or ():
                        t, b = _node(item2)
                        if t == "String":
                            self.attribute(b.get("sval", ""))
                if type(body) in (dict, list):
                    stack.append(body)


def _hidden_call(what: str, func: str):
    return _refuse(f"{what}: user-defined functions run SQL unrewritten, and {func} is not declared safe",
                   hint=f"declare {func} safe in the rules (safe_functions), or drop the operator or cast")


def check_calls(stmt, checker, snapshot, setting_params: frozenset[int]) -> None:
    """Judge every function call PostgreSQL will make in ``stmt`` (libpg_query's JSON tree of one
    statement) against the function allowlist and ``snapshot``'s user-defined functions, operators
    and casts; raises PolicyRefusal (42501) like the allowlist."""
    calls = _Calls(checker, snapshot, setting_params)
    calls.walk(stmt)
    for index in calls.setting_names:
        # used elsewhere too, $n may get another type there (bytea: '\x73...'::bytea), and the
        # text PostgreSQL then makes of it is not the bound value the Bind check reads
        if calls.param_uses.get(index, 0) != 1:
            raise _refuse(f"current_setting(${index + 1}) is allowed only when ${index + 1} is used nowhere else "
                          "in the statement: tenantgate checks the bound value as the setting's name",
                          hint="pass the setting's name as a parameter of its own")
