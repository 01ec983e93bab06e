"""Transaction-pooled clients that connect and wait (issue 17: idle client memory).

A pooled session that has sent nothing since its startup gives the startup's connection back
and makes its relay core only at its first message (proxy/session/protocol.py, start_relay).
What a user must not notice, with ``pool: {mode: transaction, size: 1}``:

* connect-time settings (``options=-c``) are in effect at the first statement, however long
  the client waited;
* many clients that connected and waited all get their own tenant's rows once they query,
  on the one connection;
* ``pool.client_idle_timeout_s`` closes a client that never sent anything, like any idle one;
* a client that sends its first statement before its startup has ended is answered.
"""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from support.e2e import RawClient, data_rows, token
from support.pool import serve_pooled
from proxy.wire import messages as m

POOL = {"mode": "transaction", "size": 1, "queue_timeout_s": 10, "client_idle_timeout_s": 3.0}


@pytest.fixture(scope="module")
def px(demo, tmp_path_factory):  # noqa: F811
    with serve_pooled(demo, tmp_path_factory.mktemp("poolidlesessions"), POOL) as proxy:
        yield proxy


async def test_connect_time_settings_hold_at_the_first_statement_after_waiting(px):
    conn = await psycopg.AsyncConnection.connect(px.dsn("acme") + "&options=-c%20statement_timeout%3D4321",
                                                 autocommit=True)
    other = await asyncpg.connect(px.dsn("globex"))
    try:
        # meanwhile another client uses (and changes nothing on) the one connection
        assert await other.fetchval("SELECT current_setting('statement_timeout')") == "0"
        await asyncio.sleep(0.3)
        cur = await conn.execute("SELECT current_setting('statement_timeout'), "
                                 "current_setting('tenantgate.tenant_id'), count(*) FROM customers")
        assert await cur.fetchone() == ("4321ms", "acme", 2)
        assert await other.fetchval("SELECT current_setting('statement_timeout')") == "0"
    finally:
        await conn.close()
        await other.close()


async def test_many_waiting_clients_then_all_query_on_one_connection(px, demo):
    clients = [await asyncpg.connect(px.dsn("acme" if i % 2 else "globex")) for i in range(12)]
    admin = await asyncpg.connect(demo.admin)
    try:
        await asyncio.sleep(0.2)
        assert len(await px.backend_pids(admin)) == 1  # the startups' connection went back each time
        seen = await asyncio.gather(*(c.fetch("SELECT DISTINCT tenant_id FROM orders") for c in clients))
        for i, rows in enumerate(seen):
            assert {r[0] for r in rows} == {"acme" if i % 2 else "globex"}
        assert len(await px.backend_pids(admin)) == 1
    finally:
        for c in clients:
            await c.close()
        await admin.close()


async def test_a_client_that_never_sent_anything_is_closed_when_idle_too_long(px):
    conn = await psycopg.AsyncConnection.connect(px.dsn("globex"), autocommit=True)
    try:
        await asyncio.sleep(5.5)  # client_idle_timeout_s 3, the sweeper looks once a second
        with pytest.raises(psycopg.OperationalError) as err:
            await conn.execute("SELECT 1")
        assert "idle" in str(err.value).lower() or conn.closed
    finally:
        await conn.close()


class _EagerClient(RawClient):
    """Sends a Query together with its last SCRAM message, before authentication has ended."""

    QUERY = m.encode_query("SELECT count(*) FROM customers")

    def send(self, *frames: bytes) -> None:
        self.sasl_sent = getattr(self, "sasl_sent", 0) + (frames[0][:1] == b"p")
        if self.sasl_sent == 2 and frames[0][:1] == b"p":
            frames = (*frames, self.QUERY)
        super().send(*frames)


def test_a_statement_sent_before_the_startup_ended_is_answered(px):
    # The Query is in the session's buffer when the relay starts: the core is made at once and
    # the startup's connection runs it.
    for _ in range(3):
        c = _EagerClient(px.dsn("globex"))
        try:
            reply = c.until_ready()
            assert data_rows(reply) == [[b"2"]]
            c.send(m.encode_query("SELECT DISTINCT tenant_id FROM orders"))
            assert data_rows(c.until_ready()) == [[b"globex"]]
        finally:
            c.close()


# ---------------------------------------------------------------- idle sessions drop their core
#
# A pooled session silent for SHED_IDLE_CORE_S seconds drops its relay core when the core holds
# nothing a new one would not (proxy/session/pooled.py, shed_idle_core), and lets go of the
# connection parked for it (a pool larger than the clients: each keeps its parked connection
# until then).  Its settings, tenant and (if it has any) prepared statements must be as before
# at its next statement.


@pytest.fixture(scope="module")
def px_verbose(demo, tmp_path_factory):  # noqa: F811
    with serve_pooled(demo, tmp_path_factory.mktemp("poolshedcore"), {"mode": "transaction", "size": 4,
                      "queue_timeout_s": 10}, log_level="debug") as proxy:
        yield proxy


def _simple(c: RawClient, sql: str) -> list:
    c.send(m.encode_query(sql))
    reply = c.until_ready()
    failed = [p for t, p in reply if t == b"E"]
    assert not failed, m.decode_error_fields(failed[0]).message
    return data_rows(reply)


async def test_idle_sessions_drop_their_core_and_go_on_as_before(px_verbose, demo):
    from proxy.server import SHED_IDLE_CORE_S

    plain = RawClient(px_verbose.dsn("acme"))
    switching = RawClient(px_verbose.pool_dsn())
    prepared = await asyncpg.connect(px_verbose.dsn("globex"))
    try:
        stmt = await prepared.prepare("SELECT count(*) FROM customers WHERE customer_id > $1")
        assert await stmt.fetchval(0) == 2
        # each of these two ends with its connection parked (its own: the pool has room)
        _simple(plain, "SET statement_timeout = '4321'")
        assert _simple(plain, "SELECT current_setting('statement_timeout')") == [[b"4321ms"]]
        _simple(switching, f"SET tenantgate.tenant = '{token(demo, 'globex')}'")
        assert _simple(switching, "SELECT DISTINCT tenant_id FROM orders") == [[b"globex"]]
        log = px_verbose.log()
        dropped, let_go = log.count("relay core dropped"), log.count("its parked connection let go")
        await asyncio.sleep(SHED_IDLE_CORE_S + 2)
        log = px_verbose.log()
        assert log.count("relay core dropped") >= dropped + 2  # plain and switching; prepared keeps its core
        assert log.count("its parked connection let go") >= let_go + 1  # plain's, at least
        assert _simple(plain, "SELECT current_setting('statement_timeout'), current_setting('tenantgate.tenant_id')"
                       ) == [[b"4321ms", b"acme"]]
        assert _simple(plain, "SELECT DISTINCT tenant_id FROM orders") == [[b"acme"]]
        assert _simple(switching, "SELECT DISTINCT tenant_id FROM orders") == [[b"globex"]]
        assert await stmt.fetchval(0) == 2  # a session with a named statement keeps its core
        assert {r[0] for r in await prepared.fetch("SELECT tenant_id FROM orders")} == {"globex"}
    finally:
        plain.close()
        switching.close()
        await prepared.close()
