"""Pass 3: resolve relation references exactly as PostgreSQL would.

* unquoted identifiers fold to lower case (ASCII only, like PostgreSQL's
  ``downcase_identifier``), quoted ones keep their case; both are truncated to
  63 bytes (NAMEDATALEN - 1);
* a schema-qualified name is looked up in that schema; an unqualified one in
  ``pg_catalog`` first, then the proxy's fixed search_path (rules ``schemas``);
* an unqualified name that matches a CTE visible at that point is the CTE (CTE
  names shadow tables), following PostgreSQL's WITH scoping (a non-recursive
  CTE sees only the CTEs before it; WITH RECURSIVE sees all of its list);
* a three-part name (other database) is refused.

Entry point: :func:`resolve_table` -> :class:`~proxy.policy.catalog.Relation`,
or ``None`` for a CTE reference.  Unknown relations raise :class:`UnknownRelation`.
"""

from __future__ import annotations

from sqlglot import exp

from proxy.policy.catalog import CatalogSnapshot, Relation
from proxy.policy.errors import FEATURE_NOT_SUPPORTED, INSUFFICIENT_PRIVILEGE, UNDEFINED_TABLE, PolicyRefusal

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
NAMEDATALEN = 64


class UnknownRelation(PolicyRefusal):
    def __init__(self, name: str):
        super().__init__(UNDEFINED_TABLE, f'relation "{name}" does not exist or is not known to tenantgate')


def truncate_identifier(name: str) -> str:
    raw = name.encode("utf-8")
    if len(raw) < NAMEDATALEN:
        return name
    return raw[: NAMEDATALEN - 1].decode("utf-8", errors="ignore")


def fold_identifier(ident: exp.Identifier | str | None) -> str | None:
    if ident is None:
        return None
    if isinstance(ident, str):
        return truncate_identifier(ident.translate(_ASCII_LOWER))
    if not isinstance(ident, exp.Identifier):
        raise PolicyRefusal(FEATURE_NOT_SUPPORTED, f"unsupported name form {type(ident).__name__}")
    name = ident.this if ident.quoted else ident.this.translate(_ASCII_LOWER)
    return truncate_identifier(name)


def table_name(table: exp.Table) -> tuple[str | None, str | None, str]:
    """(catalog, schema, name), folded."""
    return (
        fold_identifier(table.args.get("catalog")),
        fold_identifier(table.args.get("db")),
        fold_identifier(table.this),
    )


def _cte_names(with_: exp.With) -> list[str]:
    return [fold_identifier(cte.args["alias"].this) for cte in with_.expressions]


def visible_ctes(node: exp.Expression) -> set[str]:
    """Names of the CTEs visible where ``node`` is."""
    names: set[str] = set()
    child = node
    parent = node.parent
    while parent is not None:
        if isinstance(parent, exp.With):
            all_names = _cte_names(parent)
            if parent.args.get("recursive"):
                names.update(all_names)
            else:
                idx = next((i for i, c in enumerate(parent.expressions) if c is child), len(all_names))
                names.update(all_names[:idx])
            # skip the statement that owns this WITH: its body is not visible from its CTEs
            owner = parent.parent
            child, parent = owner, (owner.parent if owner is not None else None)
            continue
        w = parent.args.get("with_") or parent.args.get("with")
        if isinstance(w, exp.With) and child is not w:
            names.update(_cte_names(w))
        child, parent = parent, parent.parent
    return names


def display_name(table: exp.Table) -> str:
    cat, schema, name = table_name(table)
    return ".".join(p for p in (cat, schema, name) if p)


def resolve_table(table: exp.Table, snapshot: CatalogSnapshot) -> Relation | None:
    catalog, schema, name = table_name(table)
    if catalog is not None:
        raise PolicyRefusal(FEATURE_NOT_SUPPORTED, f"cross-database references are not implemented: {display_name(table)}")
    if schema is None and name in visible_ctes(table):
        return None
    if schema == "pg_temp" or (schema or "").startswith("pg_temp_") or (schema or "").startswith("pg_toast"):
        raise PolicyRefusal(INSUFFICIENT_PRIVILEGE, f"relation {display_name(table)} is not accessible through tenantgate")
    rel = snapshot.resolve(schema, name)
    if rel is None:
        raise UnknownRelation(display_name(table))
    if rel.classification == "denied":
        raise PolicyRefusal(
            INSUFFICIENT_PRIVILEGE,
            f"permission denied for relation {rel.qualified}: {rel.reason}",
        )
    return rel
