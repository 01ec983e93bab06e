"""Per-tenant fairness: a light tenant's latency while a heavy tenant saturates the pool.

A second tenantgate in the same run, with a small pool (``pool.size`` :data:`POOL`) and
``pool.max_per_tenant`` :data:`LIMIT`, and two tenant-bound users (acme, globex).  The light
tenant (globex, one pgbench client, tenant read script, ``--log``) runs alone first, then while
the heavy tenant (acme, :data:`HEAVY_CLIENTS` clients on the same script) floods the pool.  The
figure is the ratio of the light tenant's p99 under load to its p99 alone (target <= 2x).
For contrast the same is measured with no limit (``max_per_tenant: 0``): the light tenant
queues behind the heavy one.  On this 2-core machine the heavy load also takes the CPU the
proxy and PostgreSQL need, so part of any increase is CPU, not the pool.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from bench import latency
from bench.common import pgbench, tenantgate_process
from bench.targets import APP_PW, DB, TENANT, BenchEnv
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


def _light_p99(port: int, script: Path, seconds: float, work: Path, tag: str) -> float:
    prefix = work / f"fair-{tag}"
    pgbench(["-n", "-c", "1", "-j", "1", "-T", str(max(1, round(seconds))), "-M", "simple", "-f", str(script),
             *latency.log_args(prefix)], host="127.0.0.1", port=port, user=LIGHT_USER, password=APP_PW,
            database=DB, cwd=work)
    return latency.p50_p99(latency.read_latencies_us(prefix))[1]


def _one(env: BenchEnv, work: Path, seconds: float, limit: int) -> dict:
    script = script_file(work, "read", False, env.rows)
    with tenantgate_process(_config(env, limit), work) as tg:
        alone = _light_p99(tg.port, script, seconds, work, f"alone-{limit}")
        penv = {**os.environ, "PGPASSWORD": APP_PW, "PGSSLMODE": "disable"}
        heavy = subprocess.Popen(
            ["pgbench", "-h", "127.0.0.1", "-p", str(tg.port), "-U", "acme_app", "-n", "-c", str(HEAVY_CLIENTS),
             "-j", "2", "-T", str(max(2, round(seconds + 2))), "-M", "simple", "-f", str(script), DB],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=penv, cwd=work)
        try:
            loaded = _light_p99(tg.port, script, seconds, work, f"loaded-{limit}")
        finally:
            heavy.wait(seconds + 60)
    return {"unloaded_p99_us": alone, "loaded_p99_us": loaded}


def measure(env: BenchEnv, work: Path, seconds: float) -> dict:
    """The light tenant's p99 alone and next to the heavy one, with and without the limit."""
    with_limit = _one(env, work, seconds, LIMIT)
    without = _one(env, work, seconds, 0)
    return {**with_limit, "heavy_clients": HEAVY_CLIENTS, "pool_size": POOL, "max_per_tenant": LIMIT,
            "no_limit_unloaded_p99_us": without["unloaded_p99_us"],
            "no_limit_loaded_p99_us": without["loaded_p99_us"]}
