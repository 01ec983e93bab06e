"""Installing the control schema (``schema.sql``) into a PostgreSQL database.

``await install_control_schema(conn, schema="tenantgate_control", owner=None)``
is idempotent.  Run it as the role that is to own the schema (or as a
superuser with ``owner=`` naming that role: everything is then created under
``SET ROLE owner``).  The owner must be a role that tenant and operator
sessions never use; the proxy's backend role gets no privilege on it.
"""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg

SCHEMA_SQL = Path(__file__).with_name("schema.sql")
SCHEMA_VERSION = 1
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def check_schema_name(schema: str) -> str:
    """Return ``schema`` if it is a plain lower-case identifier, else raise ValueError."""
    if not _IDENT.match(schema):
        raise ValueError(f"control schema name {schema!r} must be a lower-case identifier ([a-z_][a-z0-9_]*)")
    return schema


def notify_channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel on which grant and tenant changes are announced."""
    return f"{check_schema_name(schema)}_events"


def render_schema_sql(schema: str = "tenantgate_control") -> str:
    check_schema_name(schema)
    return SCHEMA_SQL.read_text().replace("@schema@", f'"{schema}"').replace("@channel@", notify_channel(schema))


async def install_control_schema(
    conn: asyncpg.Connection, schema: str = "tenantgate_control", *, owner: str | None = None
) -> None:
    """Create or update the control schema (idempotent, one transaction)."""
    sql = render_schema_sql(schema)
    async with conn.transaction():
        # Serialise concurrent installers (two instances starting at once).
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"tenantgate-install:{schema}")
        if owner is not None:
            await conn.execute(f'SET LOCAL ROLE "{owner.replace(chr(34), chr(34) * 2)}"')
        if await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema):
            # made by deploy/postgres/bootstrap.sql: the owner need not have CREATE on the database
            sql = sql.replace(f'CREATE SCHEMA IF NOT EXISTS "{schema}";', "", 1)
        await conn.execute(sql)


async def control_schema_installed(conn: asyncpg.Connection, schema: str = "tenantgate_control") -> bool:
    check_schema_name(schema)
    return await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f'"{schema}".audit_head')
