"""A purge ends every backend bound to the tenant before it deletes (issue 20, break 3's last
item; deploy/postgres/bootstrap.sql section 8): a statement already running when the purge
starts rolls back instead of committing a row after the receipt counted zero.

The function is called here on the session demo directly (purging acme would take the other
tests' data); tests/test_purge_race.py covers the purge's own steps.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from support.e2e import fresh_ids


def _running(demo, marker: str) -> bool:
    with psycopg.connect(demo.admin, autocommit=True) as a:
        return a.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s",
                         [f"%{marker}%"]).fetchone()[0] > 0


def test_a_running_statement_of_the_tenant_is_ended_and_does_not_commit(demo):
    cid, = fresh_ids(1)
    marker = f"late_{cid}"
    outcome: dict = {}

    def slow_insert():
        try:
            with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
                conn.execute(f"INSERT INTO customers (customer_id, name) SELECT %s, '{marker}' FROM pg_sleep(4)",
                             [cid])
                outcome["ok"] = True
        except psycopg.Error as e:
            outcome["error"] = e

    t = threading.Thread(target=slow_insert)
    t.start()
    try:
        deadline = time.monotonic() + 20
        while not _running(demo, marker):
            assert time.monotonic() < deadline, "the slow insert never started"
            time.sleep(0.05)
        with psycopg.connect(demo.admin, autocommit=True) as a:
            ended = a.execute("SELECT tenantgate_guard.end_tenant_backends('acme', 5000)").fetchone()[0]
            assert ended >= 1
            # every backend bound to acme is gone when the function returns
            assert not _running(demo, marker)
    finally:
        t.join(30)
    assert "error" in outcome and "ok" not in outcome
    with psycopg.connect(demo.admin) as a:
        assert a.execute("SELECT count(*) FROM customers WHERE customer_id = %s", [cid]).fetchone() == (0,)
    # the proxy goes on: new sessions of both tenants work (the pool dropped the ended connections)
    for tenant in ("acme", "globex"):
        with psycopg.connect(demo.app(tenant), autocommit=True) as conn:
            assert {r[0] for r in conn.execute("SELECT DISTINCT tenant_id FROM customers")} == {tenant}


def test_only_the_purge_role_may_end_backends(demo):
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        with pytest.raises(psycopg.Error):
            conn.execute("SELECT tenantgate_guard.end_tenant_backends('globex', 1)")
