"""`make bench`: direct PostgreSQL, PgBouncer and tenantgate in one interleaved run.

One run sets up the three targets once (:mod:`bench.targets`), then repeats
rounds; in each round every workload (:mod:`bench.workloads`) runs against
every target, the target order rotating from round to round.  Every figure is
printed as the median over the rounds with [min-max], plus ratios.

Also measured:

* latency added over direct at 1 client (``pgbench -S -c 1 --log``: p50 and p99
  of per-transaction latencies, per round; the difference to direct);
* resident memory of the proxy with many idle SCRAM-authenticated clients, and
  the backend connections PostgreSQL sees meanwhile (:mod:`bench.idle`);
* the cost of a cached rewrite (:mod:`bench.rewrite_bench`);
* with ``BENCH_PROFILE=1``: a py-spy profile of tenantgate during an extra
  ``pgbench -S`` 16-client run (not counted in the figures).

Settings come from the environment (``BENCH_QUICK=1`` for a short smoke run,
``BENCH_ROUNDS``, ``BENCH_SECONDS``, ``BENCH_IDLE_CLIENTS``, ``BENCH_WORKERS``,
``BENCH_POOL_MODE``, ``BENCH_PROFILE``) or the same options on the command
line: ``python -m bench.compare --help``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import idle, latency, profile
from bench.common import pgbench, raise_nofile_limit
from bench.rewrite_bench import rewrite_costs
from bench.stats import Spread, ratio
from bench.targets import DB, DIRECT, PGBOUNCER, TENANTGATE, BenchEnv
from bench.workloads import Workload, all_workloads

LATENCY_WORKLOAD = "-S c1 simple"
THROUGHPUT_TARGET_WORKLOAD = "-S c16 simple"
PROFILE_WORKLOAD = Workload("-S c16 simple", 16, "simple")

# the targets
TARGET_TPS_VS_PGBOUNCER = 1.0
TARGET_ADDED_P50_US = 150.0
TARGET_IDLE_CLIENTS = 10_000
TARGET_IDLE_RSS_MB = 150.0
TARGET_IDLE_BACKENDS = 20
TARGET_CACHED_REWRITE_US = 10.0


@dataclass
class Settings:
    quick: bool = False
    rounds: int = 3
    seconds: float = 8.0
    idle_clients: int = TARGET_IDLE_CLIENTS
    idle_concurrency: int = 200
    workers: int = 1
    pool_mode: str = "transaction"
    profile: bool = False
    profile_seconds: float = 8.0
    scale: int = 10
    rows: int = 100_000
    keep_workdir: bool = False
    only: tuple[str, ...] = ()



def parse_settings(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Settings from ``BENCH_*`` environment variables, overridden by command-line options."""
    env = os.environ if environ is None else environ
    flag = lambda name: env.get(name, "").strip().lower() in ("1", "true", "yes", "on")  # noqa: E731
    quick = flag("BENCH_QUICK")
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", default=quick, help="short smoke run (BENCH_QUICK=1)")
    p.add_argument("--rounds", type=int, default=int(env.get("BENCH_ROUNDS", 0)) or None)
    p.add_argument("--seconds", type=float, default=float(env.get("BENCH_SECONDS", 0)) or None,
                   help="duration of each pgbench run")
    p.add_argument("--idle-clients", type=int, default=int(env.get("BENCH_IDLE_CLIENTS", 0)) or None)
    p.add_argument("--workers", type=int, default=int(env.get("BENCH_WORKERS", 1)),
                   help="tenantgate worker processes")
    p.add_argument("--pool-mode", choices=("session", "transaction"),
                   default=env.get("BENCH_POOL_MODE", "transaction"))
    p.add_argument("--profile", action="store_true", default=flag("BENCH_PROFILE"),
                   help="py-spy profile of tenantgate (BENCH_PROFILE=1)")
    p.add_argument("--keep-workdir", action="store_true", default=flag("BENCH_KEEP"))
    p.add_argument("--only", default=env.get("BENCH_WORKLOADS", ""),
                   help="comma-separated substrings: run only workloads whose key matches (e.g. 'c16 simple')")
    a = p.parse_args(argv)
    s = Settings(quick=a.quick, workers=a.workers, pool_mode=a.pool_mode, profile=a.profile,
                 keep_workdir=a.keep_workdir, only=tuple(x.strip() for x in a.only.split(",") if x.strip()))
    if a.quick:
        s.rounds, s.seconds, s.idle_clients, s.profile_seconds = 1, 2.0, 2_000, 3.0
    if a.rounds is not None:
        s.rounds = a.rounds
    if a.seconds is not None:
        s.seconds = a.seconds
    if a.idle_clients is not None:
        s.idle_clients = a.idle_clients
    if s.rounds < 1 or s.seconds <= 0 or s.idle_clients < 0 or s.workers < 1:
        p.error("rounds, seconds and workers must be positive, idle clients not negative")
    return s


@dataclass
class Results:
    settings: Settings
    tps: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (workload, target) -> per round
    cpu: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # proxy CPU cores used, per round
    latency: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # target -> [(p50, p99)] per round
    idle: list[idle.IdleResult] = field(default_factory=list)
    rewrite: dict = field(default_factory=dict)
    profile_top: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)

    def spread(self, workload: str, target: str) -> Spread | None:
        return Spread.of(self.tps.get((workload, target), []))

    def added_latency(self, target: str, which: int) -> Spread | None:
        """Per-round difference to direct of p50 (which=0) or p99 (which=1), in µs."""
        base, mine = self.latency.get(DIRECT, []), self.latency.get(target, [])
        return Spread.of([m[which] - b[which] for b, m in zip(base, mine)])


# --------------------------------------------------------------------------- running


def _run_workload(env: BenchEnv, res: Results, wk: Workload, target_name: str, work: Path) -> None:
    s = res.settings
    target = env.targets[target_name]
    args = wk.args(target, s.seconds, work, env.rows)
    log_prefix = None
    if wk.key == LATENCY_WORKLOAD:
        log_prefix = work / f"latency-{target_name}"
        args += latency.log_args(log_prefix)
    cpu0, t0 = (idle.tree_cpu_seconds(target.pid), time.monotonic()) if target.pid else (0.0, 0.0)
    try:
        tps, _ = pgbench(args, host="127.0.0.1", port=target.port, user=target.user, password=target.password,
                         database=DB, cwd=work)
    except RuntimeError as e:
        res.failures.append(f"{wk.key} / {target_name}: {str(e).strip().splitlines()[-1][:300]}")
        return
    res.tps.setdefault((wk.key, target_name), []).append(tps)
    if target.pid:  # includes connection setup; pgbench's -T covers almost all of the wall time
        res.cpu.setdefault((wk.key, target_name), []).append(
            (idle.tree_cpu_seconds(target.pid) - cpu0) / (time.monotonic() - t0))
    if log_prefix is not None:
        res.latency.setdefault(target_name, []).append(latency.p50_p99(latency.read_latencies_us(log_prefix)))


def _skip(env: BenchEnv, wk: Workload, target_name: str) -> bool:
    # PgBouncer before 1.21 keeps no prepared statements in transaction mode: -M prepared fails there
    return target_name == PGBOUNCER and wk.mode == "prepared" and not env.bouncer_prepared


def _profile(env: BenchEnv, res: Results, work: Path) -> None:
    s = res.settings
    target = env.targets[TENANTGATE]
    out = work / "tenantgate.pyspy.txt"
    rec = profile.start_record(target.pid, s.profile_seconds, out, subprocesses=s.workers > 1)
    if rec is None:
        res.profile_top = ["  (py-spy is not installed)"]
        return
    time.sleep(0.5)
    args = PROFILE_WORKLOAD.args(target, s.profile_seconds + 1.5, work, env.rows)
    try:
        pgbench(args, host="127.0.0.1", port=target.port, user=target.user, password=target.password,
                database=DB, cwd=work)
    except RuntimeError as e:
        res.failures.append(f"profile run: {str(e).strip().splitlines()[-1][:300]}")
    try:
        _, err = rec.communicate(timeout=s.profile_seconds + 30)
    except subprocess.TimeoutExpired:
        rec.kill()
        err = "py-spy did not finish"
    if not out.exists():
        res.profile_top = [f"  (py-spy wrote no profile: {err.strip()[-300:]})"]
        return
    total, top = profile.top_own_time(out, 15)
    busy = total / (profile.RATE_HZ * s.profile_seconds * max(1, s.workers))
    res.profile_top = [f"  {PROFILE_WORKLOAD.title}: {total} samples at {profile.RATE_HZ} Hz over {s.profile_seconds:g}s"
                       f" (tenantgate busy ~{busy:.0%} of the time; the rest it waited for the network)",
                       "  socket writes (uvloop, C) count as own time of the Python function calling them",
                       *profile.format_top(total, top)]


def _idle(env: BenchEnv, res: Results) -> None:
    n = res.settings.idle_clients
    if n <= 0:
        return
    for name in (TENANTGATE, PGBOUNCER):
        target = env.targets.get(name)
        if target is None or target.pid is None:
            continue
        print(f"  idle clients: opening {n} connections to {name} ...", flush=True)
        try:
            res.idle.append(idle.measure(env, target, n, res.settings.idle_concurrency))
        except Exception as e:  # report and go on: the other figures still count
            res.failures.append(f"idle clients / {name}: {e!r}"[:400])


def run_all(s: Settings) -> Results:
    res = Results(s)
    raise_nofile_limit()
    work = Path(tempfile.mkdtemp(prefix="tenantgate-bench-"))
    os.chmod(work, 0o755)
    workloads = [w for w in all_workloads() if not s.only or any(o in w.key for o in s.only)]
    t_start = time.monotonic()
    try:
        with BenchEnv(work, scale=s.scale, rows=s.rows, pool_mode=s.pool_mode, workers=s.workers) as env:
            res.header = _header(env, s)
            res.header.append(f"- tenantgate RSS right after start: {idle.tree_rss_mb(env.targets[TENANTGATE].pid):.1f} MB")
            print("\n".join(res.header), flush=True)
            print("  rewrite costs ...", flush=True)
            res.rewrite = _quiet(rewrite_costs, work, env.cluster, 5000 if s.quick else 20000)
            names = list(env.targets)
            for r in range(s.rounds):
                order = names[r % len(names):] + names[: r % len(names)]
                t0 = time.monotonic()
                for wk in workloads:
                    for name in order:
                        if not _skip(env, wk, name):
                            _run_workload(env, res, wk, name, work)
                print(f"  round {r + 1}/{s.rounds} done in {time.monotonic() - t0:.0f}s", flush=True)
            if s.profile:
                print("  profiling tenantgate with py-spy ...", flush=True)
                _profile(env, res, work)
            _idle(env, res)
            if res.failures:
                tail = env.tenantgate_log.read_text()[-3000:]
                res.failures.append("tenantgate log (tail):\n" + tail)
    finally:
        if s.keep_workdir:
            print(f"  work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res.header.append(f"- wall time: {time.monotonic() - t_start:.0f}s")
    return res


def _quiet(fn, *args):
    """Call ``fn`` with its own printing suppressed (the summary prints the figures)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def _header(env: BenchEnv, s: Settings) -> list[str]:
    pg = subprocess.run(["pgbench", "--version"], capture_output=True, text=True).stdout.strip()
    return [
        f"## tenantgate benchmark ({'quick smoke run' if s.quick else 'full run'})",
        f"- machine: {os.cpu_count()} CPUs ({platform.machine()}), shared with other work: figures are noisy",
        f"- {pg}; PgBouncer {env.bouncer_version or 'not installed'} (transaction mode, pool 20)",
        f"- tenantgate: pool mode {s.pool_mode}, pool size 20, {s.workers} worker process"
        f"{'es' if s.workers > 1 else ''}, tenant-bound user, rules loaded (rewriting on), metrics on",
        f"- {s.rounds} interleaved round{'s' if s.rounds > 1 else ''} of {s.seconds:g}s per run;"
        f" pgbench scale {s.scale}; tenant table 4 x {s.rows} rows",
    ]


# --------------------------------------------------------------------------- report


def _pct(x: float) -> str:
    return f"{x * 100:.0f}%"


def report(res: Results) -> list[str]:
    """The summary as markdown tables (pasted verbatim into docs/benchmarks.md)."""
    s = res.settings
    out = [res.header[0], "", *res.header[1:], ""] if res.header else []
    out.append("### Throughput (TPS; median [min-max] over rounds)")
    out.append("")
    out.append("| workload | direct | PgBouncer | tenantgate | tg / direct | tg / PgBouncer | PgBouncer / direct "
               "| CPU cores used: PgBouncer / tenantgate |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for wk in all_workloads():
        d, b, t = (res.spread(wk.key, n) for n in (DIRECT, PGBOUNCER, TENANTGATE))
        if d is None and b is None and t is None:
            continue  # not run (--only)
        cell = lambda sp: sp.fmt() if sp else "-"  # noqa: E731
        cpu = " / ".join(f"{c.median:.2f}" if c else "-" for c in (Spread.of(res.cpu.get((wk.key, n), []))
                                                                      for n in (PGBOUNCER, TENANTGATE)))
        out.append(f"| {wk.title} | {cell(d)} | {cell(b)} | {cell(t)} | {ratio(t, d)} | {ratio(t, b)} | {ratio(b, d)} "
                   f"| {cpu} |")
    out.append("")
    out.append("Tenant workloads: direct and PgBouncer run the statement with `AND tenant_id = 'acme'` already "
               "added; tenantgate adds it. `-M prepared` through PgBouncer needs PgBouncer >= 1.21.")
    out.append("")
    lat_names = [n for n in (DIRECT, PGBOUNCER, TENANTGATE) if res.latency.get(n)]
    if lat_names:
        out.append("### Latency at 1 client (pgbench -S, per-transaction, µs)")
        out.append("")
        out.append("| target | p50 | p99 | added p50 vs direct | added p99 vs direct |")
        out.append("|---|---:|---:|---:|---:|")
    for name in lat_names:
        lat = res.latency.get(name)
        if not lat:
            continue
        p50, p99 = Spread.of([x[0] for x in lat]), Spread.of([x[1] for x in lat])
        a50, a99 = (res.added_latency(name, i) if name != DIRECT else None for i in (0, 1))
        out.append(f"| {name} | {p50.fmt()} | {p99.fmt()} | {a50.fmt() if a50 else '-'} | {a99.fmt() if a99 else '-'} |")
    if lat_names:
        out.append("")
    if res.idle:
        out.append("### Idle clients (SCRAM-authenticated, then idle)")
        out.append("")
        out.append("| target | clients (connected) | RSS before | RSS with clients | per client | backend connections | after 50 clients queried | queries ok | open time |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---|---:|")
        for r in res.idle:
            out.append(f"| {r.target} | {r.clients} ({r.connected}) | {r.rss_before_mb:.1f} MB | {r.rss_mb:.1f} MB | "
                       f"{r.kb_per_client:.1f} kB | {r.backends} | {r.backends_after_probe} | "
                       f"{'yes' if r.probe_ok else 'NO'} | {r.open_seconds:.1f}s |")
        out.append("")
    if res.rewrite:
        rw = res.rewrite
        batches = Spread.of(rw.get("cached_hit_us_batches", [rw["cached_hit_us"]]))
        out.append("### Rewrite cost (policy engine, no network)")
        out.append("")
        out.append("| figure | µs |")
        out.append("|---|---:|")
        out.append(f"| cached rewrite, same text again | {batches.fmt('{:.1f}')} |")
        if "cached_new_literal_us" in rw:
            varied = Spread.of(rw["cached_new_literal_us_batches"])
            out.append(f"| cached rewrite, new number each time (normalised template hit) | {varied.fmt('{:.1f}')} |")
        out.append(f"| cold rewrite p50 over the adversarial corpus ({rw['statements']} statements) | {rw['cold_p50_us']:.0f} |")
        out.append(f"| cold rewrite p99 | {rw['cold_p99_us']:.0f} |")
        out.append("")
    out.append("### Targets (issue 8)")
    out.append("")
    out.extend(targets(res))
    if res.profile_top:
        out.append("")
        out.append("### Profile: tenantgate, top functions by own time (py-spy)")
        out.append("")
        out.append("```")
        out.extend(res.profile_top)
        out.append("```")
    return out


def targets(res: Results) -> list[str]:
    lines = []

    def line(ok: bool | None, what: str, detail: str) -> None:
        verdict = "n/a" if ok is None else ("PASS" if ok else "MISS")
        lines.append(f"- **{verdict}** {what}: {detail}")

    t, b = res.spread(THROUGHPUT_TARGET_WORKLOAD, TENANTGATE), res.spread(THROUGHPUT_TARGET_WORKLOAD, PGBOUNCER)
    if t and b:
        r = t.median / b.median
        gap = "" if r >= TARGET_TPS_VS_PGBOUNCER else f"; short by {_pct(TARGET_TPS_VS_PGBOUNCER - r)} of PgBouncer's TPS"
        cpu_t = Spread.of(res.cpu.get((THROUGHPUT_TARGET_WORKLOAD, TENANTGATE), []))
        cpu_b = Spread.of(res.cpu.get((THROUGHPUT_TARGET_WORKLOAD, PGBOUNCER), []))
        if cpu_t and cpu_b:
            gap += (f"; CPU per transaction: tenantgate {cpu_t.median / t.median * 1e6:.0f} µs,"
                    f" PgBouncer {cpu_b.median / b.median * 1e6:.0f} µs")
        line(r >= TARGET_TPS_VS_PGBOUNCER, "TPS >= 1.0x PgBouncer (pgbench -S, 16 clients)",
             f"{r:.2f}x ({t.median:.0f} vs {b.median:.0f} TPS){gap}")
    else:
        line(None, "TPS >= 1.0x PgBouncer (pgbench -S, 16 clients)", "not measured")

    a50 = res.added_latency(TENANTGATE, 0)
    if a50:
        over = a50.median - TARGET_ADDED_P50_US
        line(over <= 0, f"added latency p50 <= {TARGET_ADDED_P50_US:.0f} µs at 1 client",
             f"{a50.median:.0f} µs" + (f"; {over:.0f} µs over" if over > 0 else ""))
    else:
        line(None, f"added latency p50 <= {TARGET_ADDED_P50_US:.0f} µs at 1 client", "not measured")

    tg_idle = next((r for r in res.idle if r.target == TENANTGATE), None)
    what = f"{TARGET_IDLE_CLIENTS:,} idle clients in <= {TARGET_IDLE_RSS_MB:.0f} MB RSS with {TARGET_IDLE_BACKENDS} backend connections"
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
            per = tg_idle.kb_per_client
            est = tg_idle.rss_before_mb + per * TARGET_IDLE_CLIENTS / 1024
            detail += f" (only {tg_idle.clients:,} clients in this run; {est:.0f} MB extrapolated to {TARGET_IDLE_CLIENTS:,})"
            ok = None if ok else ok
        line(ok, what, detail)
    else:
        line(None, what, "not measured")

    if res.rewrite:
        # judged on the slower of the two cached paths (a new number each time is the common case)
        hit = max(res.rewrite["cached_hit_us"], res.rewrite.get("cached_new_literal_us", 0.0))
        line(hit <= TARGET_CACHED_REWRITE_US, f"cached rewrite <= {TARGET_CACHED_REWRITE_US:.0f} µs",
             f"{hit:.1f} µs (same text: {res.rewrite['cached_hit_us']:.1f} µs)"
             + (f"; {hit - TARGET_CACHED_REWRITE_US:.1f} µs over" if hit > TARGET_CACHED_REWRITE_US else ""))
    return lines


def run(argv: list[str] | None = None) -> int:
    s = parse_settings(argv)
    # SIGTERM (e.g. a timeout) unwinds like Ctrl-C, so PostgreSQL, PgBouncer and tenantgate are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    res = run_all(s)
    print("\n" + "\n".join(report(res)), flush=True)
    if res.failures:
        print("\n### FAILURES\n", file=sys.stderr)
        for f in res.failures:
            print(f"- {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
