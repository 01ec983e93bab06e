"""Per-tenant fairness: a light tenant's latency while a heavy tenant saturates the pool.

A second tenantgate in the same run, with a small pool (``pool.size`` :data:`POOL`) and
``pool.max_per_tenant`` :data:`LIMIT`, and two tenant-bound users (acme, globex).  The light
tenant (globex, one pgbench client, tenant read script, ``--log``) runs alone first, then while
the heavy tenant (acme, :data:`HEAVY_CLIENTS` clients on the same script) floods the pool.  The
figure is the ratio of the light tenant's p99 under load to its p99 alone (target <= 2x).
For contrast the same is measured with no limit (``max_per_tenant: 0``): the light tenant
queues behind the heavy one.  On this 2-core machine the heavy load also takes the CPU the
proxy and PostgreSQL need, so part of any increase is CPU, not the pool: the same is measured
with no proxy at all (both tenants straight to PostgreSQL, the heavy one with :data:`LIMIT`
clients, the connections the limit lends it), which is the share of the ratio that the
machine's contention alone causes.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from bench import latency
from bench.common import pgbench, tenantgate_process
from bench.idle import tree_cpu_seconds
from bench.targets import APP_PW, DB, DIRECT, TENANT, BenchEnv
from bench.workloads import script_file
from proxy.scram import make_verifier

POOL = 4
LIMIT = 3
HEAVY_CLIENTS = 32
LIGHT_TENANT, LIGHT_USER = "globex", "globex_app"


def _config(env: BenchEnv, limit: int) -> dict:
    users = [{"name": "acme_app", "scram_verifier": make_verifier(APP_PW), "tenant": TENANT, "pool_mode": "transaction"},
             {"name": LIGHT_USER, "scram_verifier": make_verifier(APP_PW), "tenant": LIGHT_TENANT,
              "pool_mode": "transaction"}]
    return env.tenantgate_config(users=users, workers=1,
                                 pool={"mode": "transaction", "size": POOL, "max_per_tenant": limit,
                                       "queue_timeout_s": 120})


def _light_p99(port: int, script: Path, seconds: float, work: Path, tag: str, user: str = LIGHT_USER,
               password: str = APP_PW) -> float:
    prefix = work / f"fair-{tag}"
    pgbench(["-n", "-c", "1", "-j", "1", "-T", str(max(1, round(seconds))), "-M", "simple", "-f", str(script),
             *latency.log_args(prefix)], host="127.0.0.1", port=port, user=user, password=password,
            database=DB, cwd=work)
    return latency.p50_p99(latency.read_latencies_us(prefix))[1]


def _light_next_to_heavy(port: int, script: Path, seconds: float, work: Path, tag: str, *, heavy_user: str,
                         heavy_clients: int, light_user: str, password: str, proxy_pid: int | None = None) -> dict:
    """The light client's p99 alone, then while ``heavy_clients`` clients of ``heavy_user`` run
    (and the CPU cores the proxy ``proxy_pid`` used meanwhile)."""
    alone = _light_p99(port, script, seconds, work, f"alone-{tag}", light_user, password)
    penv = {**os.environ, "PGPASSWORD": password, "PGSSLMODE": "disable"}
    heavy = subprocess.Popen(
        ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", heavy_user, "-n", "-c", str(heavy_clients),
         "-j", "2", "-T", str(max(2, round(seconds + 2))), "-M", "simple", "-f", str(script), DB],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=penv, cwd=work)
    try:
        c0, t0 = (tree_cpu_seconds(proxy_pid) if proxy_pid else 0.0), time.monotonic()
        loaded = _light_p99(port, script, seconds, work, f"loaded-{tag}", light_user, password)
        cores = (tree_cpu_seconds(proxy_pid) - c0) / (time.monotonic() - t0) if proxy_pid else None
    finally:
        heavy.wait(seconds + 60)
    return {"unloaded_p99_us": alone, "loaded_p99_us": loaded, "proxy_cores_loaded": cores}


def _one(env: BenchEnv, work: Path, seconds: float, limit: int) -> dict:
    script = script_file(work, "read", False, env.rows)
    with tenantgate_process(_config(env, limit), work) as tg:
        return _light_next_to_heavy(tg.port, script, seconds, work, str(limit), heavy_user="acme_app",
                                    heavy_clients=HEAVY_CLIENTS, light_user=LIGHT_USER, password=APP_PW,
                                    proxy_pid=tg.pid)


def _direct(env: BenchEnv, work: Path, seconds: float) -> dict:
    """No proxy: the light client and LIMIT heavy clients straight to PostgreSQL (the statement
    with its tenant predicate written out, as the other direct runs do)."""
    t = env.targets[DIRECT]
    return _light_next_to_heavy(t.port, script_file(work, "read", True, env.rows), seconds, work, "direct",
                                heavy_user=t.user, heavy_clients=LIMIT, light_user=t.user, password=t.password)


def measure(env: BenchEnv, work: Path, seconds: float) -> dict:
    """The light tenant's p99 alone and next to the heavy one, with and without the limit, and
    with no proxy (the machine's share)."""
    with_limit = _one(env, work, seconds, LIMIT)
    without = _one(env, work, seconds, 0)
    direct = _direct(env, work, seconds)
    return {**with_limit, "heavy_clients": HEAVY_CLIENTS, "pool_size": POOL, "max_per_tenant": LIMIT,
            "no_limit_unloaded_p99_us": without["unloaded_p99_us"],
            "no_limit_loaded_p99_us": without["loaded_p99_us"],
            "direct_unloaded_p99_us": direct["unloaded_p99_us"], "direct_loaded_p99_us": direct["loaded_p99_us"]}
