"""SHUTDOWN and RELOAD from the admin console on a `tenantgate serve` of its own (the session's
demo must keep running), with one process and with two workers (the console's worker passes
them to the supervisor, which reaches every worker)."""

from __future__ import annotations

import psycopg
import pytest

from pool_support import ADMIN_PASSWORD, ADMIN_USER, serve_pooled


def _console(px) -> psycopg.Connection:
    return psycopg.connect(px.dsn_for(ADMIN_USER, ADMIN_PASSWORD, "tenantgate"), autocommit=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_shutdown_drains_every_worker_and_lets_open_transactions_finish(demo, tmp_path, workers):
    with serve_pooled(demo, tmp_path, {"mode": "transaction", "size": 4}, workers=workers) as px:
        # open transactions, spread over the workers by the kernel
        clients = [psycopg.connect(px.dsn("acme" if i % 2 else "globex")) for i in range(4)]
        try:
            for c in clients:
                c.execute("SELECT count(*) FROM customers")  # BEGIN ... (psycopg opens a transaction)
            with _console(px) as con:
                cur = con.execute("RELOAD", prepare=False)
                result, detail = cur.fetchone()
                assert result == "ok"
                assert ("every worker reloads" in detail) == (workers > 1)
                assert con.execute("SHUTDOWN", prepare=False).statusmessage == "SHUTDOWN"
            # the open transactions still commit, and still see only their tenant's rows
            for i, c in enumerate(clients):
                tenant = "acme" if i % 2 else "globex"
                assert c.execute("SELECT DISTINCT tenant_id FROM orders").fetchall() == [(tenant,)]
                c.commit()
            assert px.proc.wait(30) == 0  # the supervisor (or the single process) exits once drained
        finally:
            for c in clients:
                c.close()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(px.dsn("acme"), connect_timeout=5)
