"""Shared pieces of the benchmarks: a cluster, a tenantgate subprocess, pgbench runs."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from proxy.pgcluster import free_port, make_cluster

ROOT = Path(__file__).resolve().parent.parent


def raise_nofile_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft if hard == resource.RLIM_INFINITY else hard


def wait_port(host: str, port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {host}:{port}")
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


@dataclass(frozen=True)
class TenantgateProcess:
    port: int
    pid: int
    log_path: Path


@contextmanager
def tenantgate_process(config: dict, workdir: Path):
    """Run `tenantgate serve --config` as its own process (its own core and GIL),
    with RLIMIT_NOFILE raised to the hard limit so it can hold many clients."""
    port = free_port()
    config = {**config, "listen": {"host": "127.0.0.1", "port": port}}
    config.setdefault("metrics", {"port": None})
    cfg_path = workdir / f"tenantgate-{port}.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    log_path = workdir / f"tenantgate-{port}.log"
    log = open(log_path, "w")
    # BENCH_CPROFILE=<file>: run tenantgate under cProfile with a CPU clock (bench/cpu_profile.py)
    prof = os.environ.get("BENCH_CPROFILE")
    runner = ["-m", "bench.cpu_profile", prof] if prof else ["-m", "proxy"]
    proc = subprocess.Popen([sys.executable, *runner, "serve", "--config", str(cfg_path)], stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=raise_nofile_limit, cwd=ROOT)
    try:
        wait_port("127.0.0.1", port, proc=proc)
        yield TenantgateProcess(port, proc.pid, log_path)
    finally:
        stop_process(proc)
        log.close()


TPS_RE = re.compile(r"tps = ([0-9.]+) \((?:without initial connection time|excluding connections establishing)\)")


def pgbench(args: list[str], *, host: str, port: int, user: str, password: str, database: str, env_extra=None,
            cwd: Path | None = None) -> tuple[float, str]:
    env = {**os.environ, "PGPASSWORD": password, "PGSSLMODE": "disable", **(env_extra or {})}
    cmd = ["pgbench", "-h", host, "-p", str(port), "-U", user, *args, database]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    text = out.stdout + out.stderr
    m = TPS_RE.search(text)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"pgbench failed ({out.returncode}): {' '.join(cmd)}\n{text[-2000:]}")
    return float(m.group(1)), text


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
