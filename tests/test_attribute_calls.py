"""Function calls sqlglot does not see as calls (proxy/policy/pg_calls.py).

PostgreSQL reads ``(expr).name`` and ``x.name`` as the call ``name(expr)`` / ``name(x)`` when there
is no column ``name`` (attribute notation), and an unqualified name that a user-defined function
also has may call that function instead of the built-in.  Before pg_calls.py, the function
allowlist judged only sqlglot's calls: ``('SELECT ...'::text).ts_stat`` ran SQL given as text
through tenantgate, and only the database role's privileges and the RLS backstop stood in the way.
Every call is now judged again on PostgreSQL's own parse tree.
"""

from __future__ import annotations

import psycopg
import pytest

from proxy.catalog_sync import CatalogManager
from proxy.policy.allowlist import FunctionChecker
from proxy.policy.catalog import CatalogSnapshot
from proxy.policy.context import PolicyContext
from proxy.policy.engine import PolicyEngine
from proxy.seam import Forward, Refuse
from tests.support.demo_policy import DEMO_ROWS, demo_rules

ACME = PolicyContext(tenant="acme")

#: excluded built-ins callable with one argument, and a value of that argument's type
ONE_ARGUMENT_EXCLUDED = """
SELECT DISTINCT ON (p.proname) p.proname, format_type(p.proargtypes[0], NULL) AS argtype, p.proisstrict
FROM pg_proc p JOIN pg_type t ON t.oid = p.proargtypes[0]
WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.pronargs = 1 AND p.prokind = 'f'
  AND t.typtype IN ('b', 'c', 'd', 'e', 'r', 'm') AND t.typname NOT IN ('internal', 'cstring')
  AND p.proretset = false
ORDER BY p.proname, p.oid
"""


def _engine(user_functions=(), safe_functions=(), sql_functions=None, hidden_calls=()) -> PolicyEngine:
    rules = demo_rules()
    snap = CatalogSnapshot.build(rules, DEMO_ROWS, user_functions=user_functions, sql_functions=sql_functions,
                                 hidden_calls=hidden_calls)
    checker = FunctionChecker.default(declared_safe_functions=safe_functions)
    return PolicyEngine(rules, CatalogManager.from_snapshot(snap), checker)


def _refused(engine, sql) -> Refuse:
    d = engine.check(sql, ACME)
    assert isinstance(d, Refuse), (sql, d)
    assert d.sqlstate == "42501", (sql, d)
    return d


def _forwarded(engine, sql) -> str:
    d = engine.check(sql, ACME)
    assert isinstance(d, Forward), (sql, d)
    return d.sql


# -- through tenantgate --------------------------------------------------------------------


def test_excluded_builtins_in_attribute_notation_are_refused(demo):
    """The class: every excluded built-in that takes one argument, called as ``(value).name``."""
    with psycopg.connect(demo.admin) as admin:
        functions = admin.execute(ONE_ARGUMENT_EXCLUDED).fetchall()
        checker = FunctionChecker.default()
        functions = [f for f in functions if not checker.function_allowed(f[0])]
        assert len(functions) > 100
        # PostgreSQL really calls them: strict functions with a NULL argument return NULL
        # (nothing runs), in a transaction rolled back
        called = 0
        for name, argtype, strict in functions:
            if strict:
                with admin.transaction(force_rollback=True):
                    called += admin.execute(f'SELECT (NULL::{argtype})."{name}"').fetchone() == (None,)
        assert called > 100, called
    wrong = []
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        for name, argtype, _strict in functions:
            for sql in (f'SELECT (NULL::{argtype})."{name}"',
                        f'SELECT (v.x)."{name}" FROM (VALUES (NULL::{argtype})) AS v(x)'):
                try:
                    conn.execute(sql)
                    wrong.append((sql, "ran"))
                except psycopg.Error as e:
                    if e.sqlstate != "42501" or "attribute notation" not in str(e):
                        wrong.append((sql, e.sqlstate, str(e).splitlines()[0]))
    assert not wrong, wrong[:5]


@pytest.mark.parametrize("sql", [
    "SELECT ('SELECT to_tsvector(name) FROM customers'::text).ts_stat",  # SQL as text, unrewritten
    "SELECT ('ssl_cert_file'::text).current_setting",
    "SELECT (v.x).current_setting FROM (VALUES ('ssl_cert_file'::text)) AS v(x)",
    "SELECT ('work_mem'::text).set_config",
    "SELECT (1::oid).lo_get",
    "SELECT c.pg_column_size, ('/etc/hostname'::text).pg_read_file FROM customers c",
])
def test_reported_attribute_calls_are_refused_by_tenantgate(demo, sql):
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="attribute notation"):
            conn.execute(sql)


def test_allowed_functions_columns_and_fields_still_work(demo):
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        assert conn.execute("SELECT ('abc'::text).length").fetchone() == (3,)
        sizes = conn.execute("SELECT (c).pg_column_size FROM customers c").fetchall()
        names = conn.execute("SELECT c.name, (c).email FROM customers c ORDER BY 1").fetchall()
        assert len(sizes) == len(names) > 0
        with psycopg.connect(demo.admin) as admin:
            assert names == admin.execute(
                "SELECT name, email FROM customers WHERE tenant_id = 'acme' ORDER BY 1").fetchall()
        assert conn.execute("SELECT (pg_identify_object('pg_class'::regclass, 'pg_class'::regclass, 0)).type") \
            .fetchone() == ("table",)


# -- user-defined functions (policy engine, a catalog with such functions) -------------------


def test_a_user_function_named_like_a_builtin_is_refused_unqualified():
    engine = _engine(user_functions={"upper"})
    d = _refused(engine, "SELECT upper(c) FROM customers c")
    assert "exists in a schema of the search path" in d.message and "pg_catalog.upper" in (d.hint or "")
    _refused(engine, "SELECT upper(name) FROM customers")
    assert "pg_catalog.upper(name)" in _forwarded(engine, "SELECT pg_catalog.upper(name) FROM customers")
    assert "upper(name)" in _forwarded(_engine(), "SELECT upper(name) FROM customers")
    _forwarded(_engine(user_functions={"upper"}, safe_functions={"upper"}), "SELECT upper(c) FROM customers c")


def test_a_user_function_in_attribute_notation_must_be_declared():
    engine = _engine(user_functions={"full_name"})
    for sql in ["SELECT c.full_name FROM customers c", "SELECT (c).full_name FROM customers c",
                "SELECT customers.full_name FROM customers", "SELECT public.customers.full_name FROM customers"]:
        d = _refused(engine, sql)
        assert "full_name" in d.message and "attribute notation" in d.message
        _forwarded(_engine(user_functions={"full_name"}, safe_functions={"public.full_name"}), sql)
    # a declaration in a schema off the search path does not cover the name (review 2)
    _refused(_engine(user_functions={"full_name"}, safe_functions={"hid.full_name"}),
             "SELECT c.full_name FROM customers c")
    # a name no function has is a column (or PostgreSQL's error)
    _forwarded(engine, "SELECT c.name FROM customers c")


def test_c_functions_of_extensions_do_not_shadow_builtins():
    """citext's strpos(citext, citext) is C: an unqualified strpos() stays allowed (the review found
    citext and pgcrypto users refused); as an attribute it must still be declared."""
    engine = _engine(user_functions={"strpos"}, sql_functions=set())
    _forwarded(engine, "SELECT strpos(name, 'a') FROM customers")
    _refused(engine, "SELECT c.strpos FROM customers c")


def test_tenantgates_own_functions_are_not_on_the_search_path(demo):
    """tenantgate_guard.key_id and friends are not reachable unqualified: a column named like them works."""
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        assert conn.execute("SELECT k.key_id, k.bind FROM (VALUES (1, 2)) AS k(key_id, bind)").fetchone() == (1, 2)


@pytest.mark.parametrize("hidden, refused, forwarded", [
    # an operator that calls a SQL function: where the statement writes it
    (("operator", "@>", "public.f", ""), "SELECT name @> 'x' FROM customers",
     "SELECT name || 'x' FROM customers"),
    (("operator", "+", "public.f", ""), "SELECT customer_id + 1 FROM customers", "SELECT customer_id - 1 FROM customers"),
    (("operator", "<=", "public.f", ""), "SELECT 1 FROM customers WHERE customer_id BETWEEN 1 AND 2", None),
    # a comparison operator or an implicit cast: PostgreSQL may use it anywhere
    (("operator", "=", "public.f", ""), "SELECT 1", None),
    (("cast", "int4", "public.f", "i"), "SELECT 1", None),
    # an operator class whose support function or operator runs SQL: ORDER BY, GROUP BY, joins
    (("opclass", "mood_ops", "public.f", "i"), "SELECT 1", None),
    # a cast of a number is a cast function, only a string constant's is the type's input
    (("cast", "int8", "public.f", "e"), "SELECT 5::bigint", "SELECT '5'::bigint"),
    # an explicit cast: where a non-constant is cast to that type (a constant's cast is its input)
    (("cast", "int4", "public.f", "e"), "SELECT name::integer FROM customers", "SELECT '1'::integer"),
    (("cast", "int4", "public.f", "e"), "SELECT int4(name) FROM customers", None),
])
def test_operators_and_casts_that_run_user_functions(hidden, refused, forwarded):
    d = _refused(_engine(hidden_calls=[hidden]), refused)
    assert "public.f" in d.message and "declare public.f safe" in (d.hint or "")
    _forwarded(_engine(hidden_calls=[hidden], safe_functions={"public.f"}), refused)
    if forwarded is not None:
        _forwarded(_engine(hidden_calls=[hidden]), forwarded)
