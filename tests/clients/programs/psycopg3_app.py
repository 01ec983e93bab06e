"""A psycopg 3 application: CRUD, transactions with a savepoint, executemany, pipeline mode,
COPY in (without the tenant column) and out, a named cursor.  Prints a deterministic transcript."""

import sys

import psycopg

LO = 970000  # this program's private id range; removed at the end


def say(*a):
    print(*a, flush=True)


def main(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        say("seed", conn.execute("SELECT customer_id, name FROM customers WHERE customer_id < 1000 ORDER BY 1").fetchall())
        say("join", conn.execute("SELECT o.order_id, c.name, sum(i.quantity) FROM orders o JOIN customers c "
                                 "USING (tenant_id, customer_id) JOIN order_items i USING (tenant_id, order_id) "
                                 "WHERE o.order_id < 1000 GROUP BY 1, 2 ORDER BY 1").fetchall())
        say("params", conn.execute("SELECT name FROM customers WHERE customer_id IN (%s,%s) ORDER BY 1", (1, 2)).fetchall())
        cur = conn.cursor()
        cur.executemany("INSERT INTO customers (customer_id, name, email) VALUES (%s, %s, %s)",
                        [(LO + 1, "one", "one@x"), (LO + 2, "two", None)])
        with conn.transaction():
            conn.execute("UPDATE customers SET name = 'ONE' WHERE customer_id = %s", (LO + 1,))
            try:
                with conn.transaction():  # a savepoint
                    conn.execute("INSERT INTO customers (customer_id, name, email) VALUES (%s, 'dup', 'one@x')", (LO + 3,))
            except psycopg.Error as e:
                say("savepoint error", e.sqlstate)
        say("after tx", conn.execute("SELECT customer_id, name FROM customers WHERE customer_id > %s ORDER BY 1", (LO,)).fetchall())
        with conn.pipeline():
            a = conn.execute("SELECT count(*) FROM orders WHERE order_id < 1000")
            b = conn.execute("SELECT max(price_cents) FROM products")
        say("pipeline", a.fetchone(), b.fetchone())
        out = []
        with cur.copy(f"COPY (SELECT customer_id, name FROM customers WHERE customer_id > {LO} ORDER BY 1) TO STDOUT") as cp:
            for row in cp.rows():
                out.append(row)
        say("copy out", out)
        try:  # PostgreSQL refuses COPY FROM under row-level security; tenantgate takes it
            with cur.copy("COPY customers (customer_id, name) FROM STDIN") as cp:
                cp.write_row((LO + 10, "copied\ttab"))
            say("copy in ok", conn.execute("SELECT name FROM customers WHERE customer_id = %s", (LO + 10,)).fetchone())
        except psycopg.Error as e:
            say("copy in ERROR", e.sqlstate)
        try:
            conn.execute("SELECT * FROM pg_authid")
        except psycopg.Error as e:
            say("pg_authid", e.sqlstate)
        conn.execute("DELETE FROM customers WHERE customer_id > %s", (LO,))
    with psycopg.connect(dsn) as conn:
        with conn.cursor(name="named") as nc:
            nc.execute("SELECT customer_id FROM customers WHERE customer_id < 1000 ORDER BY 1")
            say("named cursor", nc.fetchmany(1), nc.fetchall())
    say("done")


if __name__ == "__main__":
    main(sys.argv[1])
