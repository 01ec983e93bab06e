"""The tenant move engine (proxy/lifecycle/move.py) on two real PostgreSQL 15 clusters (wal_level=logical):
a move while the tenant writes on the source (no acknowledged write lost, other tenants untouched on both
sides), a move killed mid-way then resumed, an aborted move, and the refusals (schema mismatch, a table
without a usable replica identity, a source without wal_level=logical, a target that has the tenant).

The hold/release/flip hooks stand in for the proxies (the CLI wires them to the admin consoles and the
placement): the writer pauses while held, and writes to wherever the flip points it afterwards.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from proxy.control.plane import ControlPlane
from proxy.lifecycle.move import MoveHooks, MoveOptions, TableSpec, TenantMove
from proxy.lifecycle.move_state import MoveStore
from proxy.lifecycle.tables import LifecycleError
from support.move_env import cluster_pair, data_sql, fresh_pair, tenant_state


@pytest.fixture(scope="module")
def clusters():
    with cluster_pair("tenantgate-move-") as pair:
        yield pair


@pytest.fixture
async def env(clusters):
    src, tgt = clusters
    name, sdsn, tdsn = fresh_pair(src, tgt)
    s = await asyncpg.connect(sdsn)
    t = await asyncpg.connect(tdsn)
    await s.execute(data_sql("acme", 200, 600, 800) + data_sql("initech", 50, 100, 100))
    await t.execute(data_sql("globex", 40, 80, 90))
    src.psql(f'CREATE DATABASE "{name}_ctl"')
    plane = ControlPlane(src.dsn(database=f"{name}_ctl"))
    await plane.start(install=True)
    store = MoveStore(plane.pool, plane.s)
    yield {"src": s, "tgt": t, "sdsn": sdsn, "tdsn": tdsn, "plane": plane, "store": store, "clusters": clusters}
    await plane.close()
    await s.close()
    await t.close()


class Recorder:
    """The hooks: what was held, released, flipped, audited."""

    def __init__(self):
        self.events: list[str] = []
        self.audits: list[tuple[str, dict]] = []
        self.receipts: list[dict] = []
        self.flipped = asyncio.Event()

    def hooks(self, **kw) -> MoveHooks:
        async def hold():
            self.events.append("hold")

        async def release():
            self.events.append("release")

        async def flip(conn):
            assert await conn.fetchval("SELECT now() = statement_timestamp()") is not None
            self.events.append("flip")
            self.flipped.set()

        async def audit(type_, detail):
            self.audits.append((type_, detail))

        async def receipt(doc):
            self.receipts.append(doc)

        return MoveHooks(**{"hold": hold, "release": release, "flip": flip, "audit": audit, "progress": print,
                            "record_receipt": receipt, **kw})


async def new_move(env, tenant="acme") -> object:
    m = await env["store"].create(tenant, "east", "north", "bob", {})
    return await env["store"].approve(m.id, "carol")


def engine(env, move, hooks, **opts) -> TenantMove:
    return TenantMove(env["store"], move, env["sdsn"], env["tdsn"], TableSpec(), hooks,
                      MoveOptions(poll_s=0.05, **opts), control_tx=env["plane"]._tx)


async def replication_objects(env, move) -> tuple:
    return (await env["src"].fetchval("SELECT count(*) FROM pg_publication WHERE pubname = $1", move.publication),
            await env["tgt"].fetchval("SELECT count(*) FROM pg_subscription WHERE subname = $1", move.subscription),
            await env["src"].fetchval("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                                      move.subscription))


async def test_move_while_the_tenant_writes_loses_no_acknowledged_write(env):
    src, tgt = env["src"], env["tgt"]
    initech_before = await tenant_state(src, "initech")
    globex_before = await tenant_state(tgt, "globex")
    where = {"dsn": env["sdsn"]}
    acked_events: set[int] = set()
    state = {"name": None, "ops": 0}
    running = asyncio.Event()
    running.set()
    idle = asyncio.Event()
    stop = False

    async def writer():
        """acme's application: inserts, updates and deletes, recording what was acknowledged."""
        conn, on = None, None
        i = 0
        while not stop:
            if not running.is_set():
                idle.set()
                await running.wait()
            idle.clear()
            if on != where["dsn"]:
                if conn is not None:
                    await conn.close()
                conn, on = await asyncpg.connect(where["dsn"]), where["dsn"]
            i += 1
            async with conn.transaction():
                eid = await conn.fetchval("INSERT INTO events (tenant_id, payload) VALUES ('acme', $1) RETURNING id",
                                          f'{{"w": {i}}}')
                if i % 5 == 0:
                    victim = min(acked_events) if acked_events else None
                    if victim is not None:
                        await conn.execute("DELETE FROM events WHERE tenant_id = 'acme' AND id = $1", victim)
                if i % 7 == 0:
                    await conn.execute("UPDATE customers SET name = $1 WHERE tenant_id = 'acme' AND id = 1", f"v{i}")
            acked_events.add(eid)  # committed: acknowledged to the application
            if i % 5 == 0 and victim is not None:
                acked_events.discard(victim)
            if i % 7 == 0:
                state["name"] = f"v{i}"
            state["ops"] = i
            await asyncio.sleep(0.002)
        idle.set()
        await conn.close()

    async def other_writer():
        """initech keeps working on the source the whole time."""
        conn = await asyncpg.connect(env["sdsn"])
        n = 0
        while not stop:
            await conn.execute("INSERT INTO events (tenant_id, payload) VALUES ('initech', '{\"other\": 1}')")
            n += 1
            await asyncio.sleep(0.005)
        await conn.close()
        return n

    rec = Recorder()

    async def hold():
        rec.events.append("hold")
        running.clear()
        await idle.wait()  # the in-flight transaction ended

    async def release():
        rec.events.append("release")
        running.set()

    async def flip(conn):
        rec.events.append("flip")
        where["dsn"] = env["tdsn"]

    initial_acme = await tenant_state(src, "acme")
    w = asyncio.create_task(writer())
    o = asyncio.create_task(other_writer())

    async def ops_reach(n):
        while state["ops"] < n:
            if w.done():
                await w  # the writer failed: its error
                raise AssertionError("the writer stopped")
            await asyncio.sleep(0.01)

    await ops_reach(20)
    move = await new_move(env)
    done = await engine(env, move, rec.hooks(hold=hold, release=release, flip=flip)).run()
    await ops_reach(state["ops"] + 20)  # acme keeps writing, now on the target
    stop = True
    running.set()
    await w
    others = await o

    assert done.step == "done" and rec.events == ["hold", "flip", "release"]
    assert done.detail["cutover"]["pause_ms"] >= 0 and done.detail["source_purge"]["total_rows"] > 0
    # every acknowledged write is on the target, nothing of acme is left on the source
    after = await tenant_state(tgt, "acme")
    got_events = {int(r) for r in await tgt.fetchval(
        "SELECT array_agg(id) FROM events WHERE tenant_id = 'acme' AND payload ? 'w'")}
    assert got_events == acked_events
    assert await tgt.fetchval("SELECT name FROM customers WHERE tenant_id = 'acme' AND id = 1") == state["name"]
    assert len(after["public.orders"]) == len(initial_acme["public.orders"]) == 600
    assert after["public.orders"] == initial_acme["public.orders"]
    assert all(v == [] for v in (await tenant_state(src, "acme")).values())
    # other tenants: globex untouched on the target; initech on the source has exactly its own writes
    assert await tenant_state(tgt, "globex") == globex_before
    initech_after = await tenant_state(src, "initech")
    assert initech_after["public.customers"] == initech_before["public.customers"]
    assert initech_after["public.orders"] == initech_before["public.orders"]
    assert len(initech_after["public.events"]) == len(initech_before["public.events"]) + others
    assert all(v == [] for v in (await tenant_state(tgt, "initech")).values())
    # the publication, subscription and slot are gone; sequences on the target are above the source's
    assert await replication_objects(env, done) == (0, 0, 0)
    src_seq = await src.fetchval("SELECT last_value FROM events_id_seq")
    new_id = await tgt.fetchval("INSERT INTO events (tenant_id) VALUES ('acme') RETURNING id")
    assert new_id > src_seq
    new_order = await tgt.fetchval("INSERT INTO orders (tenant_id, customer_id) VALUES ('acme', 1) RETURNING id")
    assert new_order > 600
    # the receipt of the source's purge, and the steps in the audit
    assert rec.receipts and rec.receipts[0]["tenant"] == "acme" and rec.receipts[0]["verified_remaining_rows"] == 0
    steps = [d["step"] for t, d in rec.audits if t == "tenant.move.step"]
    assert steps == ["checked", "copying", "synced", "cutover", "flipped", "cleaned", "done"]


async def test_killed_mid_way_then_resumed(env):
    src, tgt = env["src"], env["tgt"]
    before = await tenant_state(src, "acme")
    globex_before = await tenant_state(tgt, "globex")
    reached = asyncio.Event()

    async def stop_at(step):
        if step == "copying":
            reached.set()
            await asyncio.Event().wait()  # killed here

    move = await new_move(env)
    rec = Recorder()
    task = asyncio.create_task(engine(env, move, rec.hooks(after_step=stop_at)).run())
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    row = await env["store"].get(move.id)
    assert row.step == "copying" and "flip" not in rec.events
    # while one process runs a move, a second one is refused
    async with env["store"].running(row):
        with pytest.raises(LifecycleError) as e:
            await engine(env, row, Recorder().hooks()).run()
        assert e.value.sqlstate == "55P03" and "another process" in e.value.message
    assert await tenant_state(src, "acme") == before  # still on the source, intact

    # a second kill: during the cutover, after the hold
    async def stop_in_cutover(step):
        if step == "cutover":
            reached.set()
            await asyncio.Event().wait()

    reached.clear()
    task = asyncio.create_task(engine(env, row, rec.hooks(after_step=stop_in_cutover)).run())
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    row = await env["store"].get(move.id)
    assert row.step == "cutover"

    # a third kill: right after the flip committed, before the release
    class Killed(Exception):
        pass

    async def die_in_flip(conn):
        rec.events.append("flip")
        await conn.execute("SELECT 1")  # the flip commits with the step; the process dies before the release

    async def release_dies():
        raise Killed()

    with pytest.raises(Killed):
        await engine(env, row, rec.hooks(flip=die_in_flip, release=release_dies)).run()
    row = await env["store"].get(move.id)
    assert row.step == "flipped" and "cutover" not in row.detail
    rec3 = Recorder()
    done = await engine(env, row, rec3.hooks()).run()  # --resume releases the held tenant first, then goes on
    assert done.step == "done" and rec3.events == ["release"]
    assert done.detail["verified"]["still_held"] is True  # compared while the tenant was still held
    assert await tenant_state(tgt, "acme") == before
    assert all(v == [] for v in (await tenant_state(src, "acme")).values())
    assert await tenant_state(tgt, "globex") == globex_before
    assert await replication_objects(env, done) == (0, 0, 0)
    # resuming a finished move does nothing
    assert (await engine(env, done, Recorder().hooks()).run()).step == "done"


async def test_abort_before_the_flip_leaves_the_tenant_on_the_source(env):
    src, tgt = env["src"], env["tgt"]
    before = await tenant_state(src, "acme")
    globex_before = await tenant_state(tgt, "globex")
    reached = asyncio.Event()

    async def stop_at(step):
        if step == "synced":
            reached.set()
            await asyncio.Event().wait()

    move = await new_move(env)
    task = asyncio.create_task(engine(env, move, Recorder().hooks(after_step=stop_at)).run())
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await tenant_state(tgt, "acme"))["public.orders"] == before["public.orders"]  # copied
    row = await env["store"].get(move.id)
    rec = Recorder()
    aborted = await engine(env, row, rec.hooks()).abort()
    assert aborted.step == "aborted" and "flip" not in rec.events and "release" in rec.events
    assert await tenant_state(src, "acme") == before
    assert all(v == [] for v in (await tenant_state(tgt, "acme")).values())
    assert await tenant_state(tgt, "globex") == globex_before
    assert await replication_objects(env, aborted) == (0, 0, 0)
    # a new move of the tenant may start again
    again = await new_move(env)
    assert again.id != move.id


async def test_a_failed_cutover_releases_and_keeps_the_tenant_on_the_source(env):
    src = env["src"]
    before = await tenant_state(src, "acme")

    async def stuck():
        await asyncio.Event().wait()  # an in-flight transaction never ends

    rec = Recorder()
    move = await new_move(env)
    with pytest.raises(LifecycleError) as e:
        await engine(env, move, rec.hooks(hold=stuck), hold_timeout_s=0.3).run()
    assert e.value.sqlstate == "55P03" and "did not end within" in e.value.message
    assert rec.events == ["release"]
    row = await env["store"].get(move.id)
    assert row.step == "synced" and "did not end" in row.error
    assert await tenant_state(src, "acme") == before
    done = await engine(env, row, Recorder().hooks()).run()  # --resume tries the cutover again
    assert done.step == "done"


async def test_schema_mismatch_is_refused_with_a_diff(env):
    await env["tgt"].execute("ALTER TABLE orders ALTER COLUMN total TYPE numeric(14,2); "
                             "ALTER TABLE customers ADD COLUMN extra int; ALTER TABLE events DROP COLUMN blob")
    move = await new_move(env)
    with pytest.raises(LifecycleError) as e:
        await engine(env, move, Recorder().hooks()).run()
    assert e.value.sqlstate == "55000" and "does not match" in e.value.message
    detail = e.value.detail
    assert "public.orders.total: source numeric(12,2), target numeric(14,2)" in detail
    assert "public.customers.extra: on the target only (integer)" in detail
    assert "public.events.blob: missing on the target (source: bytea)" in detail
    assert await replication_objects(env, move) == (0, 0, 0)
    assert (await env["store"].get(move.id)).step == "approved"


async def test_refusals_before_anything_is_created(env, pg):
    src, tgt = env["src"], env["tgt"]
    # a table whose replica identity does not cover the tenant column
    for c in (src, tgt):
        await c.execute("CREATE TABLE notes (tenant_id text NOT NULL, body text)")
    move = await new_move(env)
    with pytest.raises(LifecycleError) as e:
        await engine(env, move, Recorder().hooks()).run()
    assert "public.notes: no primary key or replica identity" in e.value.detail
    for c in (src, tgt):
        await c.execute("DROP TABLE notes")
    # the target has rows of the tenant already
    await tgt.execute(data_sql("acme", 1, 0, 0))
    with pytest.raises(LifecycleError) as e:
        await engine(env, move, Recorder().hooks()).run()
    assert "already holds rows" in e.value.message
    await tgt.execute("DELETE FROM customers WHERE tenant_id = 'acme'")
    assert await replication_objects(env, move) == (0, 0, 0)
    # a source without wal_level=logical (the suite's main cluster runs with replica)
    name = "mv_nolog"
    pg.psql(f'DROP DATABASE IF EXISTS "{name}"')
    pg.psql(f'CREATE DATABASE "{name}"')
    from support.move_env import SCHEMA_SQL

    pg.psql(SCHEMA_SQL, database=name)
    eng = TenantMove(env["store"], move, pg.dsn(database=name), env["tdsn"], TableSpec(), Recorder().hooks(),
                     control_tx=env["plane"]._tx)
    with pytest.raises(LifecycleError) as e:
        await eng.run()
    assert "wal_level = replica" in e.value.message and "ALTER SYSTEM SET wal_level = logical" in e.value.hint


async def test_two_person_rule_in_the_store(env):
    m = await env["store"].create("initech", "east", "north", "bob", {})
    with pytest.raises(LifecycleError) as e:
        await env["store"].approve(m.id, "bob")
    assert e.value.sqlstate == "42501"
    with pytest.raises(LifecycleError) as e:
        await env["store"].create("initech", "east", "north", "carol", {})
    assert "already under way" in e.value.message
    with pytest.raises(LifecycleError) as e:
        await engine(env, m, Recorder().hooks()).run()
    assert "second approver" in e.value.message


async def test_interrupted_between_the_flip_and_the_checksums_keeps_the_source(env):
    src, tgt = env["src"], env["tgt"]
    before = await tenant_state(src, "acme")

    class Killed(Exception):
        pass

    def die_after_flip(msg):
        if "flipped to" in msg:
            raise Killed()

    move = await new_move(env)
    with pytest.raises(Killed):
        await engine(env, move, Recorder().hooks(progress=die_after_flip)).run()
    row = await env["store"].get(move.id)
    assert row.step == "flipped" and "verified" not in row.detail
    # the source is fenced for acme: a write an instance still routes there fails (40001) instead of being lost
    with pytest.raises(asyncpg.SerializationError) as e:
        await src.execute("INSERT INTO events (tenant_id) VALUES ('acme')")
    assert "was moved to another server" in str(e.value)
    with pytest.raises(asyncpg.SerializationError):
        await src.execute("UPDATE customers SET name = 'late' WHERE tenant_id = 'acme' AND id = 1")
    await src.execute("INSERT INTO events (tenant_id) VALUES ('initech')")  # other tenants write as before
    with pytest.raises(LifecycleError) as e:
        await engine(env, row, Recorder().hooks()).run()
    assert e.value.sqlstate == "55000" and "never compared" in e.value.message and "--purge-unverified" in e.value.hint
    row = await env["store"].get(move.id)
    assert row.step == "cleaned"
    assert await tenant_state(src, "acme") == before  # the source keeps its copy
    assert await tenant_state(tgt, "acme") == before
    done = await engine(env, row, Recorder().hooks(), purge_unverified=True).run()
    assert done.step == "done"
    assert await src.fetchval("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'tg_move_fence%'") == 0
    assert all(v == [] for v in (await tenant_state(src, "acme")).values())
    assert await tenant_state(tgt, "acme") == before


async def test_truncate_on_the_source_is_not_replicated(env):
    """PostgreSQL replicates TRUNCATE whatever the row filter: the publication must not publish it, or a
    TRUNCATE on the source would empty the target's table of every tenant there."""
    src, tgt = env["src"], env["tgt"]
    globex = await tenant_state(tgt, "globex")
    reached = asyncio.Event()

    async def stop_at(step):
        if step == "synced":
            reached.set()
            await asyncio.Event().wait()

    move = await new_move(env)
    task = asyncio.create_task(engine(env, move, Recorder().hooks(after_step=stop_at)).run())
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await src.execute("TRUNCATE events")
    marker = await src.fetchval("INSERT INTO events (tenant_id, payload) VALUES ('acme', '{\"marker\": 1}') RETURNING id")
    while not await tgt.fetchval("SELECT count(*) FROM events WHERE tenant_id = 'acme' AND id = $1", marker):
        await asyncio.sleep(0.05)  # replicated after the TRUNCATE (WAL order)
    assert await tenant_state(tgt, "globex") == globex
    await engine(env, await env["store"].get(move.id), Recorder().hooks()).abort()
    assert await tenant_state(tgt, "globex") == globex
