"""rules/functions.yaml and rules/catalogs.yaml against a real PostgreSQL 15 (the test cluster).

* Complete: every function in pg_proc (pg_catalog, information_schema) is either
  allowed or excluded with a reason, and re-running the generator's
  classification on this server gives exactly the committed YAML; so a
  PostgreSQL upgrade shows up here until the list is regenerated and reviewed.
* Every built-in operator's function is allowed (operators follow the list).
* Every function the dangerous extensions install (dblink, adminpack,
  pg_stat_statements, file_fdw, postgres_fdw, pg_buffercache) is refused,
  unqualified or qualified with the schema it was created in.
* Every catalog relation named in catalogs.yaml exists (no typos), and every
  pg_catalog / information_schema relation not on the allowed list is refused.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

from proxy.policy.allowlist import FunctionChecker
from proxy.policy.allowlist_rules import default_rules_dir
from proxy.policy.errors import PolicyRefusal

EXTENSIONS = ["dblink", "adminpack", "pg_stat_statements", "file_fdw", "postgres_fdw", "pg_buffercache"]
EXTENSION_DIR = Path("/usr/share/postgresql/15/extension")


def _generator():
    spec = importlib.util.spec_from_file_location("generate_functions", default_rules_dir() / "generate_functions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def checker() -> FunctionChecker:
    return FunctionChecker.default()


@pytest.fixture(scope="module")
def db(make_db):
    """A fresh database with nothing but PostgreSQL's built-ins."""
    return make_db("allowlist")[1]


@pytest.fixture(scope="module")
def ext_db(make_db):
    """A fresh database with the dangerous extensions installed (adminpack installs into pg_catalog)."""
    name, dsn = make_db("allowlist_ext")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for ext in EXTENSIONS:
            if (EXTENSION_DIR / f"{ext}.control").exists():
                conn.execute(f"CREATE EXTENSION {ext}")
    return dsn


def _rows(dsn: str, sql: str) -> list[dict]:
    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        return conn.execute(sql).fetchall()


def test_every_builtin_function_is_allowed_or_excluded_with_a_reason(db, checker):
    names = {r["proname"] for r in _rows(db, "SELECT DISTINCT p.proname FROM pg_proc p JOIN pg_namespace n "
                                             "ON n.oid = p.pronamespace WHERE n.nspname IN ('pg_catalog', 'information_schema')")}
    assert len(names) > 2000
    unlisted = sorted(n for n in names if n not in checker.allowlist.allowed and checker.allowlist.exclusion(n) is None)
    assert unlisted == [], "functions neither allowed nor excluded: re-run rules/generate_functions.py and review"
    for n in names:
        group = checker.allowlist.exclusion(n)
        assert group is None or group.reason.strip()


def test_committed_yaml_matches_the_generator_on_this_server(db, checker):
    gen = _generator()
    rows = _rows(db, gen.QUERY)
    allowed, excluded = gen.classify(rows)
    want_allowed = {name: cat for cat, names in allowed.items() for name in names}
    assert checker.allowlist.allowed == want_allowed
    committed = {g.name: set(g.functions) for g in checker.allowlist.exclusions}
    assert {g: set(n) for g, n in excluded.items() if n} == {g: n for g, n in committed.items() if n}


def test_functions_behind_builtin_operators_are_allowed(db, checker):
    rows = _rows(db, "SELECT DISTINCT o.oprname, p.proname FROM pg_operator o JOIN pg_proc p ON p.oid = o.oprcode "
                     "JOIN pg_namespace n ON n.oid = o.oprnamespace WHERE n.nspname = 'pg_catalog'")
    assert len(rows) > 500
    not_allowed = sorted({r["proname"] for r in rows if r["proname"] not in checker.allowlist.allowed})
    assert not_allowed == []


def test_every_function_of_dangerous_extensions_is_refused(ext_db, checker):
    db = ext_db
    installed = [e for e in EXTENSIONS if (EXTENSION_DIR / f"{e}.control").exists()]
    assert {"dblink", "adminpack", "pg_stat_statements"} <= set(installed), "postgresql-contrib is not installed"
    rows = _rows(db, "SELECT e.extname, n.nspname, p.proname FROM pg_extension e "
                     "JOIN pg_depend d ON d.refobjid = e.oid AND d.classid = 'pg_proc'::regclass "
                     "JOIN pg_proc p ON p.oid = d.objid JOIN pg_namespace n ON n.oid = p.pronamespace")
    assert {r["extname"] for r in rows} >= {"dblink", "adminpack", "pg_stat_statements"}
    for r in rows:
        for schema in (None, r["nspname"]):
            with pytest.raises(PolicyRefusal) as info:
                checker.check_function(schema, r["proname"])
            assert info.value.sqlstate == "42501" and r["proname"] in info.value.message
    views = _rows(db, "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                      "WHERE c.relname LIKE 'pg_stat_statements%' OR c.relname LIKE 'pg_buffercache%'")
    assert views
    for v in views:
        with pytest.raises(PolicyRefusal):
            checker.check_relation(v["nspname"], v["relname"])


def test_catalog_rules_name_real_relations_and_refuse_the_rest(db, checker):
    rows = _rows(db, "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                     "WHERE n.nspname IN ('pg_catalog', 'information_schema') AND c.relkind IN ('r', 'v', 'm', 'p', 'f')")
    existing = {(r["nspname"], r["relname"]) for r in rows}
    cats = checker.catalogs
    for schema, names in cats.allowed.items():
        missing = sorted(n for n in names if (schema, n) not in existing)
        assert missing == [], f"{schema}: allowed but not in PostgreSQL 15: {missing}"
    for schema, entries in cats.denied.items():
        missing = sorted(n for n in entries if "*" not in n and (schema, n) not in existing)
        assert missing == [], f"{schema}: denied but not in PostgreSQL 15: {missing}"
    for schema, name in sorted(existing):
        allowed = name in cats.allowed.get(schema, frozenset())
        try:
            checker.check_relation(schema, name)
            passed = True
        except PolicyRefusal as e:
            passed = False
            assert e.sqlstate == "42501" and name in e.message
        assert passed == allowed, f"{schema}.{name}"
