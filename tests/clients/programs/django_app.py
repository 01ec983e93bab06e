"""A Django application with its settings in code (no project files): unmanaged models over the
demo schema, run on the driver mode given as the second argument:

- ``server-binding``: psycopg 3 with ``OPTIONS: {"server_side_binding": True, "prepare_threshold": 2}``
  (Parse/Bind, and named prepared statements for queries run twice);
- ``client-binding``: psycopg 3, Django's default (parameters merged into the text client-side);
- ``psycopg2``: Django's psycopg2 backend (psycopg 3 hidden from the import).

The models leave the tenant column out, as an application behind tenantgate (or an RLS-bound
role with a column default) would.  It runs ``inspectdb`` (Django's catalog introspection),
``bulk_create`` (the ``INSERT … SELECT * FROM UNNEST(…)`` form), ``get_or_create``,
``select_related``/``prefetch_related``, nested ``transaction.atomic`` (a savepoint),
``.iterator()`` (a server-side cursor), aggregation, subqueries and window functions,
``bulk_update``, ``select_for_update``, and queryset ``update()``/``delete()``.  Prints a
deterministic transcript.
"""

import io
import os
import sys
import types
from urllib.parse import parse_qsl, unquote, urlsplit

LO = 979000  # this program's private id range; removed at the end
MODES = ("server-binding", "client-binding", "psycopg2")


def say(*a):
    print(*a, flush=True)


def configure(dsn: str, mode: str) -> None:
    if mode == "psycopg2":
        sys.modules["psycopg"] = None  # Django's backend then falls back to psycopg2
    import django
    from django.apps import AppConfig
    from django.conf import settings

    class ShopConfig(AppConfig):  # the application, installed from this file (no package on disk)
        name = label = "shop"
        path = os.path.dirname(os.path.abspath(__file__))

    shop = types.ModuleType("shop")
    shop.ShopConfig = ShopConfig
    sys.modules["shop"] = shop

    url = urlsplit(dsn)
    options = dict(parse_qsl(url.query))  # sslmode, sslrootcert, … go to libpq as they are
    options.update(application_name="django app", options="-c statement_timeout=5s")
    if mode == "server-binding":
        options["server_side_binding"] = True
        options["prepare_threshold"] = 2  # Django leaves psycopg's prepared statements off unless asked
    settings.configure(
        DEBUG=False, USE_TZ=True, TIME_ZONE="UTC",
        INSTALLED_APPS=["shop.ShopConfig"],
        DATABASES={"default": {
            "ENGINE": "django.db.backends.postgresql", "NAME": url.path.lstrip("/"),
            "USER": unquote(url.username), "PASSWORD": unquote(url.password or ""),
            "HOST": url.hostname, "PORT": str(url.port), "OPTIONS": options,
        }},
        DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
    )
    django.setup()


def define_models():
    from django.apps import apps
    from django.db import models

    class Unmanaged(models.Model):
        class Meta:
            abstract = True
            app_label = "shop"
            managed = False

    class Product(Unmanaged):
        product_id = models.IntegerField(primary_key=True)
        name = models.TextField()
        price_cents = models.IntegerField()

        class Meta(Unmanaged.Meta):
            db_table = "products"

    class Customer(Unmanaged):
        customer_id = models.IntegerField(primary_key=True)
        name = models.TextField()
        email = models.TextField(null=True)

        class Meta(Unmanaged.Meta):
            db_table = "customers"

    class Order(Unmanaged):
        order_id = models.IntegerField(primary_key=True)
        customer = models.ForeignKey(Customer, models.DO_NOTHING, db_column="customer_id", db_constraint=False,
                                     related_name="orders")
        status = models.TextField(default="open")
        created_at = models.DateTimeField(auto_now_add=True)

        class Meta(Unmanaged.Meta):
            db_table = "orders"

    class OrderItem(Unmanaged):
        pk = models.CompositePrimaryKey("order_id", "line_no")
        order = models.ForeignKey(Order, models.DO_NOTHING, db_column="order_id", db_constraint=False,
                                  related_name="items")
        line_no = models.IntegerField()
        product = models.ForeignKey(Product, models.DO_NOTHING, db_column="product_id", db_constraint=False)
        quantity = models.IntegerField()

        class Meta(Unmanaged.Meta):
            db_table = "order_items"

    apps.clear_cache()  # the reverse relations (Customer.orders, Order.items) of models defined after setup()
    return Product, Customer, Order, OrderItem


def main(dsn: str, mode: str) -> None:
    assert mode in MODES, mode
    configure(dsn, mode)
    from django.core.management import call_command
    from django.db import IntegrityError, connection, transaction
    from django.contrib.postgres.aggregates import ArrayAgg
    from django.db.models import (Case, Count, Exists, F, FilteredRelation, Max, OuterRef, Q, Subquery, Sum, TextField,
                                  Value, When, Window)
    from django.db.models.functions import Coalesce, Concat, ExtractYear, Length, TruncMonth, Upper

    say("driver", connection.Database.__name__, "server-side binding" if
        connection.settings_dict["OPTIONS"].get("server_side_binding") else "client-side binding")

    with connection.cursor() as c:
        c.execute("SELECT current_setting('application_name'), current_setting('statement_timeout')")
        say("connect settings", c.fetchone())

    # introspection: inspectdb writes models from the catalog (constraints, keys, types)
    models_py = io.StringIO()
    call_command("inspectdb", "customers", "orders", "order_items", "products", stdout=models_py)
    for line in models_py.getvalue().splitlines():
        if line.strip() and not line.startswith("#"):
            say("inspectdb", line)

    Product, Customer, Order, OrderItem = define_models()
    say("seed", list(Customer.objects.filter(customer_id__lt=1000).order_by("customer_id")
                     .values_list("customer_id", "name")))
    say("select_related", [(o.order_id, o.customer.name, o.status) for o in
                           Order.objects.select_related("customer").filter(order_id__lt=1000).order_by("order_id")])
    say("prefetch_related", [(c.name, [(i.product.name, i.quantity) for o in c.orders.all() for i in o.items.all()])
                             for c in Customer.objects.filter(customer_id__lt=1000).order_by("customer_id")
                             .prefetch_related("orders__items__product")])

    # bulk_create: several rows in one INSERT (… SELECT * FROM UNNEST(…) on psycopg 3)
    sent = []

    def record(execute, sql, params, many, context):
        sent.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        Customer.objects.bulk_create([Customer(customer_id=LO + i, name=f"bulk {i}", email=f"bulk{i}@x")
                                      for i in range(1, 6)])
    say("bulk_create form", "UNNEST" if "UNNEST" in sent[-1] else "VALUES", sent[-1].count("%s"))
    Order.objects.bulk_create([Order(order_id=LO + i, customer_id=LO + i, status="open" if i % 2 else "shipped")
                               for i in range(1, 5)])
    OrderItem.objects.bulk_create([OrderItem(order_id=LO + i, line_no=n, product_id=n, quantity=i * n)
                                   for i in range(1, 5) for n in (1, 2)])
    say("bulk_create", Customer.objects.filter(customer_id__gt=LO).count(),
        Order.objects.filter(order_id__gt=LO).count(), OrderItem.objects.filter(order_id__gt=LO).count())

    # get_or_create: one found, one created (in a savepoint)
    c, created = Customer.objects.get_or_create(customer_id=LO + 1, defaults={"name": "never"})
    say("get_or_create existing", c.name, created)
    c, created = Customer.objects.get_or_create(customer_id=LO + 9, defaults={"name": "created", "email": "c@x"})
    say("get_or_create new", c.name, created)

    # nested atomic: the inner block is a savepoint, rolled back alone
    with transaction.atomic():
        Customer.objects.filter(customer_id=LO + 1).update(name="renamed in tx")
        try:
            with transaction.atomic():
                Customer.objects.create(customer_id=LO + 10, name="dup", email="bulk2@x")
        except IntegrityError as e:
            say("savepoint rolled back", e.__cause__.sqlstate if hasattr(e.__cause__, "sqlstate")
                else e.__cause__.pgcode)
        Customer.objects.create(customer_id=LO + 11, name="kept in tx")
    say("after atomic", list(Customer.objects.filter(customer_id__gt=LO).order_by("customer_id")
                              .values_list("customer_id", "name")))

    # .iterator(): a server-side cursor, read in chunks (outside and inside a transaction)
    say("iterator", [c.customer_id - LO for c in Customer.objects.filter(customer_id__gt=LO)
                     .order_by("customer_id").iterator(chunk_size=2)])
    with transaction.atomic():
        say("iterator in tx", [o.order_id - LO for o in Order.objects.filter(order_id__gt=LO)
                               .order_by("-order_id").iterator(chunk_size=3)])

    # aggregation
    say("aggregate", OrderItem.objects.filter(order_id__gt=LO).aggregate(total=Sum("quantity"), top=Max("quantity"),
                                                                        lines=Count("*")))
    say("annotate", list(Customer.objects.filter(customer_id__gt=LO).annotate(n=Count("orders"))
                         .filter(n__gt=0).order_by("customer_id").values_list("customer_id", "n")))
    say("revenue", list(Order.objects.filter(order_id__gt=LO)
                        .annotate(cents=Sum(F("items__quantity") * F("items__product__price_cents")))
                        .order_by("order_id").values_list("order_id", "status", "cents")))
    say("by status", list(Order.objects.filter(Q(order_id__gt=LO) | Q(order_id__lt=1000)).values("status")
                          .annotate(n=Count("order_id")).order_by("status").values_list("status", "n")))

    # bulk_update (UPDATE … SET … = CASE WHEN …), ignore_conflicts (ON CONFLICT DO NOTHING), update_or_create
    custs = list(Customer.objects.filter(customer_id__in=[LO + 2, LO + 3]).order_by("customer_id"))
    for c in custs:
        c.name = c.name.upper()
    say("bulk_update", Customer.objects.bulk_update(custs, ["name"], batch_size=10))
    Customer.objects.bulk_create([Customer(customer_id=LO + 2, name="ignored"),
                                  Customer(customer_id=LO + 12, name="new")], ignore_conflicts=True)
    c, created = Customer.objects.update_or_create(customer_id=LO + 12, defaults={"email": "new@x"})
    say("update_or_create", c.name, c.email, created)
    say("after upserts", list(Customer.objects.filter(customer_id__in=[LO + 2, LO + 3, LO + 12])
                              .order_by("customer_id").values_list("name", flat=True)))

    # select_for_update in a transaction, exists(), in_bulk(), raw()
    with transaction.atomic():
        locked = Customer.objects.select_for_update().get(customer_id=LO + 12)
        locked.name = "locked"
        locked.save(update_fields=["name"])
    say("select_for_update", Customer.objects.get(customer_id=LO + 12).name)
    say("exists", Customer.objects.filter(customer_id=LO + 12).exists(),
        Customer.objects.filter(customer_id=-1).exists())
    say("in_bulk", sorted((k % LO, v.name) for k, v in Customer.objects.in_bulk([1, LO + 1, LO + 12]).items()))
    say("raw", [(c.customer_id, c.name) for c in
                Customer.objects.raw("SELECT customer_id, name FROM customers WHERE customer_id < %s ORDER BY 1",
                                     [1000])])

    # subqueries, conditional expressions and window functions
    latest = Order.objects.filter(customer=OuterRef("pk")).order_by("-order_id").values("status")[:1]
    say("subquery", list(Customer.objects.filter(customer_id__lt=1000).annotate(last_status=Subquery(latest))
                         .order_by("customer_id").values_list("name", "last_status")))
    say("case", list(Order.objects.filter(order_id__lt=1000).annotate(
        big=Case(When(items__quantity__gte=5, then=Value("big")), default=Value("small")))
        .order_by("order_id", "items__line_no").values_list("order_id", "big")))
    say("window", list(OrderItem.objects.filter(order_id__lt=1000).annotate(
        running=Window(Sum("quantity"), partition_by=[F("order_id")], order_by=F("line_no").asc()))
        .order_by("order_id", "line_no").values_list("order_id", "line_no", "running")))
    say("coalesce", list(Customer.objects.filter(Q(customer_id__lt=1000) | Q(customer_id=LO + 1))
                         .annotate(contact=Coalesce("email", Value("-"), output_field=TextField()))
                         .order_by("customer_id")
                         .values_list("contact", flat=True)))

    # outer joins, set operations and PostgreSQL-specific SQL that ORMs generate
    say("left join", list(Customer.objects.filter(Q(customer_id__lt=1000) | Q(customer_id=LO + 5))
                          .annotate(open_orders=Count("orders", filter=Q(orders__status="open")))
                          .order_by("customer_id").values_list("name", "open_orders")))
    say("filtered relation", list(Customer.objects.filter(Q(customer_id__lt=1000) | Q(customer_id=LO + 5))
                                  .annotate(shipped=FilteredRelation("orders", condition=Q(orders__status="shipped")))
                                  .annotate(n=Count("shipped")).order_by("customer_id").values_list("name", "n")))
    say("union", sorted(Customer.objects.filter(customer_id__lt=1000).values_list("name", flat=True)
                        .union(Product.objects.filter(price_cents__gt=1000).values_list("name", flat=True))))
    say("distinct on", list(Order.objects.filter(order_id__lt=1000).order_by("customer_id", "-order_id")
                            .distinct("customer_id").values_list("customer_id", "order_id")))
    say("exists", list(Customer.objects.annotate(has_open=Exists(Order.objects.filter(customer=OuterRef("pk"),
                                                                                       status="open")))
                       .filter(customer_id__lt=1000).order_by("customer_id").values_list("name", "has_open")))
    say("dates", list(Order.objects.filter(order_id__lt=1000).annotate(month=TruncMonth("created_at"),
                                                                        year=ExtractYear("created_at"))
                      .order_by("order_id").values_list("order_id", "month", "year")))
    say("text", list(Customer.objects.filter(name__icontains="e. c", email__regex=r"^w.*@acme")
                     .annotate(shout=Upper("name"), n=Length("name"), tag=Concat("name", Value(" <"), "email",
                                                                                  Value(">"), output_field=TextField()))
                     .values_list("shout", "n", "tag")))
    say("nulls last", list(Customer.objects.filter(Q(customer_id__lt=1000) | Q(customer_id=LO + 9))
                           .order_by(F("email").desc(nulls_last=True)).values_list("email", flat=True)))
    say("array_agg", list(Order.objects.filter(order_id__lt=1000).values("customer_id")
                          .annotate(ids=ArrayAgg("order_id", order_by="order_id")).order_by("customer_id")
                          .values_list("customer_id", "ids")))
    say("in subquery", sorted(Product.objects.filter(product_id__in=OrderItem.objects.filter(order_id__lt=1000)
                                                     .values("product_id")).values_list("name", flat=True)))

    # the same query many times: prepared on the server in server-binding mode (prepare_threshold)
    say("repeated", [Customer.objects.filter(customer_id=LO + i % 3 + 1).values_list("name", flat=True).first()
                     for i in range(8)])

    # queryset update() and delete()
    say("update", Order.objects.filter(order_id__gt=LO, status="open").update(status="cancelled"))
    say("update F", OrderItem.objects.filter(order_id__gt=LO, line_no=1).update(quantity=F("quantity") + 100))
    say("after update", list(OrderItem.objects.filter(order_id__gt=LO).order_by("order_id", "line_no")
                             .values_list("order_id", "line_no", "quantity")))
    say("delete items", OrderItem.objects.filter(order_id__gt=LO).delete())
    say("delete orders", Order.objects.filter(order_id__gt=LO).delete())
    say("delete customers", Customer.objects.filter(customer_id__gt=LO).delete())
    say("seed untouched", Customer.objects.count(), Order.objects.count(), OrderItem.objects.count())
    connection.close()
    say("done")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
