"""Error positions map back to the client's statement text (proxy/wire/error_position.py).

Differential: each statement fails in PostgreSQL with a position.  The position PostgreSQL
reports for the original text (run as a role under row-level security) is the oracle; the
position it reports for tenantgate's rewrite, mapped back, must equal it.  Found by the Node.js
client conformance programs: node-postgres reported ``error.position`` 56 through tenantgate
where a direct connection said 54.
"""

from __future__ import annotations

import asyncpg
import psycopg
import pytest

from proxy.policy.allowlist import FunctionChecker
from proxy.catalog_sync import CatalogManager
from support.demo_policy import demo_rules, demo_schema_sql
from proxy.policy.context import PolicyContext
from proxy.policy.engine import PolicyEngine
from proxy.seam import Forward, Origin
from proxy.wire.error_position import original_position, remap_error_position
from proxy.wire.messages import decode_error_fields, frame

RLS_ROLE = "tg_errpos_rls"
RLS_SETUP = f"""
DO $$BEGIN CREATE ROLE {RLS_ROLE} NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END$$;
GRANT USAGE ON SCHEMA public TO {RLS_ROLE};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {RLS_ROLE};
ALTER TABLE customers ENABLE ROW LEVEL SECURITY;
ALTER TABLE orders ENABLE ROW LEVEL SECURITY;
ALTER TABLE order_items ENABLE ROW LEVEL SECURITY;
CREATE POLICY t ON customers USING (tenant_id = 'acme') WITH CHECK (tenant_id = 'acme');
CREATE POLICY t ON orders USING (tenant_id = 'acme') WITH CHECK (tenant_id = 'acme');
CREATE POLICY t ON order_items USING (tenant_id = 'acme') WITH CHECK (tenant_id = 'acme');
ALTER TABLE customers ALTER COLUMN tenant_id SET DEFAULT 'acme';
"""

# statements that PostgreSQL rejects with a position, after the point where tenantgate edits
FAILING = [
    "SELECT name FROM customers WHERE customer_id = 1 AND nme = 'x'",
    "SELECT name FROM customers c JOIN orders o USING (customer_id) WHERE o.stauts = 'x'",
    "SELECT name\nFROM customers\nWHERE customer_id = 1\n  AND nme = 'x'",
    "SELECT name FROM customers WHERE customer_id = 1 ORDER BY nme",
    "SELECT count(*) FROM orders o LEFT JOIN customers c ON c.customer_id = o.customer_id WHERE o.x = 1",
    "SELECT * FROM orders WHERE customer_id IN (SELECT customer_id FROM customers WHERE nam = 'x') AND status = 1",
    "UPDATE customers SET name = 'x' WHERE customer_id = 1 AND nme = 2",
    "DELETE FROM orders WHERE order_id = 1 AND statuz = 'x'",
    "INSERT INTO customers (customer_id, name) VALUES (1, 'a'::nosuchtype)",
    "SELECT 'héllo ü' AS h, name FROM customers WHERE customer_id = 1 AND nme = 'ü'",
    "SELECT name FROM customers WHERE customer_id = 1 AND name = 'x' GROUP BY nme",
    "WITH c AS (SELECT * FROM customers) SELECT o.order_id FROM c JOIN orders o USING (customer_id) WHERE c.nme = 1",
    "SELECT customer_id FROM customers UNION SELECT order_id FROM orders WHERE statuz = 'x'",
    "SELECT relname FROM pg_class WHERE relnme = 'customers'",
]


@pytest.fixture(scope="module")
async def demo_db(make_db):
    _, dsn = make_db("errpos")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(demo_schema_sql())
        await conn.execute(RLS_SETUP)
    finally:
        await conn.close()
    return dsn


@pytest.fixture(scope="module")
async def engine(demo_db):
    rules = demo_rules()
    mgr = await CatalogManager.from_dsn(demo_db, rules)
    return PolicyEngine(rules, mgr, FunctionChecker.default())


async def _position(conn, sql: str, role: str | None = None) -> int:
    async with conn.transaction():
        if role:
            await conn.execute(f"SET LOCAL ROLE {role}")
        with pytest.raises(asyncpg.PostgresError) as err:
            await conn.execute(sql)
    assert err.value.position, f"{sql!r}: PostgreSQL gave no position ({err.value})"
    return int(err.value.position)


async def test_positions_in_the_rewrite_map_back_to_where_postgresql_puts_them_in_the_original(engine, demo_db):
    conn = await asyncpg.connect(demo_db)
    shifted = 0
    try:
        for sql in FAILING:
            decision = engine.check(sql, PolicyContext(tenant="acme"), Origin.SIMPLE)
            assert isinstance(decision, Forward), (sql, decision)
            want = await _position(conn, sql, RLS_ROLE)
            got = await _position(conn, decision.sql)
            shifted += got != want
            assert original_position(sql, decision.sql, got) == want, (sql, decision.sql, got, want)
    finally:
        await conn.close()
    # the rewrite did move the positions, so the mapping was exercised
    assert shifted >= len(FAILING) - 1


def _error(fields: dict[str, str]) -> bytes:
    body = b"".join(k.encode() + v.encode() + b"\0" for k, v in fields.items()) + b"\0"
    return frame(b"E", body)


def test_the_error_message_gets_the_mapped_position_and_keeps_every_other_field():
    original = "SELECT name FROM customers WHERE customer_id = 1 AND nme = 'x'"
    sent = "SELECT name FROM customers WHERE ( customer_id = 1 AND nme = 'x') AND \"customers\".\"tenant_id\" = 'acme' "
    fields = {"S": "ERROR", "V": "ERROR", "C": "42703", "M": 'column "nme" does not exist', "P": "56",
              "F": "parse_relation.c", "L": "3722", "R": "errorMissingColumn"}
    out = remap_error_position(_error(fields), original, sent)
    assert decode_error_fields(out[5:]).fields == {**fields, "P": "54"}
    assert int.from_bytes(out[1:5], "big") == len(out) - 1


def test_the_error_is_left_as_postgresql_sent_it_when_nothing_can_be_mapped():
    without_p = _error({"S": "ERROR", "C": "22012", "M": "division by zero"})
    assert remap_error_position(without_p, "SELECT 1/0", "SELECT 1/0 ") is without_p
    same = _error({"S": "ERROR", "C": "42703", "M": "x", "P": "8"})
    assert remap_error_position(same, "SELECT x", "SELECT x") is same
    out_of_range = _error({"S": "ERROR", "C": "42703", "M": "x", "P": "900"})
    assert remap_error_position(out_of_range, "SELECT x", "SELECT  x") == out_of_range
    malformed = b"E\0\0\0\x09Pab"
    assert remap_error_position(malformed, "a", "b") is malformed


def test_a_position_inside_text_tenantgate_added_points_at_where_it_was_added():
    original = "SELECT a FROM t WHERE b = 1"
    sent = "SELECT a FROM t WHERE ( b = 1) AND \"t\".\"tenant_id\" = 'acme' "
    assert original_position(original, sent, sent.index("tenant_id") + 1) == len(original) + 1
    assert original_position(original, sent, len(sent) + 1) == len(original) + 1  # at end of input
    assert original_position(original, sent, 3) == 3  # before any edit


@pytest.mark.parametrize("sql, bad", [(FAILING[0], "nme"), (FAILING[1], "o.stauts"), (FAILING[2], "nme")])
def test_through_tenantgate_the_client_sees_the_position_of_its_own_text(demo, sql, bad):
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedColumn) as err:
            conn.execute(sql)
    assert err.value.diag.statement_position == str(sql.index(bad) + 1)


def test_every_kept_character_of_a_bulk_insert_maps_back_exactly():
    """Many small edits (the tenant value in every row): each position in the client's text
    maps exactly, and positions inside the added values point just after the row's last value."""
    rows = ", ".join(f"({i}, 'name {i}')" for i in range(300))
    original = f"INSERT INTO customers (customer_id, name) VALUES {rows}"
    sent = original.replace("(customer_id, name)", '(customer_id, name, "tenant_id")').replace("')", "', 'acme')")
    for n in (0, 7, 150, 299):
        assert original_position(original, sent, sent.index(f"'name {n}'") + 1) == original.index(f"'name {n}'") + 1
    added = sent.index("'acme'") + 1
    assert original_position(original, sent, added) == original.index("'name 0'") + len("'name 0'") + 1


@pytest.mark.parametrize("sql, bad", [(FAILING[0], "nme"), (FAILING[2], "nme")])
async def test_extended_protocol_errors_carry_the_position_in_the_clients_own_text(demo, sql, bad):
    """asyncpg sends Parse: the failing Parse's position is mapped, as a simple Query's is."""
    conn = await asyncpg.connect(demo.app("acme"))
    try:
        with pytest.raises(asyncpg.UndefinedColumnError) as err:
            await conn.fetch(sql)
        assert err.value.position == str(sql.index(bad) + 1)
        assert await conn.fetchval("SELECT count(*) FROM customers WHERE tenant_id <> 'acme'") == 0
    finally:
        await conn.close()
