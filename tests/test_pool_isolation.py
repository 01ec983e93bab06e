"""Transaction pooling keeps clients apart on a shared backend connection (issue 8, must-show 1).

A ``tenantgate serve`` with ``pool: {mode: transaction, size: 1}`` in front of the
demo's database: every tenant client MUST run its transactions on the same single
backend connection (asserted with ``pg_backend_pid()``).  Two clients of different
tenants interleave transactions and never see each other's tenant, settings or
prepared statements, with real clients (asyncpg, psycopg 3, a raw protocol client).
"""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from support.e2e import RawClient, data_rows, errors, token
from support.pool import serve_pooled
from support.proxy_harness import wait_until, wait_until_query_active
from proxy.wire import messages as m

POOL = {"mode": "transaction", "size": 1, "queue_timeout_s": 2}


@pytest.fixture(scope="module")
def px(demo, tmp_path_factory):  # noqa: F811
    with serve_pooled(demo, tmp_path_factory.mktemp("pool1"), POOL) as proxy:
        yield proxy


async def _tenant_rows(conn) -> set[str]:
    return {r["tenant_id"] for r in await conn.fetch("SELECT tenant_id FROM customers UNION ALL "
                                                     "SELECT tenant_id FROM orders")}


async def test_interleaved_transactions_each_see_only_their_tenant(px):
    a = await asyncpg.connect(px.dsn("acme"))
    b = await psycopg.AsyncConnection.connect(px.dsn("globex"), autocommit=True)
    try:
        pids = set()
        for _ in range(4):
            async with a.transaction():
                assert await _tenant_rows(a) == {"acme"}
                assert await a.fetchval("SELECT current_setting('tenantgate.tenant_id')") == "acme"
                pids.add(await a.fetchval("SELECT pg_backend_pid()"))
                assert await a.fetchval("SELECT count(*) FROM customers WHERE tenant_id = 'globex'") == 0
            async with b.transaction():
                cur = await b.execute("SELECT tenant_id FROM customers UNION ALL SELECT tenant_id FROM orders")
                assert {r[0] for r in await cur.fetchall()} == {"globex"}
                cur = await b.execute("SELECT current_setting('tenantgate.tenant_id'), pg_backend_pid()")
                tenant, pid = await cur.fetchone()
                assert tenant == "globex"
                pids.add(pid)
            # autocommit statements between the transactions are pooled the same way
            assert await a.fetchval("SELECT current_setting('tenantgate.tenant_id')") == "acme"
            cur = await b.execute("SELECT current_setting('tenantgate.tenant_id')")
            assert (await cur.fetchone())[0] == "globex"
        assert len(pids) == 1, f"pool.size 1 but the clients ran on backends {pids}"
    finally:
        await a.close()
        await b.close()


async def test_token_tenants_follow_their_client_including_set_local(px, demo):  # noqa: F811
    c = await asyncpg.connect(px.pool_dsn())
    d = await asyncpg.connect(px.pool_dsn())
    try:
        await c.execute(f"SET tenantgate.tenant = '{token(demo, 'acme')}'")
        await d.execute(f"SET tenantgate.tenant = '{token(demo, 'globex')}'")
        for _ in range(3):
            assert await _tenant_rows(c) == {"acme"}
            assert await _tenant_rows(d) == {"globex"}
            assert await c.fetchval("SELECT current_setting('tenantgate.tenant_id')") == "acme"
            assert await d.fetchval("SELECT current_setting('tenantgate.tenant_id')") == "globex"
        async with c.transaction():  # SET LOCAL switches one transaction only
            await c.execute(f"SET LOCAL tenantgate.tenant = '{token(demo, 'globex')}'")
            assert await _tenant_rows(c) == {"globex"}
            assert await c.fetchval("SELECT current_setting('tenantgate.tenant_id')") == "globex"
        assert await _tenant_rows(d) == {"globex"}
        assert await _tenant_rows(c) == {"acme"}
        assert await c.fetchval("SELECT current_setting('tenantgate.tenant_id')") == "acme"
        # a token client that chose no tenant never inherits one from the shared connection
        e = await asyncpg.connect(px.pool_dsn())
        try:
            assert await e.fetchval("SELECT coalesce(current_setting('tenantgate.tenant_id', true), '')") == ""
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await e.fetch("SELECT * FROM customers")
            assert await c.fetchval("SELECT current_setting('tenantgate.tenant_id')") == "acme"
            assert await e.fetchval("SELECT coalesce(current_setting('tenantgate.tenant_id', true), '')") == ""
        finally:
            await e.close()
    finally:
        await c.close()
        await d.close()


async def test_asyncpg_prepared_statements_with_the_same_names_stay_apart(px):
    a = await asyncpg.connect(px.dsn("acme"))
    b = await asyncpg.connect(px.dsn("globex"))
    try:
        # asyncpg's prepare() sends Parse/Describe/Flush without Sync: the connection stays lent
        # until the statement first runs, so each client runs its statement before the other prepares
        sa = await a.prepare("SELECT 'A:' || $1::text AS v, current_setting('tenantgate.tenant_id') AS t",
                             name="shared_name")
        assert tuple(await sa.fetchrow("0")) == ("A:0", "acme")
        sb = await b.prepare("SELECT $1::int * 2 AS v, (SELECT min(tenant_id) FROM customers) AS t",
                             name="shared_name")
        assert tuple(await sb.fetchrow(0)) == (0, "globex")
        assert sa._state.name == sb._state.name == "shared_name"  # same client-side name, different text
        for i in range(1, 6):
            assert tuple(await sa.fetchrow(str(i))) == (f"A:{i}", "acme")
            assert tuple(await sb.fetchrow(i)) == (2 * i, "globex")
            async with a.transaction():
                assert tuple(await sa.fetchrow("tx")) == ("A:tx", "acme")
            async with b.transaction():
                assert tuple(await sb.fetchrow(100)) == (200, "globex")
        # the statement cache (implicit named statements) too
        for _ in range(3):
            assert await a.fetchval("SELECT min(tenant_id) || $1::text FROM orders", "!") == "acme!"
            assert await b.fetchval("SELECT min(tenant_id) || $1::text FROM orders", "?") == "globex?"
    finally:
        await a.close()
        await b.close()


async def test_psycopg_prepared_statements_stay_apart(px):
    a = await psycopg.AsyncConnection.connect(px.dsn("acme"), autocommit=True, prepare_threshold=0)
    b = await psycopg.AsyncConnection.connect(px.dsn("globex"), autocommit=True, prepare_threshold=0)
    try:
        for i in range(4):
            cur = await a.execute("SELECT %s::int + 1, current_setting('tenantgate.tenant_id')", [i], prepare=True)
            assert await cur.fetchone() == (i + 1, "acme")
            cur = await b.execute("SELECT %s::int * 10, min(tenant_id) FROM customers", [i], prepare=True)
            assert await cur.fetchone() == (10 * i, "globex")
            async with a.transaction():
                cur = await a.execute("SELECT %s::int + 1, current_setting('tenantgate.tenant_id')", [7],
                                      prepare=True)
                assert await cur.fetchone() == (8, "acme")
        assert a.pgconn.transaction_status == b.pgconn.transaction_status  # both idle, nothing held
    finally:
        await a.close()
        await b.close()


def _bind(statement: str, params: list[bytes]) -> bytes:
    return m.encode_bind("", statement, tuple(params))


def _values(msgs) -> list[list[str]]:
    return [[None if v is None else v.decode() for v in row] for row in data_rows(msgs)]


def test_protocol_level_named_statements_same_name_different_text(px):
    a = RawClient(px.dsn("acme"))
    b = RawClient(px.dsn("globex"))
    try:
        a.send(m.encode_parse("s1", "SELECT 'a-' || $1::text, current_setting('tenantgate.tenant_id')"), m.SYNC)
        assert not errors(a.until_ready())
        b.send(m.encode_parse("s1", "SELECT min(tenant_id) || $1::text, max(tenant_id) FROM orders"), m.SYNC)
        assert not errors(b.until_ready())
        for i in range(4):
            a.send(_bind("s1", [str(i).encode()]), m.encode_execute(""), m.SYNC)
            assert _values(a.until_ready()) == [[f"a-{i}", "acme"]]
            b.send(_bind("s1", [str(i).encode()]), m.encode_execute(""), m.SYNC)
            assert _values(b.until_ready()) == [[f"globex{i}", "globex"]]
        # a Parse of an existing name is an error, as in PostgreSQL; the statement survives
        a.send(m.encode_parse("s1", "SELECT 1"), m.SYNC)
        assert [e.sqlstate for e in errors(a.until_ready())] == ["42P05"]
        a.send(_bind("s1", [b"x"]), m.encode_execute(""), m.SYNC)
        assert _values(a.until_ready()) == [["a-x", "acme"]]
        # Close then Parse again with another text
        b.send(m.encode_close(b"S", "s1"), m.encode_parse("s1", "SELECT $1::text || '!'"), m.SYNC)
        assert not errors(b.until_ready())
        b.send(_bind("s1", [b"b"]), m.encode_execute(""), m.SYNC)
        assert _values(b.until_ready()) == [["b!"]]
        a.send(_bind("s1", [b"y"]), m.encode_execute(""), m.SYNC)
        assert _values(a.until_ready()) == [["a-y", "acme"]]
    finally:
        a.close()
        b.close()


def _server_statement_names(px, app_name: str) -> list[str]:
    """The server-side names (tg_<session id>_<n>) tenantgate uses for a client's statements."""
    rows = [r for r in px.console("SHOW CLIENTS") if r.get("application_name") == app_name]
    assert len(rows) == 1, rows
    sid = rows[0]["id"]
    return [f"tg_{sid}_{n}" for n in range(1, 4)]


def test_a_client_cannot_reach_another_clients_server_side_statement(px):
    a = RawClient(px.dsn("acme"), options={"application_name": "pool-victim"})
    b = RawClient(px.dsn("globex"), options={"application_name": "pool-intruder"})
    try:
        a.send(m.encode_parse("secret", "SELECT tenant_id, customer_id FROM customers ORDER BY 2"), m.SYNC)
        assert not errors(a.until_ready())
        a.send(_bind("secret", []), m.encode_execute(""), m.SYNC)
        expected = _values(a.until_ready())
        assert expected and {r[0] for r in expected} == {"acme"}
        names = _server_statement_names(px, "pool-victim")
        for name in names[:1]:
            # Bind to it through the extended protocol
            b.send(_bind(name, []), m.encode_execute(""), m.SYNC)
            msgs = b.until_ready()
            assert [e.sqlstate for e in errors(msgs)] == ["26000"] and not data_rows(msgs)
            # Describe it
            b.send(m.encode_describe(b"S", name), m.SYNC)
            msgs = b.until_ready()
            assert [e.sqlstate for e in errors(msgs)] == ["26000"]
            assert not [t for t, _ in msgs if t in (b"t", b"T")]
            # SQL EXECUTE of it
            msgs = b.query(f"EXECUTE {name}")
            assert [e.sqlstate for e in errors(msgs)] == ["42501"] and not data_rows(msgs)
            assert _values(b.query("SELECT 1")) == [["1"]]  # B's session goes on
        # the victim's statement still works, on the one shared backend connection
        a.send(_bind("secret", []), m.encode_execute(""), m.SYNC)
        assert _values(a.until_ready()) == expected
    finally:
        a.close()
        b.close()


SESSION_STATE = {  # what transaction pooling could not keep apart: refused, with a clear message
    "SELECT pg_advisory_lock(1)": "advisory locks",
    "SELECT pg_try_advisory_lock(2)": "advisory locks",
    "LISTEN pool_channel": "LISTEN",
    "CREATE TEMP TABLE pool_tmp (x int)": "CREATE",
    "CREATE TEMPORARY TABLE pool_tmp2 AS SELECT 1": "CREATE",
    "SELECT * INTO TEMP pool_tmp3 FROM products": "",
}


def test_temp_tables_listen_and_advisory_locks_are_refused_clearly(px):
    b = RawClient(px.dsn("globex"))
    try:
        for sql, words in SESSION_STATE.items():
            msgs = b.query(sql)
            errs = errors(msgs)
            assert [e.sqlstate for e in errs] in (["42501"], ["0A000"]), (sql, [(e.sqlstate, e.message) for e in errs])
            assert words in errs[0].message, (sql, errs[0].message)
            assert _values(b.query("SELECT min(tenant_id) FROM customers")) == [["globex"]]  # still usable
    finally:
        b.close()


def test_a_refused_simple_query_gives_the_connection_back(px):
    b = RawClient(px.dsn("globex"))
    try:
        for sql in ("SELECT pg_read_file('/etc/passwd')", "EXECUTE nobody_prepared_this",
                    "SELECT pg_advisory_lock(1)", "LISTEN pool_channel"):
            msgs = b.query(sql)
            assert [e.sqlstate for e in errors(msgs)] == ["42501"], sql
            a = RawClient(px.dsn("acme"), timeout=10)  # needs the one pooled connection
            try:
                assert _values(a.query("SELECT min(tenant_id) FROM customers")) == [["acme"]]
            finally:
                a.close()
    finally:
        b.close()


def test_another_clients_deallocate_does_not_break_my_prepared_statements(px):
    """DEALLOCATE ALL (or DEALLOCATE of a server-side name) on the shared connection
    must not destroy another client's prepared statements.  (The deallocating session keeps
    the connection from then on, and it is closed with it: with pool.size 1 the victim is
    served again once the other client has gone.)"""
    a = RawClient(px.dsn("acme"), options={"application_name": "pool-dealloc-victim"})
    try:
        a.send(m.encode_parse("mine", "SELECT min(tenant_id) FROM customers"), m.SYNC)
        assert not errors(a.until_ready())
        a.send(_bind("mine", []), m.encode_execute(""), m.SYNC)
        assert _values(a.until_ready()) == [["acme"]]
        name = _server_statement_names(px, "pool-dealloc-victim")[0]
        for sql in ("DEALLOCATE ALL", f"DEALLOCATE {name}", f"DEALLOCATE PREPARE {name}"):
            b = RawClient(px.dsn("globex"))
            try:
                b.query(sql)  # refused or harmless: either way the victim keeps its statement
            finally:
                b.close()
            a.send(_bind("mine", []), m.encode_execute(""), m.SYNC)
            msgs = a.until_ready()
            assert not errors(msgs), (sql, [(e.sqlstate, e.message) for e in errors(msgs)])
            assert _values(msgs) == [["acme"]]
    finally:
        a.close()


def test_other_clients_prepared_statement_text_is_not_visible(px):
    """pg_prepared_statements on a shared connection would list another client's statements
    (their rewritten text names that client's tenant and literals)."""
    a = RawClient(px.dsn("acme"))
    b = RawClient(px.dsn("globex"))
    try:
        a.send(m.encode_parse("peek", "SELECT 'pool-secret-literal', min(tenant_id) FROM customers"), m.SYNC)
        assert not errors(a.until_ready())
        a.send(_bind("peek", []), m.encode_execute(""), m.SYNC)
        assert _values(a.until_ready()) == [["pool-secret-literal", "acme"]]
        msgs = b.query("SELECT name, statement FROM pg_prepared_statements")
        seen = " ".join(v or "" for row in _values(msgs) for v in row)
        assert "acme" not in seen and "pool-secret" not in seen, seen
    finally:
        a.close()
        b.close()


async def test_session_settings_follow_their_client_and_never_leak(px):
    a = await asyncpg.connect(px.dsn("acme"))
    b = await asyncpg.connect(px.dsn("globex"))
    try:
        b_timeout, b_zone = await b.fetchval("SHOW statement_timeout"), await b.fetchval("SHOW TimeZone")
        await a.execute("SET statement_timeout = '400ms'")
        await a.execute("SET TimeZone = 'Asia/Tokyo'")
        stamp = "SELECT '2024-01-01 00:00+00'::timestamptz::text"
        for i in range(3):
            async with a.transaction():
                assert await a.fetchval("SHOW statement_timeout") == "400ms"
                assert await a.fetchval("SHOW TimeZone") == "Asia/Tokyo"
                assert await a.fetchval(stamp) == "2024-01-01 09:00:00+09"
            assert await b.fetchval("SHOW statement_timeout") == b_timeout
            assert await b.fetchval("SHOW TimeZone") == b_zone
            assert await b.fetchval(stamp) != "2024-01-01 09:00:00+09"
            if i == 1:
                await b.execute("SET TimeZone = 'America/New_York'")
                b_zone = "America/New_York"
                assert await b.fetchval(stamp) == "2023-12-31 19:00:00-05"
        # the settings take effect, not just SHOW: A's timeout cancels A's query only
        with pytest.raises(asyncpg.QueryCanceledError):
            await a.execute("SELECT pg_sleep(0.8)")
        await b.execute("SELECT pg_sleep(0.8)")
        assert await a.fetchval("SHOW TimeZone") == "Asia/Tokyo"
        # RESET goes back to the default of the session, for A only
        await a.execute("RESET statement_timeout")
        assert await a.fetchval("SHOW statement_timeout") == b_timeout
        assert await b.fetchval("SHOW TimeZone") == "America/New_York"
    finally:
        await a.close()
        await b.close()


async def _settings_script(conn) -> list[str]:
    """SET LOCAL, a rolled-back SET, a SET in a failed transaction and a committed SET."""
    seen = []
    await conn.execute("SET lock_timeout = '7s'")
    await conn.execute("BEGIN")
    await conn.execute("SET LOCAL lock_timeout = '9s'")
    seen.append(await conn.fetchval("SHOW lock_timeout"))
    await conn.execute("COMMIT")
    seen.append(await conn.fetchval("SHOW lock_timeout"))
    await conn.execute("BEGIN")
    await conn.execute("SET lock_timeout = '11s'")
    seen.append(await conn.fetchval("SHOW lock_timeout"))
    await conn.execute("ROLLBACK")
    seen.append(await conn.fetchval("SHOW lock_timeout"))
    await conn.execute("BEGIN")
    await conn.execute("SET lock_timeout = '12s'")
    with pytest.raises(asyncpg.DivisionByZeroError):
        await conn.execute("SELECT 1/0")
    await conn.execute("ROLLBACK")
    seen.append(await conn.fetchval("SHOW lock_timeout"))
    await conn.execute("BEGIN")
    await conn.execute("SET lock_timeout = '13s'")
    await conn.execute("COMMIT")
    seen.append(await conn.fetchval("SHOW lock_timeout"))
    return seen


async def test_set_local_and_rolled_back_set_behave_as_in_postgresql(px, demo):  # noqa: F811
    direct = await asyncpg.connect(demo.admin)
    try:
        native = await _settings_script(direct)
    finally:
        await direct.close()
    assert native == ["9s", "7s", "11s", "7s", "7s", "13s"]  # what PostgreSQL itself does
    a = await asyncpg.connect(px.dsn("acme"))
    b = await asyncpg.connect(px.dsn("globex"))
    try:
        b_default = await b.fetchval("SHOW lock_timeout")
        assert await _settings_script(a) == native
        assert await b.fetchval("SHOW lock_timeout") == b_default
        async with b.transaction():
            assert await b.fetchval("SHOW lock_timeout") == b_default
        assert await a.fetchval("SHOW lock_timeout") == "13s"
    finally:
        await a.close()
        await b.close()


async def test_sql_prepare_pins_the_connection_and_others_wait(px):
    b = await psycopg.AsyncConnection.connect(px.dsn("globex"), autocommit=True)
    a = await psycopg.AsyncConnection.connect(px.dsn("acme"), autocommit=True)
    waiting = None
    try:
        await a.execute("PREPARE q(int) AS SELECT $1 + 1, min(tenant_id) FROM customers")
        assert await (await a.execute("EXECUTE q(41)")).fetchone() == (42, "acme")
        async with a.transaction():
            assert await (await a.execute("EXECUTE q(1)")).fetchone() == (2, "acme")
        # the only backend connection now belongs to A: B waits for it
        waiting = asyncio.ensure_future(b.execute("SELECT min(tenant_id) FROM customers"))
        # B's query has reached the proxy and waits for a connection (not merely: not sent yet)
        await asyncio.to_thread(wait_until, lambda: sum(int(r["cl_waiting"] or 0) for r in px.console("SHOW POOLS")) >= 1,
                                20.0, 0.1, "B waiting in SHOW POOLS")
        assert not waiting.done()
        assert await (await a.execute("EXECUTE q(2)")).fetchone() == (3, "acme")
        await a.execute("DEALLOCATE q")
        with pytest.raises(psycopg.Error):
            await a.execute("EXECUTE q(3)")
        await a.close()  # the pinned connection is closed, not lent to anyone with A's state
        cur = await asyncio.wait_for(waiting, 5)
        assert await cur.fetchone() == ("globex",)
        with pytest.raises(psycopg.Error):  # B cannot run A's SQL-level statement
            await b.execute("EXECUTE q(4)")
    finally:
        if waiting is not None and not waiting.done():
            waiting.cancel()
        await a.close()
        await b.close()


async def test_queue_timeout_is_a_clear_error(px):
    a = await asyncpg.connect(px.dsn("acme"))
    b = await asyncpg.connect(px.dsn("globex"))
    try:
        tx = a.transaction()
        await tx.start()
        assert await a.fetchval("SELECT min(tenant_id) FROM customers") == "acme"
        with pytest.raises(asyncpg.PostgresError) as info:
            await asyncio.wait_for(b.fetchval("SELECT 1"), 10)
        err = info.value
        if err.sqlstate != "53300":  # asyncpg reports a FATAL mid-query as 08003 caused by the FATAL
            err = err.__cause__
        assert err.sqlstate == "53300"
        assert "pooled connections" in str(err) and "busy" in str(err)
        assert "pool.size" in (err.hint or "")
        await tx.commit()  # A is unaffected
        assert await a.fetchval("SELECT min(tenant_id) FROM orders") == "acme"
    finally:
        await a.close()
        await b.close()
    c = await asyncpg.connect(px.dsn("globex"))  # and the pool serves new clients
    try:
        assert await c.fetchval("SELECT min(tenant_id) FROM orders") == "globex"
    finally:
        await c.close()


async def test_pooled_connection_terminated_while_idle_is_replaced(px, demo):  # noqa: F811
    a = await asyncpg.connect(px.dsn("acme"))
    admin = await asyncpg.connect(demo.admin)
    try:
        pid = await a.fetchval("SELECT pg_backend_pid()")
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        for _ in range(100):
            if not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert await a.fetchval("SELECT min(tenant_id) FROM customers") == "acme"
        assert await a.fetchval("SELECT pg_backend_pid()") != pid
    finally:
        await a.close()
        await admin.close()


def test_unnamed_statement_of_another_client_is_never_executed(px):
    """The unnamed statement lasts until the client's next unnamed Parse (PostgreSQL protocol);
    on a shared connection, a Bind of it must never run what another client parsed, even when
    both clients are of the same tenant (so no settings change between them)."""
    a = RawClient(px.dsn("acme"))
    b = RawClient(px.dsn("acme"))
    try:
        a.send(m.encode_parse("", "SELECT 'parsed by A'"), m.SYNC)
        assert not errors(a.until_ready())
        b.send(m.encode_parse("", "SELECT 'parsed by B'"), m.SYNC)
        assert not errors(b.until_ready())
        a.send(_bind("", []), m.encode_execute(""), m.SYNC)
        msgs = a.until_ready()
        assert ["parsed by B"] not in _values(msgs), "client A was answered with client B's statement"
        # what PostgreSQL does: A's own unnamed statement is still there
        assert _values(msgs) == [["parsed by A"]], [(e.sqlstate, e.message) for e in errors(msgs)]
    finally:
        a.close()
        b.close()


def test_client_vanishing_mid_transaction_rolls_back_and_frees_the_connection(px, demo):  # noqa: F811
    from support.e2e import fresh_ids

    (cid,) = fresh_ids(1)
    a = RawClient(px.dsn("acme"))
    try:
        assert not errors(a.query("BEGIN"))
        assert not errors(a.query(f"INSERT INTO customers (customer_id, name) VALUES ({cid}, 'pool: vanished')"))
        a.sock.close()  # no Terminate, no COMMIT
        b = RawClient(px.dsn("globex"), timeout=10)  # needs the only backend connection
        try:
            assert _values(b.query("SELECT min(tenant_id) FROM customers")) == [["globex"]]
        finally:
            b.close()
        with psycopg.connect(demo.admin, autocommit=True) as admin:
            assert admin.execute("SELECT count(*) FROM customers WHERE customer_id = %s", [cid]).fetchone() == (0,)
    finally:
        with psycopg.connect(demo.admin, autocommit=True) as admin:
            admin.execute("DELETE FROM customers WHERE customer_id = %s", [cid])


async def test_psycopg_timestamptz_uses_its_own_time_zone(px):
    """psycopg turns timestamptz into datetimes with the TimeZone the server reported to it:
    another client's SET TimeZone on the shared connection must not change that."""
    a = await asyncpg.connect(px.dsn("acme"))
    b = await psycopg.AsyncConnection.connect(px.dsn("globex"), autocommit=True)
    try:
        await b.execute("SET TimeZone = 'America/New_York'")
        await a.execute("SET TimeZone = 'Asia/Tokyo'")
        for _ in range(2):
            cur = await b.execute("SELECT '2024-01-01 00:00+00'::timestamptz, current_setting('TimeZone')")
            ts, zone = await cur.fetchone()
            assert zone == "America/New_York"
            assert ts.utcoffset().total_seconds() == -5 * 3600
            assert b.info.parameter_status("TimeZone") == "America/New_York"
            assert await a.fetchval("SHOW TimeZone") == "Asia/Tokyo"
    finally:
        await a.close()
        await b.close()


async def _terminate_pooled_backend(admin, pid: int) -> None:
    assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    for _ in range(200):
        if not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # the proxy notices the closed idle connection


async def test_prepared_statements_survive_moving_to_a_new_backend_connection(px, demo):  # noqa: F811
    """With pool.size 1, terminating the pooled backend forces the next transaction onto a new
    connection: the clients' named statements (asyncpg, psycopg, protocol level) are prepared
    there again, transparently."""
    a = await asyncpg.connect(px.dsn("acme"))
    p = await psycopg.AsyncConnection.connect(px.dsn("globex"), autocommit=True)
    raw = RawClient(px.dsn("acme"))
    admin = await asyncpg.connect(demo.admin)
    try:
        stmt = await a.prepare("SELECT $1::int + 100, min(tenant_id) FROM customers")
        assert tuple(await stmt.fetchrow(1)) == (101, "acme")
        q = "SELECT %s::int + 200, min(tenant_id) FROM orders"
        assert await (await p.execute(q, [1], prepare=True)).fetchone() == (201, "globex")
        raw.send(m.encode_parse("kept", "SELECT $1::text || '@' || min(tenant_id) FROM customers"), m.SYNC)
        assert not errors(raw.until_ready())
        pid = await a.fetchval("SELECT pg_backend_pid()")
        pids = {pid}
        for _ in range(2):
            await _terminate_pooled_backend(admin, pid)
            assert tuple(await stmt.fetchrow(2)) == (102, "acme")
            assert await (await p.execute(q, [2], prepare=True)).fetchone() == (202, "globex")
            raw.send(_bind("kept", [b"r"]), m.encode_execute(""), m.SYNC)
            assert _values(raw.until_ready()) == [["r@acme"]]
            pid = await a.fetchval("SELECT pg_backend_pid()")
            pids.add(pid)
        assert len(pids) == 3, pids
    finally:
        raw.close()
        await a.close()
        await p.close()
        await admin.close()


def test_cancel_reaches_only_the_clients_own_query(px):
    import threading

    a = psycopg.connect(px.dsn("acme"), autocommit=True)
    b = psycopg.connect(px.dsn("globex"), autocommit=True)
    try:
        outcome = {}

        def run_b():
            try:
                outcome["b"] = b.execute("SELECT pg_sleep(1.75), min(tenant_id) FROM customers").fetchone()
            except psycopg.Error as e:
                outcome["b"] = e

        t = threading.Thread(target=run_b)
        t.start()
        # B's query runs on the only backend connection (A holds none) before A's cancel is sent
        wait_until_query_active(px.demo.admin, "pg_sleep(1.75)")
        a.cancel_safe()
        t.join(20)
        assert outcome["b"] == ("", "globex"), outcome  # B's query was not cancelled
        # A's cancel does reach A's own running query
        res = {}

        def run_a():
            try:
                a.execute("SELECT pg_sleep(5.25)")
                res["a"] = "finished"
            except psycopg.errors.QueryCanceled:
                res["a"] = "cancelled"

        t = threading.Thread(target=run_a)
        t.start()
        wait_until_query_active(px.demo.admin, "pg_sleep(5.25)")
        a.cancel_safe()
        t.join(10)
        assert res == {"a": "cancelled"}
        assert a.execute("SELECT min(tenant_id) FROM orders").fetchone() == ("acme",)
    finally:
        a.close()
        b.close()


def test_startup_parameters_follow_their_client(px):
    a = RawClient(px.dsn("acme"), options={"application_name": "alpha-client"})
    b = RawClient(px.dsn("globex"), options={"application_name": "beta-client", "DateStyle": "German, DMY"})
    try:
        for _ in range(3):
            assert _values(a.query("SELECT current_setting('application_name'), current_setting('DateStyle'), "
                                   "'2024-03-01'::date::text")) == [["alpha-client", "ISO, MDY", "2024-03-01"]]
            assert _values(b.query("SELECT current_setting('application_name'), current_setting('DateStyle'), "
                                   "'2024-03-01'::date::text")) == [["beta-client", "German, DMY", "01.03.2024"]]
    finally:
        a.close()
        b.close()


async def test_set_config_of_one_client_does_not_reach_another(px):
    """set_config(<safe parameter>, value, false) is allowed like SET; its effect must follow
    its client like a SET's, not stay on the shared connection for the next client."""
    a = await asyncpg.connect(px.dsn("acme"))
    b = await asyncpg.connect(px.dsn("globex"))
    try:
        b_zone, b_timeout = await b.fetchval("SHOW TimeZone"), await b.fetchval("SHOW statement_timeout")
        assert await a.fetchval("SELECT set_config('TimeZone', 'Asia/Tokyo', false)") == "Asia/Tokyo"
        assert await a.fetchval("SELECT set_config('statement_timeout', '777', false)") == "777ms"
        assert await b.fetchval("SHOW TimeZone") == b_zone
        assert await b.fetchval("SHOW statement_timeout") == b_timeout
        assert await a.fetchval("SHOW TimeZone") == "Asia/Tokyo"
    finally:
        await a.execute("RESET TimeZone")  # leave no untracked setting on the shared connection
        await a.execute("RESET statement_timeout")
        await a.close()
        await b.close()


def test_psycopg_pipeline_mode_gives_the_connection_back(px):
    a = psycopg.connect(px.dsn("acme"), autocommit=True)
    try:
        with a.pipeline():
            c1 = a.execute("SELECT 1, min(tenant_id) FROM customers")
            a.execute("BEGIN")
            c2 = a.execute("SELECT 2, current_setting('tenantgate.tenant_id')")
            a.execute("COMMIT")
        assert c1.fetchall() == [(1, "acme")] and c2.fetchall() == [(2, "acme")]
        # A is idle, outside any transaction: the only backend connection must be free for B
        b = RawClient(px.dsn("globex"), timeout=10)
        try:
            assert _values(b.query("SELECT min(tenant_id) FROM customers")) == [["globex"]]
        finally:
            b.close()
    finally:
        a.close()


def test_flush_after_sync_gives_the_connection_back(px):
    a = RawClient(px.dsn("acme"))
    try:
        a.send(m.encode_parse("", "SELECT 1"), _bind("", []), m.encode_execute(""), m.SYNC, m.FLUSH)
        assert _values(a.until_ready()) == [["1"]]
        b = RawClient(px.dsn("globex"), timeout=10)
        try:
            assert _values(b.query("SELECT min(tenant_id) FROM customers")) == [["globex"]]
        finally:
            b.close()
    finally:
        a.close()


async def test_psql_session_through_the_pool(px):
    """psql (libpq, its \\d catalog queries) in transaction mode, beside another client's session."""
    b = await asyncpg.connect(px.dsn("globex"))
    try:
        await b.execute("SET TimeZone = 'America/New_York'")
        commands = [  # each -c is its own simple Query: its own transaction on the pool
            "SET TimeZone = 'Asia/Tokyo'",
            "\\d customers",
            "SELECT 'tz=' || current_setting('TimeZone')",
            "SELECT 'tenant=' || current_setting('tenantgate.tenant_id')",
            "SELECT 'tenants=' || string_agg(DISTINCT tenant_id, ',') FROM customers",
            "PREPARE p AS SELECT 'prepared=' || min(tenant_id) FROM orders",
            "EXECUTE p",
        ]
        args = [x for c in commands for x in ("-c", c)]
        proc = await asyncio.create_subprocess_exec(
            "psql", px.dsn("acme"), "-X", "-At", "-v", "ON_ERROR_STOP=1", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        text = out.decode()
        assert proc.returncode == 0, err.decode()
        for line in ("tz=Asia/Tokyo", "tenant=acme", "tenants=acme", "prepared=acme"):
            assert line in text.splitlines(), text
        assert "tenant_id" in text and "customer_id" in text  # \d customers
        assert await b.fetchval("SHOW TimeZone") == "America/New_York"
        assert await b.fetchval("SELECT current_setting('tenantgate.tenant_id')") == "globex"
    finally:
        await b.close()


def test_statements_skipped_after_an_error_do_not_exist_as_in_postgresql(px):
    """Parse x, Parse y (fails in PostgreSQL), Parse z (skipped), Sync: x exists, y and z do not,
    and may be parsed again; another client on the same connection is unaffected."""
    a = RawClient(px.dsn("acme"))
    b = RawClient(px.dsn("globex"))
    try:
        b.send(m.encode_parse("x", "SELECT 'b-x', min(tenant_id) FROM customers"), m.SYNC)
        assert not errors(b.until_ready())
        a.send(m.encode_parse("x", "SELECT 'a-x', min(tenant_id) FROM customers"),
               m.encode_parse("y", "SELECT no_such_column FROM customers"),
               m.encode_parse("z", "SELECT 'a-z'"), m.SYNC)
        msgs = a.until_ready()
        assert [e.sqlstate for e in errors(msgs)] == ["42703"]
        a.send(_bind("x", []), m.encode_execute(""), m.SYNC)
        assert _values(a.until_ready()) == [["a-x", "acme"]]
        for name in ("y", "z"):
            a.send(_bind(name, []), m.encode_execute(""), m.SYNC)
            assert [e.sqlstate for e in errors(a.until_ready())] == ["26000"]
        a.send(m.encode_parse("z", "SELECT 'a-z again'"), _bind("z", []), m.encode_execute(""), m.SYNC)
        assert _values(a.until_ready()) == [["a-z again"]]
        b.send(_bind("x", []), m.encode_execute(""), m.SYNC)
        assert _values(b.until_ready()) == [["b-x", "globex"]]
    finally:
        a.close()
        b.close()
