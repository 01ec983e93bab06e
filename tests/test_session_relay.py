"""The sans-IO relay core (proxy/session/relay.py), byte in / byte out, without sockets.

Each test feeds frontend messages into the receive buffer and backend bytes into
``feed_backend``, and checks the exact bytes the core leaves for PostgreSQL and for the client,
and its events — as h11's tests drive its Connection.  The gate is a small stand-in for the
policy (the policy itself is tested elsewhere): statements containing ``forbidden`` are
refused, everything else is forwarded, ``SET`` is a settings change.
"""

from __future__ import annotations

import pytest

from proxy.pool import ServerConn
from proxy.seam import Forward, Refuse
from proxy.session.counters import SessionCounters
from proxy.session.events import AUDIT, AUDIT_AFTER, TERMINATE, RelayFatal
from proxy.session.relay import Relay
from proxy.session.settings import PooledSettings
from proxy.tenant_counters import TenantCounters
from proxy.wire import messages as m
from proxy.wire.buffer import ReceiveBuffer
from proxy.wire.errors import ProtocolError

REFUSAL = Refuse("42501", "not allowed here", hint="ask nicely")


class Gate:
    """Forwards everything but statements containing 'forbidden'."""

    audited = False

    def __init__(self, copy_check=None):
        self.checked: list[str] = []
        self.refused: list[str] = []
        self.ready: list[bytes] = []
        self.copy_check = copy_check

    def check(self, sql, origin):
        self.checked.append(sql)
        if "forbidden" in sql:
            return REFUSAL
        if sql.upper().startswith("COPY"):
            return Forward(sql, copy_in_check=self.copy_check, statement_class="write")
        if sql.upper().startswith("SET"):
            return Forward(sql, statement_class="set")
        return Forward(sql.replace("FROM t", "FROM t WHERE tenant = 'a'"), statement_class="read")

    def on_refused(self, sql, refusal):
        self.refused.append(sql)

    def on_ready_for_query(self, status):
        self.ready.append(status)

    def backend_settings(self):
        return {"tenantgate.tenant_id": "a"}


class Limits:
    statement_offload_bytes = 1 << 20
    max_statement_bytes = 1 << 24


class Owner:
    kind_label = "tenant"
    user = "app"
    session_id = "s1"
    gate = None


def make_relay(gate=None, *, audited=False, pooled=False, tx_status=b"I"):
    gate = gate or Gate()
    buf = ReceiveBuffer(1 << 20)
    settings = None
    if pooled:
        class Pool:
            baseline = {}
        settings = PooledSettings(Pool(), None)
        settings.probe_names = ("work_mem",)
    relay = Relay(buf, gate, session_id="abc", limits=Limits(), audited=audited, copy_full=False,
                  counters=SessionCounters(Owner(), TenantCounters()), tx_status=tx_status,
                  pooled_settings=settings)
    if pooled:
        relay.sconn = ServerConn.__new__(ServerConn)
        relay.sconn.prepared = set()
        relay.sconn.unnamed_owner = None
        relay.sconn.binder = None
        relay.sconn.state = {}
    return relay, gate


def client(relay, *msgs: bytes) -> tuple[bytes, bytes]:
    """Feed client messages; returns (bytes for PostgreSQL, bytes for the client)."""
    relay.buf.feed(b"".join(msgs))
    relay.process_client()
    return take(relay)


def backend(relay, *msgs: bytes) -> tuple[bytes, bytes]:
    relay.feed_backend(b"".join(msgs))
    return take(relay)


def take(relay) -> tuple[bytes, bytes]:
    to_b, to_c = b"".join(relay.to_backend), b"".join(relay.to_client)
    relay.to_backend.clear()
    relay.to_client.clear()
    return to_b, to_c


def cc(tag: str) -> bytes:
    return m.frame(b"C", tag.encode() + b"\0")


def rfq(status: bytes = b"I") -> bytes:
    return m.encode_ready_for_query(status)


def err(token: str) -> bytes:
    return m.encode_error("ERROR", "42P01", f'relation "{token}" does not exist')


PARSE_COMPLETE, BIND_COMPLETE = m.frame(b"1"), m.frame(b"2")
ROW = m.frame(b"D", b"\x00\x01\x00\x00\x00\x011")


def refusal_error() -> bytes:
    return m.encode_error("ERROR", REFUSAL.sqlstate, REFUSAL.message, None, REFUSAL.hint)


# --------------------------------------------------------------------------- simple protocol

def test_a_query_is_rewritten_and_its_result_rows_pass_through_untouched():
    relay, gate = make_relay()
    to_b, to_c = client(relay, m.encode_query("SELECT * FROM t"))
    assert to_b == m.encode_query("SELECT * FROM t WHERE tenant = 'a'") and to_c == b""
    reply = m.frame(b"T", b"\x00\x00") + ROW + ROW + cc("SELECT 2") + rfq()
    to_b, to_c = backend(relay, reply)
    assert to_c == reply and to_b == b""
    assert relay.idle and gate.ready == [b"I"]


def test_an_unchanged_query_is_forwarded_as_the_same_bytes():
    relay, _ = make_relay()
    q = m.encode_query("SELECT 1")
    assert client(relay, q) == (q, b"")


def test_a_refused_query_while_idle_is_answered_by_the_proxy_alone():
    relay, gate = make_relay()
    to_b, to_c = client(relay, m.encode_query("SELECT forbidden"))
    assert to_b == b""
    assert to_c == refusal_error() + rfq(b"I")
    assert gate.refused == ["SELECT forbidden"] and relay.idle


def test_a_refused_query_in_a_transaction_aborts_it_through_a_marker_as_postgresql_would():
    relay, _ = make_relay(tx_status=b"T")
    to_b, to_c = client(relay, m.encode_query("SELECT forbidden"))
    token = m.decode_query(to_b[5:]).sql
    assert token.startswith("tenantgate_refused_abc_") and to_c == b""
    # PostgreSQL fails on the marker; the client sees the refusal, and the aborted status
    to_b, to_c = backend(relay, err(token), rfq(b"E"))
    assert to_c == refusal_error() + rfq(b"E")
    assert relay.tx_status == b"E" and not relay.markers


def test_a_refusal_queued_behind_a_running_query_is_answered_in_order():
    relay, _ = make_relay()
    q = m.encode_query("SELECT 1")
    to_b, _ = client(relay, q, m.encode_query("SELECT forbidden"))
    token = m.decode_query(to_b[len(q) + 5:]).sql  # a marker: the first query is still running
    assert to_b.startswith(q) and token.startswith("tenantgate_refused_")
    _, to_c = backend(relay, cc("SELECT 1"), rfq(), err(token), rfq())
    assert to_c == cc("SELECT 1") + rfq() + refusal_error() + rfq()


def test_a_function_call_message_is_refused():
    relay, _ = make_relay()
    to_b, to_c = client(relay, m.frame(b"F", b"\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00"))
    assert to_b == b"" and b"FunctionCall messages are not allowed" in to_c and to_c.endswith(rfq())


def test_terminate_is_an_event_and_nothing_is_forwarded_after_it():
    relay, _ = make_relay()
    to_b, _ = client(relay, m.encode_query("SELECT 1"), m.TERMINATE, m.encode_query("SELECT 2"))
    assert to_b == m.encode_query("SELECT 1") and relay.events == [(TERMINATE,)]


def test_a_malformed_message_raises_the_precise_protocol_error():
    relay, _ = make_relay()
    with pytest.raises(ProtocolError):
        client(relay, m.frame(b"S", b"junk"))


def test_copy_both_ends_the_session():
    relay, _ = make_relay()
    client(relay, m.encode_query("SELECT 1"))
    with pytest.raises(RelayFatal) as e:
        backend(relay, m.frame(b"W", b"\x00\x00\x00"))
    assert e.value.sqlstate == "0A000"


# --------------------------------------------------------------------------- extended protocol

def test_a_pipeline_of_bind_execute_sync_is_forwarded_verbatim_as_one_slice():
    relay, _ = make_relay()
    parse = m.encode_parse("", "SELECT 1")
    client(relay, parse, m.SYNC)
    backend(relay, PARSE_COMPLETE, rfq())
    run = (m.encode_bind("", "", ()) + m.encode_execute() + m.SYNC) * 3
    to_b, _ = client(relay, run)
    assert to_b == run and len(relay.to_backend) == 0
    assert [e.kind for e in relay.inflight] == [b"X", b"S"] * 3
    _, to_c = backend(relay, (BIND_COMPLETE + ROW + cc("SELECT 1") + rfq()) * 3)
    assert to_c.count(b"Z\x00\x00\x00\x05I") == 3 and relay.idle


def test_a_refused_parse_mid_pipeline_fails_there_and_the_rest_is_skipped_to_sync():
    relay, gate = make_relay()
    ok = m.encode_parse("", "SELECT 1") + m.encode_bind("", "", ()) + m.encode_execute() + m.SYNC
    bad = m.encode_parse("", "SELECT forbidden") + m.encode_bind("", "", ()) + m.encode_execute() + m.SYNC
    after = m.encode_parse("", "SELECT 2") + m.encode_bind("", "", ()) + m.encode_execute() + m.SYNC
    to_b, to_c = client(relay, ok, bad, after)
    marker = m.decode_parse(to_b[len(ok) + 5:len(ok) + 1 + int.from_bytes(to_b[len(ok) + 1:len(ok) + 5], "big")])
    assert marker.query.startswith("tenantgate_refused_")
    # after the marker Parse only the Sync of that segment goes on (Bind and Execute are skipped)
    marker_len = 1 + int.from_bytes(to_b[len(ok) + 1:len(ok) + 5], "big")
    assert to_b[len(ok) + marker_len:] == m.SYNC + after
    assert to_c == b"" and gate.refused == ["SELECT forbidden"]
    _, to_c = backend(relay, PARSE_COMPLETE, BIND_COMPLETE, ROW, cc("SELECT 1"), rfq(),
                      err(marker.query), rfq(),
                      PARSE_COMPLETE, BIND_COMPLETE, ROW, cc("SELECT 1"), rfq())
    assert refusal_error() in to_c and err(marker.query) not in to_c
    assert to_c.count(b"Z\x00\x00\x00\x05I") == 3 and relay.idle


def test_a_named_statement_that_exists_is_refused_as_postgresql_would():
    relay, _ = make_relay()
    client(relay, m.encode_parse("s1", "SELECT 1"), m.SYNC)
    backend(relay, PARSE_COMPLETE, rfq())
    to_b, _ = client(relay, m.encode_parse("s1", "SELECT 2"), m.SYNC)
    token = m.decode_parse(to_b[5:to_b.index(m.SYNC)]).query
    _, to_c = backend(relay, err(token), rfq())
    assert b"42P05" in to_c and b'prepared statement "s1" already exists' in to_c


def test_an_error_from_postgresql_mid_pipeline_is_passed_on_and_the_ledger_forgets_the_parse():
    relay, _ = make_relay()
    client(relay, m.encode_parse("s1", "SELECT nope"), m.SYNC)
    pg_error = m.encode_error("ERROR", "42703", 'column "nope" does not exist')
    _, to_c = backend(relay, pg_error, rfq())
    assert to_c == pg_error + rfq()
    # the statement does not exist, so the same name can be prepared again
    to_b, _ = client(relay, m.encode_parse("s1", "SELECT 1"), m.SYNC)
    assert to_b == m.encode_parse("s1", "SELECT 1") + m.SYNC


# --------------------------------------------------------------------------- transaction pooling

def test_pooled_named_statements_are_renamed_and_reprepared_on_another_connection():
    relay, _ = make_relay(pooled=True)
    to_b, _ = client(relay, m.encode_parse("s1", "SELECT 1"), m.SYNC)
    assert to_b == m.encode_parse("tg_abc_1", "SELECT 1") + m.SYNC
    _, to_c = backend(relay, PARSE_COMPLETE, rfq())
    assert to_c == PARSE_COMPLETE + rfq() and relay.quiet()
    # another connection, which lacks the statement: the proxy prepares it first, and swallows
    # that ParseComplete
    other = ServerConn.__new__(ServerConn)
    other.prepared, other.unnamed_owner, other.binder, other.state = set(), None, None, {}
    relay.sconn = other
    to_b, _ = client(relay, m.encode_bind("", "s1", ()), m.encode_execute(), m.SYNC)
    assert to_b == (m.encode_parse("tg_abc_1", "SELECT 1") + m.encode_bind("", "tg_abc_1", ())
                    + m.encode_execute() + m.SYNC)
    _, to_c = backend(relay, PARSE_COMPLETE, BIND_COMPLETE, ROW, cc("SELECT 1"), rfq())
    assert to_c == BIND_COMPLETE + ROW + cc("SELECT 1") + rfq()


def test_pooled_bind_of_an_unknown_statement_is_refused_without_reaching_other_clients_statements():
    relay, _ = make_relay(pooled=True)
    relay.sconn.prepared.add("tg_other_1")  # another client's statement on this connection
    to_b, _ = client(relay, m.encode_bind("", "tg_other_1", ()), m.encode_execute(), m.SYNC)
    assert b"tg_other_1" not in to_b and b"tenantgate_refused_" in to_b


def test_pooled_set_makes_the_connection_dirty_and_the_probe_is_never_shown_to_the_client():
    relay, _ = make_relay(pooled=True)
    client(relay, m.encode_query("SET work_mem = '8MB'"))
    assert relay.settings.dirty
    _, to_c = backend(relay, cc("SET"), rfq())
    assert to_c == cc("SET") + rfq()
    relay.send_probe()
    to_b, _ = take(relay)
    assert b"current_setting" in to_b or b"work_mem" in to_b
    probe_reply = (m.frame(b"T", b"\x00\x01") + m.frame(b"D", b"\x00\x01\x00\x00\x00\x038MB")
                   + cc("SELECT 1") + rfq())
    _, to_c = backend(relay, probe_reply)
    assert to_c == b"" and relay.sconn.state.get("work_mem") == "8MB" and relay.quiet()


def test_a_connection_with_an_open_transaction_is_not_quiet():
    relay, _ = make_relay(pooled=True)
    client(relay, m.encode_query("BEGIN"))
    backend(relay, cc("BEGIN"), rfq(b"T"))
    assert not relay.quiet()
    client(relay, m.encode_query("COMMIT"))
    backend(relay, cc("COMMIT"), rfq(b"I"))
    assert relay.quiet()


def test_an_extended_pipeline_without_its_sync_keeps_the_connection():
    relay, _ = make_relay(pooled=True)
    client(relay, m.encode_parse("", "SELECT 1"), m.encode_bind("", "", ()), m.FLUSH)
    assert relay.unsynced and not relay.quiet()


# --------------------------------------------------------------------------- COPY and audit

class RejectGlobex:
    fills = False

    def feed(self, data):
        return "row for another tenant" if b"globex" in data else None

    def finish(self):
        return None


def test_copy_data_for_another_tenant_fails_the_copy_before_postgresql_commits():
    relay, _ = make_relay(Gate(copy_check=RejectGlobex))
    client(relay, m.encode_query("COPY t FROM STDIN"))
    backend(relay, m.frame(b"G", b"\x00\x00\x00"))
    to_b, _ = client(relay, m.encode_copy_data(b"acme\t1\n"))
    assert to_b == m.encode_copy_data(b"acme\t1\n")
    to_b, _ = client(relay, m.encode_copy_data(b"globex\t2\n"), m.encode_copy_data(b"acme\t3\n"), m.COPY_DONE)
    # CopyFail, and nothing after it: PostgreSQL stores nothing of this COPY
    assert to_b.startswith(b"f") and b"row for another tenant (tenantgate_refused_abc_" in to_b
    assert len(to_b) == 1 + int.from_bytes(to_b[1:5], "big")
    token = to_b[5:-1].decode().rsplit("(", 1)[1].rstrip(")")
    # PostgreSQL's 57014 "COPY from stdin failed" becomes the refusal, 42501 as for an INSERT
    pg = m.encode_error("ERROR", "57014", f"COPY from stdin failed: row for another tenant ({token})")
    _, to_c = backend(relay, pg, rfq())
    fields = m.decode_error_fields(to_c[5:to_c.index(rfq())]).fields
    assert fields["C"] == "42501" and fields["M"] == "row for another tenant" and relay.idle


def test_an_audited_statement_waits_for_its_audit_record_then_runs():
    gate = Gate()
    relay, _ = make_relay(gate, audited=True)
    to_b, _ = client(relay, m.encode_query("SELECT 1"), m.encode_query("SELECT 2"))
    assert to_b == b"" and relay.blocked
    (kind, decision, params, forward, refuse), = relay.events
    assert kind == AUDIT and decision.sql == "SELECT 1"
    relay.events.clear()
    forward("handle-1")
    relay.blocked = False
    relay.process_client()  # the second statement is audited in its turn
    to_b, _ = take(relay)
    assert to_b == m.encode_query("SELECT 1")
    assert relay.events[0][0] == AUDIT and relay.events[0][1].sql == "SELECT 2"
    relay.events.clear()
    backend(relay, cc("SELECT 1"), rfq())
    (kind, handle, outcome), = relay.events
    assert kind == AUDIT_AFTER and handle == "handle-1"
    assert outcome.command_tag == "SELECT 1" and outcome.rows == 1 and outcome.sqlstate is None


def test_an_audit_that_fails_refuses_the_statement():
    relay, _ = make_relay(audited=True)
    client(relay, m.encode_query("SELECT 1"))
    (_, _, _, _, refuse), = relay.events
    refuse(Refuse("58000", "statement not run: audit down"))
    _, to_c = take(relay)
    assert b"statement not run: audit down" in to_c and to_c.endswith(rfq())


def test_a_clean_connection_stays_quiet_after_terminate_so_it_goes_back_to_the_pool():
    relay, _ = make_relay(pooled=True)
    client(relay, m.encode_query("SELECT 1"))
    backend(relay, cc("SELECT 1"), rfq())
    client(relay, m.TERMINATE)
    assert relay.events == [(TERMINATE,)] and relay.quiet()


# --------------------------------------------------------------------------- a core that may be dropped

def test_a_core_is_pristine_until_it_holds_something_a_new_one_would_not():
    relay, _ = make_relay(pooled=True)
    assert relay.pristine()
    client(relay, m.encode_query("SELECT * FROM t"))
    assert not relay.pristine()  # a statement in flight
    backend(relay, cc("SELECT 0") + rfq())
    assert relay.pristine()  # answered: nothing left
    client(relay, m.encode_query("BEGIN"))
    backend(relay, cc("BEGIN") + rfq(b"T"))
    assert not relay.pristine()  # a transaction open
    client(relay, m.encode_query("COMMIT"))
    backend(relay, cc("COMMIT") + rfq())
    assert relay.pristine()
    client(relay, m.encode_parse("s1", "SELECT 1"), m.SYNC)
    backend(relay, PARSE_COMPLETE + rfq())
    assert not relay.pristine()  # a named statement: its server name is numbered by this core


def test_every_field_of_the_core_is_accounted_for_by_pristine():
    # Relay.pristine decides whether an idle session may drop its core and make a new one later;
    # a new field must be added to it (or to the fields set once at construction) and here.
    from proxy.session.relay import Relay

    given_at_construction = {"buf", "gate", "session_id", "limits", "audited", "copy_full", "counters",
                             "can_refresh", "pooled", "settings", "sconn"}
    checked_by_pristine = {"to_backend", "to_client", "events", "blocked", "held", "hold_seg", "offloaded",
                           "refresh_retried", "inflight", "tx_status", "fstate", "scanner", "ledger", "markers",
                           "marker_seq", "seg_sent", "seg_done", "unsynced", "unnamed_single", "unnamed_spent",
                           "copy", "backend_fatal", "saw_ready", "parse_texts", "stmts", "swallowing"}
    assert set(Relay.__slots__) == given_at_construction | checked_by_pristine
