"""Shared pieces of the benchmarks: a cluster, a tenantgate subprocess, pgbench runs."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from proxy.pgcluster import PG_BIN, PgCluster, free_port, make_cluster

ROOT = Path(__file__).resolve().parent.parent


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {host}:{port}")


@contextmanager
def bench_cluster(base: Path):
    cluster = make_cluster(base, "pg")
    try:
        yield cluster
    finally:
        cluster.destroy()


@contextmanager
def tenantgate_process(config: dict, workdir: Path):
    """Run `tenantgate serve --config` as its own process (its own core and GIL)."""
    port = free_port()
    config = {**config, "listen": {"host": "127.0.0.1", "port": port}}
    config.setdefault("metrics", {"port": None})
    cfg_path = workdir / f"tenantgate-{port}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    log = open(workdir / f"tenantgate-{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port("127.0.0.1", port)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


TPS_RE = re.compile(r"tps = ([0-9.]+) \((?:without initial connection time|excluding connections establishing)\)")


def pgbench(args: list[str], *, host: str, port: int, user: str, password: str, database: str, env_extra=None) -> tuple[float, str]:
    env = {**os.environ, "PGPASSWORD": password, "PGSSLMODE": "disable", **(env_extra or {})}
    cmd = ["pgbench", "-h", host, "-p", str(port), "-U", user, *args, database]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    text = out.stdout + out.stderr
    m = TPS_RE.search(text)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"pgbench failed ({out.returncode}): {' '.join(cmd)}\n{text[-2000:]}")
    return float(m.group(1)), text


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
