-- tenantgate demo schema: one shared table and three tenant-scoped tables.
-- Every tenant table carries tenant_id text NOT NULL; primary keys, foreign keys,
-- unique constraints and indexes all lead with tenant_id, so no constraint error can
-- echo another tenant's values and every tenant query can use an index.

CREATE TABLE products (
    product_id   integer PRIMARY KEY,
    name         text NOT NULL,
    price_cents  integer NOT NULL CHECK (price_cents >= 0)
);

CREATE TABLE customers (
    tenant_id    text NOT NULL,
    customer_id  integer NOT NULL,
    name         text NOT NULL,
    email        text,
    PRIMARY KEY (tenant_id, customer_id),
    UNIQUE (tenant_id, email)
);

CREATE TABLE orders (
    tenant_id    text NOT NULL,
    order_id     integer NOT NULL,
    customer_id  integer NOT NULL,
    status       text NOT NULL DEFAULT 'open',
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, order_id),
    FOREIGN KEY (tenant_id, customer_id) REFERENCES customers (tenant_id, customer_id)
);
CREATE INDEX orders_tenant_customer_idx ON orders (tenant_id, customer_id);

CREATE TABLE order_items (
    tenant_id    text NOT NULL,
    order_id     integer NOT NULL,
    line_no      integer NOT NULL,
    product_id   integer NOT NULL REFERENCES products (product_id),
    quantity     integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (tenant_id, order_id, line_no),
    FOREIGN KEY (tenant_id, order_id) REFERENCES orders (tenant_id, order_id) ON DELETE CASCADE
);
CREATE INDEX order_items_tenant_product_idx ON order_items (tenant_id, product_id);

-- Seed data: two tenants, acme and globex.
INSERT INTO products (product_id, name, price_cents) VALUES
    (1, 'Widget', 250), (2, 'Gadget', 1299), (3, 'Gizmo', 4999);

INSERT INTO customers (tenant_id, customer_id, name, email) VALUES
    ('acme', 1, 'Wile E. Coyote', 'wile@acme.example'),
    ('acme', 2, 'Road Runner', 'beep@acme.example'),
    ('globex', 1, 'Hank Scorpio', 'hank@globex.example'),
    ('globex', 2, 'Homer Simpson', NULL);

INSERT INTO orders (tenant_id, order_id, customer_id, status, created_at) VALUES
    ('acme', 1, 1, 'open', '2024-01-05 10:00+00'),
    ('acme', 2, 1, 'shipped', '2024-01-06 11:00+00'),
    ('acme', 3, 2, 'open', '2024-02-01 09:30+00'),
    ('globex', 1, 1, 'open', '2024-01-07 12:00+00'),
    ('globex', 2, 2, 'cancelled', '2024-03-01 08:00+00');

INSERT INTO order_items (tenant_id, order_id, line_no, product_id, quantity) VALUES
    ('acme', 1, 1, 1, 10), ('acme', 1, 2, 2, 1), ('acme', 2, 1, 3, 2), ('acme', 3, 1, 1, 5),
    ('globex', 1, 1, 2, 7), ('globex', 2, 1, 3, 1);
