"""Which tenants exist: the control plane's registry plus the tenant values found in the data.

A fresh deployment has an empty registry (``tenantgate_control.tenants``) but
tenant tables full of rows.  A tenant is *known* when it is registered or
when at least one tenant table holds a row of it (*discovered*).  Then:

* ``tenantgate tenant list`` shows both, marked ``registered`` or ``discovered``;
* ``grant request`` for a tenant that is neither is refused (42704); for a
  discovered one it registers the tenant first, in the same transaction and
  audit chain as the request (:meth:`ControlPlane.request_grant`);
* ``tenant offboard/export/import/purge`` of a discovered tenant register it
  first (audited, ``event: registered, source: discovered``).

Tenant *sessions* do not register their tenant: that would put a control-plane
write on the connect path of every tenant session, and a tenant with rows is
discovered anyway (a tenant with no rows has nothing to export or purge).

The data is read over ``lifecycle.data_dsn`` (else the backend settings), the
same role as export and purge; it must see every row (BYPASSRLS, or
tenantgate's own policies, see :func:`proxy.lifecycle.tables.scope_session`).
When it cannot, discovery answers "unknown" and only registered tenants count.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from proxy.config import Config, ConfigError
from proxy.control.model import InvalidRequest, NotFound
from proxy.lifecycle.tables import LifecycleError, TenantSchema, discover, scope_session
from proxy.policy.names import quote_ident

DISCOVERY_LIMIT = 10_000  # tenant values listed by `tenant list` at most


def data_dsn(cfg: Config) -> str:
    """The lifecycle role's DSN: ``lifecycle.data_dsn``, else one built from ``backend``."""
    dsn = cfg.lifecycle.resolved_data_dsn()
    if dsn:
        return dsn
    if not cfg.backend.database:
        raise ConfigError("lifecycle.data_dsn (or backend.database) must be set for tenant export/import/purge")
    return cfg.backend.url()  # with sslrootcert: a verify-full backend must verify here too


async def tenant_schema(cfg: Config, conn) -> TenantSchema:
    """Tenant tables as the proxy sees them (rules file), else tenant_id in public."""
    if cfg.rules_file:
        from proxy.policy.rules import load_rules

        rules = load_rules(cfg.rules_file)
        tables = None if rules.discover else sorted(rules.tenant_table_keys)
        return await discover(conn, rules.tenant_column, rules.schemas, tables)
    return await discover(conn, "tenant_id", ["public"])


@asynccontextmanager
async def data_connection(cfg: Config):
    import asyncpg

    conn = await asyncpg.connect(data_dsn(cfg), server_settings={"application_name": "tenantgate-lifecycle"})
    try:
        yield conn
    finally:
        await conn.close()


async def tenant_values(conn, schema: TenantSchema, limit: int = DISCOVERY_LIMIT) -> list[str] | None:
    """The distinct tenant values in the tenant tables (as text), or None when this role cannot see every row."""
    if not schema.tables:
        return []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        if not await conn.fetchval("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user"):
            return None  # row-level security would hide tenants: listing them needs the bypass
        await conn.execute("SET LOCAL row_security = off")  # an error rather than a silently partial list
        union = " UNION ".join(
            f"SELECT DISTINCT {quote_ident(t.tenant_column)}::text AS v FROM {t.qualified}"
            for _, t in sorted(schema.tables.items()))
        rows = await conn.fetch(f"SELECT v FROM ({union}) x WHERE v IS NOT NULL ORDER BY v LIMIT $1", limit)
    return [r["v"] for r in rows]


async def tenant_in_data(conn, schema: TenantSchema, name: str) -> bool | None:
    """Whether any tenant table holds a row of ``name``; None when this role cannot tell."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        try:
            await scope_session(conn, schema, name, local=True)
        except LifecycleError:
            return None
        for _, t in sorted(schema.tables.items()):
            try:
                async with conn.transaction():  # a savepoint: a value that does not cast is simply absent
                    if await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {t.qualified} WHERE {t.tenant_predicate(name)})"):
                        return True
            except Exception as e:
                if getattr(e, "sqlstate", "") in ("22P02", "22003", "22007", "22008", "22023"):
                    continue
                raise
    return False


def data_probe(cfg: Config):
    """``async probe(name) -> bool | None`` over the config's data role (None: cannot tell).

    Without a data DSN (no ``lifecycle.data_dsn`` and no ``backend.database``) the probe always
    answers None: only registered tenants are known (fail closed)."""
    try:
        data_dsn(cfg)
    except ConfigError:
        async def unknown(name: str) -> None:
            return None

        return unknown

    async def probe(name: str) -> bool | None:
        async with data_connection(cfg) as conn:
            schema = await tenant_schema(cfg, conn)
            return await tenant_in_data(conn, schema, name)

    return probe


def unknown_tenant_message(name: str, checked: bool | None = True) -> tuple[str, str]:
    """(message, hint) for a tenant neither registered nor found; ``checked=None``: the data could not be read."""
    why = ("no tenant table holds a row of it" if checked is not None else
           "its rows cannot be looked up (no lifecycle.data_dsn, or that role cannot see every row)")
    return (f'tenant "{name}" is not known: it is not registered and {why}',
            f"check the name (tenantgate tenant list); a tenant with no rows yet is registered by an approver: "
            f"tenantgate tenant register {name}")


async def probe_unregistered(plane, name: str) -> bool | None:
    """Before a grant request's transaction: is an unregistered tenant in the data?  (None: registered,
    no probe, or cannot tell.)  Read outside the control transaction: the data may be another database."""
    if plane.tenant_probe is None or await plane.get_tenant(name) is not None:
        return None
    return await plane.tenant_probe(name)


async def admit_grant_tenant(plane, conn, name: str, access: str, actor, in_data: bool | None) -> None:
    """Inside the grant request's transaction: refuse a purged tenant (but for write: import --reactivate)
    and, when the plane has a data probe, an unknown one; register a discovered one (audited, same transaction).
    A plane made without ``from_config`` (library use, unit tests) has no probe and checks only purged."""
    t = await conn.fetchrow(f"SELECT status FROM {plane.s}.tenants WHERE name = $1", name)
    if t is not None and t["status"] == "purged" and access != "write":
        raise InvalidRequest(f"tenant {name!r} has been purged: there is nothing to read "
                             f"(a write grant lets you import its export back: tenantgate tenant import --reactivate)")
    if t is None and plane.tenant_probe is not None:
        if not in_data:
            msg, hint = unknown_tenant_message(name, in_data)
            raise NotFound(f"{msg}. {hint}")
        await plane._register_in_tx(conn, name, actor, source="discovered")
