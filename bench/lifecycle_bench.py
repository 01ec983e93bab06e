"""Benchmark tenant export and purge (issue 6).

1. Export a tenant of ``--rows`` rows (default 1,000,000) with
   :func:`proxy.lifecycle.export.export_tenant` and compare rows/s with a raw
   ``psql -c "\\copy (SELECT … WHERE tenant_id = …) TO …"`` of the same rows in
   the same run (best of ``--repeat`` each; target ratio >= 0.8).
2. Purge that tenant with :func:`proxy.lifecycle.purge.purge_tenant` while
   pgbench runs a point-lookup read load for another tenant against the
   cluster, and report the purge time and the other tenant's p99 latency
   during the purge against the same load without it.

It creates its own throwaway cluster (proxy.pgcluster.make_cluster).
``main(argv)`` prints a JSON report and returns 0; ``run(...)`` returns the dict.
Usage: ``python -m bench.lifecycle_bench [--rows N] [--repeat K]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import asyncpg

from proxy.lifecycle.export import export_tenant
from proxy.lifecycle.progress import Progress
from proxy.lifecycle.purge import PurgeOptions, purge_tenant
from proxy.lifecycle.tables import discover
from proxy.pgcluster import make_cluster

TABLE_SQL = """
CREATE TABLE events (
    tenant_id text NOT NULL, id bigint NOT NULL, created timestamptz NOT NULL,
    kind text NOT NULL, amount numeric(12,2), payload jsonb, note text,
    PRIMARY KEY (tenant_id, id));
"""

FILL_SQL = """
INSERT INTO events SELECT $1, i, timestamptz '2024-01-01' + i * interval '1 second',
    (ARRAY['click','view','buy','refund'])[1 + i % 4], (i % 100000) / 100.0,
    jsonb_build_object('i', i, 'tag', 'tag' || (i % 97)),
    CASE WHEN i % 10 = 0 THEN NULL ELSE md5(i::text) END
FROM generate_series($2::bigint, $3::bigint) i
"""

PGBENCH_SCRIPT = """\\set id random(1, {other_rows})
SELECT * FROM events WHERE tenant_id = 'other' AND id = :id;
"""


def _percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(p / 100.0 * len(values) + 0.5)) - 1))
    return values[k]


class _LoadLoop:
    """Runs back-to-back pgbench slices (``slice_s`` each) until stopped; keeps per-transaction latencies."""

    def __init__(self, cluster, workdir: Path, database: str, clients: int, other_rows: int, slice_s: int = 3):
        self.cluster = cluster
        self.workdir = workdir
        self.database = database
        self.clients = clients
        self.slice_s = slice_s
        self.script = workdir / "lookup.sql"
        self.script.write_text(PGBENCH_SCRIPT.format(other_rows=other_rows))
        os.chmod(self.script, 0o644)
        self.samples: list[tuple[float, float]] = []  # (epoch seconds, latency ms)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _one_slice(self, n: int) -> None:
        logdir = self.workdir / f"slice{n}"
        logdir.mkdir()
        env = {**os.environ, "PGPASSWORD": self.cluster.superuser_password}
        subprocess.run(
            [
                "pgbench", "-n", "-h", self.cluster.host, "-p", str(self.cluster.port), "-U", "postgres",
                "-c", str(self.clients), "-j", "1", "-T", str(self.slice_s), "-f", str(self.script),
                "-l", "--log-prefix", str(logdir / "log"), self.database,
            ],
            check=True, capture_output=True, env=env, cwd=logdir,
        )
        for f in logdir.iterdir():
            for line in f.read_text().splitlines():
                parts = line.split()
                # client_id transaction_no latency_us script_no epoch epoch_us
                if len(parts) >= 6:
                    self.samples.append((int(parts[4]) + int(parts[5]) / 1e6, int(parts[2]) / 1000.0))

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            self._one_slice(n)
            n += 1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def p99_between(self, t0: float, t1: float) -> tuple[float | None, int]:
        lat = [ms for at, ms in self.samples if t0 <= at <= t1]
        return _percentile(lat, 99), len(lat)


def _raw_psql_copy(cluster, database: str, out: Path) -> float:
    env = {**os.environ, "PGPASSWORD": cluster.superuser_password}
    cols = "tenant_id, id, created, kind, amount, payload, note"
    cmd = (
        f"\\copy (SELECT {cols} FROM public.events WHERE tenant_id = 'big') TO '{out}' (FORMAT csv, HEADER)"
    )
    t0 = time.perf_counter()
    subprocess.run(
        ["psql", "-X", "-q", "-h", cluster.host, "-p", str(cluster.port), "-U", "postgres", "-d", database, "-c", cmd],
        check=True, env=env, capture_output=True,
    )
    return time.perf_counter() - t0


async def _bench(cluster, workdir: Path, rows: int, repeat: int, other_rows: int, clients: int, batch_rows: int) -> dict:
    dsn = cluster.dsn(database="bench")
    conn = await asyncpg.connect(dsn)
    report: dict = {"rows": rows, "other_tenant_rows": other_rows, "purge_batch_rows": batch_rows}
    try:
        await conn.execute(TABLE_SQL)
        t0 = time.perf_counter()
        step = 250_000
        for lo in range(1, rows + 1, step):
            await conn.execute(FILL_SQL, "big", lo, min(rows, lo + step - 1))
        await conn.execute(FILL_SQL, "other", 1, other_rows)
        await conn.execute("VACUUM ANALYZE events")
        report["fill_s"] = round(time.perf_counter() - t0, 2)
        schema = await discover(conn, "tenant_id")

        # --- export vs raw psql \copy (alternating, best of `repeat`)
        raw_best = ours_best = float("inf")
        for i in range(repeat):
            raw_out = workdir / f"raw{i}.csv"
            raw_best = min(raw_best, _raw_psql_copy(cluster, "bench", raw_out))
            raw_out.unlink()
            out = workdir / f"export{i}"
            t = time.perf_counter()
            manifest = await export_tenant(conn, schema, "big", out, progress=Progress(enabled=False))
            ours_best = min(ours_best, time.perf_counter() - t)
            assert manifest["total_rows"] == rows
            shutil.rmtree(out)
        t = time.perf_counter()
        await export_tenant(conn, schema, "big", workdir / "export.tar.zst", progress=Progress(enabled=False))
        tar_s = time.perf_counter() - t
        tar_bytes = (workdir / "export.tar.zst").stat().st_size
        (workdir / "export.tar.zst").unlink()
        report["export"] = {
            "raw_psql_copy_s": round(raw_best, 3),
            "raw_psql_rows_per_s": round(rows / raw_best),
            "tenantgate_export_dir_csv_s": round(ours_best, 3),
            "tenantgate_export_rows_per_s": round(rows / ours_best),
            "ratio_vs_raw": round(raw_best / ours_best, 3),
            "target_ratio": 0.8,
            "tenantgate_export_tar_zst_s": round(tar_s, 3),
            "tar_zst_bytes": tar_bytes,
        }

        # --- read load of the other tenant: without, then during the purge
        load = _LoadLoop(cluster, workdir, "bench", clients, other_rows)
        os.chmod(workdir, 0o777)
        load.start()
        time.sleep(1.0)
        base_t0 = time.time()
        time.sleep(8.0)
        base_t1 = time.time()
        purge_t0 = time.time()
        t = time.perf_counter()
        receipt = await purge_tenant(conn, schema, "big", PurgeOptions(batch_rows=batch_rows))
        purge_s = time.perf_counter() - t
        purge_t1 = time.time()
        load.stop()
        assert receipt["total_rows"] == rows
        base_p99, base_n = load.p99_between(base_t0, base_t1)
        during_p99, during_n = load.p99_between(purge_t0, purge_t1)
        report["purge"] = {
            "purge_s": round(purge_s, 2),
            "purge_rows_per_s": round(rows / purge_s),
            "other_tenant_load": f"pgbench -c {clients}: point lookups of tenant 'other'",
            "other_p99_ms_without_purge": round(base_p99, 3) if base_p99 is not None else None,
            "other_p99_ms_during_purge": round(during_p99, 3) if during_p99 is not None else None,
            "other_tps_without_purge": round(base_n / (base_t1 - base_t0)),
            "other_tps_during_purge": round(during_n / (purge_t1 - purge_t0)),
        }
    finally:
        await conn.close()
    return report


def run(rows: int = 1_000_000, repeat: int = 2, other_rows: int = 100_000, clients: int = 4, batch_rows: int = 5000) -> dict:
    base = Path(tempfile.mkdtemp(prefix="tenantgate-lifecycle-bench-"))
    os.chmod(base, 0o755)
    workdir = base / "work"
    workdir.mkdir()
    os.chmod(workdir, 0o777)
    cluster = make_cluster(base, "pg")
    try:
        cluster.psql("CREATE DATABASE bench")
        coro = _bench(cluster, workdir, rows, repeat, other_rows, clients, batch_rows)
        try:
            import uvloop  # what the CLI uses too
        except ImportError:  # pragma: no cover
            return asyncio.run(coro)
        return uvloop.run(coro)
    finally:
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lifecycle_bench", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--other-rows", type=int, default=100_000)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--batch-rows", type=int, default=5000)
    a = p.parse_args(argv)
    report = run(a.rows, a.repeat, a.other_rows, a.clients, a.batch_rows)
    print(json.dumps({"lifecycle": report}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
