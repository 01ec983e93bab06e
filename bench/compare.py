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

from bench import fairness, idle, latency, profile
from bench.common import pgbench, raise_nofile_limit, tenantgate_process
from bench.rewrite_bench import rewrite_costs
from bench.stats import Spread, ratio
from bench.targets import BARE, DB, DIRECT, PGBOUNCER, TENANTGATE, BenchEnv
from bench.verdicts import issue8, issue17
from bench.workloads import Workload, all_workloads

LATENCY_WORKLOAD = "-S c1 simple"
THROUGHPUT_TARGET_WORKLOAD = "-S c16 simple"
PROFILE_WORKLOAD = Workload("-S c16 simple", 16, "simple")

TARGET_IDLE_CLIENTS = 10_000  # idle clients opened (issue 8's target; bench/verdicts.py judges it)


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
    fairness: dict = field(default_factory=dict)  # light tenant's p99 alone and next to a heavy one
    workers2: tuple[float, float] | None = None  # (TPS, CPU cores) of -S c16 through 2 worker processes
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
                       "  socket writes (uvloop, C) count as own time of the Python function calling them, and so does"
                       " the wait when the write woke PostgreSQL or pgbench and the scheduler ran it first (wall clock;"
                       " BENCH_CPROFILE measures CPU time)",
                       *profile.format_top(total, top)]


def _two_workers(env: BenchEnv, res: Results, work: Path) -> None:
    """pgbench -S, 16 clients, once through a tenantgate with ``workers: 2`` (issue 17: scaling)."""
    wk = next(w for w in all_workloads() if w.key == THROUGHPUT_TARGET_WORKLOAD)
    try:
        with tenantgate_process(env.tenantgate_config(workers=2), work) as tg:
            target = env.targets[TENANTGATE]
            args = wk.args(target, res.settings.seconds, work, env.rows)
            cpu0, t0 = idle.tree_cpu_seconds(tg.pid), time.monotonic()
            tps, _ = pgbench(args, host="127.0.0.1", port=tg.port, user=target.user, password=target.password,
                             database=DB, cwd=work)
            res.workers2 = (tps, (idle.tree_cpu_seconds(tg.pid) - cpu0) / (time.monotonic() - t0))
    except Exception as e:  # report and go on
        res.failures.append(f"2 workers: {e!r}"[:400])


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
            if s.workers == 1 and (not s.only or any(o in THROUGHPUT_TARGET_WORKLOAD for o in s.only)):
                print("  tenantgate with 2 worker processes ...", flush=True)
                _two_workers(env, res, work)
            if not s.only or any(o in "fairness" for o in s.only):
                print("  fairness: a light tenant next to a heavy one ...", flush=True)
                try:
                    res.fairness = fairness.measure(env, work, s.seconds)
                except Exception as e:  # report and go on
                    res.failures.append(f"fairness: {e!r}"[:400])
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
    out = [res.header[0], "", *res.header[1:], ""] if res.header else []
    out.append("### Throughput (TPS; median [min-max] over rounds)")
    out.append("")
    out.append("| workload | direct | PgBouncer | bare relay | tenantgate | tg / direct | tg / PgBouncer | tg / bare "
               "| PgBouncer / direct | CPU cores used: PgBouncer / bare / tenantgate |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for wk in all_workloads():
        d, b, r, t = (res.spread(wk.key, n) for n in (DIRECT, PGBOUNCER, BARE, TENANTGATE))
        if d is None and b is None and t is None:
            continue  # not run (--only)
        cell = lambda sp: sp.fmt() if sp else "-"  # noqa: E731
        cpu = " / ".join(f"{c.median:.2f}" if c else "-" for c in (Spread.of(res.cpu.get((wk.key, n), []))
                                                                      for n in (PGBOUNCER, BARE, TENANTGATE)))
        out.append(f"| {wk.title} | {cell(d)} | {cell(b)} | {cell(r)} | {cell(t)} | {ratio(t, d)} | {ratio(t, b)} "
                   f"| {ratio(t, r)} | {ratio(b, d)} | {cpu} |")
    out.append("")
    if res.workers2 is not None:
        one = res.spread(THROUGHPUT_TARGET_WORKLOAD, TENANTGATE)
        out.append(f"tenantgate with `workers: 2`, pgbench -S 16 clients (one run after the rounds): "
                   f"{res.workers2[0]:.0f} TPS using {res.workers2[1]:.2f} cores"
                   + (f" (1 worker: {one.median:.0f} TPS, median of the rounds)." if one else "."))
        out.append("")
    out.append("Tenant workloads: direct, PgBouncer and the bare relay run the statement with `AND tenant_id = 'acme'` already "
               "added; tenantgate adds it. `-M prepared` through PgBouncer needs PgBouncer >= 1.21.")
    out.append("")
    lat_names = [n for n in (DIRECT, PGBOUNCER, BARE, TENANTGATE) if res.latency.get(n)]
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
    out.append("### Targets (issue 17: the hot path at the limit of the architecture)")
    out.append("")
    out.extend(issue17(res))
    out.append("")
    out.append("### Targets (issue 8)")
    out.append("")
    out.extend(issue8(res))
    if res.profile_top:
        out.append("")
        out.append("### Profile: tenantgate, top functions by own time (py-spy)")
        out.append("")
        out.append("```")
        out.extend(res.profile_top)
        out.append("```")
    return out


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
