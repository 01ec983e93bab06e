"""The `tenantgate demo` as the end-to-end tests' environment.

``demo`` (session-scoped fixture) runs ``tenantgate demo --state-dir DIR
--listen 127.0.0.1:PORT`` as a subprocess, exactly as a user or the external
suite would, waits for ``dsns.json`` and yields a :class:`Demo`.  At the end it
sends SIGTERM and checks that tenantgate and PostgreSQL stopped.

Import the fixture into a test module with
``from support.demo import demo  # noqa: F401``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import crash_watch
from proxy.pgcluster import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Demo:
    state_dir: Path
    port: int
    dsns: dict
    secrets: dict
    proc: subprocess.Popen
    log_path: Path

    @property
    def config_path(self) -> Path:
        return self.state_dir / "tenantgate.yaml"

    def app(self, tenant: str) -> str:
        return self.dsns["app"][tenant]

    def operator(self, name: str) -> str:
        return self.dsns["operator"][name]

    @property
    def admin(self) -> str:
        return self.dsns["backend_admin"]

    def password(self, key: str) -> str:
        """e.g. password("operator:alice"), password("app:acme")."""
        return self.secrets[key]

    def cli(self, *args: str, password: str | None = None, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``tenantgate ARGS`` (with --config of the demo inserted after the subcommand pair by the caller)."""
        return subprocess.run([sys.executable, "-m", "proxy", *args], input=password, capture_output=True, text=True,
                              check=check, timeout=timeout, cwd=ROOT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_demo(base: Path, *extra: str) -> Demo:
    """``extra``: more arguments of ``tenantgate demo`` (e.g. ``--regions``, ``a,b``)."""
    state = base / "state"
    port = free_port()
    log_path = base / "demo.log"
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "demo", "--state-dir", str(state), "--listen", f"127.0.0.1:{port}",
                             *extra],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 120
    dsns_file = state / "dsns.json"
    while time.monotonic() < deadline:
        if dsns_file.exists():
            try:
                dsns = json.loads(dsns_file.read_text())
                break
            except ValueError:
                pass
        if proc.poll() is not None:
            raise RuntimeError(f"tenantgate demo exited early:\n{log_path.read_text()}")
        time.sleep(0.2)
    else:
        proc.kill()
        raise TimeoutError(f"tenantgate demo did not write dsns.json:\n{log_path.read_text()}")
    secrets = json.loads((state / "demo.json").read_text())["secrets"]
    crash_watch.register_log(log_path)  # a traceback in the demo's log fails the running test
    return Demo(state, port, dsns, secrets, proc, log_path)


def stop_demo(demo: Demo, timeout: float = 30) -> int:
    demo.proc.send_signal(signal.SIGTERM)
    try:
        return demo.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        demo.proc.kill()
        demo.proc.wait()
        raise


@pytest.fixture(scope="session")
def demo():
    base = Path(tempfile.mkdtemp(prefix="tenantgate-demo-"))
    os.chmod(base, 0o755)
    d = start_demo(base)
    yield d
    stop_demo(d)
