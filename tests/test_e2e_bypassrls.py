"""End-to-end isolation with the RLS backstop out of the way: only tenantgate separates tenants.

The demo's backend role is subject to the row-level-security backstop, so an end-to-end test
through the demo would pass even with a proxy that adds no filter.  Here ``tenantgate serve``
runs the demo's own configuration (users, rules, tokens, control) with a backend role that has
BYPASSRLS (a member of the demo's backend role, so it has the same privileges), in transaction
pooling mode.  A self-check first shows that this role really sees every tenant's rows.
"""

from __future__ import annotations

import asyncpg
import psycopg
import pytest
import yaml

from support.e2e import assert_refused_by_tenantgate, token
from support.pool import serve_pooled

BYPASS_ROLE, BYPASS_PW = "tg_e2e_bypassrls", "tg-e2e-bypassrls-pw"
TABLES = ("customers", "orders", "order_items")


@pytest.fixture(scope="module")
def backend(demo):  # noqa: F811
    raw = yaml.safe_load(demo.config_path.read_text())["backend"]
    with psycopg.connect(demo.admin, autocommit=True) as c:
        c.execute(f"""DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{BYPASS_ROLE}') THEN
              CREATE ROLE {BYPASS_ROLE} LOGIN BYPASSRLS PASSWORD '{BYPASS_PW}';
            END IF; END $$""")
        c.execute(f'GRANT "{raw["user"]}" TO {BYPASS_ROLE}')
    return raw


@pytest.fixture(scope="module")
def bypass(demo, backend, tmp_path_factory):  # noqa: F811
    with serve_pooled(demo, tmp_path_factory.mktemp("bypassrls"), {"mode": "transaction", "size": 2},
                      backend={"user": BYPASS_ROLE, "password": BYPASS_PW}) as px:
        yield px


def test_the_backend_role_of_this_variant_bypasses_rls(demo, backend):  # noqa: F811
    direct = (f"postgresql://{BYPASS_ROLE}:{BYPASS_PW}@{backend['host']}:{backend['port']}/{backend['database']}"
              "?sslmode=require")
    with psycopg.connect(direct, autocommit=True) as c:
        for table in TABLES:
            tenants = {r[0] for r in c.execute(f"SELECT DISTINCT tenant_id FROM {table}")}
            assert {"acme", "globex"} <= tenants, (table, tenants)


def _totals(demo, table):  # noqa: F811
    with psycopg.connect(demo.admin, autocommit=True) as c:
        return dict(c.execute(f"SELECT tenant_id, count(*) FROM {table} GROUP BY 1").fetchall())


@pytest.mark.parametrize("tenant", ["acme", "globex"])
async def test_extended_protocol_sees_only_own_rows(demo, bypass, tenant):  # noqa: F811
    conn = await asyncpg.connect(bypass.dsn(tenant))
    try:
        for table in TABLES:
            assert {r[0] for r in await conn.fetch(f"SELECT tenant_id FROM {table}")} == {tenant}, table
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == _totals(demo, table)[tenant]
            # a predicate naming the other tenant finds nothing
            other = "globex" if tenant == "acme" else "acme"
            assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE tenant_id = $1", other) == 0
        assert await conn.fetchval("SELECT count(*) FROM products") > 0  # shared table
    finally:
        await conn.close()


@pytest.mark.parametrize("tenant", ["acme", "globex"])
def test_simple_protocol_sees_only_own_rows(demo, bypass, tenant):  # noqa: F811
    with psycopg.connect(bypass.dsn(tenant), autocommit=True) as conn:
        for table in TABLES:
            rows = conn.execute(f"SELECT DISTINCT tenant_id FROM {table}", prepare=False).fetchall()
            assert rows == [(tenant,)], table
        # several statements in one Query message
        cur = conn.execute("SELECT count(*) FROM customers; SELECT count(*) FROM orders", prepare=False)
        assert cur.fetchone() == (_totals(demo, "customers")[tenant],)
        assert cur.nextset() and cur.fetchone() == (_totals(demo, "orders")[tenant],)


def test_writes_touch_only_own_rows(demo, bypass):  # noqa: F811
    before = {t: _totals(demo, t) for t in TABLES}
    with psycopg.connect(bypass.dsn("acme")) as conn:  # one transaction, rolled back
        assert conn.execute("UPDATE orders SET status = status").rowcount == before["orders"]["acme"]
        assert conn.execute("DELETE FROM order_items").rowcount == before["order_items"]["acme"]
        with pytest.raises(psycopg.Error) as e:
            conn.execute("INSERT INTO customers (tenant_id, customer_id, name) VALUES ('globex', 999001, 'x')")
        assert_refused_by_tenantgate(e.value)
        conn.rollback()
    assert {t: _totals(demo, t) for t in TABLES} == before


def test_token_session_follows_its_tenant(demo, bypass):  # noqa: F811
    with psycopg.connect(bypass.pool_dsn(), autocommit=True) as conn:
        for tenant in ("acme", "globex", "acme"):
            conn.execute(f"SET tenantgate.tenant = '{token(demo, tenant)}'")
            assert conn.execute("SELECT DISTINCT tenant_id FROM orders").fetchall() == [(tenant,)]
