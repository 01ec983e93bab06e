"""The cost of tenant rewriting inside the policy engine (no network).

1. Cold rewrite time (cache disabled), p50 and p99 over the adversarial corpus
   (tests/data/adversarial.yaml).
2. The cost of a cached hit (``PolicyEngine.check`` on a statement already in the
   cache), for the same text and for the same statement with a new number each
   time (the normalised template hits; what ``pgbench -S`` does).

The throughput of the tenant-scoped workloads through tenantgate, against
direct PostgreSQL and PgBouncer, is measured by :mod:`bench.compare`.
Standalone: ``.venv/bin/python -m bench.rewrite_bench``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, bench_cluster


def rewrite_costs(workdir: Path, cluster=None, hit_iterations: int = 20000) -> dict:
    """Cold and cached rewrite costs, in a database ``adv`` of ``cluster`` (a fresh one when None)."""
    if cluster is None:
        with bench_cluster(workdir / "adv") as fresh:
            return rewrite_costs(workdir, fresh, hit_iterations)
    sys.path.insert(0, str(ROOT / "tests"))
    from support.adversarial import install_adversarial_schema, load_corpus  # noqa: E402
    from support.rewrite_oracle import build_engine  # noqa: E402

    from proxy.policy.context import PolicyContext
    from proxy.seam import Origin

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
    hits = []  # three batches: the figure is their median, with min and max
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(hit_iterations):
            engine.check(hot_sql, ctx, Origin.SIMPLE)
        hits.append((time.perf_counter() - t0) / hit_iterations * 1e6)
    # the same statement with a new number each time (pgbench -S, most applications): the exact
    # text misses, the numeric-literal-normalised template hits
    varied_hits = []
    for b in range(3):
        batch = [hot_sql.replace("= 42", f"= {1_000_000 * (b + 1) + i}") for i in range(hit_iterations)]
        t0 = time.perf_counter()
        for sql in batch:
            engine.check(sql, ctx, Origin.SIMPLE)
        varied_hits.append((time.perf_counter() - t0) / hit_iterations * 1e6)
    cold.sort()
    p = lambda q: cold[min(len(cold) - 1, int(q * len(cold)))]  # noqa: E731
    out = {"statements": len(cold), "cold_p50_us": p(0.50) * 1e6, "cold_p99_us": p(0.99) * 1e6,
           "cached_hit_us": sorted(hits)[1], "cached_hit_us_batches": hits,
           "cached_new_literal_us": sorted(varied_hits)[1], "cached_new_literal_us_batches": varied_hits}
    print(f"\n== rewrite cost over the adversarial corpus ({out['statements']} statements) ==")
    print(f"  cold rewrite p50 {out['cold_p50_us']:8.0f} us   p99 {out['cold_p99_us']:8.0f} us")
    print(f"  cached hit        {out['cached_hit_us']:8.1f} us per statement (same text)")
    print(f"  cached template   {out['cached_new_literal_us']:8.1f} us per statement (new number each time)")
    return out


def run() -> dict:
    work = Path(tempfile.mkdtemp(prefix="tenantgate-rewrite-bench-"))
    os.chmod(work, 0o755)
    try:
        return rewrite_costs(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run()
