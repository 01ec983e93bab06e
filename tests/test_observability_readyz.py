"""/readyz follows the backend: 503 while PostgreSQL is down, 200 again when it is back;
/healthz stays 200 throughout.  Uses its own PostgreSQL cluster (it is stopped here)."""

from __future__ import annotations

import json
import time

import pytest

from support.observability import start_serve
from proxy.pgcluster import make_cluster
from support.proxy_harness import verifier_for


def _wait_for(served, want: int, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, headers, body = served.get("/readyz")
        assert served.get("/healthz")[0] == 200
        if status == want:
            assert headers["content-type"] == "application/json"
            return json.loads(body)
        assert time.monotonic() < deadline, (status, body)
        time.sleep(0.3)


@pytest.fixture
def own_cluster(tmp_path):
    cluster = make_cluster(tmp_path / "pg", "obsready")
    yield cluster
    cluster.destroy()


def test_readyz_turns_unready_when_the_backend_stops_and_ready_when_it_returns(own_cluster, tmp_path):
    raw = {
        "backend": {"host": own_cluster.host, "port": own_cluster.port, "database": "postgres", "user": "postgres",
                    "password": own_cluster.superuser_password, "sslmode": "disable", "connect_timeout_s": 2},
        "users": [{"name": "app", "scram_verifier": verifier_for("pw"), "passthrough": True}],
        "metrics": {"readiness_timeout_s": 1, "readiness_cache_s": 0.5},
    }
    served = start_serve(raw, tmp_path / "serve")
    try:
        doc = _wait_for(served, 200)
        assert doc == {"status": "ready", "checks": {"backend": doc["checks"]["backend"]}}
        assert doc["checks"]["backend"]["ok"] is True
        assert served.scrape().value("tenantgate_backend_up") == 1

        own_cluster.stop()
        doc = _wait_for(served, 503)
        assert doc["status"] == "not ready"
        assert doc["checks"]["backend"]["ok"] is False and doc["checks"]["backend"]["detail"]
        scrape = served.scrape()
        assert scrape.value("tenantgate_backend_up") == 0
        assert scrape.value("tenantgate_backend_connect_errors_total") >= 1

        own_cluster.start()
        doc = _wait_for(served, 200)
        assert doc["checks"]["backend"]["ok"] is True
        assert served.scrape().value("tenantgate_backend_up") == 1
        assert served.proc.poll() is None
    finally:
        served.stop()


def test_worker_supervisor_serves_health_readiness_and_summed_metrics(pg, make_db, tmp_path):
    from support.proxy_harness import BACKEND_PASSWORD, BACKEND_ROLE, ensure_backend_role

    db, _ = make_db("obsworkers")
    ensure_backend_role(pg, db)
    raw = {
        "workers": 2,
        "backend": {"host": pg.host, "port": pg.port, "database": db, "user": BACKEND_ROLE,
                    "password": BACKEND_PASSWORD, "sslmode": "disable"},
        "users": [{"name": "app", "scram_verifier": verifier_for("pw"), "passthrough": True}],
    }
    served = start_serve(raw, tmp_path / "serve")
    try:
        doc = _wait_for(served, 200)
        assert doc["checks"]["workers"] == {"ok": True, "detail": "2 worker(s) running"}
        assert doc["checks"]["backend"]["ok"] is True
        import psycopg

        for _ in range(3):
            with psycopg.connect(f"postgresql://app:pw@127.0.0.1:{served.port}/{db}?sslmode=disable") as conn:
                conn.execute("SELECT 1").fetchone()
        deadline = time.monotonic() + 10
        while True:
            scrape = served.scrape()
            accepted = scrape.value("tenantgate_client_connection_attempts_total", kind="passthrough",
                                    outcome="accepted")
            if accepted == 3:
                break
            assert time.monotonic() < deadline, accepted
            time.sleep(0.3)
        assert scrape.value("tenantgate_backend_up") == 1  # the supervisor's own probe, max over processes
        assert len(scrape.families["tenantgate_build_info"]) == 1
        assert served.get("/nope")[0] == 404
    finally:
        served.stop()
