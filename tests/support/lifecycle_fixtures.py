"""Shared schema and data for the tenant lifecycle tests (tests/test_lifecycle_*.py).

Several tenant tables with composite foreign keys, a self-referencing FK
(employees.manager), a two-table FK cycle (teams <-> members, DEFERRABLE),
a shared table (products), and awkward values: NULLs, unicode, quotes, commas
and newlines in text, bytea with NUL bytes, jsonb, arrays, timestamps, floats,
a generated column, an identity column.  Tenant ids include a quote.
"""

from __future__ import annotations

SCHEMA_SQL = r"""
CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL);
INSERT INTO products VALUES (1, 'widget'), (2, 'gadget');

CREATE TABLE customers (
    tenant_id text NOT NULL, id int NOT NULL, name text NOT NULL, note text, created timestamptz,
    PRIMARY KEY (tenant_id, id));
CREATE INDEX ON customers (tenant_id);
CREATE TABLE orders (
    tenant_id text NOT NULL, id int NOT NULL, customer_id int NOT NULL,
    placed_at timestamp, total numeric(12,2), meta jsonb, ratio double precision,
    seq bigint GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, customer_id) REFERENCES customers (tenant_id, id));
CREATE TABLE order_items (
    tenant_id text NOT NULL, order_id int NOT NULL, line int NOT NULL,
    product_id int REFERENCES products (id), qty int, blob bytea, tags text[],
    doubled int GENERATED ALWAYS AS (qty * 2) STORED,
    PRIMARY KEY (tenant_id, order_id, line),
    FOREIGN KEY (tenant_id, order_id) REFERENCES orders (tenant_id, id));
CREATE TABLE employees (
    tenant_id text NOT NULL, id int NOT NULL, manager_id int, name text,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, manager_id) REFERENCES employees (tenant_id, id));
CREATE TABLE teams (tenant_id text NOT NULL, id int NOT NULL, lead_member int,
    PRIMARY KEY (tenant_id, id));
CREATE TABLE members (tenant_id text NOT NULL, id int NOT NULL, team_id int NOT NULL,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, team_id) REFERENCES teams (tenant_id, id) DEFERRABLE);
ALTER TABLE teams ADD FOREIGN KEY (tenant_id, lead_member) REFERENCES members (tenant_id, id) DEFERRABLE;
CREATE TABLE "Notes ü.v2" (tenant_id text NOT NULL, "Body Text" text, "n""q" int);
"""

TENANT_TABLES = ["customers", "orders", "order_items", "employees", "teams", "members", '"Notes ü.v2"']


def table_key(sql_name: str) -> str:
    """'customers' -> 'public.customers'; '"Notes ü.v2"' -> 'public.Notes ü.v2'."""
    if sql_name.startswith('"'):
        sql_name = sql_name[1:-1].replace('""', '"')
    return "public." + sql_name


def data_sql(tenant: str, n: int = 20) -> str:
    """Rows for one tenant (tenant id given as a SQL literal-safe string)."""
    t = "'" + tenant.replace("'", "''") + "'"
    return f"""
INSERT INTO customers SELECT {t}, i,
    CASE i % 4 WHEN 0 THEN 'Zoë ☃ "quoted", comma' WHEN 1 THEN E'multi\\nline\\r\\nname' WHEN 2 THEN 'O''Brien' ELSE '' END,
    CASE WHEN i % 3 = 0 THEN NULL ELSE 'note ' || i END,
    CASE WHEN i % 5 = 0 THEN NULL ELSE timestamptz '2024-02-29 12:34:56.789+02' + i * interval '1 hour' END
  FROM generate_series(1, {n}) i;
INSERT INTO orders (tenant_id, id, customer_id, placed_at, total, meta, ratio) SELECT {t}, i, 1 + i % {n},
    timestamp '2023-12-31 23:59:59.999999' - i * interval '1 day',
    CASE WHEN i % 7 = 0 THEN NULL ELSE i * 10.25 END,
    CASE WHEN i % 2 = 0 THEN jsonb_build_object('k', i, 'nested', jsonb_build_array(1, 'ü', NULL, true), 'esc', E'a\\\\b"c\\n') ELSE NULL END,
    CASE WHEN i % 3 = 0 THEN 0.1 + i ELSE 'NaN'::float8 END
  FROM generate_series(1, {n * 2}) i;
INSERT INTO order_items (tenant_id, order_id, line, product_id, qty, blob, tags) SELECT {t}, 1 + i % {n * 2}, i,
    CASE WHEN i % 3 = 0 THEN NULL ELSE 1 + i % 2 END, i,
    CASE WHEN i % 4 = 0 THEN NULL ELSE decode('00ff5c0a2c22' || lpad(to_hex(i), 4, '0'), 'hex') END,
    CASE WHEN i % 2 = 0 THEN ARRAY['a,b', NULL, 'ß'] ELSE '{{}}'::text[] END
  FROM generate_series(1, {n * 3}) i;
INSERT INTO employees SELECT {t}, i, CASE WHEN i = 1 THEN NULL WHEN i IN (7, 8) THEN 15 - i ELSE i / 2 END, 'emp ' || i
  FROM generate_series(1, {n}) i;
UPDATE employees SET manager_id = 9 WHERE tenant_id = {t} AND id = 9;  -- points at itself
BEGIN;
SET CONSTRAINTS ALL DEFERRED;
INSERT INTO teams SELECT {t}, i, i FROM generate_series(1, 3) i;
INSERT INTO members SELECT {t}, i, 1 + i % 3 FROM generate_series(1, 6) i;
COMMIT;
INSERT INTO "Notes ü.v2" SELECT {t}, CASE WHEN i % 2 = 0 THEN NULL ELSE '✓ ' || i END, i FROM generate_series(1, 3) i;
"""


async def tenant_rows(conn, tenant: str) -> dict[str, list[str]]:
    """Every row of the tenant in every tenant table, as PostgreSQL's row text, sorted."""
    out = {}
    for t in TENANT_TABLES:
        rows = await conn.fetch(f"SELECT x::text AS r FROM {t} x WHERE tenant_id = $1 ORDER BY 1", tenant)
        out[t] = [r["r"] for r in rows]
    return out
