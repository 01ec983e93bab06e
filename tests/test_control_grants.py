"""Control plane: operator accounts, identities, TOTP, the grant state machine, tenants."""

from __future__ import annotations

import asyncio

import asyncpg
import pyotp
import pytest

from proxy.config import GrantsConfig
from proxy.control import audit as A
from proxy.control.model import AuthenticationFailed, InvalidRequest, NotFound, PermissionDenied
from proxy.seam import SessionRefused

from support.control import actor, add_people, control_env


@pytest.fixture(scope="module")
async def env(pg, make_db):
    return await control_env(pg, make_db, "ctlgrants")


@pytest.fixture
async def plane(env):
    p = env.plane()
    await p.start()
    yield p
    await p.close()




async def test_operator_accounts_and_passwords(plane):
    await add_people(plane, ("ann", ("operator",)), ("apu", ("approver", "operator")))
    ops = {o.name: o for o in await plane.list_operators()}
    assert ops["ann"].roles == {"operator"} and ops["apu"].roles == {"approver", "operator"}
    assert await plane.verify_password("ann", "ann-pw")
    assert not await plane.verify_password("ann", "wrong")
    with pytest.raises(AuthenticationFailed):
        await plane.authenticate_actor("ann", "wrong")
    with pytest.raises(AuthenticationFailed):
        await plane.authenticate_actor("nobody", "x")
    with pytest.raises(InvalidRequest):
        await plane.add_operator(plane.platform_admin(), "ann", "pw")
    with pytest.raises(InvalidRequest):
        await plane.add_operator(plane.platform_admin(), "bad name;", "pw")
    with pytest.raises(InvalidRequest):
        await plane.add_operator(plane.platform_admin(), "zed", "pw", ["root"])
    ann = await actor(plane, "ann")
    with pytest.raises(PermissionDenied):  # operators cannot create accounts
        await plane.add_operator(ann, "sock", "pw", ["approver"])
    # the stored verifier is a PostgreSQL SCRAM verifier the proxy can use
    rec = await plane.user_record("ann")
    assert rec.scram_verifier.startswith("SCRAM-SHA-256$") and rec.kind.value == "operator"
    await plane.remove_operator(plane.platform_admin(), "ann")
    assert await plane.get_operator("ann") is None
    with pytest.raises(NotFound):
        await plane.remove_operator(plane.platform_admin(), "ann")


async def test_grant_lifecycle_and_self_approval(plane):
    await add_people(plane, ("req1", ("operator", "approver")), ("appr1", ("approver",)), ("op2", ("operator",)))
    req, appr, op2 = [await actor(plane, n) for n in ("req1", "appr1", "op2")]

    with pytest.raises(InvalidRequest, match="reason"):
        await plane.request_grant(req, "acme", "read", "1h", "   ")
    with pytest.raises(InvalidRequest, match="maximum"):
        await plane.request_grant(req, "acme", "read", "9h", "T-1")
    with pytest.raises(InvalidRequest, match="read or write"):
        await plane.request_grant(req, "acme", "admin", "1h", "T-1")

    g = await plane.request_grant(req, "acme", "read", "2h", "TICKET-1: check invoices")
    assert g.state == "pending" and g.duration_s == 7200

    # Self-approval is refused although the requester has the approver role.
    with pytest.raises(PermissionDenied, match="self-approval"):
        await plane.approve_grant(req, g.id)
    # Operators without the approver role cannot approve.
    with pytest.raises(PermissionDenied, match="approver role"):
        await plane.approve_grant(op2, g.id)
    # Not bindable while pending.
    with pytest.raises(SessionRefused) as ei:
        await plane.bind_grant("req1")
    # pending, not missing: the way forward is an approver, not a new request
    assert ei.value.sqlstate == "28000" and f"tenantgate grant approve {g.id}" in ei.value.message
    assert "is pending" in ei.value.message and "Request one" not in ei.value.message

    g = await plane.approve_grant(appr, g.id, "ok")
    assert g.state == "approved" and g.expires_at is not None
    assert [a.approver for a in g.approvals] == ["appr1"]
    with pytest.raises(InvalidRequest, match="not pending"):
        await plane.approve_grant(appr, g.id)

    bound = await plane.bind_grant("req1")
    assert (bound.id, bound.tenant, bound.access, bound.read_only) == (g.id, "acme", "read", True)
    assert (await plane.bind_grant("req1", g.id)).id == g.id
    with pytest.raises(SessionRefused):  # someone else's grant id
        await plane.bind_grant("op2", g.id)

    # A second active grant makes the implicit choice ambiguous.
    g2 = await plane.request_grant(req, "globex", "write", "30m", "TICKET-2")
    await plane.approve_grant(appr, g2.id)
    with pytest.raises(SessionRefused, match="several active grants"):
        await plane.bind_grant("req1")
    assert (await plane.bind_grant("req1", g2.id)).access == "write"

    # Revoke: op2 (neither requester nor approver) may not; the requester may.
    with pytest.raises(PermissionDenied):
        await plane.revoke_grant(op2, g2.id)
    g2 = await plane.revoke_grant(req, g2.id, "done")
    assert g2.state == "revoked" and g2.ended_by == "req1"
    with pytest.raises(SessionRefused, match="revoked"):
        await plane.bind_grant("req1", g2.id)
    with pytest.raises(InvalidRequest):
        await plane.revoke_grant(req, g2.id)

    # Deny.
    g3 = await plane.request_grant(op2, "acme", "write", "1h", "TICKET-3")
    g3 = await plane.deny_grant(appr, g3.id, "no reason given in ticket")
    assert g3.state == "denied"
    with pytest.raises(InvalidRequest):
        await plane.approve_grant(req, g3.id)

    assert {x.id for x in await plane.list_grants(requester="req1")} >= {g.id, g2.id}
    assert [x.id for x in await plane.list_grants(state="denied", requester="op2")] == [g3.id]

    # Every step is in the audit chain.
    async with plane.pool.acquire() as conn:
        types = [r["type"] for r in await conn.fetch(
            f"SELECT type FROM {plane.s}.audit_log WHERE grant_id = $1 ORDER BY seq", g.id)]
    assert types == [A.GRANT_REQUESTED, A.GRANT_APPROVAL, A.GRANT_APPROVED]


async def test_two_approvals_required(env):
    # The config says 2, but the grant policy lives in the control schema: it is changed
    # through a change request that a second approver approves (grant_policy.py, accounts.py).
    from proxy.control.accounts import decide_change, request_change

    plane = env.plane(grants=GrantsConfig(approvals_required=2))
    await plane.start()
    try:
        await add_people(plane, ("r2", ("operator",)), ("a2", ("approver",)), ("b2", ("approver",)))
        r, a, b = [await actor(plane, n) for n in ("r2", "a2", "b2")]
        assert (await plane.policy()).approvals_required == 1
        req = await request_change(plane, a, "policy.set", None, {"settings": {"approvals_required": "2"}})
        await decide_change(plane, b, req.id, True)
        assert (await plane.policy()).approvals_required == 2
        g = await plane.request_grant(r, "acme", "read", "1h", "T-2")
        g = await plane.approve_grant(a, g.id)
        assert g.state == "pending" and len(g.approvals) == 1
        with pytest.raises(InvalidRequest, match="already decided"):
            await plane.approve_grant(a, g.id)
        with pytest.raises(SessionRefused):
            await plane.bind_grant("r2")
        g = await plane.approve_grant(b, g.id)
        assert g.state == "approved" and {x.approver for x in g.approvals} == {"a2", "b2"}
        assert (await plane.bind_grant("r2")).id == g.id
        req = await request_change(plane, b, "policy.set", None, {"settings": {"approvals_required": "1"}})
        await decide_change(plane, a, req.id, True)
    finally:
        await plane.close()


async def test_expiry_of_pending_and_approved_grants(env, plane):
    await add_people(plane, ("r3", ("operator",)), ("a3", ("approver",)))
    r, a = await actor(plane, "r3"), await actor(plane, "a3")
    pending = await plane.request_grant(r, "acme", "read", "1h", "T-3")
    approved = await plane.request_grant(r, "globex", "read", "1h", "T-4")
    await plane.approve_grant(a, approved.id)
    # Move the clock: make the pending request's TTL and the approved grant's end lie in the past.
    async with plane.pool.acquire() as conn:
        await conn.execute(f"UPDATE {plane.s}.grants SET pending_until = now() - interval '1s' WHERE id = $1",
                           pending.id)
        await conn.execute(f"UPDATE {plane.s}.grants SET expires_at = now() - interval '1s' WHERE id = $1",
                           approved.id)
    # Even before the sweep, an elapsed grant cannot be bound or approved.
    with pytest.raises(SessionRefused, match="not active"):
        await plane.bind_grant("r3", approved.id)
    with pytest.raises(InvalidRequest, match="expired unanswered"):
        await plane.approve_grant(a, pending.id)
    await plane.expire_due()
    p, q = await plane.get_grant(pending.id), await plane.get_grant(approved.id)
    assert (p.state, p.end_reason) == ("expired", "unanswered")
    assert (q.state, q.end_reason) == ("expired", "elapsed")
    assert await plane.expire_due() == []  # idempotent


async def test_totp_for_actor_and_connect(plane):
    import time

    await add_people(plane, ("t1", ("operator",)), ("ta", ("approver",)))
    t1 = await actor(plane, "t1")
    secret, uri = await plane.enrol_totp(t1, "t1")
    assert uri.startswith("otpauth://totp/")
    totp = pyotp.TOTP(secret)
    now = time.time()
    code = lambda step: totp.at(now + step * 30)  # noqa: E731 - codes of the previous/current/next step
    # No code, a wrong code: the same error as a wrong password.
    with pytest.raises(AuthenticationFailed, match="wrong password or TOTP code.*--totp"):
        await plane.authenticate_actor("t1", "t1-pw")
    with pytest.raises(AuthenticationFailed, match="wrong password or TOTP code"):
        await plane.authenticate_actor("t1", "t1-pw", "000000" if code(0) != "000000" else "111111")
    t1 = await plane.authenticate_actor("t1", "t1-pw", code(-1))
    assert await plane.verify_totp("t1", code(0))
    assert not await plane.verify_totp("t1", code(0))  # a code works once
    g = await plane.request_grant(t1, "acme", "read", "1h", "T-5")
    await plane.approve_grant(await actor(plane, "ta"), g.id)
    with pytest.raises(SessionRefused, match="password authentication failed") as ei:
        await plane.bind_grant("t1")
    assert ei.value.sqlstate == "28P01"
    with pytest.raises(SessionRefused, match="password authentication failed"):
        await plane.bind_grant("t1", None, "12345x")
    with pytest.raises(SessionRefused, match="password authentication failed"):
        await plane.bind_grant("t1", None, code(-1))  # already used
    assert (await plane.bind_grant("t1", None, code(1))).id == g.id
    # Nobody enrols TOTP for someone else, approvers included (that would show them the secret).
    await add_people(plane, ("t2", ("operator",)))
    with pytest.raises(PermissionDenied):
        await plane.enrol_totp(await actor(plane, "t2"), "t1")
    with pytest.raises(PermissionDenied):
        await plane.enrol_totp(await actor(plane, "ta"), "t1")


async def test_tenants_lifecycle_and_notify(env, plane):
    got: list[str] = []
    listener = await asyncpg.connect(env.dsn)
    await listener.add_listener(plane.channel, lambda *a: got.append(a[3]))
    try:
        t = await plane.register_tenant("initech")
        assert t.status == "active"
        assert (await plane.register_tenant("initech")).created_at == t.created_at  # idempotent
        t = await plane.set_tenant_status("initech", "offboarded")
        assert t.status == "offboarded" and t.retention_end is not None and t.offboarded_at is not None
        t = await plane.set_tenant_status("initech", "active")
        assert t.retention_end is None
        await plane.set_tenant_status("initech", "offboarded")
        t = await plane.set_tenant_status("initech", "purged")
        assert t.status == "purged" and t.purged_at is not None
        with pytest.raises(InvalidRequest, match="purged"):
            await plane.set_tenant_status("initech", "active")
        with pytest.raises(NotFound):
            await plane.set_tenant_status("nope", "offboarded")
        assert "initech" in [x.name for x in await plane.list_tenants()]
        # A purged tenant gets no new grants.
        await add_people(plane, ("tn", ("operator",)))
        with pytest.raises(InvalidRequest, match="purged"):
            await plane.request_grant(await actor(plane, "tn"), "initech", "read", "1h", "x")
        for _ in range(50):
            if len([m for m in got if '"initech"' in m]) >= 5:
                break
            await asyncio.sleep(0.05)
        statuses = [m for m in got if '"tenant"' in m and '"initech"' in m]
        assert len(statuses) == 5 and '"purged"' in statuses[-1]
    finally:
        await listener.close()


async def test_schema_install_is_idempotent_and_private(env, pg):
    from proxy.control.schema import install_control_schema

    conn = await asyncpg.connect(env.dsn)
    try:
        await install_control_schema(conn)  # again, as the owner: no error, nothing lost
        assert await conn.fetchval("SELECT count(*) FROM tenantgate_control.schema_version") == 2  # v1 + v2
        owner = await conn.fetchval(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'tenantgate_control'")
        assert owner == "tg_control_owner"
    finally:
        await conn.close()
    admin = await asyncpg.connect(env.admin_dsn)
    try:
        await admin.execute("DROP ROLE IF EXISTS tg_someone_else")
        await admin.execute("CREATE ROLE tg_someone_else LOGIN PASSWORD 'x'")
    finally:
        await admin.close()
    other = await asyncpg.connect(pg.dsn("tg_someone_else", "x", env.dbname))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await other.fetch("SELECT * FROM tenantgate_control.grants")
    finally:
        await other.close()
