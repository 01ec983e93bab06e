"""Pool upkeep settings (issue 8): the idle timeout and the prepared-statement cap close pooled
backend connections, and clients never notice: their next transaction gets a fresh connection,
their named prepared statements are prepared there again.

``pool: {mode: transaction, size: 1, server_idle_timeout_s: 1.5, max_prepared_per_server: 3}``
in front of the demo's database.  (``server_lifetime_s`` closes connections on the same path
as the cap: at release, and in the janitor.)
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from support.pool import serve_pooled

POOL = {"mode": "transaction", "size": 1, "queue_timeout_s": 5, "server_idle_timeout_s": 1.5,
        "max_prepared_per_server": 3}


@pytest.fixture(scope="module")
def px(demo, tmp_path_factory):  # noqa: F811
    with serve_pooled(demo, tmp_path_factory.mktemp("poolupkeep"), POOL) as proxy:
        yield proxy


async def test_statement_cap_recycles_connections_transparently(px, demo):  # noqa: F811
    admin = await asyncpg.connect(demo.admin)
    a = await asyncpg.connect(px.dsn("acme"))
    b = await asyncpg.connect(px.dsn("globex"))
    try:
        stmts = []
        for k in range(5):  # more named statements than one server may hold
            s = await a.prepare(f"SELECT {k} + $1::int, min(tenant_id) FROM customers")
            assert tuple(await s.fetchrow(1)) == (k + 1, "acme")
            stmts.append(s)
        pids = set()
        for _ in range(4):
            for k, s in enumerate(stmts):
                assert tuple(await s.fetchrow(10)) == (k + 10, "acme")
            assert await b.fetchval("SELECT min(tenant_id) || $1::text FROM orders", "!") == "globex!"
            pids.add(await a.fetchval("SELECT pg_backend_pid()"))
            assert len(await px.backend_pids(admin)) <= 1
        assert len(pids) >= 3, f"connections were not recycled: {pids}"
    finally:
        await a.close()
        await b.close()
        await admin.close()


async def test_idle_pooled_connections_are_closed_and_reopened_on_demand(px, demo):  # noqa: F811
    admin = await asyncpg.connect(demo.admin)
    a = await asyncpg.connect(px.dsn("acme"))
    try:
        assert await a.fetchval("SELECT min(tenant_id) FROM customers") == "acme"
        assert len(await px.backend_pids(admin)) == 1
        deadline = time.monotonic() + 10
        while await px.backend_pids(admin):
            assert time.monotonic() < deadline, "the idle pooled connection was never closed"
            await asyncio.sleep(0.2)
        # the client's session is still there and gets a new connection for its next transaction
        assert await a.fetchval("SELECT current_setting('tenantgate.tenant_id')") == "acme"
        assert len(await px.backend_pids(admin)) == 1
    finally:
        await a.close()
        await admin.close()
