"""SQL PREPARE / EXECUTE and protocol-level statements share PostgreSQL's namespace
(proxy/policy/session.py ``protocol_statement``, proxy/policy/utility_statements.py reserved names).

EXECUTE runs a statement with literal arguments, and no Bind check sees them: it is allowed only
for names that tenantgate saw PREPAREd in SQL.  The review of the current_setting change found
that a protocol-level statement could stand behind such a name:

* a failed ``PREPARE s`` (42P05: the protocol statement ``s`` exists) was recorded anyway, so
  ``EXECUTE s('ssl_cert_file')`` ran ``SELECT current_setting($1)`` unchecked;
* ``PREPARE s2``, protocol Close ``s2``, protocol Parse ``s2``: EXECUTE ran the new statement;
* in transaction mode the server-side names of protocol statements (``tg_<session>_<n>``) could be
  named in SQL.

The same route passed the tenant-column Bind check (``INSERT ... VALUES ($1, ...)`` with
``'globex'``), stopped only by the RLS backstop.
"""

from __future__ import annotations

import psycopg
import pytest

from support.e2e import admin_rows, fresh_ids, pq_call
from support.pool import serve_pooled

INSERT = b"INSERT INTO customers (tenant_id, customer_id, name) VALUES ($1, $2, $3)"


@pytest.fixture(scope="module")
def session_proxy(demo, tmp_path_factory):
    with serve_pooled(demo, tmp_path_factory.mktemp("prepared-names"), {"mode": "session"}) as proxy:
        yield proxy


def test_a_failed_prepare_over_a_protocol_statement_is_not_executable(session_proxy):
    with psycopg.connect(session_proxy.dsn("acme"), autocommit=True) as conn:
        assert pq_call(conn, lambda pg: pg.prepare(b"s", b"SELECT current_setting($1)"))[0] is None
        assert pq_call(conn, lambda pg: pg.exec_(b"PREPARE s AS SELECT 1"))[0] == "42P05"
        state, rows = pq_call(conn, lambda pg: pg.exec_(b"EXECUTE s('ssl_cert_file')"))
        assert state == "42501" and not rows
        # the protocol statement still works, with its Bind check
        assert pq_call(conn, lambda pg: pg.exec_prepared(b"s", [b"work_mem"]))[0] is None
        assert pq_call(conn, lambda pg: pg.exec_prepared(b"s", [b"ssl_cert_file"]))[0] == "42501"


def test_a_protocol_close_and_parse_replace_an_sql_prepared_name(session_proxy):
    with psycopg.connect(session_proxy.dsn("acme"), autocommit=True) as conn:
        assert pq_call(conn, lambda pg: pg.exec_(b"PREPARE s2 AS SELECT 1"))[0] is None
        assert pq_call(conn, lambda pg: pg.exec_(b"EXECUTE s2"))[1] == [[b"1"]]
        assert pq_call(conn, lambda pg: pg.close_prepared(b"s2"))[0] is None
        assert pq_call(conn, lambda pg: pg.prepare(b"s2", b"SELECT current_setting($1)"))[0] is None
        state, rows = pq_call(conn, lambda pg: pg.exec_(b"EXECUTE s2('archive_command')"))
        assert state == "42501" and not rows
        # an SQL PREPARE of a name the protocol used is refused, as PostgreSQL refuses it while the
        # statement exists; also after a Close, which may have failed or been skipped
        assert pq_call(conn, lambda pg: pg.exec_(b"PREPARE s2 AS SELECT 2"))[0] == "42P05"
        assert pq_call(conn, lambda pg: pg.close_prepared(b"s2"))[0] is None
        assert pq_call(conn, lambda pg: pg.exec_(b"PREPARE s2 AS SELECT 2"))[0] == "42P05"
        # other names work as before
        assert pq_call(conn, lambda pg: pg.exec_(b"PREPARE s3 AS SELECT 3"))[0] is None
        assert pq_call(conn, lambda pg: pg.exec_(b"EXECUTE s3"))[1] == [[b"3"]]


def test_a_deallocate_or_close_postgresql_skipped_does_not_free_the_name(session_proxy):
    """Review 2: the gate learns of DEALLOCATE and Close when they are sent; an error earlier in
    the same query string or pipeline makes PostgreSQL skip them."""
    with psycopg.connect(session_proxy.dsn("acme"), autocommit=True) as conn:
        assert pq_call(conn, lambda pg: pg.prepare(b"d1", b"SELECT current_setting($1)"))[0] is None
        assert pq_call(conn, lambda pg: pg.exec_(b"SELECT 1/0; DEALLOCATE d1"))[0] == "22012"
        assert pq_call(conn, lambda pg: pg.exec_(b"PREPARE d1 AS SELECT 1"))[0] == "42P05"
        state, rows = pq_call(conn, lambda pg: pg.exec_(b"EXECUTE d1('ssl_cert_file')"))
        assert state == "42501" and not rows


def test_names_postgresql_would_truncate_are_refused(session_proxy):
    """Review 2: PostgreSQL keeps statements under the first 63 bytes of their names."""
    with psycopg.connect(session_proxy.dsn("acme"), autocommit=True) as conn:
        # a protocol violation to tenantgate (FATAL 42622, the connection ends)
        r = conn.pgconn.prepare(b"a" * 63 + b"xyz", b"SELECT current_setting($1)")
        assert r.status == psycopg.pq.ExecStatus.FATAL_ERROR
        assert conn.pgconn.status == psycopg.pq.ConnStatus.BAD
    with psycopg.connect(session_proxy.dsn("acme"), autocommit=True) as conn:
        assert pq_call(conn, lambda pg: pg.prepare(b"a" * 63, b"SELECT 1"))[0] is None  # 63 bytes work


def test_the_tenant_column_check_cannot_be_skipped_through_execute(demo, session_proxy):
    [cid] = fresh_ids(1)
    with psycopg.connect(session_proxy.dsn("acme"), autocommit=True) as conn:
        assert pq_call(conn, lambda pg: pg.prepare(b"ins", INSERT))[0] is None
        assert pq_call(conn, lambda pg: pg.exec_(b"PREPARE ins AS SELECT 1"))[0] == "42P05"
        r = conn.pgconn.exec_(f"EXECUTE ins('globex', {cid}, 'x')".encode())
        message = (r.error_field(psycopg.pq.DiagnosticField.MESSAGE_PRIMARY) or b"").decode()
        # tenantgate's refusal, not only the RLS backstop's (which also says 42501)
        assert "EXECUTE of" in message and "only statements PREPAREd through tenantgate" in message, message
    assert not [r for r in admin_rows(demo, "customers", "globex") if r[1] == cid]


@pytest.mark.parametrize("sql", ["PREPARE tg_1_2 AS SELECT 1", "EXECUTE tg_1_2('ssl_cert_file')",
                                 'EXECUTE "tg_1_2"', "DEALLOCATE tg_1_2", 'DEALLOCATE "tg_1_2"'])
def test_tenantgates_server_side_names_are_reserved(demo, sql):
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:  # transaction mode
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="reserved"):
            conn.execute(sql)
