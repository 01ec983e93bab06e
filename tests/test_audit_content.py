"""What the operator audit records (issue 20 break 12): every statement's outcome tag of a
multi-statement query, EXECUTE of a PREPAREd write classed as a write, and the data an operator
loads with COPY ... FROM STDIN (byte count and SHA-256; ``audit.copy_data: full`` keeps the data).
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from support.e2e import RawClient, errors, fresh_ids
from support.operators import CONTROL, Admin, demo_tenantgate, pg_options
from proxy.wire import messages as m


@pytest.fixture(scope="module")
def tg(demo):  # noqa: F811
    return demo_tenantgate(demo)


@pytest.fixture(scope="module")
def op(demo, tg):  # noqa: F811
    g = tg.active_grant("alice", "acme", "write", "1h")
    c = RawClient(demo.operator("alice"), options={"options": pg_options(g["id"])})
    yield c
    c.close()
    tg.revoke(g["id"])


@pytest.fixture(scope="module")
def admin(demo):  # noqa: F811
    return Admin(demo.admin)


def _records(admin: Admin, since: int, want_outcomes: int) -> list[dict]:
    cols = ("seq", "type", "statement_class", "original_sql", "ref_seq", "command_tag", "rows", "detail")
    deadline = time.monotonic() + 10
    while True:  # outcome records are queued: wait for them
        rows = [dict(zip(cols, r)) for r in admin.rows(
            f"SELECT {', '.join(cols)} FROM {CONTROL}.audit_log WHERE seq > %s ORDER BY seq", (since,))]
        if sum(r["type"] == "statement.outcome" for r in rows) >= want_outcomes or time.monotonic() > deadline:
            return rows


def test_each_statement_of_a_multi_statement_query_has_its_outcome_tag(op, admin):
    since = admin.head_seq()
    assert not errors(op.query("SELECT 1; UPDATE customers SET name = name WHERE customer_id = -1; SELECT 2"))
    out = [r for r in _records(admin, since, 1) if r["type"] == "statement.outcome"]
    assert [r["command_tag"] for r in out] == ["SELECT 1; UPDATE 0; SELECT 1"]


def test_execute_of_a_prepared_delete_is_a_write(op, admin):
    assert not errors(op.query("PREPARE audit_del AS DELETE FROM customers WHERE customer_id = -1"))
    since = admin.head_seq()
    assert not errors(op.query("EXECUTE audit_del"))
    stmts = [r for r in _records(admin, since, 1) if r["type"] == "statement"]
    assert [(r["original_sql"], r["statement_class"]) for r in stmts] == [("EXECUTE audit_del", "write")]
    assert not errors(op.query("DEALLOCATE audit_del"))


def _copy_in(op, admin, statement: str, data: list[bytes]) -> dict:
    """COPY ``data`` in through the operator session; the statement's outcome audit record."""
    since = admin.head_seq()
    op.send(m.encode_query(statement))
    t, _ = op.recv()
    assert t == b"G", t
    op.send(*[m.frame(b"d", d) for d in data], m.frame(b"c"))
    msgs = op.until_ready()
    assert not errors(msgs), errors(msgs)
    out = [r for r in _records(admin, since, 1) if r["type"] == "statement.outcome"]
    assert len(out) == 1 and out[0]["command_tag"] == f"COPY {len(data)}", out
    joined = b"".join(data)
    assert json.loads(out[0]["detail"])["copy_in"] == {"bytes": len(joined),
                                                       "sha256": hashlib.sha256(joined).hexdigest()}
    return out[0]


def test_copy_from_stdin_data_is_recorded_with_its_digest(op, admin, demo):  # noqa: F811
    a, b = fresh_ids(2)
    data = [f"acme\t{a}\taudited copy 1\n".encode(), f"acme\t{b}\taudited copy 2\n".encode()]
    out = _copy_in(op, admin, "COPY customers (tenant_id, customer_id, name) FROM STDIN", data)
    assert out["rows"] == 2
    admin.execute(f"DELETE FROM customers WHERE tenant_id = 'acme' AND customer_id IN ({a}, {b})")


def test_copy_from_stdin_without_the_tenant_column_under_a_write_grant(op, admin, demo):  # noqa: F811
    """Issue 20's over-refusal: the grant's tenant is filled in, and the audit records the
    operator's own rows (what they sent)."""
    a, b = fresh_ids(2)
    data = [f"{a}\tfilled copy 1\n".encode(), f"{b}\tfilled copy 2\n".encode()]
    _copy_in(op, admin, "COPY customers (customer_id, name) FROM STDIN", data)
    assert admin.rows("SELECT tenant_id FROM customers WHERE customer_id IN (%s, %s)", (a, b)) == [("acme",), ("acme",)]
    admin.execute(f"DELETE FROM customers WHERE customer_id IN ({a}, {b})")
