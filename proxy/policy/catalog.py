"""What relations exist, and which of them hold tenant data.

:class:`CatalogSnapshot` is an immutable picture of the relations the policy
engine may resolve names to: every table/view in the rules' schemas plus the
system catalogs (pg_catalog, information_schema).  Each relation is classified:

* ``tenant``  — tenant-scoped: listed in ``tenant_tables``, or (with
  ``discover: true``) a table in the configured schemas that has the tenant
  column, or a ``safe_views`` view that has the tenant column;
* ``shared``  — listed in ``shared_tables`` (or a safe view without the tenant
  column): readable, never writable by tenants;
* ``system``  — in pg_catalog / information_schema (the function/catalog
  allowlist decides further);
* ``denied``  — everything else (undeclared views, sequences, foreign tables,
  misconfigured tables): refused.

A name that resolves to nothing is refused too (and triggers a refresh).

:class:`CatalogManager` holds the current snapshot and refreshes it
periodically, on demand (:meth:`CatalogManager.request_refresh`, e.g. when a
statement named an unknown relation) and on SIGHUP.

Public API (stable)::

    snap = CatalogSnapshot.build(rules, rows, version=1)      # rows: see RelationRow
    mgr = await CatalogManager.from_dsn(dsn, rules)            # loads once with asyncpg
    mgr = CatalogManager.from_snapshot(snap)                   # fixed, for unit tests
    mgr.snapshot; mgr.version; await mgr.refresh(reason); mgr.request_refresh()
    mgr.start_periodic(); mgr.install_sighup(); await mgr.close()
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable, Literal

from proxy.policy.rules import Rules

log = logging.getLogger(__name__)

SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")
# The bootstrap's views for COPY FROM under row-level security (deploy/postgres/bootstrap.sql,
# section 5): view "<schema>.<table>" in this schema.  They are loaded so the COPY rewrite knows
# which exist, but always classified ``denied``: client SQL can never name them.
COPY_VIEW_SCHEMA = "tenantgate_copy"
Classification = Literal["tenant", "shared", "system", "denied"]


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    not_null: bool = False


@dataclass(frozen=True)
class Relation:
    schema: str
    name: str
    kind: str  # pg_class.relkind: r table, p partitioned, v view, m matview, f foreign
    columns: tuple[Column, ...]
    classification: Classification
    reason: str = ""  # why denied, for error messages

    @property
    def tenant_scoped(self) -> bool:
        return self.classification == "tenant"

    @property
    def shared(self) -> bool:
        return self.classification == "shared"

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    def has_column(self, name: str) -> bool:
        return any(c.name == name for c in self.columns)

    def column_not_null(self, name: str) -> bool:
        return any(c.name == name and c.not_null for c in self.columns)


@dataclass(frozen=True)
class RelationRow:
    """One row of the catalog query (also what tests feed to :meth:`CatalogSnapshot.build`)."""

    schema: str
    name: str
    kind: str
    columns: tuple[tuple, ...] = ()  # (name, type) or (name, type, not_null)


_versions = itertools.count(1)


@dataclass(frozen=True)
class CatalogSnapshot:
    relations: dict[tuple[str, str], Relation]
    search_path: tuple[str, ...]  # without the implicit pg_catalog
    version: int
    problems: tuple[str, ...] = field(default=())

    @classmethod
    def build(cls, rules: Rules, rows: Iterable[RelationRow], version: int | None = None,
              backstop: dict[tuple[str, str], str | None] | None = None) -> "CatalogSnapshot":
        """``backstop``: when given, the backstop is required: (schema, table) -> None if the tenant
        table carries it, else why not (proxy/policy/backstop_state.py).  A tenant table without it
        is denied unless the rules' ``backstop_off`` names it with a reason."""
        tenant_keys = rules.tenant_table_keys
        shared_keys = rules.shared_table_keys
        view_keys = rules.safe_view_keys
        schemas = set(rules.schemas)
        col = rules.tenant_column
        rels: dict[tuple[str, str], Relation] = {}
        problems: list[str] = []
        seen: set[tuple[str, str]] = set()
        for row in rows:
            key = (row.schema, row.name)
            seen.add(key)
            cols = tuple(Column(*c) for c in row.columns)
            has_tc = any(c.name == col for c in cols)
            reason = ""
            if row.schema == COPY_VIEW_SCHEMA:
                cls_: Classification = "denied"
                reason = "internal to tenantgate (COPY FROM views)"
            elif row.schema in SYSTEM_SCHEMAS:
                cls_ = "system"
            elif row.schema not in schemas:
                cls_, reason = "denied", f"schema {row.schema} is not in the rules' schemas"
            elif key in shared_keys:
                cls_ = "shared"
            elif key in tenant_keys:
                if has_tc:
                    cls_ = "tenant"
                else:
                    cls_, reason = "denied", f"listed as tenant-scoped but has no column {col}"
                    problems.append(f"{row.schema}.{row.name}: {reason}")
            elif row.kind in ("v", "m"):
                if key in view_keys:
                    cls_ = "tenant" if has_tc else "shared"
                elif row.kind == "m" and has_tc and rules.discover:
                    cls_ = "tenant"
                else:
                    cls_, reason = "denied", "views run their SQL unrewritten; declare it in safe_views"
            elif row.kind in ("r", "p") and has_tc and rules.discover:
                cls_ = "tenant"
            elif row.kind == "f":
                cls_, reason = "denied", "foreign tables are not allowed unless listed"
            else:
                cls_, reason = "denied", "neither tenant-scoped nor shared in the rules"
            if cls_ == "tenant" and backstop is not None and row.kind in ("r", "p") \
                    and key not in rules.backstop_off_keys:
                why = backstop.get(key, "its row-level security state could not be read")
                if why is not None:
                    cls_ = "denied"
                    reason = (f"the PostgreSQL backstop is not in place on this tenant table ({why}); rerun "
                              "deploy/postgres/bootstrap.sql, or declare it in the rules' backstop_off with a reason")
                    problems.append(f"{row.schema}.{row.name}: {reason}")
            rels[key] = Relation(row.schema, row.name, row.kind, cols, cls_, reason)
        for key in sorted((tenant_keys | shared_keys | view_keys) - seen):
            problems.append(f"{key[0]}.{key[1]}: listed in the rules but does not exist")
        return cls(rels, tuple(rules.schemas), version if version is not None else next(_versions), tuple(problems))

    def get(self, schema: str, name: str) -> Relation | None:
        return self.relations.get((schema, name))

    def resolve(self, schema: str | None, name: str) -> Relation | None:
        """Resolve an already case-folded name as PostgreSQL would with our fixed search_path."""
        if schema is not None:
            return self.relations.get((schema, name))
        for s in ("pg_catalog", *self.search_path):
            rel = self.relations.get((s, name))
            if rel is not None:
                return rel
        return None

    def copy_view(self, rel: Relation, tenant_column: str) -> Relation | None:
        """The bootstrap's COPY FROM view for tenant table ``rel``, if it exists and fits.

        It must be a view with the table's tenant column, and only columns of the table; a name
        longer than PostgreSQL's identifier limit (which the bootstrap would have truncated,
        perhaps onto another table's view) is never used."""
        name = f"{rel.schema}.{rel.name}"
        if len(name.encode("utf-8")) > 63:
            return None
        view = self.relations.get((COPY_VIEW_SCHEMA, name))
        if view is None or view.kind != "v" or not view.columns:
            return None
        table_cols = {c.name: c.type for c in rel.columns}
        if any(table_cols.get(c.name) != c.type for c in view.columns):
            return None
        if not view.has_column(tenant_column):
            return None
        return view

    def tenant_relations(self) -> list[Relation]:
        return [r for r in self.relations.values() if r.tenant_scoped]


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


BACKSTOP_TABLES_QUERY = """
SELECT c.oid, n.nspname AS schema, c.relname AS name
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname = ANY($1::text[])
"""


def backstop_required(rules: Rules, key_configured: bool) -> bool:
    return rules.backstop == "required" or (rules.backstop == "auto" and key_configured)


async def load_backstop_state(conn, rules: Rules) -> dict[tuple[str, str], str | None]:
    """(schema, table) -> None if the table carries the backstop, else why not (as the backend role)."""
    import json

    from proxy.policy import backstop_state as BS

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
    import asyncpg

    conn = await asyncpg.connect(dsn, server_settings={"application_name": "tenantgate: catalog"})
    try:
        records = await conn.fetch(CATALOG_QUERY, list(rules.schemas))
        state = await load_backstop_state(conn, rules) if backstop_required(rules, backstop_key_configured) else None
    finally:
        await conn.close()
    rows = [
        RelationRow(r["schema"], r["name"], r["kind"], tuple(zip(r["colnames"], r["coltypes"], r["colnotnull"])))
        for r in records
    ]
    return CatalogSnapshot.build(rules, rows, backstop=state)


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
        from proxy.metrics import CATALOG_REFRESHES_TOTAL

        async with self._lock:
            started = asyncio.get_running_loop().time()
            snap = await self._loader()
            old = self._snapshot
            if snap.relations == old.relations:
                snap = CatalogSnapshot(snap.relations, snap.search_path, old.version, snap.problems)
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
            try:
                await self.refresh(reason)
            except Exception:  # logged; the old snapshot stays in force
                log.exception("catalog refresh failed")

        self._pending = loop.create_task(run())

    def start_listening(self, dsn: str) -> None:
        """LISTEN on the backend for the bootstrap's DDL event trigger (channel
        :data:`CATALOG_CHANNEL`) and refresh on each notification; reconnects with backoff."""
        if self._loader is None or self._listener is not None:
            return

        async def run() -> None:
            import asyncpg

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
                    conn.add_termination_listener(lambda _c: lost.set())
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
                try:
                    await self.refresh("periodic")
                except Exception:
                    log.exception("periodic catalog refresh failed")

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
