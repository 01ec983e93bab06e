"""Engine-level tests of every rewrite and refusal (no database: the demo schema offline).

Results against a real PostgreSQL are in test_policy_pg.py.
"""

from __future__ import annotations

import pytest

from proxy.policy.catalog import RelationRow
from support.demo_policy import demo_engine
from proxy.policy.context import PolicyContext
from proxy.seam import Forward, Origin, Refuse

ACME = PolicyContext(tenant="acme")
GUARD = "(SELECT * FROM {} WHERE \"tenant_id\" = 'acme')"


def GJ(item: str, ref: str, n: int = 1) -> str:
    """A FROM item filtered before its outer join by the zero-column guard join."""
    return f"({item} INNER JOIN (SELECT) AS tenantgate_guard_{n} ON \"{ref}\".\"tenant_id\" = 'acme')"


def P(ref: str) -> str:
    """The tenant predicate on a FROM item."""
    return f"\"{ref}\".\"tenant_id\" = 'acme'"


@pytest.fixture(scope="module")
def engine():
    return demo_engine(extra=[
        RelationRow("public", "Orders", "r", (("tenant_id", "text"), ("x", "int"))),
        RelationRow("public", "order_view", "v", (("tenant_id", "text"),)),
        RelationRow("secret", "vault", "r", (("tenant_id", "text"),)),
        RelationRow("public", "products_free", "r", (("product_id", "int"), ("tenant_id", "text"))),
    ])


def fwd(engine, sql, ctx=ACME, origin=Origin.SIMPLE) -> str:
    d = engine.check(sql, ctx, origin)
    assert isinstance(d, Forward), d
    return d.sql


def refused(engine, sql, ctx=ACME, origin=Origin.SIMPLE, state=None) -> Refuse:
    d = engine.check(sql, ctx, origin)
    assert isinstance(d, Refuse), d
    if state:
        assert d.sqlstate == state, d
    return d


# ---- SELECT ------------------------------------------------------------------------------------
def test_select_gets_predicates_in_where(engine):
    sql = "SELECT o.order_id FROM orders o JOIN customers c ON c.customer_id = o.customer_id WHERE o.x > 1 OR o.x < 0"
    assert fwd(engine, sql) == (
        "SELECT o.order_id FROM orders o JOIN customers c ON c.customer_id = o.customer_id "
        f"WHERE ( o.x > 1 OR o.x < 0) AND {P('o')} AND {P('c')} "
    )
    assert fwd(engine, "SELECT * FROM orders ORDER BY 1") == f"SELECT * FROM orders WHERE {P('orders')}  ORDER BY 1"


def test_outer_join_nullable_side_is_filtered_in_its_join_condition_not_in_where(engine):
    out = fwd(engine, "SELECT * FROM customers c LEFT JOIN orders o ON o.customer_id = c.customer_id")
    assert out == (
        f"SELECT * FROM customers c LEFT JOIN orders o ON ( o.customer_id = c.customer_id) AND {P('o')}  WHERE {P('c')} "
    )
    # RIGHT and FULL joins, and LEFT JOIN ... USING: the relations are filtered before the join
    out = fwd(engine, "SELECT * FROM customers c FULL JOIN orders o USING (customer_id)")
    assert out == f"SELECT * FROM {GJ('customers c', 'c')} FULL JOIN {GJ('orders o', 'o', 2)} USING (customer_id)"
    out = fwd(engine, "SELECT * FROM customers c RIGHT JOIN orders o ON true")
    assert out == f"SELECT * FROM customers c RIGHT JOIN orders o ON ( true) AND {P('c')}  WHERE {P('o')} "
    # everything left of a RIGHT JOIN is its nullable side
    out = fwd(engine, "SELECT * FROM orders a JOIN customers b ON true LEFT JOIN order_items i ON i.x = 1 RIGHT JOIN orders d ON d.x = a.x")
    assert out == (
        f"SELECT * FROM orders a JOIN customers b ON true LEFT JOIN order_items i ON ( i.x = 1) AND {P('i')}  "
        f"RIGHT JOIN orders d ON ( d.x = a.x) AND {P('a')} AND {P('b')}  WHERE {P('d')} "
    )
    out = fwd(engine, "SELECT * FROM customers c LEFT JOIN orders o USING (customer_id)")
    assert out == f"SELECT * FROM customers c LEFT JOIN {GJ('orders o', 'o')} USING (customer_id) WHERE {P('c')} "


def test_shared_and_system_relations_untouched(engine):
    assert fwd(engine, "SELECT * FROM products p, pg_catalog.pg_type t") == "SELECT * FROM products p, pg_catalog.pg_type t"


def test_schema_qualified_names(engine):
    assert fwd(engine, "SELECT public.orders.order_id FROM public.orders") == (
        f"SELECT public.orders.order_id FROM public.orders WHERE {P('orders')} "
    )
    # a guarded relation without alias is referred to by its name
    assert fwd(engine, "SELECT * FROM public.orders FULL JOIN customers USING (customer_id)").startswith(
        f"SELECT * FROM {GJ('public.orders', 'orders')} FULL JOIN"
    )


def test_identifier_folding_and_quoting(engine):
    assert fwd(engine, "SELECT * FROM ORDERS") == f"SELECT * FROM ORDERS WHERE {P('orders')} "
    # quoted "Orders" is a different (also tenant) table
    assert fwd(engine, 'SELECT * FROM "Orders"') == f"SELECT * FROM \"Orders\" WHERE {P('Orders')} "
    refused(engine, 'SELECT * FROM "ORDERS"', state="42P01")


def test_unicode_escaped_identifiers_are_decoded(engine):
    assert fwd(engine, 'SELECT * FROM U&"\\006Frders"') == f'SELECT * FROM "orders" WHERE {P("orders")} '
    assert P("Orders") in fwd(engine, "SELECT * FROM U&\"!004Frders\" UESCAPE '!'")
    refused(engine, 'SELECT * FROM U&"\\004FRDERS"', state="42P01")
    assert fwd(engine, "SELECT U&'\\0041' FROM products") == "SELECT 'A' FROM products"


def test_only_table_and_table_statement(engine):
    assert fwd(engine, "SELECT * FROM ONLY orders") == f"SELECT * FROM ONLY orders WHERE {P('orders')} "
    assert fwd(engine, "TABLE orders") == f"SELECT * FROM {GUARD.format('orders')} AS \"orders\""
    assert GUARD.format("customers") in fwd(engine, "SELECT 1 UNION TABLE customers")


def test_cte_shadowing_and_scoping(engine):
    assert fwd(engine, "WITH orders AS (SELECT 1) SELECT * FROM orders") == "WITH orders AS (SELECT 1) SELECT * FROM orders"
    # a non-recursive CTE does not see itself: the inner "orders" is the table
    out = fwd(engine, "WITH orders AS (SELECT * FROM orders) SELECT * FROM orders")
    assert out == f"WITH orders AS (SELECT * FROM orders WHERE {P('orders')} ) SELECT * FROM orders"
    # schema-qualified names are never CTEs
    assert P("orders") in fwd(engine, "WITH orders AS (SELECT 1) SELECT * FROM public.orders")
    # a later CTE sees an earlier one; WITH RECURSIVE sees all of its list
    out = fwd(engine, "WITH a AS (SELECT 1), customers AS (SELECT * FROM a) SELECT * FROM customers")
    assert "tenant_id" not in out


def test_subqueries_everywhere_lateral_setops_windows(engine):
    sql = (
        "SELECT (SELECT max(order_id) FROM orders), row_number() OVER () FROM customers c "
        "WHERE c.customer_id IN (SELECT customer_id FROM orders) AND EXISTS (SELECT 1 FROM order_items) "
        ", LATERAL (SELECT 1 FROM order_items i) l"
    )
    engine.check(sql, ACME)  # must not crash
    # (the statement is invalid SQL because of the trailing LATERAL; sqlglot refuses or wraps all)
    sql = (
        "SELECT (SELECT max(order_id) FROM orders), row_number() OVER () FROM customers c, "
        "LATERAL (SELECT 1 FROM order_items i WHERE i.order_id = c.customer_id) l "
        "WHERE c.customer_id IN (SELECT customer_id FROM orders) UNION ALL SELECT 1, 2 FROM orders"
    )
    out = fwd(engine, sql)
    assert out.count("\"tenant_id\" = 'acme'") == 5


def test_recursive_and_data_modifying_ctes(engine):
    out = fwd(engine, "WITH RECURSIVE r AS (SELECT 1 n UNION ALL SELECT n+1 FROM r WHERE n<3) SELECT * FROM r")
    assert out == "WITH RECURSIVE r AS (SELECT 1 n UNION ALL SELECT n+1 FROM r WHERE n<3) SELECT * FROM r"
    out = fwd(engine, "WITH d AS (DELETE FROM orders WHERE x = 1 RETURNING *) SELECT * FROM d")
    assert "DELETE FROM orders WHERE ( x = 1) AND \"orders\".\"tenant_id\" = 'acme'" in out


def test_for_update_share(engine):
    out = fwd(engine, "SELECT * FROM orders o FOR UPDATE OF o SKIP LOCKED")
    assert out == f"SELECT * FROM orders o WHERE {P('o')}  FOR UPDATE OF o SKIP LOCKED"


def test_round_trip_traps_text_is_kept_verbatim(engine):
    # JSON operators and :: keep their exact original text (the rewrite is spliced, not regenerated)
    sql = "SELECT data->>'a'::int, data #>> '{a,b}', x::text || 'y' FROM orders WHERE data @> '{\"a\":1}'"
    out = fwd(engine, sql)
    assert out == (
        "SELECT data->>'a'::int, data #>> '{a,b}', x::text || 'y' FROM orders "
        f"WHERE ( data @> '{{\"a\":1}}') AND {P('orders')} "
    )


def test_comments_and_literal_tricks(engine):
    out = fwd(engine, "SELECT '; DELETE FROM orders' /* ; DELETE FROM orders */ FROM customers -- ; DELETE")
    assert "DELETE FROM orders WHERE" not in out and P("customers") in out
    out = fwd(engine, "SELECT $x$ ; DELETE FROM orders; $x$, E'\\'; DELETE FROM orders; --' FROM customers")
    assert out.count("tenant_id") == 1
    # nested block comments (PostgreSQL nests them)
    out = fwd(engine, "SELECT 1 /* /* */ FROM orders */ FROM customers")
    assert out.count("tenant_id") == 1 and P("customers") in out


def test_several_statements_in_one_query(engine):
    out = fwd(engine, "SELECT 1; DELETE FROM orders; SELECT * FROM customers")
    assert "DELETE FROM orders WHERE \"orders\".\"tenant_id\" = 'acme'" in out
    assert P("customers") in out
    refused(engine, "SELECT 1; SELECT 2", origin=Origin.PARSE, state="42601")


# ---- writes ----------------------------------------------------------------------------------
def test_update_delete(engine):
    assert fwd(engine, "UPDATE orders SET status = 'x' WHERE a OR b") == (
        "UPDATE orders SET status = 'x' WHERE ( a OR b) AND \"orders\".\"tenant_id\" = 'acme' "
    )
    out = fwd(engine, "UPDATE orders AS o SET status = c.name FROM customers c WHERE c.customer_id = o.customer_id RETURNING o.*")
    assert GUARD.format("customers") + " c" in out and "\"o\".\"tenant_id\" = 'acme'  RETURNING o.*" in out
    out = fwd(engine, "DELETE FROM orders USING customers c RETURNING 1")
    assert "USING " + GUARD.format("customers") in out and "WHERE \"orders\".\"tenant_id\" = 'acme'  RETURNING 1" in out


def test_changing_tenant_column_refused(engine):
    refused(engine, "UPDATE orders SET tenant_id = 'globex'", state="42501")
    refused(engine, "UPDATE orders SET (status, TENANT_ID) = ('a', 'b')", state="42501")
    refused(engine, "INSERT INTO orders (order_id) VALUES (1) ON CONFLICT (order_id) DO UPDATE SET tenant_id = 'x'", state="42501")


def test_insert_adds_tenant_column(engine):
    assert fwd(engine, "INSERT INTO customers (customer_id, name) VALUES (1, 'a'), (2, 'b') RETURNING *") == (
        "INSERT INTO customers (customer_id, name, \"tenant_id\") VALUES (1, 'a', 'acme'), (2, 'b', 'acme') RETURNING *"
    )
    assert fwd(engine, "INSERT INTO customers DEFAULT VALUES") == "INSERT INTO customers (\"tenant_id\") VALUES ('acme')"
    # no column list, tenant column not covered: the list is written out
    assert fwd(engine, "INSERT INTO products_free VALUES (1)") == (
        "INSERT INTO products_free (\"product_id\", \"tenant_id\") VALUES (1, 'acme')"
    )
    refused(engine, "INSERT INTO products_free VALUES (1, 'globex')", state="42501")
    out = fwd(engine, "INSERT INTO customers (customer_id, name) SELECT customer_id + 10, name FROM customers")
    assert out.startswith("INSERT INTO customers (customer_id, name, \"tenant_id\") SELECT customer_id + 10, name, 'acme' FROM ")


def test_insert_tenant_literal_and_parameters(engine):
    assert fwd(engine, "INSERT INTO customers VALUES ('acme', 1, 'a')") == (
        "INSERT INTO customers (\"tenant_id\", \"customer_id\", \"name\") VALUES ('acme', 1, 'a')"
    )
    refused(engine, "INSERT INTO customers VALUES ('globex', 1, 'a')", state="42501")
    refused(engine, "INSERT INTO customers (tenant_id, customer_id) VALUES (lower('ACME'), 1)", state="42501")
    refused(engine, "INSERT INTO customers (tenant_id, customer_id) SELECT tenant_id, 1 FROM products", state="42501")
    d = engine.check("INSERT INTO customers (customer_id, tenant_id) VALUES ($1, $2)", ACME, Origin.PARSE)
    assert isinstance(d, Forward) and d.sql == "INSERT INTO customers (customer_id, tenant_id) VALUES ($1, $2)"
    (idx, check), = d.param_checks
    assert idx == 1 and check.accepts(0, b"acme") and not check.accepts(0, b"acme ") and not check.accepts(1, b"x")


def test_on_conflict_do_update_only_own_rows(engine):
    out = fwd(engine, "INSERT INTO customers AS c (customer_id, name) VALUES (1, 'a') ON CONFLICT (customer_id) DO UPDATE SET name = excluded.name WHERE c.name <> 'z' RETURNING name")
    assert out.endswith(
        "DO UPDATE SET name = excluded.name WHERE ( c.name <> 'z') AND (CASE WHEN \"c\".\"tenant_id\" = 'acme' THEN true "
        "ELSE CAST(CASE WHEN \"c\".\"tenant_id\" IS NULL THEN NULL ELSE 'tenantgate: ON CONFLICT DO UPDATE hit a row "
        "that belongs to another tenant' END AS boolean) END)  RETURNING name"
    )
    out = fwd(engine, "INSERT INTO customers (customer_id) VALUES (1) ON CONFLICT DO NOTHING")
    assert out == "INSERT INTO customers (customer_id, \"tenant_id\") VALUES (1, 'acme') ON CONFLICT DO NOTHING"


def test_writes_to_shared_system_views_refused(engine):
    refused(engine, "INSERT INTO products VALUES (9, 'x', 1)", state="42501")
    refused(engine, "UPDATE products SET price_cents = 0", state="42501")
    refused(engine, "DELETE FROM pg_catalog.pg_class", state="42501")
    refused(engine, "SELECT * FROM order_view", state="42501")  # undeclared view
    refused(engine, "SELECT * FROM secret.vault", state="42501")  # schema outside the rules


def test_merge(engine):
    out = fwd(engine, "MERGE INTO orders o USING customers c ON o.customer_id = c.customer_id WHEN MATCHED THEN DELETE")
    assert out == (
        f"MERGE INTO orders o USING {GUARD.format('customers')} c ON ( o.customer_id = c.customer_id) AND {P('o')}  "
        "WHEN MATCHED THEN DELETE"
    )
    out = fwd(engine, "MERGE INTO orders o USING products p ON false WHEN NOT MATCHED THEN INSERT (order_id, customer_id) VALUES (p.product_id, 1)")
    assert out.endswith("INSERT (order_id, customer_id, \"tenant_id\") VALUES (p.product_id, 1, 'acme')")
    refused(engine, "MERGE INTO orders o USING products p ON false WHEN MATCHED THEN UPDATE SET tenant_id = 'b'", state="42501")
    refused(engine, "MERGE INTO orders o USING products p ON false WHEN NOT MATCHED THEN INSERT (tenant_id, order_id) VALUES ('globex', 1)", state="42501")
    refused(engine, "MERGE INTO products p USING orders o ON false WHEN MATCHED THEN DELETE", state="42501")


# ---- COPY --------------------------------------------------------------------------------------
def test_copy(engine):
    assert fwd(engine, "COPY orders (order_id, status) TO STDOUT WITH (FORMAT csv)") == (
        f"COPY (SELECT order_id, status FROM {GUARD.format('orders')} AS \"orders\") TO STDOUT WITH (FORMAT csv)"
    )
    assert P("orders") in fwd(engine, "COPY (SELECT * FROM orders) TO STDOUT")
    assert fwd(engine, "COPY products TO STDOUT") == "COPY products TO STDOUT"
    refused(engine, "COPY orders FROM PROGRAM 'id'", state="42501")
    refused(engine, "COPY orders TO '/tmp/x'", state="42501")
    refused(engine, "COPY (SELECT 1) TO PROGRAM 'x'", state="42501")
    # without the tenant column: appended to the list, the rows get it (copy_fill.py)
    assert fwd(engine, "COPY customers (customer_id, name) FROM STDIN") == \
        'COPY customers (customer_id, name, "tenant_id") FROM STDIN'
    refused(engine, "COPY products FROM STDIN", state="42501")


def _copy_check(engine, sql):
    d = engine.check(sql, ACME)
    assert isinstance(d, Forward) and d.copy_in_check is not None
    return d.copy_in_check()


def test_copy_in_text_format_across_chunks(engine):
    c = _copy_check(engine, "COPY customers FROM STDIN")
    for chunk in [b"acme\t1\tA\\\tB\t", b"\\N\nac", b"me\t2\tx\\\ny\tz@x\n", b"\\.\n"]:
        assert c.feed(chunk) is None
    assert c.finish() is None
    c = _copy_check(engine, "COPY customers FROM STDIN")
    assert c.feed(b"acme\t1\ta\t\\N\nglob") is None
    assert "not the session's tenant" in c.feed(b"ex\t2\tb\t\\N\n")
    c = _copy_check(engine, "COPY customers FROM STDIN")
    assert c.feed(b"\\x61cme\t1\ta\t\\N\n") is None  # escapes are decoded before comparing
    assert "NULL" in (c.feed(b"\\N\t1\ta\tb\n") or "")
    c = _copy_check(engine, "COPY customers FROM STDIN")
    assert "columns" in (c.feed(b"acme\t1\n") or "")
    c = _copy_check(engine, "COPY customers FROM STDIN")
    assert c.feed(b"acme\t1\ta\tb") is None and c.finish() is None  # last line without newline


def test_copy_in_csv_and_binary(engine):
    c = _copy_check(engine, "COPY customers (name, tenant_id) FROM STDIN WITH (FORMAT csv, HEADER true)")
    assert c.feed(b"name,tenant_id\n\"multi\nline, with \"\"quotes\"\"\",acme\n\"x\",\"ac") is None
    assert c.feed(b"me\"\n") is None and c.finish() is None
    c = _copy_check(engine, "COPY customers (name, tenant_id) FROM STDIN CSV")
    assert c.feed(b"a,\"globex\"\n") is not None
    import struct

    def row(*vals):
        out = struct.pack("!h", len(vals))
        for v in vals:
            out += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
        return out

    data = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0) + row(b"acme", b"x") + row(b"acme", None) + struct.pack("!h", -1)
    c = _copy_check(engine, "COPY customers (tenant_id, name) FROM STDIN (FORMAT binary)")
    for i in range(0, len(data), 3):
        assert c.feed(data[i : i + 3]) is None
    assert c.finish() is None
    bad = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0) + row(b"globex", b"x")
    c = _copy_check(engine, "COPY customers (tenant_id, name) FROM STDIN (FORMAT binary)")
    assert c.feed(bad) is not None


# ---- commands ------------------------------------------------------------------------------------
def test_set_show_reset_safe_list(engine):
    for sql in ["SET application_name = 'x'", "SET SESSION TimeZone TO 'UTC'", "SET LOCAL statement_timeout = 0",
                "SET extra_float_digits = 3", "SET client_encoding TO 'UTF8'", "SET DateStyle = ISO, MDY",
                "SHOW TimeZone", "RESET application_name", "SET TIME ZONE 'UTC'"]:
        assert fwd(engine, sql) == sql
    for sql in ["SET search_path = public, secret", "SET ROLE postgres", "SET SESSION AUTHORIZATION postgres",
                "SET tenantgate.tenant_id = 'globex'", "SET row_security = off", "RESET search_path",
                "SET standard_conforming_strings = off", "SET \"search_path\" TO x"]:
        refused(engine, sql, state="42501")
    # server paths and commands stay hidden (proxy/policy/catalog_views.py)
    for sql in ["SHOW ALL", "SHOW archive_command", "SHOW hba_file", "SHOW ssl_key_file"]:
        refused(engine, sql, state="42501")
    assert fwd(engine, "SHOW search_path") == "SHOW search_path"
    # drivers' resets: the client's own state, forwarded as sent (proxy/policy/resets.py)
    for sql in ["RESET ALL", "DISCARD ALL", "reset all;"]:
        d = engine.check(sql, ACME)
        assert isinstance(d, Forward) and d.sql == sql and d.resets_settings, (sql, d)
    for sql in ["DISCARD PLANS", "DISCARD SEQUENCES", "DISCARD TEMP", "UNLISTEN *", "UNLISTEN ch", "CLOSE ALL"]:
        d = engine.check(sql, ACME)
        assert isinstance(d, Forward) and d.sql == sql and not d.resets_settings, (sql, d)
    refused(engine, "DISCARD EVERYTHING", state="42601")
    refused(engine, "UNLISTEN a, b", state="42601")
    for sql in ["LISTEN ch", "NOTIFY ch"]:
        refused(engine, sql)
    # any other use of the function is left to the function allowlist (tests/test_driver_resets.py)
    for sql in ["SELECT pg_advisory_unlock_all(), 1", 'SELECT "pg_advisory_unlock_all"()']:
        assert "void" not in fwd(engine, sql)


def test_advisory_unlock_all_is_answered_without_calling_it(engine):
    for sql in ["SELECT pg_advisory_unlock_all()", "select PG_ADVISORY_UNLOCK_ALL ( );",
                "SELECT pg_catalog.pg_advisory_unlock_all()", "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;"]:
        out = fwd(engine, sql)
        assert "pg_advisory_unlock_all()" not in out.lower().replace(" ", "")
        assert "''::pg_catalog.void AS pg_advisory_unlock_all" in out, out


def test_transaction_control(engine):
    for sql in ["BEGIN", "BEGIN ISOLATION LEVEL SERIALIZABLE", "START TRANSACTION READ ONLY", "COMMIT", "END",
                "ROLLBACK", "SAVEPOINT s1", "RELEASE SAVEPOINT s1", "ROLLBACK TO SAVEPOINT s1", "ABORT"]:
        d = engine.check(sql, ACME)
        assert isinstance(d, Forward) and d.sql == sql and d.statement_class == "tcl", (sql, d)
    refused(engine, "COMMIT PREPARED 'x'", state="0A000")
    refused(engine, "PREPARE TRANSACTION 'x'", state="0A000")


def test_prepare_execute_deallocate(engine):
    a = engine.analyze("PREPARE p (int) AS SELECT * FROM orders WHERE order_id = $1", ACME)
    assert isinstance(a.decision, Forward) and a.effects.prepared == ("p",)
    assert P("orders") in a.decision.sql
    refused(engine, "EXECUTE p(1)", state="42501")
    ctx = PolicyContext(tenant="acme", prepared_names=frozenset({"p"}))
    assert fwd(engine, "EXECUTE p(1)", ctx) == "EXECUTE p(1)"
    refused(engine, "EXECUTE p((SELECT order_id FROM orders LIMIT 1))", ctx, state="0A000")
    assert engine.analyze("DEALLOCATE p", ctx).effects.deallocated == ("p",)
    assert engine.analyze("DEALLOCATE ALL", ctx).effects.deallocate_all


def test_explain_declare_fetch(engine):
    assert fwd(engine, "EXPLAIN SELECT * FROM orders") == f"EXPLAIN SELECT * FROM orders WHERE {P('orders')} "
    assert fwd(engine, "EXPLAIN (ANALYZE false, FORMAT json) DELETE FROM orders").startswith("EXPLAIN (ANALYZE false")
    # ANALYZE's "Rows Removed by Filter" counts other tenants' rows (and tests their values)
    for sql in ("EXPLAIN ANALYZE SELECT * FROM orders", "EXPLAIN (ANALYZE true, FORMAT json) DELETE FROM orders",
                "EXPLAIN (FORMAT text, ANALYSE) SELECT 1 FROM customers WHERE email = 'x'"):
        assert refused(engine, sql).sqlstate == "42501", sql
    assert P("orders") in fwd(engine, "DECLARE c SCROLL CURSOR WITH HOLD FOR SELECT * FROM orders")
    assert fwd(engine, "FETCH FORWARD 10 FROM c") == "FETCH FORWARD 10 FROM c"
    assert fwd(engine, "CLOSE c") == "CLOSE c"
    refused(engine, "EXPLAIN CREATE TABLE x (a int)")


def test_refused_statement_kinds(engine):
    for sql, state in [
        ("LISTEN ch", "42501"), ("NOTIFY ch", "42501"), ("CREATE TABLE x (a int)", "42501"),
        ("DROP TABLE orders", "42501"), ("ALTER TABLE orders ADD c int", "42501"), ("TRUNCATE orders", "42501"),
        ("GRANT ALL ON orders TO public", "42501"), ("DO $$ BEGIN END $$", "42501"), ("CALL p()", "42501"),
        ("VACUUM orders", "42501"), ("LOCK TABLE orders", "42501"), ("SELECT * INTO t2 FROM orders", "42501"),
        ("SELECT * FROM nosuchtable", "42P01"), ("SELECT * FROM otherdb.public.orders", "0A000"),
("SELECT * FROM orders TABLESAMPLE SYSTEM (50)", "0A000"),
        ("FOO BAR", None), ("SELECT * FROM", None),
    ]:
        d = refused(engine, sql)
        if state:
            assert d.sqlstate == state, (sql, d)
        else:
            assert d.sqlstate in ("0A000", "42601", "42501"), (sql, d)


# ---- contexts ------------------------------------------------------------------------------------
def test_tenantless_session(engine):
    none = PolicyContext(tenant=None)
    assert fwd(engine, "SELECT 1", none) == "SELECT 1"
    assert fwd(engine, "SELECT * FROM products", none) == "SELECT * FROM products"
    assert fwd(engine, "SHOW TimeZone", none) == "SHOW TimeZone"
    refused(engine, "SELECT * FROM orders", none, state="42501")
    refused(engine, "SELECT 1 WHERE EXISTS (SELECT 1 FROM customers)", none, state="42501")


def test_read_only_session(engine):
    ro = PolicyContext(tenant="acme", read_only=True, read_only_message="tenant acme is offboarded")
    assert P("orders") in fwd(engine, "SELECT * FROM orders", ro)
    for sql in ["DELETE FROM orders", "INSERT INTO customers (customer_id) VALUES (1)", "BEGIN READ WRITE",
                "SET default_transaction_read_only = off", "SET TRANSACTION READ WRITE",
                "SELECT * FROM orders FOR UPDATE", "WITH d AS (DELETE FROM orders RETURNING 1) SELECT 1",
                "COPY customers FROM STDIN"]:
        d = refused(engine, sql, ro, state="25006")
        assert d.message == "tenant acme is offboarded"
    assert fwd(engine, "EXPLAIN UPDATE orders SET status = 'x'", ro)
    assert fwd(engine, "BEGIN READ ONLY", ro) == "BEGIN READ ONLY"


def test_tenant_literal_is_quoted(engine):
    out = fwd(engine, "SELECT * FROM orders", PolicyContext(tenant="o'brien"))
    assert "\"tenant_id\" = 'o''brien'" in out
    out = fwd(engine, "SELECT * FROM orders", PolicyContext(tenant="a\\'; DROP TABLE x; --"))
    assert "= 'a\\''; DROP TABLE x; --'" in out


def test_cache_is_tenant_independent(engine):
    cache = engine.cache
    sql = "SELECT count(*) FROM orders WHERE status = $1"
    a = fwd(engine, sql, ACME, Origin.PARSE)
    hits = cache.hits
    b = fwd(engine, sql, PolicyContext(tenant="globex"), Origin.PARSE)
    assert cache.hits == hits + 1
    # the cached template is instantiated with each session's own tenant, not the first one's
    assert a == f"SELECT count(*) FROM orders WHERE ( status = $1) AND {P('orders')} "
    assert b == a.replace("'acme'", "'globex'") and "'acme'" not in b
    d = engine.analyze(sql, ACME, Origin.PARSE)
    assert d.cached


def test_unknown_array_type_casts_parse(engine):
    # asyncpg's type introspection: `ti.oid = any($1::oid[])`
    sql = "SELECT ti.oid FROM pg_catalog.pg_type ti WHERE ti.oid = any($1::oid[])"
    assert fwd(engine, sql, origin=Origin.PARSE) == sql


def test_prepare_and_execute_in_one_query(engine):
    assert fwd(engine, "PREPARE q(int) AS SELECT * FROM orders WHERE order_id = $1; EXECUTE q(1)").endswith("; EXECUTE q(1)")
    refused(engine, "DEALLOCATE q; EXECUTE q(1)", state="42501")


def test_tenant_value_cast_to_its_own_type(engine):
    d = engine.check("INSERT INTO customers (tenant_id, customer_id) VALUES ($1::VARCHAR, $2)", ACME, Origin.PARSE)
    assert isinstance(d, Forward) and [i for i, _ in d.param_checks] == [0]
    assert fwd(engine, "INSERT INTO customers (tenant_id, customer_id) VALUES ('acme'::text, 1)")
    refused(engine, "INSERT INTO customers (tenant_id, customer_id) VALUES ('globex'::text, 1)", state="42501")
    # char(1) would truncate the value: not accepted
    refused(engine, "INSERT INTO customers (tenant_id, customer_id) VALUES ($1::char, 1)", origin=Origin.PARSE, state="42501")


def test_numeric_literals_share_one_cache_entry(engine):
    before = engine.cache.misses
    a = fwd(engine, "SELECT status FROM orders WHERE order_id = 4711")
    b = fwd(engine, "SELECT status FROM orders WHERE order_id = 815")
    assert engine.cache.misses == before + 1
    assert a.replace("4711", "815") == b and P("orders") in b
    # string literals are part of the key (the function allowlist looks at some of them)
    fwd(engine, "SELECT status FROM orders WHERE status = 'a'")
    fwd(engine, "SELECT status FROM orders WHERE status = 'b'")
    assert engine.cache.misses == before + 3


# ---- COPY FROM under row-level security: the bootstrap's tenantgate_copy views ------------------
COPY_VIEW = RelationRow("tenantgate_copy", "public.customers", "v",
                        (("tenant_id", "text"), ("customer_id", "integer"), ("name", "text"), ("email", "text")))


@pytest.fixture(scope="module")
def copy_engine():
    return demo_engine(extra=[
        COPY_VIEW,
        RelationRow("public", "gen", "r", (("tenant_id", "text"), ("a", "integer"), ("b", "integer"))),
        RelationRow("tenantgate_copy", "public.gen", "v", (("tenant_id", "text"), ("a", "integer"))),
        # a view that does not fit its table is never used
        RelationRow("tenantgate_copy", "public.orders", "v", (("tenant_id", "text"), ("nope", "integer"))),
    ])


def test_copy_from_goes_through_the_copy_view_when_it_exists(copy_engine):
    d = copy_engine.check("COPY customers (tenant_id, customer_id, name) FROM STDIN", ACME)
    assert isinstance(d, Forward)
    assert d.sql == 'COPY "tenantgate_copy"."public.customers" (tenant_id, customer_id, name) FROM STDIN'
    c = d.copy_in_check()
    assert "not the session's tenant" in c.feed(b"globex\t1\tx\n")
    assert fwd(copy_engine, "COPY public.customers FROM STDIN (FORMAT binary)") == (
        'COPY "tenantgate_copy"."public.customers" FROM STDIN (FORMAT binary)')
    # without a column list the view's columns count (generated columns are not copied)
    c = _copy_check(copy_engine, "COPY gen FROM STDIN")
    assert c.feed(b"acme\t1\n\\.\n") is None and c.finish() is None
    assert fwd(copy_engine, "COPY gen FROM STDIN").startswith('COPY "tenantgate_copy"."public.gen" FROM')
    # naming a column the view lacks: plain COPY (PostgreSQL gives its own error)
    assert fwd(copy_engine, "COPY gen (tenant_id, b) FROM STDIN") == "COPY gen (tenant_id, b) FROM STDIN"
    assert fwd(copy_engine, "COPY orders (tenant_id) FROM STDIN") == "COPY orders (tenant_id) FROM STDIN"
    # COPY TO is unchanged
    assert "tenantgate_copy" not in fwd(copy_engine, "COPY customers TO STDOUT")


def test_copy_without_views_stays_plain(engine):
    assert fwd(engine, "COPY customers FROM STDIN") == "COPY customers FROM STDIN"


def test_copy_views_cannot_be_named_by_clients(copy_engine):
    for sql in ['SELECT * FROM tenantgate_copy."public.customers"',
                'INSERT INTO tenantgate_copy."public.customers" (tenant_id, customer_id) VALUES (\'acme\', 1)',
                'COPY tenantgate_copy."public.customers" FROM STDIN',
                'COPY tenantgate_copy."public.customers" TO STDOUT']:
        refused(copy_engine, sql, state="42501")


# ---- keywords sqlglot parses as function calls --------------------------------------------------
@pytest.fixture(scope="module")
def checked_engine():
    from proxy.policy.allowlist import FunctionChecker
    from support.demo_policy import demo_rules

    return demo_engine(FunctionChecker.from_rules(demo_rules()))


def test_row_constructor_is_not_a_function_call(checked_engine):
    assert fwd(checked_engine, "SELECT ROW(1, 'a')") == "SELECT ROW(1, 'a')"
    assert P("customers") in fwd(checked_engine, "SELECT row(1, (SELECT name FROM customers LIMIT 1))")
    # its arguments are still checked; a quoted or qualified "row" is a real function call
    refused(checked_engine, "SELECT ROW(pg_read_file('/etc/passwd'))", state="42501")
    refused(checked_engine, 'SELECT "row"(1, 2)', state="42501")
    refused(checked_engine, "SELECT public.row(1)", state="42501")


def test_all_some_over_a_set_operation_is_a_comparison(checked_engine):
    out = fwd(checked_engine, "SELECT 1 <> ALL ((SELECT 1) UNION (SELECT customer_id FROM customers))")
    assert P("customers") in out
    fwd(checked_engine, "SELECT 1 = SOME ((SELECT 1) UNION (SELECT 2))")
    refused(checked_engine, 'SELECT 1 <> "all"((SELECT 1))', state="42501")
    refused(checked_engine, "SELECT 1 <> ALL ((SELECT 1) UNION (SELECT lo_import('/etc/passwd')))", state="42501")


def test_cte_named_like_a_denied_catalog_is_the_cte(checked_engine):
    sql = "WITH pg_stats AS (SELECT 1 AS x) SELECT * FROM pg_stats"
    assert fwd(checked_engine, sql) == sql
    # but not inside its own (non-recursive) definition, nor when qualified, nor outside its scope
    refused(checked_engine, "WITH pg_stats AS (SELECT * FROM pg_stats) SELECT * FROM pg_stats", state="42501")
    refused(checked_engine, "WITH pg_stats AS (SELECT 1 AS x) SELECT * FROM pg_catalog.pg_stats", state="42501")
    refused(checked_engine, "SELECT * FROM (WITH pg_stats AS (SELECT 1) SELECT 1) s, pg_stats", state="42501")
    refused(checked_engine, "WITH a AS (SELECT * FROM pg_stats), pg_stats AS (SELECT 1) SELECT * FROM a", state="42501")


# ---- places where a naive reading of the text differs from PostgreSQL's lexer (security review)


@pytest.mark.parametrize("sql, table_alias", [
    ("--\rSELECT * FROM customers", '"customers"'),  # PostgreSQL ends a -- comment at \r too
    ("SELECT 1;--\rDELETE FROM orders", '"orders"'),
    ("SELECT 1 --\r, name FROM customers", '"customers"'),
])
def test_carriage_return_ends_a_line_comment_as_in_postgresql(engine, sql, table_alias):
    d = engine.check(sql, ACME, Origin.SIMPLE)
    assert isinstance(d, Forward), d
    assert f"{table_alias}.\"tenant_id\" = 'acme'" in d.sql, d.sql


@pytest.mark.parametrize("space", ["\xa0", "\u3000", "\u2003", "\u2028", "\x85", "\x0b", "\x1c"])
def test_characters_that_are_not_whitespace_to_postgresql_are_refused(engine, space):
    # sqlglot would skip them; PostgreSQL reads the non-ASCII ones as part of an identifier:
    # `orders AS o<NBSP>` is the alias "o<NBSP>", and the filter would land on the VALUES row
    sql = f"DELETE FROM orders AS o{space} USING (VALUES ('acme')) o(tenant_id)"
    assert refused(engine, sql).sqlstate == "42601"
    assert isinstance(engine.check(f"SELECT '{space}' AS inside_a_string", ACME), Forward)


def test_astral_characters_do_not_make_numeric_literals_for_the_cache(engine):
    primed = "SELECT * FROM customers x\U0001F600" "1, (VALUES ('acme')) x\U0001F600" "2(tenant_id)"
    attack = "SELECT * FROM customers x\U0001F600" "2, (VALUES ('acme')) x\U0001F600" "1(tenant_id)"
    fwd(engine, primed)
    sql = fwd(engine, attack)
    assert "\"x\U0001F6002\".\"tenant_id\" = 'acme'" in sql, sql


@pytest.mark.parametrize("encoding, ok", [("UTF8", True), ("'utf-8'", True), ("LATIN1", True), ("SQL_ASCII", True),
                                          ("'SJIS'", False), ("BIG5", False), ("GBK", False), ("'GB18030'", False)])
def test_only_client_encodings_that_keep_ascii_bytes_ascii(engine, encoding, ok):
    d = engine.check(f"SET client_encoding = {encoding}", ACME)
    assert isinstance(d, Forward) == ok, d
    if not ok:
        assert d.sqlstate == "0A000"


def test_one_column_row_assignment_cannot_change_the_tenant_column(engine):
    """SET (col) = ROW(...) is allowed for ordinary columns, never for the tenant column."""
    out = fwd(engine, "UPDATE orders SET (amount) = ROW(amount + 1) WHERE id = 1")
    assert "'acme'" in out
    for sql in ("UPDATE orders SET (tenant_id) = ROW('globex')",
                "UPDATE orders SET (tenant_id) = (SELECT 'globex')",
                "UPDATE orders SET (amount, tenant_id) = (1, 'globex')"):
        r = refused(engine, sql)
        assert r.sqlstate in ("42501", "0A000"), (sql, r)
