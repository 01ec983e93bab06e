"""Tenant rewriting: throughput of a tenant-scoped pgbench workload, and rewrite costs.

1. A pgbench-style schema with a tenant column (``accounts``, 4 tenants x 100,000
   rows).  The same point-select script runs through tenantgate in a tenant
   session (rewriting on) and directly against PostgreSQL with the already
   filtered statement (``... AND tenant_id = 'acme'``), interleaved, in
   ``-M simple`` (literal values differ per statement) and ``-M prepared``,
   with tenantgate running 1 and 2 worker processes (``workers``).
2. Cold rewrite time (cache disabled), p50 and p99 over the adversarial corpus
   (tests/data/adversarial.yaml).
3. The cost of a cached hit (``PolicyEngine.check`` on a statement already in the cache).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from contextlib import ExitStack

import yaml

from bench.common import ROOT, bench_cluster, median, pgbench, tenantgate_process
from proxy.scram import make_verifier

TENANTS = ("acme", "globex", "initech", "umbrella")
ROWS = 100_000
BACKEND, BACKEND_PW = "tg_bench", "tg-bench-pw"
APP, APP_PW = "acme_app", "acme-pw"
DB = "rewrite_bench"

SCHEMA = f"""
CREATE TABLE accounts (tenant_id text NOT NULL, aid int NOT NULL, abalance int NOT NULL DEFAULT 0,
                       filler char(84), PRIMARY KEY (tenant_id, aid));
INSERT INTO accounts (tenant_id, aid, abalance)
  SELECT t, g, 0 FROM unnest(ARRAY{list(TENANTS)}) t, generate_series(1, {ROWS}) g;
"""


def _script(workdir: Path, name: str, filtered: bool) -> Path:
    cond = " AND tenant_id = 'acme'" if filtered else ""
    p = workdir / name
    p.write_text(f"\\set aid random(1, {ROWS})\nSELECT abalance FROM accounts WHERE aid = :aid{cond};\n")
    return p


def throughput(workdir: Path, rounds: int = 3, seconds: int = 8, clients: int = 16,
               workers: tuple[int, ...] = (1, 2)) -> dict:
    """Interleaved pgbench runs: direct (pre-filtered) and tenantgate with each worker count in ``workers``."""
    results: dict[str, list[float]] = {}
    with bench_cluster(workdir) as cluster:
        cluster.psql(f"CREATE ROLE {BACKEND} LOGIN PASSWORD '{BACKEND_PW}'")
        cluster.psql(f"CREATE DATABASE {DB}")
        cluster.psql(SCHEMA, database=DB)
        cluster.psql("VACUUM ANALYZE accounts", database=DB)
        cluster.psql(f"GRANT SELECT, UPDATE ON accounts TO {BACKEND}", database=DB)
        rules = workdir / "rules.yaml"
        rules.write_text(yaml.safe_dump({"tenant_column": "tenant_id", "schemas": ["public"], "discover": True}))
        config = {
            "backend": {"host": "127.0.0.1", "port": cluster.port, "database": DB, "user": BACKEND,
                        "password": BACKEND_PW, "sslmode": "disable"},
            "users": [{"name": APP, "scram_verifier": make_verifier(APP_PW), "tenant": "acme"}],
            "rules_file": str(rules),
        }
        tg_script = _script(workdir, "tenant.sql", filtered=False)
        direct_script = _script(workdir, "direct.sql", filtered=True)
        with ExitStack() as stack:
            tg_ports = {n: stack.enter_context(tenantgate_process({**config, "workers": n}, workdir)) for n in workers}
            for _ in range(rounds):
                for mode in ("simple", "prepared"):
                    common = ["-n", "-c", str(clients), "-j", "2", "-T", str(seconds), "-M", mode]
                    tps, _ = pgbench([*common, "-f", str(direct_script)], host="127.0.0.1", port=cluster.port,
                                     user=BACKEND, password=BACKEND_PW, database=DB)
                    results.setdefault(f"direct/{mode}", []).append(tps)
                    for n, tg_port in tg_ports.items():
                        tps, _ = pgbench([*common, "-f", str(tg_script)], host="127.0.0.1", port=tg_port,
                                         user=APP, password=APP_PW, database=DB)
                        results.setdefault(f"tenantgate-{n}w/{mode}", []).append(tps)
    summary = {k: median(v) for k, v in results.items()}
    print(f"\n== tenant-scoped point selects, {clients} clients, {rounds} interleaved rounds of {seconds}s ==")
    for mode in ("simple", "prepared"):
        d = summary[f"direct/{mode}"]
        for n in workers:
            t = summary[f"tenantgate-{n}w/{mode}"]
            print(f"  -M {mode:<9} direct (pre-filtered) {d:9.0f} TPS   tenantgate (rewriting, {n} worker"
                  f"{'s' if n > 1 else ''}) {t:9.0f} TPS   ratio {t / d:5.2f}")
    return summary


def rewrite_costs(workdir: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from adversarial import install_adversarial_schema, load_corpus  # noqa: E402
    from rewrite_oracle import build_engine  # noqa: E402

    from proxy.policy.engine import PolicyContext
    from proxy.seam import Origin

    with bench_cluster(workdir / "adv") as cluster:
        cluster.psql("CREATE DATABASE adv")
        dsn = cluster.dsn(database="adv")
        install_adversarial_schema(dsn)
        engine = build_engine(dsn)
        statements = []
        for attempt in load_corpus(dbname="adv"):
            statements.extend(getattr(attempt, "steps", None) or [attempt.sql])
        statements = [s for s in statements if isinstance(s, str)]
        ctx = PolicyContext(tenant="A")
        cold: list[float] = []
        for sql in statements:
            engine.cache.maxsize = 0  # disable the cache: every check is a cold rewrite
            engine.cache._data.clear()
            t0 = time.perf_counter()
            engine.check(sql, ctx, Origin.SIMPLE)
            cold.append(time.perf_counter() - t0)
        engine.cache.maxsize = 20000
        hot_sql = "SELECT o.id, c.name FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.id = 42"
        engine.check(hot_sql, ctx, Origin.SIMPLE)
        n = 20000
        t0 = time.perf_counter()
        for _ in range(n):
            engine.check(hot_sql, ctx, Origin.SIMPLE)
        hit = (time.perf_counter() - t0) / n
    cold.sort()
    p = lambda q: cold[min(len(cold) - 1, int(q * len(cold)))]  # noqa: E731
    out = {"statements": len(cold), "cold_p50_us": p(0.50) * 1e6, "cold_p99_us": p(0.99) * 1e6,
           "cached_hit_us": hit * 1e6}
    print(f"\n== rewrite cost over the adversarial corpus ({out['statements']} statements) ==")
    print(f"  cold rewrite p50 {out['cold_p50_us']:8.0f} us   p99 {out['cold_p99_us']:8.0f} us")
    print(f"  cached hit        {out['cached_hit_us']:8.1f} us per statement")
    return out


def run() -> dict:
    work = Path(tempfile.mkdtemp(prefix="tenantgate-rewrite-bench-"))
    os.chmod(work, 0o755)
    try:
        costs = rewrite_costs(work)
        tput = throughput(work)
        return {**costs, **tput}
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run()
