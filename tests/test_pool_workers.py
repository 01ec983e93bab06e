"""A worker killed mid-transaction leaves no lasting damage (issue 8, must-show 3).

``tenantgate serve`` with ``workers: 2`` and transaction pooling, in front of the demo's
database.  Clients are spread over both workers by the kernel (SO_REUSEPORT); the
BackendKeyData pid tenantgate hands out says which worker holds a session
(``pid % workers``, proxy/cancel.py), and the worker's OS pid comes from the
supervisor's children (``--index`` on their command line).

One client of the victim worker has inserted a row in an open transaction; another
client, on the surviving worker, too.  After SIGKILL of the victim: its clients get
connection errors, the surviving worker's clients go on (and commit), the uncommitted
row never appears, and the supervisor's replacement worker serves new clients.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import asyncpg
import pytest

from support.e2e import fresh_ids
from support.pool import serve_pooled

WORKERS = 2


@pytest.fixture(scope="module")
def px(demo, tmp_path_factory):  # noqa: F811
    pool = {"mode": "transaction", "size": 4, "queue_timeout_s": 20}
    with serve_pooled(demo, tmp_path_factory.mktemp("poolw"), pool, workers=WORKERS) as proxy:
        yield proxy


def _worker_of(conn: asyncpg.Connection) -> int:
    return conn.get_server_pid() % WORKERS


TENANT: dict[int, str] = {}  # id(connection) -> its tenant


def tenant_of(conn) -> str:
    return TENANT[id(conn)]


async def _clients_on_both_workers(px, per_worker: int = 3, timeout: float = 30) -> dict[int, list]:
    """Open connections until each worker holds ``per_worker`` of them (extra ones are closed)."""
    by_worker: dict[int, list] = {i: [] for i in range(WORKERS)}
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        n += 1
        tenant = ("acme", "globex")[n % 2]
        conn = await asyncpg.connect(px.dsn(tenant))
        TENANT[id(conn)] = tenant
        w = _worker_of(conn)
        if len(by_worker[w]) < per_worker:
            by_worker[w].append(conn)
        else:
            await conn.close()
            await asyncio.sleep(0.05)  # a worker that just started may not listen yet
        if all(len(v) >= per_worker for v in by_worker.values()):
            return by_worker
    raise AssertionError(f"the kernel put no {per_worker} connections on each worker: "
                         f"{ {w: len(v) for w, v in by_worker.items()} }")


async def _wait_gone(admin, backend_pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", backend_pid):
        assert time.monotonic() < deadline, f"backend {backend_pid} outlived its killed worker"
        await asyncio.sleep(0.05)


async def test_killed_worker_mid_transaction_leaves_no_damage(px, demo):  # noqa: F811
    workers = px.worker_pids()
    assert sorted(workers) == list(range(WORKERS)), workers
    admin = await asyncpg.connect(demo.admin)
    victim_id, survivor_id = fresh_ids(2)
    by_worker = await _clients_on_both_workers(px)
    victim_w, other_w = 0, 1
    doomed, alive = by_worker[victim_w], by_worker[other_w]
    try:
        # the victim worker's client: a row inserted in an open transaction
        v = doomed[0]
        v_tx = v.transaction()
        await v_tx.start()
        await v.execute("INSERT INTO customers (customer_id, name) VALUES ($1, 'pool-kill: never committed')",
                        victim_id)
        v_backend = await v.fetchval("SELECT pg_backend_pid()")
        # a client of the surviving worker: also mid-transaction
        s = alive[0]
        s_tx = s.transaction()
        await s_tx.start()
        await s.execute("INSERT INTO customers (customer_id, name) VALUES ($1, 'pool-kill: survivor')", survivor_id)
        # as the backend sees it: both rows are uncommitted
        assert await admin.fetchval("SELECT count(*) FROM customers WHERE customer_id = ANY($1::int[])",
                                    [victim_id, survivor_id]) == 0

        os.kill(workers[victim_w], signal.SIGKILL)

        # the killed worker's clients get connection errors (no answer from another session)
        for c in doomed:
            with pytest.raises((asyncpg.exceptions.ConnectionDoesNotExistError, asyncpg.InterfaceError,
                                ConnectionError, OSError)):
                await asyncio.wait_for(c.fetchval("SELECT 1"), 10)
        # PostgreSQL saw the connection drop and rolled the open transaction back
        await _wait_gone(admin, v_backend)
        assert await admin.fetchval("SELECT count(*) FROM customers WHERE customer_id = $1", victim_id) == 0

        # the other worker's clients keep being served, the open transaction included
        assert await s.fetchval("SELECT name FROM customers WHERE customer_id = $1", survivor_id) == \
            "pool-kill: survivor"
        await s_tx.commit()
        for c in alive:
            assert await c.fetchval("SELECT min(tenant_id) FROM orders") == tenant_of(c)
            assert await c.fetchval("SELECT current_setting('tenantgate.tenant_id')") == tenant_of(c)
        assert await admin.fetchval("SELECT tenant_id FROM customers WHERE customer_id = $1", survivor_id) == \
            tenant_of(alive[0])

        # the supervisor starts a new worker; new connections (on both workers) work
        deadline = time.monotonic() + 20
        while True:
            now = px.worker_pids()
            if sorted(now) == list(range(WORKERS)) and now[victim_w] != workers[victim_w]:
                break
            assert time.monotonic() < deadline, f"worker not restarted: {now}"
            await asyncio.sleep(0.1)
        fresh = await _clients_on_both_workers(px, per_worker=2)
        for conns in fresh.values():
            for c in conns:
                assert await c.fetchval("SELECT min(tenant_id) FROM customers") == tenant_of(c)
                await c.close()
        # and still nothing of the killed transaction, nothing left idle in a transaction
        assert await admin.fetchval("SELECT count(*) FROM customers WHERE customer_id = $1", victim_id) == 0
        stuck = await admin.fetch("SELECT pid, state, query FROM pg_stat_activity WHERE usename = $1 "
                                  "AND state LIKE 'idle in transaction%'", px.backend_role)
        assert not stuck, stuck
    finally:
        for conns in by_worker.values():
            for c in conns:
                c.terminate()
        await admin.execute("DELETE FROM customers WHERE customer_id = ANY($1::int[])", [victim_id, survivor_id])
        await admin.close()
