"""The admin console on a `tenantgate serve` of its own (the session's demo must keep running):
SHUTDOWN and RELOAD with one process and with two workers (passed to the supervisor, which
reaches every worker), PAUSE TENANT / KILL_CLIENT across workers (proxy/worker_control.py), and
PAUSE TENANT on session-mode sessions."""

from __future__ import annotations

import psycopg
import pytest

from support.admin import Background, until
from support.pool import ADMIN_PASSWORD, ADMIN_USER, serve_pooled


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


def test_pause_tenant_in_session_mode_waits_for_the_open_transaction_and_holds_the_next(demo, tmp_path):
    """Session-mode sessions keep their backend connection: they are held when idle, not at a borrow."""
    with serve_pooled(demo, tmp_path, {"mode": "transaction", "size": 4},
                      user_settings={"acme_app": {"pool_mode": "session"}}) as px, _console(px) as con, \
            psycopg.connect(px.dsn("acme"), application_name="session-acme") as acme, \
            psycopg.connect(px.dsn("globex"), autocommit=True) as globex:

        def acme_state():
            return next((r[3] for r in con.execute("SHOW CLIENTS", prepare=False).fetchall()
                         if r[12] == "session-acme"), None)

        acme.execute("SELECT count(*) FROM orders")  # a transaction is open
        pause = Background(lambda: _console(px).execute("PAUSE TENANT acme", prepare=False).statusmessage)
        try:
            until(lambda: any(r[0] == "acme" and r[4] == "yes"
                              for r in con.execute("SHOW TENANTS", prepare=False).fetchall()), "acme paused")
            assert pause.is_alive(), "PAUSE TENANT returned while acme's transaction was open"
            assert globex.execute("SELECT DISTINCT tenant_id FROM orders").fetchall() == [("globex",)]
            acme.commit()
            assert pause.value() == "PAUSE"
            held = Background(lambda: acme.execute("SELECT DISTINCT tenant_id FROM orders").fetchall())
            until(lambda: acme_state() == "waiting", "the session-mode acme client to be held")
            assert held.is_alive()
        finally:
            con.execute("RESUME TENANT acme", prepare=False)
        assert held.value() == [("acme",)]
        acme.commit()


def test_pause_tenant_reaches_every_worker(demo, tmp_path):
    """With two workers, PAUSE TENANT on one console connection holds the tenant in both workers
    (the worker of a connection is its BackendKeyData pid modulo the worker count)."""
    with serve_pooled(demo, tmp_path, {"mode": "transaction", "size": 4}, workers=2) as px:
        def on_worker(dsn_fn, worker, **kw):
            for _ in range(200):  # the kernel spreads connections; keep the one on `worker`
                c = dsn_fn(**kw)
                if c.info.backend_pid % 2 == worker:
                    return c
                c.close()
            raise AssertionError(f"no connection landed on worker {worker}")

        def app(name):
            return psycopg.connect(px.dsn("acme"), autocommit=True, application_name=name)

        acmes = [on_worker(app, w, name=f"acme-w{w}") for w in (0, 1)]

        def console_on(w):  # a console sees the clients of its own worker only
            for _ in range(200):
                c = _console(px)
                if any(r[12] == f"acme-w{w}" for r in c.execute("SHOW CLIENTS", prepare=False).fetchall()):
                    return c
                c.close()
            raise AssertionError(f"no console connection landed on worker {w}")

        consoles = [console_on(w) for w in (0, 1)]
        globex = psycopg.connect(px.dsn("globex"), autocommit=True)
        held = []
        try:
            assert consoles[0].execute("PAUSE TENANT acme", prepare=False).statusmessage == "PAUSE"
            for w in (0, 1):  # both workers show acme as paused
                assert ("acme", "yes") in {(r[0], r[4]) for r in
                                           consoles[w].execute("SHOW TENANTS", prepare=False).fetchall()}
            held = [Background(lambda c=c: c.execute("SELECT DISTINCT tenant_id FROM orders").fetchall())
                    for c in acmes]
            for w in (0, 1):
                until(lambda w=w: any(r[12] == f"acme-w{w}" and r[3] == "waiting"
                                      for r in consoles[w].execute("SHOW CLIENTS", prepare=False).fetchall()),
                      f"acme's client on worker {w} to be held")
            assert globex.execute("SELECT DISTINCT tenant_id FROM orders").fetchall() == [("globex",)]
            # a client of the other worker can be killed from here too
            victim = on_worker(app, 1, name="victim")
            vid = next(r[10] for r in consoles[1].execute("SHOW CLIENTS", prepare=False).fetchall()
                       if r[12] == "victim")
            assert consoles[0].execute(f"KILL_CLIENT {vid}", prepare=False).statusmessage == "KILL_CLIENT"
            with pytest.raises(psycopg.OperationalError):
                victim.execute("SELECT 1")
        finally:
            consoles[1].execute("RESUME TENANT acme", prepare=False)  # from the other worker's console
        assert [h.value() for h in held] == [[("acme",)], [("acme",)]]
        for c in (*consoles, *acmes, globex):
            c.close()
