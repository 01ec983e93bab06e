"""Several worker processes behind one listen address (``workers`` > 1).

One Python process uses at most one core, so ``tenantgate serve`` with
``workers: N`` runs a small *supervisor* (this module's :func:`run_supervisor`)
that starts N *workers* (``python -m proxy.workers``, :func:`worker_main`).

- Every worker binds the listen address with ``SO_REUSEPORT``; the kernel
  spreads new connections over them.  Each worker runs its own
  :class:`proxy.server.ProxyServer` and builds its own gatekeeper inside its
  own event loop (asyncpg pools cannot cross a fork).
- Cancel keys: a worker hands out pids with ``pid % N == index``
  (:class:`proxy.cancel.CancelRegistry`).  A CancelRequest that lands on
  another worker is passed on, as (pid, secret), over the owner's private unix
  socket ``<runtime dir>/cancel-<index>.sock``.  The runtime dir is created
  by the supervisor with mode 0700 and removed when it exits.
- Metrics: the supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
  directory before the workers start, and serves /metrics itself with a
  ``MultiProcessCollector`` (the sum over workers).
- Signals: SIGHUP is passed to every worker (each reloads the config file);
  SIGTERM/SIGINT make every worker drain, and the supervisor exits once all
  have exited.  A worker that dies otherwise is restarted (after a pause when
  it died right after starting).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from proxy.config import Config, ConfigError, load_config

log = logging.getLogger("tenantgate.workers")

#: a worker that dies sooner than this after starting is restarted only after RESTART_PAUSE_S
QUICK_DEATH_S = 2.0
RESTART_PAUSE_S = 1.0
STARTUP_WAIT_S = 60.0

_CANCEL_PACKET = struct.Struct("!ii")


def resolve_worker_count(configured: int) -> int:
    """``workers`` from config or CLI; 0 means one per CPU this process may use."""
    if configured > 0:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def cancel_socket_path(runtime_dir: str | Path, index: int) -> str:
    return str(Path(runtime_dir) / f"cancel-{index}.sock")


def _ready_path(runtime_dir: str | Path, index: int) -> Path:
    return Path(runtime_dir) / f"ready-{index}"


# ---------------------------------------------------------------------------- worker side


class _CancelInbox(asyncio.Protocol):
    """Receives one (pid, secret) from a sibling worker and cancels locally."""

    def __init__(self, registry) -> None:
        self.registry = registry
        self.data = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= _CANCEL_PACKET.size:
            pid, secret = _CANCEL_PACKET.unpack(self.data[:_CANCEL_PACKET.size])
            self.transport.close()
            self.registry.cancel_local(pid, secret)


async def _send_cancel_to_worker(path: str, pid: int, secret: int) -> None:
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 5)
        writer.write(_CANCEL_PACKET.pack(pid, secret))
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    except (OSError, asyncio.TimeoutError) as e:
        log.warning("could not pass a cancel request to the worker at %s: %s", path, e)


async def _worker_serve(config: Config, config_path: str, index: int, count: int, runtime_dir: str) -> None:
    from proxy.cancel import CancelRegistry
    from proxy.gatekeeper import build_gatekeeper
    from proxy.server import ProxyServer, freeze_startup_heap

    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task] = set()

    def forward(owner: int, pid: int, secret: int) -> None:
        task = loop.create_task(_send_cancel_to_worker(cancel_socket_path(runtime_dir, owner), pid, secret))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    registry = CancelRegistry(index, count, forward)
    gatekeeper = await build_gatekeeper(config)
    server = ProxyServer(config, gatekeeper, config_path=config_path, cancels=registry, reuse_port=True)
    server.supervisor_pid = os.getppid()  # the admin console's RELOAD / SHUTDOWN reach every worker through it
    await server.start()
    from proxy.session_events import TENANT_LABELS

    TENANT_LABELS.configure(config.metrics.tenant_labels, config.metrics.tenant_top_n)
    from proxy.control.stats import AUDIT_TAIL

    AUDIT_TAIL.enabled = index == 0  # exports/purges from the audit chain: counted once, not per worker
    sock_path = cancel_socket_path(runtime_dir, index)
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    inbox = await loop.create_unix_server(lambda: _CancelInbox(registry), sock_path)
    os.chmod(sock_path, 0o600)
    from proxy.worker_control import Peers, serve_control

    control_inbox = await serve_control(server, runtime_dir, index)  # the console's PAUSE etc. on every worker
    server.peers = Peers(runtime_dir, index, count)
    server.install_signal_handlers()

    parent = os.getppid()

    def watch_parent() -> None:  # the supervisor was killed: do not linger
        if os.getppid() != parent and not server.draining:
            log.warning("worker %d: supervisor is gone, draining", index)
            loop.create_task(server.drain())
        else:
            loop.call_later(1.0, watch_parent)

    loop.call_later(1.0, watch_parent)
    freeze_startup_heap()
    _ready_path(runtime_dir, index).write_text(str(os.getpid()))
    await server.serve_forever()
    inbox.close()
    control_inbox.close()
    closer = getattr(gatekeeper, "close", None)
    if closer is not None:
        r = closer()
        if inspect.isawaitable(r):
            await r


def worker_main(argv: list[str] | None = None) -> int:
    """Entry point of one worker process (started by the supervisor)."""
    p = argparse.ArgumentParser(prog="tenantgate-worker")
    p.add_argument("--config", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--runtime-dir", required=True)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {args.index}]: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    from proxy.logformat import configure_logging

    configure_logging(config.logging, verbose=args.verbose, worker=args.index)
    config = config.model_copy(update={"listen": config.listen.model_copy(update={"port": args.port})})
    from proxy.server import install_uvloop

    install_uvloop()
    try:
        asyncio.run(_worker_serve(config, args.config, args.index, args.count, args.runtime_dir))
    except KeyboardInterrupt:
        pass
    return 0


# ---------------------------------------------------------------------------- supervisor side


class _Worker:
    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.restart_at: float | None = None


def _reserve_port(host: str) -> tuple[socket.socket, int]:
    """Bind (without listening) a SO_REUSEPORT socket on a free port, so every worker gets the same one."""
    family, type_, proto, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    s = socket.socket(family, type_, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(addr)
    return s, s.getsockname()[1]


class _SupervisorCollector:
    """The workers' metrics (MultiProcessCollector), with the readiness gauges the supervisor
    itself measures (tenantgate_backend_up, tenantgate_control_up: its /readyz probe) in place of
    the workers' never-probed values.  (The supervisor's own values live in memory: the CLI
    imported prometheus_client before PROMETHEUS_MULTIPROC_DIR was set.)"""

    _OWN = ("tenantgate_backend_up", "tenantgate_control_up", "tenantgate_region_backend_up")

    def __init__(self, workers_collector):
        self.workers = workers_collector

    def _own(self) -> dict:
        from proxy import metrics

        return {"tenantgate_backend_up": metrics.BACKEND_UP, "tenantgate_control_up": metrics.CONTROL_UP,
                "tenantgate_region_backend_up": metrics.REGION_BACKEND_UP}

    def collect(self):
        own = {name: next(iter(gauge.collect())) for name, gauge in self._own().items()}
        seen = set()
        for family in self.workers.collect():
            if family.name in own:
                seen.add(family.name)
                yield own[family.name]
                continue
            yield family
        for name in self._OWN:
            if name not in seen:
                yield own[name]


def _start_metrics_endpoint(config: Config, metrics_dir: Path, workers_alive=None) -> None:
    """/metrics (the workers' sum, MultiProcessCollector), /healthz and /readyz, served by the
    supervisor from a thread (proxy.admin_http).  ``workers_alive()`` counts running workers."""
    if config.metrics.port is None:
        return
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from proxy.admin_http import start_admin_server_in_thread
    from proxy.readiness import Readiness

    registry = CollectorRegistry()
    registry.register(_SupervisorCollector(MultiProcessCollector(None, path=str(metrics_dir))))

    def workers_check() -> tuple[bool, str]:
        n = workers_alive() if workers_alive is not None else 1
        return n > 0, f"{n} worker(s) running"

    start_admin_server_in_thread(config.metrics.host, config.metrics.port, registry=registry,
                                 readiness_factory=lambda: Readiness(lambda: config, None, {"workers": workers_check}))


def run_supervisor(config: Config, config_path: str, count: int, *, verbose: bool = False) -> int:
    """Run ``count`` workers until SIGTERM/SIGINT; returns the exit code."""
    runtime = Path(tempfile.mkdtemp(prefix="tenantgate-"))  # mode 0700
    os.chmod(runtime, 0o700)
    metrics_dir = runtime / "metrics"
    metrics_dir.mkdir(mode=0o700)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    pending: deque[int] = deque()

    def on_signal(signum, _frame) -> None:
        pending.append(signum)

    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    holder = None
    port = config.listen.port
    if port == 0:
        holder, port = _reserve_port(config.listen.host)
    workers = [_Worker(i) for i in range(count)]

    def spawn(w: _Worker) -> None:
        _ready_path(runtime, w.index).unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "proxy.workers", "--config", str(config_path), "--index", str(w.index),
               "--count", str(count), "--port", str(port), "--runtime-dir", str(runtime)]
        if verbose:
            cmd.append("--verbose")
        w.proc = subprocess.Popen(cmd)
        w.started = time.monotonic()
        w.restart_at = None

    def reap(w: _Worker) -> int | None:
        """The exit code when the worker has exited (its live metrics are then dropped)."""
        if w.proc is None:
            return None
        rc = w.proc.poll()
        if rc is not None:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(w.proc.pid, str(metrics_dir))
            w.proc = None
        return rc

    def signal_all(sig: int, *, ready_only: bool = False) -> None:
        for w in workers:
            if ready_only and not _ready_path(runtime, w.index).exists():
                continue  # no handler yet (SIGHUP would kill it); it reads the current file as it starts
            if w.proc is not None and w.proc.poll() is None:
                try:
                    w.proc.send_signal(sig)
                except ProcessLookupError:  # pragma: no cover - just exited
                    pass

    def stop_all() -> None:
        """Startup failed: drain whatever started, briefly."""
        signal_all(signal.SIGTERM)
        for w in workers:
            if w.proc is not None:
                try:
                    w.proc.wait(15)
                except subprocess.TimeoutExpired:
                    w.proc.kill()

    stopping = False
    try:
        for w in workers:
            spawn(w)
        deadline = time.monotonic() + STARTUP_WAIT_S
        while not all(_ready_path(runtime, w.index).exists() for w in workers):
            failed = [w for w in workers if w.proc is not None and w.proc.poll() is not None]
            interrupted = any(sig != signal.SIGHUP for sig in pending)
            if failed or interrupted or time.monotonic() > deadline:
                why = (f"worker {failed[0].index} exited with code {failed[0].proc.returncode}" if failed
                       else "interrupted" if interrupted else "workers did not start in time")
                print(f"tenantgate: could not start: {why}", file=sys.stderr, flush=True)
                stop_all()
                return 0 if interrupted and not failed else 1
            time.sleep(0.05)
        if holder is not None:
            holder.close()
            holder = None
        try:
            _start_metrics_endpoint(config, metrics_dir,
                                    lambda: sum(1 for w in workers if w.proc is not None and w.proc.poll() is None))
        except OSError as e:
            print(f"tenantgate: could not serve metrics on {config.metrics.host}:{config.metrics.port}: {e}",
                  file=sys.stderr, flush=True)
            stop_all()
            return 1
        print(f"tenantgate: listening on {config.listen.host}:{port} with {count} workers "
              f"(backend {config.backend.host}:{config.backend.port})", flush=True)

        while True:
            while pending:
                sig = pending.popleft()
                if sig == signal.SIGHUP:
                    log.info("reload: passing SIGHUP to the workers")
                    signal_all(signal.SIGHUP, ready_only=True)
                elif not stopping:
                    log.info("stopping: draining the workers")
                    stopping = True
                    signal_all(signal.SIGTERM)
            now = time.monotonic()
            for w in workers:
                rc = reap(w)
                if rc is not None and not stopping:
                    quick = now - w.started < QUICK_DEATH_S
                    print(f"tenantgate: worker {w.index} exited unexpectedly (code {rc}); restarting",
                          file=sys.stderr, flush=True)
                    w.restart_at = now + (RESTART_PAUSE_S if quick else 0.0)
                if w.proc is None and w.restart_at is not None and not stopping and now >= w.restart_at:
                    spawn(w)
            if stopping and all(w.proc is None for w in workers):
                return 0
            time.sleep(0.1)
    finally:
        if holder is not None:
            holder.close()
        for w in workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
        shutil.rmtree(runtime, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(worker_main())
