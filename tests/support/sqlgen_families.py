"""Statement families the main generator (sqlgen) does not produce, for the RLS differential.

Each family is a function ``f(g) -> Case`` over a seeded :class:`sqlgen._Gen`; its name is the
statement kind in the tally.  They cover the lexical forms (E'' strings, string continuation
across newlines with and without comments, U&'' / U&"" with UESCAPE, dollar quoting, ``$n``
next to punctuation, casts, non-ASCII identifiers), structural forms (GROUPING SETS / ROLLUP /
CUBE, whole-row references, DISTINCT ON, aggregate FILTER, WINDOW clauses with frames,
set-returning functions and ROWS FROM, ARRAY(subquery), row constructors, parenthesised join
trees, TABLE, FETCH FIRST, several and nested data-modifying CTEs, UPDATE ... SET (a, b) =
(SELECT ...), DEFAULT VALUES, ON CONFLICT ON CONSTRAINT, multi-statement text, PREPARE /
EXECUTE, cursors, COPY ... TO STDOUT, EXPLAIN) and schema features (partitions, a view
declared safe, jsonb, arrays, sequences) from :data:`FAMILY_SCHEMA_SQL`.

Every statement is deterministic like sqlgen's (orders fixed by unique keys, sequences reset
before each run by :data:`CASE_SETUP`), so oracle and rewrite compare exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from support.rewrite_schema import CANDIDATE_ROLE, CUSTOMERS, ORACLE_ROLE, ORDERS, TICKETS
from support.sqlgen import Ctx, Source, _Gen, _table_columns

# ---- schema extras ------------------------------------------------------------------------

_RLS_TABLES = ("notes", "events", "events_low", "events_high")
FAMILY_SCHEMA_SQL = f"""
CREATE TABLE notes (
    tenant_id text NOT NULL DEFAULT current_setting('app.tenant', true),
    id int NOT NULL DEFAULT 0,
    body text DEFAULT 'empty',
    tags text[] DEFAULT '{{}}',
    doc jsonb DEFAULT '{{}}'
);
CREATE TABLE events (
    tenant_id text NOT NULL DEFAULT current_setting('app.tenant', true),
    id int NOT NULL,
    kind text,
    PRIMARY KEY (tenant_id, id)
) PARTITION BY RANGE (id);
CREATE TABLE events_low PARTITION OF events FOR VALUES FROM (MINVALUE) TO (5);
CREATE TABLE events_high PARTITION OF events FOR VALUES FROM (5) TO (MAXVALUE);
CREATE VIEW open_orders WITH (security_invoker = true) AS
    SELECT tenant_id, id, customer_id, amount FROM orders WHERE status = 'open';
CREATE SEQUENCE fam_seq;
GRANT SELECT, INSERT, UPDATE, DELETE ON {", ".join(_RLS_TABLES)} TO {ORACLE_ROLE}, {CANDIDATE_ROLE};
GRANT SELECT ON open_orders TO {ORACLE_ROLE}, {CANDIDATE_ROLE};
GRANT USAGE, SELECT, UPDATE ON fam_seq TO {ORACLE_ROLE}, {CANDIDATE_ROLE};
""" + "".join(
    f"""
ALTER TABLE {t} ENABLE ROW LEVEL SECURITY;
ALTER TABLE {t} FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON {t} TO {ORACLE_ROLE}
  USING (tenant_id = current_setting('app.tenant')) WITH CHECK (tenant_id = current_setting('app.tenant'));
"""
    for t in _RLS_TABLES
) + """
INSERT INTO notes VALUES
  ('B', 1, 'note-B-1', '{"tag-B-1", "x"}', '{"k": "doc-B-1", "n": 1}'),
  ('C', 1, 'note-C-1', '{"tag-C-1"}', '{"k": "doc-C-1", "n": 2}'),
  ('A', 1, 'note-A-1', '{"tag-A-1", "x"}', '{"k": "doc-A-1", "n": 1}'),
  ('A', 2, 'note-A-2', '{}', '{"n": 3}');
INSERT INTO events VALUES ('B', 1, 'ev-B-1'), ('B', 7, 'ev-B-7'), ('C', 2, 'ev-C-2'),
  ('A', 1, 'ev-A-1'), ('A', 3, 'ev-A-3'), ('A', 8, 'ev-A-8');
ANALYZE;
"""
FAMILY_RULES = {"safe_views": ["open_orders"]}
# Run before the oracle and before the candidate: a sequence is not transactional.
CASE_SETUP = "SELECT setval('fam_seq', 100, false);"


@dataclass(frozen=True)
class Case:
    sql: str
    ordered: bool = False
    rows: bool = True  # compare result rows (False: EXPLAIN, whose plans differ by design)
    params: tuple[str, ...] | None = None  # extended protocol with these values


def _cond(g: _Gen, src: Source) -> str:
    return g.cond([src], Ctx(), 1)


def _src(t, alias):
    return Source(alias, _table_columns(t), t.key)


def _pick_table(g: _Gen):
    return g.pick([CUSTOMERS, ORDERS, TICKETS])


# ---- lexical -------------------------------------------------------------------------------

def e_string(g):
    lit = g.pick([r"E'cust-A-\061'", r"E'it\'s'", r"E'a\\b'", r"E'x\ny'", r"E'\x63ust-A-2'", r"e'open'"])
    return Case(f"SELECT id, name FROM customers WHERE name {g.pick(['=', '<>', '>='])} {lit} OR {_cond(g, _src(CUSTOMERS, 'customers'))}")


def unicode_escapes(g):
    ident = g.pick(['U&"n\\0061me"', 'U&"na!006De" UESCAPE \'!\'', 'U&"\\0069d"', '"name"'])
    lit = g.pick(["U&'cust-A-\\0031'", "U&'open'", "U&'c!0075st-A-2' UESCAPE '!'", "U&'\\+000063ust-A-3'"])
    return Case(f"SELECT {ident} FROM customers WHERE {ident} <> {lit} OR id = {g.pick([1, 2])}")


def dollar_quoting(g):
    lit = g.pick(["$$open$$", "$q$it's$q$", "$a$cust-A-1$a$", "$_$$$_$", "$x$--not a comment$x$"])
    t = g.pick(["orders o WHERE o.status", "customers o WHERE o.name"])
    return Case(f"SELECT o.id FROM {t} {g.pick(['=', '<>'])} {lit} ORDER BY 1", ordered=True)


def params_punctuation(g):
    forms = [
        ("SELECT id FROM orders WHERE id=$1::int", ["2"]),
        ("SELECT id FROM orders WHERE(id>$1::int)", ["3"]),
        ("SELECT id FROM orders WHERE id IN ($1::int, $2::int)", ["1", "4"]),
        ("SELECT name||$1::text FROM customers WHERE id<>$2::int", ["-x", "1"]),
        ("SELECT id FROM orders WHERE status=$1::text AND amount>=$2::int", ["open", "10"]),
        ("SELECT $1::int+id FROM orders WHERE customer_id=$2::int", ["5", "2"]),
        ("UPDATE orders SET amount=$1::int WHERE id=$2::int RETURNING id,amount", ["9", "2"]),
        ("INSERT INTO customers(id,name)VALUES($1::int, $2::text)RETURNING tenant_id", ["40", "p"]),
        ("INSERT INTO customers(tenant_id,id,name)VALUES($1, $2::int, $3::text)", [g.pick(["A", "B"]), "41", "q"]),
        ("DELETE FROM tickets WHERE id=$1::int", ["2"]),
    ]
    sql, params = g.pick(forms)
    return Case(sql, params=tuple(params))


def params_after_comma(g):
    """``$n`` right after a comma (no space): what drivers that build lists send."""
    sql, params = g.pick([
        ("SELECT id FROM orders WHERE id IN($1::int,$2::int)", ["1", "4"]),
        ("SELECT $1::int,$2::text", ["1", "x"]),
        ("INSERT INTO customers(id,name)VALUES($1::int,$2::text)RETURNING tenant_id", ["40", "p"]),
        ("SELECT id FROM orders WHERE (customer_id,status)=($1::int,$2::text)", ["1", "open"]),
    ])
    return Case(sql, params=tuple(params))


def casts(g):
    expr = g.pick(["id::text", "CAST(id AS bigint)", "'3'::int + id", "amount::numeric / 2", "int4 '5' + id",
                   "status::varchar(3)", "(id || '')::int", "customer_id::text::int", "'2024-01-0' || (id % 9 + 1)",
                   "('2024-01-0' || (id % 9 + 1))::date"])
    return Case(f"SELECT id, {expr} FROM orders WHERE {_cond(g, _src(ORDERS, 'orders'))}")


def non_ascii_identifiers(g):
    alias = g.pick(["kündin", '"Bestellung ß"', "ñ", '"名前"', "café"])
    return Case(f"SELECT {alias}.name FROM customers AS {alias} WHERE {alias}.id {g.pick(['<', '>', '<>'])} 3")


# ---- structural ------------------------------------------------------------------------------

def grouping_sets(g):
    cols, grp = g.pick([
        ("status", "ROLLUP (status)"), ("status, customer_id", "CUBE (status, customer_id)"),
        ("status, customer_id", "GROUPING SETS ((status), (customer_id), ())"),
        ("customer_id, status", "ROLLUP (customer_id, status)"), ("status, product_id", "status, ROLLUP (product_id)"),
    ])
    return Case(f"SELECT {cols}, grouping({cols}), count(*), sum(amount) FROM orders GROUP BY {grp}")


def whole_row(g):
    sql = g.pick([
        "SELECT c FROM customers c WHERE c.id < 4",
        "SELECT (c).name, (c).id FROM customers c",
        "SELECT row_to_json(o)::text FROM orders o",
        "SELECT (SELECT x FROM orders x WHERE x.id = c.id) IS NULL FROM customers c",
        "SELECT c.* FROM customers c JOIN orders o ON o.customer_id = c.id",
        "SELECT count(*) FROM customers c WHERE c IS NOT NULL",
        "SELECT (t).* FROM (SELECT c FROM customers c) AS s(t)",
    ])
    return Case(sql)


def distinct_on(g):
    return Case(f"SELECT DISTINCT ON (customer_id) customer_id, id, amount FROM orders "
                f"WHERE {_cond(g, _src(ORDERS, 'orders'))} ORDER BY customer_id, id {g.pick(['', 'DESC'])}",
                ordered=True)


def aggregate_filter(g):
    return Case(f"SELECT count(*) FILTER (WHERE {_cond(g, _src(ORDERS, 'orders'))}), "
                f"sum(amount) FILTER (WHERE status = 'open'), count(*) FROM orders")


def window_clause(g):
    frame = g.pick(["ROWS BETWEEN 1 PRECEDING AND CURRENT ROW", "ROWS UNBOUNDED PRECEDING",
                    "RANGE BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING", "ROWS BETWEEN CURRENT ROW AND 2 FOLLOWING",
                    "GROUPS BETWEEN 1 PRECEDING AND 1 FOLLOWING"])
    return Case(f"SELECT id, sum(amount) OVER w, first_value(id) OVER w, count(*) OVER (PARTITION BY status) "
                f"FROM orders WINDOW w AS (PARTITION BY customer_id ORDER BY id {frame})")


def srf(g):
    sql = g.pick([
        "SELECT g, c.name FROM generate_series(1, 3) AS g JOIN customers c ON c.id = g",
        "SELECT unnest(ARRAY[1, 2]) AS k, id FROM orders WHERE id < 3",
        "SELECT c.name, s FROM customers c CROSS JOIN LATERAL generate_series(1, c.id) AS s",
        "SELECT * FROM unnest(ARRAY['a', 'b']) WITH ORDINALITY AS u(v, n)",
    ])
    return Case(sql)


def rows_from(g):
    return Case(g.pick([
        "SELECT * FROM ROWS FROM (generate_series(1, 2), unnest(ARRAY['a', 'b'])) AS r(a, b)",
        "SELECT r.a, c.name FROM ROWS FROM (generate_series(1, 3)) AS r(a) JOIN customers c ON c.id = r.a",
    ]))


def array_subquery(g):
    return Case(f"SELECT ARRAY(SELECT id FROM orders o WHERE {_cond(g, _src(ORDERS, 'o'))} ORDER BY id), "
                f"array_length(ARRAY(SELECT name FROM customers), 1)")


def row_constructors(g):
    return Case(g.pick([
        "SELECT id FROM orders WHERE (customer_id, status) = (1, 'open')",
        "SELECT id FROM orders WHERE (id, customer_id) > (2, 1)",
        "SELECT id FROM orders WHERE ROW(customer_id, product_id) IN (SELECT id, id FROM customers)",
        "SELECT ROW(id, status) FROM orders WHERE ROW(id) <> ROW(3)",
        "SELECT id FROM orders WHERE (customer_id, product_id) IS DISTINCT FROM (NULL, 2)",
    ]))


def parenthesised_joins(g):
    j = g.pick(["JOIN", "LEFT JOIN", "RIGHT JOIN", "FULL JOIN"])
    return Case(f"SELECT c.id, o.id, i.line FROM (customers c {j} orders o ON o.customer_id = c.id) "
                f"{g.pick(['LEFT JOIN', 'JOIN'])} (order_items i JOIN products p ON p.id = i.product_id) "
                f"ON i.order_id = o.id")


def table_command(g):
    return Case(g.pick([
        "TABLE customers", "TABLE orders ORDER BY id LIMIT 3", "SELECT * FROM (TABLE tickets) AS t WHERE t.id > 1",
        "WITH x AS (TABLE customers) SELECT count(*) FROM x", "SELECT * FROM products UNION TABLE products",
        "TABLE ONLY customers", "TABLE public.order_items",
    ]), ordered=False)


def fetch_first(g):
    return Case(g.pick([
        "SELECT id FROM orders ORDER BY id FETCH FIRST 2 ROWS ONLY",
        "SELECT id FROM orders ORDER BY id OFFSET 1 ROW FETCH NEXT 2 ROWS ONLY",
        "SELECT customer_id FROM orders ORDER BY customer_id FETCH FIRST 1 ROW WITH TIES",
        "SELECT name FROM customers ORDER BY name DESC FETCH FIRST ROW ONLY",
    ]), ordered=True)


def data_modifying_ctes(g):
    return Case(g.pick([
        "WITH u AS (UPDATE orders SET amount = 1 WHERE status = 'open' RETURNING id), "
        "d AS (DELETE FROM order_items WHERE order_id IN (SELECT id FROM u) RETURNING 1) SELECT count(*) FROM d",
        "WITH i AS (INSERT INTO customers (id, name) VALUES (30, 'n') RETURNING id) "
        "INSERT INTO orders (id, customer_id) SELECT 30, id FROM i RETURNING tenant_id, id",
        "WITH u AS (WITH src AS (SELECT id FROM orders WHERE status = 'closed') "
        "UPDATE orders SET amount = 2 WHERE id IN (SELECT id FROM src) RETURNING id) SELECT count(*) FROM u",
        "WITH d AS (DELETE FROM tickets WHERE priority = 1 RETURNING id), "
        "u AS (UPDATE customers SET region = 'x' WHERE id IN (SELECT id FROM d) RETURNING id) "
        "SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM u)",
    ]))


def update_multi_set(g):
    return Case(g.pick([
        "UPDATE orders o SET (status, amount) = (SELECT c.region, c.id FROM customers c WHERE c.id = o.customer_id) "
        "WHERE o.id < 4 RETURNING o.id, o.status",
        "UPDATE customers SET (name, region) = ('n', 'r') WHERE id = 2 RETURNING *",
        "UPDATE tickets t SET (subject, priority) = (SELECT max(name), count(*) FROM customers) RETURNING t.id",
        "UPDATE orders SET (amount, status) = ROW(amount + 1, 'r') WHERE customer_id = 1",
    ]))


def update_single_column_row(g):
    """``SET (a) = ROW(...)`` / ``SET (a) = (SELECT ...)``: a one-column multi-assignment."""
    return Case(g.pick([
        "UPDATE orders SET (amount) = ROW(amount + 1) WHERE customer_id = 1",
        "UPDATE orders o SET (status) = (SELECT c.region FROM customers c WHERE c.id = o.customer_id)",
    ]))


def default_values(g):
    return Case(g.pick(["INSERT INTO notes DEFAULT VALUES", "INSERT INTO notes DEFAULT VALUES RETURNING *",
                        "INSERT INTO notes (id) VALUES (DEFAULT) RETURNING tenant_id, id",
                        "INSERT INTO notes (id, body) VALUES (5, DEFAULT)"]))


def on_conflict_on_constraint(g):
    return Case(g.pick([
        "INSERT INTO customers (id, name) VALUES (1, 'dup') ON CONFLICT ON CONSTRAINT customers_pkey "
        "DO UPDATE SET name = EXCLUDED.name RETURNING tenant_id, id, name",
        "INSERT INTO customers (id, name) VALUES (9, 'new') ON CONFLICT ON CONSTRAINT customers_pkey DO NOTHING",
        "INSERT INTO tickets (id, code) VALUES (20, 'T-new-9') ON CONFLICT ON CONSTRAINT tickets_code_key DO NOTHING",
        "INSERT INTO orders (id, customer_id) VALUES (2, 1) ON CONFLICT ON CONSTRAINT orders_pkey "
        "DO UPDATE SET amount = orders.amount + 1 RETURNING id, amount",
    ]))


def multi_statement(g):
    return Case(g.pick([
        "SELECT count(*) FROM orders; SELECT id FROM customers WHERE id < 3",
        "UPDATE orders SET amount = 0 WHERE id = 1; SELECT id, amount FROM orders WHERE id < 3",
        "DELETE FROM order_items WHERE line = 2; SELECT count(*) FROM order_items",
        "INSERT INTO customers (id, name) VALUES (31, 'm'); SELECT tenant_id, id FROM customers WHERE id = 31",
    ]))


def prepare_execute(g):
    return Case(g.pick([
        "PREPARE fam_p(int) AS SELECT id FROM orders WHERE customer_id = $1; EXECUTE fam_p(1); DEALLOCATE fam_p",
        "PREPARE fam_u AS UPDATE orders SET amount = 3 WHERE id = 2 RETURNING id; EXECUTE fam_u; DEALLOCATE fam_u",
    ]))


def cursors(g):
    return Case(g.pick([
        "DECLARE fam_c CURSOR FOR SELECT id FROM orders ORDER BY id; FETCH 2 FROM fam_c; CLOSE fam_c",
        "DECLARE fam_c SCROLL CURSOR FOR SELECT name FROM customers ORDER BY name; FETCH LAST FROM fam_c",
        "DECLARE fam_c NO SCROLL CURSOR FOR SELECT id FROM tickets ORDER BY id; FETCH FORWARD 3 FROM fam_c",
    ]), ordered=True)


def copy_out(g):
    return Case(g.pick(["COPY orders TO STDOUT", "COPY (SELECT id, name FROM customers) TO STDOUT",
                        "COPY customers (id, email) TO STDOUT (FORMAT csv)", "COPY (TABLE tickets) TO STDOUT"]))


def explain(g):
    return Case(g.pick(["EXPLAIN (COSTS OFF) SELECT * FROM orders", "EXPLAIN SELECT count(*) FROM customers",
                        "EXPLAIN (COSTS OFF) UPDATE orders SET amount = 1", "EXPLAIN (FORMAT JSON) DELETE FROM tickets"]),
                rows=False)


# ---- schema features ------------------------------------------------------------------------

def partitions(g):
    return Case(g.pick([
        "SELECT id, kind FROM events", "SELECT id FROM events_high", "SELECT count(*) FROM events_low",
        "UPDATE events SET id = id + 3 WHERE id = 3 RETURNING tenant_id, id",  # moves a row to the other partition
        "INSERT INTO events (id, kind) VALUES (9, 'new') RETURNING tenant_id",
        "DELETE FROM events WHERE id > 4", "SELECT e.kind, o.id FROM events e JOIN orders o ON o.id = e.id",
    ]))


def safe_view(g):
    return Case(g.pick([
        "SELECT * FROM open_orders", "SELECT count(*) FROM open_orders v JOIN customers c ON c.id = v.customer_id",
        "SELECT id FROM open_orders WHERE amount > 10", "SELECT c.name FROM customers c WHERE EXISTS "
        "(SELECT 1 FROM open_orders v WHERE v.customer_id = c.id)",
    ]))


def jsonb(g):
    return Case(g.pick([
        "SELECT doc->>'k', doc->'n' FROM notes", "SELECT id FROM notes WHERE doc @> '{\"n\": 1}'",
        "SELECT jsonb_agg(doc ORDER BY id) FROM notes", "SELECT jsonb_build_object('id', id, 'name', name) FROM customers",
        "UPDATE notes SET doc = doc || '{\"x\": 1}' WHERE id = 1 RETURNING doc",
        "SELECT count(*) FROM notes WHERE doc ? 'k'",
    ]))


def arrays(g):
    return Case(g.pick([
        "SELECT tags[1], array_length(tags, 1) FROM notes", "SELECT id FROM notes WHERE 'x' = ANY (tags)",
        "SELECT unnest(tags) FROM notes", "SELECT array_agg(id ORDER BY id) FROM orders",
        "SELECT id FROM notes WHERE tags @> ARRAY['x']", "UPDATE notes SET tags = tags || 'y'::text RETURNING tags",
    ]))


def sequences(g):
    return Case(g.pick([
        "SELECT nextval('fam_seq')", "INSERT INTO notes (id, body) VALUES (nextval('fam_seq'), 's') RETURNING id",
        "SELECT nextval('fam_seq'), id FROM customers ORDER BY id", "SELECT currval('fam_seq') IS NULL",
    ]))


FAMILIES = {f.__name__: f for f in (
    e_string, unicode_escapes, dollar_quoting, params_punctuation, params_after_comma, casts,
    non_ascii_identifiers, grouping_sets, whole_row, distinct_on, aggregate_filter, window_clause, srf, rows_from,
    array_subquery, row_constructors, parenthesised_joins, table_command, fetch_first, data_modifying_ctes,
    update_multi_set, update_single_column_row, default_values, on_conflict_on_constraint, multi_statement, prepare_execute, cursors,
    copy_out, explain, partitions, safe_view, jsonb, arrays, sequences,
)}


def family_case(name: str, seed: int) -> Case:
    return FAMILIES[name](_Gen(random.Random(seed)))
