"""Issue 12 breaks 2, 6 and 7 and the over-refusals, against a real PostgreSQL.

The oracle is PostgreSQL's row-level security: the original statement runs as a role under
RLS policies ``tenant_id = current_setting('app.tenant')`` with app.tenant = 'acme'; the
engine's rewrite runs as the superuser (RLS bypassed), so only the rewriter's predicates
separate the tenants.  Rows must be equal.  Each test runs in a transaction that is rolled back.
"""

from __future__ import annotations

import asyncpg
import pytest

from proxy.policy.allowlist import FunctionChecker
from proxy.catalog_sync import CatalogManager
from support.demo_policy import demo_rules, demo_schema_sql
from proxy.policy.context import PolicyContext
from proxy.policy.engine import PolicyEngine
from proxy.seam import Forward, Origin, Refuse

ACME = PolicyContext(tenant="acme")
RLS_ROLE = "tg_breaks_rls"
RLS_SETUP = f"""
DO $$BEGIN CREATE ROLE {RLS_ROLE} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END$$;
GRANT USAGE ON SCHEMA public TO {RLS_ROLE};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {RLS_ROLE};
ALTER TABLE customers ENABLE ROW LEVEL SECURITY;
ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
ALTER TABLE order_items ENABLE ROW LEVEL SECURITY;
CREATE POLICY t ON customers USING (tenant_id = current_setting('app.tenant'));
CREATE POLICY t ON orders USING (tenant_id = current_setting('app.tenant'));
CREATE POLICY t ON order_items USING (tenant_id = current_setting('app.tenant'));
"""


@pytest.fixture(scope="module")
async def demo_db(make_db):
    _, dsn = make_db("breaks")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(demo_schema_sql())
        await conn.execute(RLS_SETUP)
    finally:
        await conn.close()
    return dsn


@pytest.fixture(scope="module")
async def engine(demo_db):
    rules = demo_rules()
    mgr = await CatalogManager.from_dsn(demo_db, rules)
    return PolicyEngine(rules, mgr, FunctionChecker.default())


@pytest.fixture
async def conn(demo_db):
    c = await asyncpg.connect(demo_db)
    yield c
    await c.close()


async def _fetch(conn, sql: str, *, rls: bool) -> list[tuple]:
    tx = conn.transaction()
    await tx.start()
    try:
        if rls:
            await conn.execute(f"SET LOCAL app.tenant = 'acme'; SET LOCAL ROLE {RLS_ROLE}")
        return sorted((tuple(r) for r in await conn.fetch(sql)), key=repr)
    finally:
        await tx.rollback()


async def equals_rls(conn, engine, sql: str) -> list[tuple]:
    d = engine.check(sql, ACME, Origin.SIMPLE)
    assert isinstance(d, Forward), d
    got = await _fetch(conn, d.sql, rls=False)
    assert got == await _fetch(conn, sql, rls=True)
    return got


def refused(engine, sql: str, state: str) -> Refuse:
    d = engine.check(sql, ACME, Origin.SIMPLE)
    assert isinstance(d, Refuse) and d.sqlstate == state, d
    return d


# ---- break 2: row expansion decides where the tenant value lands ------------------------------
ROW_EXPANSION = [
    "INSERT INTO customers (name, tenant_id, customer_id) SELECT (z).*, 'acme', (g).* "
    "FROM (SELECT) z, (SELECT 'globex' AS t, 78 AS d) g RETURNING tenant_id",
    "MERGE INTO customers c USING ((SELECT) z CROSS JOIN (SELECT 'globex' AS t, 78 AS d) g) ON false "
    "WHEN NOT MATCHED THEN INSERT (name, tenant_id, customer_id) VALUES ((z).*, 'acme', (g).*)",
]


@pytest.mark.parametrize("sql", ROW_EXPANSION)
async def test_row_expansion_into_the_tenant_column_is_refused(conn, engine, sql):
    # unrewritten, PostgreSQL really stores globex as the tenant: the break is real
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute(sql)
        assert await conn.fetchval("SELECT tenant_id FROM customers WHERE customer_id = 78") == "globex"
    finally:
        await tx.rollback()
    d = refused(engine, sql, "0A000")
    assert "row expansion" in d.message


async def test_row_expansion_with_an_exact_position_runs_as_the_tenant(conn, engine):
    # after the last expansion, positions count exactly from the end (PostgreSQL insists on as many
    # values as listed columns), so this stays allowed and stores acme
    sql = ("MERGE INTO customers c USING (SELECT 'n' AS name) g ON false "
           "WHEN NOT MATCHED THEN INSERT (name, tenant_id, customer_id) VALUES ((g).*, 'acme', 91)")
    d = engine.check(sql, ACME, Origin.SIMPLE)
    assert isinstance(d, Forward), d
    tx = conn.transaction()
    await tx.start()
    try:
        await conn.execute(d.sql)
        assert await conn.fetchval("SELECT tenant_id FROM customers WHERE customer_id = 91") == "acme"
    finally:
        await tx.rollback()
    # one expansion too wide: PostgreSQL itself refuses the row (more expressions than columns)
    wide = sql.replace("SELECT 'n' AS name", "SELECT 'globex' AS t, 92 AS d")
    d = engine.check(wide, ACME, Origin.SIMPLE)
    if isinstance(d, Forward):
        with pytest.raises(asyncpg.SyntaxOrAccessError):
            await conn.execute(d.sql)


def test_xml_functions_that_run_sql_text_stay_refused(engine):
    for sql in ("SELECT query_to_xml('select * from customers', true, true, '')",
                "SELECT table_to_xml('customers', true, true, '')",
                "SELECT cursor_to_xml('c', 1, true, true, '')",
                'SELECT public.xmlforest(1)'):
        refused(engine, sql, "42501")


# ---- break 6: setseed survives on a pooled connection -------------------------------------------
def test_setseed_is_refused(engine):
    d = refused(engine, "SELECT setseed(0.42)", "42501")
    assert "setseed" in d.message and "pooled" in d.message
    refused(engine, "SELECT random() FROM (SELECT setseed(0)) s", "42501")


# ---- break 7: row locks on shared tables --------------------------------------------------------
@pytest.mark.parametrize("lock", ["FOR UPDATE", "FOR NO KEY UPDATE", "FOR SHARE", "FOR KEY SHARE"])
async def test_row_locks_on_shared_tables_refused_on_tenant_tables_allowed(conn, engine, lock):
    d = refused(engine, f"SELECT * FROM products {lock}", "42501")
    assert "products" in d.message
    refused(engine, f"SELECT * FROM orders o JOIN products p USING (product_id) {lock}", "42501")
    refused(engine, f"SELECT * FROM (SELECT * FROM products) p {lock}", "42501")
    refused(engine, f"SELECT * FROM order_items i JOIN products p USING (product_id) {lock} OF p", "42501")
    got = await equals_rls(conn, engine, f"SELECT order_id, status FROM orders {lock}")
    assert got
    await equals_rls(conn, engine, f"SELECT i.order_id, p.name FROM order_items i JOIN products p "
                                   f"USING (product_id) {lock} OF i")


# ---- over-refusals removed (rows equal RLS) -------------------------------------------------------
ALLOWED = [
    "SELECT c.customer_id, o.order_id FROM customers c LEFT JOIN orders o ON left(o.status, 1) = left('paid', 1) "
    "AND o.customer_id = c.customer_id",
    "SELECT c.customer_id, o.order_id FROM customers c LEFT JOIN orders o ON right(o.status, 2) = right('paid', 2) "
    "AND o.customer_id = c.customer_id",
    "SELECT o.order_id, c.name FROM orders o RIGHT JOIN customers c ON left(c.name, 1) = left(o.status, 1)",
    "SELECT p.product_id, c.customer_id, o.order_id FROM products p RIGHT JOIN "
    "(customers c JOIN orders o ON o.customer_id = c.customer_id) ON p.product_id = o.order_id",
    "SELECT inet_server_addr() IS NULL, inet_server_port() IS NOT NULL",
    # ORDER BY ... USING <op>
    "SELECT order_id, status FROM orders ORDER BY order_id USING >",
    "SELECT c.name, o.order_id FROM customers c JOIN orders o USING (customer_id) ORDER BY o.order_id USING <",
    # ONLY (t), in every placement the injector uses
    "SELECT order_id FROM ONLY (orders)",
    "SELECT c.customer_id, o.order_id FROM customers c LEFT JOIN ONLY (orders) o ON o.customer_id = c.customer_id",
    "SELECT p.product_id, c.customer_id FROM products p LEFT JOIN ONLY (customers) c USING (name)",
    "SELECT p.product_id, c.customer_id FROM products p FULL JOIN ONLY (public.customers) c "
    "ON c.customer_id = p.product_id",
    # JOIN ... USING (...) AS j
    "SELECT j.customer_id, o.order_id FROM customers c JOIN orders o USING (customer_id) AS j",
    "SELECT j.customer_id, o.order_id FROM customers c LEFT JOIN orders o USING (tenant_id, customer_id) AS j",
    "SELECT j.customer_id FROM orders o RIGHT JOIN customers c USING (customer_id) AS j WHERE j.customer_id > 0",
    # XML expressions PostgreSQL 15 has (no SQL run from text)
    "SELECT xmlparse(document '<a>' || name || '</a>')::text FROM customers",
    "SELECT xmlforest(name, email)::text FROM customers",
    "SELECT xmlelement(name c, xmlattributes(customer_id AS id), name)::text FROM customers",
    "SELECT xmlconcat(xmlelement(name a, name), xmlelement(name b, email))::text FROM customers",
    "SELECT xmlserialize(content xmlelement(name a, name) AS text) FROM customers",
    "SELECT xmlexists('//a' PASSING BY REF xmlelement(name a, name)) FROM customers",
    "SELECT c.customer_id, x.v FROM customers c, XMLTABLE('/r/v' PASSING xmlelement(name r, "
    "xmlelement(name v, c.name)) COLUMNS v text PATH '.') x",
    "SELECT x.v FROM XMLTABLE('/r/v' PASSING (SELECT xmlelement(name r, xmlagg(xmlelement(name v, o.status))) "
    "FROM orders o) COLUMNS v text PATH '.') x",
]


@pytest.mark.parametrize("sql", ALLOWED)
async def test_no_longer_refused_and_equal_to_rls(conn, engine, sql):
    await equals_rls(conn, engine, sql)
