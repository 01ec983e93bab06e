"""The policy seam on every path: a recording Gatekeeper drives refusals, rewrites,
parameter checks, COPY checks, audit hooks, setup SQL and session termination."""

from __future__ import annotations

import struct
import time

import asyncpg
import psycopg
import pytest

from proxy.seam import Forward, Origin, Refuse, SessionKind, SessionRefused
from proxy.users import ConfigUserDirectory
from proxy.wire import messages as m
from support.proxy_harness import RawClient, ensure_backend_role, errors_in, make_config, start_proxy

PW = "pw"


class OnlySeven:
    type_oids = frozenset({20, 21, 23})  # psycopg declares small ints as int2

    def accepts(self, format_code, value):
        if value is None:
            return False
        if format_code == 0:
            return value == b"7"
        return value in (struct.pack("!h", 7), struct.pack("!i", 7), struct.pack("!q", 7))

    def describe(self):
        return "must be 7"


class NoEvil:
    def __init__(self):
        self.rows = 0

    def feed(self, data):
        self.rows += data.count(b"\n")
        return "row contains evil" if b"evil" in data else None

    def finish(self):
        return None


class AuditFailure(Exception):
    sqlstate = "58030"


class RecordingGate:
    def __init__(self, user, startup, events):
        self.kind = SessionKind.OPERATOR if user.name == "auditor" else SessionKind.TENANT
        self.audited = user.name == "auditor"
        self.backend_setup_sql = ["SET application_name = 'from_setup'", "SELECT 1"] if user.name == "setup" else []
        self.events = events
        self.startup = startup
        self.terminate = None

    def check(self, sql, origin):
        self.events.append(("check", origin, sql))
        if "forbidden" in sql:
            return Refuse("42501", "forbidden things are refused", hint="ask nicely")
        if "rewrite_me" in sql:
            return Forward(sql.replace("rewrite_me", "1 AS rewritten"))
        checks = ((0, OnlySeven()),) if "guarded" in sql else ()
        copy = NoEvil if sql.lstrip().upper().startswith("COPY") else None
        return Forward(sql, param_checks=checks, copy_in_check=copy, audit={"original": sql})

    def on_ready_for_query(self, status):
        self.events.append(("ready", status))

    async def audit_before(self, decision, params):
        self.events.append(("audit_before", decision.sql, params))
        if "audit_fail_plain" in decision.sql:
            raise RuntimeError("audit store down")
        if "audit_fail" in decision.sql:
            raise AuditFailure("audit store unavailable")
        return len(self.events)

    async def audit_after(self, handle, outcome):
        self.events.append(("audit_after", handle, outcome))

    def on_refused(self, sql, refusal):
        self.events.append(("refused", sql, refusal.sqlstate))

    def set_terminator(self, terminate):
        self.terminate = terminate

    async def close(self):
        self.events.append(("closed",))


class RecordingGatekeeper:
    def __init__(self, config):
        self.users = ConfigUserDirectory.from_config(config)
        self.events: list = []
        self.gates: list[RecordingGate] = []

    async def open_session(self, user, startup):
        if startup.options.get("tenantgate.refuse"):
            raise SessionRefused("28000", "refused by the test gatekeeper", hint="drop the option")
        gate = RecordingGate(user, startup, self.events)
        self.gates.append(gate)
        return gate


USERS = [{"name": n, "password": PW} for n in ("app", "auditor", "setup")]


@pytest.fixture(scope="module")
def db(pg, make_db):
    name, _ = make_db("seam")
    ensure_backend_role(pg, name)
    pg.psql("CREATE TABLE items (id int, v text); ALTER TABLE items OWNER TO tg_backend", database=name)
    return name


@pytest.fixture(scope="module")
def proxy(pg, db):
    p = start_proxy(make_config(pg, db, USERS), RecordingGatekeeper)
    yield p
    p.stop()


@pytest.fixture
def gk(proxy):
    gk = proxy.gatekeeper
    gk.events.clear()
    return gk


def raw(proxy, db, user="app", **params) -> RawClient:
    c = RawClient(proxy.host, proxy.port)
    c.startup(user, PW, database=db, **params)
    return c


def count(pg, db, where="true") -> int:
    return int(pg.psql(f"SELECT count(*) FROM items WHERE {where}", database=db))


# ------------------------------------------------------------------ simple protocol

def test_simple_refusal_keeps_session_and_aborts_the_transaction(proxy, db, gk, pg):
    c = raw(proxy, db)
    c.send(m.encode_query("BEGIN"))
    c.read_until(b"Z")
    c.send(m.encode_query("INSERT INTO items VALUES (1, 'kept')"))
    c.read_until(b"Z")
    c.send(m.encode_query("SELECT forbidden FROM items"))
    msgs = c.read_until(b"Z")
    assert [t for t, _ in msgs] == [b"E", b"Z"]
    err = errors_in(msgs)[0]
    assert (err["S"], err["C"], err["M"], err["H"]) == ("ERROR", "42501", "forbidden things are refused", "ask nicely")
    # like any error (issue 20 break 7): the transaction is aborted, COMMIT rolls it back
    assert msgs[-1] == (b"Z", b"E")
    c.send(m.encode_query("COMMIT"))
    done = c.read_until(b"Z")
    assert [m.command_tag(p) for t, p in done if t == b"C"] == ["ROLLBACK"] and done[-1] == (b"Z", b"I")
    assert count(pg, db, "v = 'kept'") == 0
    c.send(m.encode_query("SELECT 1"))  # the session stays usable
    assert not errors_in(c.read_until(b"Z"))
    assert ("refused", "SELECT forbidden FROM items", "42501") in gk.events
    assert ("check", Origin.SIMPLE, "SELECT forbidden FROM items") in gk.events
    c.close()


def test_rewrite_is_forwarded_on_both_protocols(proxy, db, gk):
    with psycopg.connect(proxy.dsn("app", PW, db)) as conn:
        cur = conn.execute("SELECT rewrite_me")  # no parameters: simple-ish path
        assert [d.name for d in cur.description] == ["rewritten"] and cur.fetchone() == (1,)
        cur = conn.execute("SELECT rewrite_me, %s::int AS p", (5,))  # extended protocol
        assert cur.fetchone() == (1, 5)
    assert any(e[:2] == ("check", Origin.PARSE) for e in gk.events)


def test_parse_refusal_aborts_the_pipeline_segment_like_an_error(proxy, db, gk, pg):
    c = raw(proxy, db)
    c.send(
        m.encode_parse("", "INSERT INTO items VALUES (2, 'pipelined')") + m.encode_bind("", "") + m.encode_execute()
        + m.encode_parse("s_bad", "SELECT forbidden") + m.encode_bind("", "s_bad") + m.encode_describe(b"P", "")
        + m.encode_execute() + m.SYNC
    )
    msgs = c.read_until(b"Z")
    assert [t for t, _ in msgs] == [b"1", b"2", b"C", b"E", b"Z"]
    err = errors_in(msgs)[0]
    assert (err["C"], err["M"]) == ("42501", "forbidden things are refused")
    assert count(pg, db, "v = 'pipelined'") == 0  # the implicit transaction was rolled back
    c.send(m.encode_parse("", "SELECT 1") + m.encode_bind("", "") + m.encode_execute() + m.SYNC)
    assert [t for t, _ in c.read_until(b"Z")] == [b"1", b"2", b"D", b"C", b"Z"]
    c.close()


def test_parse_refusal_with_drivers(proxy, db, gk):
    with psycopg.connect(proxy.dsn("app", PW, db), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="forbidden things"):
            conn.execute("SELECT forbidden, %s::int", (1,))
        assert conn.execute("SELECT %s::int", (3,)).fetchone() == (3,)


async def test_param_checks_text_and_binary(proxy, db, gk):
    with psycopg.connect(proxy.dsn("app", PW, db), autocommit=True) as conn:
        assert conn.execute("SELECT %s::int AS guarded", (7,)).fetchone() == (7,)
        assert conn.execute("SELECT %b::int AS guarded", (7,)).fetchone() == (7,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match=r"\$1 is not allowed: must be 7"):
            conn.execute("SELECT %s::int AS guarded", (8,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT %b::int AS guarded", (8,))
        assert conn.execute("SELECT 1").fetchone() == (1,)
    a = await asyncpg.connect(proxy.dsn("app", PW, db))
    try:
        stmt = await a.prepare("SELECT $1::int AS guarded")
        assert await stmt.fetchval(7) == 7
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await stmt.fetchval(9)
        assert await stmt.fetchval(7) == 7
    finally:
        await a.close()


def test_copy_in_check_aborts_the_copy(proxy, db, gk, pg):
    with psycopg.connect(proxy.dsn("app", PW, db), autocommit=True) as conn:
        with pytest.raises(psycopg.Error, match="row contains evil"):
            with conn.cursor().copy("COPY items (id, v) FROM STDIN") as copy:
                copy.write_row((10, "fine"))
                copy.write_row((11, "evil"))
                copy.write_row((12, "after"))
        assert conn.execute("SELECT count(*) FROM items WHERE id >= 10").fetchone() == (0,)
        with conn.cursor().copy("COPY items (id, v) FROM STDIN") as copy:
            copy.write_row((20, "good"))
        assert conn.execute("SELECT count(*) FROM items WHERE id = 20").fetchone() == (1,)


def test_function_call_and_setup_sql_and_terminate(proxy, db, gk, pg):
    c = raw(proxy, db, user="setup")
    assert c.parameters["application_name"] == "from_setup"  # setup ran, its results were hidden
    c.send(m.encode_query("SELECT 5"))
    msgs = c.read_until(b"Z")
    assert [t for t, _ in msgs] == [b"T", b"D", b"C", b"Z"]
    c.send(m.encode_query("BEGIN; INSERT INTO items VALUES (30, 'in tx')"))
    assert c.read_until(b"Z")[-1] == (b"Z", b"T")
    gate = proxy.gatekeeper.gates[-1]
    proxy.call(lambda: gate.terminate("57P01", "your grant expired"))
    e = errors_in(c.read_all())
    assert e and (e[-1]["S"], e[-1]["C"], e[-1]["M"]) == ("FATAL", "57P01", "your grant expired")
    assert count(pg, db, "id = 30") == 0  # the open transaction was rolled back
    deadline = time.monotonic() + 3
    while ("closed",) not in gk.events and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ("closed",) in gk.events
    assert ("ready", b"T") in gk.events


def test_session_refused_and_startup_options(proxy, db, gk):
    c = RawClient(proxy.host, proxy.port)
    with pytest.raises(RuntimeError, match="refused by the test gatekeeper"):
        c.startup("app", PW, database=db, options="-c tenantgate.refuse=1")
    # a setting a tenant may not SET refuses the connection, naming it (never dropped silently)
    c = RawClient(proxy.host, proxy.port)
    with pytest.raises(RuntimeError, match='"search_path" cannot be set at connection time'):
        c.startup("app", PW, database=db, options="-c search_path=evil_schema --tenantgate.tenant=acme")
    c = raw(proxy, db, options="-c statement_timeout=4321 --tenantgate.tenant=acme", **{"tenantgate.grant": "g-1"})
    st = proxy.gatekeeper.gates[-1].startup
    # tenantgate's own options go to the gate; SET-able settings go to PostgreSQL
    assert st.options == {"tenantgate.tenant": "acme", "tenantgate.grant": "g-1"}
    assert st.user == "app" and st.database == db and not st.tls and len(st.session_id) == 16
    c.send(m.encode_query("SHOW statement_timeout"))
    rows = [p for t, p in c.read_until(b"Z") if t == b"D"]
    assert b"4321ms" in rows[0]
    c.close()


# ------------------------------------------------------------------ audit

def test_audit_hooks_simple_and_extended(proxy, db, gk):
    with psycopg.connect(proxy.dsn("auditor", PW, db), autocommit=True) as conn:
        conn.execute("SELECT 1 AS simple_one", prepare=False)
        assert conn.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
    # audit_after runs as a task in the proxy's thread: give the last one a moment to land
    deadline = time.monotonic() + 5
    while sum(e[0] == "audit_after" for e in gk.events) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    before = [e for e in gk.events if e[0] == "audit_before"]
    after = [e for e in gk.events if e[0] == "audit_after"]
    assert any(e[2] in ((b"41",), (struct.pack("!h", 41),)) and "$1" in e[1] for e in before)
    assert len(after) == len(before) == 3
    outcomes = [e[2] for e in after]
    assert outcomes[0].command_tag == "SELECT 1" and outcomes[0].rows == 1 and outcomes[0].sqlstate is None
    assert outcomes[2].sqlstate == "22012"
    # audit_before runs before the statement: its event precedes the outcome
    first_before = gk.events.index(before[0])
    assert first_before < gk.events.index(after[0])


def test_audit_failure_means_the_statement_does_not_run(proxy, db, gk, pg):
    with psycopg.connect(proxy.dsn("auditor", PW, db), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as e:
            conn.execute("INSERT INTO items VALUES (40, 'audit_fail')")
        assert e.value.sqlstate == "58030"
        with pytest.raises(psycopg.Error) as e:
            conn.execute("INSERT INTO items VALUES (41, %s || 'audit_fail_plain')", ("x",))
        assert e.value.sqlstate == "58000"
        assert conn.execute("SELECT 1").fetchone() == (1,)
    c = raw(proxy, db, user="auditor")
    c.send(m.encode_query("INSERT INTO items VALUES (42, 'audit_fail')"))
    msgs = c.read_until(b"Z")
    assert errors_in(msgs)[0]["C"] == "58030"
    c.close()
    assert count(pg, db, "id IN (40, 41, 42)") == 0


class CrashingGatekeeper(RecordingGatekeeper):
    async def open_session(self, user, startup):
        gate = await super().open_session(user, startup)

        def check(sql, origin):
            if "crash" in sql:
                raise ValueError("policy bug")
            if "garbage" in sql:
                return "not a decision"
            return Forward(sql)

        gate.check = check
        return gate


@pytest.mark.allow_tracebacks("the test policy raises on purpose")
def test_a_crashing_policy_refuses_and_keeps_the_session(pg, db):
    p = start_proxy(make_config(pg, db, USERS), CrashingGatekeeper)
    try:
        with psycopg.connect(p.dsn("app", PW, db), autocommit=True) as conn:
            for sql in ("SELECT 'crash'", "SELECT 'garbage'"):
                with pytest.raises(psycopg.errors.InternalError_, match="internal error"):
                    conn.execute(sql)
                with pytest.raises(psycopg.errors.InternalError_):
                    conn.execute(sql + " || %s", ("x",))
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        p.stop()


def test_refusals_keep_their_place_in_a_pipeline(proxy, db, gk):
    c = raw(proxy, db)
    c.send(m.encode_query("SELECT pg_sleep(0.2)") + m.encode_query("SELECT forbidden")
           + m.encode_query("SELECT 2") + m.frame(b"F", b"\0\0\0\1\0\0\0\0\0\0") + m.encode_query("SELECT 3"))
    kinds = []
    for _ in range(5):
        kinds.append("".join(t.decode() for t, _ in c.read_until(b"Z")))
    assert kinds == ["TDCZ", "EZ", "TDCZ", "EZ", "TDCZ"]
    c.close()


async def test_large_results_stream_through(proxy, db):
    conn = await asyncpg.connect(proxy.dsn("app", PW, db))
    try:
        rows = await conn.fetch("SELECT g, repeat('x', 100) FROM generate_series(1, 200000) g")
        assert len(rows) == 200000 and rows[-1][0] == 200000
        big = await conn.fetchval("SELECT repeat('y', 5000000)")  # one 5 MB DataRow
        assert len(big) == 5000000
    finally:
        await conn.close()
