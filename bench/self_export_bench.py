"""Benchmark the self-service export through tenantgate against a raw COPY of the same rows (issue 18).

It starts ``tenantgate demo`` in a temporary state directory, adds ``--rows``
rows (default 1,000,000) to tenant acme's ``customers``, and then, alternating,
best of ``--repeat`` each:

* **raw**: ``psql`` straight to PostgreSQL as the backend superuser, one
  ``\\copy (SELECT … WHERE tenant_id = 'acme') TO FILE (FORMAT csv, HEADER)``
  per tenant table (no proxy, no checksums);
* **tenantgate**: :func:`proxy.lifecycle.self_export.self_export` with acme's
  own application DSN through the proxy (audited export session, one
  REPEATABLE READ snapshot, COPY rewritten by the tenant policy, SHA-256 and
  manifest), into a directory of CSV files.

It prints both figures and their ratio as JSON (target: tenantgate >= 0.8x
raw).  Usage: ``python -m bench.self_export_bench [--rows N] [--repeat K]``.
No timed assertion anywhere: the numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proxy.lifecycle.progress import Progress
from proxy.pgcluster import free_port

ROOT = Path(__file__).resolve().parent.parent
TABLES = ("customers", "orders", "order_items")


def _start_demo(base: Path) -> tuple[subprocess.Popen, dict]:
    state = base / "state"
    port = free_port()
    log = open(base / "demo.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "demo", "--state-dir", str(state),
                             "--listen", f"127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            return proc, json.loads((state / "dsns.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            if proc.poll() is not None:
                raise RuntimeError(f"tenantgate demo exited: see {base / 'demo.log'}")
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("tenantgate demo did not start within 120 s")


def _psql(dsn: str, *commands: str) -> None:
    argv = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", dsn]
    for c in commands:
        argv += ["-c", c]
    subprocess.run(argv, check=True, capture_output=True)


def _raw_copy(admin_dsn: str, workdir: Path, columns: dict[str, str]) -> float:
    cmds = [f"\\copy (SELECT {columns[t]} FROM public.{t} WHERE tenant_id = 'acme') TO '{workdir / (t + '.csv')}' "
            "(FORMAT csv, HEADER)" for t in TABLES]
    t0 = time.perf_counter()
    _psql(admin_dsn, *cmds)
    elapsed = time.perf_counter() - t0
    for t in TABLES:
        (workdir / f"{t}.csv").unlink()
    return elapsed


def run(rows: int = 1_000_000, repeat: int = 3) -> dict:
    from proxy.lifecycle.self_export import self_export

    base = Path(tempfile.mkdtemp(prefix="tenantgate-self-export-bench-"))
    os.chmod(base, 0o755)
    workdir = base / "work"
    workdir.mkdir()
    proc, dsns = _start_demo(base)
    try:
        admin = dsns["backend_admin"]
        t0 = time.perf_counter()
        _psql(admin, "INSERT INTO customers (tenant_id, customer_id, name, email) "
                     f"SELECT 'acme', i, 'customer ' || i, md5(i::text) || '@acme.example' "
                     f"FROM generate_series(1000000, 1000000 + {rows} - 1) i", "VACUUM ANALYZE customers")
        fill_s = time.perf_counter() - t0
        columns = {}
        for t in TABLES:
            out = subprocess.run(["psql", "-X", "-At", admin, "-c",
                                  "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute "
                                  f"WHERE attrelid = 'public.{t}'::regclass AND attnum > 0 AND NOT attisdropped"],
                                 check=True, capture_output=True, text=True)
            columns[t] = out.stdout.strip()

        try:
            import uvloop  # what the CLI uses too

            runner = uvloop.run
        except ImportError:  # pragma: no cover
            runner = asyncio.run
        raw_best = ours_best = float("inf")
        total = None
        for i in range(repeat):
            raw_best = min(raw_best, _raw_copy(admin, workdir, columns))
            out = workdir / f"export{i}"
            t = time.perf_counter()
            manifest = runner(self_export(dsns["app"]["acme"], out, progress=Progress(enabled=False)))
            ours_best = min(ours_best, time.perf_counter() - t)
            total = manifest["total_rows"]
            shutil.rmtree(out)
        return {
            "rows_added": rows,
            "rows_exported": total,
            "fill_s": round(fill_s, 2),
            "raw_psql_copy_s": round(raw_best, 3),
            "raw_psql_rows_per_s": round(total / raw_best),
            "tenantgate_self_export_s": round(ours_best, 3),
            "tenantgate_self_export_rows_per_s": round(total / ours_best),
            "ratio_vs_raw": round(raw_best / ours_best, 3),
            "target_ratio": 0.8,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="self_export_bench", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    print(json.dumps({"self_export": run(a.rows, a.repeat)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
