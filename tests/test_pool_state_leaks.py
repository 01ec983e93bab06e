"""Transaction pooling, adversarially: one client must never leave state on a shared
backend connection that another client then runs with.

A ``tenantgate serve`` with ``pool: {mode: transaction, size: 1}`` in front of the demo's
database, so every client shares the one backend connection.  Raw protocol clients send
exact message sequences.
"""

from __future__ import annotations

import pytest

from support.e2e import RawClient, data_rows, errors, token
from support.pool import serve_pooled
from proxy.wire import messages as m

POOL = {"mode": "transaction", "size": 1, "queue_timeout_s": 3}


@pytest.fixture(scope="module")
def px(demo, tmp_path_factory):  # noqa: F811
    with serve_pooled(demo, tmp_path_factory.mktemp("poolreview"), POOL) as proxy:
        yield proxy


def _values(msgs) -> list[list[str | None]]:
    return [[None if v is None else v.decode() for v in row] for row in data_rows(msgs)]


def _run_unnamed(client: RawClient, sql: str) -> list:
    client.send(m.encode_parse("", sql), m.encode_bind("", "", ()), m.encode_execute(""), m.SYNC)
    return client.until_ready()


def _token_client(px, demo, tenant: str) -> RawClient:  # noqa: F811
    return RawClient(px.pool_dsn(), options={"options": f"-c tenantgate.tenant={token(demo, tenant)}"})


def test_rebinding_an_unnamed_tenant_switch_does_not_poison_the_shared_connection(px, demo):  # noqa: F811
    """Finding 1: the unnamed statement is re-prepared after the settings probe dropped it,
    and its re-execution (Bind of the unnamed statement) is not seen as a SET: the connection
    goes back to the pool with tenantgate.tenant_id of another tenant than the pool believes.
    The next token client of acme then reads globex's rows through a Parse'd statement."""
    c = _token_client(px, demo, "acme")
    try:
        # an unnamed statement that switches C to globex, then a switch back by Query ...
        assert not errors(_run_unnamed(c, f"SET tenantgate.tenant = '{token(demo, 'globex')}'"))
        assert not errors(c.query(f"SET tenantgate.tenant = '{token(demo, 'acme')}'"))
        # ... or by a named statement, which is refused: a token switch takes effect once
        c.send(m.encode_parse("back", f"SET tenantgate.tenant = '{token(demo, 'acme')}'"), m.SYNC)
        assert [e.sqlstate for e in errors(c.until_ready())] == ["0A000"]
        # re-executing the unnamed statement (the proxy would prepare it again) is refused
        c.send(m.encode_bind("", "", ()), m.encode_execute(""), m.SYNC)
        # 0A000: refused as already run; 26000: the Query above dropped it (as in PostgreSQL)
        assert [e.sqlstate for e in errors(c.until_ready())] in (["0A000"], ["26000"])
    finally:
        c.close()
    victim = _token_client(px, demo, "acme")
    try:
        rows = _values(_run_unnamed(victim, "SELECT DISTINCT tenant_id FROM customers"))
        assert rows == [["acme"]], f"an acme client read the rows of {rows}"
        assert _values(victim.query("SELECT current_setting('tenantgate.tenant_id')")) == [["acme"]]
    finally:
        victim.close()


def test_rebinding_an_unnamed_set_does_not_leak_the_setting_to_another_tenant(px):
    """Finding 1 with a credential-bound user: A's work_mem reaches globex's session."""
    a = RawClient(px.dsn("acme"))
    try:
        default = _values(a.query("SHOW work_mem"))[0][0]
        assert not errors(_run_unnamed(a, "SET work_mem = '77kB'"))
        a.send(m.encode_parse("n", f"SET work_mem = '{default}'"), m.encode_bind("", "n", ()),
               m.encode_execute(""), m.SYNC)
        assert not errors(a.until_ready())
        a.send(m.encode_bind("", "", ()), m.encode_execute(""), m.SYNC)
        a.until_ready()
    finally:
        a.close()
    b = RawClient(px.dsn("globex"))
    try:
        assert _values(b.query("SHOW work_mem")) == [[default]]
    finally:
        b.close()


def test_a_clients_cancel_requests_never_cancel_another_tenants_query(px):
    """Finding 3: a CancelRequest is forwarded to the backend connection after the client's
    statement finished and the connection went to another client, whose query it cancels.
    Client A (acme) runs ``SELECT 1`` in a loop while sending its own valid cancel key over and
    over; client B (globex) on the same single backend connection must never see 57014."""
    import socket
    import struct
    import threading

    a = RawClient(px.dsn("acme"))
    b = RawClient(px.dsn("globex"))
    pid, secret = next(struct.unpack("!II", p) for t, p in a.startup_messages if t == b"K")
    stop = threading.Event()

    def cancel_spam():
        while not stop.is_set():
            with socket.create_connection(("127.0.0.1", px.port), timeout=5) as s:
                s.sendall(struct.pack("!IIII", 16, 80877102, pid, secret))
                s.recv(1)

    def a_loop():
        while not stop.is_set():
            a.query("SELECT 1")

    threads = [threading.Thread(target=cancel_spam), threading.Thread(target=a_loop)]
    for t in threads:
        t.start()
    cancelled = 0
    try:
        for _ in range(25):
            msgs = b.query("SELECT pg_sleep(0.05), 'b'")
            cancelled += sum(1 for e in errors(msgs) if e.sqlstate == "57014")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        a.close()
        b.close()
    assert cancelled == 0, f"{cancelled} of globex's 25 statements were cancelled by acme's cancel key"


def test_other_clients_statements_are_not_readable_through_pg_prepared_statement_function(px):
    """Finding 4: the view pg_prepared_statements is refused, but the function behind it,
    pg_prepared_statement(), is not: on the shared connection globex reads acme's statement
    text (its tenant literal and any literal values in it)."""
    a = RawClient(px.dsn("acme"))
    b = RawClient(px.dsn("globex"))
    try:
        a.send(m.encode_parse("acme_secret", "SELECT customer_id FROM customers WHERE name = 'acme-review-secret'"),
               m.SYNC)
        assert not errors(a.until_ready())
        for sql in ("SELECT * FROM pg_prepared_statement()", "SELECT pg_catalog.pg_prepared_statement()::text"):
            msgs = b.query(sql)
            seen = " ".join(v or "" for row in _values(msgs) for v in row)
            assert "acme" not in seen, f"{sql}: globex read {seen!r}"
        assert _values(b.query("SELECT 1")) == [["1"]]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("script", [
    "SET DateStyle = 'SQL, DMY'; SELECT 1",
    "SELECT 1; SET DateStyle = 'SQL, DMY'",
    "BEGIN; SET DateStyle = 'SQL, DMY'; SELECT 1; COMMIT",
])
def test_a_set_inside_a_multi_statement_query_does_not_reach_another_tenant(px, script):
    """Finding 5: a simple Query with several statements, one of them a SET, is not seen as
    changing settings (no probe): the connection goes back with acme's DateStyle and globex's
    next statement reads '03/04/2024' as 3 April instead of 4 March (and writes it so)."""
    expected = [["2024-03-04", "ISO, MDY"]]  # the database's default DateStyle
    a = RawClient(px.dsn("acme"))
    try:
        assert not errors(a.query(script))
        assert _values(a.query("SHOW DateStyle")) == [["SQL, DMY"]]  # A's own session has it
        b = RawClient(px.dsn("globex"))
        try:
            assert _values(b.query("SELECT '03/04/2024'::date::text, current_setting('DateStyle')")) == expected
        finally:
            b.close()
        assert _values(a.query("SHOW DateStyle")) == [["SQL, DMY"]]  # and keeps it on the next transaction
    finally:
        a.close()


def test_replaying_a_prepared_tenant_switch_goes_through_the_gate(px, demo):  # noqa: F811
    """Finding 2: a named statement ``SET tenantgate.tenant = '<token>'`` is checked once, at
    Parse; each later Bind/Execute switches tenantgate.tenant_id on the backend again without
    the gate knowing (token expiry and tenant status are not checked again either), so the
    client's Parse'd statements read another tenant than the one the gate enforces."""
    c = _token_client(px, demo, "acme")
    try:
        # a token switch cannot be prepared under a name (it could be replayed unchecked) ...
        c.send(m.encode_parse("sw", f"SET tenantgate.tenant = '{token(demo, 'globex')}'"),
               m.encode_bind("", "sw", ()), m.encode_execute(""), m.SYNC)
        assert [e.sqlstate for e in errors(c.until_ready())] == ["0A000"]
        # ... and an unnamed one runs once: a replay is refused, the rest of the pipeline is skipped
        c.send(m.encode_parse("", f"SET tenantgate.tenant = '{token(demo, 'globex')}'"),
               m.encode_bind("", "", ()), m.encode_execute(""), m.SYNC)
        assert not errors(c.until_ready())
        assert not errors(c.query(f"SET tenantgate.tenant = '{token(demo, 'acme')}'"))
        c.send(m.encode_bind("", "", ()), m.encode_execute(""),
               m.encode_parse("q", "SELECT DISTINCT tenant_id FROM customers"), m.encode_bind("", "q", ()),
               m.encode_execute(""), m.SYNC)
        assert [e.sqlstate for e in errors(c.until_ready())] in (["0A000"], ["26000"])
        c.send(m.encode_parse("q2", "SELECT DISTINCT tenant_id FROM customers"), m.encode_bind("", "q2", ()),
               m.encode_execute(""), m.SYNC)
        rows = _values(c.until_ready())
        simple = _values(c.query("SELECT DISTINCT tenant_id FROM customers"))
        assert rows == simple == [["acme"]], f"Parse'd statement saw {rows}, the gate enforces {simple}"
    finally:
        c.close()


def test_closing_the_unnamed_statement_closes_only_ones_own(px):
    """A Close of the unnamed statement by one client leaves another client's unnamed statement
    (which sits on the shared connection) usable, as it would be natively."""
    a = RawClient(px.dsn("acme"))
    b = RawClient(px.dsn("acme"))
    try:
        b.send(m.encode_parse("", "SELECT 'parsed by B'"), m.SYNC)
        assert not errors(b.until_ready())
        a.send(m.encode_close(b"S", ""), m.SYNC)
        assert not errors(a.until_ready())
        b.send(m.encode_bind("", "", ()), m.encode_execute(""), m.SYNC)
        assert _values(b.until_ready()) == [["parsed by B"]]
    finally:
        a.close()
        b.close()


def test_a_refused_named_parse_keeps_the_clients_unnamed_statement(px):
    """The refusal of a named Parse must not drop the client's own unnamed statement."""
    a = RawClient(px.dsn("acme"))
    try:
        a.send(m.encode_parse("", "SELECT 'mine'"), m.SYNC)
        assert not errors(a.until_ready())
        a.send(m.encode_parse("bad", "SELECT pg_read_file('/etc/passwd')"), m.SYNC)
        assert [e.sqlstate for e in errors(a.until_ready())] == ["42501"]
        a.send(m.encode_bind("", "", ()), m.encode_execute(""), m.SYNC)
        assert _values(a.until_ready()) == [["mine"]]
    finally:
        a.close()
