"""Drivers' and poolers' session resets, and connection-time settings, through the demo.

Issue 14 items 2, 3 and 8: asyncpg's default ``Pool`` resets every released connection with
``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``; poolers send
``DISCARD ALL``; clients send settings at connect time (startup packet keys and
``options=-c``).  Each must mean what it means in PostgreSQL for the client's own state, while
the tenant binding stays: the other tenant's rows stay invisible after every reset.  A
setting a tenant may not SET refuses the connection (naming it), and an unknown database is
3D000 as in PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from urllib.parse import urlsplit

import asyncpg
import psycopg
import pytest

from support.e2e import pool_dsn, token

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

ASYNCPG_RESET = "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;"


async def _tenants_seen(conn) -> set[str]:
    return {r[0] for r in await conn.fetch("SELECT DISTINCT tenant_id FROM customers")}


# ------------------------------------------------------------------------------- resets


async def test_asyncpg_default_pool_survives_many_releases_with_two_tenants_interleaved(demo):
    pools = {t: await asyncpg.create_pool(demo.app(t), min_size=2, max_size=2) for t in ("acme", "globex")}
    try:
        for _ in range(15):
            for tenant, pool in pools.items():
                async with pool.acquire() as conn:  # release runs asyncpg's reset query
                    await conn.execute("SET statement_timeout = 4321")
                    assert await _tenants_seen(conn) == {tenant}
                    cur_ids = await conn.fetch("SELECT customer_id FROM customers")
                    assert cur_ids
        for tenant, pool in pools.items():
            async with pool.acquire() as conn:
                # RESET ALL in the reset query put statement_timeout back to the server default
                assert await conn.fetchval("SHOW statement_timeout") == "0"
                assert await _tenants_seen(conn) == {tenant}
    finally:
        for pool in pools.values():
            await pool.close()


async def test_each_reset_statement_answers_as_postgresql_and_keeps_the_tenant(demo):
    # unnamed statements: DISCARD ALL / DEALLOCATE ALL drop named ones, in PostgreSQL too
    conn = await asyncpg.connect(demo.app("acme"), statement_cache_size=0)
    try:
        for stmt, tag in [
            ("CLOSE ALL", "CLOSE CURSOR ALL"),
            ("UNLISTEN *", "UNLISTEN"),
            ("UNLISTEN some_channel", "UNLISTEN"),
            ("RESET ALL", "RESET"),
            ("DISCARD ALL", "DISCARD ALL"),
            ("DISCARD PLANS", "DISCARD PLANS"),
            ("DISCARD SEQUENCES", "DISCARD SEQUENCES"),
            ("DEALLOCATE ALL", "DEALLOCATE ALL"),
        ]:
            assert await conn.execute(stmt) == tag, stmt
            assert await _tenants_seen(conn) == {"acme"}, stmt
        row = await conn.fetchrow("SELECT pg_advisory_unlock_all()")
        assert list(row.keys()) == ["pg_advisory_unlock_all"]
        assert row[0] is None or row[0] == ""  # void, as PostgreSQL answers
        assert await conn.execute(ASYNCPG_RESET) == "RESET"
        assert await _tenants_seen(conn) == {"acme"}
    finally:
        await conn.close()


async def test_advisory_locks_stay_refused_and_only_the_exact_unlock_all_form_is_answered(demo):
    conn = await asyncpg.connect(demo.app("acme"))
    try:
        for stmt in ("SELECT pg_advisory_lock(1)", "SELECT pg_advisory_unlock_all(), 1",
                     "SELECT * FROM pg_advisory_unlock_all()", "LISTEN ch", "NOTIFY ch",
                     'SELECT "pg_advisory_unlock_all"()'):
            with pytest.raises(asyncpg.PostgresError) as e:
                await conn.execute(stmt)
            assert e.value.sqlstate in ("42501", "0A000"), stmt
    finally:
        await conn.close()


async def test_discard_all_inside_a_transaction_block_fails_as_in_postgresql(demo):
    conn = await asyncpg.connect(demo.app("acme"))
    try:
        tr = conn.transaction()
        await tr.start()
        with pytest.raises(asyncpg.PostgresError) as e:
            await conn.execute("DISCARD ALL")
        assert e.value.sqlstate == "25001"
        await tr.rollback()
        assert await _tenants_seen(conn) == {"acme"}
    finally:
        await conn.close()


async def test_reset_all_in_a_token_session_keeps_the_token_tenant(demo):
    """Transaction pooling: RESET ALL resets the tenant GUC on the backend; the read-back after
    it puts the session's tenant back before its next transaction (prepared statements read it)."""
    conn = await asyncpg.connect(pool_dsn(demo))
    try:
        await conn.execute(f"SET tenantgate.tenant = '{token(demo, 'globex')}'")
        stmt = await conn.prepare("SELECT DISTINCT tenant_id FROM customers")
        assert {r[0] for r in await stmt.fetch()} == {"globex"}
        await conn.execute("RESET ALL")
        assert {r[0] for r in await stmt.fetch()} == {"globex"}
        await conn.execute("DISCARD ALL")  # drops `stmt` on the server, as in PostgreSQL
        assert {r[0] for r in await conn.fetch("SELECT DISTINCT tenant_id FROM orders")} == {"globex"}
    finally:
        await conn.close()


def test_psycopg_pool_style_discard_all_between_uses(demo):
    with psycopg.connect(demo.app("globex"), autocommit=True) as conn:
        for _ in range(3):
            conn.execute("SET lock_timeout = '2s'")
            conn.execute("DISCARD ALL")
            assert conn.execute("SHOW lock_timeout").fetchone()[0] == "0"
            assert {r[0] for r in conn.execute("SELECT DISTINCT tenant_id FROM orders")} <= {"globex"}
            assert {r[0] for r in conn.execute("SELECT DISTINCT tenant_id FROM customers")} == {"globex"}


# ------------------------------------------------------------------ connection-time settings


async def test_settings_sent_at_connect_time_apply_and_survive_pooled_backends(demo):
    conn = await asyncpg.connect(demo.app("acme"), server_settings={
        "statement_timeout": "1234", "work_mem": "8MB", "application_name": "conn-app"})
    try:
        for _ in range(5):  # each transaction may land on another pooled backend connection
            async with conn.transaction():
                assert await conn.fetchval("SHOW statement_timeout") == "1234ms"
                assert await conn.fetchval("SHOW work_mem") == "8MB"
                assert await conn.fetchval("SELECT current_setting('application_name')") == "conn-app"
        # RESET ALL goes back to the connection-time value, as in PostgreSQL
        await conn.execute("SET statement_timeout = 99")
        await conn.execute("RESET ALL")
        assert await conn.fetchval("SHOW statement_timeout") == "1234ms"
        with pytest.raises(asyncpg.QueryCanceledError):
            await conn.execute("SELECT pg_sleep(3)")
        assert await _tenants_seen(conn) == {"acme"}
    finally:
        await conn.close()


def test_options_dash_c_from_libpq_applies(demo):
    with psycopg.connect(demo.app("acme"), options="-c statement_timeout=50 -c application_name=opt\\ app",
                         autocommit=True) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "50ms"
        assert conn.execute("SHOW application_name").fetchone()[0] == "opt app"
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(1)")
        conn.execute("SELECT 1")  # the session goes on


def test_pgoptions_through_psql(demo):
    url = urlsplit(demo.app("acme"))
    env = dict(os.environ, PGPASSWORD=url.password, PGOPTIONS="-c lock_timeout=777", PGSSLMODE="disable")
    out = subprocess.run(["psql", "-h", url.hostname, "-p", str(url.port), "-U", url.username, "-d", "app",
                          "-XAtc", "SHOW lock_timeout"], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "777ms"


@pytest.mark.parametrize("how", ["startup", "options"])
@pytest.mark.parametrize("name,value", [("search_path", "tenantgate_control,public"), ("search_path", "pg_temp"),
                                        ("role", "postgres"),
                                        ("row_security", "off"), ("tenantgate_tenant_id", "globex"),
                                        ("session_authorization", "postgres"), ("log_statement", "all")])
async def test_a_setting_a_tenant_may_not_set_refuses_the_connection_naming_it(demo, how, name, value):
    kw = {"server_settings": {name: value}} if how == "startup" else {"server_settings": {"options": f"-c {name}={value}"}}
    with pytest.raises(asyncpg.PostgresError) as e:
        conn = await asyncpg.connect(demo.app("acme"), **kw)
        await conn.close()
    assert e.value.sqlstate == "42501"
    assert f'"{name}"' in str(e.value)


@pytest.mark.parametrize("how", ["startup", "options"])
@pytest.mark.parametrize("value", ["public", '"public"', " PUBLIC "])
async def test_a_search_path_naming_tenantgates_own_path_is_accepted_and_changes_nothing(demo, how, value):
    """pgjdbc's currentSchema=public sends search_path=public at connect time: it is the path every
    statement is resolved with already, so it is accepted; the tenant stays bound."""
    kw = {"server_settings": {"search_path": value}} if how == "startup" else \
        {"server_settings": {"options": f"-c search_path={value.strip().replace(' ', '')}"}}
    conn = await asyncpg.connect(demo.app("acme"), **kw)
    try:
        assert await conn.fetchval("SELECT count(*) FROM customers WHERE tenant_id <> 'acme'") == 0
        assert await conn.fetchval("SELECT count(*) FROM customers") > 0
    finally:
        await conn.close()


def test_same_search_path_reads_the_value_as_postgresql_does():
    from proxy.policy.startup_settings import same_search_path

    assert same_search_path("public", ["public"]) and same_search_path('"public"', ["public"])
    assert same_search_path(" Public ", ["public"]) and same_search_path("a, b", ["a", "b"])
    assert not same_search_path('"Public"', ["public"])  # quoted: case kept, another schema
    assert not same_search_path("public, tenantgate_control", ["public"])
    assert not same_search_path("", ["public"]) and not same_search_path('pu"blic', ["public"])
    # only ASCII letters fold, as in PostgreSQL: the Kelvin sign is not "k"
    assert same_search_path("KIOSK", ["kiosk"]) and not same_search_path("\u212aiosk", ["kiosk"])
    # only ASCII white space separates, as in PostgreSQL: a no-break space is part of the name
    assert same_search_path("\tpublic\n", ["public"]) and not same_search_path("public\u00a0", ["public"])


async def test_an_unsafe_client_encoding_at_connect_time_is_refused(demo):
    with pytest.raises(psycopg.OperationalError) as e:
        psycopg.connect(demo.app("acme"), client_encoding="SJIS").close()
    assert "client_encoding" in str(e.value)


async def test_an_unknown_database_is_3d000(demo):
    url = demo.app("acme").replace("/app?", "/no_such_db?")
    with pytest.raises(asyncpg.InvalidCatalogNameError) as e:
        await asyncpg.connect(url)
    assert 'database "no_such_db" does not exist' in str(e.value)
    # the right name still works
    conn = await asyncpg.connect(demo.app("acme"))
    assert await conn.fetchval("SELECT current_database()") == "app"
    await conn.close()


async def test_many_clients_with_connect_time_settings_do_not_leak_them_to_each_other(demo):
    async def one(i: int):
        tenant = ("acme", "globex")[i % 2]
        conn = await asyncpg.connect(demo.app(tenant), server_settings={"statement_timeout": str(1001 + i)})
        try:
            for _ in range(4):
                assert await conn.fetchval("SHOW statement_timeout") == f"{1001 + i}ms"
                assert await _tenants_seen(conn) == {tenant}
                await asyncio.sleep(0)
        finally:
            await conn.close()

    await asyncio.gather(*(one(i) for i in range(12)))


async def test_discard_all_does_not_break_other_clients_prepared_statements(demo):
    """Transaction pooling: another client's DISCARD ALL / DEALLOCATE ALL on a shared backend
    connection must not make this client's (asyncpg's cached, protocol-level) statements fail."""
    a = await asyncpg.connect(demo.app("acme"))
    others = [await asyncpg.connect(demo.app("globex"), statement_cache_size=0) for _ in range(3)]
    try:
        for i in range(10):
            assert await a.fetchval("SELECT count(*) FROM customers WHERE customer_id = $1", 1) == 1
            for b in others:
                await b.execute("DISCARD ALL" if i % 2 else "DEALLOCATE ALL")
                assert await b.fetchval("SELECT count(*) FROM customers WHERE tenant_id = $1", "acme") == 0
            assert {r[0] for r in await a.fetch("SELECT DISTINCT tenant_id FROM customers")} == {"acme"}
    finally:
        for c in [a, *others]:
            await c.close()


def test_a_startup_key_wins_over_the_same_setting_in_options(demo):
    """PostgreSQL applies options=-c first and the startup packet's own keys after them."""
    with psycopg.connect(demo.app("acme"), options="-c statement_timeout=111", autocommit=True,
                         application_name="from-key") as conn:
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "111ms"
        assert conn.execute("SHOW application_name").fetchone()[0] == "from-key"
    with psycopg.connect(demo.app("acme"), options="-c application_name=from-options", autocommit=True,
                         application_name="from-key") as conn:
        assert conn.execute("SHOW application_name").fetchone()[0] == "from-key"
