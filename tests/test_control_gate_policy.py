"""The operator gate around the real tenant gate: rewritten, audited, read-only on the backend."""

from __future__ import annotations

import asyncpg
import pytest

from proxy.control.operator_gate import open_operator_session
from proxy.catalog_sync import CatalogManager
from support.demo_policy import demo_rules, demo_schema_sql
from proxy.policy.engine import PolicyEngine
from proxy.policy.session import TenantSessionGate
from proxy.seam import Forward, Origin, Outcome, Refuse, SessionKind, StartupInfo, UserRecord

from support.control import actor, add_people, control_env


@pytest.fixture(scope="module")
async def setup(pg, make_db):
    env = await control_env(pg, make_db, "ctlgate")
    _, data_dsn = make_db("ctlgatedata")
    conn = await asyncpg.connect(data_dsn)
    try:
        await conn.execute(demo_schema_sql())
    finally:
        await conn.close()
    rules = demo_rules()
    engine = PolicyEngine(rules, await CatalogManager.from_dsn(data_dsn, rules))
    return env, data_dsn, engine


async def test_read_grant_session_sees_one_tenant_and_cannot_write(setup):
    env, data_dsn, engine = setup
    plane = env.plane()
    await plane.start()
    gate = None
    backend = await asyncpg.connect(data_dsn)
    try:
        await add_people(plane, ("op", ("operator",)), ("ap", ("approver",)))
        g = await plane.request_grant(await actor(plane, "op"), "acme", "read", "1h", "TICKET-1")
        await plane.approve_grant(await actor(plane, "ap"), g.id)
        startup = StartupInfo(user="op", database="app", client_addr="127.0.0.1:5555", options={},
                              application_name="psql", session_id="sess-1", tls=False)
        gate = await open_operator_session(
            plane, UserRecord("op", "SCRAM-SHA-256$x", SessionKind.OPERATOR), startup,
            lambda grant: TenantSessionGate(engine, grant.tenant, read_only=grant.read_only))
        for sql in gate.backend_setup_sql:
            await backend.execute(sql)

        d = gate.check("SELECT DISTINCT tenant_id FROM orders", Origin.SIMPLE)
        assert isinstance(d, Forward) and d.sql != "SELECT DISTINCT tenant_id FROM orders"
        seq = await gate.audit_before(d, None)
        rows = await backend.fetch(d.sql)
        await gate.audit_after(seq, Outcome(None, f"SELECT {len(rows)}", len(rows), 0.001))
        assert [r[0] for r in rows] == ["acme"]

        refused = gate.check("DELETE FROM orders", Origin.SIMPLE)
        assert isinstance(refused, Refuse) and refused.sqlstate == "25006"
        # the backend is read-only too (defence in depth)
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await backend.execute("DELETE FROM orders WHERE false")
    finally:
        if gate is not None:
            await gate.close()
        await backend.close()
        async with plane.pool.acquire() as conn:
            recs = await conn.fetch(f"SELECT * FROM {plane.s}.audit_log WHERE session_id = 'sess-1' ORDER BY seq")
        await plane.close()
    stmt = [r for r in recs if r["type"] == "statement"][0]
    assert stmt["original_sql"] == "SELECT DISTINCT tenant_id FROM orders"
    assert "acme" in stmt["rewritten_sql"] and stmt["tenant"] == "acme" and stmt["grant_id"] == g.id
    assert [r["type"] for r in recs][-2:] == ["statement.outcome", "session.ended"]
