-- Example application schema (the demo's SaaS schema): shared products, and
-- tenant tables keyed by tenant_id.  Replace with your application's
-- migrations; rerun 20-tenantgate-bootstrap.sh after each migration.
-- Every unique key includes tenant_id (`tenantgate doctor` checks it) and
-- every tenant table has an index that leads with it.
CREATE TABLE IF NOT EXISTS products (
    id    int PRIMARY KEY,
    name  text NOT NULL,
    price numeric(10, 2) NOT NULL
);
CREATE TABLE IF NOT EXISTS customers (
    tenant_id text NOT NULL,
    id        int  NOT NULL,
    name      text NOT NULL,
    email     text,
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, email)
);
CREATE TABLE IF NOT EXISTS orders (
    tenant_id   text NOT NULL,
    id          int  NOT NULL,
    customer_id int  NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, customer_id) REFERENCES customers (tenant_id, id)
);
CREATE TABLE IF NOT EXISTS order_items (
    tenant_id  text NOT NULL,
    order_id   int  NOT NULL,
    product_id int  NOT NULL REFERENCES products (id),
    quantity   int  NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (tenant_id, order_id, product_id),
    FOREIGN KEY (tenant_id, order_id) REFERENCES orders (tenant_id, id)
);
