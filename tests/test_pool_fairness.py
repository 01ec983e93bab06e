"""pool.max_per_tenant: one tenant flooding the pool does not starve another (issue 17).

``pool: {size: 2, max_per_tenant: 1}``: while a heavy tenant (acme) holds one connection in an
open transaction and a second acme session queues for another, the light tenant (globex) still
gets the second connection and runs its transaction; the queued acme session keeps waiting even
though a connection is idle again (its tenant is at its limit), and goes on once acme's first
transaction ends.  Every session sees only its own tenant's rows.  Without the limit the second
acme session would take the second connection and globex would queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request

import asyncpg
import pytest

from support.pool import serve_pooled
from support.proxy_harness import wait_until

POOL = {"mode": "transaction", "size": 2, "max_per_tenant": 1, "queue_timeout_s": 60}
TENANT_ROWS = "SELECT DISTINCT tenant_id FROM customers"


@pytest.fixture(scope="module")
def px(demo, tmp_path_factory):  # noqa: F811
    with serve_pooled(demo, tmp_path_factory.mktemp("pool_fair"), POOL, metrics=True) as proxy:
        yield proxy


def _metric(px, name: str) -> float:
    """A sample without labels from /metrics."""
    with urllib.request.urlopen(px.metrics_url(), timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def _waiting(px, user: str) -> int:
    """Sessions of ``user`` queued for a pooled connection (SHOW CLIENTS)."""
    return sum(1 for r in px.console("SHOW CLIENTS") if r["user"] == user and r["state"] == "waiting")


async def test_light_tenant_gets_a_connection_while_heavy_tenant_floods(px):
    heavy1 = await asyncpg.connect(px.dsn("acme"))
    heavy2 = await asyncpg.connect(px.dsn("acme"))
    light = await asyncpg.connect(px.dsn("globex"))
    queued = None
    try:
        await heavy1.execute("BEGIN")
        assert {r[0] for r in await heavy1.fetch(TENANT_ROWS)} == {"acme"}  # holds connection 1
        queued = asyncio.get_running_loop().create_task(heavy2.fetch(TENANT_ROWS))
        # the second acme session queues although connection 2 is free: acme is at its limit
        await asyncio.to_thread(wait_until, lambda: _waiting(px, "acme_app") == 1, 20, 0.05,
                                "the second acme session to queue")
        waits_before = _metric(px, "tenantgate_pool_wait_seconds_count")
        # the queued session shows in the pool gauge (published once a second)
        await asyncio.to_thread(wait_until, lambda: _metric(px, "tenantgate_pool_waiting_clients") == 1, 20, 0.1,
                                "tenantgate_pool_waiting_clients to count the queued session")
        # the light tenant is served meanwhile, on the second connection
        async with light.transaction():
            assert {r[0] for r in await light.fetch(TENANT_ROWS)} == {"globex"}
            assert await light.fetchval("SELECT count(*) FROM customers WHERE tenant_id = 'acme'") == 0
        # connection 2 is idle again, yet acme's queued session still waits for acme's own
        assert not queued.done()
        assert await asyncio.to_thread(_waiting, px, "acme_app") == 1
        await heavy1.execute("COMMIT")
        rows = await asyncio.wait_for(queued, 30)
        assert {r[0] for r in rows} == {"acme"}
        assert _metric(px, "tenantgate_pool_wait_seconds_count") == waits_before + 1
        await asyncio.to_thread(wait_until, lambda: _metric(px, "tenantgate_pool_waiting_clients") == 0, 20, 0.1,
                                "tenantgate_pool_waiting_clients back to 0")
        # and with nothing held, acme runs again, on either connection
        assert {r[0] for r in await heavy1.fetch(TENANT_ROWS)} == {"acme"}
    finally:
        if queued is not None and not queued.done():
            queued.cancel()
        for c in (heavy1, heavy2, light):
            await c.close()


async def test_a_queued_client_that_leaves_gives_up_its_place(px):
    heavy1 = await asyncpg.connect(px.dsn("acme"))
    leaving = await asyncpg.connect(px.dsn("acme"))
    later = await asyncpg.connect(px.dsn("acme"))
    try:
        await heavy1.execute("BEGIN")
        assert {r[0] for r in await heavy1.fetch(TENANT_ROWS)} == {"acme"}  # acme is at its limit
        gone = asyncio.get_running_loop().create_task(leaving.fetch(TENANT_ROWS))
        await asyncio.to_thread(wait_until, lambda: _waiting(px, "acme_app") == 1, 20, 0.05,
                                "the second acme session to queue")
        leaving.terminate()  # leaves while queued: noticed at once, its place is given up
        with contextlib.suppress(asyncpg.InterfaceError, asyncpg.PostgresError, ConnectionError):
            await gone
        await asyncio.to_thread(wait_until, lambda: _waiting(px, "acme_app") == 0, 20, 0.05,
                                "the queued session of the client that left to go")
        queued = asyncio.get_running_loop().create_task(later.fetch(TENANT_ROWS))
        await asyncio.to_thread(wait_until, lambda: _waiting(px, "acme_app") == 1, 20, 0.05,
                                "the third acme session to queue")
        await heavy1.execute("COMMIT")
        assert {r[0] for r in await asyncio.wait_for(queued, 30)} == {"acme"}
        assert await asyncio.to_thread(_waiting, px, "acme_app") == 0
    finally:
        for c in (heavy1, later):
            await c.close()
