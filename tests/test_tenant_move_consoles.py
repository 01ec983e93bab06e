"""The move's cutover hold against a real tenantgate (the session demo): `tenant move` holds the tenant at
every instance with the admin console's PAUSE TENANT (proxy/commands/tenant_move.py, ``Consoles``), which
returns only once the tenant's in-flight transaction ended; the tenant's new statements wait and run after
RESUME TENANT; other tenants are not held.  A repeated hold (a resumed cutover) and a repeated release (an
abort after a release) are accepted.  The demo is shared: every test releases in ``finally``."""

from __future__ import annotations

import asyncio

import psycopg

from proxy.commands.tenant_move import Consoles
from support.admin import Background, until
from support.e2e import admin_execute, fresh_ids


def _tenants(d) -> dict:
    with psycopg.connect(d.dsns["admin_console"], autocommit=True) as con:
        cur = con.execute("SHOW TENANTS", prepare=False)
        names = [d.name for d in cur.description]
        return {r[0]: dict(zip(names, r)) for r in cur.fetchall()}


def _clients(d) -> dict:
    with psycopg.connect(d.dsns["admin_console"], autocommit=True) as con:
        cur = con.execute("SHOW CLIENTS", prepare=False)
        names = [d.name for d in cur.description]
        return {r["application_name"]: r for r in (dict(zip(names, x)) for x in cur.fetchall())}


async def test_consoles_hold_waits_for_in_flight_and_release_runs_the_held(demo):
    cid, = fresh_ids(1)
    consoles = Consoles([demo.dsns["admin_console"]], "acme")
    with psycopg.connect(demo.app("acme"), application_name="move-acme-tx") as acme_tx, \
            psycopg.connect(demo.app("acme"), autocommit=True, application_name="move-acme-new") as acme_new, \
            psycopg.connect(demo.app("globex"), autocommit=True) as globex:
        acme_tx.execute("INSERT INTO customers (customer_id, name) VALUES (%s, 'during-cutover')", [cid])
        hold = asyncio.create_task(consoles.hold())
        try:
            while _tenants(demo).get("acme", {}).get("paused") != "yes":
                assert not hold.done() or hold.exception() is None
                await asyncio.sleep(0.05)
            assert not hold.done(), "the hold returned while acme's transaction was still open"
            assert globex.execute("SELECT count(*) FROM customers WHERE customer_id = %s", [cid]).fetchone() == (0,)
            acme_tx.commit()
            await hold  # in-flight work ended: the cutover may go on
            await consoles.hold()  # a resumed cutover holds again: accepted
            held = Background(lambda: acme_new.execute("SELECT name FROM customers WHERE customer_id = %s",
                                                       [cid]).fetchall())
            until(lambda: _clients(demo).get("move-acme-new", {}).get("state") == "waiting",
                  "the acme client to wait")
            assert held.is_alive()
            assert globex.execute("SELECT 1").fetchone() == (1,)  # other tenants are not held
        finally:
            if not hold.done():
                hold.cancel()
            await consoles.release()
        assert held.value() == [("during-cutover",)]
        await consoles.release()  # released twice (an abort after a failed cutover): accepted
        assert _tenants(demo).get("acme", {}).get("paused", "") == ""
    admin_execute(demo, "DELETE FROM customers WHERE customer_id = %s", [cid])
