"""Rules loading (errors name the key), JSON Schema, catalog classification and refresh."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from proxy.catalog_sync import CatalogManager
from proxy.policy.catalog import CatalogSnapshot, RelationRow
from support.demo_policy import RULES_PATH, demo_rules
from proxy.policy.rules import Rules, RulesError, load_rules, rules_json_schema


def test_demo_rules_load():
    rules = load_rules(RULES_PATH)
    assert rules.tenant_column == "tenant_id" and rules.shared_tables == ["products"]
    assert ("public", "orders") in rules.tenant_table_keys


@pytest.mark.parametrize(
    "text, needle",
    [
        ("tenant_colum: x\n", "tenant_colum"),
        ("tenant_column_type: float\n", "tenant_column_type"),
        ("schemas: []\n", "schemas"),
        ("tenant_tables: [a]\nshared_tables: [a]\n", "both tenant-scoped and shared"),
        ("- a\n", "mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_rules_name_the_key(tmp_path, text, needle):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(RulesError) as e:
        load_rules(p)
    assert needle in str(e.value)


def test_json_schema_lists_every_key():
    props = rules_json_schema()["properties"]
    assert {"tenant_column", "tenant_tables", "shared_tables", "safe_views", "credentials"} <= set(props)


def test_classification():
    rules = Rules(tenant_tables=["orders", "broken"], shared_tables=["products"], safe_views=["v_ok"])
    snap = CatalogSnapshot.build(rules, [
        RelationRow("public", "orders", "r", (("tenant_id", "text"),)),
        RelationRow("public", "broken", "r", (("id", "int"),)),
        RelationRow("public", "invoices", "r", (("tenant_id", "text"),)),  # discovered
        RelationRow("public", "products", "r", (("id", "int"),)),
        RelationRow("public", "lookup", "r", (("id", "int"),)),
        RelationRow("public", "v_ok", "v", (("tenant_id", "text"),)),
        RelationRow("public", "v_other", "v", (("tenant_id", "text"),)),
        RelationRow("other", "x", "r", (("tenant_id", "text"),)),
        RelationRow("pg_catalog", "pg_class", "r"),
    ])
    cls = {k[1]: r.classification for k, r in snap.relations.items()}
    assert cls == {
        "orders": "tenant", "broken": "denied", "invoices": "tenant", "products": "shared", "lookup": "denied",
        "v_ok": "tenant", "v_other": "denied", "x": "denied", "pg_class": "system",
    }
    assert any("broken" in p for p in snap.problems)
    assert snap.resolve(None, "pg_class").schema == "pg_catalog"
    assert snap.resolve("other", "x").classification == "denied"


async def test_catalog_manager_from_dsn_and_refresh(make_db):
    name, dsn = make_db("policycat")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE orders (tenant_id text NOT NULL, id int)")
        mgr = await CatalogManager.from_dsn(dsn, demo_rules(), refresh_interval_s=3600)
        rel = mgr.snapshot.get("public", "orders")
        assert rel.tenant_scoped and rel.column_not_null("tenant_id")
        v1 = mgr.version
        assert (await mgr.refresh("test")).version == v1  # nothing changed: same version
        await conn.execute("CREATE TABLE invoices (tenant_id text, n int)")
        mgr.request_refresh()
        for _ in range(100):
            if mgr.snapshot.get("public", "invoices") is not None:
                break
            await asyncio.sleep(0.05)
        assert mgr.snapshot.get("public", "invoices").tenant_scoped and mgr.version != v1
        await mgr.close()
    finally:
        await conn.close()
