"""``pool.client_idle_timeout_s``: a client that sends nothing for that long, with no transaction
open, is closed with FATAL 57P05; a client inside a transaction is left alone (that is
``timeouts.idle_in_transaction_s``'s business)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from support.pool import serve_pooled

POOL = {"mode": "transaction", "size": 2, "queue_timeout_s": 5, "client_idle_timeout_s": 1.0}


@pytest.fixture(scope="module")
def px(demo, tmp_path_factory):  # noqa: F811
    with serve_pooled(demo, tmp_path_factory.mktemp("poolclientidle"), POOL) as proxy:
        yield proxy


async def test_idle_client_is_closed_and_busy_one_is_not(px):
    idle = await asyncpg.connect(px.dsn("acme"))
    busy = await asyncpg.connect(px.dsn("globex"))
    try:
        assert await idle.fetchval("SELECT 1") == 1
        tx = busy.transaction()
        await tx.start()
        await busy.fetchval("SELECT count(*) FROM customers")
        await asyncio.sleep(3.0)  # sweeps run every second; the limit is 1 s
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await idle.fetchval("SELECT 1")
        # the client in a transaction is still served, and can commit
        assert await busy.fetchval("SELECT min(tenant_id) FROM customers") == "globex"
        await tx.commit()
    finally:
        await idle.close()
        await busy.close()
