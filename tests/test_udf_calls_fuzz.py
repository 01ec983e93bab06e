"""Fuzz: no statement a tenant sends through tenantgate makes PostgreSQL call a user-defined
function that the rules do not declare safe (they run SQL unrewritten).

The oracle is PostgreSQL itself: every user-defined function in this database raises
``tgu called`` (SQLSTATE P0001) when it runs, so a statement that reaches one fails with that
error, whatever syntactic path led there.  Statements are built from call forms
(functional, attribute notation ``x.f`` / ``(expr).f``, schema-qualified, quoted, a user function
named like a built-in, table functions, user-defined operators and casts) in many positions
(target list, WHERE, ORDER BY, subqueries, CTEs, LATERAL, aggregates, FILTER, window, CASE,
UPDATE/DELETE conditions).  Run directly as the superuser, most of them do call the function
(checked, so the generator cannot silently stop reaching them); through tenantgate, none may.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from support.demo import start_demo, stop_demo

SEED = int(os.environ.get("TENANTGATE_FUZZ_SEED", "20261205"))
CASES = int(os.environ.get("TENANTGATE_UDF_FUZZ_CASES", "400"))

_RAISE = "BEGIN RAISE EXCEPTION 'tgu called'; END"
SETUP = f"""
CREATE FUNCTION public.tgu_row(customers) RETURNS text LANGUAGE plpgsql AS $${_RAISE}$$;
CREATE FUNCTION public.tgu_text(text) RETURNS text LANGUAGE plpgsql AS $${_RAISE}$$;
CREATE FUNCTION public.tgu_int(integer) RETURNS integer LANGUAGE plpgsql AS $${_RAISE}$$;
CREATE FUNCTION public.tgu_set(integer) RETURNS SETOF integer LANGUAGE plpgsql AS $${_RAISE}$$;
CREATE FUNCTION public.lower(customers) RETURNS text LANGUAGE plpgsql AS $${_RAISE}$$;
CREATE FUNCTION public.length(orders) RETURNS integer LANGUAGE plpgsql AS $${_RAISE}$$;
CREATE FUNCTION public.tgu_op(text, text) RETURNS boolean LANGUAGE plpgsql AS $${_RAISE}$$;
CREATE FUNCTION public.tgu_plus(customers, integer) RETURNS integer LANGUAGE plpgsql AS $${_RAISE}$$;
CREATE FUNCTION public.tgu_cast(customers) RETURNS integer LANGUAGE plpgsql AS $${_RAISE}$$;
CREATE OPERATOR public.### (LEFTARG = text, RIGHTARG = text, FUNCTION = public.tgu_op);
CREATE OPERATOR public.+ (LEFTARG = customers, RIGHTARG = integer, FUNCTION = public.tgu_plus);
CREATE CAST (customers AS integer) WITH FUNCTION public.tgu_cast(customers);
CREATE FUNCTION public.tgu_sfunc(bigint, text) RETURNS bigint LANGUAGE plpgsql AS $${_RAISE}$$;
CREATE AGGREGATE public.count(text) (SFUNC = public.tgu_sfunc, STYPE = bigint, INITCOND = '0');
CREATE OPERATOR public.@> (LEFTARG = text, RIGHTARG = text, FUNCTION = public.tgu_op);
CREATE TYPE public.tgu_t AS (x integer);
CREATE FUNCTION public.tgu_mk(integer) RETURNS public.tgu_t LANGUAGE plpgsql AS $${_RAISE}$$;
CREATE CAST (integer AS public.tgu_t) WITH FUNCTION public.tgu_mk(integer);
CREATE DOMAIN public.tgu_td AS public.tgu_t;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO PUBLIC;
"""

#: (call, the FROM it needs)
CALLS = [
    ("tgu_row(c)", "customers c"), ("c.tgu_row", "customers c"), ("(c).tgu_row", "customers c"),
    ("customers.tgu_row", "customers"), ("public.tgu_row(c)", "customers c"), ('"tgu_row"(c)', "customers c"),
    ("tgu_text(c.name)", "customers c"), ("(c.name).tgu_text", "customers c"), ("(name).tgu_text", "customers"),
    ("('x'::text).tgu_text", "customers c"), ("tgu_int(c.customer_id)", "customers c"),
    ("(c.customer_id).tgu_int", "customers c"), ("(c.customer_id + 1).tgu_int", "customers c"),
    ("lower(c)", "customers c"), ("c.lower", "customers c"), ("(c).lower", "customers c"),
    ("length(o)", "orders o"), ("o.length", "orders o"), ("(o).length", "orders o"),
    ("(c.name ### 'x')::text", "customers c"), ("(c + 1)::text", "customers c"), ("(c::integer)::text", "customers c"),
    ("(CAST(c AS integer))::text", "customers c"), ("(c.name OPERATOR(public.###) 'x')::text", "customers c"),
    ("(SELECT s FROM tgu_set(1) s LIMIT 1)::text", "customers c"),
    ("(SELECT count(c2.name) FROM customers c2)::text", "customers c"),  # an aggregate shadowing count
    ("('x' @> ANY (SELECT name FROM customers))::text", "customers c"),
    ("('x' @> ALL (SELECT name FROM customers))::text", "customers c"),
    ("(5::tgu_t)::text", "customers c"), ("(c.customer_id::tgu_t)::text", "customers c"),
    ("(c.customer_id::tgu_td)::text", "customers c"), ("(CAST(7 AS tgu_td))::text", "customers c"),
    ("(SELECT s FROM ROWS FROM (tgu_set(1)) AS r(s) LIMIT 1)::text", "customers c"),
]

#: statement shapes; {call} is a text-valued (or castable) expression, {from} its FROM
SHAPES = [
    "SELECT {call} FROM {from}",
    "SELECT 1 FROM {from} WHERE ({call}) IS NOT NULL",
    "SELECT 1 FROM {from} ORDER BY ({call})",
    "SELECT (SELECT {call} FROM {from} LIMIT 1)",
    "WITH w AS (SELECT {call} AS v FROM {from}) SELECT v FROM w",
    "SELECT count(({call})) FROM {from}",
    "SELECT count(*) FILTER (WHERE ({call}) IS NULL) FROM {from}",
    "SELECT row_number() OVER (ORDER BY ({call})) FROM {from}",
    "SELECT CASE WHEN true THEN ({call})::text END FROM {from}",
    "SELECT COALESCE(({call})::text, 'x') FROM {from}",
    "SELECT 1 FROM {from} WHERE ({call})::text IN ('a', 'b')",
    "SELECT x.v FROM (SELECT {call} AS v FROM {from}) AS x",
    "SELECT 1 FROM {from} WHERE EXISTS (SELECT ({call}))",
    "SELECT 1 FROM {from} GROUP BY ({call})",
    "SELECT array_agg(({call})::text) FROM {from}",
]
#: writes that call the function per row and change nothing (the condition is false)
WRITES = [
    "UPDATE customers AS c SET name = c.name WHERE ({call})::text = 'never'",
    "DELETE FROM customers AS c WHERE ({call})::text = 'never'",
]


def _cases():
    for i in range(CASES):
        rnd = random.Random(f"{SEED}/udf/{i}")
        call, frm = rnd.choice(CALLS)
        if frm == "customers c" and rnd.random() < 0.15:
            yield i, rnd.choice(WRITES).format(call=call)
        else:
            yield i, rnd.choice(SHAPES).format(call=call, **{"from": frm})


@pytest.fixture(scope="module")
def udf_demo():
    base = Path(tempfile.mkdtemp(prefix="tenantgate-udf-"))
    os.chmod(base, 0o755)
    d = start_demo(base, "--metrics-port", "off")
    with psycopg.connect(d.admin, autocommit=True) as admin:
        admin.execute(SETUP)
    _wait_until_known(d)
    yield d
    stop_demo(d)


def _wait_until_known(demo) -> None:
    """The DDL event trigger's catalog refresh has seen the functions: the attribute form of one is
    refused with tenantgate's message (so refusals below are tenantgate's, not an accident)."""
    deadline = time.monotonic() + 20
    while True:
        with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
            try:
                conn.execute("SELECT c.tgu_row FROM customers c")
                message = "ran"
            except psycopg.Error as e:
                message = str(e)
        if "attribute notation" in message or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "attribute notation" in message and "not declared safe" in message, message


def _called(conn, sql) -> bool | None:
    """True: PostgreSQL ran a tgu function; False: it ran the statement without one; None: an error
    before that (a refusal, or PostgreSQL's own error)."""
    try:
        cur = conn.execute(sql)
        if cur.description is not None:  # rows: read them all (the function may run per row)
            cur.fetchall()
        return False
    except psycopg.Error as e:
        if "tgu called" in str(e):
            return True
        return None


def test_no_statement_through_tenantgate_calls_an_undeclared_user_function(udf_demo):
    cases = list(_cases())
    reached = 0
    with psycopg.connect(udf_demo.admin, autocommit=True) as admin:
        for _i, sql in cases:
            reached += bool(_called(admin, sql))
    # the generator reaches the functions: most statements call one when PostgreSQL runs them
    assert reached > CASES * 0.6, reached
    leaks = []
    with psycopg.connect(udf_demo.app("acme"), autocommit=True) as conn:
        for i, sql in cases:
            outcome = _called(conn, sql)
            if outcome:
                leaks.append((i, sql))
    assert not leaks, f"seed {SEED}: {len(leaks)} statements called a user function: {leaks[:5]}"
