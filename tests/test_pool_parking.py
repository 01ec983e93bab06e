"""Parked connections (issue 17): at the end of a transaction a pooled connection goes back to
the pool but stays wired to the session that used it, so that session's next transaction skips
the unwiring and rewiring.  Anyone else may take it at any time.  What a user must not notice:

* another client takes the parked connection and each still sees only its own tenant;
* PostgreSQL ends a parked connection: the client that parked it gets no error and goes on
  on a new connection;
* a client that leaves while parked leaves its connection idle for the next one;
* RECONNECT closes a parked connection like any idle one;
* SHOW CLIENTS / SHOW POOLS count a parked session as idle, its connection as sv_idle.

``pool: {mode: transaction, size: 1}`` in front of the demo's database.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from support.pool import serve_pooled

POOL = {"mode": "transaction", "size": 1, "queue_timeout_s": 5}


@pytest.fixture(scope="module")
def px(demo, tmp_path_factory):  # noqa: F811
    with serve_pooled(demo, tmp_path_factory.mktemp("poolparking"), POOL) as proxy:
        yield proxy


async def _tenants_seen(conn) -> tuple[str, set[str]]:
    setting = await conn.fetchval("SELECT current_setting('tenantgate.tenant_id')")
    rows = await conn.fetch("SELECT DISTINCT tenant_id FROM customers")
    return setting, {r[0] for r in rows}


async def test_another_client_takes_the_parked_connection_and_each_sees_only_its_tenant(px):
    a = await asyncpg.connect(px.dsn("acme"))
    b = await asyncpg.connect(px.dsn("globex"))
    try:
        pids = set()
        for _ in range(3):  # one connection: every turn takes it from the other client's parking
            assert await _tenants_seen(a) == ("acme", {"acme"})
            pids.add(await a.fetchval("SELECT pg_backend_pid()"))
            assert await _tenants_seen(b) == ("globex", {"globex"})
            pids.add(await b.fetchval("SELECT pg_backend_pid()"))
        assert len(pids) == 1, f"pool.size 1 opened more than one connection: {pids}"
        # a transaction of one client, and the other waits for it rather than sharing it
        async with a.transaction():
            assert await a.fetchval("SELECT min(tenant_id) FROM orders") == "acme"
            waiting = asyncio.ensure_future(b.fetchval("SELECT min(tenant_id) FROM orders"))
            await asyncio.sleep(0.3)
            assert not waiting.done()
        assert await waiting == "globex"
        assert await a.fetchval("SELECT min(tenant_id) FROM orders") == "acme"
    finally:
        await a.close()
        await b.close()


async def test_a_parked_connection_that_postgresql_ends_goes_unnoticed(px, demo):
    admin = await asyncpg.connect(demo.admin)
    a = await asyncpg.connect(px.dsn("acme"))
    try:
        first = await a.fetchval("SELECT pg_backend_pid()")
        assert await px.backend_pids(admin) == [first]
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", first)
        deadline = time.monotonic() + 10
        while first in await px.backend_pids(admin):
            assert time.monotonic() < deadline, "the pooled backend did not end"
            await asyncio.sleep(0.1)
        # the FATAL PostgreSQL sent on the idle connection never reaches the client
        assert await _tenants_seen(a) == ("acme", {"acme"})
        second = await a.fetchval("SELECT pg_backend_pid()")
        assert second != first
        assert await a.fetchval("SELECT count(*) FROM customers WHERE tenant_id = 'globex'") == 0
    finally:
        await a.close()
        await admin.close()


async def test_a_client_that_leaves_while_parked_leaves_its_connection_to_the_next(px, demo):
    admin = await asyncpg.connect(demo.admin)
    try:
        a = await asyncpg.connect(px.dsn("acme"))
        pid = await a.fetchval("SELECT pg_backend_pid()")
        await a.close()
        b = await asyncpg.connect(px.dsn("globex"))
        try:
            assert await b.fetchval("SELECT pg_backend_pid()") == pid
            assert await _tenants_seen(b) == ("globex", {"globex"})
            assert await px.backend_pids(admin) == [pid]
        finally:
            await b.close()
    finally:
        await admin.close()


async def test_reconnect_closes_a_parked_connection(px):
    a = await asyncpg.connect(px.dsn("acme"))
    try:
        before = await a.fetchval("SELECT pg_backend_pid()")
        await asyncio.to_thread(px.console, "RECONNECT")
        assert await _tenants_seen(a) == ("acme", {"acme"})
        assert await a.fetchval("SELECT pg_backend_pid()") != before
    finally:
        await a.close()


async def test_the_console_counts_a_parked_session_as_idle(px):
    a = await asyncpg.connect(px.dsn("acme"))
    try:
        assert await a.fetchval("SELECT 1") == 1
        clients = [c for c in await asyncio.to_thread(px.console, "SHOW CLIENTS") if c["user"] == "acme_app"]
        assert [c["state"] for c in clients] == ["idle"]
        pools = [p for p in await asyncio.to_thread(px.console, "SHOW POOLS") if p["pool_mode"] == "transaction"]
        assert [(p["cl_active"], p["sv_active"], p["sv_idle"]) for p in pools] == [("1", "0", "1")]
        async with a.transaction():
            await a.fetchval("SELECT 1")
            clients = [c for c in await asyncio.to_thread(px.console, "SHOW CLIENTS") if c["user"] == "acme_app"]
            assert [c["state"] for c in clients] == ["active"]
    finally:
        await a.close()
