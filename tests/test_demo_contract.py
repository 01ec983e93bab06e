"""The demo contract other tools depend on: `tenantgate demo --state-dir --listen` and dsns.json."""

import asyncpg
import psycopg



def test_dsns_json_has_the_contract_shape(demo):
    assert set(demo.dsns) == {"app", "operator", "backend_admin"}
    assert set(demo.dsns["app"]) == {"acme", "globex"}
    assert demo.dsns["operator"], "at least one operator account"
    for dsn in [*demo.dsns["app"].values(), *demo.dsns["operator"].values()]:
        assert f":{demo.port}/" in dsn


async def test_each_tenant_dsn_sees_only_its_own_rows(demo):
    # The demo's backend role is under the RLS backstop, so this checks the contract, not who
    # filtered: test_e2e_bypassrls.py runs the same checks with a BYPASSRLS backend role.
    admin = await asyncpg.connect(demo.admin)
    try:
        totals = dict(await admin.fetch("SELECT tenant_id, count(*) FROM orders GROUP BY 1"))
    finally:
        await admin.close()
    assert totals.get("acme") and totals.get("globex"), "the demo seeds both tenants"
    for tenant in ("acme", "globex"):
        conn = await asyncpg.connect(demo.app(tenant))
        try:
            for table in ("customers", "orders", "order_items"):
                tenants = {r[0] for r in await conn.fetch(f"SELECT tenant_id FROM {table}")}
                assert tenants == {tenant}, table
            assert await conn.fetchval("SELECT count(*) FROM orders") == totals[tenant]
            assert await conn.fetchval("SELECT count(*) FROM products") > 0  # shared table
        finally:
            await conn.close()


def test_simple_protocol_sees_only_own_rows_too(demo):
    with psycopg.connect(demo.app("globex"), autocommit=True) as conn:
        rows = conn.execute("SELECT DISTINCT tenant_id FROM orders", prepare=False).fetchall()
        assert rows == [("globex",)]
        # several statements in one Query message
        cur = conn.execute("SELECT count(*) FROM customers WHERE tenant_id = 'acme'; SELECT 1", prepare=False)
        assert cur.fetchone() == (0,)  # acme's customers are invisible to globex
        assert cur.nextset() and cur.fetchone() == (1,)


def test_backend_admin_dsn_is_direct_superuser(demo):
    with psycopg.connect(demo.admin) as conn:
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (True,)
        assert conn.execute("SELECT count(DISTINCT tenant_id) FROM orders").fetchone() == (2,)
