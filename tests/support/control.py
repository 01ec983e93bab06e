"""Shared helpers for the control-plane tests (tests/test_control_*.py).

Each call of :func:`control_env` makes a fresh database in the session's
cluster, installs the control schema owned by a dedicated role
``tg_control_owner`` (not a superuser) and returns its DSNs.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import pyotp

from proxy.config import AuditConfig, GrantsConfig
from proxy.control.audit import new_signing_key_pem
from proxy.control.plane import ControlPlane
from proxy.control.schema import install_control_schema

OWNER = "tg_control_owner"
OWNER_PASSWORD = "control-owner-pw"
SCHEMA = "tenantgate_control"


@dataclass
class ControlEnv:
    dbname: str
    admin_dsn: str  # superuser on the test database
    dsn: str  # the control schema's owner role

    def plane(self, **kw) -> ControlPlane:
        kw.setdefault("grants", GrantsConfig())
        kw.setdefault("audit", AuditConfig())
        return ControlPlane(self.dsn, schema=SCHEMA, **kw)


async def control_env(pg, make_db, prefix: str = "ctl") -> ControlEnv:
    dbname, admin_dsn = make_db(prefix)
    conn = await asyncpg.connect(admin_dsn)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", OWNER)
        if not exists:
            try:
                await conn.execute(f"CREATE ROLE {OWNER} LOGIN PASSWORD '{OWNER_PASSWORD}'")
            except asyncpg.DuplicateObjectError:
                pass
        await conn.execute(f'GRANT CREATE ON DATABASE "{dbname}" TO {OWNER}')
        await install_control_schema(conn, SCHEMA, owner=OWNER)
    finally:
        await conn.close()
    return ControlEnv(dbname, admin_dsn, pg.dsn(OWNER, OWNER_PASSWORD, dbname))


def write_signing_key(tmp_path) -> AuditConfig:
    priv, pub = new_signing_key_pem()
    (tmp_path / "audit.key").write_bytes(priv)
    return AuditConfig(signing_key_file=str(tmp_path / "audit.key"), checkpoint_every=5)


async def add_people(plane: ControlPlane, *people: tuple[str, tuple[str, ...]]) -> None:
    """Accounts with password ``<name>-pw`` (no TOTP).

    While fewer than two approvers exist the platform admin adds them (bootstrap);
    afterwards, as in production, one approver requests the account, another approves
    it and the person enrols with the one-time token (the enrolment's TOTP secret is
    then removed again so that these helper accounts need no codes, and the account
    is dated back beyond the account change window).
    """
    from proxy.control.accounts import decide_change, enrol, request_change
    from proxy.control.model import PermissionDenied

    admin = plane.platform_admin()
    for name, roles in people:
        try:
            await plane.add_operator(admin, name, f"{name}-pw", roles)
            continue
        except PermissionDenied:
            pass
        approvers = [o.name for o in await plane.list_operators()
                     if "approver" in o.roles and o.enabled and not o.totp_enrolled]
        first, second = await actor(plane, approvers[0]), await actor(plane, approvers[1])
        req = await request_change(plane, first, "account.create", name, {"roles": list(roles)}, "test")
        _, token = await decide_change(plane, second, req.id, True)
        await enrol(plane, token, f"{name}-pw")
        async with plane.pool.acquire() as conn:
            # helper accounts log in without TOTP, and count as made long ago (outside the
            # account change window) so that they can approve for the people who made them
            await conn.execute(f'UPDATE "{SCHEMA}".operators SET totp_secret = NULL WHERE name = $1', name)
            await conn.execute(f'UPDATE "{SCHEMA}".account_events SET at = at - interval \'30 days\' '
                               f'WHERE account = $1', name)


async def actor(plane: ControlPlane, name: str, totp_secret: str | None = None):
    code = pyotp.TOTP(totp_secret).now() if totp_secret else None
    return await plane.authenticate_actor(name, f"{name}-pw", code)
