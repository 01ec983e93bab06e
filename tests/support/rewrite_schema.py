"""The schema, seed data and RLS oracle setup for the rewrite tests.

One shared table (``products``) and four tenant tables with a ``tenant_id``
column and composite foreign keys that include the tenant column.  Tenants A,
B and C use overlapping key values (every tenant has customer 1, order 1, ...)
so that a missing tenant filter shows up as extra or changed rows.  Text
values carry the tenant's marker (``cust-B-2``, ``ord-B-3``) so a leak is also
visible in single values.  The other tenants' rows are inserted before the
session tenant's, so physical order puts them first.

Two roles run statements (both via ``SET LOCAL ROLE`` from the superuser):

* ``rls_user``: the **oracle**.  Every tenant table has ROW LEVEL SECURITY
  enabled and forced, with policies ``tenant_id = current_setting('app.tenant')``
  for USING and WITH CHECK.  The original statement runs as this role.
* ``rewrite_runner``: the **candidate**.  It has the same table privileges but
  BYPASSRLS, so RLS is *not* applied and only the rewritten statement's own
  predicates separate tenants.  A rewriter bug can therefore not be masked.

``tenant_id`` defaults to ``current_setting('app.tenant', true)`` so that an
INSERT without the tenant column means "this tenant" under RLS, which is what
the proxy does by adding the column.  The candidate runs with ``app.tenant``
set to a value that is no tenant, so relying on the default shows up as a
mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass

TENANT = "A"
OTHER_TENANTS = ("B", "C")
TENANTS = (TENANT, *OTHER_TENANTS)
ORACLE_ROLE = "rls_user"
CANDIDATE_ROLE = "rewrite_runner"
# app.tenant in the candidate run: deliberately no real tenant.
CANDIDATE_APP_TENANT = "no-such-tenant"


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # "int" or "text"
    nullable: bool = True


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]  # primary key columns
    tenant: bool = True

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def column(self, name: str) -> Column:
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)


def _c(name: str, typ: str, nullable: bool = True) -> Column:
    return Column(name, typ, nullable)


_TID = _c("tenant_id", "text", False)

PRODUCTS = Table(
    "products",
    (_c("id", "int", False), _c("name", "text", False), _c("category", "text"), _c("price", "int")),
    ("id",),
    tenant=False,
)
CUSTOMERS = Table(
    "customers",
    (_TID, _c("id", "int", False), _c("name", "text", False), _c("email", "text"), _c("region", "text")),
    ("tenant_id", "id"),
)
ORDERS = Table(
    "orders",
    (
        _TID,
        _c("id", "int", False),
        _c("customer_id", "int"),
        _c("product_id", "int"),
        _c("status", "text"),
        _c("amount", "int"),
        _c("ref", "text"),
    ),
    ("tenant_id", "id"),
)
ORDER_ITEMS = Table(
    "order_items",
    (
        _TID,
        _c("order_id", "int", False),
        _c("line", "int", False),
        _c("product_id", "int"),
        _c("qty", "int"),
        _c("note", "text"),
    ),
    ("tenant_id", "order_id", "line"),
)
TICKETS = Table(
    "tickets",
    (
        _TID,
        _c("id", "int", False),
        _c("customer_id", "int"),
        _c("code", "text"),
        _c("subject", "text"),
        _c("priority", "int"),
    ),
    ("tenant_id", "id"),
)

SHARED_TABLES = (PRODUCTS,)
TENANT_TABLES = (CUSTOMERS, ORDERS, ORDER_ITEMS, TICKETS)
ALL_TABLES = SHARED_TABLES + TENANT_TABLES
TABLES_BY_NAME = {t.name: t for t in ALL_TABLES}

DDL = """
CREATE TABLE products (
    id int PRIMARY KEY,
    name text NOT NULL,
    category text,
    price int
);
CREATE TABLE customers (
    tenant_id text NOT NULL DEFAULT current_setting('app.tenant', true),
    id int NOT NULL,
    name text NOT NULL,
    email text,
    region text,
    PRIMARY KEY (tenant_id, id)
);
CREATE TABLE orders (
    tenant_id text NOT NULL DEFAULT current_setting('app.tenant', true),
    id int NOT NULL,
    customer_id int,
    product_id int REFERENCES products (id),
    status text,
    amount int,
    ref text,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, customer_id) REFERENCES customers (tenant_id, id) ON DELETE CASCADE
);
CREATE TABLE order_items (
    tenant_id text NOT NULL DEFAULT current_setting('app.tenant', true),
    order_id int NOT NULL,
    line int NOT NULL,
    product_id int REFERENCES products (id),
    qty int,
    note text,
    PRIMARY KEY (tenant_id, order_id, line),
    FOREIGN KEY (tenant_id, order_id) REFERENCES orders (tenant_id, id) ON DELETE CASCADE
);
-- tickets.code is unique across ALL tenants: the ON CONFLICT trap of the brief.
CREATE TABLE tickets (
    tenant_id text NOT NULL DEFAULT current_setting('app.tenant', true),
    id int NOT NULL,
    customer_id int,
    code text UNIQUE,
    subject text,
    priority int,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, customer_id) REFERENCES customers (tenant_id, id) ON DELETE SET NULL (customer_id)
);
"""


def _q(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, int):
        return str(v)
    return "'" + str(v).replace("'", "''") + "'"


def _values(table: str, rows: list[tuple]) -> str:
    body = ",\n  ".join("(" + ", ".join(_q(v) for v in r) + ")" for r in rows)
    return f"INSERT INTO {table} VALUES\n  {body};\n"


# How many rows of each kind each tenant has (different per tenant, so
# counts leak visibly too).
_SIZES = {"A": (4, 6), "B": (5, 7), "C": (3, 4)}
_REGIONS = ("north", "south", None)
_STATUSES = ("open", "shipped", "closed", None)


def seed_rows() -> dict[str, list[tuple]]:
    """Deterministic seed rows for every table, keyed by table name."""
    rows: dict[str, list[tuple]] = {t.name: [] for t in ALL_TABLES}
    rows["products"] = [
        (1, "widget", "tools", 10),
        (2, "gadget", "tools", 25),
        (3, "gizmo", None, 7),
        (4, "doohickey", "misc", None),
        (5, "thing", "misc", 3),
    ]
    # The other tenants' rows are inserted first: a qual or cast evaluated before the tenant
    # filter (or a "first row" attack) meets another tenant's row, not the session tenant's.
    for t in (*OTHER_TENANTS, TENANT):
        ti = TENANTS.index(t)
        n_cust, n_ord = _SIZES[t]
        for i in range(1, n_cust + 1):
            email = None if (i + ti) % 3 == 0 else f"c{i}@{t.lower()}.example"
            rows["customers"].append((t, i, f"cust-{t}-{i}", email, _REGIONS[(i + ti) % 3]))
        for i in range(1, n_ord + 1):
            cust = None if (i + ti) % 5 == 0 else 1 + (i * 7 + ti) % n_cust
            prod = None if (i + 2 * ti) % 6 == 0 else 1 + (i + ti) % 5
            amount = None if (i * 3 + ti) % 7 == 0 else (i * 10 + ti * 3) % 47 + 1
            ref = None if (i + ti) % 4 == 3 else f"ord-{t}-{i}"  # marker value of the order
            rows["orders"].append((t, i, cust, prod, _STATUSES[(i + ti) % 4], amount, ref))
            for line in range(1, 1 + (i + ti) % 3):
                qty = None if (i + line + ti) % 4 == 0 else (i + line * 2 + ti) % 5 + 1
                note = None if (i + line) % 2 else f"note-{t}-{i}-{line}"
                rows["order_items"].append((t, i, line, 1 + (i * line + ti) % 5, qty, note))
        for i in range(1, n_cust + 1):
            cust = None if i == 2 else 1 + (i + ti) % n_cust
            code = f"T-{t}-{i}" if i != 3 else None
            rows["tickets"].append((t, i, cust, code, f"subj-{t}-{i}", None if i % 4 == 0 else (i + ti) % 3))
    return rows


def seed_sql() -> str:
    rows = seed_rows()
    return "".join(_values(t.name, rows[t.name]) for t in ALL_TABLES)


def rls_sql() -> str:
    out = [
        f"CREATE ROLE {ORACLE_ROLE} NOLOGIN;",
        f"CREATE ROLE {CANDIDATE_ROLE} NOLOGIN BYPASSRLS;",
        f"GRANT USAGE ON SCHEMA public TO {ORACLE_ROLE}, {CANDIDATE_ROLE};",
        f"GRANT SELECT ON products TO {ORACLE_ROLE}, {CANDIDATE_ROLE};",
    ]
    for t in TENANT_TABLES:
        out += [
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON {t.name} TO {ORACLE_ROLE}, {CANDIDATE_ROLE};",
            f"ALTER TABLE {t.name} ENABLE ROW LEVEL SECURITY;",
            f"ALTER TABLE {t.name} FORCE ROW LEVEL SECURITY;",
            f"CREATE POLICY tenant_isolation ON {t.name} TO {ORACLE_ROLE}"
            " USING (tenant_id = current_setting('app.tenant'))"
            " WITH CHECK (tenant_id = current_setting('app.tenant'));",
        ]
    return "\n".join(out) + "\n"


def setup_sql(roles: bool = True) -> str:
    """Everything to run (as superuser) in an empty database.

    Roles are cluster-wide: pass roles=False when another database of the
    same cluster created them already (the policies and grants are still made).
    """
    sql = DDL + seed_sql()
    rls = rls_sql()
    if not roles:
        rls = "\n".join(l for l in rls.splitlines() if not l.startswith("CREATE ROLE"))
    return sql + rls + "ANALYZE;\n"


def ensure_roles_sql() -> str:
    """Idempotent role creation (roles are shared by all databases of a cluster)."""
    return f"""
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ORACLE_ROLE}') THEN
    CREATE ROLE {ORACLE_ROLE} NOLOGIN;
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{CANDIDATE_ROLE}') THEN
    CREATE ROLE {CANDIDATE_ROLE} NOLOGIN BYPASSRLS;
  END IF;
END $$;
"""


def install(superuser_dsn: str) -> None:
    """Create schema, seed data, roles, grants and RLS policies in the database."""
    import psycopg

    with psycopg.connect(superuser_dsn, autocommit=True) as conn:
        conn.execute(ensure_roles_sql())
        conn.execute(setup_sql(roles=False))


# Text that only the other tenants' rows contain (a leak detector for single values).
def other_tenant_markers() -> tuple[str, ...]:
    return tuple(f"-{t}-" for t in OTHER_TENANTS) + tuple(f"@{t.lower()}.example" for t in OTHER_TENANTS)


def snapshot_sql(tables=TENANT_TABLES) -> str:
    """One query returning every row of the tenant tables (all tenants), as text."""
    parts = [f"SELECT '{t.name}' AS tbl, x::text AS row FROM public.{t.name} AS x" for t in tables]
    return " UNION ALL ".join(parts)


def rules_dict() -> dict:
    """Rules for the policy engine describing this schema (tenant column tenant_id)."""
    return {
        "tenant_column": "tenant_id",
        "tenant_column_type": "text",
        "schemas": ["public"],
        "discover": True,
        "tenant_tables": [t.name for t in TENANT_TABLES],
        "shared_tables": [t.name for t in SHARED_TABLES],
    }
