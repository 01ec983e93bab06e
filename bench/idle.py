"""Resident memory with many idle client connections.

Opens ``n`` SCRAM-authenticated client connections to a proxy (bounded
concurrency, :mod:`bench.scram_client`), then reports the proxy's resident
memory (VmRSS summed over the process and its children, from /proc) and the
number of connections PostgreSQL sees from that proxy (pg_stat_activity).
A sample of the idle clients then runs one tenant-scoped query each, to show
the connections are really served through the pool, and the backend count is
read again.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.scram_client import open_many
from bench.targets import DB, TENANT, BenchEnv, Target

PROBE_CLIENTS = 50


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(_children(p))
    return pids


def established_to(port: int) -> int:
    """TCP connections in state ESTABLISHED whose local (server) port is ``port``."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True)
    return len(out.stdout.splitlines()) if out.returncode == 0 else -1


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process and its children so far (from /proc/<pid>/stat)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def tree_rss_mb(pid: int) -> float:
    return sum(rss_kb(p) for p in process_tree(pid)) / 1024


@dataclass(frozen=True)
class IdleResult:
    target: str
    clients: int
    rss_before_mb: float
    rss_mb: float
    connected: int  # server-side ESTABLISHED sockets on the proxy's port while idle (ss)
    backends: int  # PostgreSQL connections from the proxy while the clients are idle
    backends_after_probe: int
    probe_ok: bool
    open_seconds: float

    @property
    def kb_per_client(self) -> float:
        return (self.rss_mb - self.rss_before_mb) * 1024 / max(1, self.clients)


async def _measure(env: BenchEnv, target: Target, n: int, concurrency: int) -> IdleResult:
    before = tree_rss_mb(target.pid)
    t0 = time.monotonic()
    clients = await open_many(n, host="127.0.0.1", port=target.port, user=target.user, password=target.password,
                              database=DB, concurrency=concurrency)
    opened = time.monotonic() - t0
    try:
        await asyncio.sleep(1.0)
        rss = tree_rss_mb(target.pid)
        connected = established_to(target.port)
        backends = env.backend_connections(target.name)
        sql = "SELECT abalance FROM accounts WHERE aid = 1" + (f" AND tenant_id = '{TENANT}'" if target.filtered else "")
        sample = random.sample(clients, min(PROBE_CLIENTS, len(clients)))
        results = await asyncio.wait_for(asyncio.gather(*(c.query(sql) for c in sample), return_exceptions=True), 60)
        probe_ok = all(isinstance(r, list) and len(r) == 1 for r in results)
        backends_after = env.backend_connections(target.name)
    finally:
        for c in clients:
            c.close()
        await asyncio.sleep(0.5)
    return IdleResult(target.name, n, before, rss, connected, backends, backends_after, probe_ok, opened)


def measure(env: BenchEnv, target: Target, n: int, concurrency: int = 200) -> IdleResult:
    return asyncio.run(_measure(env, target, n, concurrency))
