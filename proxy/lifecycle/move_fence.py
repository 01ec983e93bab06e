"""The fence of a tenant move: once the placement is flipped, the source refuses every write of the moved
tenant (SQLSTATE 40001, "retry"), so a statement an instance still routes to the source before it has heard
of the flip fails instead of being lost by the source's purge.

Triggers on the source's tenant tables (``tg_move_fence_<move>_new`` / ``_old``, for the tenant's rows only)
are installed before the cutover's hold and stay inactive until a row in ``<journal schema>.move_fences``
raises the fence, under the hold: no DDL, so no table lock, while the tenant is held.  The purge of the
source passes with ``tenantgate.move_unfence`` set to the tenant on its own connection.
"""

from __future__ import annotations

import asyncio

from proxy.lifecycle.tables import LifecycleError, TenantSchema, quote_literal
from proxy.policy.names import quote_ident

LOCK_WAIT_MS = 500  # one wait for a tenant table's lock (other tenants' writes queue behind it meanwhile)
ATTEMPTS = 10


class Fence:
    def __init__(self, conn, schema: TenantSchema, tenant: str, move_id: int, journal_schema: str):
        self.conn = conn
        self.schema = schema
        self.tenant = tenant
        self.move_id = move_id
        self.journal_schema = journal_schema

    def names(self) -> tuple[str, str]:
        return f"tg_move_fence_{self.move_id}_new", f"tg_move_fence_{self.move_id}_old"

    async def install(self) -> None:
        """Before the hold: the fence's triggers on the source's tenant tables, inactive until
        :meth:`raise_` (no DDL, so no table lock, under the hold).  They fire for the tenant's rows only."""
        js = quote_ident(self.journal_schema)
        lit = quote_literal(self.tenant)
        await self.conn.execute(f"""
            CREATE SCHEMA IF NOT EXISTS {js};
            CREATE TABLE IF NOT EXISTS {js}.move_fences (tenant text PRIMARY KEY, move_id bigint NOT NULL);
            CREATE OR REPLACE FUNCTION {js}.move_fence() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
            SET search_path = pg_catalog, pg_temp AS $fence$
            BEGIN
                IF EXISTS (SELECT 1 FROM {js}.move_fences WHERE tenant = TG_ARGV[0])
                   AND current_setting('tenantgate.move_unfence', true) IS DISTINCT FROM TG_ARGV[0] THEN
                    RAISE EXCEPTION 'tenant % was moved to another server: this write was not made', TG_ARGV[0]
                        USING ERRCODE = '40001', HINT = 'retry the transaction: it runs on the tenant''s new server';
                END IF;
                RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
            END $fence$;
            REVOKE ALL ON FUNCTION {js}.move_fence() FROM PUBLIC""")
        new, old = self.names()
        for _, t in sorted(self.schema.tables.items()):
            col = quote_ident(t.tenant_column)
            for name, when, ops in ((new, "NEW", "INSERT OR UPDATE"), (old, "OLD", "UPDATE OR DELETE")):
                exists = await self.conn.fetchval("SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = $1::regclass "
                                                 "AND tgname = $2)", t.qualified, name)
                if not exists:
                    await self._ddl(
                        f"CREATE TRIGGER {quote_ident(name)} BEFORE {ops} ON {t.qualified} FOR EACH ROW "
                        f"WHEN ({when}.{col} = CAST({lit} AS {t.tenant_type})) "
                        f"EXECUTE FUNCTION {js}.move_fence({lit})")

    async def _ddl(self, sql: str) -> None:
        """DDL on a table every tenant writes to: it waits for their open transactions, and writers queue
        behind it meanwhile, so it may wait at most LOCK_WAIT_MS at a time (then retried a few times)."""
        for attempt in range(ATTEMPTS):
            try:
                async with self.conn.transaction():
                    await self.conn.execute(f"SET LOCAL lock_timeout = {LOCK_WAIT_MS}")
                    await self.conn.execute(sql)
                return
            except Exception as e:
                if getattr(e, "sqlstate", None) != "55P03" or attempt == ATTEMPTS - 1:
                    raise LifecycleError(
                        "55P03", "the move's fence could not be changed on the source: its tables stay locked by "
                        "long transactions", detail=str(e), hint="the move stays where it was; --resume (or --abort) "
                        "tries again") from e
                await asyncio.sleep(0.2 * (attempt + 1))

    async def raise_(self) -> None:
        """Under the hold, before the flip: the fence is up: the source refuses every write of the tenant
        (40001, "retry"), so a statement an instance still routes to the source before it has heard of the
        flip fails instead of being lost by the source's purge; its retry runs on the target."""
        js = quote_ident(self.journal_schema)
        await self.conn.execute(f"INSERT INTO {js}.move_fences VALUES ($1, $2) ON CONFLICT (tenant) DO NOTHING",
                               self.tenant, self.move_id)

    async def lower(self, *, drop_triggers: bool = True) -> None:
        """The fence is down (and, with ``drop_triggers``, its triggers are gone: DDL, so not under the hold)."""
        js = quote_ident(self.journal_schema)
        if await self.conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{js}.move_fences"):
            await self.conn.execute(f"DELETE FROM {js}.move_fences WHERE tenant = $1", self.tenant)
        if not drop_triggers:
            return
        for _, t in sorted(self.schema.tables.items()):
            for name in self.names():
                await self._ddl(f"DROP TRIGGER IF EXISTS {quote_ident(name)} ON {t.qualified}")
