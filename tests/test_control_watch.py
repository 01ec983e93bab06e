"""Operator session gate and the watcher: audit before action, grant binding, ending sessions in time."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import asyncpg
import pyotp
import pytest

from proxy.control import audit as A
from proxy.control.operator_gate import StatementNote, open_operator_session
from proxy.policy.errors import PolicyRefusal
from proxy.seam import Forward, Origin, Outcome, Refuse, SessionKind, SessionRefused, StartupInfo, UserRecord

from support.control import OWNER, actor, add_people, control_env


@dataclass
class RecordingInnerGate:
    """A minimal tenant gate: appends the tenant predicate marker, refuses writes when read-only."""

    tenant: str
    read_only: bool
    kind: SessionKind = SessionKind.TENANT
    audited: bool = False
    backend_setup_sql: tuple = ("SET tenantgate.tenant_id = 'x'",)
    closed: bool = False
    rfq: list = field(default_factory=list)

    def check(self, sql, origin):
        is_write = sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE"))
        if is_write and self.read_only:
            return Refuse("25006", "read-only")
        return Forward(f"{sql} /* tenant {self.tenant} */", statement_class="write" if is_write else (
            "read" if sql.lstrip().upper().startswith(("SELECT", "WITH", "SHOW", "TABLE")) else "other"),
                       audit="inner-note")

    def on_ready_for_query(self, tx_status):
        self.rfq.append(tx_status)

    def on_refused(self, sql, refusal):
        pass

    def set_terminator(self, terminate):
        pass

    async def close(self):
        self.closed = True


def startup(**options) -> StartupInfo:
    return StartupInfo(user="x", database="app", client_addr="10.0.0.7:41000", options=options,
                       application_name="psql", session_id="abc123", tls=False)


def user(name: str) -> UserRecord:
    return UserRecord(name=name, scram_verifier="SCRAM-SHA-256$x", kind=SessionKind.OPERATOR)


@pytest.fixture(scope="module")
async def env(pg, make_db):
    return await control_env(pg, make_db, "ctlwatch")


@pytest.fixture
async def plane(env):
    p = env.plane()
    await p.start()
    yield p
    await p.close()


async def _approved(plane, requester: str, approver: str, access="read", duration="1h", tenant="acme"):
    g = await plane.request_grant(await actor(plane, requester), tenant, access, duration, "TICKET-9")
    return await plane.approve_grant(await actor(plane, approver), g.id)


async def _records(plane, session_id: str = "abc123"):
    async with plane.pool.acquire() as conn:
        return await conn.fetch(f"SELECT * FROM {plane.s}.audit_log WHERE session_id = $1 ORDER BY seq", session_id)


async def test_gate_audits_before_and_after(plane):
    await add_people(plane, ("g_op", ("operator",)), ("g_ap", ("approver",)))
    g = await _approved(plane, "g_op", "g_ap")
    gate = await open_operator_session(plane, user("g_op"), startup(**{"tenantgate.grant": str(g.id)}),
                                       lambda grant: RecordingInnerGate(grant.tenant, grant.read_only))
    try:
        assert gate.audited and gate.kind is SessionKind.OPERATOR
        assert "SET default_transaction_read_only = on" in gate.backend_setup_sql
        assert not any("advisory" in x for x in gate.backend_setup_sql)  # only with hold_session_lock
        d = gate.check("SELECT * FROM orders WHERE id = $1", Origin.PARSE)
        assert isinstance(d, Forward) and d.audit == StatementNote("SELECT * FROM orders WHERE id = $1", "inner-note")
        seq = await gate.audit_before(d, [b"42"])
        await gate.audit_after(seq, Outcome(None, "SELECT 2", 2, 0.004))
        # read grant: writes refused, also ways to switch the transaction to read-write
        assert gate.check("UPDATE orders SET x = 1", Origin.SIMPLE).sqlstate == "25006"
        assert gate.check("SET default_transaction_read_only = off", Origin.SIMPLE).sqlstate == "25006"
        assert gate.check("BEGIN READ WRITE", Origin.SIMPLE).sqlstate == "25006"
        assert gate.check("RESET ALL", Origin.SIMPLE).sqlstate == "25006"
        assert gate.check("DISCARD ALL", Origin.SIMPLE).sqlstate == "25006"
        assert isinstance(gate.check("SELECT count(*) FROM orders", Origin.SIMPLE), Forward)
        gate.on_refused("UPDATE orders SET x = 1", Refuse("25006", "read-only"))
        gate.on_ready_for_query(b"I")
        assert gate.inner.rfq == [b"I"]
    finally:
        await gate.close()
    assert gate.inner.closed
    recs = await _records(plane)
    types = [r["type"] for r in recs]
    assert types == [A.SESSION_OPENED, A.STATEMENT, A.OUTCOME, A.STATEMENT_REFUSED, A.SESSION_ENDED]
    stmt, outcome = recs[1], recs[2]
    assert (stmt["operator"], stmt["grant_id"], stmt["tenant"], stmt["client_addr"]) == (
        "g_op", g.id, "acme", "10.0.0.7:41000")
    assert stmt["original_sql"] == "SELECT * FROM orders WHERE id = $1"
    assert stmt["rewritten_sql"] == "SELECT * FROM orders WHERE id = $1 /* tenant acme */"
    assert stmt["params"] == '["42"]' and stmt["statement_class"] == "read"
    assert (outcome["ref_seq"], outcome["command_tag"], outcome["rows"], outcome["sqlstate"]) == (
        stmt["seq"], "SELECT 2", 2, None)
    assert (await plane.verify()).ok
    await plane.revoke_grant(await actor(plane, "g_ap"), g.id)


async def test_audit_failure_refuses_the_statement(env, plane):
    await add_people(plane, ("f_op", ("operator",)), ("f_ap", ("approver",)))
    g = await _approved(plane, "f_op", "f_ap", access="write")
    gate = await open_operator_session(plane, user("f_op"), startup(), lambda gr: RecordingInnerGate(gr.tenant, False))
    assert "default_transaction_read_only" not in " ".join(gate.backend_setup_sql)
    admin = await asyncpg.connect(env.admin_dsn)
    try:
        await admin.execute(f"REVOKE INSERT ON {plane.s}.audit_log FROM {OWNER}")
        d = gate.check("DELETE FROM orders", Origin.SIMPLE)
        with pytest.raises(PolicyRefusal) as ei:
            await gate.audit_before(d, None)
        assert ei.value.sqlstate == "58000" and "nothing was run" in ei.value.message
    finally:
        await admin.execute(f"GRANT INSERT ON {plane.s}.audit_log TO {OWNER}")
        await admin.close()
        await gate.close()
        await plane.revoke_grant(await actor(plane, "f_ap"), g.id)


async def test_connect_refusals_are_audited_and_totp_is_required(plane):
    await add_people(plane, ("c_op", ("operator",)), ("c_ap", ("approver",)))
    inner = lambda gr: RecordingInnerGate(gr.tenant, gr.read_only)  # noqa: E731
    with pytest.raises(SessionRefused) as ei:
        await open_operator_session(plane, user("c_op"), startup(), inner)
    assert ei.value.sqlstate == "28000" and "no active grant" in ei.value.message
    assert "tenantgate grant request --tenant" in ei.value.message
    with pytest.raises(SessionRefused, match="grant number"):
        await open_operator_session(plane, user("c_op"), startup(**{"tenantgate.grant": "x"}), inner)
    g = await _approved(plane, "c_op", "c_ap")
    secret, _ = await plane.enrol_totp(await actor(plane, "c_op"), "c_op")
    # a missing or wrong TOTP code gets the same error as a wrong password (28P01)
    with pytest.raises(SessionRefused, match="password authentication failed"):
        await open_operator_session(plane, user("c_op"), startup(), inner)
    with pytest.raises(SessionRefused, match="password authentication failed"):
        await open_operator_session(plane, user("c_op"), startup(**{"tenantgate.totp": "99999x"}), inner)
    gate = await open_operator_session(
        plane, user("c_op"), startup(**{"tenantgate.totp": pyotp.TOTP(secret).now()}), inner)
    await gate.close()
    refused = [r for r in await _records(plane) if r["type"] == A.CONNECTION_REFUSED and r["operator"] == "c_op"]
    assert len(refused) == 4 and [r["sqlstate"] for r in refused] == ["28000", "28000", "28P01", "28P01"]
    failed = [r for r in await _records(plane) if r["type"] == A.AUTH_FAILED and r["operator"] == "c_op"]
    assert len(failed) == 2
    assert all(pyotp.TOTP(secret).now() not in (r["detail"] or "") for r in refused)
    await plane.revoke_grant(await actor(plane, "c_ap"), g.id)


class Terminations:
    def __init__(self):
        self.calls: list[tuple[str, str, float]] = []
        self.event = asyncio.Event()

    def __call__(self, sqlstate: str, message: str) -> None:
        self.calls.append((sqlstate, message, time.monotonic()))
        self.event.set()


async def test_revocation_on_another_instance_ends_the_session_within_2s(env, plane):
    await add_people(plane, ("w_op", ("operator",)), ("w_ap", ("approver",)))
    g = await _approved(plane, "w_op", "w_ap")
    other = env.plane()  # a second tenantgate instance on the same control schema
    await other.start()
    ended_elsewhere: list[tuple[int, str]] = []
    tenant_changes: list[tuple[str, str]] = []
    sub = await other.watch(lambda gid, why: ended_elsewhere.append((gid, why)),
                            lambda name, status: tenant_changes.append((name, status)))
    gate = await open_operator_session(plane, user("w_op"), startup(), lambda gr: RecordingInnerGate(gr.tenant, True))
    term = Terminations()
    gate.set_terminator(term)
    try:
        t0 = time.monotonic()
        await other.revoke_grant(await actor(other, "w_ap"), g.id, "incident closed")
        await asyncio.wait_for(term.event.wait(), 2.0)
        sqlstate, message, at = term.calls[0]
        assert sqlstate == "57P01" and f"grant {g.id}" in message and "revoked" in message
        assert at - t0 < 2.0 and len(term.calls) == 1
        # the gate refuses anything further
        assert gate.check("SELECT 1", Origin.SIMPLE).sqlstate == "57P01"
        with pytest.raises(PolicyRefusal):
            await gate.audit_before(Forward("SELECT 1"), None)
        with pytest.raises(SessionRefused, match="revoked"):
            await plane.bind_grant("w_op", g.id)
        # the other instance's subscribers heard of it too, and of tenant changes
        await plane.register_tenant("wtenant")
        for _ in range(40):
            if ended_elsewhere and tenant_changes:
                break
            await asyncio.sleep(0.05)
        assert (g.id, "revoked") in ended_elsewhere and ("wtenant", "active") in tenant_changes
    finally:
        sub.close()
        await gate.close()
        await other.close()


async def test_expiry_ends_the_session_within_2s(plane):
    await add_people(plane, ("x_op", ("operator",)), ("x_ap", ("approver",)))
    g = await _approved(plane, "x_op", "x_ap", duration="2s")
    gate = await open_operator_session(plane, user("x_op"), startup(), lambda gr: RecordingInnerGate(gr.tenant, True))
    term = Terminations()
    gate.set_terminator(term)
    try:
        await asyncio.wait_for(term.event.wait(), 5.0)
        from datetime import datetime, timezone

        late = datetime.now(timezone.utc) - g.expires_at
        assert late.total_seconds() < 2.0
        assert term.calls[0][0] == "57P01" and "expired" in term.calls[0][1]
        for _ in range(40):  # the watcher's sweep moves the grant to 'expired'
            if (await plane.get_grant(g.id)).state == "expired":
                break
            await asyncio.sleep(0.1)
        assert (await plane.get_grant(g.id)).state == "expired"
    finally:
        await gate.close()


async def test_terminator_set_after_the_grant_ended_is_called_at_once(plane):
    await add_people(plane, ("y_op", ("operator",)), ("y_ap", ("approver",)))
    g = await _approved(plane, "y_op", "y_ap")
    gate = await open_operator_session(plane, user("y_op"), startup(), lambda gr: RecordingInnerGate(gr.tenant, True))
    try:
        await plane.revoke_grant(await actor(plane, "y_ap"), g.id)
        for _ in range(40):
            if gate.ended:
                break
            await asyncio.sleep(0.05)
        term = Terminations()
        gate.set_terminator(term)
        assert term.calls and term.calls[0][0] == "57P01"
    finally:
        await gate.close()


async def test_lost_listen_connection_still_ends_sessions(env, plane):
    """If the LISTEN connection dies, the periodic re-check still ends the session within 2 s."""
    await add_people(plane, ("z_op", ("operator",)), ("z_ap", ("approver",)))
    g = await _approved(plane, "z_op", "z_ap")
    gate = await open_operator_session(plane, user("z_op"), startup(), lambda gr: RecordingInnerGate(gr.tenant, True))
    term = Terminations()
    gate.set_terminator(term)
    admin = await asyncpg.connect(env.admin_dsn)
    try:
        watcher = await plane.watcher()
        await admin.execute("SELECT pg_terminate_backend($1)", watcher._conn.get_server_pid())
        await plane.revoke_grant(await actor(plane, "z_ap"), g.id)
        await asyncio.wait_for(term.event.wait(), 2.0)
        assert term.calls[0][0] == "57P01"
    finally:
        await admin.close()
        await gate.close()
