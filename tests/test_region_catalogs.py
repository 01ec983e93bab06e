"""Each region's tenants are judged against their own server's catalog, and /readyz sees every
region (proxy/gatekeeper.py ``regional``, proxy/readiness.py).

Before, the catalog snapshot (relations, columns, and whether the RLS backstop is in place on
each tenant table) was read from the default region's PostgreSQL only, and used for the tenants
of every region: a tenant table without the backstop on another region's server was served as if
it had it.  `tenantgate demo --regions cn-east,cn-north` places acme on cn-east and globex on
cn-north (two real PostgreSQL clusters).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psycopg
import pytest

from support.demo import start_demo, stop_demo

REGIONS = ("cn-east", "cn-north")


@pytest.fixture(scope="module")
def rdemo():
    base = Path(tempfile.mkdtemp(prefix="tenantgate-region-catalogs-"))
    os.chmod(base, 0o755)
    d = start_demo(base, "--regions", ",".join(REGIONS))
    yield d
    stop_demo(d)  # (the last test stops cn-north's server: the exit code is not the point here)


def _server(rdemo, region: str) -> str:
    return rdemo.dsns["backend_admin_by_region"][region]


def _until(check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (AssertionError, pytest.fail.Exception):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
            continue
        return result


def _orders_count(rdemo, tenant: str):
    with psycopg.connect(rdemo.app(tenant), autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM orders").fetchone()[0]


def _globex_refusal(rdemo, sql: str) -> str:
    """The message tenantgate refuses ``sql`` with in a globex (cn-north) session."""
    with psycopg.connect(rdemo.app("globex"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
            conn.execute(sql)
        return str(e.value)


def test_the_backstop_is_judged_on_the_server_of_the_tenants_region(rdemo):
    assert _orders_count(rdemo, "acme") > 0 and _orders_count(rdemo, "globex") > 0
    with psycopg.connect(_server(rdemo, "cn-north"), autocommit=True) as admin:
        admin.execute("ALTER TABLE orders NO FORCE ROW LEVEL SECURITY")
    try:
        def globex_refused():
            message = _globex_refusal(rdemo, "SELECT count(*) FROM orders")
            assert "backstop is not in place" in message and "not forced" in message, message
            with psycopg.connect(rdemo.app("globex"), autocommit=True) as conn:  # other tables are served
                assert conn.execute("SELECT count(*) FROM customers").fetchone()[0] > 0

        _until(globex_refused)  # the DDL event trigger of cn-north's server refreshes its catalog
        assert _orders_count(rdemo, "acme") > 0  # cn-east's table carries the backstop
    finally:
        with psycopg.connect(_server(rdemo, "cn-north"), autocommit=True) as admin:
            admin.execute("ALTER TABLE orders FORCE ROW LEVEL SECURITY")

    def globex_served_again():
        try:
            assert _orders_count(rdemo, "globex") > 0
        except psycopg.Error as e:
            raise AssertionError(str(e)) from None

    _until(globex_served_again)


def test_a_table_that_only_one_region_has_is_known_there(rdemo):
    with psycopg.connect(_server(rdemo, "cn-north"), autocommit=True) as admin:
        admin.execute("CREATE TABLE region_notes (tenant_id text NOT NULL, body text)")
    try:
        def judged_by_cn_north():  # found in cn-north's catalog, and refused there for the right reason
            message = _globex_refusal(rdemo, "SELECT body FROM region_notes")
            assert "backstop is not in place" in message, message

        _until(judged_by_cn_north)
        with psycopg.connect(rdemo.app("acme"), autocommit=True) as conn:
            with pytest.raises(psycopg.Error) as e:
                conn.execute("SELECT body FROM region_notes")
            assert "backstop" not in str(e.value)  # cn-east has no such table
    finally:
        with psycopg.connect(_server(rdemo, "cn-north"), autocommit=True) as admin:
            admin.execute("DROP TABLE region_notes")


def _readyz(rdemo) -> tuple[int, dict]:
    url = rdemo.dsns["metrics"].rsplit("/", 1)[0] + "/readyz"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _region_up(rdemo) -> dict[str, float]:
    with urllib.request.urlopen(rdemo.dsns["metrics"], timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("tenantgate_region_backend_up{"):
            region = line.split('region="', 1)[1].split('"', 1)[0]
            out[region] = float(line.rsplit(" ", 1)[1])
    return out


def test_readiness_reports_every_region_and_one_region_down_does_not_unready_the_rest(rdemo):
    status, body = _readyz(rdemo)
    assert status == 200, body
    assert body["checks"]["backend"]["ok"]
    assert body["checks"]["backend:cn-north"] == {**body["checks"]["backend:cn-north"], "ok": True, "required": False}
    assert _region_up(rdemo) == {"cn-east": 1.0, "cn-north": 1.0}
    # stop cn-north's PostgreSQL
    data = rdemo.state_dir / "pg-cn-north"
    subprocess.run(["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl", "-D", str(data),
                    "stop", "-m", "fast", "-w"], check=True, capture_output=True, timeout=60)

    def north_down():
        status, body = _readyz(rdemo)
        assert status == 200, body  # cn-east's tenants are still served
        assert body["checks"]["backend:cn-north"]["ok"] is False
        assert _region_up(rdemo) == {"cn-east": 1.0, "cn-north": 0.0}

    _until(north_down)
    assert _orders_count(rdemo, "acme") > 0
