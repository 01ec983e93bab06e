"""Real clients through a TENANT session of the running demo (issue 3 "Must show").

asyncpg (prepared statements, codecs and type introspection, transactions, COPY both
ways, cancellation), psycopg 3 (server-side binding, prepared statements, pipeline
mode, COPY), SQLAlchemy 2 (reflection and the ORM: create, query, join,
relationship loading, bulk insert), psql (``\\d``, ``\\d+``, ``\\dt``, ``\\x``,
``\\copy``) and signed tenant tokens (``pool_app``).

Every test checks what a user sees: the rows returned (only the session's tenant),
errors with their exact SQLSTATE, and the other tenant's rows untouched (compared
before/after through ``demo.admin``, the direct superuser DSN).  Rows a test inserts
use ids from :func:`support.e2e.fresh_ids` and are removed again.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import io
import json
import os
import subprocess
import time
import uuid

import asyncpg
import psycopg
import pytest
import sqlalchemy.exc
from sqlalchemy import (DateTime, FetchedValue, ForeignKeyConstraint, MetaData, create_engine, delete, func, insert,
                        inspect, select, update)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, joinedload, mapped_column, relationship, selectinload

from support.e2e import RawClient, RawServerError, admin_execute, admin_rows, fresh_ids, pool_dsn, token

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

TENANT_TABLES = ("customers", "orders", "order_items")



def snapshot(demo, tenant: str) -> dict:
    return {t: admin_rows(demo, t, tenant) for t in TENANT_TABLES}


def delete_customers(demo, ids) -> None:
    admin_execute(demo, "DELETE FROM orders WHERE customer_id = ANY(%s)", [list(ids)])
    admin_execute(demo, "DELETE FROM customers WHERE customer_id = ANY(%s)", [list(ids)])


# =============================================================================== asyncpg


async def test_asyncpg_prepared_statements_see_only_own_rows(demo):
    conn = await asyncpg.connect(demo.app("acme"))
    try:
        stmt = await conn.prepare("SELECT order_id, status FROM orders WHERE customer_id = $1 ORDER BY order_id")
        assert [p.name for p in stmt.get_parameters()] == ["int4"]
        assert [a.name for a in stmt.get_attributes()] == ["order_id", "status"]
        assert [tuple(r) for r in await stmt.fetch(1)] == [(1, "open"), (2, "shipped")]
        assert [tuple(r) for r in await stmt.fetch(2)] == [(3, "open")]
        # a parameter naming the other tenant finds nothing
        by_tenant = await conn.prepare("SELECT count(*) FROM orders WHERE tenant_id = $1")
        assert await by_tenant.fetchval("globex") == 0
        assert await by_tenant.fetchval("acme") == 3
        # asyncpg's statement cache re-uses named statements across calls
        for _ in range(3):
            assert await conn.fetchval("SELECT count(*) FROM customers WHERE customer_id = $1", 1) == 1
        rows = await conn.fetch("SELECT tenant_id, count(*) FROM order_items GROUP BY 1")
        assert [tuple(r) for r in rows] == [("acme", 4)]
        # Describe of a statement the proxy rewrites (tenant column added) is what the client wrote
        ins = await conn.prepare("INSERT INTO customers (customer_id, name) VALUES ($1, $2) RETURNING tenant_id, name")
        assert [p.name for p in ins.get_parameters()] == ["int4", "text"]
        assert [a.name for a in ins.get_attributes()] == ["tenant_id", "name"]
        upd = await conn.prepare("UPDATE orders SET status = $2 WHERE order_id = $1 AND status <> $2")
        assert [p.name for p in upd.get_parameters()] == ["int4", "text"]
        tr = conn.transaction()
        await tr.start()
        assert tuple(await ins.fetchrow(fresh_ids()[0], "described")) == ("acme", "described")
        assert await upd.fetchval(1, "open") is None
        await tr.rollback()
    finally:
        await conn.close()


async def test_asyncpg_builtin_codecs_and_set_type_codec(demo):
    conn = await asyncpg.connect(demo.app("acme"))
    try:
        row = await conn.fetchrow(
            """SELECT '{"a": 1}'::jsonb AS j, 12.50::numeric AS n,
                      '00000000-0000-0000-0000-00000000002a'::uuid AS u,
                      '2024-01-05 10:00+00'::timestamptz AS ts, ARRAY['x', 'y']::text[] AS a,
                      $1::int AS p""", 7)
        assert row["j"] == '{"a": 1}'
        assert row["n"] == decimal.Decimal("12.50")
        assert row["u"] == uuid.UUID(int=42)
        assert row["ts"] == dt.datetime(2024, 1, 5, 10, tzinfo=dt.timezone.utc)
        assert row["a"] == ["x", "y"] and row["p"] == 7
        # set_type_codec looks the type up by name in pg_type (through the proxy)
        await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
        assert await conn.fetchval("SELECT $1::jsonb -> 'k'", {"k": [1, 2]}) == [1, 2]
        assert await conn.fetchval("""SELECT '{"a": 1}'::jsonb""") == {"a": 1}
        created = await conn.fetchval("SELECT created_at FROM orders WHERE order_id = 3")
        assert created == dt.datetime(2024, 2, 1, 9, 30, tzinfo=dt.timezone.utc)
    finally:
        await conn.close()


async def test_asyncpg_type_introspection_of_arrays_ranges_and_row_types(demo):
    conn = await asyncpg.connect(demo.app("acme"))
    try:
        assert await conn.fetchval("SELECT ARRAY[1, 2]::int[]") == [1, 2]
        assert await conn.fetchval("SELECT '[1,5)'::int4range") == asyncpg.Range(1, 5)
        row = await conn.fetchval("SELECT o FROM orders o WHERE order_id = 1")
        assert row["tenant_id"] == "acme" and row["status"] == "open"
    finally:
        await conn.close()


async def test_asyncpg_row_constructor(demo):
    conn = await asyncpg.connect(demo.app("acme"))
    try:
        assert tuple(await conn.fetchval("SELECT ROW(1, 'a')")) == (1, "a")
    finally:
        await conn.close()


async def test_asyncpg_transactions_commit_and_rollback(demo):
    globex_before = snapshot(demo, "globex")
    c1, c2, c3 = fresh_ids(3)
    conn = await asyncpg.connect(demo.app("acme"))
    try:
        tr = conn.transaction()
        await tr.start()
        await conn.execute("INSERT INTO customers (customer_id, name) VALUES ($1, 'rolled back')", c1)
        assert await conn.fetchval("SELECT tenant_id FROM customers WHERE customer_id = $1", c1) == "acme"
        await tr.rollback()
        assert await conn.fetchval("SELECT count(*) FROM customers WHERE customer_id = $1", c1) == 0

        async with conn.transaction():
            await conn.execute("INSERT INTO customers (customer_id, name) VALUES ($1, 'kept')", c2)
            try:
                async with conn.transaction():  # savepoint
                    await conn.execute("INSERT INTO customers (customer_id, name) VALUES ($1, 'sp')", c3)
                    raise RuntimeError("roll back to the savepoint")
            except RuntimeError:
                pass
        ids = {r[1] for r in admin_rows(demo, "customers", "acme")}
        assert c2 in ids and c1 not in ids and c3 not in ids
        # a write error inside a transaction aborts it like PostgreSQL does
        with pytest.raises(asyncpg.PostgresError) as e:
            async with conn.transaction():
                await conn.execute("INSERT INTO customers (customer_id, name) VALUES ($1, 'dup')", c2)
        assert e.value.sqlstate == "23505"
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
        delete_customers(demo, [c1, c2, c3])
    assert snapshot(demo, "globex") == globex_before


async def test_asyncpg_copy_out_only_own_rows(demo):
    conn = await asyncpg.connect(demo.app("acme"))
    try:
        out = io.BytesIO()
        assert await conn.copy_from_table("orders", output=out) == "COPY 3"
        lines = out.getvalue().decode().splitlines()
        assert [ln.split("\t")[:2] for ln in lines] == [["acme", "1"], ["acme", "2"], ["acme", "3"]]

        out = io.BytesIO()
        await conn.copy_from_table("order_items", columns=["order_id", "quantity"], output=out, format="csv")
        assert sorted(out.getvalue().decode().splitlines()) == ["1,1", "1,10", "2,2", "3,5"]

        out = io.BytesIO()
        await conn.copy_from_query("SELECT tenant_id, customer_id FROM customers ORDER BY 2", output=out)
        assert out.getvalue().decode().splitlines() == ["acme\t1", "acme\t2"]

        out = io.BytesIO()
        await conn.copy_from_query("SELECT * FROM orders WHERE tenant_id = 'globex'", output=out)
        assert out.getvalue() == b""
    finally:
        await conn.close()


async def test_asyncpg_copy_records_to_table_own_tenant_rows(demo):
    ids = fresh_ids(2)
    conn = await asyncpg.connect(demo.app("acme"))
    try:
        res = await conn.copy_records_to_table(
            "customers", records=[("acme", ids[0], "copied 1", None), ("acme", ids[1], "copied 2", "c2@acme.example")])
        assert res == "COPY 2"
        got = {r[1]: r[2] for r in admin_rows(demo, "customers", "acme")}
        assert got[ids[0]] == "copied 1" and got[ids[1]] == "copied 2"
    finally:
        await conn.close()
        delete_customers(demo, ids)


async def test_asyncpg_copy_records_with_a_foreign_tenant_row_commits_nothing(demo):
    before = {t: snapshot(demo, t) for t in ("acme", "globex")}
    ids = fresh_ids(3)
    conn = await asyncpg.connect(demo.app("acme"))
    try:
        with pytest.raises(asyncpg.PostgresError) as e:
            await conn.copy_records_to_table("customers", records=[
                ("acme", ids[0], "ok", None), ("globex", ids[1], "smuggled", None), ("acme", ids[2], "ok", None)])
        assert e.value.sqlstate == "42501", (e.value.sqlstate, str(e.value))  # as an INSERT of that row
        assert "not the session's tenant" in str(e.value)
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
        after = {t: snapshot(demo, t) for t in ("acme", "globex")}
        delete_customers(demo, ids)
    assert after == before


async def test_asyncpg_copy_in_without_the_tenant_column_fills_it_in(demo):
    """As INSERT does, COPY without the tenant column gets the session's tenant (copy_fill.py)."""
    conn = await asyncpg.connect(demo.app("acme"))
    globex_before = snapshot(demo, "globex")
    cid = fresh_ids()[0]
    try:
        res = await conn.copy_records_to_table("customers", records=[(cid, "x")], columns=["customer_id", "name"])
        assert res == "COPY 1"
        assert await conn.fetchval("SELECT tenant_id FROM customers WHERE customer_id = $1", cid) == "acme"
    finally:
        await conn.close()
        delete_customers(demo, [cid])
    assert snapshot(demo, "globex") == globex_before


async def test_asyncpg_cancellation_via_timeout(demo):
    conn = await asyncpg.connect(demo.app("acme"))
    try:
        t0 = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conn.execute("SELECT pg_sleep(30)", timeout=0.5)
        assert time.monotonic() - t0 < 5
        # the cancel reached PostgreSQL and the session is usable again
        assert await conn.fetchval("SELECT count(*) FROM orders") == 3
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetch("SELECT pg_sleep(30), order_id FROM orders", timeout=0.5)
        assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
    finally:
        await conn.close()


async def test_asyncpg_executemany_cursors_and_sql_level_statements(demo):
    globex_before = snapshot(demo, "globex")
    c1, c2 = fresh_ids(2)
    conn = await asyncpg.connect(demo.app("acme"))
    try:
        await conn.executemany("INSERT INTO customers (customer_id, name) VALUES ($1, $2)", [(c1, "many 1"), (c2, "many 2")])
        assert {r[1]: r[0] for r in admin_rows(demo, "customers", "acme")}.keys() >= {c1, c2}
        # INSERT ... ON CONFLICT DO UPDATE on the tenant's own key, and on a key only globex has
        row = await conn.fetchrow("INSERT INTO customers (customer_id, name) VALUES ($1, 'upserted') "
                                  "ON CONFLICT (tenant_id, customer_id) DO UPDATE SET name = excluded.name RETURNING *", c1)
        assert (row["tenant_id"], row["customer_id"], row["name"]) == ("acme", c1, "upserted")
        async with conn.transaction():
            # portal-based cursors (Execute with a row limit)
            ids = [r[0] async for r in conn.cursor("SELECT order_id FROM orders ORDER BY 1", prefetch=1)]
            assert ids == [1, 2, 3]
            cur = await conn.cursor("SELECT tenant_id, customer_id FROM customers WHERE customer_id < 3 ORDER BY 2")
            assert [tuple(r) for r in await cur.fetch(1)] == [("acme", 1)]
            assert tuple(await cur.fetchrow()) == ("acme", 2)
            # SQL-level cursors
            await conn.execute("DECLARE e2e_c CURSOR FOR SELECT tenant_id, order_id FROM orders ORDER BY 2")
            assert [tuple(r) for r in await conn.fetch("FETCH 2 FROM e2e_c")] == [("acme", 1), ("acme", 2)]
            await conn.execute("CLOSE e2e_c")
        # SQL-level PREPARE / EXECUTE / DEALLOCATE, each in its own message
        await conn.execute("PREPARE e2e_p(int) AS SELECT tenant_id, status FROM orders WHERE order_id = $1")
        assert [tuple(r) for r in await conn.fetch("EXECUTE e2e_p(2)")] == [("acme", "shipped")]
        await conn.execute("DEALLOCATE e2e_p")
        # a safe SET: statement_timeout cancels with 57014 like PostgreSQL
        await conn.execute("SET statement_timeout = '200ms'")
        with pytest.raises(asyncpg.PostgresError) as e:
            await conn.execute("SELECT pg_sleep(5)")
        assert e.value.sqlstate == "57014"
        await conn.execute("RESET statement_timeout")
        assert await conn.fetchval("SHOW statement_timeout") == "0"
    finally:
        await conn.close()
        delete_customers(demo, [c1, c2])
    assert snapshot(demo, "globex") == globex_before


async def test_asyncpg_bound_tenant_parameters_are_checked(demo):
    before = {t: snapshot(demo, t) for t in ("acme", "globex")}
    ids = fresh_ids(3)
    conn = await asyncpg.connect(demo.app("acme"))
    try:
        sql = "INSERT INTO customers (tenant_id, customer_id, name) VALUES ($1, $2, $3)"
        # executemany is atomic: one foreign row refuses the batch, nothing is committed
        with pytest.raises(asyncpg.PostgresError) as e:
            await conn.executemany(sql, [("acme", ids[0], "a"), ("globex", ids[1], "b"), ("acme", ids[2], "c")])
        assert e.value.sqlstate == "42501"
        for bad in (None, "globex", "ACME", "acme "):
            with pytest.raises(asyncpg.PostgresError) as e:
                await conn.execute(sql, bad, ids[0], "x")
            assert e.value.sqlstate == "42501", bad
        with pytest.raises(asyncpg.PostgresError) as e:
            await conn.execute("UPDATE customers SET tenant_id = $1 WHERE customer_id = 1", "globex")
        assert e.value.sqlstate == "42501"
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
        after = {t: snapshot(demo, t) for t in ("acme", "globex")}
        delete_customers(demo, ids)
    assert after == before


def test_prepare_and_execute_in_one_query_message(demo):
    """PREPARE, EXECUTE and DEALLOCATE in one Query message: EXECUTE returns acme's row only,
    and the statement is gone afterwards."""
    with psycopg.connect(demo.admin, autocommit=True) as admin:
        want = admin.execute("SELECT tenant_id, order_id FROM orders WHERE tenant_id = 'acme' ORDER BY order_id"
                             " LIMIT 1").fetchall()
        # the same order_id exists for globex too, or the check would prove nothing
        assert admin.execute("SELECT count(*) FROM orders WHERE order_id = %s AND tenant_id <> 'acme'",
                             [want[0][1]]).fetchone()[0] >= 1
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        cur = conn.execute(f"PREPARE e2e_q(int) AS SELECT tenant_id, order_id FROM orders WHERE order_id = $1; "
                           f"EXECUTE e2e_q({want[0][1]}); DEALLOCATE e2e_q", prepare=False)
        results = []
        while True:
            results.append(cur.statusmessage)
            if cur.description is not None:
                results.append([tuple(r) for r in cur.fetchall()])
            if not cur.nextset():
                break
        assert results == ["PREPARE", "SELECT 1", want, "DEALLOCATE"], results  # EXECUTE reports its query's tag
        with pytest.raises(psycopg.Error) as e:
            conn.execute("EXECUTE e2e_q(1)", prepare=False)
        assert e.value.sqlstate in ("26000", "42501"), e.value


# =============================================================================== psycopg 3


def test_psycopg_server_side_binding_and_prepared_statements(demo):
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        rows = conn.execute("SELECT order_id FROM orders WHERE status = %s ORDER BY 1", ["open"]).fetchall()
        assert rows == [(1,), (3,)]
        # prepare=True: a named server-side statement, executed repeatedly
        got = [conn.execute("SELECT count(*) FROM orders WHERE customer_id = %s", [c], prepare=True).fetchone()[0]
               for c in (1, 2, 1, 2)]
        assert got == [2, 1, 2, 1]
        assert conn.execute("SELECT count(*) FROM customers WHERE tenant_id = %s", ["globex"], prepare=True).fetchone() == (0,)
        with conn.cursor(binary=True) as cur:
            cur.execute("SELECT order_id, created_at FROM orders WHERE order_id = %s", [2])
            assert cur.fetchone() == (2, dt.datetime(2024, 1, 6, 11, tzinfo=dt.timezone.utc))
        # INSERT with the tenant column omitted: the proxy adds it
        cid = fresh_ids()[0]
        try:
            ret = conn.execute("INSERT INTO customers (customer_id, name) VALUES (%s, %s) RETURNING tenant_id",
                               [cid, "psycopg"]).fetchall()
            assert ret == [("acme",)]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("INSERT INTO customers (tenant_id, customer_id, name) VALUES (%s, %s, %s)",
                             ["globex", cid + 1, "smuggled"])
        finally:
            delete_customers(demo, [cid, cid + 1])
        assert not [r for r in admin_rows(demo, "customers", "globex") if r[1] == cid + 1]


def test_psycopg_named_cursor_and_executemany_returning(demo):
    ids = fresh_ids(2)
    try:
        with psycopg.connect(demo.app("globex")) as conn:
            with conn.cursor(name="e2e_server_side") as cur:  # DECLARE ... CURSOR / FETCH FORWARD
                cur.execute("SELECT tenant_id, order_id FROM orders ORDER BY 2")
                assert cur.fetchmany(1) == [("globex", 1)]
                assert cur.fetchall() == [("globex", 2)]
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO customers (customer_id, name) VALUES (%s, %s) RETURNING tenant_id, customer_id",
                                [(ids[0], "a"), (ids[1], "b")], returning=True)
                got = [cur.fetchone()]
                while cur.nextset():
                    got.append(cur.fetchone())
            assert got == [("globex", ids[0]), ("globex", ids[1])]
            conn.commit()
        assert {r[1] for r in admin_rows(demo, "customers", "globex")} >= set(ids)
    finally:
        delete_customers(demo, ids)


def test_psycopg_type_introspection(demo):
    from psycopg.types import TypeInfo
    from psycopg.types.composite import CompositeInfo, register_composite
    from psycopg.types.range import Range, RangeInfo

    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        assert TypeInfo.fetch(conn, "jsonb").oid == 3802
        assert RangeInfo.fetch(conn, "int4range").subtype_oid == 23
        info = CompositeInfo.fetch(conn, "orders")
        assert list(info.field_names) == ["tenant_id", "order_id", "customer_id", "status", "created_at"]
        register_composite(info, conn)
        (row,) = conn.execute("SELECT o FROM orders o WHERE order_id = 2").fetchone()
        assert (row.tenant_id, row.order_id, row.status) == ("acme", 2, "shipped")
        assert conn.execute("SELECT ARRAY[1, 2]::int[], '[1,5)'::int4range").fetchone() == ([1, 2], Range(1, 5))
        assert conn.execute("SELECT order_id FROM orders WHERE order_id = ANY(%s) ORDER BY 1", [[1, 3, 99]]).fetchall() == [
            (1,), (3,)]


def test_psycopg_pipeline_mode(demo):
    with psycopg.connect(demo.app("globex"), autocommit=True) as conn:
        with conn.pipeline():
            c1 = conn.execute("SELECT count(*) FROM customers")
            c2 = conn.execute("SELECT DISTINCT tenant_id FROM orders WHERE order_id = %s", [1])
            c3 = conn.execute("SELECT %s::int + 1", [41])
            c4 = conn.execute("SELECT name FROM customers WHERE tenant_id = %s", ["acme"])
        assert c1.fetchall() == [(2,)]
        assert c2.fetchall() == [("globex",)]
        assert c3.fetchall() == [(42,)]
        assert c4.fetchall() == []
        # an error inside the pipeline: the refused statement fails, the session goes on
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with conn.pipeline():
                conn.execute("SELECT pg_read_file(%s)", ["/etc/passwd"])
                conn.execute("SELECT 1")
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (2,)


def test_psycopg_copy_to_only_own_rows(demo):
    with psycopg.connect(demo.app("globex"), autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY orders TO STDOUT") as cp:
                text = b"".join(bytes(b) for b in cp).decode()
            assert [ln.split("\t")[:2] for ln in text.splitlines()] == [["globex", "1"], ["globex", "2"]]
            with cur.copy("COPY (SELECT customer_id, name FROM customers ORDER BY 1) TO STDOUT (FORMAT csv)") as cp:
                text = b"".join(bytes(b) for b in cp).decode()
            assert text.splitlines() == ["1,Hank Scorpio", "2,Homer Simpson"]
            with cur.copy("COPY order_items TO STDOUT (FORMAT binary)") as cp:
                cp.set_types(["text", "int4", "int4", "int4", "int4"])
                rows = list(cp.rows())
            assert sorted(rows) == [("globex", 1, 1, 2, 7), ("globex", 2, 1, 3, 1)]


def test_psycopg_copy_from_own_rows(demo):
    ids = fresh_ids(2)
    try:
        with psycopg.connect(demo.app("globex")) as conn:
            with conn.cursor() as cur:
                with cur.copy("COPY customers (tenant_id, customer_id, name) FROM STDIN") as cp:
                    for i in ids:
                        cp.write_row(("globex", i, f"copied {i}"))
            conn.commit()
        got = {r[1] for r in admin_rows(demo, "customers", "globex")}
        assert set(ids) <= got
    finally:
        delete_customers(demo, ids)


def test_psycopg_copy_from_with_a_foreign_tenant_row_commits_nothing(demo):
    before = {t: snapshot(demo, t) for t in ("acme", "globex")}
    ids = fresh_ids(2)
    try:
        with psycopg.connect(demo.app("globex"), autocommit=True) as conn:
            with pytest.raises(psycopg.Error) as e:
                with conn.cursor() as cur:
                    with cur.copy("COPY customers (tenant_id, customer_id, name) FROM STDIN (FORMAT csv)") as cp:
                        cp.write(f"globex,{ids[0]},fine\nacme,{ids[1]},smuggled\n".encode())
            assert e.value.sqlstate == "42501", (e.value.sqlstate, str(e.value))  # as an INSERT of that row
            assert "not the session's tenant" in str(e.value)
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        after = {t: snapshot(demo, t) for t in ("acme", "globex")}
        delete_customers(demo, ids)
    assert after == before


# =============================================================================== SQLAlchemy 2


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"
    product_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str]
    price_cents: Mapped[int]


class Customer(Base):
    __tablename__ = "customers"
    # the proxy fills in tenant_id: FetchedValue lets the ORM leave it out and read it back
    tenant_id: Mapped[str] = mapped_column(primary_key=True, server_default=FetchedValue())
    customer_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str]
    email: Mapped[str | None]
    orders: Mapped[list["Order"]] = relationship(back_populates="customer", order_by="Order.order_id")


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (ForeignKeyConstraint(["tenant_id", "customer_id"], ["customers.tenant_id", "customers.customer_id"]),)
    tenant_id: Mapped[str] = mapped_column(primary_key=True, server_default=FetchedValue())
    order_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer_id: Mapped[int]
    status: Mapped[str] = mapped_column(server_default=FetchedValue())
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=FetchedValue())
    customer: Mapped[Customer] = relationship(back_populates="orders")
    items: Mapped[list["OrderItem"]] = relationship(order_by="OrderItem.line_no")


class OrderItem(Base):
    __tablename__ = "order_items"
    __table_args__ = (
        ForeignKeyConstraint(["tenant_id", "order_id"], ["orders.tenant_id", "orders.order_id"]),
        ForeignKeyConstraint(["product_id"], ["products.product_id"]),
    )
    tenant_id: Mapped[str] = mapped_column(primary_key=True, server_default=FetchedValue())
    order_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    line_no: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    product_id: Mapped[int]
    quantity: Mapped[int]
    product: Mapped[Product] = relationship()


@pytest.fixture(scope="module")
def sa_engine(demo):
    eng = create_engine(demo.app("acme").replace("postgresql://", "postgresql+psycopg://"), pool_size=2)
    yield eng
    eng.dispose()


def test_sqlalchemy_reflection_through_the_tenant_session(sa_engine):
    insp = inspect(sa_engine)
    assert sorted(insp.get_table_names()) == ["customers", "order_items", "orders", "products"]
    assert [c["name"] for c in insp.get_columns("orders")] == ["tenant_id", "order_id", "customer_id", "status", "created_at"]
    assert insp.get_pk_constraint("order_items")["constrained_columns"] == ["tenant_id", "order_id", "line_no"]
    fks = insp.get_foreign_keys("orders")
    assert [(f["referred_table"], f["constrained_columns"]) for f in fks] == [("customers", ["tenant_id", "customer_id"])]
    assert {i["name"] for i in insp.get_indexes("orders")} == {"orders_tenant_customer_idx"}
    md = MetaData()
    md.reflect(sa_engine)
    assert set(md.tables) == {"customers", "order_items", "orders", "products"}
    assert str(md.tables["orders"].c.status.server_default.arg) == "'open'::text"
    with sa_engine.connect() as conn:
        rows = conn.execute(select(md.tables["orders"]).order_by(md.tables["orders"].c.order_id)).all()
    assert [(r.tenant_id, r.order_id) for r in rows] == [("acme", 1), ("acme", 2), ("acme", 3)]


def test_sqlalchemy_orm_query_join_and_relationship_loading(sa_engine):
    with Session(sa_engine) as s:
        assert [(c.tenant_id, c.customer_id) for c in s.scalars(select(Customer).order_by(Customer.customer_id))] == [
            ("acme", 1), ("acme", 2)]
        loaded = s.scalars(select(Customer).options(selectinload(Customer.orders)).order_by(Customer.customer_id)).all()
        assert [(c.name, [o.order_id for o in c.orders]) for c in loaded] == [
            ("Wile E. Coyote", [1, 2]), ("Road Runner", [3])]
        orders = s.scalars(select(Order).options(joinedload(Order.items).joinedload(OrderItem.product),
                                                 joinedload(Order.customer)).order_by(Order.order_id)).unique().all()
        assert [(o.order_id, o.customer.name, [(i.product.name, i.quantity) for i in o.items]) for o in orders] == [
            (1, "Wile E. Coyote", [("Widget", 10), ("Gadget", 1)]),
            (2, "Wile E. Coyote", [("Gizmo", 2)]),
            (3, "Road Runner", [("Widget", 5)]),
        ]
        totals = s.execute(
            select(Customer.name, func.sum(OrderItem.quantity * Product.price_cents))
            .join(Customer.orders).join(Order.items).join(OrderItem.product)
            .group_by(Customer.name).order_by(Customer.name)).all()
        assert totals == [("Road Runner", 1250), ("Wile E. Coyote", 2500 + 1299 + 9998)]
        # lazy loading goes through the proxy too
        c = s.scalars(select(Customer).where(Customer.customer_id == 2)).one()
        assert [o.status for o in c.orders] == ["open"]
        # another tenant's rows are invisible, even by primary key
        assert s.get(Customer, ("globex", 1)) is None
        assert s.scalars(select(Order).where(Order.tenant_id == "globex")).all() == []
        assert s.scalar(select(func.count()).select_from(OrderItem)) == 4


def test_sqlalchemy_orm_create_and_bulk_insert_with_the_tenant_column_omitted(demo, sa_engine):
    globex_before = snapshot(demo, "globex")
    c1, c2, c3, c4 = fresh_ids(4)
    try:
        with Session(sa_engine) as s:
            c = Customer(customer_id=c1, name="ORM one", email=f"{c1}@acme.example")
            s.add(c)
            s.flush()
            assert c.tenant_id == "acme"  # filled in by the proxy, read back with RETURNING
            s.execute(insert(Customer), [{"customer_id": c2, "name": "bulk a"}, {"customer_id": c3, "name": "bulk b"}])
            ret = s.scalars(insert(Customer).returning(Customer.tenant_id), [{"customer_id": c4, "name": "bulk c"}]).all()
            assert ret == ["acme"]
            s.commit()
        with Session(sa_engine) as s:
            mine = s.scalars(select(Customer.customer_id).where(Customer.customer_id.in_([c1, c2, c3, c4]))).all()
            assert sorted(mine) == [c1, c2, c3, c4]
        ids = {r[1] for r in admin_rows(demo, "customers", "acme")}
        assert {c1, c2, c3, c4} <= ids
    finally:
        delete_customers(demo, [c1, c2, c3, c4])
    assert snapshot(demo, "globex") == globex_before


def test_sqlalchemy_orm_update_and_delete_touch_only_own_rows(demo, sa_engine):
    before = {t: snapshot(demo, t) for t in ("acme", "globex")}
    with Session(sa_engine) as s:
        c = s.get(Customer, ("acme", 2))
        c.name = "Renamed"
        s.flush()  # UPDATE ... WHERE tenant_id = %(...)s::VARCHAR AND customer_id = ...
        res = s.execute(update(Customer).where(Customer.customer_id.in_([1, 2])).values(email=None))
        assert res.rowcount == 2  # globex also has customers 1 and 2: untouched
        order = s.get(Order, ("acme", 3))
        for item in order.items:
            s.delete(item)
        s.flush()
        assert s.execute(delete(OrderItem).where(OrderItem.order_id == 1)).rowcount == 2
        assert s.scalar(select(func.count()).select_from(OrderItem)) == 1
        # while the transaction is open, the other tenant's rows are as they were
        assert snapshot(demo, "globex") == before["globex"]
        s.rollback()
    assert {t: snapshot(demo, t) for t in ("acme", "globex")} == before
    with Session(sa_engine) as s:
        s.execute(update(Customer).values(name="everyone"))
        s.commit()
    try:
        assert {r[2] for r in admin_rows(demo, "customers", "acme")} == {"everyone"}
        assert snapshot(demo, "globex") == before["globex"]
    finally:
        for _, cid, name, *_ in before["acme"]["customers"]:
            admin_execute(demo, "UPDATE customers SET name = %s WHERE tenant_id = 'acme' AND customer_id = %s", [name, cid])
    assert snapshot(demo, "acme") == before["acme"]


def test_sqlalchemy_orm_relationship_create_and_explicit_tenant(demo, sa_engine):
    globex_before = snapshot(demo, "globex")
    c1, c2, o1 = fresh_ids(3)
    try:
        with Session(sa_engine) as s:
            c = Customer(customer_id=c1, name="with orders")
            s.add(c)
            s.flush()
            # tenant_id of the order comes from the relationship: a bound ::VARCHAR parameter
            s.add(Order(order_id=o1, customer=c))
            s.flush()
            s.execute(insert(Customer), [{"tenant_id": "acme", "customer_id": c2, "name": "explicit"}])
            s.commit()
        assert {r[1] for r in admin_rows(demo, "orders", "acme")} >= {o1}
        with Session(sa_engine) as s:
            with pytest.raises(sqlalchemy.exc.DBAPIError) as e:
                s.execute(insert(Customer), [{"tenant_id": "globex", "customer_id": c2 + 1, "name": "smuggled"}])
            assert getattr(e.value.orig, "sqlstate", None) == "42501"
            assert "session's tenant" in str(e.value)
    finally:
        admin_execute(demo, "DELETE FROM orders WHERE order_id = %s", [o1])
        delete_customers(demo, [c1, c2, c2 + 1])
    assert snapshot(demo, "globex") == globex_before


# =============================================================================== psql


def psql(demo, tenant: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PGCONNECT_TIMEOUT="10")
    env.pop("PGPASSWORD", None)
    return subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", demo.app(tenant), *args], input=input,
                          capture_output=True, text=True, env=env, timeout=60)


def test_psql_describe_commands(demo):
    r = psql(demo, "acme", "-c", r"\d")
    assert r.returncode == 0, r.stderr
    for t in ("customers", "order_items", "orders", "products"):
        assert f"| {t}" in r.stdout
    r = psql(demo, "acme", "-c", r"\dt")
    assert r.returncode == 0, r.stderr
    assert "(4 rows)" in r.stdout
    r = psql(demo, "acme", "-c", r"\d+ orders")
    assert r.returncode == 0, r.stderr
    assert 'Table "public.orders"' in r.stdout
    for text in ("created_at", "timestamp with time zone", "'open'::text", "orders_pkey", "PRIMARY KEY, btree (tenant_id, order_id)",
                 "REFERENCES customers(tenant_id, customer_id)", "Referenced by:"):
        assert text in r.stdout, text


def test_psql_expanded_select_and_copy_out(demo):
    r = psql(demo, "globex", input="\\x\nSELECT * FROM orders ORDER BY order_id;\n")
    assert r.returncode == 0, r.stderr
    assert "Expanded display is on." in r.stdout
    assert "-[ RECORD 1 ]" in r.stdout and "-[ RECORD 2 ]" in r.stdout and "-[ RECORD 3 ]" not in r.stdout
    assert "tenant_id   | globex" in r.stdout and "acme" not in r.stdout
    r = psql(demo, "globex", "-c", r"\copy orders TO STDOUT")
    assert r.returncode == 0, r.stderr
    expected = [(t, str(o)) for t, o, *_ in admin_rows(demo, "orders", "globex")]
    assert sorted(tuple(ln.split("\t")[:2]) for ln in r.stdout.splitlines()) == sorted(expected)
    # an error in a psql script gives the SQLSTATE-backed message and stops the script
    r = psql(demo, "globex", input="SELECT 1;\nSELECT pg_read_file('/etc/passwd');\nSELECT 2;\n")
    assert r.returncode == 3
    assert "ERROR:  function pg_read_file is not allowed" in r.stderr


# =============================================================================== tenant tokens


async def test_token_session_sees_only_the_token_tenant(demo):
    conn = await asyncpg.connect(pool_dsn(demo))
    try:
        # no tenant yet: tenant data is refused, tenant-free statements work
        with pytest.raises(asyncpg.PostgresError) as e:
            await conn.fetch("SELECT * FROM orders")
        assert e.value.sqlstate == "42501"
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.execute(f"SET tenantgate.tenant = '{token(demo, 'globex')}'") == "SET"
        assert {r[0] for r in await conn.fetch("SELECT tenant_id FROM orders")} == {"globex"}
        assert await conn.fetchval("SELECT count(*) FROM customers") == len(admin_rows(demo, "customers", "globex"))
        # switching with another valid token switches the tenant
        await conn.execute(f"SET tenantgate.tenant = '{token(demo, 'acme')}'")
        assert {r[0] for r in await conn.fetch("SELECT tenant_id FROM order_items")} == {"acme"}
    finally:
        await conn.close()


@pytest.mark.parametrize("kind", ["forged", "expired", "garbage"])
async def test_bad_token_at_set_time_is_28000_and_keeps_the_tenant(demo, kind):
    bad = {"forged": token(demo, "acme", key="not-the-key-" * 3), "expired": token(demo, "acme", ttl_s=-60),
           "garbage": "garbage.not.a-token"}[kind]
    conn = await asyncpg.connect(pool_dsn(demo))
    try:
        await conn.execute(f"SET tenantgate.tenant = '{token(demo, 'globex')}'")
        with pytest.raises(asyncpg.PostgresError) as e:
            await conn.execute(f"SET tenantgate.tenant = '{bad}'")
        assert e.value.sqlstate == "28000"
        assert {r[0] for r in await conn.fetch("SELECT tenant_id FROM orders")} == {"globex"}
    finally:
        await conn.close()


async def test_startup_option_token(demo):
    conn = await asyncpg.connect(pool_dsn(demo), server_settings={"options": f"-c tenantgate.tenant={token(demo, 'acme')}"})
    try:
        assert {r[0] for r in await conn.fetch("SELECT tenant_id FROM customers")} == {"acme"}
    finally:
        await conn.close()
    with psycopg.connect(pool_dsn(demo), options=f"-c tenantgate.tenant={token(demo, 'globex')}") as conn:
        assert conn.execute("SELECT DISTINCT tenant_id FROM orders").fetchall() == [("globex",)]


@pytest.mark.parametrize("kind", ["forged", "expired", "garbage"])
def test_bad_token_at_startup_is_fatal_28000(demo, kind):
    bad = {"forged": token(demo, "acme", key="not-the-key-" * 3), "expired": token(demo, "acme", ttl_s=-60),
           "garbage": "garbage"}[kind]
    with pytest.raises(RawServerError) as e:
        RawClient(pool_dsn(demo), options={"options": f"-c tenantgate.tenant={bad}"})
    assert (e.value.severity, e.value.sqlstate) == ("FATAL", "28000")


async def test_set_local_token_reverts_at_transaction_end(demo):
    # statement_cache_size=0: every fetch is parsed afresh (see the prepared-statement test below)
    conn = await asyncpg.connect(pool_dsn(demo), statement_cache_size=0)
    try:
        await conn.execute(f"SET tenantgate.tenant = '{token(demo, 'globex')}'")
        async with conn.transaction():
            await conn.execute(f"SET LOCAL tenantgate.tenant = '{token(demo, 'acme')}'")
            assert {r[0] for r in await conn.fetch("SELECT tenant_id FROM orders")} == {"acme"}
        assert {r[0] for r in await conn.fetch("SELECT tenant_id FROM orders")} == {"globex"}
        tr = conn.transaction()
        await tr.start()
        await conn.execute(f"SET LOCAL tenantgate.tenant = '{token(demo, 'acme')}'")
        assert await conn.fetchval("SELECT count(*) FROM customers") == len(admin_rows(demo, "customers", "acme"))
        await tr.rollback()
        assert {r[0] for r in await conn.fetch("SELECT tenant_id FROM customers")} == {"globex"}
    finally:
        await conn.close()


async def test_credential_bound_user_cannot_switch_tenant_with_a_valid_token(demo):
    conn = await asyncpg.connect(demo.app("acme"))
    try:
        with pytest.raises(asyncpg.PostgresError) as e:
            await conn.execute(f"SET tenantgate.tenant = '{token(demo, 'globex')}'")
        assert e.value.sqlstate == "42501"
        assert {r[0] for r in await conn.fetch("SELECT tenant_id FROM orders")} == {"acme"}
    finally:
        await conn.close()


async def test_prepared_statement_never_returns_the_previous_tenants_rows(demo):
    conn = await asyncpg.connect(pool_dsn(demo))
    try:
        await conn.execute(f"SET tenantgate.tenant = '{token(demo, 'globex')}'")
        stmt = await conn.prepare("SELECT tenant_id, order_id FROM orders")
        assert {r[0] for r in await stmt.fetch()} == {"globex"}
        await conn.execute(f"SET tenantgate.tenant = '{token(demo, 'acme')}'")
        assert "globex" not in {r[0] for r in await stmt.fetch()}
    finally:
        await conn.close()


async def test_prepared_statement_follows_a_tenant_switch(demo):
    conn = await asyncpg.connect(pool_dsn(demo))
    try:
        await conn.execute(f"SET tenantgate.tenant = '{token(demo, 'globex')}'")
        stmt = await conn.prepare("SELECT tenant_id, count(*) FROM orders GROUP BY 1")
        assert [tuple(r) for r in await stmt.fetch()] == [("globex", 2)]
        await conn.execute(f"SET tenantgate.tenant = '{token(demo, 'acme')}'")
        assert [tuple(r) for r in await stmt.fetch()] == [("acme", 3)]
    finally:
        await conn.close()
