"""Rewritten statements run in real PostgreSQL over the demo schema.

Each case runs the engine's rewrite for tenant acme against a fresh copy of the demo
data and checks the rows (acme's only) and that globex's rows are untouched.
"""

from __future__ import annotations

import asyncpg
import pytest

from proxy.catalog_sync import CatalogManager
from support.demo_policy import demo_rules, demo_schema_sql
from proxy.policy.context import PolicyContext
from proxy.policy.engine import PolicyEngine
from proxy.seam import Forward, Origin, Refuse

ACME = PolicyContext(tenant="acme")
GLOBEX_SNAPSHOT = """
SELECT 'c' AS t, row_to_json(c)::text AS r FROM customers c WHERE tenant_id = 'globex'
UNION ALL SELECT 'o', row_to_json(o)::text FROM orders o WHERE tenant_id = 'globex'
UNION ALL SELECT 'i', row_to_json(i)::text FROM order_items i WHERE tenant_id = 'globex'
UNION ALL SELECT 'p', row_to_json(p)::text FROM products p
ORDER BY 1, 2
"""


@pytest.fixture(scope="module")
async def demo_db(make_db):
    name, dsn = make_db("policy")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(demo_schema_sql())
    finally:
        await conn.close()
    return dsn


@pytest.fixture(scope="module")
async def engine(demo_db):
    rules = demo_rules()
    mgr = await CatalogManager.from_dsn(demo_db, rules)
    return PolicyEngine(rules, mgr)


@pytest.fixture
async def conn(demo_db):
    c = await asyncpg.connect(demo_db)
    tx = c.transaction()
    await tx.start()
    before = await c.fetch(GLOBEX_SNAPSHOT)
    yield c
    after = await c.fetch(GLOBEX_SNAPSHOT)
    assert [tuple(r) for r in after] == [tuple(r) for r in before], "globex rows changed"
    await tx.rollback()
    await c.close()


def rewrite(engine, sql, ctx=ACME, origin=Origin.SIMPLE) -> str:
    d = engine.check(sql, ctx, origin)
    assert isinstance(d, Forward), d
    return d.sql


async def rows(conn, engine, sql, *args):
    return [tuple(r) for r in await conn.fetch(rewrite(engine, sql), *args)]


async def test_select_only_own_rows(conn, engine):
    got = await rows(conn, engine, "SELECT tenant_id, order_id FROM orders ORDER BY order_id")
    assert got == [("acme", 1), ("acme", 2), ("acme", 3)]


async def test_outer_join_nullable_side_filtered_in_join(conn, engine):
    # globex customer 1 has an order 1 with the same ids as acme's: must not join across tenants
    sql = (
        "SELECT c.customer_id, o.order_id, o.tenant_id FROM customers c "
        "LEFT JOIN orders o ON o.customer_id = c.customer_id ORDER BY 1, 2"
    )
    got = await rows(conn, engine, sql)
    assert got == [(1, 1, "acme"), (1, 2, "acme"), (2, 3, "acme")]
    sql = (
        "SELECT o.order_id, c.name FROM customers c RIGHT JOIN orders o ON o.customer_id = c.customer_id "
        "AND c.name = 'Hank Scorpio' ORDER BY 1"
    )
    assert await rows(conn, engine, sql) == [(1, None), (2, None), (3, None)]
    sql = "SELECT count(*) FROM orders o FULL JOIN customers c USING (tenant_id, customer_id)"
    assert await rows(conn, engine, sql) == [(3,)]


async def test_subqueries_ctes_lateral_setops_windows(conn, engine):
    sql = """
    WITH big AS (SELECT order_id FROM order_items GROUP BY order_id HAVING sum(quantity) > 1)
    SELECT o.order_id, rank() OVER (ORDER BY o.order_id DESC), x.n
    FROM orders o JOIN big USING (order_id),
         LATERAL (SELECT count(*) AS n FROM order_items i WHERE i.order_id = o.order_id) x
    WHERE EXISTS (SELECT 1 FROM customers c WHERE c.customer_id = o.customer_id)
    ORDER BY 1
    """
    assert await rows(conn, engine, sql) == [(1, 3, 2), (2, 2, 1), (3, 1, 1)]
    sql = "SELECT customer_id FROM customers UNION SELECT customer_id FROM orders EXCEPT SELECT 2 ORDER BY 1"
    assert await rows(conn, engine, sql) == [(1,)]
    # TABLE has no ORDER BY: compare as a sorted list (acme's two customers, none of globex's)
    assert sorted(await rows(conn, engine, "TABLE customers")) == [
        ("acme", 1, "Wile E. Coyote", "wile@acme.example"), ("acme", 2, "Road Runner", "beep@acme.example")
    ]


async def test_recursive_cte_and_shadowing(conn, engine):
    sql = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT count(*) FROM r, orders"
    assert await rows(conn, engine, sql) == [(9,)]
    sql = "WITH orders AS (SELECT 42 AS order_id) SELECT order_id FROM orders"
    assert await rows(conn, engine, sql) == [(42,)]


async def test_for_update(conn, engine):
    got = await rows(conn, engine, "SELECT order_id FROM orders o WHERE status = 'open' ORDER BY 1 FOR UPDATE OF o")
    assert got == [(1,), (3,)]
    got = await rows(conn, engine, "SELECT order_id FROM orders ORDER BY 1 FOR SHARE")
    assert got == [(1,), (2,), (3,)]


async def test_update_delete_only_own_rows(conn, engine):
    await conn.execute(rewrite(engine, "UPDATE orders SET status = 'x' WHERE order_id = 1 OR order_id = 2"))
    assert await conn.fetchval("SELECT count(*) FROM orders WHERE status = 'x'") == 2
    got = await rows(conn, engine, "UPDATE orders o SET status = 'y' FROM customers c WHERE c.customer_id = o.customer_id AND c.name LIKE '%' RETURNING o.tenant_id")
    assert got == [("acme",)] * 3
    await conn.execute(rewrite(engine, "DELETE FROM order_items USING orders o WHERE o.order_id = order_items.order_id"))
    assert await conn.fetchval("SELECT count(*) FROM order_items WHERE tenant_id = 'acme'") == 0
    await conn.execute(rewrite(engine, "DELETE FROM orders"))
    assert await conn.fetchval("SELECT count(*) FROM orders WHERE tenant_id = 'acme'") == 0


async def test_insert_forms(conn, engine):
    got = await rows(conn, engine, "INSERT INTO customers (customer_id, name) VALUES (7, 'a'), (8, 'b') RETURNING tenant_id, customer_id")
    assert got == [("acme", 7), ("acme", 8)]
    await conn.execute(rewrite(engine, "INSERT INTO customers VALUES ('acme', 9, 'c')"))
    await conn.execute(rewrite(engine, "INSERT INTO customers (customer_id, name) VALUES (10, 'd')"))
    assert [tuple(r) for r in await conn.fetch(
        "SELECT tenant_id, customer_id, name FROM customers WHERE customer_id IN (9, 10) ORDER BY 2")] == [
        ("acme", 9, "c"), ("acme", 10, "d")]
    # no column list and a value in the tenant column's place that is not acme's: refused
    d = engine.check("INSERT INTO customers VALUES (11, 'e')", ACME)
    assert isinstance(d, Refuse) and d.sqlstate == "42501", d
    await conn.execute(
        rewrite(engine, "INSERT INTO orders (order_id, customer_id) SELECT order_id + 100, customer_id FROM orders")
    )
    assert await conn.fetchval("SELECT count(*) FROM orders WHERE tenant_id = 'acme' AND order_id > 100") == 3
    # ON CONFLICT DO UPDATE never touches globex (globex has order 1 too; the key includes tenant_id)
    await conn.execute(rewrite(engine, "INSERT INTO orders (order_id, customer_id) VALUES (1, 1) ON CONFLICT (tenant_id, order_id) DO UPDATE SET status = 'again'"))
    assert await conn.fetchval("SELECT status FROM orders WHERE tenant_id = 'acme' AND order_id = 1") == "again"


async def test_on_conflict_with_key_lacking_tenant_column(conn, engine):
    # a unique key without tenant_id: a conflict with a globex row must not update it
    await conn.execute("CREATE UNIQUE INDEX tmp_email_idx ON customers (email)")
    await conn.execute("INSERT INTO customers VALUES ('globex', 9, 'Mr Burns', 'shared@example')")
    sql = "INSERT INTO customers (customer_id, name, email) VALUES (9, 'x', 'shared@example') ON CONFLICT (email) DO UPDATE SET name = 'stolen'"
    # like RLS, the statement fails (without showing the other tenant's value) and changes nothing
    with pytest.raises(asyncpg.PostgresError) as e:
        async with conn.transaction():  # a savepoint, rolled back by the error
            await conn.execute(rewrite(engine, sql))
    assert "another tenant" in str(e.value) and "globex" not in str(e.value)
    assert await conn.fetchval("SELECT name FROM customers WHERE email = 'shared@example'") == "Mr Burns"
    # the tenant's own conflicting row is updated
    await conn.execute("INSERT INTO customers VALUES ('acme', 77, 'Mine', 'mine@example')")
    sql = "INSERT INTO customers (customer_id, name, email) VALUES (78, 'x', 'mine@example') ON CONFLICT (email) DO UPDATE SET name = 'updated' RETURNING customer_id"
    assert await conn.fetchval(rewrite(engine, sql)) == 77
    await conn.execute("DELETE FROM customers WHERE customer_id = 77")
    await conn.execute("DELETE FROM customers WHERE email = 'shared@example'")
    await conn.execute("DROP INDEX tmp_email_idx")


async def test_merge_only_own_rows(conn, engine):
    sql = """
    MERGE INTO orders o USING (VALUES (1, 'merged'), (9, 'new')) AS v(id, st) ON o.order_id = v.id
    WHEN MATCHED THEN UPDATE SET status = v.st
    WHEN NOT MATCHED THEN INSERT (order_id, customer_id, status) VALUES (v.id, 1, v.st)
    """
    await conn.execute(rewrite(engine, sql))
    got = await conn.fetch("SELECT order_id, status FROM orders WHERE tenant_id = 'acme' AND order_id IN (1, 9) ORDER BY 1")
    assert [tuple(r) for r in got] == [(1, "merged"), (9, "new")]


async def test_parameter_in_tenant_column(conn, engine):
    d = engine.check("INSERT INTO customers (tenant_id, customer_id, name) VALUES ($1, $2, $3)", ACME, Origin.PARSE)
    assert isinstance(d, Forward) and [i for i, _ in d.param_checks] == [0]
    check = d.param_checks[0][1]
    assert check.accepts(0, b"acme") and check.accepts(1, b"acme")
    assert not check.accepts(0, b"globex") and not check.accepts(0, None)
    await conn.execute(d.sql, "acme", 11, "p")


async def test_copy_to_and_from(conn, engine):
    sql = rewrite(engine, "COPY orders (order_id, status) TO STDOUT")
    import io

    buf = io.BytesIO()
    await conn.copy_from_query(sql.removeprefix("COPY (").rsplit(") TO STDOUT", 1)[0], output=buf)
    assert buf.getvalue().decode().splitlines() == ["1\topen", "2\tshipped", "3\topen"]
    d = engine.check("COPY customers (tenant_id, customer_id, name) FROM STDIN (FORMAT csv)", ACME)
    assert isinstance(d, Forward) and d.copy_in_check is not None
    chk = d.copy_in_check()
    assert chk.feed(b'acme,20,"a,\n') is None
    assert chk.feed(b'b"\nacme,21,c\n') is None
    assert chk.finish() is None
    chk = d.copy_in_check()
    assert chk.feed(b"acme,22,x\nglobex,23,y\n") is not None


async def test_explain_and_prepare(conn, engine):
    plan = await conn.fetch(rewrite(engine, "EXPLAIN (COSTS OFF) SELECT * FROM orders"))
    # the plan (whatever its shape) filters on acme's tenant: a Filter or Recheck/Index Cond line
    assert any("(tenant_id = 'acme'::text)" in r[0] for r in plan), [r[0] for r in plan]
    await conn.execute(rewrite(engine, "PREPARE q AS SELECT count(*) FROM orders WHERE status = $1"))
    ctx = PolicyContext(tenant="acme", prepared_names=frozenset({"q"}))
    assert await conn.fetchval(rewrite(engine, "EXECUTE q('open')", ctx)) == 2
    await conn.execute("DEALLOCATE q")


async def test_unknown_relation_then_refresh(demo_db, engine):
    c = await asyncpg.connect(demo_db)
    try:
        await c.execute("CREATE TABLE IF NOT EXISTS invoices (tenant_id text NOT NULL, n int)")
        d = engine.check("SELECT * FROM invoices", ACME)
        assert isinstance(d, Refuse) and d.sqlstate == "42P01"
        await engine.catalog_manager.refresh("test")
        d = engine.check("SELECT * FROM invoices", ACME)
        assert isinstance(d, Forward) and "tenant_id" in d.sql
    finally:
        await c.execute("DROP TABLE invoices")
        await c.close()


async def test_group_by_primary_key_across_an_outer_join_using(conn, engine):
    # the nullable side stays a base relation (guard join), so PostgreSQL's functional dependency
    # on its primary key holds: no 42803, and only own rows
    sql = ("SELECT o.order_id, o.status, count(c.name) FROM customers c RIGHT JOIN orders o USING (customer_id) "
           "GROUP BY o.tenant_id, o.order_id ORDER BY 1")
    got = await rows(conn, engine, sql)
    assert [r[0] for r in got] == [1, 2, 3]
    sql = ("SELECT c.name, count(o.order_id) FROM customers c FULL JOIN orders o USING (tenant_id, customer_id) "
           "GROUP BY c.tenant_id, c.customer_id ORDER BY 1")
    assert await rows(conn, engine, sql) == [(n, k) for n, k in await conn.fetch(
        "SELECT c.name, count(o.order_id) FROM customers c FULL JOIN orders o USING (tenant_id, customer_id) "
        "WHERE coalesce(c.tenant_id, o.tenant_id) = 'acme' GROUP BY c.tenant_id, c.customer_id ORDER BY 1")]
    # SELECT * keeps its columns (the guard has none)
    star = await conn.fetch(rewrite(engine, "SELECT * FROM customers NATURAL LEFT JOIN orders LIMIT 1"))
    assert list(star[0].keys()) == list((await conn.fetch(
        "SELECT * FROM customers NATURAL LEFT JOIN orders LIMIT 1"))[0].keys())
