"""2,000 concurrent clients through a pool of 10 backend connections (issue 8, must-show 2).

One ``tenantgate serve`` (one worker, ``pool: {mode: transaction, size: 10}``) in
front of the demo's database.  2,000 client sessions are open at the same time:
most are a light protocol client (tests/support/pool.AsyncClient, SCRAM with a cached
salted password), some are asyncpg.  Every client runs simple queries, extended-protocol
queries and multi-statement transactions whose answers are unique to that client
(a number, its tenant, a random tag); every answer is checked against what that client
asked.  Meanwhile pg_stat_activity is sampled: the proxy never holds more than 10
connections of its backend role.
"""

from __future__ import annotations

import asyncio
import os

import asyncpg
import pytest

from support.e2e import token
from support.pool import APP_USERS, AsyncClient, local_ports_towards, raise_nofile, serve_pooled

CLIENTS = 2000
ASYNCPG_CLIENTS = 100
POOL_SIZE = 10
TENANTS = ("acme", "globex")


@pytest.fixture(scope="module")
def px(demo, tmp_path_factory):  # noqa: F811
    if raise_nofile() < 2 * CLIENTS + 500:
        pytest.fail("RLIMIT_NOFILE hard limit too low for 2,000 clients")  # checked, not skipped
    pool = {"mode": "transaction", "size": POOL_SIZE, "queue_timeout_s": 60}
    with serve_pooled(demo, tmp_path_factory.mktemp("pool10"), pool, max_clients=CLIENTS + 200) as proxy:
        yield proxy


class Sampler:
    """Samples, every 50 ms, how many backend connections the proxy holds: pg_stat_activity rows of
    its backend role whose client port is one of the proxy process's sockets toward PostgreSQL
    (the demo's own proxy uses the same role).  A backend pid is classified once, reading /proc
    only when an unknown pid shows up."""

    def __init__(self, px, admin):
        self.px, self.admin = px, admin
        self.peak = 0
        self.samples = 0
        self.ours: set[int] = set()
        self.theirs: set[int] = set()
        self._stop = asyncio.Event()

    def _classify(self, rows) -> None:
        ports = local_ports_towards([self.px.proc.pid], self.px.raw["backend"]["port"])
        for pid, port in rows:
            (self.ours if port in ports else self.theirs).add(pid)

    async def sample(self) -> int:
        rows = await self.admin.fetch(
            "SELECT pid, client_port FROM pg_stat_activity WHERE usename = $1 "
            "AND query NOT LIKE '%attisdropped%' "  # the proxy's catalog refresh, not a pooled connection
            "AND application_name NOT LIKE 'tenantgate: %'",  # its catalog connections (refresh, LISTEN)
            self.px.backend_role)
        if any(r["pid"] not in self.ours and r["pid"] not in self.theirs for r in rows):
            self._classify([(r["pid"], r["client_port"]) for r in rows])
        n = sum(1 for r in rows if r["pid"] in self.ours)
        self.peak = max(self.peak, n)
        self.samples += 1
        return n

    async def run(self):
        while not self._stop.is_set():
            await self.sample()
            try:
                await asyncio.wait_for(self._stop.wait(), 0.05)
            except asyncio.TimeoutError:
                pass

    def stop(self):
        self._stop.set()


async def _open(px, demo, i: int):  # noqa: F811
    tenant = TENANTS[i % 2]
    if i < ASYNCPG_CLIENTS:
        return tenant, await asyncpg.connect(px.dsn(tenant), statement_cache_size=0 if i % 4 == 0 else 100)
    if i % 5 == 0:  # pool_app, tenant chosen by a signed token in the startup options
        opts = {"options": f"-c tenantgate.tenant={token(demo, tenant)}"}
        return tenant, await AsyncClient.connect(px.port, "pool_app", demo.password("app:pool"), options=opts)
    user, secret = APP_USERS[tenant]
    return tenant, await AsyncClient.connect(px.port, user, demo.password(secret))


async def _work(i: int, tenant: str, c, rnd: int) -> int:
    """Three requests whose answers only this client can expect; returns how many were checked."""
    n = rnd * 10_000 + i
    tag = f"c{i}x{os.urandom(4).hex()}"
    if isinstance(c, asyncpg.Connection):
        row = await c.fetchrow(f"SELECT {n}::int AS n, current_setting('tenantgate.tenant_id') AS t, "
                               "(SELECT min(tenant_id) FROM customers) AS r")
        assert tuple(row) == (n, tenant, tenant), (i, row)
        got = await c.fetchval("SELECT $1::text || '/' || min(tenant_id) FROM orders", tag)
        assert got == f"{tag}/{tenant}", (i, got)
        async with c.transaction():
            assert await c.fetchval("SELECT $1::int * 3", n) == 3 * n
            assert await c.fetchval("SELECT current_setting('tenantgate.tenant_id') || $1::text", tag) == tenant + tag
        return 3
    rows = await c.query(f"SELECT {n}, current_setting('tenantgate.tenant_id'), (SELECT min(tenant_id) FROM customers)")
    assert rows == [[str(n), tenant, tenant]], (i, rows)
    rows = await c.extended("SELECT $1::text || '/' || min(tenant_id) FROM orders", (tag,))
    assert rows == [[f"{tag}/{tenant}"]], (i, rows)
    # a transaction spanning several round trips holds one backend connection throughout
    assert await c.query("BEGIN") == []
    assert await c.query(f"SELECT {n} * 3, '{tag}'") == [[str(3 * n), tag]]
    assert await c.query("SELECT current_setting('tenantgate.tenant_id'), pg_backend_pid()") != []
    assert await c.query("COMMIT") == []
    return 3


async def test_2000_clients_share_10_backend_connections_and_get_their_own_answers(px, demo):  # noqa: F811
    admin = await asyncpg.connect(demo.admin)
    sampler = Sampler(px, admin)
    sampling = asyncio.ensure_future(sampler.run())
    clients: list = []
    try:
        gate = asyncio.Semaphore(100)

        async def open_one(i):
            async with gate:
                return await _open(px, demo, i)

        clients = await asyncio.gather(*(open_one(i) for i in range(CLIENTS)))
        # all 2,000 sessions are open at once
        pools = [r for r in px.console("SHOW POOLS") if r["pool_mode"] == "transaction"]
        assert len(pools) == 1
        row = pools[0]
        assert int(row["cl_active"]) + int(row["cl_waiting"]) == CLIENTS, row
        assert int(row["sv_active"]) + int(row["sv_idle"]) <= POOL_SIZE, row

        checked = 0
        for rnd in range(2):
            results = await asyncio.wait_for(
                asyncio.gather(*(_work(i, t, c, rnd) for i, (t, c) in enumerate(clients))), 120)
            checked += sum(results)
        assert checked == 2 * 3 * CLIENTS
    finally:
        sampler.stop()
        await sampling
        await asyncio.gather(*(c.close() for _, c in clients), return_exceptions=True)
        await admin.close()
    assert sampler.samples >= 3
    assert 1 <= sampler.peak <= POOL_SIZE, f"{sampler.peak} backend connections seen"
