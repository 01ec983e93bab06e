"""Session mode stays available next to transaction pooling, per user and per database (issue 8).

``pool: {mode: session, databases: {app: transaction}, size: 1}``: database ``app`` is
transaction-pooled, except for ``globex_app`` whose ``pool_mode: session`` keeps one
backend connection of its own for its whole session (outside the pool of 1).
"""

from __future__ import annotations

import asyncpg
import pytest

from support.pool import serve_pooled

POOL = {"mode": "session", "databases": {"app": "transaction"}, "size": 1, "queue_timeout_s": 2}


@pytest.fixture(scope="module")
def px(demo, tmp_path_factory):  # noqa: F811
    with serve_pooled(demo, tmp_path_factory.mktemp("poolmodes"), POOL,
                      user_settings={"globex_app": {"pool_mode": "session"}}) as proxy:
        yield proxy


async def test_session_mode_user_keeps_its_own_connection_beside_the_pool(px):
    pooled = await asyncpg.connect(px.dsn("acme"))
    pooled2 = await asyncpg.connect(px.dsn("acme"))
    session = await asyncpg.connect(px.dsn("globex"))
    try:
        session_pid = await session.fetchval("SELECT pg_backend_pid()")
        pooled_pid = await pooled.fetchval("SELECT pg_backend_pid()")
        assert session_pid != pooled_pid
        assert await pooled2.fetchval("SELECT pg_backend_pid()") == pooled_pid  # the pool of 1, shared
        # the session-mode client in an open transaction does not take the pool's connection
        tx = session.transaction()
        await tx.start()
        assert await session.fetchval("SELECT min(tenant_id) FROM customers") == "globex"
        assert await pooled.fetchval("SELECT min(tenant_id) FROM customers") == "acme"
        assert await pooled2.fetchval("SELECT min(tenant_id) FROM orders") == "acme"
        await tx.commit()
        # a pooled client in an open transaction holds the only pooled connection ...
        ptx = pooled.transaction()
        await ptx.start()
        assert await pooled.fetchval("SELECT current_setting('tenantgate.tenant_id')") == "acme"
        # ... and the session-mode client is not affected
        for _ in range(3):
            assert await session.fetchval("SELECT pg_backend_pid()") == session_pid
            assert await session.fetchval("SELECT current_setting('tenantgate.tenant_id')") == "globex"
        # SQL PREPARE in session mode needs no pinning: nothing waits on it
        await session.execute("PREPARE s_q AS SELECT min(tenant_id) FROM orders")
        assert await session.fetchval("EXECUTE s_q") == "globex"
        await ptx.commit()
        assert await pooled2.fetchval("SELECT min(tenant_id) FROM customers") == "acme"
        assert await session.fetchval("EXECUTE s_q") == "globex"
        # the admin console shows both kinds of pools
        modes = {(r["database"], r["pool_mode"]) for r in px.console("SHOW POOLS")}
        assert {("app", "transaction"), ("app", "session")} <= modes, modes
        clients = {r["user"]: r["pool_mode"] for r in px.console("SHOW CLIENTS") if r["database"] == "app"}
        assert clients == {"acme_app": "transaction", "globex_app": "session"}, clients
    finally:
        for c in (pooled, pooled2, session):
            await c.close()


async def test_session_mode_client_vanishing_in_a_transaction_commits_nothing(px, demo):  # noqa: F811
    from support.e2e import fresh_ids

    (cid,) = fresh_ids(1)
    admin = await asyncpg.connect(demo.admin)
    c = await asyncpg.connect(px.dsn("globex"))
    try:
        tx = c.transaction()
        await tx.start()
        await c.execute("INSERT INTO customers (customer_id, name) VALUES ($1, 'pool-modes: vanished')", cid)
        c.terminate()
        # the open transaction ended as a rollback: the key is free again (an insert of the same
        # key would wait on a lingering transaction, and fail on a committed row)
        other = await asyncpg.connect(px.dsn("globex"))
        try:
            await other.execute("SET lock_timeout = '5s'")
            await other.execute("INSERT INTO customers (customer_id, name) VALUES ($1, 'pool-modes: again')", cid)
            assert await other.fetchval("SELECT name FROM customers WHERE customer_id = $1", cid) == "pool-modes: again"
        finally:
            await other.close()
    finally:
        await admin.execute("DELETE FROM customers WHERE customer_id = $1", cid)
        await admin.close()


@pytest.mark.parametrize("tenant", ["globex", "acme"])  # globex: session mode, acme: transaction mode
def test_a_cancel_sent_while_nothing_runs_never_cancels_the_next_statement(px, tenant):
    """PostgreSQL ignores a cancel for an idle backend.  tenantgate delivers cancels after closing
    the cancel connection, so a late cancel must not hit the client's next statement."""
    import psycopg

    with psycopg.connect(px.dsn(tenant), autocommit=True) as conn:
        cancelled = 0
        for _ in range(60):
            conn.cancel()
            try:
                conn.execute("SELECT pg_sleep(0.005)")
            except psycopg.errors.QueryCanceled:
                cancelled += 1
        assert cancelled == 0
        assert conn.execute("SELECT count(*) FROM customers WHERE tenant_id <> %s", [tenant]).fetchone() == (0,)


def test_a_cancel_still_stops_a_running_statement_in_session_mode(px):
    import threading

    import psycopg

    with psycopg.connect(px.dsn("globex"), autocommit=True) as conn:
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
        timer.join()
        assert conn.execute("SELECT 1").fetchone() == (1,)
