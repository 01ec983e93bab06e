"""Break 8 of issue 20: a purge must never cascade-delete rows outside the tenant.

The first external-reference check runs before any delete transaction; a row of
another tenant or of a shared table that starts referencing the tenant's rows
after that check (committed in between, or being inserted while a batch runs)
must make the purge fail with 23503 and stay untouched.  The tests insert the
referencing row at the exact moment through ``PurgeOptions.after_check`` (and
wait on PostgreSQL's lock view, never on a sleep).  Also: the purge waits for
the operator sessions' shared lock of the tenant (break 3).
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from proxy.lifecycle.purge import PurgeOptions, purge_tenant, sessions_lock_name
from proxy.lifecycle.tables import LifecycleError, discover

SCHEMA = """
CREATE TABLE customers (tenant_id text NOT NULL, id int PRIMARY KEY, name text);
CREATE TABLE orders (tenant_id text NOT NULL, id int PRIMARY KEY,
                     customer_id int REFERENCES customers (id) ON DELETE CASCADE);
-- a shared table (no tenant column) whose rows may point at any tenant's customer
CREATE TABLE notes (id int PRIMARY KEY, customer_id int REFERENCES customers (id) ON DELETE CASCADE);
INSERT INTO customers VALUES ('acme', 1, 'a1'), ('acme', 2, 'a2'), ('acme', 3, 'a3'), ('globex', 10, 'g1');
INSERT INTO orders VALUES ('acme', 100, 1), ('acme', 101, 2), ('globex', 200, 10);
"""


@pytest.fixture
async def db(make_db):
    _, dsn = make_db("purgerace")
    conn = await asyncpg.connect(dsn)
    await conn.execute(SCHEMA)
    other = await asyncpg.connect(dsn)
    yield dsn, conn, other
    await other.close()
    await conn.close()


async def _purge(conn, **kw):
    schema = await discover(conn, "tenant_id")
    return await purge_tenant(conn, schema, "acme", PurgeOptions(batch_rows=2, **kw))


@pytest.mark.parametrize("referencing", [
    "INSERT INTO orders VALUES ('globex', 201, 1)",   # another tenant's row
    "INSERT INTO notes VALUES (1, 2)",                 # a shared table's row
])
async def test_reference_committed_after_the_check_is_not_cascaded(db, referencing):
    _, conn, other = db

    async def insert_now():
        await other.execute(referencing)  # committed between the first check and the deletes

    with pytest.raises(LifecycleError) as ei:
        await _purge(conn, after_check=insert_now)
    assert ei.value.sqlstate == "23503"
    # the referencing row survived, and so did the tenant row it points at
    assert await conn.fetchval("SELECT count(*) FROM orders WHERE tenant_id = 'globex'") == (
        2 if "orders" in referencing else 1)
    assert await conn.fetchval("SELECT count(*) FROM notes") == (1 if "notes" in referencing else 0)
    # once the reference is removed, the purge completes and leaves the others alone
    await other.execute("DELETE FROM orders WHERE id = 201; DELETE FROM notes")
    receipt = await _purge(conn)
    assert receipt["verified_remaining_rows"] == 0 and receipt["total_rows"] == 5
    assert await conn.fetchval("SELECT count(*) FROM orders WHERE tenant_id = 'globex'") == 1


async def test_reference_inserted_while_a_batch_runs_waits_and_fails(db):
    """An insert in flight when the batch locks its rows: it waits for the batch, then fails its FK check."""
    _, conn, other = db
    purge_pid = await conn.fetchval("SELECT pg_backend_pid()")
    tx = other.transaction()

    async def insert_in_flight():
        await tx.start()
        await other.execute("INSERT INTO notes VALUES (7, 3)")  # uncommitted: key-share lock on customer 3

        async def commit_when_purge_waits():
            while not await probe.fetchval(
                    "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", purge_pid):
                await asyncio.sleep(0.02)
            await tx.commit()
        asyncio.get_running_loop().create_task(commit_when_purge_waits())

    probe = await asyncpg.connect(db[0])
    try:
        with pytest.raises(LifecycleError) as ei:
            await _purge(conn, after_check=insert_in_flight)
        assert ei.value.sqlstate == "23503"
        assert await conn.fetchval("SELECT count(*) FROM notes WHERE customer_id = 3") == 1
        assert await conn.fetchval("SELECT count(*) FROM customers WHERE id = 3") == 1
    finally:
        await probe.close()


async def test_purge_waits_for_operator_sessions_of_the_tenant(db):
    dsn, conn, other = db
    # an operator session of acme holds this shared lock on its backend connection (operator_gate)
    await other.fetchval("SELECT pg_try_advisory_lock_shared(hashtext($1))", sessions_lock_name("acme"))
    with pytest.raises(LifecycleError) as ei:
        await _purge(conn, sessions_wait_s=0.3)
    assert ei.value.sqlstate == "55P03" and "sessions" in ei.value.message
    assert await conn.fetchval("SELECT count(*) FROM customers WHERE tenant_id = 'acme'") == 3  # nothing deleted
    # a session of another tenant does not hold it up
    await other.execute("SELECT pg_advisory_unlock_all()")
    await other.fetchval("SELECT pg_try_advisory_lock_shared(hashtext($1))", sessions_lock_name("globex"))
    receipt = await _purge(conn, sessions_wait_s=0.3)
    assert receipt["verified_remaining_rows"] == 0
