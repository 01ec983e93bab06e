"""The tenancy rules (``rules/tenancy.yaml``): model, loader and JSON Schema.

One pydantic model is the single source of truth for the format.  Unknown keys
are errors that name the key (``tenant_tables.0: ...``).  Print the JSON Schema
with ``python -m proxy.policy.rules``.

Public API (stable):

* :class:`Rules` — the validated rules.
* :func:`load_rules(path) <load_rules>` -> :class:`Rules`; raises :class:`RulesError`.
* :func:`rules_json_schema` -> dict.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from proxy.yamlfile import format_validation_error, load_mapping


class RulesError(Exception):
    """The rules file is missing, not YAML, or invalid (message names the bad key)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _split_name(name: str) -> tuple[str | None, str]:
    """'schema.table' -> ('schema', 'table'); 'table' -> (None, 'table').  Names are exact (no folding)."""
    if "." in name:
        schema, _, rel = name.partition(".")
        return schema, rel
    return None, name


class Rules(_Strict):
    """Which relations hold tenant data, and how a tenant is named.

    Relation names are written as PostgreSQL stores them (lower case unless
    created quoted), optionally schema-qualified (``public.orders``).  An
    unqualified name refers to the first schema of ``schemas``.
    """

    tenant_column: str = Field("tenant_id", description="Column that carries the tenant in every tenant-scoped relation")
    tenant_column_type: Literal["text", "varchar", "uuid", "integer", "bigint"] = Field(
        "text", description="SQL type of the tenant column (decides literal form and Bind-value checks)"
    )
    schemas: list[str] = Field(
        default_factory=lambda: ["public"],
        description="The proxy's fixed search_path (pg_catalog is implicitly first); also where tables are discovered",
    )
    discover: bool = Field(
        True, description="Treat every table in `schemas` that has the tenant column as tenant-scoped"
    )
    tenant_tables: list[str] = Field(default_factory=list, description="Tenant-scoped tables, listed explicitly")
    shared_tables: list[str] = Field(
        default_factory=list, description="Tables every tenant may read; writes are refused in tenant sessions"
    )
    safe_views: list[str] = Field(
        default_factory=list,
        description="Views declared safe; a view with the tenant column is filtered like a tenant table, "
        "one without it is treated as shared (read-only)",
    )
    safe_functions: list[str] = Field(
        default_factory=list, description="User-defined functions declared safe (used by the function allowlist)"
    )
    function_allowlist_file: str | None = Field(
        None, description="Path of the built-in function allowlist (relative to this file); see rules/README.md"
    )
    credentials: dict[str, str] = Field(
        default_factory=dict, description="Application user name -> the one tenant it is bound to"
    )
    tenant_regions: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Tenant -> the regions it may be placed in (tenantgate tenant place refuses any other; "
        "docs/scale-out.md). A tenant not listed may be placed in any configured region",
    )
    catalog_refresh_s: float = Field(60.0, gt=0, description="Seconds between periodic catalog refreshes")
    backstop: Literal["auto", "required", "off"] = Field(
        "auto",
        description="Whether every tenant table must carry the PostgreSQL backstop (RLS enabled and forced with "
        "tenantgate's policies, nothing permissive beside them, not owned by the backend role) before the proxy "
        "serves it: `auto` = required when the config has a backstop key (backstop.key), `required`, or `off`",
    )
    backstop_off: dict[str, str] = Field(
        default_factory=dict,
        description="Tenant tables served without the backstop: table -> the reason (required, non-empty)",
    )

    @field_validator("tenant_column")
    @classmethod
    def _column_nonempty(cls, v: str) -> str:
        if not v or "\x00" in v:
            raise ValueError("must be a non-empty column name")
        return v

    @field_validator("schemas")
    @classmethod
    def _schemas_nonempty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one schema")
        if "pg_catalog" in v or "information_schema" in v:
            raise ValueError("pg_catalog/information_schema cannot hold tenant data")
        return v

    @field_validator("backstop_off")
    @classmethod
    def _reasons_given(cls, v: dict[str, str]) -> dict[str, str]:
        for table, reason in v.items():
            if not reason or not reason.strip():
                raise ValueError(f"{table}: give the reason the table is served without the backstop")
        return v

    @property
    def backstop_off_keys(self) -> frozenset[tuple[str, str]]:
        return frozenset(self.qualify(n) for n in self.backstop_off)

    def qualify(self, name: str) -> tuple[str, str]:
        schema, rel = _split_name(name)
        return (schema or self.schemas[0], rel)

    @property
    def tenant_table_keys(self) -> frozenset[tuple[str, str]]:
        return frozenset(self.qualify(n) for n in self.tenant_tables)

    @property
    def shared_table_keys(self) -> frozenset[tuple[str, str]]:
        return frozenset(self.qualify(n) for n in self.shared_tables)

    @property
    def safe_view_keys(self) -> frozenset[tuple[str, str]]:
        return frozenset(self.qualify(n) for n in self.safe_views)


def load_rules(path: str | Path) -> Rules:
    """Load and validate a rules YAML file.  ``function_allowlist_file`` is made absolute."""
    path = Path(path)
    raw = load_mapping(path, RulesError)
    try:
        rules = Rules.model_validate(raw)
    except ValidationError as e:
        raise RulesError(format_validation_error(e, str(path), "rules"))
    overlap = rules.tenant_table_keys & rules.shared_table_keys
    if overlap:
        names = ", ".join(f"{s}.{n}" for s, n in sorted(overlap))
        raise RulesError(f"{path}: tables both tenant-scoped and shared: {names}")
    if rules.function_allowlist_file and not os.path.isabs(rules.function_allowlist_file):
        rules = rules.model_copy(
            update={"function_allowlist_file": str((path.parent / rules.function_allowlist_file).resolve())}
        )
    return rules


def describe_change(old: Rules, new: Rules) -> str:
    """One line saying what a reload changed: ``shared_tables +public.x -public.y; tenant_column_type
    text -> uuid`` (or ``no change``)."""
    a, b = old.model_dump(), new.model_dump()
    parts = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x == y:
            continue
        if isinstance(x, list) and isinstance(y, list):
            added = [str(v) for v in y if v not in x]
            removed = [str(v) for v in x if v not in y]
            diff = " ".join([f"+{v}" for v in added] + [f"-{v}" for v in removed]) or "reordered"
            parts.append(f"{key} {diff}")
        else:
            parts.append(f"{key} {x!r} -> {y!r}")
    return "; ".join(parts) if parts else "no change"


def rules_json_schema() -> dict:
    return Rules.model_json_schema()


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(rules_json_schema(), indent=2))
