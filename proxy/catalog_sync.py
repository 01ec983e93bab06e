"""The catalog snapshot kept current: loaded from PostgreSQL with asyncpg, refreshed periodically,
on the bootstrap's DDL notifications (LISTEN), on demand (an unknown relation) and on SIGHUP.

The snapshot itself and its classification are pure: :mod:`proxy.policy.catalog`.

Public API (stable)::

    mgr = await CatalogManager.from_dsn(dsn, rules)            # loads once with asyncpg
    mgr = CatalogManager.from_snapshot(snap)                   # fixed, for unit tests
    mgr.snapshot; mgr.version; await mgr.refresh(reason); mgr.request_refresh()
    await mgr.refresh_after(t0); mgr.start_listening(dsn)
    mgr.start_periodic(); mgr.install_sighup(); await mgr.close()
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import signal
from typing import Awaitable, Callable

import asyncpg

from proxy.metrics import CATALOG_REFRESHES_TOTAL
from proxy.policy import backstop_state as BS
from proxy.policy.catalog import CatalogSnapshot, RelationRow, backstop_required
from proxy.policy.rules import Rules

log = logging.getLogger(__name__)


CATALOG_QUERY = """
SELECT n.nspname AS schema, c.relname AS name, c.relkind::text AS kind,
       coalesce(array_agg(a.attname::text ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{}') AS colnames,
       coalesce(array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{}')
         AS coltypes,
       coalesce(array_agg(a.attnotnull ORDER BY a.attnum) FILTER (WHERE a.attnum > 0), '{}') AS colnotnull
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_attribute a
       ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
      AND (n.nspname = ANY($1::text[]) OR n.nspname = 'tenantgate_copy')
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND (n.nspname = ANY($1::text[]) OR n.nspname IN ('pg_catalog', 'information_schema', 'tenantgate_copy'))
GROUP BY n.nspname, c.relname, c.relkind
"""


#: function names an unqualified call or an attribute (x.name) may resolve to something other than a
#: built-in: functions in the schemas of the search path that do not duplicate a pg_catalog function's
#: signature (pg_catalog comes first, so the built-in wins those); runs_sql: one of them is written in
#: a language that can run SQL (not C or internal)
USER_FUNCTIONS_QUERY = """
SELECT p.proname::text AS name,
       bool_or(CASE WHEN p.prokind = 'a' THEN EXISTS (  -- an aggregate runs its support functions
                 SELECT 1 FROM pg_catalog.pg_aggregate a
                 JOIN pg_catalog.pg_proc s ON s.oid IN (a.aggtransfn, a.aggfinalfn, a.aggcombinefn, a.aggserialfn,
                                                       a.aggdeserialfn, a.aggmtransfn, a.aggminvtransfn, a.aggmfinalfn)
                 JOIN pg_catalog.pg_language sl ON sl.oid = s.prolang
                 WHERE a.aggfnoid = p.oid AND sl.lanname NOT IN ('c', 'internal'))
               ELSE l.lanname NOT IN ('c', 'internal') END) AS runs_sql
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
JOIN pg_catalog.pg_language l ON l.oid = p.prolang
WHERE n.nspname = ANY($1::text[])
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_proc b
                  WHERE b.pronamespace = 'pg_catalog'::regnamespace AND b.proname = p.proname
                    AND b.proargtypes = p.proargtypes)
GROUP BY p.proname
"""

#: operators (on the search path) and casts that call a function outside pg_catalog written in a
#: language that can run SQL: PostgreSQL calls it where a statement writes the operator or the
#: cast, and for implicit casts and comparison operators where it writes neither; a cast's rows
#: name its target type and every domain over it; operator classes (btree, hash, ...) whose
#: support functions or operators run SQL are used by ORDER BY, GROUP BY, DISTINCT, joins, ...
HIDDEN_CALLS_QUERY = """
WITH RECURSIVE sqlfn AS (
  SELECT p.oid, fn.nspname || '.' || p.proname AS func
  FROM pg_catalog.pg_proc p
  JOIN pg_catalog.pg_namespace fn ON fn.oid = p.pronamespace
  JOIN pg_catalog.pg_language l ON l.oid = p.prolang
  WHERE fn.nspname NOT IN ('pg_catalog', 'information_schema') AND l.lanname NOT IN ('c', 'internal')
), cast_targets AS (
  SELECT c.casttarget AS target, c.casttarget AS named, f.func, c.castcontext::text AS context
  FROM pg_catalog.pg_cast c JOIN sqlfn f ON f.oid = c.castfunc
  UNION
  SELECT ct.target, d.oid, ct.func, ct.context
  FROM cast_targets ct JOIN pg_catalog.pg_type d ON d.typtype = 'd' AND d.typbasetype = ct.named
)
SELECT 'cast' AS kind, t.typname::text AS name, ct.func, ct.context
FROM cast_targets ct JOIN pg_catalog.pg_type t ON t.oid = ct.named
UNION ALL
SELECT 'opclass', opf.opfname::text, f.func, 'i'
FROM pg_catalog.pg_amproc ap JOIN pg_catalog.pg_opfamily opf ON opf.oid = ap.amprocfamily
JOIN sqlfn f ON f.oid = ap.amproc
UNION ALL
SELECT 'opclass', opf.opfname::text, f.func, 'i'
FROM pg_catalog.pg_amop ao JOIN pg_catalog.pg_opfamily opf ON opf.oid = ao.amopfamily
JOIN pg_catalog.pg_operator o ON o.oid = ao.amopopr JOIN sqlfn f ON f.oid = o.oprcode
UNION ALL
SELECT 'operator', o.oprname::text, f.func, ''
FROM pg_catalog.pg_operator o
JOIN pg_catalog.pg_namespace opn ON opn.oid = o.oprnamespace
JOIN sqlfn f ON f.oid = o.oprcode
WHERE opn.nspname = ANY($1::text[])
"""


BACKSTOP_TABLES_QUERY = """
SELECT c.oid, n.nspname AS schema, c.relname AS name
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname = ANY($1::text[])
"""


async def load_backstop_state(conn, rules: Rules) -> dict[tuple[str, str], str | None]:
    """(schema, table) -> None if the table carries the backstop, else why not (as the backend role)."""
    tables = await conn.fetch(BACKSTOP_TABLES_QUERY, list(rules.schemas))
    rows = {r["oid"]: r for r in await conn.fetch(BS.POLICY_SQL, [t["oid"] for t in tables])}
    out: dict[tuple[str, str], str | None] = {}
    for t in tables:
        r = rows.get(t["oid"])
        if r is None:
            continue
        out[(t["schema"], t["name"])] = BS.judge(rules.tenant_column, r["rls"], r["forced"], r["owned"],
                                                 BS.policies_from_json(json.loads(r["policies"])))
    return out


async def load_snapshot(dsn: str, rules: Rules, *, backstop_key_configured: bool = False) -> CatalogSnapshot:
    """Read the catalog with asyncpg and classify every relation (and, when the backstop is
    required, read every table's row-level security state)."""
    conn = await asyncpg.connect(dsn, server_settings={"application_name": "tenantgate: catalog"})
    try:
        records = await conn.fetch(CATALOG_QUERY, list(rules.schemas))
        functions = await conn.fetch(USER_FUNCTIONS_QUERY, list(rules.schemas))
        hidden_calls = [tuple(r) for r in await conn.fetch(HIDDEN_CALLS_QUERY, list(rules.schemas))]
        state = await load_backstop_state(conn, rules) if backstop_required(rules, backstop_key_configured) else None
    finally:
        await conn.close()
    rows = [
        RelationRow(r["schema"], r["name"], r["kind"], tuple(zip(r["colnames"], r["coltypes"], r["colnotnull"])))
        for r in records
    ]
    return CatalogSnapshot.build(rules, rows, backstop=state, user_functions=[r["name"] for r in functions],
                                 sql_functions=[r["name"] for r in functions if r["runs_sql"]],
                                 hidden_calls=hidden_calls)


#: a refresh that failed because the server could not be reached (down, restarting, shutting down)
_UNREACHABLE = (OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
                asyncpg.ConnectionDoesNotExistError, asyncpg.AdminShutdownError)

#: the channel deploy/postgres/bootstrap.sql's DDL event trigger notifies
CATALOG_CHANNEL = "tenantgate_catalog"


class CatalogManager:
    """Holds the current :class:`CatalogSnapshot` and refreshes it."""

    def __init__(
        self,
        snapshot: CatalogSnapshot,
        loader: Callable[[], Awaitable[CatalogSnapshot]] | None = None,
        *,
        refresh_interval_s: float = 60.0,
        min_on_demand_interval_s: float = 1.0,
    ):
        self._snapshot = snapshot
        self._loader = loader
        self.refresh_interval_s = refresh_interval_s
        self.min_on_demand_interval_s = min_on_demand_interval_s
        self._periodic: asyncio.Task | None = None
        self._pending: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._last_refresh = 0.0
        self._listeners: list[Callable[[CatalogSnapshot], None]] = []
        self._sync: asyncio.Task | None = None  # the load refresh_after() callers share
        self._sync_started = float("-inf")
        self._loaded_at = float("-inf")  # loop time the current snapshot's load began
        self._listener: asyncio.Task | None = None  # LISTEN tenantgate_catalog (start_listening)
        self.min_sync_interval_s = 0.2

    @classmethod
    async def from_dsn(cls, dsn: str, rules: Rules, *, refresh_interval_s: float | None = None,
                       backstop_key_configured: bool = False) -> "CatalogManager":
        async def loader() -> CatalogSnapshot:
            return await load_snapshot(dsn, rules, backstop_key_configured=backstop_key_configured)

        snap = await loader()
        mgr = cls(snap, loader, refresh_interval_s=refresh_interval_s or rules.catalog_refresh_s)
        mgr._dsn, mgr._backstop_key_configured = dsn, backstop_key_configured
        mgr._last_refresh = asyncio.get_running_loop().time()
        return mgr

    @classmethod
    def from_snapshot(cls, snapshot: CatalogSnapshot) -> "CatalogManager":
        return cls(snapshot, None)

    @property
    def snapshot(self) -> CatalogSnapshot:
        return self._snapshot

    @property
    def version(self) -> int:
        return self._snapshot.version

    def on_change(self, callback: Callable[[CatalogSnapshot], None]) -> None:
        self._listeners.append(callback)

    async def refresh(self, reason: str = "manual") -> CatalogSnapshot:
        """Reload now.  On failure the old snapshot stays (and the error is logged and re-raised)."""
        if self._loader is None:
            return self._snapshot
        async with self._lock:
            started = asyncio.get_running_loop().time()
            snap = await self._loader()
            old = self._snapshot
            if snap.relations == old.relations and snap.functions_key() == old.functions_key():
                snap = dataclasses.replace(snap, version=old.version)
            self._snapshot = snap
            self._last_refresh = asyncio.get_running_loop().time()
            self._loaded_at = started  # the snapshot reflects the catalog as of this time
            CATALOG_REFRESHES_TOTAL.labels(reason=reason).inc()
        if snap.version != old.version:
            for cb in self._listeners:
                cb(snap)
        for p in snap.problems:
            log.warning("catalog: %s", p)
        return snap

    async def refresh_after(self, t0: float, reason: str = "unknown_relation") -> None:
        """Return once a snapshot loaded after loop time ``t0`` is in force (a statement that
        named a relation the snapshot lacks waits for this before it is refused: the table may
        have been created since).  Single-flight: concurrent callers share one load; loads start
        at most every ``min_sync_interval_s``."""
        if self._loader is None:
            return
        loop = asyncio.get_running_loop()
        while self._loaded_at < t0:
            task = self._sync
            if task is None or task.done() or self._sync_started < t0:
                if task is not None and not task.done():
                    await asyncio.shield(task)  # started before t0: may not see the new table
                    continue
                wait = self._sync_started + self.min_sync_interval_s - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                    if self._loaded_at >= t0 or (self._sync is not None and not self._sync.done()):
                        continue
                self._sync_started = loop.time()
                task = self._sync = loop.create_task(self.refresh(reason))
            await asyncio.shield(task)  # raises if the load failed: the caller refuses

    async def replace_rules(self, rules: Rules) -> CatalogSnapshot:
        """Classify the catalog under new rules (a reload): load with them, then keep loading with
        them.  On failure the old loader and snapshot stay (the error is raised)."""
        if self._loader is None or getattr(self, "_dsn", None) is None:
            return self._snapshot
        dsn, key = self._dsn, self._backstop_key_configured

        async def loader() -> CatalogSnapshot:
            return await load_snapshot(dsn, rules, backstop_key_configured=key)

        old_loader = self._loader
        self._loader = loader
        try:
            return await self.refresh("rules")
        except BaseException:
            self._loader = old_loader
            raise

    def request_refresh(self, reason: str = "unknown_relation") -> None:
        """Schedule a refresh soon (rate-limited; no-op without a running loop)."""
        if self._loader is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._pending is not None and not self._pending.done():
            return
        delay = max(0.0, self._last_refresh + self.min_on_demand_interval_s - loop.time())

        async def run() -> None:
            if delay:
                await asyncio.sleep(delay)
            await self._refresh_logged(reason)

        self._pending = loop.create_task(run())

    async def _refresh_logged(self, reason: str) -> None:
        """:meth:`refresh`, its failure logged (the old snapshot stays in force)."""
        try:
            await self.refresh(reason)
        except _UNREACHABLE as e:  # the server is down or restarting: expected, no traceback
            log.warning("catalog refresh (%s) failed: %s (the old snapshot stays in force)", reason,
                        e or type(e).__name__)
        except Exception:
            log.exception("catalog refresh (%s) failed", reason)

    def start_listening(self, dsn: str) -> None:
        """LISTEN on the backend for the bootstrap's DDL event trigger (channel
        :data:`CATALOG_CHANNEL`) and refresh on each notification; reconnects with backoff."""
        if self._loader is None or self._listener is not None:
            return

        async def run() -> None:
            backoff = 1.0
            while True:
                lost = asyncio.Event()
                try:
                    conn = await asyncpg.connect(dsn, server_settings={"application_name": "tenantgate: catalog"})
                except Exception as e:
                    log.warning("catalog: cannot LISTEN for DDL notifications (%s); retrying", e)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                backoff = 1.0
                try:
                    conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                    await conn.add_listener(CATALOG_CHANNEL, lambda *_a: self.request_refresh("ddl"))
                    self.request_refresh("ddl")  # whatever changed while not listening
                    await lost.wait()
                finally:
                    if not conn.is_closed():
                        await conn.close()

        self._listener = asyncio.get_running_loop().create_task(run())

    def start_periodic(self) -> None:
        if self._loader is None or self._periodic is not None:
            return

        async def loop_() -> None:
            while True:
                await asyncio.sleep(self.refresh_interval_s)
                await self._refresh_logged("periodic")

        self._periodic = asyncio.get_running_loop().create_task(loop_())

    def install_sighup(self) -> None:
        """Refresh on SIGHUP (adds a handler; other SIGHUP handlers should call request_refresh too)."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, lambda: self.request_refresh("sighup"))

    async def close(self) -> None:
        for t in (self._periodic, self._pending, self._sync, self._listener):
            if t is not None and not t.done():
                t.cancel()
                try:
                    await t
                except (asyncio.CancelledError, Exception):
                    pass
        self._periodic = self._pending = self._sync = self._listener = None
