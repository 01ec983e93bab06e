"""PASS/MISS verdicts of a comparison run against the issues' targets.

Issue 17 (the hot path at the limit of the architecture) is a table: each figure, what it was
when the issue was filed, its target, this run's value and the verdict.  Issue 8's earlier
targets follow as a list.  Nothing here asserts: these are benchmark targets, not tests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.stats import Spread
from bench.targets import BARE, PGBOUNCER, TENANTGATE

if TYPE_CHECKING:  # pragma: no cover
    from bench.compare import Results

C16 = "-S c16 simple"
C64 = "-S c64 simple"

# issue 8
TARGET_TPS_VS_PGBOUNCER = 1.0
TARGET_ADDED_P50_US = 150.0
TARGET_IDLE_CLIENTS = 10_000
TARGET_IDLE_RSS_MB = 150.0
TARGET_IDLE_BACKENDS = 20
TARGET_CACHED_REWRITE_US = 10.0


def _tps_ratio(res: "Results", workload: str, other: str) -> float | None:
    t, o = res.spread(workload, TENANTGATE), res.spread(workload, other)
    return t.median / o.median if t and o and o.median else None


def cpu_per_xact_us(res: "Results", workload: str, target: str) -> float | None:
    """CPU time of ``target``'s processes per transaction (µs): cores used / TPS."""
    t = res.spread(workload, target)
    cpu = Spread.of(res.cpu.get((workload, target), []))
    return cpu.median / t.median * 1e6 if t and cpu and t.median else None


def issue17(res: "Results") -> list[str]:
    """The issue-17 targets table (markdown)."""
    rows: list[tuple[str, str, str, str, bool | None]] = []

    def row(what: str, before: str, target: str, value: float | None, fmt: str, ok) -> None:
        rows.append((what, before, target, "-" if value is None else fmt.format(value),
                     None if value is None else ok(value)))

    row("tenantgate / bare relay, `pgbench -S` 16 clients", "~0.5x", ">= 0.9x",
        _tps_ratio(res, C16, BARE), "{:.2f}x", lambda v: v >= 0.9)
    row("tenantgate / PgBouncer, 16 clients", "0.47x", ">= 0.8x",
        _tps_ratio(res, C16, PGBOUNCER), "{:.2f}x", lambda v: v >= 0.8)
    row("tenantgate / PgBouncer, 64 clients", "0.35x", ">= 0.8x",
        _tps_ratio(res, C64, PGBOUNCER), "{:.2f}x", lambda v: v >= 0.8)
    cpu = {n: cpu_per_xact_us(res, C16, n) for n in (TENANTGATE, PGBOUNCER, BARE)}
    others = ", ".join(f"{n} {v:.1f} µs" for n, v in cpu.items() if n != TENANTGATE and v is not None)
    row(f"CPU per transaction, 16 clients ({others or 'others not measured'})", "46 µs", "<= 20 µs",
        cpu[TENANTGATE], "{:.1f} µs", lambda v: v <= 20)
    a50, a99 = res.added_latency(TENANTGATE, 0), res.added_latency(TENANTGATE, 1)
    row("added latency at 1 client, p50", "65 µs", "<= 40 µs", a50.median if a50 else None, "{:.0f} µs",
        lambda v: v <= 40)
    row("added latency at 1 client, p99", "330 µs", "<= 120 µs", a99.median if a99 else None, "{:.0f} µs",
        lambda v: v <= 120)
    tg_idle = next((r for r in res.idle if r.target == TENANTGATE), None)
    row("idle client memory (PgBouncer 0.8 kB)", "4.4 kB", "<= 2 kB", tg_idle.kb_per_client if tg_idle else None,
        "{:.1f} kB", lambda v: v <= 2.0)
    rw = res.rewrite.get("cached_new_literal_us") if res.rewrite else None
    row("cached rewrite, normalised (new number each time)", "9.4 µs", "<= 3 µs", rw, "{:.1f} µs",
        lambda v: v <= 3.0)
    fair = getattr(res, "fairness", None) or {}
    ratio = fair["loaded_p99_us"] / fair["unloaded_p99_us"] if fair.get("unloaded_p99_us") else None
    row("light tenant's p99 while another saturates the pool, vs unloaded", "-", "<= 2x", ratio, "{:.2f}x",
        lambda v: v <= 2.0)
    out = ["| figure | issue filed | target | this run | verdict |", "|---|---:|---:|---:|---|"]
    for what, before, target, value, ok in rows:
        verdict = "n/a" if ok is None else ("**PASS**" if ok else "**MISS**")
        out.append(f"| {what} | {before} | {target} | {value} | {verdict} |")
    if fair:
        out.append("")
        out.append(f"Fairness: light tenant p99 {fair['unloaded_p99_us']:.0f} µs alone, {fair['loaded_p99_us']:.0f} µs"
                   f" while a heavy tenant runs {fair['heavy_clients']} clients against pool.size {fair['pool_size']}"
                   f" with pool.max_per_tenant {fair['max_per_tenant']}; without the limit:"
                   f" {fair['no_limit_unloaded_p99_us']:.0f} µs alone, {fair['no_limit_loaded_p99_us']:.0f} µs loaded."
                   + (f" tenantgate used {fair['proxy_cores_loaded']:.2f} cores during the loaded run (one event loop:"
                      " the light tenant's messages wait for the heavy tenant's already in it)."
                      if fair.get("proxy_cores_loaded") else ""))
        if fair.get("direct_unloaded_p99_us"):
            d0, d1 = fair["direct_unloaded_p99_us"], fair["direct_loaded_p99_us"]
            out.append(f"With no proxy (both straight to PostgreSQL, the heavy tenant with {fair['max_per_tenant']}"
                       f" clients, the connections the limit lends it): {d0:.0f} µs alone, {d1:.0f} µs loaded,"
                       f" {d1 / d0:.2f}x: the share of the ratio this machine's CPU contention causes.")
    return out


def issue8(res: "Results") -> list[str]:
    """The earlier targets (issue 8), as a list."""
    lines = []

    def line(ok: bool | None, what: str, detail: str) -> None:
        verdict = "n/a" if ok is None else ("PASS" if ok else "MISS")
        lines.append(f"- **{verdict}** {what}: {detail}")

    r = _tps_ratio(res, C16, PGBOUNCER)
    if r is not None:
        t, b = res.spread(C16, TENANTGATE), res.spread(C16, PGBOUNCER)
        gap = "" if r >= TARGET_TPS_VS_PGBOUNCER else f"; short by {(TARGET_TPS_VS_PGBOUNCER - r) * 100:.0f}% of PgBouncer's TPS"
        line(r >= TARGET_TPS_VS_PGBOUNCER, "TPS >= 1.0x PgBouncer (pgbench -S, 16 clients)",
             f"{r:.2f}x ({t.median:.0f} vs {b.median:.0f} TPS){gap}")
    else:
        line(None, "TPS >= 1.0x PgBouncer (pgbench -S, 16 clients)", "not measured")

    a50 = res.added_latency(TENANTGATE, 0)
    what = f"added latency p50 <= {TARGET_ADDED_P50_US:.0f} µs at 1 client"
    over = a50.median - TARGET_ADDED_P50_US if a50 else 0.0
    line(None if not a50 else over <= 0, what,
         (f"{a50.median:.0f} µs" + (f"; {over:.0f} µs over" if over > 0 else "")) if a50 else "not measured")

    tg_idle = next((r for r in res.idle if r.target == TENANTGATE), None)
    what = (f"{TARGET_IDLE_CLIENTS:,} idle clients in <= {TARGET_IDLE_RSS_MB:.0f} MB RSS with "
            f"{TARGET_IDLE_BACKENDS} backend connections")
    if tg_idle:
        rss_ok = tg_idle.rss_mb <= TARGET_IDLE_RSS_MB
        backends_ok = tg_idle.backends <= TARGET_IDLE_BACKENDS and tg_idle.backends_after_probe <= TARGET_IDLE_BACKENDS
        detail = (f"{tg_idle.rss_mb:.1f} MB with {tg_idle.clients:,} clients, {tg_idle.backends} backend connections "
                  f"idle, {tg_idle.backends_after_probe} after 50 clients queried")
        if not rss_ok:
            detail += f"; {tg_idle.rss_mb - TARGET_IDLE_RSS_MB:.1f} MB over"
        if not backends_ok:
            detail += f"; more than {TARGET_IDLE_BACKENDS} backend connections"
        if not tg_idle.probe_ok:
            detail += "; the sample queries FAILED"
        ok: bool | None = rss_ok and backends_ok and tg_idle.probe_ok
        if tg_idle.clients != TARGET_IDLE_CLIENTS:
            est = tg_idle.rss_before_mb + tg_idle.kb_per_client * TARGET_IDLE_CLIENTS / 1024
            detail += f" (only {tg_idle.clients:,} clients in this run; {est:.0f} MB extrapolated)"
            ok = None if ok else ok
        line(ok, what, detail)
    else:
        line(None, what, "not measured")

    if res.rewrite:
        hit = max(res.rewrite["cached_hit_us"], res.rewrite.get("cached_new_literal_us", 0.0))
        line(hit <= TARGET_CACHED_REWRITE_US, f"cached rewrite <= {TARGET_CACHED_REWRITE_US:.0f} µs",
             f"{hit:.1f} µs (same text: {res.rewrite['cached_hit_us']:.1f} µs)"
             + (f"; {hit - TARGET_CACHED_REWRITE_US:.1f} µs over" if hit > TARGET_CACHED_REWRITE_US else ""))
    return lines
