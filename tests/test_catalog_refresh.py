"""A table created by a migration straight on PostgreSQL is usable by the first statement.

Issue 14 item 7: the catalog snapshot is refreshed periodically, so the first statements on a
new table used to be refused (42P01 "not known to tenantgate") until the next refresh: all 16
pgbench clients that start together failed.  Now a statement naming a relation the snapshot
lacks waits for one fresh snapshot (shared by every session that waits) and is checked again
before it is refused.  A relation that really does not exist is still 42P01.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import psycopg
import pytest

from support.e2e import admin_execute


def _migrate(demo, name: str) -> None:
    """What a migration does: a tenant table, its grants and the backstop's policies
    (deploy/postgres/bootstrap.sql section 4, for one table)."""
    pred = "tenant_id = (SELECT tenantgate_guard.current_tenant()::text)"
    wpred = "tenant_id = (SELECT tenantgate_guard.current_writer()::text)"
    with psycopg.connect(demo.admin, autocommit=True) as a:
        with a.transaction():
            a.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, tenant_id text NOT NULL, note text)")
            a.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {name} TO tenantgate_app")
            a.execute(f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY")
            a.execute(f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY")
            a.execute(f"CREATE POLICY tenantgate_tenant_access ON {name} AS PERMISSIVE FOR ALL TO PUBLIC "
                      "USING (true) WITH CHECK (true)")
            a.execute(f"CREATE POLICY tenantgate_tenant_isolation ON {name} AS RESTRICTIVE FOR ALL TO PUBLIC "
                      f"USING ({pred}) WITH CHECK ({wpred})")
            a.execute(f"CREATE POLICY tenantgate_tenant_update ON {name} AS RESTRICTIVE FOR UPDATE TO PUBLIC "
                      f"USING ({wpred})")
            a.execute(f"CREATE POLICY tenantgate_tenant_delete ON {name} AS RESTRICTIVE FOR DELETE TO PUBLIC "
                      f"USING ({wpred})")
            a.execute(f"INSERT INTO {name} VALUES (1, 'acme', 'a1'), (2, 'globex', 'g2'), (3, 'acme', 'a3')")


async def test_sixteen_clients_first_statement_on_a_new_table_works(demo):
    name = "mig_" + uuid.uuid4().hex[:8]
    conns = [await asyncpg.connect(demo.app(("acme", "globex")[i % 2])) for i in range(16)]
    try:
        # the sessions exist before the migration: their snapshot cannot know the table
        assert all(await asyncio.gather(*(c.fetchval("SELECT 1") for c in conns)))
        _migrate(demo, name)

        async def first(i: int, c):
            if i % 4 == 3:  # extended protocol with a parameter (Parse)
                return await c.fetch(f"SELECT id, tenant_id FROM {name} WHERE id > $1 ORDER BY id", 0)
            return await c.fetch(f"SELECT id, tenant_id FROM {name} ORDER BY id")

        results = await asyncio.gather(*(first(i, c) for i, c in enumerate(conns)))
        for i, rows in enumerate(results):
            tenant = ("acme", "globex")[i % 2]
            expected = [(1, "acme"), (3, "acme")] if tenant == "acme" else [(2, "globex")]
            assert [tuple(r) for r in rows] == expected, i
        # writes go through the rewriter as for any tenant table
        await conns[0].execute(f"INSERT INTO {name} (id, note) VALUES (10, 'new')")
        with psycopg.connect(demo.admin) as a:
            assert a.execute(f"SELECT tenant_id FROM {name} WHERE id = 10").fetchone() == ("acme",)
    finally:
        await asyncio.gather(*(c.close() for c in conns))
        admin_execute(demo, f"DROP TABLE IF EXISTS {name}")


def test_first_simple_query_on_a_new_table_through_psycopg(demo):
    name = "mig_" + uuid.uuid4().hex[:8]
    with psycopg.connect(demo.app("globex"), autocommit=True) as conn:
        conn.execute("SELECT 1")
        _migrate(demo, name)
        try:
            rows = conn.execute(f"SELECT id, note FROM {name}", prepare=False).fetchall()
            assert rows == [(2, "g2")]
        finally:
            admin_execute(demo, f"DROP TABLE IF EXISTS {name}")


@pytest.mark.parametrize("prepare", [False, True])
def test_a_relation_that_does_not_exist_is_still_42p01_and_the_session_goes_on(demo, prepare):
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        for _ in range(3):
            with pytest.raises(psycopg.errors.UndefinedTable):
                conn.execute("SELECT * FROM no_such_table_at_all", prepare=prepare)
        assert conn.execute("SELECT count(*) FROM customers").fetchone()[0] > 0
        # in a pipeline of statements after the unknown one nothing else runs (as in PostgreSQL)
        with pytest.raises(psycopg.errors.UndefinedTable):
            with conn.transaction():
                conn.execute("INSERT INTO customers (customer_id, name, email) VALUES (987654, 'x', 'x@x')")
                conn.execute("SELECT * FROM no_such_table_either", prepare=prepare)
        assert conn.execute("SELECT count(*) FROM customers WHERE customer_id = 987654").fetchone()[0] == 0


async def test_the_bootstraps_ddl_event_trigger_makes_tenantgate_refresh(demo):
    """bootstrap.sql section 7: DDL NOTIFYs tenantgate_catalog; a listening CatalogManager reloads."""
    from proxy.catalog_sync import CatalogManager
    from proxy.policy.catalog import CatalogSnapshot

    loads = []
    snap = CatalogSnapshot(relations={}, search_path=("public",), version=1)

    async def loader():
        loads.append(1)
        return mgr.snapshot

    mgr = CatalogManager(snap, loader)
    mgr.min_on_demand_interval_s = 0.0
    mgr.start_listening(demo.admin)
    try:
        # the listener refreshes once when it connects; wait for that, then cause DDL
        for _ in range(200):
            if loads:
                break
            await asyncio.sleep(0.05)
        assert loads, "the listener never connected"
        await asyncio.sleep(0.2)
        before = len(loads)
        name = "ddl_" + uuid.uuid4().hex[:8]
        admin_execute(demo, f"CREATE TABLE {name} (x int)")
        admin_execute(demo, f"DROP TABLE {name}")
        for _ in range(200):
            if len(loads) > before:
                break
            await asyncio.sleep(0.05)
        assert len(loads) > before, "no refresh after DDL"
    finally:
        await mgr.close()
