"""Hostile SQL straight at PostgreSQL: the backstop holds without tenantgate's parser.

Every test connects as ``tenantgate_app`` directly to the demo's PostgreSQL (no proxy in the
path), built by the demo's real bootstrap (proxy/demo.py: demo_schema.sql, then
deploy/postgres/bootstrap.sql with the demo's backstop key), and sets the connection up exactly
as tenantgate sets it up for tenant acme: the proxy's own :class:`proxy.backstop.BackendBinder`
builds the bind call, then the gate's setup SQL (``SET tenantgate.tenant_id = 'acme'``).  Then
it runs SQL an attacker could slip past the parser, and asserts that nothing of globex is read,
written or observed.  Each test names, in its ``LAYER`` assertion message or docstring, the
PostgreSQL mechanism that stopped it (see docs/security.md, "Backstop: what PostgreSQL alone
guarantees").
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import asyncpg
import pytest

from proxy import backstop
from proxy.demo import DEMO_DB, DemoState, ensure_cluster, initialize
from proxy.policy.names import TENANT_GUC

GLOBEX_ROWS = {"customers": 2, "orders": 2, "order_items": 2}
ACME_ROWS = {"customers": 2, "orders": 3, "order_items": 4}
DENIED = "42501"  # insufficient_privilege
BINDING_REFUSED = "28000"


@pytest.fixture(scope="module")
def demo_db():
    base = Path(tempfile.mkdtemp(prefix="tg-backstop-"))
    base.chmod(0o755)
    state = DemoState(base)
    cluster = ensure_cluster(state)
    try:
        asyncio.run(initialize(cluster, state))
        yield cluster, state
    finally:
        cluster.stop("immediate")


def app_dsn(demo_db) -> str:
    cluster, state = demo_db
    return cluster.dsn("tenantgate_app", state.secret("tenantgate_app"), DEMO_DB)


def admin_dsn(demo_db) -> str:
    cluster, _ = demo_db
    return cluster.dsn(database=DEMO_DB)


def key(demo_db) -> bytes:
    return backstop.parse_key(demo_db[1].backstop_key())


async def connect_as(demo_db, tenant: str | None, mode: str = "write"):
    """A tenantgate_app connection set up the way tenantgate sets one up (session mode)."""
    conn = await asyncpg.connect(app_dsn(demo_db))
    binder = backstop.BackendBinder.from_identity_row(key(demo_db), await conn.fetchrow(backstop.IDENTITY_SQL))
    await conn.execute(binder.sql(tenant, mode if tenant else "none"))
    await conn.execute(f"SET {TENANT_GUC} = '{tenant or ''}'")
    _BINDERS[id(conn)] = binder  # the proxy-side state of this connection
    return conn


_BINDERS: dict[int, backstop.BackendBinder] = {}


def binder_of(conn) -> backstop.BackendBinder:
    return _BINDERS[id(conn)]


async def tenants_seen(conn) -> dict[str, set[str]]:
    out = {}
    for t in GLOBEX_ROWS:
        out[t] = {r[0] for r in await conn.fetch(f"SELECT tenant_id FROM {t}")}
    return out


async def assert_only_acme(conn, layer: str):
    seen = await tenants_seen(conn)
    for t, tenants in seen.items():
        assert "globex" not in tenants, f"{t}: globex rows visible ({layer} failed)"
        assert tenants <= {"acme"}, f"{t}: {tenants}"


async def globex_untouched(demo_db):
    admin = await asyncpg.connect(admin_dsn(demo_db))
    try:
        for t, n in GLOBEX_ROWS.items():
            assert await admin.fetchval(f"SELECT count(*) FROM {t} WHERE tenant_id = 'globex'") == n, t
        assert await admin.fetchval("SELECT name FROM customers WHERE tenant_id = 'globex' AND customer_id = 1") \
            == "Hank Scorpio"
    finally:
        await admin.close()


async def refused(conn, sql: str, *args, sqlstate: str = DENIED) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.PostgresError) as e:
        await conn.execute(sql, *args) if not args else await conn.fetch(sql, *args)
    assert e.value.sqlstate == sqlstate, f"{sql}: {e.value.sqlstate} {e.value}"
    return e.value


@pytest.fixture
async def acme(demo_db):
    conn = await connect_as(demo_db, "acme")
    yield conn
    await conn.close()
    await globex_untouched(demo_db)


# ------------------------------------------------------------------ the binding itself

async def test_acme_sees_exactly_its_rows(acme):
    seen = await tenants_seen(acme)
    assert seen == {t: {"acme"} for t in GLOBEX_ROWS}
    for t, n in ACME_ROWS.items():
        assert await acme.fetchval(f"SELECT count(*) FROM {t}") == n


async def test_unbound_connection_sees_nothing(demo_db):
    """LAYER: RLS with no binding for this backend -> current_tenant() is NULL."""
    conn = await asyncpg.connect(app_dsn(demo_db))
    try:
        await conn.execute(f"SET {TENANT_GUC} = 'globex'")
        assert await tenants_seen(conn) == {t: set() for t in GLOBEX_ROWS}
        await refused(conn, "INSERT INTO customers VALUES ('globex', 99, 'x', NULL)")
    finally:
        await conn.close()


@pytest.mark.parametrize("forge", [
    f"SELECT set_config('{TENANT_GUC}', 'globex', false)",
    f"SELECT set_config('{TENANT_GUC}', 'globex', true)",
    f"SET {TENANT_GUC} = 'globex'",
    f"SET SESSION {TENANT_GUC} TO 'globex'",
    f"RESET {TENANT_GUC}",
    "RESET ALL",
    "DISCARD ALL",
    "SET tenantgate.backstop = 'write:globex'",
    "SET tenantgate_guard.tenant = 'globex'",
])
async def test_forging_settings_changes_nothing(acme, forge):
    """LAYER: the policies read the guard's binding table, not any setting."""
    await acme.execute(forge)
    await assert_only_acme(acme, "guard binding")
    await refused(acme, "INSERT INTO customers VALUES ('globex', 90, 'x', NULL)")


async def test_forged_mac_is_refused(acme):
    """LAYER: bind() checks the HMAC with a key only the guard role can read."""
    b = binder_of(acme)
    wrong = backstop.BackendBinder(b"\x01" * 32, b.pid, b.backend_start)
    wrong.nonce = 1000
    await refused(acme, wrong.sql("globex", "write"), sqlstate=BINDING_REFUSED)
    await refused(acme, "SELECT tenantgate_guard.bind('globex', 'write', 99999, repeat('0', 64))",
                  sqlstate=BINDING_REFUSED)
    await assert_only_acme(acme, "bind MAC")


async def test_replaying_a_globex_binding_from_another_backend_is_refused(demo_db, acme):
    """LAYER: the MAC covers the backend's pid and start time."""
    globex = await asyncpg.connect(app_dsn(demo_db))
    try:
        gb = backstop.BackendBinder.from_identity_row(key(demo_db), await globex.fetchrow(backstop.IDENTITY_SQL))
        captured = gb.sql("globex", "write")
        await globex.execute(captured)
        assert {r[0] for r in await globex.fetch("SELECT tenant_id FROM customers")} == {"globex"}
        # the exact statement, with a nonce far ahead of acme's
        await refused(acme, captured, sqlstate=BINDING_REFUSED)
        big = backstop.bind_call(key(demo_db), "globex", "write", gb.pid, gb.backend_start, 10**12)
        await refused(acme, f"SELECT {big}", sqlstate=BINDING_REFUSED)
        await assert_only_acme(acme, "MAC over pid and backend start")
    finally:
        await globex.close()


async def test_replaying_a_stale_binding_on_the_same_backend_is_refused(demo_db):
    """A pooled connection served globex, then acme: globex's earlier binding cannot come back.
    LAYER: bind() requires a nonce greater than the last one accepted on this backend."""
    conn = await asyncpg.connect(app_dsn(demo_db))
    try:
        b = backstop.BackendBinder.from_identity_row(key(demo_db), await conn.fetchrow(backstop.IDENTITY_SQL))
        globex_binding = b.sql("globex", "write")
        await conn.execute(globex_binding)
        await conn.execute(b.sql("acme", "write"))  # lent to acme next
        await refused(conn, globex_binding, sqlstate=BINDING_REFUSED)
        await assert_only_acme(conn, "nonce")
        # even in a transaction that is rolled back afterwards
        async with conn.transaction():
            await conn.execute(b.sql("acme", "write"))
        await refused(conn, globex_binding, sqlstate=BINDING_REFUSED)
        await assert_only_acme(conn, "nonce")
    finally:
        await conn.close()
    await globex_untouched(demo_db)


async def test_a_rolled_back_binding_leaves_the_previous_one(demo_db):
    """The binding is transactional and the proxy reads it back (current_binding())."""
    conn = await connect_as(demo_db, "acme")
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(binder_of(conn).sql("globex", "write"))
        await tx.rollback()
        assert await conn.fetchval(f"SELECT {backstop.CURRENT_BINDING_SQL}") == "write:acme"
        await assert_only_acme(conn, "transactional binding")
    finally:
        await conn.close()


async def test_the_guard_cannot_be_reached_or_changed(acme):
    """LAYER: tenantgate_guard owns its schema, table and functions; tenantgate_app is no member."""
    for sql in [
        "SELECT * FROM tenantgate_guard.key",
        "SELECT * FROM tenantgate_guard.binding",
        "UPDATE tenantgate_guard.binding SET tenant = 'globex'",
        "INSERT INTO tenantgate_guard.binding VALUES (pg_backend_pid(), 0, -1, 'globex', 'write', 1)",
        "DELETE FROM tenantgate_guard.binding",
        "TRUNCATE tenantgate_guard.binding",
        "ALTER FUNCTION tenantgate_guard.current_tenant() OWNER TO tenantgate_app",
        "CREATE OR REPLACE FUNCTION tenantgate_guard.current_tenant() RETURNS text LANGUAGE sql AS $$ SELECT 'globex' $$",
        "CREATE FUNCTION tenantgate_guard.x() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
        "DROP FUNCTION tenantgate_guard.current_tenant()",
        "GRANT tenantgate_guard TO tenantgate_app",
    ]:
        await refused(acme, sql)
    await assert_only_acme(acme, "guard ownership")


@pytest.mark.parametrize("sql", [
    "SET ROLE tenantgate_guard", "SET ROLE postgres", "SET ROLE tenantgate_control",
    "SET SESSION AUTHORIZATION postgres", "SET SESSION AUTHORIZATION tenantgate_guard",
])
async def test_changing_role_is_refused(acme, sql):
    """LAYER: tenantgate_app is not superuser and a member of no role."""
    await refused(acme, sql)
    await assert_only_acme(acme, "role membership")


async def test_search_path_cannot_redirect_the_guard(acme):
    """LAYER: the guard's functions name every object schema-qualified; no schema is writable."""
    await acme.execute("SET search_path = public, pg_temp")
    await refused(acme, "CREATE FUNCTION public.pg_backend_pid() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$")
    await refused(acme, "CREATE TEMP TABLE binding (x int)")
    await assert_only_acme(acme, "qualified names")


# ------------------------------------------------------------------ reads, writes, error channels

async def test_writes_with_another_tenants_value_are_refused(acme):
    """LAYER: RESTRICTIVE policies with WITH CHECK / USING on current_writer()."""
    await refused(acme, "INSERT INTO customers VALUES ('globex', 50, 'x', NULL)")
    await refused(acme, "INSERT INTO orders SELECT 'globex', 60, 1, 'open', now()")
    await refused(acme, "UPDATE customers SET tenant_id = 'globex' WHERE customer_id = 1")
    assert await acme.execute("UPDATE customers SET name = 'pwned' WHERE tenant_id = 'globex'") == "UPDATE 0"
    assert await acme.execute("DELETE FROM order_items WHERE tenant_id = 'globex'") == "DELETE 0"
    assert await acme.execute(
        "INSERT INTO customers VALUES ('acme', 1, 'dup', 'x@y') ON CONFLICT (tenant_id, customer_id) "
        "DO UPDATE SET name = EXCLUDED.name RETURNING 1") == "INSERT 0 1"
    await acme.execute("UPDATE customers SET name = 'Wile E. Coyote' WHERE customer_id = 1")


@pytest.mark.parametrize("sql", [
    "TRUNCATE customers", "TRUNCATE order_items CASCADE",
    "ALTER TABLE customers DISABLE ROW LEVEL SECURITY", "ALTER TABLE customers NO FORCE ROW LEVEL SECURITY",
    "CREATE POLICY open_all ON customers USING (true)", "DROP POLICY tenantgate_tenant_isolation ON customers",
    "ALTER POLICY tenantgate_tenant_isolation ON customers USING (true)",
    "ALTER TABLE customers OWNER TO tenantgate_app",
    "CREATE VIEW public.all_customers AS SELECT * FROM customers",
    "CREATE FUNCTION public.f() RETURNS SETOF customers LANGUAGE sql SECURITY DEFINER AS $$ SELECT * FROM customers $$",
    "CREATE TRIGGER t BEFORE INSERT ON customers FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()",
    "CREATE SCHEMA mine", "CREATE TABLE public.mine (x int)",
    "CREATE TEMP TABLE mine (x int)", "CREATE TEMP VIEW v AS SELECT * FROM customers",
    "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
    "CREATE EXTENSION dblink", "CREATE EXTENSION postgres_fdw",
    "CREATE RULE r AS ON SELECT TO customers DO INSTEAD SELECT * FROM customers",
])
async def test_ddl_that_would_widen_access_is_refused(acme, sql):
    """LAYER: tenant tables are not owned by tenantgate_app; no CREATE on the database, any
    schema or TEMP; TRUNCATE not granted; dblink/postgres_fdw need a superuser to install."""
    await refused(acme, sql)
    await assert_only_acme(acme, "ownership and CREATE privileges")


async def test_rls_quals_run_before_client_predicates(acme):
    """A client predicate that errors on globex rows never sees them (no error channel).
    LAYER: RLS security quals are evaluated before non-leakproof client quals."""
    rows = await acme.fetch(
        "SELECT name FROM customers WHERE 1 / (CASE WHEN tenant_id = 'globex' THEN 0 ELSE 1 END) = 1")
    assert len(rows) == ACME_ROWS["customers"]
    rows = await acme.fetch("SELECT name FROM customers WHERE CAST(CASE WHEN tenant_id = 'globex' "
                            "THEN name ELSE '1' END AS int) = 1")
    assert len(rows) == ACME_ROWS["customers"]


async def test_subqueries_and_ctes_see_only_acme(acme):
    n = await acme.fetchval("WITH RECURSIVE c AS (SELECT * FROM customers) SELECT count(*) FROM c, LATERAL "
                            "(SELECT count(*) FROM orders o WHERE o.customer_id = c.customer_id) x")
    assert n == ACME_ROWS["customers"]
    assert await acme.fetchval("SELECT count(*) FROM (TABLE order_items) t WHERE tenant_id <> 'acme'") == 0
    assert await acme.fetchval("SELECT query_to_xml('SELECT * FROM customers WHERE tenant_id = ''globex''', "
                               "true, true, '')::text") == ""


# ------------------------------------------------------------------ channels PostgreSQL opens to PUBLIC

async def test_other_sessions_activity_is_hidden(demo_db, acme):
    """LAYER: SELECT on pg_stat_activity and EXECUTE on pg_stat_get_* revoked from PUBLIC."""
    globex = await connect_as(demo_db, "globex")
    try:
        await globex.execute("SELECT 'globex-secret-marker'")
        for sql in ["SELECT query FROM pg_stat_activity", "SELECT * FROM pg_stat_get_activity(NULL)",
                    "SELECT pg_stat_get_backend_activity(b) FROM pg_stat_get_backend_idset() b",
                    "SELECT * FROM pg_locks", "SELECT * FROM pg_stat_user_tables",
                    "SELECT pg_stat_get_tuples_inserted('customers'::regclass)",
                    "SELECT pg_blocking_pids(pg_backend_pid())", "SELECT * FROM pg_prepared_xacts",
                    "SELECT pg_cancel_backend(1)", "SELECT pg_terminate_backend(1)"]:
            await refused(acme, sql)
    finally:
        await globex.close()


async def test_statistics_of_tenant_tables_are_hidden(demo_db, acme):
    """pg_stats holds most-common values of the tenant column and of every other column.
    LAYER: SELECT on pg_stats / pg_stats_ext revoked from PUBLIC; pg_statistic(_ext_data) superuser-only."""
    admin = await asyncpg.connect(admin_dsn(demo_db))
    try:
        await admin.execute("ANALYZE customers")
    finally:
        await admin.close()
    for sql in ["SELECT most_common_vals FROM pg_stats WHERE tablename = 'customers'",
                "SELECT * FROM pg_stats_ext", "SELECT * FROM pg_statistic", "SELECT * FROM pg_statistic_ext_data"]:
        await refused(acme, sql)


async def test_large_objects_are_closed(acme):
    """LAYER: EXECUTE on lo_* revoked from PUBLIC; pg_largeobject superuser-only."""
    for sql in ["SELECT lo_creat(-1)", "SELECT lo_from_bytea(0, 'globex')", "SELECT lo_get(1)",
                "SELECT loread(lo_open(1, 262144), 10)", "SELECT * FROM pg_largeobject",
                "SELECT * FROM pg_largeobject_metadata", "SELECT lo_import('/etc/passwd')",
                "SELECT lo_export(1, '/tmp/x')", "SELECT lo_unlink(1)"]:
        await refused(acme, sql)


async def test_advisory_locks_notify_setseed_are_closed(acme):
    """Shared per-database namespaces (locks, notification channels) and per-backend random state
    that would outlive a pooled transaction.  LAYER: EXECUTE revoked from PUBLIC."""
    for sql in ["SELECT pg_advisory_lock(1)", "SELECT pg_try_advisory_lock(1)", "SELECT pg_advisory_xact_lock(1)",
                "SELECT pg_try_advisory_xact_lock_shared(1)", "SELECT pg_notify('globex', 'x')",
                "SELECT setseed(0.5)", "SELECT pg_listening_channels()"]:
        await refused(acme, sql)
    assert await acme.fetchval("SELECT pg_advisory_unlock_all()") is None  # own session only, drivers call it


async def test_server_files_programs_and_foreign_servers_are_closed(acme):
    """LAYER: tenantgate_app is no member of pg_read/write_server_files, pg_execute_server_program,
    not superuser; dblink/postgres_fdw not installable."""
    for sql in ["COPY customers TO '/tmp/tg-out.csv'", "COPY customers FROM '/etc/hosts'",
                "COPY customers TO PROGRAM 'cat > /tmp/x'", "COPY (SELECT 1) TO PROGRAM 'id'",
                "SELECT pg_read_file('/etc/passwd')", "SELECT pg_read_binary_file('postgresql.conf')",
                "SELECT pg_ls_dir('.')", "SELECT pg_stat_file('postgresql.conf')",
                "SELECT * FROM dblink('dbname=app', 'SELECT 1') AS t(x int)",
                "CREATE SERVER s FOREIGN DATA WRAPPER postgres_fdw"]:
        with pytest.raises(asyncpg.PostgresError) as e:
            await acme.execute(sql)
        assert e.value.sqlstate in (DENIED, "42883", "42704"), f"{sql}: {e.value.sqlstate} {e.value}"


async def test_sequences_show_no_last_value(demo_db, acme):
    """LAYER: only USAGE (nextval/currval) on sequences; pg_sequence_last_value and pg_sequences revoked."""
    admin = await asyncpg.connect(admin_dsn(demo_db))
    try:
        await admin.execute("CREATE SEQUENCE IF NOT EXISTS public.ticket_seq")
        await admin.execute("SELECT nextval('ticket_seq')")
    finally:
        await admin.close()
    # the bootstrap's grants are rerun after migrations, like in production
    cluster, state = demo_db
    from proxy.bootstrap import apply_bootstrap
    apply_bootstrap(admin_dsn(demo_db), state.secret("tenantgate_app"), state.secret("tenantgate_control"))
    await refused(acme, "SELECT last_value FROM ticket_seq")
    await refused(acme, "SELECT pg_sequence_last_value('ticket_seq')")
    await refused(acme, "SELECT * FROM pg_sequences")
    await refused(acme, "SELECT setval('ticket_seq', 1)")
    assert await acme.fetchval("SELECT nextval('ticket_seq')") >= 2


# ------------------------------------------------------------------ operators under a read grant

@pytest.fixture
async def operator_read(demo_db):
    """Set up as tenantgate sets up an operator session under a read grant for acme."""
    conn = await connect_as(demo_db, "acme", mode="read")
    await conn.execute("SET default_transaction_read_only = on")
    yield conn
    await conn.close()
    await globex_untouched(demo_db)


async def test_operator_read_grant_reads_only_acme(operator_read):
    await assert_only_acme(operator_read, "read binding")
    assert await operator_read.fetchval("SELECT count(*) FROM orders") == ACME_ROWS["orders"]


async def test_operator_read_grant_cannot_write_even_out_of_read_only_mode(demo_db, operator_read):
    """LAYER: a 'read' binding makes current_writer() NULL: no row passes WITH CHECK, UPDATE and
    DELETE see no row, whatever the transaction's read-only setting."""
    await operator_read.execute("SET default_transaction_read_only = off")
    await operator_read.execute("RESET ALL")
    await refused(operator_read, "INSERT INTO customers VALUES ('acme', 77, 'x', NULL)")
    assert await operator_read.execute("UPDATE customers SET name = 'x'") == "UPDATE 0"
    assert await operator_read.execute("DELETE FROM order_items") == "DELETE 0"
    await refused(operator_read, "SELECT tenantgate_guard.bind('acme', 'write', 10000000, repeat('a', 64))",
                  sqlstate=BINDING_REFUSED)
    admin = await asyncpg.connect(admin_dsn(demo_db))
    try:
        assert await admin.fetchval("SELECT count(*) FROM order_items WHERE tenant_id = 'acme'") == ACME_ROWS["order_items"]
        assert await admin.fetchval("SELECT count(*) FROM customers WHERE name = 'x'") == 0
    finally:
        await admin.close()


async def test_set_local_binding_ends_with_its_transaction(demo_db):
    """SET LOCAL tenantgate.tenant: a binding for one transaction (the guard records its xid)."""
    conn = await connect_as(demo_db, "acme")
    try:
        async with conn.transaction():
            await conn.execute(f"SELECT {binder_of(conn).call('globex', 'read', True)}")
            assert {r[0] for r in await conn.fetch('SELECT tenant_id FROM customers')} == {"globex"}
            assert await conn.execute("UPDATE customers SET name = 'x'") == "UPDATE 0"  # read-only binding
        await assert_only_acme(conn, "transaction binding expired")
    finally:
        await conn.close()
    await globex_untouched(demo_db)


# ------------------------------------------------------------------ the proxy refuses tables without the backstop

async def test_proxy_refuses_a_tenant_table_without_the_backstop(demo_db):
    """The catalog snapshot reads each tenant table's RLS state; a table lacking the backstop is
    denied (42501 with the reason) unless the rules declare it backstop_off with a reason."""
    from proxy.catalog_sync import load_snapshot
    from proxy.policy.rules import Rules, RulesError  # noqa: F401

    rules = Rules()
    snap = await load_snapshot(app_dsn(demo_db), rules, backstop_key_configured=True)
    assert {r.name for r in snap.tenant_relations()} == set(GLOBEX_ROWS)
    admin = await asyncpg.connect(admin_dsn(demo_db))
    try:
        await admin.execute("CREATE POLICY everyone ON orders AS PERMISSIVE USING (true)")
        await admin.execute("ALTER TABLE order_items NO FORCE ROW LEVEL SECURITY")
        snap = await load_snapshot(app_dsn(demo_db), rules, backstop_key_configured=True)
        orders, items = snap.get("public", "orders"), snap.get("public", "order_items")
        assert orders.classification == "denied" and "everyone" in orders.reason
        assert items.classification == "denied" and "not forced" in items.reason
        assert snap.get("public", "customers").tenant_scoped
        # declared off, with a reason: served (the rewriter alone protects it)
        off = Rules(backstop_off={"orders": "legacy reporting table, rewriter only (TICKET-7)"})
        assert (await load_snapshot(app_dsn(demo_db), off, backstop_key_configured=True)) \
            .get("public", "orders").tenant_scoped
        # without a backstop key configured, `auto` does not require it; `required` does
        assert (await load_snapshot(app_dsn(demo_db), rules)).get("public", "orders").tenant_scoped
        assert (await load_snapshot(app_dsn(demo_db), Rules(backstop="required"))) \
            .get("public", "orders").classification == "denied"
    finally:
        await admin.execute("DROP POLICY everyone ON orders")
        await admin.execute("ALTER TABLE order_items FORCE ROW LEVEL SECURITY")
        await admin.close()


def test_backstop_off_needs_a_reason():
    from pydantic import ValidationError

    from proxy.policy.rules import Rules

    with pytest.raises(ValidationError, match="reason"):
        Rules(backstop_off={"orders": " "})


async def test_lifecycle_role_without_bypassrls_is_refused_not_silently_empty(demo_db):
    """Export/purge as a role the backstop shows no rows would export nothing and 'verify' a purge
    of zero rows: refused up front (42501) instead."""
    from proxy.lifecycle.tables import LifecycleError, discover, scope_session

    admin = await asyncpg.connect(admin_dsn(demo_db))
    try:
        await admin.execute("DROP ROLE IF EXISTS lc_plain; CREATE ROLE lc_plain LOGIN PASSWORD 'pw'; "
                            "GRANT SELECT, DELETE ON ALL TABLES IN SCHEMA public TO lc_plain")
        cluster, _ = demo_db
        life = await asyncpg.connect(cluster.dsn("lc_plain", "pw", DEMO_DB))
        try:
            schema = await discover(life, "tenant_id")
            with pytest.raises(LifecycleError) as e:
                await scope_session(life, schema, "acme", local=False)
            assert e.value.sqlstate == DENIED and "BYPASSRLS" in (e.value.hint or "")
        finally:
            await life.close()
    finally:
        await admin.execute("REVOKE ALL ON ALL TABLES IN SCHEMA public FROM lc_plain; DROP ROLE lc_plain")
        await admin.close()
