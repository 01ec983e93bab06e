"""The second opinion (proxy/policy/pg_verify.py): hand-written rewritten texts checked on
PostgreSQL's parse tree, without sqlglot.  ``{T}`` marks where the rewriter put the tenant
(the verifier only trusts a marker at such an offset).  Plus: with sqlglot's injection and its
injection sabotaged, the PostgreSQL-side verifier alone refuses (sqlglot never checks itself).
"""

from __future__ import annotations

import pytest

from proxy.policy import pipeline
from support.demo_policy import demo_engine, demo_rules, demo_snapshot
from proxy.policy.context import PolicyContext
from proxy.policy.errors import PolicyRefusal
from proxy.policy.edits import TENANT, Injection
from proxy.policy.pg_verify import MARKER, marker_offsets, pg_verify
from proxy.seam import Forward, Origin, Refuse

RULES = demo_rules()
SNAP = demo_snapshot(RULES)
MSQL = f"'{MARKER}'"


def check(text: str, *, params=(), literals=()) -> None:
    parts: list = []
    for i, seg in enumerate(text.split("{T}")):
        if i:
            parts.append(TENANT)
        parts.append(seg)
    sql, markers = marker_offsets(parts, MSQL, TENANT)
    pg_verify(sql, markers, SNAP, RULES, param_checks=set(params), required_literals=literals)


def refused(text: str, state: str | None = None, words: str = "", **kw) -> PolicyRefusal:
    with pytest.raises(PolicyRefusal) as ei:
        check(text, **kw)
    if state:
        assert ei.value.sqlstate == state, ei.value.message
    assert words in ei.value.message, ei.value.message
    return ei.value


ACCEPTED = [
    'SELECT * FROM customers c WHERE (c.name = \'x\') AND "c"."tenant_id" = {T}',
    'SELECT * FROM (SELECT * FROM customers WHERE "tenant_id" = {T}) AS customers',
    'SELECT * FROM ONLY (customers) WHERE "customers"."tenant_id" = {T}',
    'SELECT * FROM public.customers WHERE customers.tenant_id = {T}',
    'SELECT * FROM "customers" WHERE "customers"."tenant_id" = {T}',
    'SELECT \'é日本\' AS "ü" FROM customers WHERE customers.tenant_id = {T}',  # markers at UTF-8 byte offsets
    'SELECT * FROM customers c LEFT JOIN orders o ON (o.customer_id = c.customer_id) AND "o"."tenant_id" = {T} '
    'WHERE "c"."tenant_id" = {T}',
    'SELECT * FROM customers c RIGHT JOIN orders o ON (o.customer_id = c.customer_id) AND "c"."tenant_id" = {T} '
    'WHERE "o"."tenant_id" = {T}',
    'SELECT * FROM customers c JOIN orders o ON o.customer_id = c.customer_id AND o.tenant_id = {T} '
    'WHERE c.tenant_id = {T}',
    'SELECT * FROM products p LEFT JOIN (customers c INNER JOIN (SELECT) AS tenantgate_guard_1 '
    'ON "c"."tenant_id" = {T}) USING (name)',
    'SELECT * FROM customers c FULL JOIN orders o ON (o.customer_id = c.customer_id) AND c.tenant_id = {T} '
    'AND o.tenant_id = {T} WHERE (c.tenant_id = {T} OR c.tenant_id IS NULL) '
    'AND (o.tenant_id = {T} OR o.tenant_id IS NULL)',
    'WITH x AS (SELECT * FROM customers WHERE customers.tenant_id = {T}) SELECT * FROM x',
    'WITH customers AS (SELECT * FROM customers WHERE customers.tenant_id = {T}) SELECT * FROM customers',
    'WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SELECT * FROM r',
    'SELECT 1 UNION SELECT customer_id FROM customers WHERE customers.tenant_id = {T}',
    'SELECT (SELECT count(*) FROM orders o WHERE o.customer_id = c.customer_id AND o.tenant_id = {T}) '
    'FROM customers c WHERE c.tenant_id = {T}',
    'SELECT * FROM customers c, LATERAL (SELECT * FROM orders o WHERE o.customer_id = c.customer_id '
    'AND o.tenant_id = {T}) l WHERE c.tenant_id = {T}',
    'SELECT * FROM generate_series(1, (SELECT count(*) FROM orders WHERE orders.tenant_id = {T}))',
    'SELECT * FROM products FOR UPDATE OF nothing_else_here' if False else 'SELECT * FROM products',
    'SELECT * FROM customers c JOIN products p ON true WHERE c.tenant_id = {T} FOR UPDATE OF c',
    'SELECT * FROM (SELECT * FROM customers WHERE "tenant_id" = {T}) AS customers FOR UPDATE',
    'UPDATE customers c SET name = \'x\' WHERE (c.customer_id = 1) AND "c"."tenant_id" = {T}',
    'UPDATE customers SET name = o.status FROM (SELECT * FROM orders WHERE "tenant_id" = {T}) AS o '
    'WHERE (o.customer_id = customers.customer_id) AND customers.tenant_id = {T} RETURNING customers.name',
    'DELETE FROM orders WHERE "orders"."tenant_id" = {T} RETURNING order_id',
    'INSERT INTO customers (customer_id, name, "tenant_id") VALUES (1, \'a\', {T}), (2, \'b\', {T})',
    'INSERT INTO customers (customer_id, "tenant_id") SELECT customer_id, {T} FROM customers '
    'WHERE customers.tenant_id = {T}',
    'INSERT INTO customers (customer_id, "tenant_id") SELECT *, {T} FROM (SELECT 1 UNION SELECT 2) AS q',
    'INSERT INTO customers AS x (customer_id, "tenant_id") VALUES (1, {T}) ON CONFLICT (tenant_id, customer_id) '
    'DO UPDATE SET name = excluded.name WHERE (CASE WHEN "x"."tenant_id" = {T} THEN true ELSE CAST(CASE WHEN '
    '"x"."tenant_id" IS NULL THEN NULL ELSE \'tenantgate: ON CONFLICT DO UPDATE hit a row that belongs to '
    'another tenant\' END AS boolean) END)',
    'INSERT INTO customers (customer_id, tenant_id) VALUES (1, {T}) ON CONFLICT DO NOTHING',
    'MERGE INTO customers c USING (SELECT * FROM orders WHERE "tenant_id" = {T}) AS o ON (c.customer_id = '
    'o.customer_id) AND "c"."tenant_id" = {T} WHEN MATCHED THEN UPDATE SET name = o.status '
    'WHEN NOT MATCHED THEN INSERT (customer_id, name, "tenant_id") VALUES (o.customer_id, o.status, {T})',
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_correct_rewrites_pass(text):
    check(text)


def test_checked_literals_and_parameters_pass():
    check("INSERT INTO customers (customer_id, tenant_id) VALUES (1, 'acme')", literals=("acme",))
    check("INSERT INTO customers (customer_id, tenant_id) VALUES (1, $1), (2, $1::text)", params={0})
    check("INSERT INTO customers (tenant_id, customer_id) SELECT 'acme', (z).* FROM (SELECT 1) z", literals=("acme",))
    # PostgreSQL insists on exactly as many values as listed columns, so positions after the last
    # expansion are exact counted from the end
    check("INSERT INTO customers (name, tenant_id, customer_id) VALUES ((z).*, {T}, 1)")


MUST_REFUSE = [
    # a missing predicate, in every position
    ("SELECT * FROM customers", "public.customers is not filtered"),
    ("WITH x AS (SELECT * FROM customers) SELECT * FROM x", "public.customers is not filtered"),
    ("SELECT 1 WHERE EXISTS (SELECT 1 FROM orders)", "public.orders"),
    ("SELECT * FROM customers c WHERE c.tenant_id = {T} UNION SELECT * FROM customers", "public.customers"),
    ("SELECT * FROM customers c, LATERAL (SELECT * FROM orders o WHERE o.customer_id = c.customer_id) l "
     "WHERE c.tenant_id = {T}", "public.orders"),
    ("SELECT * FROM generate_series(1, (SELECT count(*) FROM orders))", "public.orders"),
    ("SELECT * FROM customers c WHERE c.tenant_id = {T} ORDER BY (SELECT max(order_id) FROM orders)", "orders"),
    # the nullable side filtered in WHERE (null-extension decided by other tenants' rows)
    ("SELECT c.* FROM customers c LEFT JOIN orders o ON o.customer_id = c.customer_id "
     "WHERE c.tenant_id = {T} AND o.tenant_id = {T}", "public.orders"),
    # the preserved side "filtered" in a LEFT JOIN's ON
    ("SELECT * FROM customers c LEFT JOIN orders o ON o.customer_id = c.customer_id AND c.tenant_id = {T} "
     "WHERE o.tenant_id = {T}", "public.customers"),
    # nullable below the filtering join
    ("SELECT * FROM (customers c LEFT JOIN orders o ON o.customer_id = c.customer_id) JOIN products p "
     "ON o.tenant_id = {T} WHERE c.tenant_id = {T}", "public.orders"),
    # FULL JOIN without the "or null" conjunct
    ("SELECT * FROM customers c FULL JOIN orders o ON (o.customer_id = c.customer_id) AND c.tenant_id = {T} "
     "AND o.tenant_id = {T}", "public.customers"),
    # predicate not a top-level conjunct, or in another scope
    ("SELECT * FROM customers c WHERE c.tenant_id = {T} OR true", "public.customers"),
    ("SELECT * FROM customers c WHERE EXISTS (SELECT 1 WHERE c.tenant_id = {T})", "public.customers"),
    ("SELECT * FROM customers c WHERE NOT (c.tenant_id = {T})", "public.customers"),
    ("SELECT * FROM customers c WHERE c.tenant_id <> {T}", "public.customers"),
    ("SELECT * FROM customers c WHERE c.tenant_id = {T}::text || 'x'", "public.customers"),
    # wrong reference name, join alias hiding, column aliases renaming the tenant column
    ("SELECT * FROM customers c WHERE customers.tenant_id = {T}", "public.customers"),
    ("SELECT * FROM customers c, orders o WHERE o.tenant_id = {T}", "public.customers"),
    ("SELECT * FROM (customers JOIN orders o USING (customer_id)) AS j WHERE customers.tenant_id = {T} "
     "AND o.tenant_id = {T}", "public."),
    ("SELECT * FROM customers AS c(x, tenant_id) WHERE c.tenant_id = {T}", "public.customers"),
    ("SELECT * FROM customers, orders WHERE tenant_id = {T}", "public."),
    # a forged marker: the client wrote the marker text itself
    ("SELECT * FROM customers WHERE customers.tenant_id = 'tenantgate:verify'", "public.customers"),
    ("SELECT * FROM customers WHERE customers.tenant_id = E'tenantgate\\x3averify'", "public.customers"),
    # DML targets
    ("UPDATE customers SET name = 'x'", "UPDATE of public.customers"),
    ("UPDATE customers SET name = 'x' WHERE customers.tenant_id = {T} OR true", "UPDATE of"),
    ("UPDATE customers SET name = o.status FROM orders o WHERE customers.tenant_id = {T}", "public.orders"),
    ("DELETE FROM customers WHERE customers.tenant_id = {T} RETURNING (SELECT count(*) FROM orders)",
     "public.orders"),
    ("DELETE FROM customers USING orders o WHERE customers.tenant_id = {T}", "public.orders"),
    ("DELETE FROM customers WHERE CURRENT OF cur", "DELETE from public.customers"),
    ("INSERT INTO customers (customer_id, name) VALUES (1, 'x')", "tenant column exactly once"),
    ("INSERT INTO customers VALUES ({T}, 1)", "tenant column exactly once"),
    ("INSERT INTO customers (tenant_id, customer_id, tenant_id) VALUES ({T}, 1, {T})", "exactly once"),
    ("INSERT INTO customers DEFAULT VALUES", "tenant column"),
    ("INSERT INTO customers (customer_id, tenant_id) VALUES (1, {T}), (2, 'globex')", "tenant column"),
    ("INSERT INTO customers (customer_id, tenant_id) SELECT 1, {T} UNION SELECT 2, 'globex'", "cannot be located"),
    ("INSERT INTO customers (customer_id, tenant_id) SELECT o.order_id, o.tenant_id FROM orders o "
     "WHERE o.tenant_id = {T}", "tenant column"),
    ("INSERT INTO customers (customer_id, tenant_id) VALUES (1, {T}) RETURNING (SELECT max(name) FROM customers)",
     "public.customers"),
    ("INSERT INTO customers (customer_id, tenant_id) VALUES (1, {T}) ON CONFLICT (tenant_id, customer_id) "
     "DO UPDATE SET name = 'x'", "ON CONFLICT DO UPDATE"),
    ("INSERT INTO customers (customer_id, tenant_id) VALUES (1, {T}) ON CONFLICT (tenant_id, customer_id) "
     "DO UPDATE SET tenant_id = 'globex' WHERE customers.tenant_id = {T}", "changing the tenant column"),
    ("WITH w AS (INSERT INTO orders (order_id, customer_id) VALUES (1, 1) RETURNING *) SELECT * FROM w",
     "tenant column"),
    ("INSERT INTO products (product_id, name) VALUES (1, 'x')", "cannot write to public.products"),
    # MERGE
    ("MERGE INTO customers c USING orders o ON (c.customer_id = o.customer_id) AND c.tenant_id = {T} "
     "WHEN MATCHED THEN DO NOTHING", "MERGE source public.orders"),
    ("MERGE INTO customers c USING orders o ON c.customer_id = o.customer_id AND c.tenant_id = {T} "
     "AND o.tenant_id = {T} WHEN NOT MATCHED THEN INSERT (customer_id, tenant_id) VALUES (o.customer_id, {T})",
     "MERGE source public.orders"),
    ("MERGE INTO customers c USING (SELECT 1 AS id) s ON c.customer_id = s.id WHEN MATCHED THEN DELETE",
     "not bound to the tenant"),
    ("MERGE INTO customers c USING (SELECT 1 AS id) s ON c.customer_id = s.id AND c.tenant_id = {T} "
     "WHEN NOT MATCHED THEN INSERT (customer_id) VALUES (s.id)", "exactly once"),
    ("MERGE INTO customers c USING (SELECT 1 AS id) s ON c.customer_id = s.id AND c.tenant_id = {T} "
     "WHEN MATCHED THEN UPDATE SET tenant_id = 'globex'", "changing the tenant column"),
    # row expansion decides where the tenant value lands (issue 12, break 2)
    ("INSERT INTO customers (name, tenant_id, customer_id) SELECT (z).*, 'acme', (g).* FROM (SELECT) z, "
     "(SELECT 'globex' AS t, 78 AS d) g", "row expansion"),
    ("INSERT INTO customers (name, tenant_id, customer_id) VALUES ((z).*, {T}, (z).*)", "row expansion"),
    ("INSERT INTO customers (customer_id, tenant_id, name) SELECT *, {T}, q.* FROM (SELECT 1, 2) q",
     "row expansion"),
    ("MERGE INTO customers c USING (SELECT 1 AS id) s ON c.customer_id = s.id AND c.tenant_id = {T} "
     "WHEN NOT MATCHED THEN INSERT (name, tenant_id, customer_id) VALUES ((s).*, {T}, s.*)", "row expansion"),
    # counted from the end past an expansion, the value at the tenant column's place is not the tenant
    ("INSERT INTO customers (name, tenant_id, customer_id) VALUES ((z).*, 'x', {T})", "plain literal"),
    # what PostgreSQL reads is not what the sqlglot passes modelled
    ("SELECT 1; SELECT * FROM customers", "2 statements"),
    ("CREATE TABLE x AS SELECT * FROM customers WHERE customers.tenant_id = {T}", "CreateTableAsStmt"),
    ("SELECT * INTO x FROM products", "SELECT INTO"),
    ("SELECT * FROM tenantgate_nonexistent", "not known"),
    ("SELECT * FROM customers TABLESAMPLE SYSTEM (50) WHERE customers.tenant_id = {T}", "TABLESAMPLE"),
    ("SELECT * FROM pg_temp.customers", "not accessible"),
]


@pytest.mark.parametrize("text,words", MUST_REFUSE)
def test_unfiltered_or_unbound_rewrites_are_refused(text, words):
    refused(text, words=words)


def test_literal_must_be_the_value_the_proxy_checked():
    # sqlglot's idea of the literal ("acme") is not what PostgreSQL decodes: refused
    refused("INSERT INTO customers (customer_id, tenant_id) VALUES (1, E'acm\\x65x')", "42501", literals=("acme",))
    refused("INSERT INTO customers (customer_id, tenant_id) VALUES (1, 'globex')", "42501", literals=("acme",))
    refused("INSERT INTO customers (customer_id, tenant_id) VALUES (1, $2)", "42501", params={0})
    refused("INSERT INTO customers (customer_id, tenant_id) VALUES (1, 'acme'::varchar(2))", "42501",
            literals=("acme",))
    refused("INSERT INTO customers (customer_id, tenant_id) VALUES (1, 'acme'::char(2))", "42501", literals=("acme",))


ROW_LOCKS = [
    "SELECT * FROM products FOR UPDATE",
    "SELECT * FROM products FOR NO KEY UPDATE",
    "SELECT * FROM products FOR SHARE",
    "SELECT * FROM products p FOR KEY SHARE OF p",
    "SELECT * FROM customers c JOIN products p ON true WHERE c.tenant_id = {T} FOR UPDATE",
    "SELECT * FROM (SELECT * FROM products) p FOR UPDATE",
    "WITH p AS (SELECT * FROM products) SELECT * FROM p FOR UPDATE",
    "SELECT * FROM pg_class FOR UPDATE",
    "SELECT (SELECT 1 FROM products FOR SHARE)",
]


@pytest.mark.parametrize("text", ROW_LOCKS)
def test_row_locks_on_shared_tables_are_refused(text):
    refused(text, "42501", "not allowed in a tenant session")


# ---- with sqlglot's injection sabotaged ----------------------
def _drop_one_predicate(real):
    def inject(tree, tokens, sql, snapshot, rules):
        inj = real(tree, tokens, sql, snapshot, rules)
        with_tenant = [e for e in inj.edits if TENANT in e.parts]
        assert with_tenant, "the sabotage needs a tenant edit to drop"
        drop = with_tenant[-1]
        return Injection(
            edits=[e for e in inj.edits if e is not drop], touches_tenant=inj.touches_tenant, writes=inj.writes,
            param_checks=inj.param_checks, required_literals=inj.required_literals,
        )
    return inject


SABOTAGED = [
    "SELECT * FROM customers c JOIN orders o ON o.customer_id = c.customer_id",
    "SELECT * FROM customers c LEFT JOIN orders o ON o.customer_id = c.customer_id",
    "WITH x AS (SELECT * FROM orders) SELECT * FROM x",
    "SELECT name FROM customers WHERE EXISTS (SELECT 1 FROM orders WHERE orders.customer_id = 1)",
    "UPDATE customers SET name = 'x' WHERE customer_id = 1",
    "DELETE FROM orders RETURNING order_id",
    "INSERT INTO customers (customer_id, name) VALUES (1, 'x')",
    "MERGE INTO customers c USING (SELECT 1 AS id) s ON c.customer_id = s.id WHEN MATCHED THEN DELETE",
]


@pytest.mark.parametrize("sql", SABOTAGED)
def test_pg_verifier_refuses_a_dropped_predicate(monkeypatch, sql):
    engine = demo_engine()
    ctx = PolicyContext(tenant="acme")
    assert isinstance(engine.check(sql, ctx, Origin.SIMPLE), Forward)
    monkeypatch.setattr(pipeline, "inject_tenant", _drop_one_predicate(pipeline.inject_tenant))
    sabotaged = demo_engine()
    d = sabotaged.check(sql, ctx, Origin.SIMPLE)
    assert isinstance(d, Refuse) and "PostgreSQL's parser" in d.message, d
    # control: without the second opinion too, the broken rewrite would have been forwarded
    monkeypatch.setattr(pipeline, "pg_verify", lambda *a, **k: None)
    assert isinstance(demo_engine().check(sql, ctx, Origin.SIMPLE), Forward)


def test_hidden_statements_are_refused_whatever_the_lexer_thought():
    # issue 12's string continuation: PostgreSQL reads five statements here.  Whichever pass refuses
    # first, nothing is forwarded (the PostgreSQL-side count is independent of the proxy's lexer).
    sql = ("SELECT 'x' WHERE 'b' BETWEEN E'a'\n'\\' AND ' AND $$c$$; BEGIN; SELECT set_config("
           "$$tenantgate.tenant_id$$,$$globex$$,true); SELECT tenant_id,name,email FROM customers; COMMIT; --'")
    d = demo_engine().check(sql, PolicyContext(tenant="acme"), Origin.SIMPLE)
    assert isinstance(d, Refuse) and d.sqlstate in ("42601", "0A000"), d
    with pytest.raises(PolicyRefusal) as ei:
        pg_verify(sql, frozenset(), SNAP, RULES)
    assert ei.value.sqlstate == "42601" and "5 statements" in ei.value.message
