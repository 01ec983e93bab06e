"""Parameters declared ``void`` in function-call arguments (proxy/policy/void_params.py).

PostgreSQL drops a bare ``$n`` declared void from a function call's arguments (pgjdbc's
``CallableStatement`` relies on it: ``{? = call upper(?)}`` is sent as
``select * from upper($1,$2) as result`` with ``$1`` void).  tenantgate must see the statement
PostgreSQL runs: neither refuse what PostgreSQL runs nor check a different statement.

* the removal itself, case by case, including what PostgreSQL keeps (named arguments, WITHIN
  GROUP, a parameter inside an expression) and what tenantgate refuses (SQL-syntax calls);
* a differential over generated calls: the same Parse/Bind/Execute with void parameters at
  random argument positions, straight to PostgreSQL and through tenantgate, gives the same rows
  and Describe, or the same SQLSTATE (a call with an argument too many: 42883 from PostgreSQL,
  0A000 from tenantgate's parser, which checks the arity of built-ins);
* a void parameter cannot smuggle anything past the tenant filter: a tenant table read through
  such a statement shows only the session's tenant.
"""

from __future__ import annotations

import random

import pytest

from proxy.policy.errors import PolicyRefusal
from proxy.policy.void_params import VOID_OID, drop_void_arguments
from proxy.wire import messages as m
from support.e2e import RawClient, data_rows, errors

V, T, I = VOID_OID, 25, 23  # void, text, int4


@pytest.mark.parametrize(("sql", "types", "expected"), [
    ("select * from upper($1,$2) as result", (V, T), "select * from upper($2) as result"),
    ("select * from upper($2,$1) as result", (V, T), "select * from upper($2) as result"),
    ("select upper(($1), $2)", (V, T), "select upper($2)"),
    ("select upper( /* out */ (($1)) ,\n $2)", (V, T), "select upper( /* out */ $2)"),
    ("select upper($2,$1,$3)", (V, T, V), "select upper($2)"),
    ("select upper(($3), $1, $2)", (V, V, T), "select upper(($3))"),
    ("select concat($1, $2)", (V, V), "select concat()"),
    ("select concat($1, $2, $3)", (T, V, T), "select concat($1, $3)"),
    ("select f($1)", (V,), "select f()"),
    ("select lower(upper($1, $2), $3)", (V, T, V), "select lower(upper($2))"),
    ("select $1, upper($1, $2)", (V, T), "select $1, upper($2)"),  # only the function argument goes
    ("select 'é', upper($1,$2)", (V, T), "select 'é', upper($2)"),  # byte vs character offsets
    ("select upper($2)", (V, T), "select upper($2)"),  # declared but unused: nothing to drop
    ("select upper($1, $2)", (T, T), "select upper($1, $2)"),  # no void: untouched
    ("select f(a => $1, $2)", (V, T), "select f(a => $1, $2)"),  # named: PostgreSQL keeps it
    ("select f($1 || 'x', $2)", (V, T), "select f($1 || 'x', $2)"),  # an expression: kept
    ("select f($1::text, $2)", (V, T), "select f($1::text, $2)"),  # a cast: kept
    ("select percentile_cont($1) within group (order by 1)", (V,),
     "select percentile_cont($1) within group (order by 1)"),  # WITHIN GROUP: kept
    ("select upper($1,", (V,), "select upper($1,"),  # does not parse: left to the policy's error
])
def test_the_statement_postgresql_analyses(sql, types, expected):
    assert drop_void_arguments(sql, types) == expected


@pytest.mark.parametrize("sql", [
    "select substring($1 from $2)",  # SQL-syntax call (a FuncCall PostgreSQL also drops it from)
    "select position($1 in 'abc')",
    "select concat('a', VARIADIC $1)",  # the reduced text does not parse: 0A000, not an internal error
    "PREPARE pp(text) AS SELECT concat($1, 'x')",  # not analysed with the Parse's types
    "COPY (SELECT concat($1, 'x')) TO STDOUT",
    "select concat(" + ", ".join(["$1"] * 17) + ")",  # bounded work on the event loop
    "select " + "lower(" * 400 + "upper($1, $2)" + ")" * 400,  # deep nesting
    "select concat($1, $2) /* " + "x" * 9000 + " */",  # long statement
])
def test_what_cannot_be_removed_exactly_is_refused(sql):
    with pytest.raises(PolicyRefusal) as e:
        drop_void_arguments(sql, (V, T))
    assert e.value.sqlstate == "0A000"
    assert "void" in e.value.message and e.value.hint


# ---------------------------------------------------------------- differential against PostgreSQL

FUNCTIONS = [("upper", ["t"]), ("lower", ["t"]), ("length", ["t"]), ("concat", ["t", "t", "t"]),
             ("left", ["t", "i"]), ("repeat", ["t", "i"]), ("lpad", ["t", "i", "t"]), ("md5", ["t"])]


def _case(rng: random.Random) -> tuple[str, tuple[int, ...], tuple[bytes | None, ...]]:
    """A call with its real arguments as parameters and void parameters at random positions."""
    name, kinds = rng.choice(FUNCTIONS)
    args: list[tuple[str, int, bytes | None]] = []  # (kind, declared type, value)
    for kind in kinds:
        if kind == "t":
            args.append(("arg", rng.choice([T, 0]), rng.choice([b"abc", b"X y", "é".encode()])))
        else:
            args.append(("arg", rng.choice([I, 0]), str(rng.randint(0, 4)).encode()))
    for _ in range(rng.randint(0 if len(args) > 1 else 1, 2)):
        args.insert(rng.randint(0, len(args)), ("void", V, None))
    if rng.random() < 0.2:  # one argument too many, void or not: both sides refuse it alike
        args.append(("arg", T, b"extra"))
    order = list(range(len(args)))
    rng.shuffle(order)  # parameter numbers in any order of appearance
    texts = []
    types: list[int] = [0] * len(args)
    values: list[bytes | None] = [None] * len(args)
    for pos, (_, typ, value) in enumerate(args):
        n = order[pos]
        types[n], values[n] = typ, value
        text = f"${n + 1}"
        if rng.random() < 0.3:
            text = f"({text})"
        if rng.random() < 0.2:
            text = f"/* c */ {text}"
        texts.append(text)
    sep = rng.choice([",", ", ", " ,\n "])
    sql = rng.choice(["SELECT {}", "SELECT * FROM {} AS result", "SELECT {} AS r"]).format(
        f"{name}({sep.join(texts)})")
    return sql, tuple(types), tuple(values)


def _run(client: RawClient, sql: str, types, values):
    client.send(m.encode_parse("", sql, types), m.encode_bind("", "", values), m.encode_describe(b"S", ""),
                m.encode_execute(), m.frame(b"S"))
    msgs = client.until_ready()
    errs = errors(msgs)
    if errs:
        return ("error", errs[0].sqlstate)
    described = [p for t, p in msgs if t == b"t"]
    return ("rows", data_rows(msgs), described)


def test_generated_calls_answer_as_postgresql_does(demo):
    rng = random.Random(20261205)
    direct, proxied = RawClient(demo.admin), RawClient(demo.app("acme"))
    try:
        mismatches = []
        for i in range(300):
            sql, types, values = _case(rng)
            want, got = _run(direct, sql, types, values), _run(proxied, sql, types, values)
            if want[0] == "error" and got[0] == "error" and (want[1], got[1]) == ("42883", "0A000"):
                # a call with an argument too many: PostgreSQL finds no such function, tenantgate's
                # parser already refuses the arity (with or without void parameters)
                continue
            if want != got:
                mismatches.append(f"case {i}: {sql} types={types} values={values}: direct {want}, tenantgate {got}")
        assert mismatches == [], "\n".join(mismatches[:10])
    finally:
        direct.close()
        proxied.close()


def test_a_void_parameter_does_not_widen_a_tenant_read(demo):
    client = RawClient(demo.app("acme"))
    try:
        sql = "SELECT DISTINCT tenant_id FROM customers WHERE concat($1, name) IS NOT NULL"
        assert _run(client, sql, (V,), (None,))[:2] == ("rows", [[b"acme"]])
        sql = "SELECT DISTINCT c.tenant_id FROM upper($1, $2) AS r, customers c WHERE c.name <> r"
        assert _run(client, sql, (V, T), (None, b"nobody"))[:2] == ("rows", [[b"acme"]])
    finally:
        client.close()


@pytest.mark.parametrize(("sql", "types"), [
    ("SELECT concat($1::void, tenant_id) FROM customers", ()),  # cast: dropped whatever is declared
    ("SELECT concat(CAST($1 AS pg_catalog.void), 'x')", (T,)),
    ("SELECT $1::void, concat($1, 'x')", (0,)),  # void inferred from elsewhere in the statement
    ("SELECT concat($1::\"void\", 'x')", ()),
    ("PREPARE pv(void, text) AS SELECT concat($1, $2)", ()),  # SQL-level PREPARE's type list
])
def test_void_types_written_in_the_statement_are_refused(demo, sql, types):
    """Only a void declared in the Parse message is removed exactly; a void the statement names
    itself would make PostgreSQL run a call other than the one checked: refused (0A000)."""
    client = RawClient(demo.app("acme"))
    try:
        assert _run(client, sql, types, (None,) * len(types)) == ("error", "0A000")
        client.send(m.encode_query(sql.replace("$1", "NULL")))
        assert [e.sqlstate for e in errors(client.until_ready())] == ["0A000"]
    finally:
        client.close()
