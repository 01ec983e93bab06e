"""A psycopg2 application: execute_values (multi-row insert), executemany, execute_batch, COPY
in with copy_from (without the tenant column) and COPY out with copy_expert and copy_to, named
(server-side) cursors read in itersize batches, scrollable and WITH HOLD, a transaction with a
savepoint rolled back, an error and recovery, a read-only session, connect-time settings and a
statement timeout, and what tenantgate refuses (large objects, LISTEN, pg_authid).  Prints a
deterministic transcript."""

import io
import sys

import psycopg2
import psycopg2.errorcodes
import psycopg2.errors
from psycopg2.extras import RealDictCursor, execute_batch, execute_values

LO = 976000  # this program's private id range; removed at the end


def say(*a):
    print(*a, flush=True)


def main(dsn: str) -> None:
    conn = psycopg2.connect(dsn)
    cur = conn.cursor()
    cur.execute("SELECT customer_id, name FROM customers WHERE customer_id < 1000 ORDER BY 1")
    say("seed", cur.fetchall())
    cur.execute("SELECT o.order_id, p.name, i.quantity FROM orders o JOIN order_items i USING (tenant_id, order_id) "
                "JOIN products p USING (product_id) WHERE o.order_id < %(max)s ORDER BY 1, 2", {"max": 1000})
    say("named params", cur.fetchall())

    execute_values(cur, "INSERT INTO customers (customer_id, name, email) VALUES %s",
                   [(LO + i, f"bulk {i}", f"bulk{i}@x") for i in range(1, 6)], page_size=2)
    cur.executemany("INSERT INTO orders (order_id, customer_id, status) VALUES (%s, %s, %s)",
                    [(LO + 1, LO + 1, "open"), (LO + 2, LO + 2, "shipped")])
    rows = execute_values(cur, "INSERT INTO order_items (order_id, line_no, product_id, quantity) VALUES %s "
                               "RETURNING order_id, line_no",
                          [(LO + 1, 1, 1, 3), (LO + 1, 2, 2, 4), (LO + 2, 1, 3, 1)], fetch=True)
    say("returning", sorted(rows))
    conn.commit()

    # a transaction with a savepoint that is rolled back, then committed
    cur.execute("UPDATE customers SET name = 'renamed' WHERE customer_id = %s", (LO + 1,))
    cur.execute("SAVEPOINT sp")
    try:
        cur.execute("INSERT INTO customers (customer_id, name, email) VALUES (%s, 'dup', 'bulk2@x')", (LO + 9,))
    except psycopg2.IntegrityError as e:
        say("savepoint error", e.pgcode, psycopg2.errorcodes.lookup(e.pgcode))
        cur.execute("ROLLBACK TO SAVEPOINT sp")
    cur.execute("UPDATE customers SET email = NULL WHERE customer_id = %s", (LO + 2,))
    cur.execute("RELEASE SAVEPOINT sp")
    conn.commit()
    cur.execute("SELECT customer_id, name, email FROM customers WHERE customer_id BETWEEN %s AND %s ORDER BY 1",
                (LO + 1, LO + 2))
    say("after savepoint", cur.fetchall())

    # an error aborts the transaction; rollback recovers the connection
    try:
        cur.execute("SELECT 1 / (count(*) - count(*)) FROM customers")
    except psycopg2.DataError as e:
        say("error", e.pgcode)
    try:
        cur.execute("SELECT 1")
    except psycopg2.InternalError as e:
        say("aborted", e.pgcode)
    conn.rollback()
    cur.execute("SELECT count(*) FROM customers WHERE customer_id > %s", (LO,))
    say("recovered", cur.fetchone())

    # COPY out with copy_expert
    buf = io.StringIO()
    cur.copy_expert(f"COPY (SELECT customer_id, name, email FROM customers WHERE customer_id > {LO} ORDER BY 1) "
                    "TO STDOUT WITH (FORMAT csv, HEADER)", buf)
    say("copy out", buf.getvalue().splitlines())
    conn.commit()

    # COPY in with copy_from, without the tenant column (PostgreSQL refuses it under RLS)
    try:
        cur.copy_from(io.StringIO(f"{LO + 20}\tcopied one\n{LO + 21}\tcopied\\ttab\n"), "customers",
                      columns=("customer_id", "name"))
        conn.commit()
        cur.execute("SELECT customer_id, name FROM customers WHERE customer_id >= %s ORDER BY 1", (LO + 20,))
        say("copy in ok", cur.fetchall())
        cur.execute("DELETE FROM customers WHERE customer_id >= %s", (LO + 20,))
        conn.commit()
    except psycopg2.Error as e:
        say("copy in ERROR", e.pgcode)
        conn.rollback()

    # COPY in with copy_expert, CSV with the tenant column: acme's row is taken, a globex row is refused
    for tenant in ("acme", "globex"):
        try:
            cur.copy_expert("COPY customers (tenant_id, customer_id, name) FROM STDIN WITH (FORMAT csv)",
                            io.StringIO(f"{tenant},{LO + 30},csv row\n"))
            conn.commit()
            cur.execute("SELECT customer_id, name FROM customers WHERE customer_id = %s", (LO + 30,))
            say(f"copy in as {tenant} ok", cur.fetchall())
            cur.execute("DELETE FROM customers WHERE customer_id = %s", (LO + 30,))
            conn.commit()
        except psycopg2.Error as e:
            say(f"copy in as {tenant} ERROR", e.pgcode)
            conn.rollback()

    # COPY out of a whole table with copy_to (COPY customers (…) TO STDOUT): the tenant's rows only
    buf = io.StringIO()
    cur.copy_to(buf, "customers", columns=("customer_id", "name"))
    say("copy_to", sorted(buf.getvalue().splitlines()))
    conn.commit()

    # execute_batch, dictionary rows, mogrify
    execute_batch(cur, "UPDATE customers SET email = %(email)s WHERE customer_id = %(id)s",
                  [{"id": LO + i, "email": f"batch{i}@x"} for i in (3, 4, 5)], page_size=2)
    conn.commit()
    with conn.cursor(cursor_factory=RealDictCursor) as dc:
        dc.execute("SELECT customer_id, email FROM customers WHERE customer_id BETWEEN %s AND %s ORDER BY 1",
                   (LO + 3, LO + 5))
        say("dict rows", [dict(r) for r in dc.fetchall()])
        say("description", [(d.name, d.type_code) for d in dc.description])
    say("mogrify", cur.mogrify("SELECT %s, %s", ("it's", None)).decode())
    conn.commit()

    # a read-only session refuses writes; the isolation level reaches PostgreSQL
    conn.set_session(readonly=True, isolation_level="REPEATABLE READ")
    cur.execute("SHOW transaction_isolation")
    say("isolation", cur.fetchone())
    try:
        cur.execute("UPDATE customers SET name = 'ro' WHERE customer_id = %s", (LO + 1,))
    except psycopg2.Error as e:
        say("read only", e.pgcode)
    conn.rollback()
    conn.set_session(readonly=False, isolation_level="DEFAULT")

    # a named (server-side) cursor read in itersize batches
    with conn.cursor(name="pg2_named") as nc:
        nc.itersize = 2
        nc.execute("SELECT customer_id, name FROM customers WHERE customer_id BETWEEN %s AND %s ORDER BY 1",
                   (LO + 1, LO + 5))
        say("named cursor", [r for r in nc])
    conn.commit()
    with conn.cursor(name="pg2_scroll", scrollable=True) as sc:
        sc.execute("SELECT customer_id FROM customers WHERE customer_id < 1000 ORDER BY 1")
        first = sc.fetchone()
        sc.scroll(0, mode="absolute")
        say("scroll", first, sc.fetchall())
    conn.commit()

    # large objects (libpq's lo_* calls, sent as FunctionCall messages): refused through tenantgate
    try:
        lob = conn.lobject(0, "wb")
        lob.write(b"large")
        lob.unlink()
        conn.commit()
        say("large object ok")
    except psycopg2.Error as e:
        say("large object ERROR", str(e).strip())  # libpq reports it without a SQLSTATE
        conn.rollback()

    # an application bug that pastes input into SQL: the injected OR still sees acme's rows only
    evil = "nobody' OR tenant_id <> 'acme' OR customer_id < 1000 OR 'a' = 'b"
    cur.execute(f"SELECT customer_id, name FROM customers WHERE name = '{evil}' ORDER BY 1")
    say("injected", cur.fetchall())
    conn.commit()

    # LISTEN/NOTIFY channels are shared by every tenant of the database: refused through tenantgate
    try:
        cur.execute("LISTEN orders_changed")
        cur.execute("UNLISTEN orders_changed")
        say("listen ok")
    except psycopg2.Error as e:
        say("listen ERROR", e.pgcode)
    conn.rollback()

    # a WITH HOLD cursor outlives its transaction (tenantgate keeps the client on its connection)
    with conn.cursor(name="pg2_held", withhold=True) as hc:
        hc.itersize = 1
        hc.execute("SELECT name FROM customers WHERE customer_id < 1000 ORDER BY 1")
        first = hc.fetchone()
        conn.commit()
        say("with hold", first, hc.fetchall())
    conn.commit()

    # refusals and errors keep the connection usable
    try:
        cur.execute("SELECT * FROM pg_authid")
    except psycopg2.Error as e:
        say("pg_authid", e.pgcode)
    conn.rollback()

    # settings sent at connect time (libpq options=-c …, application_name), and a statement timeout
    with psycopg2.connect(dsn, options="-c statement_timeout=5s -c lock_timeout=2s",
                          application_name="psycopg2 app") as c2, c2.cursor() as cur2:
        cur2.execute("SELECT current_setting('statement_timeout'), current_setting('lock_timeout'), "
                     "current_setting('application_name')")
        say("connect settings", cur2.fetchone())
        cur2.execute("SET statement_timeout = 50")
        try:
            cur2.execute("SELECT pg_sleep(5)")
        except psycopg2.errors.QueryCanceled as e:
            say("statement timeout", e.pgcode)
    c2.close()

    conn.autocommit = True
    cur.execute("DELETE FROM order_items WHERE order_id > %s", (LO,))
    cur.execute("DELETE FROM orders WHERE order_id > %s", (LO,))
    cur.execute("DELETE FROM customers WHERE customer_id > %s", (LO,))
    say("deleted", cur.rowcount)
    cur.close()
    conn.close()
    say("done")


if __name__ == "__main__":
    main(sys.argv[1])
