"""A SQLAlchemy 2 application on the driver given as the second argument, ``postgresql+asyncpg``
(AsyncEngine/AsyncSession; the same ORM code runs through ``run_sync``) or ``postgresql+psycopg2``.

The application does not know the tenant column: its mapped classes leave ``tenant_id`` out,
as an application behind tenantgate (or an RLS-bound role with a column default) would.  It
reflects the tables (names, columns, types, keys), reads with relationships and
``selectinload``, inserts several rows at once (Core ``insert().values([...])`` and ORM
``add_all``, with server defaults fetched back), uses savepoints (``begin_nested``), upserts
(``ON CONFLICT``), streams (``yield_per``), locks (``FOR UPDATE``), ``INSERT … SELECT``, ORM
bulk UPDATE, ``merge()``, ``UPDATE … FROM``, a data-modifying CTE, and updates and deletes
with RETURNING.  Prints a deterministic transcript.  (sqlalchemy_app.py covers the
psycopg 3 dialect and the Inspector API.)
"""

import asyncio
import sys

from sqlalchemy import (Integer, MetaData, String, Table, any_, column, create_engine, delete, exists, func, insert,
                        select, text, true, tuple_, union_all, update, values)
from sqlalchemy.dialects.postgresql import aggregate_order_by, array
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import (DeclarativeBase, Mapped, Session, mapped_column, relationship,
                            selectinload)

DRIVERS = {"postgresql+asyncpg": 977000, "postgresql+psycopg2": 978000}
TABLES = ["customers", "orders", "order_items", "products"]


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = "products"
    product_id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    price_cents: Mapped[int]


class Customer(Base):
    __tablename__ = "customers"
    customer_id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    email: Mapped[str | None] = mapped_column(String)
    orders: Mapped[list["Order"]] = relationship(
        primaryjoin="Customer.customer_id == foreign(Order.customer_id)", back_populates="customer",
        order_by="Order.order_id", cascade="all, delete-orphan")


class Order(Base):
    __tablename__ = "orders"
    __mapper_args__ = {"eager_defaults": True}  # fetch the server's status default at insert
    order_id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int]
    status: Mapped[str] = mapped_column(server_default="open")
    customer: Mapped[Customer] = relationship(
        primaryjoin="Customer.customer_id == foreign(Order.customer_id)", back_populates="orders")
    items: Mapped[list["OrderItem"]] = relationship(
        primaryjoin="Order.order_id == foreign(OrderItem.order_id)", order_by="OrderItem.line_no",
        cascade="all, delete-orphan")


class OrderItem(Base):
    __tablename__ = "order_items"
    order_id: Mapped[int] = mapped_column(primary_key=True)
    line_no: Mapped[int] = mapped_column(primary_key=True)
    product_id: Mapped[int]
    quantity: Mapped[int]
    product: Mapped[Product] = relationship(primaryjoin="Product.product_id == foreign(OrderItem.product_id)")


def say(*a):
    print(*a, flush=True)


def reflect(conn) -> None:
    """MetaData.reflect of the tenant tables and products: names, columns, types, keys."""
    meta = MetaData()
    meta.reflect(conn, only=TABLES)
    for name in sorted(meta.tables):
        t: Table = meta.tables[name]
        say("table", name, [(c.name, str(c.type), c.nullable) for c in t.columns])
        say("  pk", [c.name for c in t.primary_key.columns])
        say("  fks", sorted((fk.parent.name, fk.column.table.name, fk.column.name) for fk in t.foreign_keys))
        say("  indexes", sorted((i.name, [c.name for c in i.columns]) for i in t.indexes))


def work(s: Session, lo: int) -> None:
    say("connect settings", s.execute(text("SELECT current_setting('application_name'), "
                                           "current_setting('statement_timeout')")).one())
    q = (select(Customer).where(Customer.customer_id < 1000).order_by(Customer.customer_id)
         .options(selectinload(Customer.orders).selectinload(Order.items).selectinload(OrderItem.product)))
    say("orm", [(c.name, [(o.order_id, o.status, [(i.product.name, i.quantity) for i in o.items]) for o in c.orders])
                for c in s.scalars(q)])
    say("aggregate", s.execute(select(Order.status, func.count()).where(Order.order_id < 1000)
                               .group_by(Order.status).order_by(Order.status)).all())

    # SQL that SQLAlchemy applications write: LATERAL, tuple IN, VALUES, UNION ALL, ANY, JSON,
    # set-returning functions, EXISTS, outer joins
    last = (select(Order.order_id, Order.status).where(Order.customer_id == Customer.customer_id)
            .order_by(Order.order_id.desc()).limit(1).lateral("last"))
    say("lateral", s.execute(select(Customer.name, last.c.order_id, last.c.status).join(last, true())
                             .where(Customer.customer_id < 1000).order_by(Customer.customer_id)).all())
    say("tuple in", s.execute(select(OrderItem.order_id, OrderItem.line_no, OrderItem.quantity)
                              .where(tuple_(OrderItem.order_id, OrderItem.line_no).in_([(1, 2), (3, 1), (9, 9)]))
                              .order_by(OrderItem.order_id)).all())
    wanted = values(column("id", Integer), column("label", String), name="wanted").data([(1, "one"), (3, "three")])
    say("values", s.execute(select(wanted.c.label, Order.status).join(Order, Order.order_id == wanted.c.id)
                            .order_by(wanted.c.id)).all())
    say("union all", sorted(s.scalars(union_all(select(Customer.name).where(Customer.customer_id < 1000),
                                                select(Product.name).where(Product.price_cents > 1000)))))
    say("any", s.scalars(select(Customer.name).where(Customer.customer_id == any_(array([2, 5])))).all())
    say("json", s.scalar(select(func.json_agg(aggregate_order_by(
        func.json_build_object("id", Order.order_id, "status", Order.status), Order.order_id)))
        .where(Order.order_id < 1000)))
    days = func.generate_series(1, 3).table_valued("n").render_derived(name="days")
    say("generate_series", s.execute(select(days.c.n, func.count(Order.order_id))
                                     .select_from(days).outerjoin(Order, Order.order_id == days.c.n)
                                     .group_by(days.c.n).order_by(days.c.n)).all())
    say("exists", s.scalars(select(Product.name).where(exists().where(OrderItem.product_id == Product.product_id)
                                                       .where(OrderItem.quantity >= 5))
                            .order_by(Product.name)).all())
    say("outer join", s.execute(select(Product.name, func.coalesce(func.sum(OrderItem.quantity), 0))
                                .outerjoin(OrderItem, OrderItem.product_id == Product.product_id)
                                .group_by(Product.name).order_by(Product.name)).all())

    # multi-row insert, Core: one INSERT … VALUES (…), (…), (…)
    s.execute(insert(Customer).values([{"customer_id": lo + i, "name": f"core {i}", "email": f"core{i}@x"}
                                       for i in range(1, 4)]))
    # ORM add_all, with children through the relationships and the status default fetched back
    c = Customer(customer_id=lo + 10, name="orm parent",
                 orders=[Order(order_id=lo + 1, items=[OrderItem(line_no=1, product_id=1, quantity=2),
                                                       OrderItem(line_no=2, product_id=3, quantity=1)]),
                         Order(order_id=lo + 2, status="shipped"), Order(order_id=lo + 3)])
    s.add_all([c, Customer(customer_id=lo + 11, name="orm single")])
    s.flush()
    say("server default", sorted((o.order_id - lo, o.status) for o in c.orders))
    s.commit()

    # savepoints: a failed one is rolled back alone, a good one is kept
    try:
        with s.begin_nested():
            s.add(Customer(customer_id=lo + 20, name="dup", email="core1@x"))
    except IntegrityError as e:
        say("savepoint rolled back", e.orig.pgcode if hasattr(e.orig, "pgcode") else e.orig.sqlstate)
    with s.begin_nested():
        s.add(Customer(customer_id=lo + 21, name="kept"))
    s.commit()
    say("customers", s.scalars(select(Customer.name).where(Customer.customer_id > lo).order_by(Customer.name)).all())

    # upsert: INSERT … ON CONFLICT ON CONSTRAINT … DO UPDATE / DO NOTHING (one row new, one existing)
    upsert = pg_insert(Customer).values([{"customer_id": lo + 1, "name": "upserted"},
                                         {"customer_id": lo + 30, "name": "upsert new"}])
    say("upsert", sorted(s.execute(upsert.on_conflict_do_update(
        constraint="customers_pkey", set_={"name": upsert.excluded.name + " (was " + Customer.name + ")"})
        .returning(Customer.customer_id - lo, Customer.name)).all()))
    say("insert or skip", s.execute(pg_insert(Customer).values(customer_id=lo + 30, name="skipped")
                                    .on_conflict_do_nothing().returning(Customer.customer_id)).all())
    s.commit()

    # streaming: a server-side cursor read in batches (yield_per), and SELECT … FOR UPDATE
    stream = s.execute(select(Customer.customer_id - lo).where(Customer.customer_id > lo)
                       .order_by(Customer.customer_id).execution_options(yield_per=2))
    say("yield_per", [b for b in stream.scalars().partitions()])
    locked = s.scalars(select(Customer).where(Customer.customer_id == lo + 30).with_for_update()).one()
    locked.name = "locked and renamed"
    s.commit()
    say("for update", s.scalar(select(Customer.name).where(Customer.customer_id == lo + 30)))

    # INSERT … SELECT (from_select): copies acme's seed customers only
    copied = s.execute(insert(Customer).from_select(
        ["customer_id", "name"], select(Customer.customer_id + lo + 100, Customer.name + " copy")
        .where(Customer.customer_id < 1000)).returning(Customer.customer_id - lo, Customer.name)).all()
    say("from_select", sorted(copied))
    # ORM bulk UPDATE by primary key (executemany), merge(), UPDATE … FROM another table
    s.execute(update(Customer), [{"customer_id": lo + 101, "email": "copy1@x"},
                                 {"customer_id": lo + 102, "email": "copy2@x"}])
    merged = s.merge(Customer(customer_id=lo + 102, name="merged", email="copy2@x"))
    s.flush()
    say("merge", merged.name, s.scalar(select(Customer.email).where(Customer.customer_id == lo + 101)))
    say("update from", s.execute(update(Customer).where(Customer.customer_id == Order.customer_id)
                                 .where(Order.order_id == lo + 2).values(name=Customer.name + " (shipped to)")
                                 .returning(Customer.customer_id - lo, Customer.name)).all())
    # a data-modifying CTE: DELETE … RETURNING inside WITH, counted by the outer SELECT
    gone = delete(Customer).where(Customer.customer_id > lo + 100).returning(Customer.customer_id).cte("gone")
    say("delete cte", s.scalar(select(func.count()).select_from(gone)))
    s.commit()

    # a serializable read-only transaction (asyncpg: BEGIN ISOLATION LEVEL … READ ONLY)
    s.connection(execution_options={"isolation_level": "SERIALIZABLE", "postgresql_readonly": True})
    say("isolation", s.scalar(text("SHOW transaction_isolation")), s.scalar(text("SHOW transaction_read_only")))
    try:
        s.execute(update(Customer).where(Customer.customer_id == lo + 1).values(name="read only"))
    except DBAPIError as e:
        say("read only", getattr(e.orig, "pgcode", None) or getattr(e.orig, "sqlstate", None))
    s.rollback()

    # update and delete with RETURNING
    renamed = s.execute(update(Customer).where(Customer.customer_id.between(lo + 1, lo + 3))
                        .values(name=Customer.name + " (renamed)")
                        .returning(Customer.customer_id - lo, Customer.name)).all()
    say("update returning", sorted(renamed))
    say("renamed", s.execute(select(Customer.customer_id - lo, Customer.name)
                             .where(Customer.customer_id.between(lo + 1, lo + 3)).order_by(Customer.customer_id)).all())
    say("delete returning", sorted(s.execute(delete(OrderItem).where(OrderItem.order_id > lo)
                                             .returning(OrderItem.order_id - lo, OrderItem.line_no)).all()))
    s.commit()
    parent = s.get(Customer, lo + 10)
    say("orders left", [(o.order_id - lo, len(o.items)) for o in parent.orders])
    s.delete(parent)  # cascades to its orders in the ORM
    s.commit()
    say("deleted", sorted(s.scalars(delete(Customer).where(Customer.customer_id > lo)
                                    .returning(Customer.customer_id - lo)).all()))
    s.commit()
    say("left", s.scalar(select(func.count()).select_from(Customer).where(Customer.customer_id > lo)))


async def main_async(url: str, dsn: str, lo: int) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    import asyncpg

    # asyncpg reads the libpq connection string itself (sslmode, sslrootcert, …)
    engine = create_async_engine(url.split("?")[0], async_creator=lambda: asyncpg.connect(
        dsn, server_settings={"application_name": "sqlalchemy app", "statement_timeout": "5s"}))
    async with engine.connect() as conn:
        await conn.run_sync(reflect)
    async with AsyncSession(engine) as s:
        await s.run_sync(work, lo)
    await engine.dispose()


def main(dsn: str, driver: str) -> None:
    lo = DRIVERS[driver]
    url = dsn.replace("postgresql://", f"{driver}://", 1)
    if driver == "postgresql+asyncpg":
        asyncio.run(main_async(url, dsn, lo))
    else:
        engine = create_engine(url, connect_args={"application_name": "sqlalchemy app",
                                                  "options": "-c statement_timeout=5s"})
        with engine.connect() as conn:
            reflect(conn)
        with Session(engine) as s:
            work(s, lo)
        engine.dispose()
    say("done")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
