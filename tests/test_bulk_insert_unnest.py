"""Django's bulk_create shape: INSERT INTO t (cols) SELECT * FROM UNNEST(...) (issue 14 item 4).

With an explicit column list that leaves out the tenant column, the source's columns map onto
the list exactly as PostgreSQL maps them; tenantgate adds the tenant column after them.  Rows
land with the session's tenant and the other tenant's rows stay untouched.  When the list names
the tenant column (a model that has it), every row the source yields is checked in PostgreSQL:
one row for another tenant, or a NULL tenant, fails the whole statement.
"""

from __future__ import annotations

import psycopg
import pytest

from support.e2e import admin_execute, admin_rows

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


CHECKED = ('INSERT INTO customers (customer_id, tenant_id, name, email) '
           'SELECT * FROM UNNEST(%s::int[], %s::text[], %s::text[], %s::text[])')


@pytest.mark.parametrize("prepare", [False, True])
def test_bulk_create_with_the_tenant_column_listed_takes_the_sessions_own_rows(demo, cleanup, prepare):
    ids = [991501 + (10 if prepare else 0), 991502 + (10 if prepare else 0)]
    cleanup.extend(ids)
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        n = conn.execute(CHECKED, (ids, ["acme", "acme"], ["a", "b"], ["a@x", "b@x"]), prepare=prepare).rowcount
        assert n == 2
    with psycopg.connect(demo.admin) as a:
        assert a.execute("SELECT tenant_id, name FROM customers WHERE customer_id = ANY(%s) ORDER BY customer_id",
                         (ids,)).fetchall() == [("acme", "a"), ("acme", "b")]


@pytest.mark.parametrize("smuggled", ["globex", None])
@pytest.mark.parametrize("prepare", [False, True])
def test_smuggling_another_tenant_through_the_unnest_arrays_fails_the_whole_insert(demo, cleanup, smuggled, prepare):
    """One row for another tenant (or with a NULL tenant) among own rows: nothing is inserted,
    as row-level security's WITH CHECK would refuse the statement."""
    before = admin_rows(demo, "customers", "globex")
    ids = [991601, 991602]
    cleanup.extend(ids)
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as e:  # 22P02, naming tenantgate
            conn.execute(CHECKED, (ids, ["acme", smuggled], ["x", "y"], ["x@x", "y@x"]), prepare=prepare)
        assert "tenant column is not the session's tenant" in str(e.value)
        assert conn.execute("SELECT count(*) FROM customers WHERE customer_id = ANY(%s)", (ids,)).fetchone() == (0,)
    assert admin_rows(demo, "customers", "globex") == before
    with psycopg.connect(demo.admin) as a:
        assert a.execute("SELECT count(*) FROM customers WHERE customer_id = ANY(%s)", (ids,)).fetchone() == (0,)
