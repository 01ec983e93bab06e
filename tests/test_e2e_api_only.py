"""API-only access, end to end through a tenant session of the demo (issue 4, in-band).

Every path to the server's files, programs, large objects, SQL given as text,
server reconfiguration, other roles, leaking catalogs and tenantgate's own control
schema is refused with SQLSTATE 42501 — over the simple protocol (Query) and the
extended protocol (Parse/Bind/Execute) alike — and the session is still usable
afterwards.  The FunctionCall ('F') message is sent with a raw client built on
the project's wire codec.  Where a refused statement would leave a trace in
PostgreSQL (a file, a large object, a function), the test checks as the superuser
that nothing happened, and that the refusal is in the audit chain.
"""

from __future__ import annotations

import os
import time
import uuid

import asyncpg
import psycopg
import pytest

from support.e2e import RawClient, assert_refused_by_tenantgate, data_rows, errors

REFUSED = {
    # server files and programs
    "pg_read_file": "SELECT pg_read_file('/etc/passwd')",
    "pg_read_binary_file": "SELECT pg_read_binary_file('/etc/passwd')",
    "pg_read_file_qualified": "SELECT pg_catalog.pg_read_file('/etc/passwd')",
    "pg_read_file_quoted": 'SELECT "pg_read_file"(\'/etc/passwd\')',
    "pg_ls_dir": "SELECT * FROM pg_ls_dir('.')",
    "pg_ls_logdir": "SELECT * FROM pg_ls_logdir()",
    "pg_stat_file": "SELECT pg_stat_file('postgresql.conf')",
    "copy_to_file": "COPY orders TO '/tmp/tenantgate_e2e_copy_out'",
    "copy_query_to_file": "COPY (SELECT * FROM orders) TO '/tmp/tenantgate_e2e_copy_out'",
    "copy_from_file": "COPY orders FROM '/etc/hostname'",
    "copy_from_program": "COPY orders FROM PROGRAM 'id'",
    "copy_to_program": "COPY orders TO PROGRAM 'cat > /tmp/tenantgate_e2e_copy_out'",
    # large objects
    "lo_import": "SELECT lo_import('/etc/passwd')",
    "lo_export": "SELECT lo_export(1, '/tmp/tenantgate_e2e_lo_out')",
    "lo_create": "SELECT lo_create(0)",
    "pg_largeobject": "SELECT * FROM pg_largeobject",
    # SQL given as text
    "query_to_xml": "SELECT query_to_xml('SELECT * FROM orders', true, true, '')",
    "table_to_xml": "SELECT table_to_xml('orders', true, true, '')",
    "cursor_to_xml": "SELECT cursor_to_xml('c', 1, true, true, '')",
    "database_to_xml": "SELECT database_to_xml(true, true, '')",
    "ts_stat": "SELECT * FROM ts_stat('SELECT to_tsvector(name) FROM customers')",
    "dblink": "SELECT dblink('dbname=app', 'SELECT 1')",
    "do_block": "DO $$BEGIN PERFORM 1; END$$",
    "execute_unprepared": "EXECUTE not_prepared_here",
    # extending or reconfiguring the server
    "create_extension": "CREATE EXTENSION dblink",
    "create_function": "CREATE FUNCTION e2e_f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "create_procedure": "CREATE PROCEDURE e2e_p() LANGUAGE sql AS 'SELECT 1'",
    "create_language": "CREATE LANGUAGE plperl",
    "load": "LOAD 'plpgsql'",
    "alter_system": "ALTER SYSTEM SET work_mem = '1GB'",
    "pg_reload_conf": "SELECT pg_reload_conf()",
    "set_role": "SET ROLE postgres",
    "set_session_authorization": "SET SESSION AUTHORIZATION postgres",
    "set_config_search_path": "SELECT set_config('search_path', 'tenantgate_control', false)",
    "set_search_path": "SET search_path = tenantgate_control, public",
    "pg_terminate_backend": "SELECT pg_terminate_backend(pg_backend_pid())",
    "pg_cancel_backend": "SELECT pg_cancel_backend(1)",
    # catalogs that leak other tenants' data
    "pg_stats": "SELECT most_common_vals FROM pg_stats WHERE tablename = 'customers'",
    "pg_statistic": "SELECT * FROM pg_statistic",
    "pg_stat_activity": "SELECT query FROM pg_stat_activity",
    "pg_authid": "SELECT rolpassword FROM pg_authid",
    "pg_shadow": "SELECT passwd FROM pg_shadow",
    "pg_user_mappings": "SELECT * FROM pg_user_mappings",
    "pg_file_settings": "SELECT * FROM pg_file_settings",
    "pg_hba_file_rules": "SELECT * FROM pg_hba_file_rules",
    # the same leaks through other doors: function forms, other spellings, subqueries
    "pg_stat_get_activity": "SELECT * FROM pg_stat_get_activity(NULL)",
    "pg_stats_ext": "SELECT * FROM pg_stats_ext",
    "pg_settings_update": "UPDATE pg_settings SET setting = 'x' WHERE name = 'search_path'",
    "pg_locks": "SELECT * FROM pg_locks",
    "pg_stat_statements": "SELECT * FROM pg_stat_statements",
    "pg_largeobject_metadata": "SELECT * FROM pg_catalog.pg_largeobject_metadata",
    "table_pg_stat_activity": "TABLE pg_stat_activity",
    "upper_case_pg_stats": "SELECT * FROM PG_STATS",
    "quoted_pg_authid": 'SELECT * FROM "pg_catalog"."pg_authid"',
    "row_to_json_pg_authid": "SELECT row_to_json(a) FROM pg_authid a",
    "scalar_subquery_pg_authid": "SELECT (SELECT rolpassword FROM pg_authid LIMIT 1)",
    "exists_pg_stats": "SELECT 1 FROM orders WHERE EXISTS (SELECT 1 FROM pg_stats)",
    "terminate_from_pg_stat_activity": "SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
    "lo_get": "SELECT lo_get(1)",
    "pg_ls_waldir": "SELECT * FROM pg_ls_waldir()",
    "pg_show_all_settings": "SELECT * FROM pg_show_all_settings()",
    "setval": "SELECT setval('no_such_seq', 1)",
    "pg_advisory_lock": "SELECT pg_advisory_lock(1)",
    "pg_notify": "SELECT pg_notify('ch', 'x')",
    # tenantgate's control schema
    "control_audit_log": "SELECT * FROM tenantgate_control.audit_log",
    "control_quoted": 'SELECT * FROM "tenantgate_control".tenants',
    "control_grants_update": "UPDATE tenantgate_control.grants SET state = 'approved'",
    "control_in_subquery": "SELECT count(*) FROM orders WHERE EXISTS (SELECT 1 FROM tenantgate_control.operators)",
}


def control_schema_exists(demo) -> bool:
    with psycopg.connect(demo.admin) as conn:
        return conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'tenantgate_control'").fetchone() == (1,)


@pytest.fixture(scope="module")
def lo_baseline(demo):
    """The number of large objects before the module runs."""
    with psycopg.connect(demo.admin) as conn:
        return conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()[0]


@pytest.mark.parametrize("case", sorted(REFUSED))
async def test_refused_with_42501_over_both_protocols(demo, case):
    sql = REFUSED[case]
    conn = await asyncpg.connect(demo.app("acme"))
    try:
        # simple protocol: asyncpg's execute() without arguments sends one Query message
        with pytest.raises(asyncpg.PostgresError) as e:
            await conn.execute(sql)
        assert_refused_by_tenantgate(e.value)  # not PostgreSQL's own 42501 (privileges, RLS)
        assert await conn.fetchval("SELECT 1") == 1
        # extended protocol: fetch() sends Parse/Describe/Bind/Execute/Sync
        with pytest.raises(asyncpg.PostgresError) as e:
            await conn.fetch(sql)
        assert_refused_by_tenantgate(e.value)
        assert await conn.fetchval("SELECT 1") == 1
        # and inside a transaction the session goes on after the refusal too
        async with conn.transaction():
            with pytest.raises(asyncpg.PostgresError) as e:
                await conn.fetch(sql)
            assert e.value.sqlstate == "42501"
        assert await conn.fetchval("SELECT count(*) FROM orders") == 3
    finally:
        await conn.close()


def test_refusals_name_what_was_refused(demo):
    with psycopg.connect(demo.app("globex"), autocommit=True) as conn:
        for sql, words in [
            (REFUSED["pg_read_file"], "pg_read_file"),
            (REFUSED["lo_import"], "lo_import"),
            (REFUSED["query_to_xml"], "query_to_xml"),
            (REFUSED["copy_from_program"], "COPY"),
            (REFUSED["pg_stats"], "pg_stats"),
            (REFUSED["control_audit_log"], "tenantgate_control"),
            (REFUSED["set_role"], "SET ROLE"),
        ]:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                conn.execute(sql)
            assert words in str(e.value), (sql, str(e.value))
            assert_refused_by_tenantgate(e.value)


def test_refused_statements_never_reach_postgresql(demo, lo_baseline):
    marker = f"tenantgate_e2e_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        for sql in (f"COPY orders TO '/tmp/{marker}'", f"COPY (SELECT 1) TO PROGRAM 'touch /tmp/{marker}'",
                    "SELECT lo_import('/etc/passwd')", "SELECT lo_from_bytea(0, 'x'::bytea)",
                    f"CREATE FUNCTION {marker}() RETURNS int LANGUAGE sql AS 'SELECT 1'"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                conn.execute(sql)
            assert_refused_by_tenantgate(e.value)
            # several statements in one Query: the whole message is refused, nothing runs
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
                conn.execute(f"UPDATE orders SET status = 'gone'; {sql}", prepare=False)
            assert_refused_by_tenantgate(e.value)
        assert conn.execute("SELECT count(*) FROM orders WHERE status = 'gone'").fetchone() == (0,)
    assert not os.path.exists(f"/tmp/{marker}")
    with psycopg.connect(demo.admin) as conn:
        assert conn.execute("SELECT count(*) FROM pg_largeobject_metadata").fetchone()[0] == lo_baseline
        assert conn.execute("SELECT count(*) FROM pg_proc WHERE proname = %s", [marker]).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM orders WHERE status = 'gone'").fetchone() == (0,)


def test_driver_catalog_reads_keep_working(demo):
    """The catalog reads drivers and psql need are not caught by the catalog deny list."""
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        assert conn.execute("SELECT typname FROM pg_type WHERE oid = 'int4'::regtype").fetchone() == ("int4",)
        rows = conn.execute(
            "SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
            "WHERE c.relname = 'orders' AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum").fetchall()
        assert [r[0] for r in rows] == ["tenant_id", "order_id", "customer_id", "status", "created_at"]
        rows = conn.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' "
                            "ORDER BY 1").fetchall()
        assert [r[0] for r in rows] == ["customers", "order_items", "orders", "products"]
        assert conn.execute("SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
                            "WHERE c.relname = 'orders'").fetchone() == (2,)
        assert conn.execute("SHOW server_version").fetchone()[0].startswith("15")


def _oid(demo, signature: str) -> int:
    with psycopg.connect(demo.admin) as conn:
        return conn.execute("SELECT %s::regprocedure::oid", [signature]).fetchone()[0]


@pytest.mark.parametrize("signature,args", [
    ("lo_export(oid,text)", [b"1", b"/tmp/tenantgate_e2e_fc_out"]),
    ("lo_import(text)", [b"/etc/passwd"]),
    ("int4pl(integer,integer)", [b"1", b"2"]),  # even a harmless function: no SQL the proxy could check
])
def test_function_call_message_is_refused(demo, signature, args):
    oid = _oid(demo, signature)
    client = RawClient(demo.app("acme"))
    try:
        reply = client.function_call(oid, args)
        errs = errors(reply)
        assert [(e.severity, e.sqlstate) for e in errs] == [("ERROR", "42501")]
        assert "FunctionCall" in errs[0].message
        assert [t for t, _ in reply] == [b"E", b"Z"] and reply[-1][1] == b"I"
        # the session still works afterwards
        assert data_rows(client.query("SELECT count(*) FROM orders")) == [[b"3"]]
        # also inside a transaction block, which the refusal aborts like any error (issue 20 break 7)
        assert client.query("BEGIN")[-1] == (b"Z", b"T")
        reply = client.function_call(oid, args)
        assert [e.sqlstate for e in errors(reply)] == ["42501"] and reply[-1] == (b"Z", b"E")
        assert [e.sqlstate for e in errors(client.query("SELECT 41 + 1"))] == ["25P02"]
        assert client.query("ROLLBACK")[-1] == (b"Z", b"I")
        assert data_rows(client.query("SELECT 41 + 1")) == [[b"42"]]
    finally:
        client.close()
    assert not os.path.exists("/tmp/tenantgate_e2e_fc_out")


def test_refusals_are_in_the_audit_chain(demo):
    marker = f"e2e_audit_{uuid.uuid4().hex[:8]}"
    sql = f"SELECT pg_read_file('/etc/passwd') AS {marker}"
    with psycopg.connect(demo.app("globex"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql)
        conn.execute("SELECT 1")
    deadline = time.monotonic() + 5
    rows = []
    while time.monotonic() < deadline and not rows:
        with psycopg.connect(demo.admin) as conn:
            rows = conn.execute(
                "SELECT type, tenant, sqlstate FROM tenantgate_control.audit_log WHERE original_sql = %s", [sql]).fetchall()
        if not rows:
            time.sleep(0.1)
    assert rows == [("statement.refused", "globex", "42501")]
    assert control_schema_exists(demo)


async def test_cte_shadowing_a_denied_catalog_is_the_cte(demo):
    conn = await asyncpg.connect(demo.app("acme"))
    try:
        assert [tuple(r) for r in await conn.fetch("WITH pg_stats AS (SELECT 1 AS x) SELECT * FROM pg_stats")] == [(1,)]
    finally:
        await conn.close()


async def test_cte_shadowing_a_tenant_table_is_the_cte(demo):
    conn = await asyncpg.connect(demo.app("acme"))
    try:
        rows = await conn.fetch("WITH orders AS (SELECT 'not a tenant' AS tenant_id) SELECT * FROM orders")
        assert [tuple(r) for r in rows] == [("not a tenant",)]
    finally:
        await conn.close()


@pytest.mark.parametrize("oid, name", [(18, '"char"'), (19, "name"), (23, "int4")])
def test_a_checked_tenant_parameter_cannot_be_declared_with_a_value_changing_type(demo, oid, name):
    # "char" would store 'a' for 'acme', name truncates, int4 turns the value into digits:
    # the Bind check would pass on a value PostgreSQL then changes
    from proxy.wire import messages as m

    c = RawClient(demo.app("acme"))
    try:
        c.send(m.encode_parse("", "INSERT INTO customers (tenant_id, customer_id, name) VALUES ($1, 990001, 'x')",
                              (oid,)),
               m.encode_bind("", "", (b"acme",)), m.encode_execute(), m.SYNC)
        errs = errors(c.until_ready())
        assert errs and errs[0].sqlstate == "42501" and "declared with type" in errs[0].message, (name, errs)
        c.send(m.encode_parse("", "INSERT INTO customers (tenant_id, customer_id, name) VALUES ($1, 990001, 'x') "
                                  "RETURNING tenant_id", (25,)),
               m.encode_bind("", "", (b"acme",)), m.encode_execute(), m.SYNC)
        msgs = c.until_ready()
        assert not errors(msgs) and data_rows(msgs) == [[b"acme"]]
    finally:
        c.query("DELETE FROM customers WHERE customer_id = 990001")
        c.close()
