"""The admin console (proxy/admin_console.py): PgBouncer-style SHOW commands.

Unit tests drive :class:`AdminConsole` with a fake server (a fixed
``pool_snapshot()``) and decode the bytes it writes.  Two tests use the real
psql: one against the console served by a tiny test listener (wire
compatibility), one end to end through a running tenantgate (the session's
admin hook, authentication and the live pool snapshot).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import threading
from types import SimpleNamespace

import pytest

from proxy.admin_console import (
    INT8_OID,
    TEXT_OID,
    AdminConsole,
    config_items,
    is_secret_key,
)
from proxy.config import Config
from proxy.gatekeeper import PolicyGatekeeper
from proxy.passthrough import PassthroughGatekeeper
from proxy.policy.lexer import statement_texts as split_statements
from proxy.seam import SessionKind, SessionRefused, SqlStateError, StartupInfo, UserRecord
from proxy.users import ConfigUserDirectory
from proxy.wire import messages as m

from support.proxy_harness import proxy_factory, verifier_for  # noqa: F401  (pytest fixture)

T0 = 1_764_000_000.0  # a fixed "now" (2025-11-24 16:00:00 UTC)

SNAPSHOT = {
    "pools": [
        {"database": "appdb", "user": "tg_backend", "pool_mode": "transaction", "cl_active": 3, "cl_waiting": 1,
         "sv_active": 2, "sv_idle": 5, "sv_used": 0, "sv_login": 1, "maxwait_us": 2_500_000, "size": 20},
        {"database": "other", "user": "tg_backend", "pool_mode": "session", "cl_active": 1, "cl_waiting": 0,
         "sv_active": 1, "sv_idle": 0, "sv_used": 0, "sv_login": 0, "maxwait_us": 0, "size": 20},
    ],
    "clients": [
        {"user": "app", "database": "appdb", "state": "waiting", "addr": "127.0.0.1", "port": 50123,
         "connect_time": T0 - 60, "request_time": T0 - 1, "wait_us": 1_250_000, "tls": True,
         "application_name": "psql", "kind": "tenant", "pool_mode": "transaction", "prepared_statements": 2,
         "id": "c0ffee"},
    ],
    "servers": [
        {"user": "tg_backend", "database": "appdb", "state": "active", "addr": "127.0.0.1", "port": 5432,
         "connect_time": T0 - 120, "request_time": T0 - 2, "remote_pid": 4242, "tls": False,
         "prepared_statements": 7, "client": "c0ffee"},
        {"user": "tg_backend", "database": "appdb", "state": "idle", "addr": "127.0.0.1", "port": 5432,
         "connect_time": T0 - 100, "request_time": 0, "remote_pid": 4243, "tls": False,
         "prepared_statements": 0, "client": None},
    ],
    "stats": [
        {"database": "appdb", "total_xact_count": 100, "total_query_count": 250, "total_received": 10_000,
         "total_sent": 40_000, "total_xact_time_us": 500_000, "total_query_time_us": 250_000,
         "total_wait_time_us": 1_000},
    ],
    "started_at": T0 - 100,
}


def make_server(snapshot=SNAPSHOT, **config):
    cfg = Config.model_validate({
        "backend": {"host": "127.0.0.1", "port": 5432, "database": "appdb", "password": "backend-secret"},
        "tokens": {"hmac_key": "token-secret"},
        "control": {"dsn": "postgresql://ctl:ctl-secret@127.0.0.1/appdb"},
        "users": [{"name": "app", "scram_verifier": verifier_for("pw"), "tenant": "acme"},
                  {"name": "boss", "scram_verifier": verifier_for("pw"), "admin": True}],
        **config,
    })
    server = SimpleNamespace(config=cfg)
    if snapshot is not None:
        server.pool_snapshot = (lambda: snapshot) if not callable(snapshot) else snapshot
    return server


def parse(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        t = data[pos:pos + 1]
        (n,) = struct.unpack_from("!I", data, pos + 1)
        out.append((t, data[pos + 5:pos + 1 + n]))
        pos += 1 + n
    assert pos == len(data)
    return out


def row_description(payload: bytes) -> list[tuple[str, int]]:
    r = m.Reader(payload)
    cols = []
    for _ in range(r.int16()):
        name = r.cstring()
        r.int32(), r.int16()
        oid = r.int32()
        r.int16(), r.int32(), r.int16()
        cols.append((name, oid))
    r.end()
    return cols


def data_row(payload: bytes) -> list[str | None]:
    r = m.Reader(payload)
    vals = []
    for _ in range(r.int16()):
        n = r.int32()
        vals.append(None if n == -1 else r.raw(n).decode())
    r.end()
    return vals


class Console:
    """An AdminConsole plus what it wrote, decoded."""

    def __init__(self, server=None):
        self.out: list[bytes] = []
        self.console = AdminConsole(server or make_server(), self.out.append, user="boss", clock=lambda: T0)

    def send(self, t: bytes, payload: bytes = b"") -> tuple[bool, list[tuple[bytes, bytes]]]:
        self.out.clear()
        keep = self.console.handle(t, payload)
        return keep, parse(b"".join(self.out))

    def query(self, sql: str) -> list[tuple[bytes, bytes]]:
        keep, msgs = self.send(b"Q", m.cstr(sql))
        assert keep
        assert msgs[-1] == (b"Z", b"I")
        return msgs


def results(msgs) -> list[tuple[list[str], list[dict[str, str | None]]]]:
    """(column names, rows as dicts) of every result set in ``msgs``."""
    out = []
    for t, p in msgs:
        if t == b"T":
            cols = [c for c, _ in row_description(p)]
            out.append((cols, []))
        elif t == b"D":
            out[-1][1].append(dict(zip(out[-1][0], data_row(p))))
    return out


def errors(msgs):
    return [m.decode_error_fields(p).fields for t, p in msgs if t == b"E"]


# --------------------------------------------------------------------------- startup and SHOW


def test_startup_messages_give_psql_what_it_needs():
    msgs = parse(AdminConsole(make_server(), lambda b: None, user="boss").startup_messages())
    params = dict(m.decode_parameter_status(p) for t, p in msgs if t == b"S")
    assert params["server_version"].startswith("15.0 (tenantgate")
    assert params["server_encoding"] == params["client_encoding"] == "UTF8"
    assert params["integer_datetimes"] == "on" and params["standard_conforming_strings"] == "on"
    assert params["session_authorization"] == "boss"
    assert b"K" not in [t for t, _ in msgs]
    assert msgs[-1] == (b"Z", b"I")


def test_show_pools_uses_pgbouncer_columns():
    c = Console()
    msgs = c.query("SHOW POOLS;")
    assert [t for t, _ in msgs] == [b"T", b"D", b"D", b"C", b"Z"]
    cols = row_description(msgs[0][1])
    assert [n for n, _ in cols] == ["database", "user", "cl_active", "cl_waiting", "sv_active", "sv_idle",
                                    "sv_used", "sv_login", "maxwait", "maxwait_us", "pool_mode", "region"]
    assert dict(cols)["database"] == TEXT_OID and dict(cols)["cl_active"] == INT8_OID
    rows = results(msgs)[0][1]
    assert rows[0] == {"database": "appdb", "user": "tg_backend", "cl_active": "3", "cl_waiting": "1",
                       "sv_active": "2", "sv_idle": "5", "sv_used": "0", "sv_login": "1", "maxwait": "2",
                       "maxwait_us": "500000", "pool_mode": "transaction", "region": ""}
    assert rows[1]["pool_mode"] == "session"
    assert m.command_tag(msgs[-2][1]) == "SHOW"


def test_show_clients_and_servers():
    c = Console()
    (cols, rows), = results(c.query("show clients"))
    assert cols[:6] == ["type", "user", "database", "state", "addr", "port"]
    assert rows == [{"type": "C", "user": "app", "database": "appdb", "state": "waiting", "addr": "127.0.0.1",
                     "port": "50123", "connect_time": "2025-11-24 15:59:00 UTC",
                     "request_time": "2025-11-24 15:59:59 UTC", "wait": "1", "wait_us": "250000",
                     "id": "c0ffee", "tls": "TLS", "application_name": "psql", "prepared_statements": "2",
                     "kind": "tenant", "pool_mode": "transaction", "region": ""}]
    (cols, rows), = results(c.query("Show Servers"))
    assert [r["state"] for r in rows] == ["active", "idle"]
    assert rows[0]["link"] == "c0ffee" and rows[1]["link"] == ""
    assert rows[0]["remote_pid"] == "4242" and rows[0]["type"] == "S" and rows[0]["tls"] == ""
    assert rows[1]["request_time"] == ""


def test_show_stats_totals_and_since_start_averages():
    c = Console()
    (cols, rows), = results(c.query("SHOW STATS"))
    assert cols[:8] == ["database", "total_xact_count", "total_query_count", "total_received", "total_sent",
                        "total_xact_time", "total_query_time", "total_wait_time"]
    r = rows[0]
    assert (r["total_xact_count"], r["total_query_count"], r["total_xact_time"]) == ("100", "250", "500000")
    # 100 s since start: per-second rates; per-transaction / per-query durations in microseconds
    assert (r["avg_xact_count"], r["avg_query_count"], r["avg_recv"], r["avg_sent"]) == ("1", "2", "100", "400")
    assert (r["avg_xact_time"], r["avg_query_time"], r["avg_wait_time"]) == ("5000", "1000", "10")
    (_, totals), = results(c.query("SHOW STATS_TOTALS"))
    assert totals[0]["bytes_sent"] == "40000"
    (_, avgs), = results(c.query("SHOW STATS_AVERAGES"))
    assert avgs[0]["xact_time"] == "5000"


def test_show_stats_averages_cover_the_last_60_seconds():
    """As PgBouncer's stats_period: what happened in the window, not since start."""
    import copy

    snap = copy.deepcopy(SNAPSHOT)
    # 60 s ago the totals were 40 transactions, 130 queries, 4000/16000 bytes, 200 ms of transactions
    snap["stats"][0].update(window_s=60.0, window_start={
        "total_xact_count": 40, "total_query_count": 130, "total_received": 4_000, "total_sent": 16_000,
        "total_xact_time_us": 200_000, "total_query_time_us": 130_000, "total_wait_time_us": 400})
    c = Console(make_server(snap))
    (_, rows), = results(c.query("SHOW STATS"))
    r = rows[0]
    assert r["total_xact_count"] == "100"  # totals stay totals
    assert (r["avg_xact_count"], r["avg_query_count"], r["avg_recv"], r["avg_sent"]) == ("1", "2", "100", "400")
    # 60 transactions took 300 ms in the window: 5000 µs each; 120 queries 120 ms: 1000 µs
    assert (r["avg_xact_time"], r["avg_query_time"], r["avg_wait_time"]) == ("5000", "1000", "10")
    (_, avgs), = results(c.query("SHOW STATS_AVERAGES"))
    assert avgs[0]["xact_count"] == "1" and avgs[0]["bytes_sent"] == "400"


def test_stats_window_keeps_60_seconds():
    from proxy.stats_window import StatsWindow

    w = StatsWindow()
    assert w.since(0.0, "app") is None
    for t in range(0, 200):
        w.record(float(t), {"app": {"total_xact_count": t * 10}})
    span, start = w.since(199.0, "app")
    assert span == 60.0 and start == {"total_xact_count": 1390}
    assert w.since(199.0, "other") == (60.0, {})  # a database first seen inside the window starts at 0
    assert len(w._samples) <= 61


def test_show_databases_lists_users_version():
    c = Console()
    (cols, rows), = results(c.query("SHOW DATABASES"))
    assert rows[0]["name"] == "appdb" and rows[0]["host"] == "127.0.0.1" and rows[0]["port"] == "5432"
    assert rows[0]["pool_size"] == "20" and rows[0]["force_user"] == "tg_backend"
    assert rows[0]["current_connections"] == "8" and rows[0]["current_client_connections"] == "4"
    (_, lists), = results(c.query("SHOW LISTS"))
    assert {r["list"]: r["items"] for r in lists} == {"databases": "2", "users": "2", "pools": "2",
                                                      "used_clients": "1", "used_servers": "2"}
    (_, users), = results(c.query("SHOW USERS"))
    assert users == [{"name": "app", "pool_mode": "", "admin": ""}, {"name": "boss", "pool_mode": "", "admin": "yes"}]
    (cols, rows), = results(c.query("SHOW VERSION"))
    assert cols == ["version"] and rows[0]["version"].startswith("tenantgate ")


def test_show_config_masks_secrets():
    c = Console()
    (cols, rows), = results(c.query("SHOW CONFIG"))
    assert cols == ["key", "value", "default"]
    conf = {r["key"]: r for r in rows}
    assert conf["backend.port"]["value"] == "5432"
    assert conf["pool.mode"] == {"key": "pool.mode", "value": "session", "default": "session"}
    assert conf["admin.database"]["value"] == "tenantgate"
    for key in ("backend.password", "tokens.hmac_key", "control.dsn"):
        assert conf[key]["value"] == "********"
    assert conf["users"]["value"] == "app, boss"
    text = repr(rows)
    for secret in ("backend-secret", "token-secret", "ctl-secret", "SCRAM-SHA-256"):
        assert secret not in text
    assert is_secret_key("lifecycle.data_dsn") and not is_secret_key("backend.password_env")
    assert not is_secret_key("audit.signing_key_file") and is_secret_key("x.private_key")
    assert config_items(Config())["backend.password"] == ""


def test_show_help_is_a_notice():
    c = Console()
    msgs = c.query("SHOW HELP")
    assert [t for t, _ in msgs] == [b"N", b"C", b"Z"]
    notice = m.decode_error_fields(msgs[0][1])
    assert notice.severity == "NOTICE" and notice.message == "Console usage"
    assert "POOLS" in notice.fields["D"] and "STATS" in notice.fields["D"]


# --------------------------------------------------------------------------- statements and errors


def test_several_statements_in_one_query_run_in_order():
    c = Console()
    msgs = c.query("show pools; SHOW STATS ;\n-- a comment; SHOW nothing\n show version;;")
    assert [cols[0] for cols, _ in results(msgs)] == ["database", "database", "version"]
    assert [m.command_tag(p) for t, p in msgs if t == b"C"] == ["SHOW", "SHOW", "SHOW"]
    assert [t for t, _ in msgs].count(b"Z") == 1


def test_an_error_stops_the_rest_of_the_query_and_the_console_stays_usable():
    c = Console()
    msgs = c.query("SHOW POOLS; SUSPEND; SHOW STATS")
    assert [t for t, _ in msgs] == [b"T", b"D", b"D", b"C", b"E", b"Z"]
    (err,) = errors(msgs)
    assert err["S"] == "ERROR" and err["C"] == "0A000" and "SUSPEND" in err["M"]
    assert "SHOW POOLS" in err["H"] and "SHOW CLIENTS" in err["H"] and "SHOW STATS" in err["H"]
    assert results(c.query("SHOW LISTS"))


@pytest.mark.parametrize("sql,code", [
    ("SELECT 1", "0A000"),
    ("DROP TABLE x", "42601"),
    ("SHOW", "42601"),
    ("SHOW POOLS EXTRA", "42601"),
    ("SHOW search_path", "42601"),
    ("SHOW MEM", "0A000"),
    ("SHOW 'pools;x'", "42601"),
])
def test_unsupported_commands_are_refused_with_the_supported_list(sql, code):
    c = Console()
    msgs = c.query(sql)
    (err,) = errors(msgs)
    assert err["C"] == code and err["H"].startswith("supported commands: SHOW HELP, SHOW POOLS")
    assert [t for t, _ in msgs] == [b"E", b"Z"]


def test_empty_and_malformed_queries():
    c = Console()
    assert [t for t, _ in c.query("  ; -- nothing\n")] == [b"I", b"Z"]
    keep, msgs = c.send(b"Q", b"SHOW POOLS \xff\x00")
    assert keep and errors(msgs)[0]["C"] == "22021" and msgs[-1] == (b"Z", b"I")
    msgs = c.query("PAUSE 'unterminated; SHOW POOLS")  # PostgreSQL's scanner rejects it: nothing runs
    assert [t for t, _ in msgs] == [b"E", b"Z"] and errors(msgs)[0]["C"] == "42601"
    assert results(c.query("SHOW LISTS"))
    keep, msgs = c.send(b"Q", b"SHOW POOLS")  # not zero-terminated
    assert keep and errors(msgs)[0]["C"] == "08P01" and msgs[-1] == (b"Z", b"I")


def test_extended_protocol_is_refused_once_and_answered_at_sync():
    c = Console()
    out = []
    for t, payload in (
        (b"P", m.encode_parse("", "SHOW POOLS")[5:]),
        (b"B", m.encode_bind("", "")[5:]),
        (b"D", m.encode_describe(b"P", "")[5:]),
        (b"E", m.encode_execute()[5:]),
        (b"H", b""),
        (b"Q", m.cstr("SHOW POOLS")),  # discarded too, as PostgreSQL does until Sync
        (b"S", b""),
    ):
        keep, msgs = c.send(t, payload)
        assert keep
        out += msgs
    assert [t for t, _ in out] == [b"E", b"Z"]
    assert errors(out)[0]["C"] == "0A000"
    assert results(c.query("SHOW POOLS"))  # usable again after Sync
    keep, msgs = c.send(b"S")
    assert keep and msgs == [(b"Z", b"I")]


def test_function_call_copy_messages_and_unknown_types():
    c = Console()
    keep, msgs = c.send(b"F", b"\x00\x00\x0b\xe9")
    assert keep and errors(msgs)[0]["C"] == "0A000" and msgs[-1] == (b"Z", b"I")
    for t in (b"d", b"c", b"f"):
        assert c.send(t, b"x\x00") == (True, [])
    keep, msgs = c.send(b"p", b"secret\x00")
    assert not keep and errors(msgs)[0]["S"] == "FATAL" and errors(msgs)[0]["C"] == "08P01"
    assert c.send(b"Q", m.cstr("SHOW POOLS")) == (False, [])


def test_terminate_closes():
    c = Console()
    assert c.send(b"X") == (False, [])
    assert c.send(b"Q", m.cstr("SHOW POOLS")) == (False, [])


def test_server_without_snapshot_shows_empty_views():
    c = Console(make_server(snapshot=None))
    for what in ("POOLS", "CLIENTS", "SERVERS", "STATS", "DATABASES"):
        ((cols, rows),) = results(c.query(f"SHOW {what}"))
        assert cols and rows == []


def test_a_failing_snapshot_is_an_error_not_a_crash():
    def broken():
        raise RuntimeError("pool is gone")

    c = Console(make_server(snapshot=broken))
    (err,) = errors(c.query("SHOW POOLS"))
    assert err["C"] == "XX000" and "pool is gone" in err["M"]
    assert results(c.query("SHOW VERSION"))


def test_split_statements():
    """The console splits with PostgreSQL's scanner (proxy.policy.lexer.statement_texts)."""
    assert split_statements("SHOW POOLS") == ["SHOW POOLS"]
    assert split_statements("a; 'x;y'; \"q;\" ; /* c; /* n; */ ; */ b --z;\n") == ["a", "'x;y'", '"q;"', "b"]
    assert split_statements(";;  ;") == []
    assert split_statements("PAUSE TENANT acme-corp;SHOW/**/POOLS") == ["PAUSE TENANT acme-corp", "SHOW POOLS"]
    with pytest.raises(SqlStateError) as e:
        split_statements("PAUSE 'unterminated")
    assert e.value.sqlstate == "42601"


# --------------------------------------------------------------------------- who may connect


STARTUP = StartupInfo(user="boss", database="appdb", client_addr="127.0.0.1:1", options={},
                      application_name=None, session_id="00", tls=False)


async def test_admin_users_are_refused_on_ordinary_databases():
    cfg = make_server().config
    record = await ConfigUserDirectory.from_config(cfg).lookup("boss")
    assert record.admin and record.kind is SessionKind.TENANT
    assert not (await ConfigUserDirectory.from_config(cfg).lookup("app")).admin
    for gatekeeper in (PolicyGatekeeper(cfg, engine=None, catalog=None), PassthroughGatekeeper(cfg, allow_all=True)):
        with pytest.raises(SessionRefused) as e:
            await gatekeeper.open_session(record, STARTUP)
        assert e.value.sqlstate == "28000" and '"tenantgate"' in e.value.message
        assert "dbname=tenantgate" in e.value.hint
    passthrough_admin = UserRecord("boss", "SCRAM-SHA-256$x", SessionKind.PASSTHROUGH, admin=True)
    with pytest.raises(SessionRefused):
        await PassthroughGatekeeper(cfg).open_session(passthrough_admin, STARTUP)


# --------------------------------------------------------------------------- real psql


class _ConsoleListener:
    """A minimal listener that serves the admin console to one client at a time (trust auth),
    so psql's view of the console is tested without the rest of the proxy."""

    def __init__(self, server):
        self.server = server
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _recv(self, conn, n):
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionError
            buf += chunk
        return buf

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._session(conn)
                except (ConnectionError, OSError):
                    pass

    def _session(self, conn):
        while True:
            (n,) = struct.unpack("!i", self._recv(conn, 4))
            body = self._recv(conn, n - 4)
            code = struct.unpack("!i", body[:4])[0]
            if code in (m.SSL_REQUEST_CODE, m.GSSENC_REQUEST_CODE):
                conn.sendall(b"N")
                continue
            break
        fields = body[4:].split(b"\0")
        params = dict(zip(fields[0::2], fields[1::2]))
        console = AdminConsole(self.server, conn.sendall, user=params.get(b"user", b"").decode())
        conn.sendall(m.encode_auth(m.AUTH_OK) + console.startup_messages())
        while True:
            head = self._recv(conn, 5)
            (n,) = struct.unpack("!I", head[1:])
            if not console.handle(head[:1], self._recv(conn, n - 4)):
                return

    def close(self):
        self.sock.close()


def run_psql(port: int, *commands: str, user: str = "boss", database: str = "tenantgate",
             password: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PGSSLMODE": "disable", "PGCONNECT_TIMEOUT": "10"}
    env.pop("PGPASSWORD", None)
    if password is not None:
        env["PGPASSWORD"] = password
    args = ["psql", "-X", "--csv", "-v", "ON_ERROR_STOP=0", "-h", "127.0.0.1", "-p", str(port), "-U", user,
            "-d", database, "-w"]
    for c in commands:
        args += ["-c", c]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)


def csv_blocks(stdout: str) -> list[list[list[str]]]:
    import csv
    import io

    blocks = [b for b in stdout.strip().split("\n\n") if b.strip()]
    return [list(csv.reader(io.StringIO(b))) for b in blocks]


def test_psql_reads_the_console():
    listener = _ConsoleListener(make_server())
    try:
        r = run_psql(listener.port, "SHOW POOLS", "SHOW HELP", "show stats;", "SUSPEND", "SHOW CLIENTS")
    finally:
        listener.close()
    assert "WARNING" not in r.stderr, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == ("database,user,cl_active,cl_waiting,sv_active,sv_idle,sv_used,sv_login,maxwait,maxwait_us,"
                        "pool_mode,region")
    assert lines[1] == "appdb,tg_backend,3,1,2,5,0,1,2,500000,transaction,"
    assert "NOTICE:  Console usage" in r.stderr
    assert "ERROR:  SUSPEND is not supported by the tenantgate admin console" in r.stderr
    assert any(l.startswith("appdb,100,250,10000,40000,500000,") for l in lines)
    assert any(l.startswith("C,app,appdb,waiting,127.0.0.1,50123,") for l in lines)  # after the error


def test_psycopg_reads_the_console():
    import psycopg

    listener = _ConsoleListener(make_server())
    dsn = f"host=127.0.0.1 port={listener.port} user=boss dbname=tenantgate sslmode=disable"
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SHOW LISTS").fetchall()[0] == ("databases", 2)
            cur = psycopg.ClientCursor(conn)
            cur.execute("SHOW POOLS")
            assert [d.name for d in cur.description][:3] == ["database", "user", "cl_active"]
            assert cur.fetchall()[0][:3] == ("appdb", "tg_backend", 3)
        with psycopg.connect(dsn) as conn:  # not autocommit: psycopg sends BEGIN first
            with pytest.raises(psycopg.errors.FeatureNotSupported) as e:
                conn.execute("SHOW POOLS")
            assert "autocommit" in e.value.diag.message_hint
    finally:
        listener.close()


# --------------------------------------------------------------------------- end to end through tenantgate


def _psql_rows(proxy, command: str, user: str = "ops", password: str = "ops-pw") -> list[dict[str, str]]:
    import csv

    r = run_psql(proxy.port, command, user=user, password=password, database=proxy.config.admin.database)
    assert r.returncode == 0 and "ERROR" not in r.stderr, r.stderr
    return list(csv.DictReader(r.stdout.splitlines()))


def _startup_error(proxy, user: str, password: str, database: str) -> dict[str, str]:
    from support.proxy_harness import RawClient

    c = RawClient(proxy.host, proxy.port)
    try:
        with pytest.raises(RuntimeError) as e:
            c.startup(user, password, database=database)
    finally:
        c.close()
    import ast

    return ast.literal_eval(str(e.value).split(": ", 1)[1])


class _TenantPassthroughGatekeeper(PassthroughGatekeeper):
    """Forwards every statement, but keeps the user's kind (tenant), so transaction pooling applies."""

    def __init__(self, config):
        super().__init__(config, allow_all=True)

    async def open_session(self, user, startup):
        gate = await super().open_session(user, startup)
        if not hasattr(gate, "backend_settings"):
            gate.backend_settings = lambda: {}  # no proxy-controlled settings (no tenant GUC)
        return gate


def test_end_to_end_with_psql_through_tenantgate(proxy_factory, make_db, pg):  # noqa: F811
    import psycopg

    db, _ = make_db("admincon")
    # a tenant user (transaction pooling applies to tenant sessions) whose statements are forwarded as they are
    proxy = proxy_factory(db, users=[{"name": "app", "password": "app-pw", "tenant": "acme"},
                                     {"name": "ops", "password": "ops-pw", "admin": True}],
                          gatekeeper_factory=_TenantPassthroughGatekeeper,
                          pool={"mode": "transaction", "size": 2})
    with psycopg.connect(proxy.dsn("app", "app-pw"), autocommit=True, application_name="e2e-app") as app:
        for _ in range(3):
            app.execute("SELECT 1").fetchall()

        pools = [p for p in _psql_rows(proxy, "SHOW POOLS") if p["database"] == db]
        assert len(pools) == 1 and pools[0]["pool_mode"] == "transaction" and pools[0]["user"] == "tg_backend"
        assert int(pools[0]["cl_active"]) >= 1
        assert 1 <= int(pools[0]["sv_active"]) + int(pools[0]["sv_idle"]) + int(pools[0]["sv_used"]) <= 2

        clients = [c for c in _psql_rows(proxy, "show clients;") if c["database"] == db]
        assert [(c["user"], c["application_name"], c["type"]) for c in clients] == [("app", "e2e-app", "C")]
        assert clients[0]["addr"] == "127.0.0.1" and int(clients[0]["port"]) > 0
        assert clients[0]["connect_time"].endswith(" UTC")

        servers = [s for s in _psql_rows(proxy, "SHOW SERVERS") if s["database"] == db]
        assert 1 <= len(servers) <= 2
        with psycopg.connect(pg.admin_dsn) as su:
            pids = {r[0] for r in su.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND usename = %s",
                                             (db, "tg_backend"))}
        assert {int(s["remote_pid"]) for s in servers} <= pids

        stats = [s for s in _psql_rows(proxy, "SHOW STATS") if s["database"] == db]
        assert int(stats[0]["total_query_count"]) >= 3 and int(stats[0]["total_xact_count"]) >= 3
        assert int(stats[0]["total_received"]) > 0 and int(stats[0]["total_sent"]) > 0

        config = {r["key"]: r["value"] for r in _psql_rows(proxy, "SHOW CONFIG")}
        assert config["backend.password"] == "********" and config["pool.mode"] == "transaction"
        assert "tg-backend-pw" not in repr(config)

        # the app client is unaffected by the console
        assert app.execute("SELECT 2").fetchone() == (2,)

    # only admin users reach the console, and they reach nothing else
    err = _startup_error(proxy, "app", "app-pw", "tenantgate")
    assert err["S"] == "FATAL" and err["C"] == "28000"
    err = _startup_error(proxy, "ops", "ops-pw", db)
    assert err["S"] == "FATAL" and err["C"] == "28000" and "tenantgate" in err["H"]
    err = _startup_error(proxy, "ops", "wrong", "tenantgate")
    assert err["C"] == "28P01"


def test_reload_failure_is_f0000_and_the_old_config_stays(proxy_factory, make_db):  # noqa: F811
    """RELOAD as PgBouncer answers a failed reload: F0000; here the proxy has no config file."""
    import psycopg

    db, _ = make_db("adminreload")
    proxy = proxy_factory(db, users=[{"name": "ops", "password": "ops-pw", "admin": True}])
    dsn = proxy.dsn("ops", "ops-pw", database=proxy.config.admin.database)
    with psycopg.connect(dsn, autocommit=True) as con:
        with pytest.raises(psycopg.Error) as e:
            con.execute("RELOAD", prepare=False)
        assert e.value.sqlstate == "F0000" and "RELOAD failed" in e.value.diag.message_primary
        assert "no configuration file" in e.value.diag.message_detail
        with pytest.raises(psycopg.Error) as e:
            con.execute("RELOAD now", prepare=False)
        assert e.value.sqlstate == "42601"
        assert con.execute("SHOW VERSION", prepare=False).fetchone()[0].startswith("tenantgate")
