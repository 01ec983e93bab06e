"""Benchmark an online tenant move (issue 19): proxy/lifecycle/move.py between two PostgreSQL clusters.

A tenant of ``--rows`` rows (default 1,000,000) is moved from one cluster to the other while a client
writes to it in a loop (one row per transaction; held at cutover, then writing to wherever the flip
points it, as tenantgate's routing does) and another tenant on each cluster writes normally.  Reported:

* the tenant's longest pause: the longest gap between two acknowledged writes of the tenant's client
  (target <= 1 s), and the engine's own hold time (hold -> release);
* acknowledged writes lost (must be 0): acknowledged rows missing on the target afterwards;
* rows of other tenants touched (must be 0): their rows differ from what their own clients wrote;
* the total move time (approval to the source purged), the time to the flip, and the copy phase's
  throughput against a raw ``COPY … TO STDOUT | COPY … FROM STDIN`` of the same rows between the
  same clusters.

It creates its own throwaway clusters (wal_level=logical).  Nothing is asserted on time.
Usage: ``python -m bench.move_bench [--rows N]`` (or ``BENCH_MOVE_ROWS``); ``run()`` prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import asyncpg

from proxy.control.plane import ControlPlane
from proxy.lifecycle.move import MoveHooks, MoveOptions, TableSpec, TenantMove
from proxy.lifecycle.move_state import MoveStore
from bench.lifecycle_bench import FILL_SQL, TABLE_SQL  # the same table and rows
from proxy.pgcluster import _as_postgres, ensure_traversable, make_cluster

LOGICAL_CONF = ("wal_level = logical\nmax_wal_senders = 20\nmax_replication_slots = 20\n"
                "max_logical_replication_workers = 8\nmax_worker_processes = 16\n")

INSERT_SQL = ("INSERT INTO events VALUES ($1, $2, now(), 'write', 1.5, '{\"w\": true}', 'written during the move')")


class Writer:
    """One tenant's client: one row per transaction, ids from ``first`` upwards, every acknowledgement timed."""

    def __init__(self, tenant: str, dsn: str, first: int):
        self.tenant, self.dsn, self.next = tenant, dsn, first
        self.acked: list[int] = []
        self.ack_times: list[float] = []
        self.running = asyncio.Event()
        self.running.set()
        self.idle = asyncio.Event()
        self.stop = False

    async def run(self) -> None:
        conn, on = None, None
        while not self.stop:
            if not self.running.is_set():
                self.idle.set()
                await self.running.wait()
                continue
            self.idle.clear()
            if on != self.dsn:
                if conn is not None:
                    await conn.close()
                conn, on = await asyncpg.connect(self.dsn), self.dsn
            i = self.next
            self.next += 1
            await conn.execute(INSERT_SQL, self.tenant, i)
            self.acked.append(i)
            self.ack_times.append(time.monotonic())
            await asyncio.sleep(0.001)
        self.idle.set()
        if conn is not None:
            await conn.close()

    async def hold(self) -> None:
        self.running.clear()
        await self.idle.wait()

    async def release(self) -> None:
        self.running.set()

    def longest_gap(self) -> float:
        t = self.ack_times
        return max((b - a for a, b in zip(t, t[1:])), default=0.0)


def _raw_copy(src, tgt, db_src: str, db_tgt: str, tenant: str) -> float:
    """Seconds for COPY TO STDOUT on the source piped into COPY FROM STDIN on the target."""
    out = _as_postgres(["psql", "-X", "-qAt", "-h", str(src.sockdir), "-p", str(src.port), "-U", "postgres", "-d", db_src,
                        "-c", f"COPY (SELECT * FROM events WHERE tenant_id = '{tenant}') TO STDOUT"])
    inn = _as_postgres(["psql", "-X", "-qAt", "-h", str(tgt.sockdir), "-p", str(tgt.port), "-U", "postgres", "-d", db_tgt,
                        "-v", "ON_ERROR_STOP=1", "-c", "COPY events FROM STDIN"])
    t0 = time.monotonic()
    p1 = subprocess.Popen(out, stdout=subprocess.PIPE)
    p2 = subprocess.run(inn, stdin=p1.stdout, capture_output=True)
    p1.stdout.close()
    p1.wait()
    if p1.returncode or p2.returncode:
        raise RuntimeError(f"raw copy failed: {p2.stderr!r}")
    return time.monotonic() - t0


async def _state(dsn: str, tenant: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT count(*)::text || ':' || coalesce(sum(hashtext(e::text)::bigint), 0)::text "
                                   "FROM events e WHERE tenant_id = $1", tenant)
    finally:
        await conn.close()


async def _bench(rows: int, base: Path) -> dict:
    src = make_cluster(base, "src", LOGICAL_CONF)
    tgt = make_cluster(base, "tgt", LOGICAL_CONF)
    try:
        for c in (src, tgt):
            for db in ("app", "rawcopy"):
                c.psql(f"CREATE DATABASE {db}")
                c.psql(TABLE_SQL, database=db)
        src.psql("CREATE DATABASE control")
        sdsn, tdsn = src.dsn(database="app"), tgt.dsn(database="app")
        s, t = await asyncpg.connect(sdsn), await asyncpg.connect(tdsn)
        t0 = time.monotonic()
        step = 200_000
        for lo in range(1, rows + 1, step):
            await s.execute(FILL_SQL, "acme", lo, min(rows, lo + step - 1))
        await s.execute(FILL_SQL, "initech", 1, 10_000)
        await t.execute(FILL_SQL, "globex", 1, 10_000)
        await s.execute("VACUUM ANALYZE events")
        fill_s = time.monotonic() - t0
        await s.close()
        await t.close()

        raw_s = _raw_copy(src, tgt, "app", "rawcopy", "acme")

        plane = ControlPlane(src.dsn(database="control"))
        await plane.start(install=True)
        store = MoveStore(plane.pool, plane.s)
        move = await store.create("acme", "east", "north", "bob", {})
        move = await store.approve(move.id, "carol")

        acme = Writer("acme", sdsn, rows + 1)
        others = [Writer("initech", sdsn, 10_001), Writer("globex", tdsn, 10_001)]
        before = {"initech": await _state(sdsn, "initech"), "globex": await _state(tdsn, "globex")}
        tasks = [asyncio.create_task(w.run()) for w in [acme, *others]]
        steps: dict[str, float] = {}

        async def after_step(name: str) -> None:
            steps[name] = time.monotonic()

        async def flip(_conn) -> None:
            acme.dsn = tdsn
            steps["flip"] = time.monotonic()

        hooks = MoveHooks(hold=acme.hold, release=acme.release, flip=flip, after_step=after_step)
        t_start = time.monotonic()
        done = await TenantMove(store, move, sdsn, tdsn, TableSpec(tables=["public.events"]), hooks,
                                MoveOptions(), control_tx=plane._tx).run()
        t_done = time.monotonic()
        n_after = len(acme.acked)
        while len(acme.acked) < n_after + 50:  # the tenant goes on writing on the target
            await asyncio.sleep(0.01)
        for w in [acme, *others]:
            w.stop = True
            w.running.set()
        await asyncio.gather(*tasks)
        await plane.close()

        t = await asyncpg.connect(tdsn)
        s = await asyncpg.connect(sdsn)
        present = {r["id"] for r in await t.fetch("SELECT id FROM events WHERE tenant_id = 'acme' AND id > $1", rows)}
        lost = len(set(acme.acked) - present)
        on_target = await t.fetchval("SELECT count(*) FROM events WHERE tenant_id = 'acme'")
        left_on_source = await s.fetchval("SELECT count(*) FROM events WHERE tenant_id = 'acme'")
        # other tenants: exactly their initial rows plus what their own clients wrote
        touched = 0
        for w, conn in ((others[0], s), (others[1], t)):
            extra = {r["id"] for r in await conn.fetch("SELECT id FROM events WHERE tenant_id = $1 AND id > 10000",
                                                       w.tenant)}
            touched += len(extra ^ set(w.acked))
            await conn.execute("DELETE FROM events WHERE tenant_id = $1 AND id > 10000", w.tenant)
        await s.close()
        await t.close()
        for name, dsn in (("initech", sdsn), ("globex", tdsn)):
            if await _state(dsn, name) != before[name]:
                touched += 1
        copy_s = steps["synced"] - t_start
        return {
            "rows": rows,
            "fill_s": round(fill_s, 1),
            "longest_client_pause_s": round(acme.longest_gap(), 3),
            "engine_hold_ms": done.detail["cutover"]["pause_ms"],
            "engine_hold_detail": done.detail["cutover"],
            "acknowledged_writes": len(acme.acked),
            "acknowledged_writes_lost": lost,
            "rows_of_other_tenants_touched": touched,
            "rows_on_target": on_target,
            "rows_left_on_source": left_on_source,
            "total_move_s": round(t_done - t_start, 1),
            "to_flip_s": round(steps["flip"] - t_start, 1),
            "checksums_after_release_s": round(steps["flipped"] - steps["flip"], 1),
            "copy_and_catchup_s": round(copy_s, 1),
            "source_purge_s": round(steps["done"] - steps["cleaned"], 1),
            "raw_copy_s": round(raw_s, 1),
            "copy_throughput_vs_raw_copy": round(raw_s / copy_s, 2) if copy_s else None,
            "move_rows_per_s_to_flip": int(rows / (steps["flip"] - t_start)),
            "raw_copy_rows_per_s": int(rows / raw_s) if raw_s else None,
        }
    finally:
        src.destroy()
        tgt.destroy()


def run(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="move_bench", description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=int(os.environ.get("BENCH_MOVE_ROWS", 1_000_000)))
    args = p.parse_args(argv or [])
    base = Path(tempfile.mkdtemp(prefix="tenantgate-move-bench-"))
    os.chmod(base, 0o755)
    ensure_traversable(base)
    try:
        report = asyncio.run(_bench(args.rows, base))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(run(sys.argv[1:]))
