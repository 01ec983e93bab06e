"""A SQLAlchemy 2.0 ORM application on psycopg 3: reflection, relationships with selectinload,
a savepoint, a multi-row insert."""

import sys

from sqlalchemy import ForeignKeyConstraint, MetaData, create_engine, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, selectinload

LO = 972000


class Base(DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "customers"
    tenant_id: Mapped[str] = mapped_column(primary_key=True, server_default="acme")
    customer_id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    email: Mapped[str | None]
    orders: Mapped[list["Order"]] = relationship(back_populates="customer")


class Order(Base):
    __tablename__ = "orders"
    __table_args__ = (ForeignKeyConstraint(["tenant_id", "customer_id"], ["customers.tenant_id", "customers.customer_id"]),)
    tenant_id: Mapped[str] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int]
    status: Mapped[str]
    customer: Mapped[Customer] = relationship(back_populates="orders")


def say(*a):
    print(*a, flush=True)


def main(dsn: str) -> None:
    url = dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(url)
    insp = inspect(engine)
    say("tables", sorted(t for t in insp.get_table_names() if t in ("customers", "orders", "order_items", "products")))
    say("columns", [c["name"] for c in insp.get_columns("customers")])
    say("pk", insp.get_pk_constraint("orders")["constrained_columns"])
    say("fks", sorted(fk["referred_table"] for fk in insp.get_foreign_keys("order_items")))
    meta = MetaData()
    meta.reflect(engine, only=["products"])
    with Session(engine) as s:
        q = select(Customer).where(Customer.customer_id < 1000).options(selectinload(Customer.orders)).order_by(Customer.customer_id)
        say("orm", [(c.name, sorted(o.order_id for o in c.orders)) for c in s.scalars(q)])
        s.add_all([Customer(customer_id=LO + 1, name="x"), Customer(customer_id=LO + 2, name="y")])
        s.flush()
        try:
            with s.begin_nested():
                s.execute(text("INSERT INTO customers (customer_id, name) VALUES (:i, 'duplicate')"), {"i": LO + 1})
        except IntegrityError as e:
            say("savepoint", e.orig.sqlstate)
        s.commit()
        say("inserted", sorted(s.scalars(select(Customer.name).where(Customer.customer_id > LO))))
        for c in s.scalars(select(Customer).where(Customer.customer_id > LO)):
            s.delete(c)
        s.commit()
    engine.dispose()
    say("done")


if __name__ == "__main__":
    main(sys.argv[1])
