"""The demo schema (proxy/sql/demo_schema.sql) as an offline catalog, for tests and docs.

``demo_engine()`` gives a :class:`~proxy.policy.engine.PolicyEngine` over the demo schema
without a database (with a few system catalogs), so unit tests can check rewrites fast.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from proxy.catalog_sync import CatalogManager
from proxy.policy.catalog import CatalogSnapshot, RelationRow
from proxy.policy.rules import Rules, load_rules

RULES_PATH = Path(__file__).resolve().parents[2] / "rules" / "tenancy.yaml"


def demo_schema_sql() -> str:
    return resources.files("proxy").joinpath("sql/demo_schema.sql").read_text()


DEMO_ROWS = [
    RelationRow("public", "products", "r", (("product_id", "integer"), ("name", "text"), ("price_cents", "integer"))),
    RelationRow("public", "customers", "r",
                (("tenant_id", "text", True), ("customer_id", "integer"), ("name", "text"), ("email", "text"))),
    RelationRow("public", "orders", "r",
                (("tenant_id", "text", True), ("order_id", "integer"), ("customer_id", "integer"), ("status", "text"),
                 ("created_at", "timestamp with time zone"))),
    RelationRow("public", "order_items", "r",
                (("tenant_id", "text", True), ("order_id", "integer"), ("line_no", "integer"), ("product_id", "integer"),
                 ("quantity", "integer"))),
    RelationRow("pg_catalog", "pg_class", "r"),
    RelationRow("pg_catalog", "pg_type", "r"),
    RelationRow("pg_catalog", "pg_namespace", "r"),
    RelationRow("pg_catalog", "pg_attribute", "r"),
    RelationRow("pg_catalog", "pg_stats", "v"),
    RelationRow("information_schema", "tables", "v"),
    RelationRow("information_schema", "columns", "v"),
]


def demo_rules() -> Rules:
    return load_rules(RULES_PATH)


def demo_snapshot(rules: Rules | None = None, extra: list[RelationRow] = ()) -> CatalogSnapshot:
    return CatalogSnapshot.build(rules or demo_rules(), [*DEMO_ROWS, *extra])


def demo_engine(function_checker=None, extra: list[RelationRow] = ()):
    from proxy.policy.engine import PolicyEngine

    rules = demo_rules()
    return PolicyEngine(rules, CatalogManager.from_snapshot(demo_snapshot(rules, extra)), function_checker)
