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
    admin = plane.platform_admin()
    for name, roles in people:
        await plane.add_operator(admin, name, f"{name}-pw", roles)


async def actor(plane: ControlPlane, name: str, totp_secret: str | None = None):
    code = pyotp.TOTP(totp_secret).now() if totp_secret else None
    return await plane.authenticate_actor(name, f"{name}-pw", code)
