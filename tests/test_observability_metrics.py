"""Metrics, the admin HTTP listener and structured logs of a real `tenantgate serve`.

A second tenantgate instance runs with the demo's config (same PostgreSQL,
same control schema; tenantgate is stateless) plus TLS, per-tenant labels
and JSON logs.  Real clients send traffic; /metrics is scraped and parsed
with prometheus-client's text parser, and counters must move by exactly the
expected amounts.
"""

from __future__ import annotations

import socket
import struct
import time

import psycopg
import pytest

from support.observability import json_log_lines, obs_served  # noqa: F401 - session fixture
from support.proxy_harness import wait_until

SECRET_PARAM = "s3cr3t-param-value-never-logged"


@pytest.fixture
def served(obs_served):  # noqa: F811
    return obs_served


def _connect(served, demo, tenant: str = "acme", *, password: str | None = None,  # noqa: F811
             sslmode: str = "disable") -> psycopg.Connection:
    """An application connection through the observed tenantgate (not the demo's own)."""
    pw = demo.password(f"app:{tenant}") if password is None else password
    dbname = demo.app(tenant).rsplit("/", 1)[1].split("?")[0]
    return psycopg.connect(host="127.0.0.1", port=served.port, dbname=dbname, user=f"{tenant}_app", password=pw,
                           sslmode=sslmode, connect_timeout=10, autocommit=True)


def scrape_when(served, ready, what: str):
    """The first scrape for which ``ready(scrape)`` holds (polled; no sleep-then-assert)."""
    def attempt():
        s = served.scrape()
        return s if ready(s) else None

    return wait_until(attempt, 20.0, 0.1, what)


REFUSALS = [
    ("storage", "SELECT pg_read_file('/etc/passwd')"),
    ("storage", "COPY orders TO '/tmp/tenantgate-should-not-exist'"),
    ("catalog", "SELECT * FROM pg_authid"),
    ("catalog", "SELECT * FROM tenantgate_control.grants"),
    ("function", "SELECT query_to_xml('select 1', true, true, '')"),
    ("unsupported", "CREATE TABLE obs_should_not_exist (a int)"),
    ("parse", "SELECT FROM WHERE ((("),
    ("tenant", "SELECT * FROM obs_no_such_table"),
]


def test_counters_move_by_exactly_the_traffic(served, demo):  # noqa: F811
    before = served.scrape()
    forwarded = 0
    with _connect(served, demo) as conn:
        for _ in range(5):
            conn.execute("SELECT count(*) FROM orders").fetchone()
            forwarded += 1
        conn.execute("SELECT %s::text AS v, count(*) FROM orders", (SECRET_PARAM,)).fetchone()
        forwarded += 1
        for _reason, sql in REFUSALS:
            with pytest.raises(psycopg.Error):
                conn.execute(sql)
        # refused in the extended protocol, with a bound parameter that must never be logged
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT pg_read_file(%s)", (SECRET_PARAM,))
    with pytest.raises(psycopg.OperationalError):
        _connect(served, demo, password="wrong-password")
    # the session's close (and its metrics flush) runs after the client's Terminate: wait for the
    # closed session to be counted, then check every figure exactly
    after = scrape_when(served, lambda s: s.value("tenantgate_client_connections", kind="tenant") == 0
                        and s.value("tenantgate_statements_refused_total")
                        - before.value("tenantgate_statements_refused_total") >= len(REFUSALS) + 1,
                        "the closed session's metrics")

    def delta(name, **labels):
        return after.value(name, **labels) - before.value(name, **labels)

    assert delta("tenantgate_statements_total", kind="tenant", result="forwarded") == forwarded
    assert delta("tenantgate_statements_total", kind="tenant", result="refused") == len(REFUSALS) + 1
    expected: dict[str, int] = {}
    for reason, _ in REFUSALS:
        expected[reason] = expected.get(reason, 0) + 1
    expected["storage"] += 1  # the extended-protocol refusal
    for reason, n in expected.items():
        assert delta("tenantgate_statements_refused_total", kind="tenant", reason=reason) == n, reason
    assert delta("tenantgate_statements_refused_total") == len(REFUSALS) + 1
    assert delta("tenantgate_statements_refused_total", reason="tenant", sqlstate="42P01") == 1
    assert delta("tenantgate_client_connection_attempts_total", kind="tenant", outcome="accepted") == 1
    assert delta("tenantgate_client_connection_attempts_total", kind="unauthenticated", outcome="auth_failed") == 1
    assert delta("tenantgate_tenant_statements_total", tenant="acme") == forwarded
    # every round trip to PostgreSQL ends in ReadyForQuery: the forwarded statements plus the Sync of
    # the refused extended-protocol statement (its marker still goes to PostgreSQL, see proxy/session/relay.py)
    assert delta("tenantgate_query_duration_seconds_count") == forwarded + 1
    assert delta("tenantgate_bytes_total", direction="client_to_server") > 0
    assert after.value("tenantgate_rewrite_cache_entries") >= 1
    assert after.value("tenantgate_client_connections", kind="tenant") == 0

    # one JSON line per connection and per refusal; never a bound parameter value
    lines = json_log_lines(served.log())
    assert SECRET_PARAM not in served.log()
    refusals = [ln for ln in lines if ln.get("event") == "refusal" and ln.get("session_id")]
    by_reason = {}
    for ln in refusals:
        by_reason.setdefault(ln["reason"], []).append(ln)
    assert by_reason["catalog"][0]["sqlstate"] == "42501" and by_reason["catalog"][0]["tenant"] == "acme"
    assert all(len(ln["statement"]) <= 43 for ln in refusals)  # statement_max_chars: 40 (+ "...")
    assert any(ln["statement"].startswith("SELECT pg_read_file($1)") for ln in by_reason["storage"])
    # literals in logged statements are replaced by ? (logging.statement_literals is off by default)
    assert any(ln["statement"] == "SELECT pg_read_file('?')" for ln in by_reason["storage"])
    assert not any("/etc/passwd" in ln["statement"] for ln in refusals)
    accepted = [ln for ln in lines if ln.get("event") == "connection" and ln.get("outcome") == "accepted"]
    assert accepted and accepted[-1]["user"] == "acme_app" and accepted[-1]["tenant"] == "acme"
    assert accepted[-1]["kind"] == "tenant" and accepted[-1]["client_addr"].startswith("127.0.0.1:")
    assert accepted[-1]["level"] == "info" and accepted[-1]["logger"] == "tenantgate.events"
    failed = [ln for ln in lines if ln.get("event") == "connection" and ln.get("outcome") == "auth_failed"]
    assert failed and failed[-1]["sqlstate"] == "28P01" and failed[-1]["user"] == "acme_app"


def test_tls_handshakes_are_counted_by_result(served, demo):  # noqa: F811
    before = served.scrape()
    with _connect(served, demo, sslmode="require") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # a client that asks for TLS and then sends garbage instead of a ClientHello
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as s:
        s.sendall(struct.pack("!ii", 8, 80877103))
        assert s.recv(1) == b"S"
        s.sendall(b"this is not a TLS ClientHello\r\n" * 4)
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
    after = scrape_when(served, lambda s: s.value("tenantgate_tls_handshakes_total", result="error")
                        > before.value("tenantgate_tls_handshakes_total", result="error"), "the failed handshake")
    assert after.value("tenantgate_tls_handshakes_total", result="ok") - before.value(
        "tenantgate_tls_handshakes_total", result="ok") == 1
    assert after.value("tenantgate_tls_handshakes_total", result="error") - before.value(
        "tenantgate_tls_handshakes_total", result="error") == 1


def test_control_schema_gauges_match_the_database(served, demo):  # noqa: F811
    with psycopg.connect(demo.admin, autocommit=True) as conn:
        schema = "tenantgate_control"
        want_status = dict(conn.execute(f"SELECT status, count(*) FROM {schema}.tenants GROUP BY status").fetchall())
        want_grants = conn.execute(
            f"SELECT count(*) FROM {schema}.grants WHERE state = 'approved' AND expires_at > now()").fetchone()[0]
        want_overdue = conn.execute(
            f"SELECT count(*) FROM {schema}.tenants WHERE status = 'offboarded' AND retention_end <= now()"
        ).fetchone()[0]
    deadline = time.monotonic() + 10
    while True:
        s = served.scrape()
        got = {st: s.value("tenantgate_tenants", status=st) for st in ("active", "offboarded", "purged")}
        if (all(got[k] == want_status.get(k, 0) for k in got) and s.value("tenantgate_active_grants") == want_grants
                and s.value("tenantgate_tenants_purge_overdue") == want_overdue):
            break
        assert time.monotonic() < deadline, (got, want_status, s.value("tenantgate_active_grants"), want_grants)
        time.sleep(0.5)
    assert s.value("tenantgate_control_stats_timestamp_seconds") > time.time() - 30
    assert "tenantgate_oldest_active_grant_age_seconds" in s.sample_names()


def test_build_info_and_readiness_gauges(served):
    s = served.scrape()
    build = [x for x in s.families["tenantgate_build_info"]]
    assert len(build) == 1 and build[0].value == 1 and build[0].labels["version"]
    assert s.value("tenantgate_backend_up") == 1
    assert s.value("tenantgate_control_up") == 1


def test_admin_http_endpoints_and_status_codes(served):
    status, headers, body = served.get("/healthz")
    assert (status, body) == (200, b"ok\n")
    status, headers, body = served.get("/readyz")
    assert status == 200 and headers["content-type"] == "application/json"
    import json

    doc = json.loads(body)
    assert doc["status"] == "ready"
    assert {k for k, v in doc["checks"].items() if v["ok"]} == {"backend", "rules", "control"}
    assert served.get("/nope")[0] == 404
    assert served.get("/metrics", "POST")[0] == 405
    status, headers, _ = served.get("/readyz", "DELETE")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, headers, body = served.get("/metrics", "HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    assert served.get("/metrics?x=1")[0] == 200
    # a malformed request line
    with socket.create_connection(("127.0.0.1", served.metrics_port), timeout=5) as s:
        s.sendall(b"garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400 ")
    # an oversized header block
    with socket.create_connection(("127.0.0.1", served.metrics_port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 431 ")


def _cli(demo, who: str, *args: str):  # noqa: F811
    argv = [*args, "--config", str(demo.config_path), "--as", who, "--password-stdin"]
    r = demo.cli(*argv, password=demo.password(f"operator:{who}") + "\n")
    assert r.returncode == 0, (r.args, r.stdout, r.stderr)
    return r.stdout


def test_exports_run_by_the_cli_are_counted_from_the_audit_chain(served, demo, tmp_path):  # noqa: F811
    """`tenantgate tenant export` runs in its own process; the proxy counts it from the audit chain."""
    import json

    before = served.scrape()
    grant_id = json.loads(_cli(demo, "alice", "grant", "request", "--tenant", "acme", "--access", "read",
                               "--for", "10m", "--reason", "OBS-1: export metrics test", "--json"))["id"]
    try:
        _cli(demo, "bob", "grant", "approve", str(grant_id))
        out = json.loads(_cli(demo, "alice", "tenant", "export", "acme", "--out", str(tmp_path / "acme.tar.zst")))
    finally:
        _cli(demo, "alice", "grant", "revoke", str(grant_id), "--comment", "OBS-1: done")
    deadline = time.monotonic() + 15
    while True:
        after = served.scrape()
        done = after.value("tenantgate_tenant_exports_total", result="ok") - before.value(
            "tenantgate_tenant_exports_total", result="ok")
        if done >= 1:
            break
        assert time.monotonic() < deadline, "the export was not counted"
        time.sleep(0.5)
    assert done == 1
    assert after.value("tenantgate_tenant_exported_rows_total") - before.value(
        "tenantgate_tenant_exported_rows_total") == out["total_rows"]
    assert after.value("tenantgate_tenant_export_seconds_count") - before.value(
        "tenantgate_tenant_export_seconds_count") == 1
