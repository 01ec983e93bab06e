"""The per-statement cost of the PostgreSQL backstop's binding check.

A tenant table under the bootstrap's policies (``tenant_id = (SELECT
tenantgate_guard.current_tenant())``, one initplan per statement) against a copy
of the same table without row-level security, both read as ``tenantgate_app``
on a connection bound for tenant acme exactly as the proxy binds it
(:class:`proxy.backstop.BackendBinder`):

1. in the server: a PL/pgSQL loop of ``SELECT v FROM t WHERE id = k`` (no
   network, no client): the difference is the check itself, in µs/statement;
2. from a client: asyncpg running the same prepared statement (what
   ``pgbench -S -M prepared`` does per transaction), µs/statement.

Target: < 5 µs/statement (issue 13).  Runs are interleaved and repeated; the
median is reported.  Standalone: ``.venv/bin/python -m bench.backstop_bench``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import bench_cluster

ROWS = 100_000
KEY = "6b" * 32
TARGET_US = 5.0


def _setup(cluster) -> str:
    from proxy.bootstrap import apply_bootstrap

    cluster.psql("CREATE DATABASE bs")
    cluster.psql(f"""
        CREATE TABLE public.bs_t (tenant_id text NOT NULL, id int NOT NULL, v text, PRIMARY KEY (id));
        INSERT INTO public.bs_t SELECT CASE WHEN g % 2 = 0 THEN 'acme' ELSE 'globex' END, g, 'v' || g
          FROM generate_series(1, {ROWS}) g;
        CREATE SCHEMA nobs;
        CREATE TABLE nobs.plain_t AS TABLE public.bs_t;
        ALTER TABLE nobs.plain_t ADD PRIMARY KEY (id);
        ANALYZE;
    """, database="bs")
    apply_bootstrap(cluster.dsn(database="bs"), "bench-app", "bench-control", backstop_key=KEY)
    cluster.psql("GRANT USAGE ON SCHEMA nobs TO tenantgate_app; GRANT SELECT ON nobs.plain_t TO tenantgate_app",
                 database="bs")
    return cluster.dsn("tenantgate_app", "bench-app", "bs")


_LOOP = """DO $$ DECLARE r text; BEGIN
  FOR i IN 1..{n} LOOP SELECT v INTO r FROM {table} WHERE id = (i * 7919) % {rows} + 1; END LOOP; END $$"""


async def _measure(dsn: str, n_server: int, n_client: int, repeat: int) -> dict:
    import asyncpg

    from proxy import backstop

    conn = await asyncpg.connect(dsn)
    try:
        binder = backstop.BackendBinder.from_identity_row(backstop.parse_key(KEY),
                                                          await conn.fetchrow(backstop.IDENTITY_SQL))
        await conn.execute(binder.sql("acme", "write"))
        assert await conn.fetchval("SELECT count(*) FROM public.bs_t") == ROWS // 2
        server: dict[str, list[float]] = {"policy": [], "plain": []}
        client: dict[str, list[float]] = {"policy": [], "plain": []}
        stmts = {"policy": await conn.prepare("SELECT v FROM public.bs_t WHERE id = $1"),
                 "plain": await conn.prepare("SELECT v FROM nobs.plain_t WHERE id = $1")}
        tables = {"policy": "public.bs_t", "plain": "nobs.plain_t"}
        for _ in range(repeat):
            for kind in ("plain", "policy"):
                t0 = time.perf_counter()
                await conn.execute(_LOOP.format(n=n_server, table=tables[kind], rows=ROWS))
                server[kind].append((time.perf_counter() - t0) / n_server * 1e6)
                stmt = stmts[kind]
                t0 = time.perf_counter()
                for i in range(n_client):
                    await stmt.fetchval(i * 7919 % ROWS + 1)
                client[kind].append((time.perf_counter() - t0) / n_client * 1e6)
    finally:
        await conn.close()
    med = {f"{side}_{kind}_us": statistics.median(v) for side, d in (("server", server), ("client", client))
           for kind, v in d.items()}
    med["server_check_us"] = med["server_policy_us"] - med["server_plain_us"]
    med["client_check_us"] = med["client_policy_us"] - med["client_plain_us"]
    return med


def run() -> int:
    quick = os.environ.get("BENCH_QUICK", "").strip().lower() in ("1", "true", "yes", "on")
    n_server, n_client, repeat = (20_000, 3_000, 3) if quick else (100_000, 20_000, 5)
    work = Path(tempfile.mkdtemp(prefix="tg-bench-backstop-"))
    os.chmod(work, 0o755)
    try:
        with bench_cluster(work) as cluster:
            dsn = _setup(cluster)
            r = asyncio.run(_measure(dsn, n_server, n_client, repeat))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"backstop check, SELECT v FROM t WHERE id = k as tenantgate_app bound to acme "
          f"(median of {repeat} interleaved runs):")
    print(f"  in the server ({n_server} statements/run): without RLS {r['server_plain_us']:.2f} us, "
          f"with the backstop policy {r['server_policy_us']:.2f} us -> check {r['server_check_us']:.2f} us/statement")
    print(f"  from asyncpg, prepared ({n_client}/run): without RLS {r['client_plain_us']:.1f} us, "
          f"with the backstop policy {r['client_policy_us']:.1f} us -> +{r['client_check_us']:.1f} us/statement")
    ratio = r["server_check_us"] / r["server_plain_us"] if r["server_plain_us"] else float("nan")
    print(f"  the check costs {ratio:.2f}x an indexed single-row SELECT without RLS on this machine now "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    verdict = "PASS" if r["server_check_us"] < TARGET_US else "MISS"
    print(f"  target < {TARGET_US:.0f} us/statement: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
