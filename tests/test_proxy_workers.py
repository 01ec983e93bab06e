"""`tenantgate serve --workers 2`: cancel requests across workers, summed metrics,
reload, restart of a dead worker, and drain of all workers on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import psycopg
import pytest
import yaml

from proxy.pgcluster import free_port
from support.proxy_harness import BACKEND_PASSWORD, BACKEND_ROLE, ensure_backend_role, verifier_for
from support.serve import serve

PY = sys.executable


class Served:
    def __init__(self, proc: subprocess.Popen, port: int, metrics_port: int, cfg_path, write, db: str):
        self.proc, self.port, self.metrics_port, self.cfg_path, self.write, self.db = (
            proc, port, metrics_port, cfg_path, write, db)

    def dsn(self, user="app", password="pw") -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{self.db}?sslmode=disable"

    def metric(self, name: str, **labels: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        total = 0.0
        for line in text.splitlines():
            mt = re.match(r"^([a-z_]+)(?:\{([^}]*)\})? ([0-9.e+-]+)$", line)
            if not mt or mt.group(1) != name:
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', mt.group(2) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(mt.group(3))
        return total

    def worker_pids(self) -> set[int]:
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            return {int(x) for x in f.read().split()}


@pytest.fixture(scope="module")
def served(pg, make_db, tmp_path_factory):
    db, _ = make_db("workers")
    ensure_backend_role(pg, db)
    cfg_path = tmp_path_factory.mktemp("workers") / "tenantgate.yaml"
    port, metrics_port = free_port(), free_port()

    def write(users):
        cfg_path.write_text(yaml.safe_dump({
            "listen": {"host": "127.0.0.1", "port": port},
            "backend": {"host": pg.host, "port": pg.port, "database": db, "user": BACKEND_ROLE,
                        "password_env": "TG_TEST_BACKEND_PW", "sslmode": "disable"},
            "users": [{"name": n, "scram_verifier": verifier_for(pw), "passthrough": True} for n, pw in users.items()],
            "metrics": {"host": "127.0.0.1", "port": metrics_port},
            "timeouts": {"drain_s": 5},
        }))

    write({"app": "pw"})
    env = dict(os.environ, TG_TEST_BACKEND_PW=BACKEND_PASSWORD)
    with serve(cfg_path, "--workers", "2", env=env) as proxy:
        assert "2 workers" in proxy.banner
        yield Served(proxy.proc, port, metrics_port, cfg_path, write, db)


def _wait_active(admin, marker: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        n = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s",
                          (f"%{marker}%",)).fetchone()[0]
        if n:
            return
        time.sleep(0.05)
    raise AssertionError("the query never started")


def test_cancel_reaches_the_session_whichever_worker_receives_it(pg, served):
    """Run until a cancel was handled by the session's own worker and one was routed to a sibling."""
    seen_local = seen_routed = False
    admin = psycopg.connect(pg.admin_dsn, autocommit=True)  # pg_stat_activity covers every database
    try:
        for i in range(24):
            if seen_local and seen_routed and i >= 4:
                break
            routed_before = served.metric("tenantgate_cancel_requests_total", result="routed")
            conn = psycopg.connect(served.dsn(), autocommit=True)
            outcome: dict = {}
            marker = f"cancel_probe_{i}_{os.getpid()}"

            def run(conn=conn, marker=marker, outcome=outcome):  # joined in this iteration
                try:
                    conn.execute(f"SELECT pg_sleep(30) /* {marker} */")
                    outcome["error"] = None
                except psycopg.Error as e:
                    outcome["error"] = e
                outcome["t"] = time.monotonic()

            t = threading.Thread(target=run)
            t.start()
            _wait_active(admin, marker)
            t0 = time.monotonic()
            conn.cancel_safe()
            t.join(10)
            assert not t.is_alive(), "the query was not cancelled"
            assert isinstance(outcome["error"], psycopg.errors.QueryCanceled), outcome
            assert outcome["t"] - t0 < 2.0
            assert conn.execute("SELECT 1").fetchone() == (1,)  # the session stays usable
            conn.close()
            if served.metric("tenantgate_cancel_requests_total", result="routed") > routed_before:
                seen_routed = True
            else:
                seen_local = True
        assert seen_local and seen_routed, (seen_local, seen_routed)
    finally:
        admin.close()


def test_metrics_endpoint_sums_the_workers(served):
    before = served.metric("tenantgate_client_connection_attempts_total", outcome="accepted")
    for _ in range(8):
        with psycopg.connect(served.dsn()) as c:
            c.execute("SELECT 1")
    after = served.metric("tenantgate_client_connection_attempts_total", outcome="accepted")
    assert after - before == 8


def test_sighup_reaches_every_worker(served):
    served.write({"app": "pw", "second": "pw2"})
    served.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    ok_in_a_row = 0
    while ok_in_a_row < 8:  # connections land on both workers: all must know the new user
        try:
            with psycopg.connect(served.dsn("second", "pw2")) as c:
                c.execute("SELECT 1")
            ok_in_a_row += 1
        except psycopg.OperationalError:
            ok_in_a_row = 0
            assert time.monotonic() < deadline, "reload did not reach every worker"
            time.sleep(0.2)


def test_dead_worker_is_restarted_and_sigterm_stops_all(served):
    pids = served.worker_pids()
    assert len(pids) == 2
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        now = served.worker_pids()
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() < deadline, f"worker not restarted: {now}"
        time.sleep(0.1)
    for _ in range(6):
        psycopg.connect(served.dsn()).close()
    kept = psycopg.connect(served.dsn())
    kept.execute("SELECT 1")
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(20) == 0
    for pid in now:
        assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(served.dsn(), connect_timeout=2)
    kept.close()
