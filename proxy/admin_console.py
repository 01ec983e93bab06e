"""The admin console: PgBouncer's console commands on a virtual database (protocol and dispatch).

PgBouncer users run ``psql -p 6432 -U admin pgbouncer`` and type ``SHOW POOLS;``.
tenantgate offers the same on the database named by ``admin.database`` in the
config (default ``tenantgate``), to users with ``admin: true``::

    psql "host=127.0.0.1 port=6432 user=ops dbname=tenantgate" -c 'SHOW POOLS'

The client session (``proxy/session/``) authenticates the user, checks
that it is an admin, then builds ``AdminConsole(server, write)``, writes
:meth:`AdminConsole.startup_messages` and hands every later client message to
:meth:`AdminConsole.handle` (not while :attr:`AdminConsole.busy`: a PAUSE is
waiting; ``on_idle`` is called when it is done).  No PostgreSQL connection is
involved.

This module is the protocol (simple query only) and the dispatch; the SHOW
results are in :mod:`proxy.admin_show`, the control commands (PAUSE, RESUME,
RECONNECT, KILL_CLIENT, RELOAD, SHUTDOWN, PAUSE/RESUME TENANT) in
:mod:`proxy.admin_control`, the row encoders in :mod:`proxy.wire.rows`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any, Callable

from proxy import __version__
from proxy.admin_control import ControlCommands
from proxy.admin_show import ConsoleError, Result, ShowCommands, config_items, is_secret_key  # noqa: F401
from proxy.policy.lexer import statement_texts
from proxy.seam import SessionRefused, SqlStateError, UserRecord
from proxy.wire import messages as m
from proxy.wire.errors import ProtocolError
from proxy.wire.rows import INT8_OID, TEXT_OID, EMPTY_QUERY_RESPONSE, encode_command_complete  # noqa: F401

log = logging.getLogger("tenantgate.admin")

# tenantgate's version as psql sees it.  libpq reads the leading "15.0" (so psql
# prints no "server major version" warning); the rest says what is answering.
CONSOLE_SERVER_VERSION = f"15.0 (tenantgate {__version__} admin console)"

_EXTENDED_PROTOCOL = frozenset((b"P", b"B", b"D", b"E", b"C"))
_COPY_MESSAGES = frozenset((b"d", b"c", b"f"))  # ignored outside COPY, as PostgreSQL does

# PgBouncer console commands that tenantgate knows but does not offer: they get
# 0A000 (feature not supported) rather than 42601 (syntax error).
_PGBOUNCER_VERBS = frozenset((
    "KILL", "SUSPEND", "SET", "DISABLE", "ENABLE", "WAIT_CLOSE", "SELECT",
))
_TRANSACTION_VERBS = frozenset(("BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT"))
_PGBOUNCER_SHOWS = frozenset((
    "FDS", "SOCKETS", "ACTIVE_SOCKETS", "MEM", "DNS_HOSTS", "DNS_ZONES", "TOTALS", "PEERS",
    "PEER_POOLS", "STATE", "PREPARED_STATEMENTS",
))


# --------------------------------------------------------------------------- statements

def _shorten(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- the console


class AdminConsole(ShowCommands, ControlCommands):
    """One admin console session, sans-IO except for the ``write`` callback.

    ``server``: the ProxyServer (``config`` and ``pool_snapshot()`` are read; the control
    commands call its ``pause``/``resume``/... methods).  ``write(data)``: sends bytes to
    the client.  ``user`` and ``application_name`` (optional) are echoed as ParameterStatus.
    ``on_idle()`` (optional) is called when a command that waited (PAUSE) has answered, so
    the caller hands over the messages that arrived meanwhile.
    """

    COMMANDS = ("HELP", "POOLS", "CLIENTS", "SERVERS", "STATS", "STATS_TOTALS", "STATS_AVERAGES",
                "DATABASES", "USERS", "LISTS", "CONFIG", "VERSION", "TENANTS")

    def __init__(self, server: Any, write: Callable[[bytes], None], *, user: str | None = None,
                 application_name: str | None = None, clock: Callable[[], float] = time.time,
                 on_idle: Callable[[], None] | None = None):
        self.server = server
        self.write = write
        self.on_idle = on_idle
        self._task: asyncio.Task | None = None  # a command that waits (PAUSE) is running
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

    @property
    def busy(self) -> bool:
        """A command is still waiting (PAUSE): hand over no message until ``on_idle``."""
        return self._task is not None

    def close(self) -> None:
        """The client went away: stop waiting (a PAUSE already in force stays)."""
        self.closed = True
        if self._task is not None:
            self._task.cancel()

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
            out = self._run_query(payload)
            if out is not None:
                self.write(out)
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

    def _run_query(self, payload: bytes) -> bytes | None:
        """The whole answer, or None when a command waits (the answer is written when it is done)."""
        try:
            sql = m.decode_query(payload).sql
        except ProtocolError as e:
            return m.encode_error("ERROR", e.sqlstate, e.message) + m.encode_ready_for_query(b"I")
        try:
            statements = statement_texts(sql)  # PostgreSQL's own scanner (proxy.policy.lexer)
        except SqlStateError as e:
            return m.encode_error("ERROR", e.sqlstate, e.message) + m.encode_ready_for_query(b"I")
        if not statements:
            return EMPTY_QUERY_RESPONSE + m.encode_ready_for_query(b"I")
        out: list[bytes] = []
        for i, statement in enumerate(statements):
            try:
                result = self.execute(statement)
            except ConsoleError as e:  # like PostgreSQL: the rest of the Query is not run
                out.append(e.encode())
                break
            if inspect.isawaitable(result):
                self._task = asyncio.get_running_loop().create_task(
                    self._finish_query(out, result, statements[i + 1:]))
                return None
            out.append(result)
        out.append(m.encode_ready_for_query(b"I"))
        return b"".join(out)

    async def _finish_query(self, out: list[bytes], waiting, rest: list[str]) -> None:
        """Wait for a command (PAUSE), then run the rest of the Query and answer."""
        try:
            try:
                out.append(await waiting)
                for statement in rest:
                    result = self.execute(statement)
                    out.append(await result if inspect.isawaitable(result) else result)
            except ConsoleError as e:
                out.append(e.encode())
            except asyncio.CancelledError:
                return
            except Exception:  # noqa: BLE001 - the console must answer, not die
                log.exception("admin console command failed")
                out.append(ConsoleError("XX000", "internal error in tenantgate's admin console").encode())
            out.append(m.encode_ready_for_query(b"I"))
            if not self.closed:
                self.write(b"".join(out))
        finally:
            self._task = None
        if self.on_idle is not None and not self.closed:
            self.on_idle()

    # ---- commands

    def execute(self, statement: str):
        """The response messages for one statement (no ReadyForQuery), or a coroutine giving
        them (PAUSE waits); raises ConsoleError."""
        words = statement.split()
        verb = words[0].upper()
        if verb in self.CONTROL:
            return getattr(self, "cmd_" + verb.lower())(words[1:])
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
        return ("supported commands: " + ", ".join("SHOW " + c for c in cls.COMMANDS) + ", "
                + "PAUSE [db], RESUME [db], PAUSE TENANT t, RESUME TENANT t, RECONNECT [db], KILL_CLIENT id, "
                  "RELOAD, SHUTDOWN")

    def show_help(self) -> bytes:
        detail = ("SHOW HELP|CONFIG|VERSION\n"
                  "SHOW POOLS|CLIENTS|SERVERS|DATABASES|USERS|LISTS|TENANTS\n"
                  "SHOW STATS|STATS_TOTALS|STATS_AVERAGES\n"
                  "PAUSE [<db>]|RESUME [<db>]|PAUSE TENANT <t>|RESUME TENANT <t>\n"
                  "RECONNECT [<db>]|KILL_CLIENT <id>|RELOAD|SHUTDOWN")
        return m.encode_error("NOTICE", "00000", "Console usage", detail, notice=True) + encode_command_complete("SHOW")


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

