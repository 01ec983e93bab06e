"""PAUSE and RESUME in front of a busy transaction pool: a session held by PAUSE never sits on a
pooled connection it does not use, so the sessions PAUSE waits for can get one.

Before the fix a session that had waited for a connection and got one just after PAUSE began was
held with the connection still lent to it.  The next waiting session (which PAUSE counts as
in flight) could never get a connection, PAUSE hung until that session's queue timeout, and the
client got 53300.  What a user notices, and what is checked here:

* PAUSE returns once the open transaction ends, with two more clients queued behind it, and
  after RESUME both queued clients get their rows, no error;
* PAUSE / RESUME every 50 ms while six clients of two tenants run transactions on a pool of two
  with ``max_per_tenant: 1``: every transaction succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest

from proxy.wire import messages as m
from support.e2e import RawClient, data_rows
from support.pool import ADMIN_PASSWORD, ADMIN_USER, serve_pooled


@pytest.fixture(scope="module")
def px(demo, tmp_path_factory):  # noqa: F811
    pool = {"mode": "transaction", "size": 2, "max_per_tenant": 1, "queue_timeout_s": 5}
    with serve_pooled(demo, tmp_path_factory.mktemp("poolpausehold"), pool) as proxy:
        yield proxy


async def _console(px) -> asyncpg.Connection:
    return await asyncpg.connect(px.dsn_for(ADMIN_USER, ADMIN_PASSWORD, "tenantgate"), statement_cache_size=0)


async def _waiting(px) -> int:
    rows = await asyncio.to_thread(px.console, "SHOW POOLS")  # simple protocol only: psql
    return sum(int(r["cl_waiting"]) for r in rows if r["database"] == "app")


async def test_pause_with_clients_queued_behind_an_open_transaction(px):
    console = await _console(px)
    holder = await asyncpg.connect(px.dsn("acme"))
    queued = [await asyncpg.connect(px.dsn("acme")) for _ in range(2)]
    try:
        tx = holder.transaction()
        await tx.start()  # acme's one connection (max_per_tenant 1) is in a transaction
        assert await holder.fetchval("SELECT min(tenant_id) FROM orders") == "acme"
        reads = [asyncio.ensure_future(c.fetch("SELECT DISTINCT tenant_id FROM customers")) for c in queued]
        for _ in range(200):
            if await _waiting(px) == 2:
                break
            await asyncio.sleep(0.05)
        assert await _waiting(px) == 2, "the two acme clients did not queue behind the open transaction"
        pause = asyncio.ensure_future(console.execute("PAUSE"))
        await asyncio.sleep(0.3)
        assert not pause.done(), "PAUSE returned while a transaction was open"
        await tx.commit()
        await asyncio.wait_for(pause, 30)  # the queued clients get the connection in turn, are held, and give it back
        answered = [repr(r.exception() or r.result()) for r in reads if r.done()]
        assert answered == [], f"a queued client got an answer while paused: {answered}"
        await console.execute("RESUME")
        results = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 30)
        assert [sorted(r[0] for r in res) if isinstance(res, list) else repr(res) for res in results] == [
            ["acme"], ["acme"]]
    finally:  # a held session reads nothing from its client, Terminate included: RESUME first
        with contextlib.suppress(asyncpg.PostgresError):  # (not paused)
            await console.execute("RESUME")
        await console.close()
        for c in [holder, *queued]:
            c.terminate()


async def test_pause_resume_churn_under_load_loses_no_transaction(px):
    console = await _console(px)
    stop = asyncio.Event()
    failures: list[str] = []
    done = 0

    async def client(tenant: str) -> None:
        nonlocal done
        conn = await asyncpg.connect(px.dsn(tenant))
        try:
            for _ in range(100):
                try:
                    async with conn.transaction():
                        seen = await conn.fetch("SELECT DISTINCT tenant_id FROM customers")
                        assert [r[0] for r in seen] == [tenant]
                    done += 1
                except asyncpg.PostgresError as e:
                    failures.append(f"{tenant}: {e.sqlstate} {e}")
                    return
        finally:
            conn.terminate()

    async def churn() -> int:
        rounds = 0
        while not stop.is_set():
            await console.execute("PAUSE")
            await asyncio.sleep(0.05)
            await console.execute("RESUME")
            await asyncio.sleep(0.05)
            rounds += 1
        return rounds

    churning = asyncio.ensure_future(churn())
    try:
        await asyncio.wait_for(asyncio.gather(*(client(t) for t in ["acme", "globex"] * 3)), 120)
    finally:
        stop.set()
        rounds = await asyncio.wait_for(churning, 30)
        with contextlib.suppress(asyncpg.PostgresError):  # (the churn ends resumed)
            await console.execute("RESUME")
        await console.close()
    assert failures == []
    assert done == 600
    assert rounds >= 1


async def test_a_held_client_that_leaves_is_noticed_while_paused(px):
    console = await _console(px)
    leaving = await asyncpg.connect(px.dsn("globex"))
    try:
        before = len(await asyncio.to_thread(px.console, "SHOW CLIENTS"))
        await console.execute("PAUSE")
        held = asyncio.ensure_future(leaving.fetch("SELECT 1"))
        await asyncio.sleep(0.3)
        assert not held.done()
        leaving.terminate()  # the client goes away while its statement is held
        with contextlib.suppress(asyncpg.InterfaceError, asyncpg.PostgresError, ConnectionError):
            await held
        for _ in range(100):
            if len(await asyncio.to_thread(px.console, "SHOW CLIENTS")) == before - 1:
                break
            await asyncio.sleep(0.1)
        assert len(await asyncio.to_thread(px.console, "SHOW CLIENTS")) == before - 1, \
            "the held session of a client that left is still listed while paused"
    finally:
        with contextlib.suppress(asyncpg.PostgresError):
            await console.execute("RESUME")
        await console.close()


async def test_a_held_client_pipelining_a_megabyte_loses_nothing(px):
    """Far more than the read-ahead arrives while held: reading stops, then resumes on RESUME,
    and every statement is answered in order."""
    console = await _console(px)
    client = RawClient(px.dsn("acme"), timeout=60)
    n = 2000
    batch = b"".join(m.encode_query(f"SELECT {i} /* {'x' * 500} */") for i in range(n))  # about 1 MB

    def send_and_read() -> list:
        client.send(batch)  # blocks once the proxy stops reading and the kernel buffers are full
        values = []
        for _ in range(n):
            values += [row[0] for row in data_rows(client.until_ready())]
        return values

    try:
        await console.execute("PAUSE")
        pipelined = asyncio.ensure_future(asyncio.to_thread(send_and_read))
        await asyncio.sleep(0.5)
        assert not pipelined.done()
        await console.execute("RESUME")
        assert await asyncio.wait_for(pipelined, 60) == [str(i).encode() for i in range(n)]
    finally:
        with contextlib.suppress(asyncpg.PostgresError):
            await console.execute("RESUME")
        await console.close()
        client.close()
