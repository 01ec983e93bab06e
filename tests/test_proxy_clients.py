"""Real clients through tenantgate (pass-through policy): psql, asyncpg, psycopg 3, pgbench."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import json
import os
import subprocess
import threading
import time
import uuid

import asyncpg
import psycopg
import pytest

from support.proxy_harness import ensure_backend_role, make_config, start_proxy, wait_until_query_active

PW = "app-pw"


@pytest.fixture(scope="module")
def proxy(pg, make_db):
    db, _ = make_db("clients")
    ensure_backend_role(pg, db)
    p = start_proxy(make_config(pg, db, {"app": PW}))
    yield p
    p.stop()


def psql(proxy, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PGPASSWORD=PW, PGSSLMODE="disable", PGCONNECT_TIMEOUT="10")
    r = subprocess.run(
        ["psql", "-X", "-h", proxy.host, "-p", str(proxy.port), "-U", "app", "-d", proxy.config.backend.database, *args],
        input=input, capture_output=True, text=True, env=env, timeout=60,
    )
    if check:
        assert r.returncode == 0, r.stderr
    return r


# ------------------------------------------------------------------ psql

def test_psql_meta_commands_and_expanded_output(proxy):
    psql(proxy, "-c", "CREATE TABLE psql_items (id int primary key, name text not null)")
    out = psql(proxy, "-c", r"\dt").stdout
    assert "psql_items" in out and "table" in out
    out = psql(proxy, "-c", r"\d psql_items").stdout
    assert 'Table "public.psql_items"' in out and "psql_items_pkey" in out and "not null" in out
    out = psql(proxy, "-c", r"\x", "-c", "SELECT 1 AS one, 'two' AS two").stdout
    assert "-[ RECORD 1 ]" in out and "one | 1" in out


def test_psql_copy_both_ways(proxy, tmp_path):
    psql(proxy, "-c", "CREATE TABLE copy_t (id int, v text)")
    src = tmp_path / "in.csv"
    src.write_text("".join(f"{i},value {i}\n" for i in range(1000)))
    out = psql(proxy, "-c", rf"\copy copy_t FROM '{src}' WITH (FORMAT csv)").stdout
    assert "COPY 1000" in out
    dst = tmp_path / "out.csv"
    psql(proxy, "-c", rf"\copy (SELECT * FROM copy_t ORDER BY id) TO '{dst}' WITH (FORMAT csv)")
    assert dst.read_text() == src.read_text()


def test_psql_script_with_error_in_the_middle(proxy):
    script = (
        "CREATE TABLE script_t (id int);\n"
        "INSERT INTO script_t VALUES (1);\n"
        "SELECT * FROM no_such_table;\n"
        "INSERT INTO script_t VALUES (2);\n"
        "SELECT 'count=' || count(*) FROM script_t;\n"
    )
    r = psql(proxy, "-At", input=script)
    assert 'ERROR:  relation "no_such_table" does not exist' in r.stderr
    assert "count=2" in r.stdout
    # several statements in one Query message, error in the middle: PostgreSQL stops there
    r = psql(proxy, "-At", "-c", "INSERT INTO script_t VALUES (3); SELECT 1/0; INSERT INTO script_t VALUES (4)",
             check=False)
    assert "division by zero" in r.stderr
    assert psql(proxy, "-At", "-c", "SELECT count(*) FROM script_t").stdout.strip() == "2"


# ------------------------------------------------------------------ asyncpg

async def test_asyncpg_prepared_statements_and_binary_codecs(proxy):
    conn = await asyncpg.connect(proxy.dsn("app", PW))
    try:
        await conn.execute(
            "CREATE TABLE types_t (i int, n numeric, t text, b bytea, ts timestamptz, u uuid, j jsonb, a int[], ta text[])")
        row = (42, decimal.Decimal("12345.678901"), "héllo", b"\x00\x01\xff",
               dt.datetime(2024, 2, 29, 12, 30, tzinfo=dt.timezone.utc), uuid.uuid4(), json.dumps({"k": [1, 2]}),
               [1, None, 3], ["a", "b,c"])
        await conn.execute("INSERT INTO types_t VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)", *row)
        stmt = await conn.prepare("SELECT * FROM types_t WHERE i = $1")
        got = await stmt.fetchrow(42)
        assert tuple(got) == row
        assert [p.name for p in stmt.get_parameters()] == ["int4"]
        for _ in range(3):  # the named prepared statement is reused
            assert (await stmt.fetchrow(42))["t"] == "héllo"
        assert await stmt.fetchrow(7) is None
    finally:
        await conn.close()


async def test_asyncpg_copy_and_transactions(proxy):
    conn = await asyncpg.connect(proxy.dsn("app", PW))
    try:
        await conn.execute("CREATE TABLE ap_copy (id int, v text)")
        res = await conn.copy_records_to_table("ap_copy", records=[(i, f"v{i}") for i in range(5000)])
        assert res == "COPY 5000"
        import io
        buf = io.BytesIO()
        res = await conn.copy_from_query("SELECT * FROM ap_copy WHERE id < 10 ORDER BY id", output=buf, format="csv")
        assert res == "COPY 10" and buf.getvalue().decode().splitlines()[3] == "3,v3"
        with pytest.raises(asyncpg.UniqueViolationError):
            async with conn.transaction():
                await conn.execute("CREATE TABLE ap_tx (id int primary key)")
                await conn.execute("INSERT INTO ap_tx VALUES (1)")
                await conn.execute("INSERT INTO ap_tx VALUES (1)")
        assert await conn.fetchval("SELECT to_regclass('ap_tx')") is None  # rolled back
        async with conn.transaction():
            await conn.execute("INSERT INTO ap_copy VALUES (-1, 'tx')")
        assert await conn.fetchval("SELECT v FROM ap_copy WHERE id = -1") == "tx"
        await conn.executemany("INSERT INTO ap_copy VALUES ($1, $2)", [(-2, "a"), (-3, "b")])
        assert await conn.fetchval("SELECT count(*) FROM ap_copy WHERE id < 0") == 3
    finally:
        await conn.close()


async def test_asyncpg_cancellation_via_timeout(proxy):
    conn = await asyncpg.connect(proxy.dsn("app", PW))
    try:
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetch("SELECT pg_sleep(20)", timeout=0.5)
        assert await conn.fetchval("SELECT 7") == 7
        assert time.monotonic() - t0 < 10
    finally:
        await conn.close()


async def test_asyncpg_listen_notify(proxy):
    a = await asyncpg.connect(proxy.dsn("app", PW))
    b = await asyncpg.connect(proxy.dsn("app", PW))
    got: asyncio.Queue = asyncio.Queue()
    try:
        await a.add_listener("tg_channel", lambda conn, pid, channel, payload: got.put_nowait((channel, payload)))
        await b.execute("NOTIFY tg_channel, 'hello'")
        assert await asyncio.wait_for(got.get(), 10) == ("tg_channel", "hello")
    finally:
        await a.close()
        await b.close()


# ------------------------------------------------------------------ psycopg 3

def test_psycopg_server_side_binding_pipeline_and_copy(proxy):
    with psycopg.connect(proxy.dsn("app", PW), autocommit=True) as conn:
        conn.execute("CREATE TABLE pg3 (id int primary key, v text)")
        conn.execute("INSERT INTO pg3 VALUES (%s, %s)", (1, "one"))
        assert conn.execute("SELECT v FROM pg3 WHERE id = %s", (1,)).fetchone() == ("one",)
        # prepared on the server after a few executions
        for i in range(2, 8):
            conn.execute("INSERT INTO pg3 VALUES (%s, %s)", (i, f"v{i}"), prepare=True)
        with conn.pipeline():
            cur1 = conn.execute("SELECT count(*) FROM pg3")
            conn.execute("INSERT INTO pg3 VALUES (%s, %s)", (100, "p"))
            cur2 = conn.execute("SELECT v FROM pg3 WHERE id = %s", (100,))
        assert cur1.fetchone() == (7,) and cur2.fetchone() == ("p",)
        # an error inside a pipeline: the rest of the pipeline is aborted, the connection stays usable
        with pytest.raises(psycopg.errors.UniqueViolation):
            with conn.pipeline():
                conn.execute("INSERT INTO pg3 VALUES (%s, %s)", (100, "dup"))
                conn.execute("SELECT 1")
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with conn.cursor() as cur:
            with cur.copy("COPY pg3 (id, v) FROM STDIN") as copy:
                for i in range(200, 400):
                    copy.write_row((i, f"c{i}"))
            with cur.copy("COPY (SELECT id FROM pg3 WHERE id >= 200 ORDER BY id) TO STDOUT") as copy:
                ids = [int(r[0]) for r in copy.rows()]
        assert ids == list(range(200, 400))


def test_psycopg_binary_and_transactions(proxy):
    with psycopg.connect(proxy.dsn("app", PW)) as conn:
        cur = conn.cursor(binary=True)
        cur.execute("SELECT %b::int4, %b::text, %b::bytea", (5, "x", b"\x00y"))
        assert cur.fetchone() == (5, "x", b"\x00y")
        conn.rollback()
        with conn.transaction():
            conn.execute("CREATE TABLE pg3_tx (x int)")
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.transaction():
                conn.execute("INSERT INTO pg3_tx VALUES (1)")
                conn.execute("SELECT 1/0")
        assert conn.execute("SELECT count(*) FROM pg3_tx").fetchone() == (0,)


# ------------------------------------------------------------------ pgbench

def test_pgbench_all_query_modes(proxy):
    env = dict(os.environ, PGPASSWORD=PW, PGSSLMODE="disable")
    base = ["-h", proxy.host, "-p", str(proxy.port), "-U", "app", proxy.config.backend.database]
    r = subprocess.run(["pgbench", "-i", "-q", "-s", "1", *base], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for mode in ("simple", "extended", "prepared"):
        r = subprocess.run(["pgbench", "-n", "-M", mode, "-c", "4", "-j", "2", "-T", "2", *base],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "number of failed transactions: 0 " in r.stdout, r.stdout
        assert "number of transactions actually processed: 0" not in r.stdout


def test_cancel_request_stops_a_running_pg_sleep(proxy, pg):
    """The cancel is sent only once PostgreSQL runs the query (else it could hit nothing), and the
    30 s sleep then ends with 57014 long before it would have finished."""
    with psycopg.connect(proxy.dsn("app", PW), autocommit=True) as conn:
        outcome = {}

        def run():
            try:
                conn.execute("SELECT pg_sleep(30.25)")
                outcome["r"] = "finished"
            except psycopg.Error as e:
                outcome["r"] = e

        t = threading.Thread(target=run)
        t0 = time.monotonic()
        t.start()
        wait_until_query_active(pg.admin_dsn, "pg_sleep(30.25)")
        conn.cancel_safe()
        t.join(25)
        assert isinstance(outcome.get("r"), psycopg.errors.QueryCanceled), outcome
        assert time.monotonic() - t0 < 25  # cancelled, not slept out
        assert conn.execute("SELECT 1").fetchone() == (1,)
