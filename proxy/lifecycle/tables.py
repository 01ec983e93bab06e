"""Which tables hold a tenant's rows, what they look like, and in which order to touch them.

Export, import and purge all start here.  :func:`discover` reads the
PostgreSQL catalogs over one asyncpg connection and returns a
:class:`TenantSchema`: the tenant tables (tables in the given schemas that have
the tenant column, or an explicit list), their columns and types, the
foreign-key graph between them, and the order to visit them in:

* :meth:`TenantSchema.import_order` is parents first (load a parent before the
  children that point at it);
* :meth:`TenantSchema.purge_order` is children first (delete the children
  before the parents they point at).

Foreign keys that form cycles are grouped into strongly connected components
(Tarjan).  A table that references itself stays a single table with
``self_references`` set; several tables in one cycle form one
:class:`Component`, which purge deletes in a single statement (foreign keys
are checked at the end of a statement, so that works whether or not the
constraints are DEFERRABLE).  Foreign keys from non-tenant tables into tenant
tables are reported (:attr:`TenantSchema.blockers`) because purge cannot
delete rows that such tables still reference.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from proxy.policy.names import TENANT_GUC, quote_ident
from proxy.seam import SqlStateError


class LifecycleError(SqlStateError):
    """A lifecycle operation was refused or failed; carries a PostgreSQL-style SQLSTATE."""

    def __str__(self) -> str:
        text = f"ERROR:  {self.message} (SQLSTATE {self.sqlstate})"
        if self.detail:
            text += f"\nDETAIL:  {self.detail}"
        if self.hint:
            text += f"\nHINT:  {self.hint}"
        return text


# SQLSTATEs used by the lifecycle code
UNDEFINED_OBJECT = "42704"  # unknown tenant
UNDEFINED_TABLE = "42P01"
UNDEFINED_COLUMN = "42703"
DUPLICATE_FILE = "58P02"  # output path exists
IO_ERROR = "58030"
DATA_CORRUPTED = "XX001"  # checksum / count mismatch in an export
INVALID_PARAMETER = "22023"
OBJECT_NOT_IN_STATE = "55000"  # non-empty tenant, retention not ended, ...
FK_VIOLATION = "23503"
CHECK_VIOLATION = "23514"  # a row whose tenant column is not the target tenant
INSUFFICIENT_PRIVILEGE = "42501"
INVALID_AUTHORIZATION = "28000"


def quote_literal(value: str) -> str:
    """A SQL string literal for a session with standard_conforming_strings = on."""
    if "\x00" in value:
        raise LifecycleError(INVALID_PARAMETER, "tenant id contains a NUL character")
    return "'" + value.replace("'", "''") + "'"


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # format_type(), e.g. "timestamp with time zone", "character varying(20)"
    not_null: bool
    generated: bool  # GENERATED ALWAYS AS (...) STORED: computed, never exported or loaded


@dataclass(frozen=True)
class TenantTable:
    schema: str
    name: str
    columns: tuple[Column, ...]
    tenant_column: str

    @property
    def key(self) -> str:
        """``schema.name`` as plain text (used in manifests and receipts)."""
        return f"{self.schema}.{self.name}"

    @property
    def qualified(self) -> str:
        """The quoted, schema-qualified name for SQL."""
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    @property
    def data_columns(self) -> tuple[Column, ...]:
        """Columns exported and loaded (everything but generated columns)."""
        return tuple(c for c in self.columns if not c.generated)

    @property
    def tenant_type(self) -> str:
        for c in self.columns:
            if c.name == self.tenant_column:
                return c.type
        raise LifecycleError(UNDEFINED_COLUMN, f'table {self.key} has no tenant column "{self.tenant_column}"')

    def tenant_predicate(self, tenant: str, alias: str | None = None) -> str:
        """``tenant_col = CAST('T' AS type)`` with T as a quoted literal (usable in COPY)."""
        col = quote_ident(self.tenant_column)
        if alias:
            col = f"{alias}.{col}"
        return f"{col} = CAST({quote_literal(tenant)} AS {self.tenant_type})"

    def select_list(self) -> str:
        return ", ".join(quote_ident(c.name) for c in self.data_columns)


@dataclass(frozen=True)
class ForeignKey:
    name: str
    child: str  # table key
    parent: str  # table key
    child_columns: tuple[str, ...]
    parent_columns: tuple[str, ...]
    deferrable: bool

    @property
    def self_reference(self) -> bool:
        return self.child == self.parent


@dataclass(frozen=True)
class Component:
    """Tables that must be handled together (one table, or several forming an FK cycle)."""

    tables: tuple[str, ...]

    @property
    def is_cycle(self) -> bool:
        return len(self.tables) > 1


@dataclass
class TenantSchema:
    tenant_column: str
    tables: dict[str, TenantTable]
    foreign_keys: list[ForeignKey]
    shared_tables: list[str] = field(default_factory=list)
    # FKs from tables that are not tenant tables into tenant tables (purge may be blocked)
    blockers: list[ForeignKey] = field(default_factory=list)

    # --- graph -----------------------------------------------------------------
    def components_parents_first(self) -> list[Component]:
        """Strongly connected components in topological order, parents first.

        Ties are broken by table name so the order is deterministic.
        """
        return _components(sorted(self.tables), [fk for fk in self.foreign_keys if not fk.self_reference])

    def import_order(self) -> list[str]:
        return [t for comp in self.components_parents_first() for t in comp.tables]

    def purge_components(self) -> list[Component]:
        return list(reversed(self.components_parents_first()))

    def purge_order(self) -> list[str]:
        return [t for comp in self.purge_components() for t in comp.tables]

    def cycles(self) -> list[Component]:
        return [c for c in self.components_parents_first() if c.is_cycle]

    def self_references(self, table: str) -> list[ForeignKey]:
        return [fk for fk in self.foreign_keys if fk.self_reference and fk.child == table]

    def schema_version(self) -> str:
        """SHA-256 over the tenant tables' definitions (columns, types, FKs): changes when they change."""
        doc = {
            "tenant_column": self.tenant_column,
            "tables": {
                k: [[c.name, c.type, c.not_null, c.generated] for c in t.columns] for k, t in sorted(self.tables.items())
            },
            "foreign_keys": sorted(
                [fk.name, fk.child, fk.parent, list(fk.child_columns), list(fk.parent_columns)] for fk in self.foreign_keys
            ),
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def describe_problems(self) -> list[str]:
        """Human-readable reasons purge could be blocked (FKs from non-tenant tables)."""
        return [
            f"foreign key {fk.name} on non-tenant table {fk.child} references tenant table {fk.parent}"
            for fk in self.blockers
        ]


def _components(nodes: Sequence[str], edges: Iterable[ForeignKey]) -> list[Component]:
    """Tarjan's SCC over child->parent edges, then a parents-first topological order."""
    out: dict[str, set[str]] = {n: set() for n in nodes}  # child -> parents
    for fk in edges:
        if fk.child in out and fk.parent in out:
            out[fk.child].add(fk.parent)

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # recursion depth = number of tables; fine
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(out[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(sorted(comp))

    for n in nodes:
        if n not in index:
            strongconnect(n)

    comp_of = {t: i for i, comp in enumerate(sccs) for t in comp}
    # parents of each component
    deps: dict[int, set[int]] = {i: set() for i in range(len(sccs))}
    for child, parents in out.items():
        for p in parents:
            if comp_of[p] != comp_of[child]:
                deps[comp_of[child]].add(comp_of[p])
    ordered: list[int] = []
    done: set[int] = set()
    remaining = sorted(range(len(sccs)), key=lambda i: sccs[i][0])
    while remaining:
        for i in remaining:
            if deps[i] <= done:
                ordered.append(i)
                done.add(i)
                remaining.remove(i)
                break
        else:  # cannot happen: the condensation of a graph is acyclic
            raise RuntimeError("foreign-key graph condensation is not acyclic")
    return [Component(tuple(sccs[i])) for i in ordered]


_TABLES_SQL = """
SELECT n.nspname AS schema, c.relname AS name, c.oid
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND n.nspname = ANY($1::text[])
ORDER BY 1, 2
"""

_COLUMNS_SQL = """
SELECT a.attrelid AS oid, a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type,
       a.attnotnull AS not_null, a.attgenerated <> '' AS generated
FROM pg_attribute a
WHERE a.attrelid = ANY($1::oid[]) AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""

_FKS_SQL = """
SELECT con.conname AS name,
       cn.nspname AS child_schema, cc.relname AS child_name,
       pn.nspname AS parent_schema, pc.relname AS parent_name,
       ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(attnum, i)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum ORDER BY k.i)::text[] AS child_columns,
       ARRAY(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(attnum, i)
             JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum ORDER BY k.i)::text[] AS parent_columns,
       con.condeferrable AS is_deferrable
FROM pg_constraint con
JOIN pg_class cc ON cc.oid = con.conrelid JOIN pg_namespace cn ON cn.oid = cc.relnamespace
JOIN pg_class pc ON pc.oid = con.confrelid JOIN pg_namespace pn ON pn.oid = pc.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0
ORDER BY 1, 2, 3
"""


async def discover(
    conn,
    tenant_column: str,
    schemas: Sequence[str] = ("public",),
    tables: Sequence[str | tuple[str, str]] | None = None,
) -> TenantSchema:
    """Find the tenant tables and the FK graph between them.

    ``tables``: an explicit list of ``(schema, table)`` pairs or
    ``schema.table`` strings (split at the first dot, as in the rules file; a
    bare name means the first schema in ``schemas``).  Otherwise every ordinary or partitioned
    table in ``schemas`` that has ``tenant_column`` is a tenant table and the
    others there are shared tables.
    """
    schemas = list(schemas)
    wanted: set[tuple[str, str]] | None = None
    if tables is not None:
        wanted = set()
        for t in tables:
            if isinstance(t, tuple):
                wanted.add(t)
            else:  # "schema.table" (first dot, as in the rules file) or a bare name
                s, dot, n = t.partition(".")
                wanted.add((s, n) if dot else (schemas[0], t))
        schemas = sorted(set(schemas) | {s for s, _ in wanted})
    rels = await conn.fetch(_TABLES_SQL, schemas)
    cols = await conn.fetch(_COLUMNS_SQL, [r["oid"] for r in rels])
    by_oid: dict[int, list[Column]] = {}
    for c in cols:
        by_oid.setdefault(c["oid"], []).append(Column(c["name"], c["type"], c["not_null"], c["generated"]))

    tenant_tables: dict[str, TenantTable] = {}
    shared: list[str] = []
    found: set[tuple[str, str]] = set()
    for r in rels:
        columns = tuple(by_oid.get(r["oid"], ()))
        key = f"{r['schema']}.{r['name']}"
        found.add((r["schema"], r["name"]))
        has_tenant = any(c.name == tenant_column for c in columns)
        selected = (r["schema"], r["name"]) in wanted if wanted is not None else has_tenant
        if selected:
            if not has_tenant:
                raise LifecycleError(
                    UNDEFINED_COLUMN, f'tenant table {key} has no tenant column "{tenant_column}"'
                )
            tenant_tables[key] = TenantTable(r["schema"], r["name"], columns, tenant_column)
        else:
            shared.append(key)
    if wanted is not None:
        missing = sorted(f"{s}.{n}" for s, n in wanted - found)
        if missing:
            raise LifecycleError(UNDEFINED_TABLE, f"tenant table {missing[0]} does not exist")

    fks: list[ForeignKey] = []
    blockers: list[ForeignKey] = []
    for f in await conn.fetch(_FKS_SQL):
        fk = ForeignKey(
            f["name"],
            f"{f['child_schema']}.{f['child_name']}",
            f"{f['parent_schema']}.{f['parent_name']}",
            tuple(f["child_columns"]),
            tuple(f["parent_columns"]),
            f["is_deferrable"],
        )
        if fk.parent in tenant_tables:
            (fks if fk.child in tenant_tables else blockers).append(fk)
    return TenantSchema(tenant_column, tenant_tables, fks, sorted(shared), blockers)


# --------------------------------------------------------------------------- session scoping
TENANTGATE_POLICIES = ("tenantgate_tenant_access", "tenantgate_tenant_isolation", "tenantgate_tenant_update",
                       "tenantgate_tenant_delete")

_FOREIGN_POLICIES_SQL = """
SELECT n.nspname || '.' || c.relname AS table_name, p.polname
FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relrowsecurity AND (n.nspname || '.' || c.relname) = ANY($1::text[])
  AND p.polname <> ALL($2::text[])
  AND (p.polroles @> ARRAY[0::oid] OR EXISTS (
        SELECT 1 FROM unnest(p.polroles) r WHERE pg_has_role(current_user, r, 'MEMBER')))
ORDER BY 1, 2
"""


_GUARDED_SQL = """
SELECT EXISTS (SELECT 1 FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE (n.nspname || '.' || c.relname) = ANY($1::text[])
                  AND coalesce(pg_get_expr(p.polqual, p.polrelid), '') LIKE '%tenantgate_guard.%')
"""


async def scope_session(conn, schema: TenantSchema, tenant: str, *, local: bool) -> bool:
    """Make row-level security unable to hide any of ``tenant``'s rows from export, import or purge.

    The tenant GUC (``tenantgate.tenant_id``) is set to the tenant, so
    tenantgate's own RLS policies (deploy/postgres/bootstrap.sql) admit
    exactly its rows even for a role without BYPASSRLS.  A role that bypasses
    RLS also gets ``row_security = off``.  Any other policy that applies to
    this role could filter rows silently (a partial export, a purge that
    "verifies" zero rows it cannot see), so it is refused (42501) up front.
    Returns True when the role bypasses RLS.
    """
    scope = "LOCAL " if local else ""
    await conn.execute(f"SET {scope}standard_conforming_strings = on")
    await conn.fetchval("SELECT set_config($1, $2, $3)", TENANT_GUC, tenant, local)
    bypass = await conn.fetchval("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user")
    if bypass:
        await conn.execute(f"SET {scope}row_security = off")
        return True
    # the PostgreSQL backstop (deploy/postgres/bootstrap.sql) admits only backend connections tenantgate
    # bound with its key, not the tenant GUC: without BYPASSRLS this role would see none of the rows
    # (an empty export, a purge that "verifies" zero rows), so refuse up front
    if await conn.fetchval(_GUARDED_SQL, sorted(schema.tables)):
        raise LifecycleError(
            INSUFFICIENT_PRIVILEGE,
            "the tenant tables are under tenantgate's PostgreSQL backstop, which shows this role no rows",
            hint="give the lifecycle.data_dsn role BYPASSRLS (it must see every row of the tenant)",
        )
    rows = await conn.fetch(_FOREIGN_POLICIES_SQL, sorted(schema.tables), list(TENANTGATE_POLICIES))
    if rows:
        raise LifecycleError(
            INSUFFICIENT_PRIVILEGE,
            f'row-level security policy "{rows[0]["polname"]}" on {rows[0]["table_name"]} could hide rows of the tenant',
            hint="give the lifecycle.data_dsn role BYPASSRLS, or keep only tenantgate's policies on tenant tables",
        )
    return False
