"""The admin console's control commands against the running demo (real policy, real tenants):
PAUSE TENANT / RESUME TENANT, PAUSE / RESUME, RECONNECT, KILL_CLIENT, RELOAD, and SHOW TENANTS.

Every test that pauses resumes in ``finally``: the demo is shared by the whole session.
Waits are "until the console shows it" loops, never fixed sleeps.
"""

from __future__ import annotations

import psycopg
import pytest

from support.admin import Background, until
from support.e2e import admin_execute, admin_rows, fresh_ids

# PgBouncer's SQLSTATE for every admin console error
ADMIN_ERROR = "08P01"


def console(demo) -> psycopg.Connection:
    return psycopg.connect(demo.dsns["admin_console"], autocommit=True)


def rows(conn, sql: str) -> list[dict]:
    cur = conn.execute(sql, prepare=False)
    names = [d.name for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


def run(conn, sql: str) -> str:
    """Run a command; its CommandComplete tag."""
    cur = conn.execute(sql, prepare=False)
    return cur.statusmessage


def client_state(con, application_name: str) -> str | None:
    for c in rows(con, "SHOW CLIENTS"):
        if c["application_name"] == application_name:
            return c["state"]
    return None


def tenant_row(con, tenant: str) -> dict:
    return next((t for t in rows(con, "SHOW TENANTS") if t["tenant"] == tenant),
                {"tenant": tenant, "sessions": 0, "transactions": 0, "refusals": 0, "paused": ""})


def test_pause_tenant_holds_that_tenant_only_and_waits_for_its_transaction(demo):
    cid, = fresh_ids(1)
    globex_before = admin_rows(demo, "customers", "globex")
    with console(demo) as con, \
            psycopg.connect(demo.app("acme"), application_name="pause-acme-tx") as acme_tx, \
            psycopg.connect(demo.app("acme"), autocommit=True, application_name="pause-acme-new") as acme_new, \
            psycopg.connect(demo.app("globex"), autocommit=True) as globex:
        # an acme transaction is in flight when the pause starts
        acme_tx.execute("INSERT INTO customers (customer_id, name) VALUES (%s, 'paused-insert')", [cid])
        pause = Background(lambda: run(console(demo), "PAUSE TENANT acme"))
        try:
            until(lambda: tenant_row(con, "acme")["paused"] == "yes", "acme to show as paused")
            assert pause.is_alive(), "PAUSE TENANT returned while acme's transaction was still open"
            # other tenants carry on, and still see only their own rows
            assert globex.execute("SELECT DISTINCT tenant_id FROM customers").fetchall() == [("globex",)]
            # the in-flight acme transaction finishes; then PAUSE returns
            acme_tx.execute("SELECT 1")
            acme_tx.commit()
            assert pause.value() == "PAUSE"
            # a new acme transaction waits
            held = Background(lambda: acme_new.execute("SELECT customer_id, name, tenant_id FROM customers WHERE customer_id = %s",
                                                       [cid]).fetchall())
            until(lambda: client_state(con, "pause-acme-new") == "waiting", "the acme client to wait")
            assert held.is_alive()
            assert globex.execute("SELECT count(*) FROM customers WHERE customer_id = %s", [cid]).fetchone() == (0,)
        finally:
            run(con, "RESUME TENANT acme")
        assert held.value() == [(cid, "paused-insert", "acme")]
        assert tenant_row(con, "acme")["paused"] == ""
    assert admin_rows(demo, "customers", "globex") == globex_before  # untouched
    admin_execute(demo, "DELETE FROM customers WHERE customer_id = %s", [cid])  # other tests count acme's rows


def test_pause_tenant_also_holds_sessions_that_pick_their_tenant_with_a_token(demo):
    """A token session could switch to the paused tenant inside its next statement: held too."""
    from support.e2e import pool_dsn, token

    with console(demo) as con, psycopg.connect(pool_dsn(demo), autocommit=True,
                                               application_name="pause-token") as pooled:
        pooled.execute(f"SET tenantgate.tenant = '{token(demo, 'globex')}'")
        run(con, "PAUSE TENANT acme")
        try:
            held = Background(lambda: pooled.execute("SELECT DISTINCT tenant_id FROM customers").fetchall())
            until(lambda: client_state(con, "pause-token") == "waiting", "the token session to wait")
        finally:
            run(con, "RESUME TENANT acme")
        assert held.value() == [("globex",)]


def test_pause_and_resume_errors_are_pgbouncers(demo):
    with console(demo) as con:
        for sql, message in [
            ("RESUME TENANT acme", "tenant acme is not paused"),
            ("RESUME", "pooler is not paused/suspended"),
            ("PAUSE nosuchdb", "no such database: nosuchdb"),
            ("PAUSE tenantgate", "cannot pause admin db: tenantgate"),
            ("RESUME app", "database app is not paused"),
            ("KILL_CLIENT 0123456789abcdef", "client not found"),
            ("RECONNECT nosuchdb", "no such database: nosuchdb"),
        ]:
            with pytest.raises(psycopg.Error) as e:
                con.execute(sql, prepare=False)
            assert e.value.sqlstate == ADMIN_ERROR and e.value.diag.message_primary == message, sql
        run(con, "PAUSE TENANT acme")
        try:
            with pytest.raises(psycopg.Error) as e:
                con.execute("PAUSE TENANT acme", prepare=False)
            assert e.value.sqlstate == ADMIN_ERROR and "already paused" in e.value.diag.message_primary
        finally:
            run(con, "RESUME TENANT acme")
        # the console stays usable after errors
        assert rows(con, "SHOW VERSION")[0]["version"].startswith("tenantgate")


def test_pause_database_closes_idle_server_connections_and_holds_everyone(demo):
    with console(demo) as con, psycopg.connect(demo.app("globex"), autocommit=True,
                                               application_name="pause-db") as globex:
        globex.execute("SELECT 1")
        assert run(con, "PAUSE app") == "PAUSE"
        try:
            pool = next(p for p in rows(con, "SHOW POOLS") if p["database"] == "app"
                        and p["pool_mode"] == "transaction")
            assert pool["sv_idle"] == 0 and pool["sv_active"] == 0  # PgBouncer's PAUSE: servers closed
            held = Background(lambda: globex.execute("SELECT count(*) FROM customers").fetchone())
            until(lambda: client_state(con, "pause-db") == "waiting", "the globex client to wait")
            pool = next(p for p in rows(con, "SHOW POOLS") if p["database"] == "app"
                        and p["pool_mode"] == "transaction")
            assert pool["cl_waiting"] >= 1
        finally:
            run(con, "RESUME app")
        assert held.value()[0] >= 1


def test_reconnect_recycles_backend_connections(demo):
    with console(demo) as con, psycopg.connect(demo.app("acme"), autocommit=True) as acme:
        acme.execute("SELECT 1")
        before = {s["remote_pid"] for s in rows(con, "SHOW SERVERS") if s["database"] == "app"}
        assert before
        assert run(con, "RECONNECT app") == "RECONNECT"
        # idle connections are closed at once (PostgreSQL sees the backends go)
        with psycopg.connect(demo.admin, autocommit=True) as su:
            until(lambda: not su.execute("SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)",
                                         [list(before)]).fetchall(), "the old backends to end")
        # and the next transaction gets a new one, still scoped to its tenant
        assert acme.execute("SELECT DISTINCT tenant_id FROM customers").fetchall() == [("acme",)]
        after = {s["remote_pid"] for s in rows(con, "SHOW SERVERS") if s["database"] == "app"}
        assert after and not (after & before)


def test_kill_client_ends_that_session_only(demo):
    with console(demo) as con, \
            psycopg.connect(demo.app("globex"), autocommit=True, application_name="kill-me") as victim, \
            psycopg.connect(demo.app("acme"), autocommit=True, application_name="keep-me") as bystander:
        victim.execute("SELECT 1")
        target = next(c["id"] for c in rows(con, "SHOW CLIENTS") if c["application_name"] == "kill-me")
        assert run(con, f"KILL_CLIENT {target}") == "KILL_CLIENT"
        with pytest.raises(psycopg.OperationalError) as e:
            victim.execute("SELECT 1")
        assert "admin forced disconnect" in str(e.value)
        assert client_state(con, "kill-me") is None
        assert bystander.execute("SELECT DISTINCT tenant_id FROM customers").fetchall() == [("acme",)]


def test_reload_returns_its_result_as_a_row(demo):
    with console(demo) as con:
        cur = con.execute("RELOAD", prepare=False)
        assert cur.statusmessage == "RELOAD"
        result, detail = cur.fetchone()
        assert result == "ok" and str(demo.config_path) in detail


def test_show_tenants_counts_sessions_transactions_and_refusals(demo):
    with console(demo) as con:
        before = {t: tenant_row(con, t) for t in ("acme", "globex")}
        with psycopg.connect(demo.app("acme"), autocommit=True) as acme:
            acme.execute("SELECT count(*) FROM orders")
            acme.execute("SELECT count(*) FROM customers")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                acme.execute("SELECT * FROM pg_authid")
            now = tenant_row(con, "acme")
            assert now["sessions"] >= before["acme"]["sessions"] + 1
            assert now["transactions"] >= before["acme"]["transactions"] + 2
            assert now["refusals"] == before["acme"]["refusals"] + 1
        assert tenant_row(con, "globex")["refusals"] == before["globex"]["refusals"]


def test_show_stats_averages_come_from_the_live_window(demo):
    """The pool janitor samples the totals every second; SHOW STATS divides the window's growth."""
    with console(demo) as con, psycopg.connect(demo.app("globex"), autocommit=True) as globex:
        for _ in range(200):
            globex.execute("SELECT 1")

        def app_stats():
            return next((s for s in rows(con, "SHOW STATS") if s["database"] == "app"), None)

        stats = until(lambda: (lambda s: s if s and s["avg_query_count"] > 0 else None)(app_stats()),
                      "a per-second query rate for the app database")
        assert stats["total_query_count"] >= 200
        assert stats["avg_query_count"] <= stats["total_query_count"]
        assert stats["avg_query_time"] >= 0 and stats["avg_recv"] > 0
