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

This module is pure (no I/O).  Loading the catalog from PostgreSQL and keeping
the snapshot current (periodically, on DDL notifications, on demand, on SIGHUP)
is :mod:`proxy.catalog_sync` (:class:`~proxy.catalog_sync.CatalogManager`);
the policy engine only reads ``catalog_manager.snapshot`` and calls
``catalog_manager.request_refresh(reason)``.

Public API (stable)::

    snap = CatalogSnapshot.build(rules, rows, version=1)      # rows: see RelationRow
    snap.resolve(schema, name); snap.get(schema, name); snap.tenant_relations()
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterable, Literal

from proxy.policy.rules import Rules

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
    # names of the functions in the search path's schemas that do not duplicate a built-in's
    # signature (user-defined, extensions): PostgreSQL may call one where a statement names it
    # unqualified or as an attribute (``x.name``), and the proxy refuses that unless the rules
    # declare it safe (proxy/policy/pg_calls.py); sql_functions: those of them written in a
    # language that can run SQL (an unqualified built-in name is refused only for these)
    user_functions: frozenset[str] = field(default=frozenset())
    sql_functions: frozenset[str] = field(default=frozenset())
    # operators and casts whose function runs SQL outside pg_catalog: (kind "operator" | "cast",
    # operator symbol | target type name, "schema.function", cast context "e" | "a" | "i" | "")
    hidden_calls: tuple[tuple[str, str, str, str], ...] = field(default=())

    def functions_key(self) -> tuple:
        return self.user_functions, self.sql_functions, self.hidden_calls

    @classmethod
    def build(cls, rules: Rules, rows: Iterable[RelationRow], version: int | None = None,
              backstop: dict[tuple[str, str], str | None] | None = None,
              user_functions: Iterable[str] = (), sql_functions: Iterable[str] | None = None,
              hidden_calls: Iterable[tuple[str, str, str, str]] = ()) -> "CatalogSnapshot":
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
        user_functions = frozenset(user_functions)
        return cls(rels, tuple(rules.schemas), version if version is not None else next(_versions), tuple(problems),
                   user_functions, user_functions if sql_functions is None else frozenset(sql_functions),
                   tuple(sorted(hidden_calls)))

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


def backstop_required(rules: Rules, key_configured: bool) -> bool:
    return rules.backstop == "required" or (rules.backstop == "auto" and key_configured)
