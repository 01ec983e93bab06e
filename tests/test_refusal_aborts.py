"""A refusal behaves exactly like a PostgreSQL error (issue 20 break 7): inside a transaction
block it aborts the transaction (ReadyForQuery 'E', the next statement gets 25P02, COMMIT answers
ROLLBACK and nothing is committed), in the simple and the extended protocol, pipelined or not,
for tenant sessions (session and transaction pooling) and operator sessions.

The reference is native PostgreSQL: the same sequence sent straight to the database with a
statement that fails there (``SELECT 1/0``) in place of the refused one must give the same
statuses, SQLSTATE classes and command tags.
"""

from __future__ import annotations

import pytest

from support.e2e import RawClient, admin_rows, fresh_ids
from support.operators import demo_tenantgate, pg_options
from support.pool import serve_pooled
from proxy.wire import messages as m

REFUSED = "SELECT pg_read_file('/etc/passwd')"  # refused by tenantgate (42501)
FAILS = "SELECT 1/0"  # fails in PostgreSQL (22012)


@pytest.fixture(scope="module")
def session_px(demo, tmp_path_factory):  # noqa: F811
    with serve_pooled(demo, tmp_path_factory.mktemp("abort"), {"mode": "session"}) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def tg(demo):  # noqa: F811
    return demo_tenantgate(demo)


@pytest.fixture(scope="module")
def write_grant(tg):
    g = tg.active_grant("alice", "acme", "write", "1h")
    yield g
    tg.revoke(g["id"])


@pytest.fixture(params=["session", "transaction", "operator"])
def client(request, demo, session_px, write_grant):  # noqa: F811
    if request.param == "session":
        c = RawClient(session_px.dsn("acme"))
    elif request.param == "transaction":
        c = RawClient(demo.app("acme"))
    else:
        c = RawClient(demo.operator("alice"), options={"options": pg_options(write_grant["id"])})
    yield c
    c.close()


@pytest.fixture
def native(demo):  # noqa: F811
    c = RawClient(demo.admin)
    yield c
    c.close()


def _summary(msgs) -> list:
    """What a client sees, per reply: command tags, SQLSTATE classes of errors, statuses."""
    out = []
    for t, p in msgs:
        if t == b"C":
            tag = m.command_tag(p)
            out.append(tag.split()[0] if tag.startswith(("INSERT", "SELECT")) else tag)
        elif t == b"E":
            out.append("E:" + m.decode_error_fields(p).sqlstate[:2])
        elif t == b"Z":
            out.append("Z:" + p.decode())
    return out


def _insert(cid: int, tenant: str | None) -> str:
    cols, vals = ("tenant_id, ", f"'{tenant}', ") if tenant else ("", "")
    return f"INSERT INTO customers ({cols}customer_id, name) VALUES ({vals}{cid}, 'abort-test')"


def _run_simple(c: RawClient, statements: list[str], pipelined: bool) -> list:
    if pipelined:
        c.send(*[m.encode_query(s) for s in statements])
        msgs = []
        for _ in statements:
            msgs += c.until_ready()
        return msgs
    msgs = []
    for s in statements:
        msgs += c.query(s)
    return msgs


def _acme_ids(demo, ids) -> list:  # noqa: F811
    return [r for r in admin_rows(demo, "customers", "acme") if r[1] in ids]


@pytest.mark.parametrize("pipelined", [False, True])
def test_refusal_in_a_transaction_block_aborts_it_like_an_error(demo, client, native, pipelined):  # noqa: F811
    a, b = fresh_ids(2)
    seq = ["BEGIN", _insert(a, None), "{bad}", "SELECT 1", "COMMIT"]
    got = _summary(_run_simple(client, [s.replace("{bad}", REFUSED) for s in seq], pipelined))
    want = _summary(_run_simple(native, [s.replace("{bad}", FAILS) for s in seq[:1]] +
                                [_insert(b, "acme")] + [s.replace("{bad}", FAILS) for s in seq[2:]], pipelined))
    assert want == ["BEGIN", "Z:T", "INSERT", "Z:T", "E:22", "Z:E", "E:25", "Z:E", "ROLLBACK", "Z:I"]
    assert [x.replace("E:42", "E:22") for x in got] == want
    assert _acme_ids(demo, {a, b}) == [], "nothing of the aborted transaction may be committed"
    assert _summary(client.query("SELECT 1")) == ["SELECT", "Z:I"]


def test_refusal_in_the_extended_protocol_aborts_the_transaction(demo, client):  # noqa: F811
    (a,) = fresh_ids()
    assert _summary(client.query("BEGIN")) == ["BEGIN", "Z:T"]
    client.send(m.encode_parse("", _insert(a, None)), m.encode_bind("", "", ()), m.encode_execute(""), m.SYNC)
    assert _summary(client.until_ready())[-2:] == ["INSERT", "Z:T"]
    client.send(m.encode_parse("", REFUSED), m.encode_bind("", "", ()), m.encode_execute(""), m.SYNC)
    assert _summary(client.until_ready()) == ["E:42", "Z:E"]
    assert _summary(client.query("COMMIT")) == ["ROLLBACK", "Z:I"]
    assert _acme_ids(demo, {a}) == []


def test_refused_statement_in_a_multi_statement_query_runs_none_of_it(demo, client):  # noqa: F811
    (a,) = fresh_ids()
    got = _summary(client.query(f"{_insert(a, None)}; {REFUSED}"))
    assert got[-2:] == ["E:42", "Z:I"] and "INSERT" not in got
    assert _acme_ids(demo, {a}) == []


def test_refusal_outside_a_transaction_keeps_the_session_usable(client):
    assert _summary(client.query(REFUSED)) == ["E:42", "Z:I"]
    assert _summary(client.query("SELECT 1")) == ["SELECT", "Z:I"]


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_audit_write_failure_inside_a_transaction_aborts_it(demo, write_grant, protocol):  # noqa: F811
    """Audit before action: a statement whose audit record cannot be written is refused (58000),
    and, like any error, aborts the operator's transaction: the earlier INSERT is not committed."""
    from support.operators import CONTROL, Admin

    admin = Admin(demo.admin)
    a, b = fresh_ids(2)
    op = RawClient(demo.operator("alice"), options={"options": pg_options(write_grant["id"])})
    restored = False
    try:
        assert _summary(op.query("BEGIN")) == ["BEGIN", "Z:T"]
        assert _summary(op.query(_insert(a, None))) == ["INSERT", "Z:T"]
        admin.execute(f"REVOKE INSERT ON {CONTROL}.audit_log FROM tenantgate_control")
        try:
            if protocol == "simple":
                got = _summary(op.query(_insert(b, None)))
            else:
                op.send(m.encode_parse("", _insert(b, None)), m.encode_bind("", "", ()), m.encode_execute(""),
                        m.SYNC)
                got = _summary(op.until_ready())
        finally:
            admin.execute(f"GRANT INSERT ON {CONTROL}.audit_log TO tenantgate_control")
            restored = True
        assert got == ["E:58", "Z:E"], got
        assert _summary(op.query("COMMIT")) == ["ROLLBACK", "Z:I"]
        assert _acme_ids(demo, {a, b}) == []
    finally:
        if not restored:
            admin.execute(f"GRANT INSERT ON {CONTROL}.audit_log TO tenantgate_control")
        op.close()
