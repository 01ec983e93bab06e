"""Django's bulk_create shape: INSERT INTO t (cols) SELECT * FROM UNNEST(...) (issue 14 item 4).

With an explicit column list that leaves out the tenant column, the source's columns map onto
the list exactly as PostgreSQL maps them; tenantgate adds the tenant column after them.  Rows
land with the session's tenant, the other tenant's rows stay untouched, and a list that names
the tenant column with ``SELECT *`` is refused (its values could not be checked).
"""

from __future__ import annotations

import psycopg
import pytest

from e2e_helpers import admin_execute, admin_rows

BULK = ('INSERT INTO "customers" ("customer_id", "name", "email") '
        'SELECT * FROM UNNEST((%s)::integer[], (%s)::text[], (%s)::text[]) RETURNING "customers"."customer_id"')


@pytest.fixture
def cleanup(demo):
    ids: list[int] = []
    yield ids
    if ids:
        admin_execute(demo, "DELETE FROM customers WHERE customer_id = ANY(%s)", [ids])


@pytest.mark.parametrize("prepare", [False, True])
def test_bulk_create_rows_land_with_the_sessions_tenant(demo, cleanup, prepare):
    base = 991000 + (100 if prepare else 0)
    ids = [base + 1, base + 2, base + 3]
    cleanup.extend(ids)
    before = admin_rows(demo, "customers", "globex")
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        got = conn.execute(BULK, (ids, ["a", "b", "c"], ["a@x", "b@x", "c@x"]), prepare=prepare).fetchall()
        assert sorted(r[0] for r in got) == ids
        rows = conn.execute("SELECT customer_id, name FROM customers WHERE customer_id = ANY(%s) ORDER BY 1",
                            (ids,)).fetchall()
        assert rows == [(ids[0], "a"), (ids[1], "b"), (ids[2], "c")]
    with psycopg.connect(demo.admin) as a:
        tenants = a.execute("SELECT DISTINCT tenant_id FROM customers WHERE customer_id = ANY(%s)", (ids,)).fetchall()
    assert tenants == [("acme",)]
    assert admin_rows(demo, "customers", "globex") == before


def test_bulk_create_with_on_conflict_do_nothing(demo, cleanup):
    ids = [991201, 991202]
    cleanup.extend(ids)
    sql = ('INSERT INTO "customers" ("customer_id", "name", "email") '
           'SELECT * FROM UNNEST((%s)::integer[], (%s)::text[], (%s)::text[]) ON CONFLICT DO NOTHING')
    with psycopg.connect(demo.app("globex"), autocommit=True) as conn:
        assert conn.execute(sql, (ids, ["a", "b"], ["a@x", "b@x"])).rowcount == 2
        assert conn.execute(sql, (ids, ["a", "b"], ["a@x", "b@x"])).rowcount == 0
    with psycopg.connect(demo.admin) as a:
        assert a.execute("SELECT count(*) FROM customers WHERE customer_id = ANY(%s) AND tenant_id = 'globex'",
                         (ids,)).fetchone() == (2,)


def test_a_column_count_mismatch_is_postgresqls_error(demo):
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.SyntaxError):  # 42601: more expressions than target columns
            conn.execute('INSERT INTO customers (customer_id, name) SELECT * FROM UNNEST(%s::int[], %s::text[], '
                         '%s::text[])', ([991301], ["a"], ["b"]))


def test_smuggling_another_tenant_through_the_unnest_arrays_is_refused(demo):
    before = admin_rows(demo, "customers", "globex")
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as e:
            conn.execute('INSERT INTO customers (customer_id, tenant_id, name, email) '
                         'SELECT * FROM UNNEST(%s::int[], %s::text[], %s::text[], %s::text[])',
                         ([991401], ["globex"], ["x"], ["x@x"]))
        assert "without the tenant column" in str(e.value)
    assert admin_rows(demo, "customers", "globex") == before
