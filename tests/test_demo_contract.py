"""The demo contract other tools depend on: `tenantgate demo --state-dir --listen` and dsns.json."""

import json

import asyncpg
import psycopg
import pytest



def test_dsns_json_has_the_contract_shape(demo):
    # the three contract keys, plus the documented additions (metrics, admin_console)
    assert {"app", "operator", "backend_admin"} <= set(demo.dsns)
    assert set(demo.dsns) - {"app", "operator", "backend_admin"} <= {"metrics", "admin_console",
                                                                     "backend_admin_by_region"}
    assert set(demo.dsns["app"]) == {"acme", "globex"}
    assert demo.dsns["operator"], "at least one operator account"
    for dsn in [*demo.dsns["app"].values(), *demo.dsns["operator"].values()]:
        assert f":{demo.port}/" in dsn


async def test_each_tenant_dsn_sees_only_its_own_rows(demo):
    # The demo's backend role is under the RLS backstop, so this checks the contract, not who
    # filtered: test_e2e_bypassrls.py runs the same checks with a BYPASSRLS backend role.
    admin = await asyncpg.connect(demo.admin)
    try:
        totals = dict(await admin.fetch("SELECT tenant_id, count(*) FROM orders GROUP BY 1"))
    finally:
        await admin.close()
    assert totals.get("acme") and totals.get("globex"), "the demo seeds both tenants"
    for tenant in ("acme", "globex"):
        conn = await asyncpg.connect(demo.app(tenant))
        try:
            for table in ("customers", "orders", "order_items"):
                tenants = {r[0] for r in await conn.fetch(f"SELECT tenant_id FROM {table}")}
                assert tenants == {tenant}, table
            assert await conn.fetchval("SELECT count(*) FROM orders") == totals[tenant]
            assert await conn.fetchval("SELECT count(*) FROM products") > 0  # shared table
        finally:
            await conn.close()


def test_simple_protocol_sees_only_own_rows_too(demo):
    with psycopg.connect(demo.app("globex"), autocommit=True) as conn:
        rows = conn.execute("SELECT DISTINCT tenant_id FROM orders", prepare=False).fetchall()
        assert rows == [("globex",)]
        # several statements in one Query message
        cur = conn.execute("SELECT count(*) FROM customers WHERE tenant_id = 'acme'; SELECT 1", prepare=False)
        assert cur.fetchone() == (0,)  # acme's customers are invisible to globex
        assert cur.nextset() and cur.fetchone() == (1,)


def test_backend_admin_dsn_is_direct_superuser(demo):
    with psycopg.connect(demo.admin) as conn:
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (True,)
        assert conn.execute("SELECT count(DISTINCT tenant_id) FROM orders").fetchone() == (2,)


def test_demo_serves_metrics_and_an_admin_console(demo):
    import urllib.request

    text = urllib.request.urlopen(demo.dsns["metrics"], timeout=10).read().decode()
    assert "tenantgate_client_connections" in text
    assert demo.dsns["admin_console"].split("?")[0].endswith(f":{demo.port}/tenantgate")
    with psycopg.connect(demo.dsns["admin_console"], autocommit=True) as console:
        databases = {r[0] for r in console.execute("SHOW DATABASES", prepare=False).fetchall()}
        version = console.execute("SHOW VERSION", prepare=False).fetchone()[0]
    assert version.startswith("tenantgate ")
    assert databases <= {"app", "tenantgate"}
    # the admin user reaches no data: only the console database
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(demo.dsns["admin_console"].replace("/tenantgate?", "/app?"))
    assert "28000" in str(e.value) or "admin user" in str(e.value)


def test_backend_admin_dsn_uses_verified_tls(demo):
    assert "sslmode=verify-full" in demo.admin and "sslrootcert=" in demo.admin
    with psycopg.connect(demo.admin) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
    # plain TCP is refused by pg_hba (hostssl lines only)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(demo.admin.split("?")[0] + "?sslmode=disable")


def test_demo_passes_doctor(demo):
    """The demo shows the posture the docs recommend: `tenantgate doctor` finds no failure."""
    r = demo.cli("doctor", "--config", str(demo.config_path), "--admin-dsn", demo.admin, "--json", timeout=120)
    report = json.loads(r.stdout)
    failed = [f for f in report["findings"] if f["status"] == "fail"]
    assert failed == [], failed
    assert report["summary"]["pass"] > 20
    checks = {f["check"] for f in report["findings"] if f["status"] == "pass"}
    assert {"ssl", "hba"} <= checks


def test_metrics_port_option(tmp_path):
    """--metrics-port: auto (a free port, kept across runs while free), off, or a number."""
    import argparse

    from proxy.commands.demo import _metrics_port
    from proxy.demo import DemoState, resolve_metrics_port

    assert _metrics_port("auto") == "auto" and _metrics_port("off") == "off" and _metrics_port("9127") == 9127
    for bad in ("0", "70000", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            _metrics_port(bad)
    state = DemoState(tmp_path)
    assert resolve_metrics_port(state, "off") is None
    assert resolve_metrics_port(state, 9127) == 9127
    first = resolve_metrics_port(state, "auto")
    assert first and resolve_metrics_port(state, "auto") == first  # the same port while it is free


def test_the_printed_cli_commands_run_as_printed(demo):
    """issue 15 item 4: the banner's commands use a tenantgate that exists (not a bare name that
    is not on PATH after `make run`)."""
    import shlex
    import subprocess

    text = demo.log_path.read_text()
    line = next(ln for ln in text.splitlines() if " grant request " in ln)
    prefix = shlex.split(line.split(" grant request ")[0])
    out = subprocess.run(prefix + ["grant", "--help"], capture_output=True, text=True, timeout=60, cwd=demo.state_dir)
    assert out.returncode == 0, (prefix, out.stderr)
    assert "request" in out.stdout
