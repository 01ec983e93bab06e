"""The admin console: PgBouncer's SHOW commands on a virtual database.

PgBouncer users run ``psql -p 6432 -U admin pgbouncer`` and type ``SHOW POOLS;``.
tenantgate offers the same on the database named by ``admin.database`` in the
config (default ``tenantgate``), to users with ``admin: true``::

    psql "host=127.0.0.1 port=6432 user=ops dbname=tenantgate" -c 'SHOW POOLS'

The client session (``proxy/client_session.py``) authenticates the user, checks
that it is an admin, then builds ``AdminConsole(server, write)``, writes
:meth:`AdminConsole.startup_messages` and hands every later client message to
:meth:`AdminConsole.handle`.  No PostgreSQL connection is involved: the rows
come from ``server.pool_snapshot()`` (pools, clients, servers, stats of this
process) and ``server.config``.

Only the simple query protocol is served.  Column names follow PgBouncer's
where tenantgate has the same data, so PgBouncer dashboards and exporters keep
working; columns PgBouncer has and tenantgate cannot fill are left out, never
filled with made-up values.  Everything here is read-only: the console cannot
change the proxy, its pools or its config.
"""

from __future__ import annotations

import re
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from proxy import __version__
from proxy.seam import SessionRefused, SqlStateError, UserRecord
from proxy.wire import messages as m
from proxy.wire.errors import ProtocolError

TEXT_OID = 25
INT8_OID = 20

# tenantgate's version as psql sees it.  libpq reads the leading "15.0" (so psql
# prints no "server major version" warning); the rest says what is answering.
CONSOLE_SERVER_VERSION = f"15.0 (tenantgate {__version__} admin console)"

# When the server does not say when it started, "since start" averages count
# from when this module was first imported (about when the proxy started).
_IMPORTED_AT = time.time()

_EXTENDED_PROTOCOL = frozenset((b"P", b"B", b"D", b"E", b"C"))
_COPY_MESSAGES = frozenset((b"d", b"c", b"f"))  # ignored outside COPY, as PostgreSQL does

# PgBouncer console commands that tenantgate knows but does not offer: they get
# 0A000 (feature not supported) rather than 42601 (syntax error).
_PGBOUNCER_VERBS = frozenset((
    "PAUSE", "RESUME", "RELOAD", "KILL", "KILL_CLIENT", "SUSPEND", "SHUTDOWN", "SET", "DISABLE",
    "ENABLE", "RECONNECT", "WAIT_CLOSE", "SELECT",
))
_TRANSACTION_VERBS = frozenset(("BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT"))
_PGBOUNCER_SHOWS = frozenset((
    "FDS", "SOCKETS", "ACTIVE_SOCKETS", "MEM", "DNS_HOSTS", "DNS_ZONES", "TOTALS", "PEERS",
    "PEER_POOLS", "STATE", "PREPARED_STATEMENTS",
))

_MASK = "********"
_SECRET_WORDS = ("password", "secret", "hmac_key", "dsn", "verifier", "token_key", "private")
_REFERENCE_SUFFIXES = ("_env", "_file", "_files")  # names of env variables / paths, not secrets


# --------------------------------------------------------------------------- wire encoders


def encode_row_description(columns: Sequence[tuple[str, int]]) -> bytes:
    """RowDescription for text-format columns given as (name, type oid)."""
    parts = [struct.pack("!h", len(columns))]
    for name, oid in columns:
        size = 8 if oid == INT8_OID else -1
        parts.append(m.cstr(name) + struct.pack("!ihihih", 0, 0, oid, size, -1, 0))
    return m.frame(b"T", b"".join(parts))


def encode_data_row(values: Sequence[str | None]) -> bytes:
    """DataRow of text values (None is SQL NULL)."""
    parts = [struct.pack("!h", len(values))]
    for v in values:
        if v is None:
            parts.append(struct.pack("!i", -1))
        else:
            b = v.encode()
            parts.append(struct.pack("!i", len(b)) + b)
    return m.frame(b"D", b"".join(parts))


def encode_command_complete(tag: str) -> bytes:
    return m.frame(b"C", m.cstr(tag))


EMPTY_QUERY_RESPONSE = m.frame(b"I")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Result:
    """One SHOW result: columns as (name, type oid) and rows of Python values."""

    columns: tuple[tuple[str, int], ...]
    rows: tuple[tuple[Any, ...], ...]

    def encode(self) -> bytes:
        out = [encode_row_description(self.columns)]
        out += [encode_data_row([_text(v) for v in row]) for row in self.rows]
        out.append(encode_command_complete("SHOW"))
        return b"".join(out)


class ConsoleError(SqlStateError):
    """A statement failed: becomes an ErrorResponse; the connection stays usable."""

    def encode(self) -> bytes:
        return m.encode_error("ERROR", self.sqlstate, self.message, self.detail, self.hint)


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _int(v: Any) -> int:
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        return 0


def _timestamp(epoch: Any) -> str:
    """PgBouncer's timestamp format, in UTC; empty when unknown."""
    if not epoch:
        return ""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(epoch)))
    except (TypeError, ValueError, OverflowError, OSError):
        return ""


def _tls(v: Any) -> str:
    """PgBouncer's ``tls`` column is empty for plain connections."""
    if isinstance(v, str):
        return v
    return "TLS" if v else ""


def _split_us(us: Any) -> tuple[int, int]:
    """Microseconds as PgBouncer shows waits: whole seconds and the microsecond rest."""
    us = max(_int(us), 0)
    return us // 1_000_000, us % 1_000_000


def _cols(spec: str) -> tuple[tuple[str, int], ...]:
    """Column list from "name name:i ...": ``:i`` marks int8 columns, the rest are text."""
    out = []
    for item in spec.split():
        name, _, kind = item.partition(":")
        out.append((name, INT8_OID if kind == "i" else TEXT_OID))
    return tuple(out)


# --------------------------------------------------------------------------- statements

_TOKEN = re.compile(r"""'(?:[^']|'')*'?|"(?:[^"]|"")*"?|--[^\n]*|/\*|\*/|;|[^'";\-/*]+|.""", re.S)


def split_statements(sql: str) -> list[str]:
    """Split a simple Query's text at semicolons outside quotes and comments.

    Comments are dropped; empty statements are left out."""
    statements: list[str] = []
    current: list[str] = []
    depth = 0  # nesting of /* */ comments
    for tok in _TOKEN.findall(sql):
        if depth:
            if tok == "/*":
                depth += 1
            elif tok == "*/":
                depth -= 1
            continue
        if tok == "/*":
            depth = 1
        elif tok.startswith("--"):
            current.append(" ")
        elif tok == ";":
            statements.append("".join(current))
            current = []
        else:
            current.append(tok)
    statements.append("".join(current))
    return [s.strip() for s in statements if s.strip()]


def _shorten(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- the console


class AdminConsole:
    """One admin console session, sans-IO except for the ``write`` callback.

    ``server``: the ProxyServer (``config`` and ``pool_snapshot()`` are read).
    ``write(data)``: sends bytes to the client.  ``user`` and
    ``application_name`` (optional) are echoed as ParameterStatus.
    """

    COMMANDS = ("HELP", "POOLS", "CLIENTS", "SERVERS", "STATS", "STATS_TOTALS", "STATS_AVERAGES",
                "DATABASES", "USERS", "LISTS", "CONFIG", "VERSION")

    def __init__(self, server: Any, write: Callable[[bytes], None], *, user: str | None = None,
                 application_name: str | None = None, clock: Callable[[], float] = time.time):
        self.server = server
        self.write = write
        self.user = user
        self.application_name = application_name
        self.clock = clock
        self.closed = False
        self._skip_to_sync = False  # an extended-protocol message was refused: ignore all until Sync

    # ---- protocol

    def startup_messages(self) -> bytes:
        """ParameterStatus messages psql needs, then ReadyForQuery (idle)."""
        params = {
            "server_version": CONSOLE_SERVER_VERSION,
            "server_encoding": "UTF8",
            "client_encoding": "UTF8",
            "DateStyle": "ISO, MDY",
            "IntervalStyle": "postgres",
            "TimeZone": "UTC",
            "integer_datetimes": "on",
            "standard_conforming_strings": "on",
            "is_superuser": "off",
        }
        if self.user:
            params["session_authorization"] = self.user
        if self.application_name:
            params["application_name"] = self.application_name
        out = []
        for k, v in params.items():
            try:
                out.append(m.encode_parameter_status(k, v))
            except ProtocolError:  # a zero byte in a client-supplied name: leave the parameter out
                pass
        out.append(m.encode_ready_for_query(b"I"))
        return b"".join(out)

    def handle(self, t: bytes, payload: bytes) -> bool:
        """Answer one client message; False means close the connection."""
        if self.closed:
            return False
        if t == b"X":
            self.closed = True
            return False
        if t == b"S":
            self._skip_to_sync = False
            self.write(m.encode_ready_for_query(b"I"))
            return True
        if self._skip_to_sync:
            return True  # as PostgreSQL: everything up to Sync is discarded after an error
        if t == b"Q":
            self.write(self._run_query(payload))
            return True
        if t in _EXTENDED_PROTOCOL:
            self._skip_to_sync = True
            self.write(m.encode_error(
                "ERROR", "0A000", "the tenantgate admin console supports only the simple query protocol",
                hint="use psql, or send plain queries such as SHOW POOLS"))
            return True
        if t == b"F":
            self.write(m.encode_error("ERROR", "0A000", "function calls are not supported by the admin console")
                       + m.encode_ready_for_query(b"I"))
            return True
        if t == b"H" or t in _COPY_MESSAGES:
            return True
        self.closed = True
        self.write(m.encode_error("FATAL", "08P01", f"invalid frontend message type {t[0] if t else 0}"))
        return False

    def _run_query(self, payload: bytes) -> bytes:
        try:
            sql = m.decode_query(payload).sql
        except ProtocolError as e:
            return m.encode_error("ERROR", e.sqlstate, e.message) + m.encode_ready_for_query(b"I")
        statements = split_statements(sql)
        if not statements:
            return EMPTY_QUERY_RESPONSE + m.encode_ready_for_query(b"I")
        out: list[bytes] = []
        for statement in statements:
            try:
                out.append(self.execute(statement))
            except ConsoleError as e:  # like PostgreSQL: the rest of the Query is not run
                out.append(e.encode())
                break
        out.append(m.encode_ready_for_query(b"I"))
        return b"".join(out)

    # ---- commands

    def execute(self, statement: str) -> bytes:
        """The response messages for one statement (no ReadyForQuery); raises ConsoleError."""
        words = statement.split()
        verb = words[0].upper()
        if verb != "SHOW":
            if verb in _TRANSACTION_VERBS:
                raise ConsoleError("0A000", f"{verb} is not supported by the tenantgate admin console",
                                   hint="the admin console has no transactions: connect with autocommit on")
            if verb in _PGBOUNCER_VERBS:
                raise ConsoleError("0A000", f"{verb} is not supported by the tenantgate admin console",
                                   hint=self.supported_hint())
            raise ConsoleError("42601", f'syntax error: unknown admin console command "{_shorten(statement)}"',
                               hint=self.supported_hint())
        if len(words) != 2:
            raise ConsoleError("42601", f'syntax error: "{_shorten(statement)}": SHOW takes exactly one word',
                               hint=self.supported_hint())
        what = words[1].upper()
        if what not in self.COMMANDS:
            code = "0A000" if what in _PGBOUNCER_SHOWS else "42601"
            raise ConsoleError(code, f"SHOW {_shorten(words[1], 30)} is not supported by the tenantgate admin console",
                               hint=self.supported_hint())
        if what == "HELP":
            return self.show_help()
        return getattr(self, "show_" + what.lower())().encode()

    @classmethod
    def supported_hint(cls) -> str:
        return "supported commands: " + ", ".join("SHOW " + c for c in cls.COMMANDS)

    def show_help(self) -> bytes:
        detail = ("SHOW HELP|CONFIG|VERSION\n"
                  "SHOW POOLS|CLIENTS|SERVERS|DATABASES|USERS|LISTS\n"
                  "SHOW STATS|STATS_TOTALS|STATS_AVERAGES")
        return m.encode_error("NOTICE", "00000", "Console usage", detail, notice=True) + encode_command_complete("SHOW")

    def snapshot(self) -> dict[str, list[dict]]:
        """``server.pool_snapshot()``, or an empty one when the server has none."""
        empty: dict[str, list[dict]] = {"pools": [], "clients": [], "servers": [], "stats": []}
        fn = getattr(self.server, "pool_snapshot", None)
        if fn is None:
            return empty
        try:
            snap = fn()
        except Exception as e:  # noqa: BLE001 - the console must answer, not die
            raise ConsoleError("XX000", f"could not read the pool state: {e}") from None
        if not isinstance(snap, dict):
            raise ConsoleError("XX000", "could not read the pool state: pool_snapshot() did not return a dict")
        for k in empty:
            v = snap.get(k)
            empty[k] = list(v) if isinstance(v, (list, tuple)) else []
        if "started_at" in snap:
            empty["started_at"] = snap["started_at"]  # type: ignore[assignment]
        return empty

    def show_pools(self) -> Result:
        cols = _cols("database user cl_active:i cl_waiting:i sv_active:i sv_idle:i sv_used:i sv_login:i "
                     "maxwait:i maxwait_us:i pool_mode")
        rows = []
        for p in self.snapshot()["pools"]:
            wait_s, wait_us = _split_us(p.get("maxwait_us"))
            rows.append((p.get("database", ""), p.get("user", ""), _int(p.get("cl_active")),
                         _int(p.get("cl_waiting")), _int(p.get("sv_active")), _int(p.get("sv_idle")),
                         _int(p.get("sv_used")), _int(p.get("sv_login")), wait_s, wait_us,
                         p.get("pool_mode", "")))
        return Result(cols, tuple(rows))

    def show_clients(self) -> Result:
        cols = _cols("type user database state addr port:i connect_time request_time wait:i wait_us:i "
                     "id tls application_name prepared_statements:i kind pool_mode")
        rows = []
        for c in self.snapshot()["clients"]:
            wait_s, wait_us = _split_us(c.get("wait_us"))
            rows.append(("C", c.get("user", ""), c.get("database", ""), c.get("state", ""), c.get("addr", ""),
                         _int(c.get("port")), _timestamp(c.get("connect_time")), _timestamp(c.get("request_time")),
                         wait_s, wait_us, c.get("id", ""), _tls(c.get("tls")), c.get("application_name") or "",
                         _int(c.get("prepared_statements")), c.get("kind", ""), c.get("pool_mode", "")))
        return Result(cols, tuple(rows))

    def show_servers(self) -> Result:
        cols = _cols("type user database state addr port:i connect_time request_time remote_pid:i tls "
                     "prepared_statements:i link")
        rows = []
        for s in self.snapshot()["servers"]:
            rows.append(("S", s.get("user", ""), s.get("database", ""), s.get("state", ""), s.get("addr", ""),
                         _int(s.get("port")), _timestamp(s.get("connect_time")), _timestamp(s.get("request_time")),
                         _int(s.get("remote_pid")), _tls(s.get("tls")), _int(s.get("prepared_statements")),
                         s.get("client") or ""))
        return Result(cols, tuple(rows))

    def _stats(self) -> list[tuple[str, dict[str, int], dict[str, int]]]:
        """Per database: (name, totals, since-start averages), PgBouncer's units (bytes, µs)."""
        snap = self.snapshot()
        started = snap.get("started_at") or getattr(self.server, "started_at", None) or _IMPORTED_AT
        elapsed = max(self.clock() - float(started), 1.0)
        out = []
        for s in snap["stats"]:
            t = {k: _int(s.get("total_" + k)) for k in
                 ("xact_count", "query_count", "received", "sent", "xact_time_us", "query_time_us",
                  "wait_time_us", "server_assignment_count")}
            assignments = t["server_assignment_count"] or t["xact_count"]
            avg = {
                "xact_count": round(t["xact_count"] / elapsed),
                "query_count": round(t["query_count"] / elapsed),
                "recv": round(t["received"] / elapsed),
                "sent": round(t["sent"] / elapsed),
                "xact_time": t["xact_time_us"] // t["xact_count"] if t["xact_count"] else 0,
                "query_time": t["query_time_us"] // t["query_count"] if t["query_count"] else 0,
                "wait_time": t["wait_time_us"] // assignments if assignments else 0,
            }
            out.append((s.get("database", ""), t, avg))
        return out

    def show_stats(self) -> Result:
        cols = _cols("database total_xact_count:i total_query_count:i total_received:i total_sent:i "
                     "total_xact_time:i total_query_time:i total_wait_time:i avg_xact_count:i avg_query_count:i "
                     "avg_recv:i avg_sent:i avg_xact_time:i avg_query_time:i avg_wait_time:i")
        rows = []
        for db, t, a in self._stats():
            rows.append((db, t["xact_count"], t["query_count"], t["received"], t["sent"], t["xact_time_us"],
                         t["query_time_us"], t["wait_time_us"], a["xact_count"], a["query_count"], a["recv"],
                         a["sent"], a["xact_time"], a["query_time"], a["wait_time"]))
        return Result(cols, tuple(rows))

    def show_stats_totals(self) -> Result:
        cols = _cols("database xact_count:i query_count:i bytes_received:i bytes_sent:i xact_time:i "
                     "query_time:i wait_time:i")
        rows = [(db, t["xact_count"], t["query_count"], t["received"], t["sent"], t["xact_time_us"],
                 t["query_time_us"], t["wait_time_us"]) for db, t, _ in self._stats()]
        return Result(cols, tuple(rows))

    def show_stats_averages(self) -> Result:
        cols = _cols("database xact_count:i query_count:i bytes_received:i bytes_sent:i xact_time:i "
                     "query_time:i wait_time:i")
        rows = [(db, a["xact_count"], a["query_count"], a["recv"], a["sent"], a["xact_time"], a["query_time"],
                 a["wait_time"]) for db, _, a in self._stats()]
        return Result(cols, tuple(rows))

    def show_databases(self) -> Result:
        cols = _cols("name host port:i database force_user pool_size:i server_lifetime:i pool_mode "
                     "current_connections:i current_client_connections:i")
        cfg = getattr(self.server, "config", None)
        backend = getattr(cfg, "backend", None)
        pool_cfg = getattr(cfg, "pool", None)
        rows = []
        for p in self.snapshot()["pools"]:
            name = p.get("database", "")
            servers = sum(_int(p.get(k)) for k in ("sv_active", "sv_idle", "sv_used", "sv_login"))
            clients = sum(_int(p.get(k)) for k in ("cl_active", "cl_waiting"))
            rows.append((name, getattr(backend, "host", ""), _int(getattr(backend, "port", 0)),
                         getattr(backend, "database", None) or name, p.get("user", ""),
                         _int(p.get("size", getattr(pool_cfg, "size", 0))),
                         _int(getattr(pool_cfg, "server_lifetime_s", 0)), p.get("pool_mode", ""), servers, clients))
        return Result(cols, tuple(rows))

    def show_users(self) -> Result:
        cols = _cols("name pool_mode admin")
        cfg = getattr(self.server, "config", None)
        rows = [(u.name, u.pool_mode or "", "yes" if u.admin else "") for u in getattr(cfg, "users", [])]
        return Result(cols, tuple(rows))

    def show_lists(self) -> Result:
        snap = self.snapshot()
        cfg = getattr(self.server, "config", None)
        items = [
            ("databases", len({p.get("database") for p in snap["pools"]})),
            ("users", len(getattr(cfg, "users", []))),
            ("pools", len(snap["pools"])),
            ("used_clients", len(snap["clients"])),
            ("used_servers", len(snap["servers"])),
        ]
        return Result(_cols("list items:i"), tuple(items))

    def show_config(self) -> Result:
        cfg = getattr(self.server, "config", None)
        if cfg is None:
            return Result(_cols("key value default"), ())
        current = config_items(cfg)
        defaults = config_items(type(cfg)())
        rows = [(k, v, defaults.get(k, "")) for k, v in current.items()]
        return Result(_cols("key value default"), tuple(rows))

    def show_version(self) -> Result:
        return Result(_cols("version"), ((f"tenantgate {__version__}",),))


# --------------------------------------------------------------------------- config rendering


def is_secret_key(key: str) -> bool:
    """Whether a dotted config key holds a secret (shown masked).  Fails closed:
    any key whose name mentions a password, DSN, key or secret is masked, except
    names of environment variables and file paths."""
    leaf = key.rsplit(".", 1)[-1].lower()
    if leaf.endswith(_REFERENCE_SUFFIXES):
        return False
    return any(w in leaf for w in _SECRET_WORDS)


def _render(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ", ".join(_render(x) for x in v)
    return str(v)


def config_items(config: Any) -> dict[str, str]:
    """The config as ordered dotted keys -> text; secrets masked, users by name only."""
    data = config.model_dump(by_alias=True, exclude={"users"})
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
            return
        if isinstance(value, dict):
            value = ""
        text = _render(value)
        out[prefix] = (_MASK if text else "") if is_secret_key(prefix) else text

    walk("", data)
    out["users"] = ", ".join(u.name for u in getattr(config, "users", []))
    return out


# --------------------------------------------------------------------------- who may connect where


def refuse_admin_outside_console(user: UserRecord, admin_database: str) -> None:
    """Admin users may use the admin console and nothing else: raise SessionRefused
    (FATAL 28000) when one asks for an ordinary database."""
    if getattr(user, "admin", False):
        raise SessionRefused(
            "28000",
            f'user "{user.name}" is an admin user: it may only connect to the admin console database '
            f'"{admin_database}"',
            hint=f"connect with dbname={admin_database}, or use an application user for data",
        )

