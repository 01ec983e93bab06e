"""Helpers for the end-to-end tests that drive the running demo through tenant sessions.

* :func:`pool_dsn`, :func:`token` — the token-tenant user ``pool_app`` and its signed tokens;
* :func:`admin_rows` — a tenant's rows as the backend superuser sees them (before/after checks);
* :func:`fresh_ids` — ids for rows a test inserts, far away from the seed data and other tests;
* :class:`RawClient` — a tiny blocking wire client built on the project's own codec
  (``proxy.wire``) and SCRAM client (``proxy.scram``), for what no driver sends: the
  FunctionCall message, and FATAL errors that arrive while a session is idle.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
from urllib.parse import quote, unquote, urlsplit

import psycopg

from proxy.policy.session import make_token
from proxy.scram import MECHANISM, ScramClientExchange
from proxy.wire import messages as m
from proxy.wire.buffer import ReceiveBuffer

_ids = itertools.count(int.from_bytes(os.urandom(2), "big") * 100 + 5_000_000)


def fresh_ids(n: int = 1) -> list[int]:
    """``n`` integer ids no seed row and no other test run uses."""
    return [next(_ids) for _ in range(n)]


def pool_dsn(demo) -> str:
    """DSN of ``pool_app``, the user that picks its tenant with a signed token."""
    return f"postgresql://pool_app:{quote(demo.password('app:pool'), safe='')}@127.0.0.1:{demo.port}/app?sslmode=disable"


def token(demo, tenant: str, ttl_s: float = 600, key: str | None = None) -> str:
    return make_token(tenant, key if key is not None else demo.password("token_key"), ttl_s=ttl_s)


def admin_rows(demo, table: str, tenant: str) -> list[tuple]:
    """All rows of ``tenant`` in ``table``, straight from PostgreSQL (sorted)."""
    with psycopg.connect(demo.admin, autocommit=True) as conn:
        rows = conn.execute(f"SELECT * FROM {table} WHERE tenant_id = %s", [tenant]).fetchall()
    return sorted(rows, key=repr)


def admin_execute(demo, sql: str, params=None) -> None:
    with psycopg.connect(demo.admin, autocommit=True) as conn:
        conn.execute(sql, params)


class RawClient:
    """One protocol-3 session over a plain socket: startup, SCRAM, then raw messages."""

    def __init__(self, dsn: str, options: dict[str, str] | None = None, timeout: float = 10):
        u = urlsplit(dsn)
        self.user, password = unquote(u.username or ""), unquote(u.password or "")
        self.sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        self._maybe_tls(u)
        self.buf = ReceiveBuffer()
        params = {"user": self.user, "database": u.path.lstrip("/"), "application_name": "tenantgate-e2e-raw"}
        params.update(options or {})
        self.sock.sendall(m.encode_startup(params))
        self._authenticate(password)
        self.startup_messages = self.until_ready()

    def _maybe_tls(self, u) -> None:
        """TLS as libpq does it when the DSN asks for it (the demo's backend_admin: verify-full)."""
        import ssl
        from urllib.parse import parse_qs

        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        mode = q.get("sslmode", "disable")
        if mode in ("disable", "allow", "prefer"):
            return
        self.sock.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest
        if self.sock.recv(1) != b"S":
            raise ConnectionError("the server refused TLS")
        ctx = ssl.create_default_context(cafile=q.get("sslrootcert"))
        ctx.check_hostname = mode == "verify-full"
        if mode == "require":
            ctx.verify_mode = ssl.CERT_NONE
        self.sock = ctx.wrap_socket(self.sock, server_hostname=u.hostname)

    # -- transport
    def recv(self) -> tuple[bytes, bytes]:
        """The next backend message (type, payload); raises ConnectionError at EOF."""
        while True:
            msg = self.buf.next_message()
            if msg is not None:
                return msg
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.buf.feed(data)

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def until_ready(self) -> list[tuple[bytes, bytes]]:
        """Messages up to and including ReadyForQuery."""
        out = []
        while True:
            t, p = self.recv()
            if t == b"E":
                err = m.decode_error_fields(p)
                if err.severity in ("FATAL", "PANIC"):
                    raise RawServerError(err.severity, err.sqlstate, err.message)
            out.append((t, p))
            if t == b"Z":
                return out

    def close(self) -> None:
        try:
            self.send(m.frame(b"X"))
        except OSError:
            pass
        self.sock.close()

    # -- auth
    def _authenticate(self, password: str) -> None:
        scram = None
        while True:
            t, p = self.recv()
            if t == b"E":
                err = m.decode_error_fields(p)
                raise RawServerError(err.severity, err.sqlstate, err.message)
            if t != b"R":
                raise AssertionError(f"unexpected {t!r} during authentication")
            code, data = m.decode_auth(p)
            if code == 0:
                return
            if code == 10:  # AuthenticationSASL
                scram = ScramClientExchange(self.user, password)
                self.send(m.encode_sasl_initial(MECHANISM, scram.client_first()))
            elif code == 11:
                self.send(m.encode_sasl_response(scram.server_first(data)))
            elif code == 12:
                scram.server_final(data)
            elif code == 3:
                self.send(m.encode_password(password))
            else:
                raise AssertionError(f"unsupported authentication request {code}")

    # -- requests
    def query(self, sql: str) -> list[tuple[bytes, bytes]]:
        self.send(m.frame(b"Q", m.cstr(sql)))
        return self.until_ready()

    def function_call(self, oid: int, args: list[bytes | None]) -> list[tuple[bytes, bytes]]:
        """FunctionCall ('F') with text-format arguments and a text result."""
        body = struct.pack("!I", oid) + struct.pack("!hh", 1, 0) + struct.pack("!h", len(args))
        for a in args:
            body += struct.pack("!i", -1) if a is None else struct.pack("!i", len(a)) + a
        body += struct.pack("!h", 0)
        self.send(m.frame(b"F", body))
        return self.until_ready()


class RawServerError(Exception):
    def __init__(self, severity: str, sqlstate: str, message: str):
        super().__init__(f"{severity} {sqlstate}: {message}")
        self.severity, self.sqlstate, self.message = severity, sqlstate, message


def errors(msgs: list[tuple[bytes, bytes]]) -> list[m.ErrorFields]:
    return [m.decode_error_fields(p) for t, p in msgs if t == b"E"]


def data_rows(msgs: list[tuple[bytes, bytes]]) -> list[list[bytes | None]]:
    """DataRow payloads as lists of raw column values."""
    rows = []
    for t, p in msgs:
        if t != b"D":
            continue
        (n,) = struct.unpack_from("!h", p, 0)
        pos, row = 2, []
        for _ in range(n):
            (ln,) = struct.unpack_from("!i", p, pos)
            pos += 4
            if ln < 0:
                row.append(None)
            else:
                row.append(p[pos:pos + ln])
                pos += ln
        rows.append(row)
    return rows


def assert_refused_by_tenantgate(err, sqlstate: str = "42501") -> None:
    """``err`` (psycopg or asyncpg) is tenantgate's refusal, not PostgreSQL's own error.

    PostgreSQL's ErrorResponse always names its source file (field F, e.g. ``aclchk.c``);
    tenantgate's refusals carry none.  So a test passes only when the proxy refused, not when
    the backend (RLS, privileges) happened to stop the statement first."""
    if hasattr(err, "diag"):  # psycopg
        state, source = err.sqlstate, err.diag.source_file
    else:  # asyncpg
        state, source = err.sqlstate, getattr(err, "server_source_filename", None)
    assert state == sqlstate, (state, str(err))
    assert source is None, f"refused by PostgreSQL ({source}), not by tenantgate: {err}"


def pq_call(conn, call) -> tuple[str | None, list[list[bytes | None]]]:
    """Run ``call(pgconn)`` (a libpq call on psycopg's connection, e.g. a protocol-level
    ``prepare`` or ``close_prepared``): (the error's SQLSTATE or None, the rows)."""
    r = call(conn.pgconn)
    state = r.error_field(psycopg.pq.DiagnosticField.SQLSTATE)
    rows = [[r.get_value(i, j) for j in range(r.nfields)] for i in range(r.ntuples)]
    return (state.decode() if state else None), rows
