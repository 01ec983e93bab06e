"""One client connection: startup, authentication, and the relay to PostgreSQL.

Lifecycle of a :class:`ClientSession` (an asyncio Protocol):

1. *Startup* (a coroutine, bounded by ``timeouts.startup_s``): SSLRequest /
   GSSENCRequest / CancelRequest / StartupMessage, SCRAM-SHA-256 against the
   user registry, ``gatekeeper.open_session``, the backend connection, the
   gate's ``backend_setup_sql``, then ParameterStatus, tenantgate's own
   BackendKeyData and ReadyForQuery to the client.
2. *Relay* (plain callbacks, no coroutine per message): every client
   message is framed by the receive buffer, classified by the frontend state
   machine, and statements go through ``gate.check``.  Backend bytes are
   scanned for message boundaries only and forwarded in bulk.

Ordering.  Everything the proxy forwards is answered by PostgreSQL in order.
``inflight`` holds one entry per forwarded Query / Execute / Sync and per
synthetic reply (a refused simple Query or FunctionCall), so a synthetic
reply is written exactly where PostgreSQL's would have been.  A statement
refused inside the extended protocol is replaced by a *marker* message that
makes PostgreSQL fail at that very position (so the pipeline aborts exactly
as it would for a real error); the marker's error is swapped for the
refusal's ErrorResponse on the way back.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Callable

from proxy import backstop, varcache
from proxy.backend_link import BackendConnection, BackendError, connect_backend, send_cancel
from proxy.metrics import (
    BACKEND_CONNECTIONS,
    BYTES_TOTAL,
    CLIENT_CONNECTIONS,
    CLIENT_CONNECTIONS_TOTAL,
    PROTOCOL_ERRORS_TOTAL,
    QUERY_DURATION_SECONDS,
    STATEMENTS_REFUSED_TOTAL,
    STATEMENTS_TOTAL,
    TLS_HANDSHAKE_FAILED,
    TLS_HANDSHAKE_OK,
)
from proxy.pool import PoolTimeout, ServerConn
from proxy import statement_offload
from proxy.copy_audit import CopyDigest
from proxy.holds import hold_if_paused
from proxy.statement_ledger import COMPLETIONS, LedgerError, StatementLedger, Wait
from proxy.session_events import count_tenant_statements, note_connection, note_refusal
from proxy.scram import ScramError, ScramServerExchange, mock_verifier, parse_verifier
from proxy.seam import (
    Forward,
    Origin,
    Outcome,
    Refuse,
    SessionKind,
    SessionRefused,
    StartupInfo,
)
from proxy.wire import messages as m
from proxy.wire.backend import (
    AUDIT_INTERESTING,
    COMMAND_COMPLETE,
    COPY_BOTH_RESPONSE,
    COPY_IN_RESPONSE,
    EMPTY_QUERY,
    ERROR_RESPONSE,
    PORTAL_SUSPENDED,
    PARAMETER_STATUS,
    READY_FOR_QUERY,
    BackendScanner,
)
from proxy.wire.buffer import AUTH_MESSAGE_MAX, PREAUTH_BUFFER_MAX, ReceiveBuffer
from proxy.wire.errors import ProtocolError
from proxy.policy.startup_settings import StartupRefusal, split_startup
from proxy.wire.frontend import Action, FrontendState, Phase
from proxy.wire.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    parse_options,
    parse_startup_packet,
)

if TYPE_CHECKING:  # pragma: no cover
    from proxy.server import ProxyServer

log = logging.getLogger("tenantgate.session")


# Fire-and-forget tasks (cancel delivery, audit, gate close): the event loop keeps only weak
# references to tasks, so one that is waiting could be garbage-collected mid-flight ("Task was
# destroyed but it is pending"); this set holds them until they finish.
_BACKGROUND: set[asyncio.Task] = set()


def _spawn(loop: asyncio.AbstractEventLoop, coro) -> asyncio.Task:
    task = loop.create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return task


MARKER_PREFIX = "tenantgate_refused_"
UNDEFINED_TABLE = "42P01"
#: how long a statement naming an unknown relation waits for a fresh catalog snapshot
CATALOG_RECHECK_TIMEOUT_S = 10.0
FUNCTION_CALL_REFUSAL = Refuse(
    "42501",
    "FunctionCall messages are not allowed: they call functions without SQL the proxy could inspect",
)

_BYTES_IN = BYTES_TOTAL.labels(direction="client_to_server")
_BYTES_OUT = BYTES_TOTAL.labels(direction="server_to_client")
_ZERO = b"I"
PARSE_COMPLETE = ord("1")
DATA_ROW = ord("D")
BIND_COMPLETE = ord("2")
CLOSE_COMPLETE = ord("3")
#: what every session must see: command tags (audit, DEALLOCATE ALL), and ParseComplete,
#: BindComplete and CloseComplete (the statement ledger is updated by PostgreSQL's replies)
POOLED_INTERESTING = AUDIT_INTERESTING | COMPLETIONS
#: while a swallowed query (the settings probe) is answered: everything
EVERYTHING = frozenset(range(256))
_EXTENDED_TYPES = frozenset((b"P", b"B", b"D", b"E", b"C"))  # Flush (H) leaves nothing pending by itself
NO_STATEMENT = "tenantgate_no_such_statement"
_unpack_i32 = struct.Struct("!I").unpack_from

# Per-session metrics are added up locally and handed to prometheus_client in
# bulk (its counters and histograms take a lock per call): at least every
# _METRICS_FLUSH_EVERY statements or _METRICS_FLUSH_S seconds of a busy
# session, and when the session ends.
_METRICS_FLUSH_EVERY = 32
_METRICS_FLUSH_S = 1.0
_DURATION_BOUNDS: tuple[float, ...] = tuple(getattr(QUERY_DURATION_SECONDS, "_upper_bounds", ()))
_DURATION_BATCHED = (bool(_DURATION_BOUNDS) and _DURATION_BOUNDS[-1] == float("inf")
                     and hasattr(QUERY_DURATION_SECONDS, "_buckets") and hasattr(QUERY_DURATION_SECONDS, "_sum"))


#: query durations not yet handed to prometheus_client: [counts per bucket, sum, n]
#: (one per process: every session of the event loop adds to it)
_DURATIONS: list = [[0] * len(_DURATION_BOUNDS), 0.0, 0]


def _flush_durations(counts: list[int], total: float) -> None:
    """Add locally counted histogram buckets (non-cumulative, like prometheus_client keeps them)."""
    buckets = QUERY_DURATION_SECONDS._buckets
    for i, c in enumerate(counts):
        if c:
            buckets[i].inc(c)
            counts[i] = 0
    QUERY_DURATION_SECONDS._sum.inc(total)


class _Entry:
    """Something PostgreSQL (or the proxy) still has to answer, in order.

    kind: b"Q" simple query, b"X" Execute, b"S" Sync, b"R" synthetic reply.
    """

    __slots__ = ("kind", "decision", "handle", "t0", "sqlstate", "tag", "data", "audited", "copy")

    def __init__(self, kind: bytes, decision: Forward | None = None, handle: Any = None, data: bytes = b""):
        self.kind = kind
        self.decision = decision
        self.handle = handle
        self.t0 = time.perf_counter()
        self.sqlstate: str | None = None
        self.tag: str | None = None
        self.data = data
        self.audited = False
        self.copy: CopyDigest | None = None  # the data of an audited COPY FROM STDIN


class ClientSession(asyncio.Protocol):
    # slots, not a __dict__: an idle pooled session is kept small (10,000 idle clients per process)
    __slots__ = (
        "_after_tasks",
        "_attach_t0",
        "_attach_task",
        "_held_task",
        "_backend_fatal",
        "_binder",
        "_bkey",
        "_blocked",
        "_bwrite",
        "_bytes_in",
        "_bytes_out",
        "_client_connected",
        "_console",
        "_copy_check",
        "_copy_failed",
        "_counted",
        "_held",
        "_idle_timer",
        "_idle_tx_s",
        "_last_sconn",
        "_m_forwarded",
        "_m_refused",
        "_marker_seq",
        "_markers",
        "_metrics_t",
        "_n_forwarded",
        "_offloaded",
        "_out",
        "_parse_fifo",
        "_pinned",
        "_pool_marks",
        "_hold_seg",
        "_ledger",
        "_probe_names",
        "_probe_values",
        "_seg_done",
        "_seg_sent",
        "_setting_stmts",
        "_settings_dirty",
        "_startup_task",
        "_stmt_names",
        "_stmt_parse",
        "_stmt_seq",
        "_swallowing",
        "_unnamed_parse",
        "_unnamed_single",
        "_unnamed_spent",
        "_cancels_pending",
        "_unsynced",
        "_waiter",
        "_wanted",
        "_connect_settings",
        "_refresh_retried",
        "_settings_reset",
        "_wanted_epoch",
        "application_name",
        "audited",
        "backend",
        "bproto",
        "buf",
        "closed",
        "config",
        "connected_at",
        "database",
        "fstate",
        "gate",
        "inflight",
        "key",
        "kind_label",
        "idle_ticks",
        "loop",
        "pool",
        "pooled",
        "relaying",
        "request_time",
        "scanner",
        "sconn",
        "server",
        "session_id",
        "tls",
        "transport",
        "tx_status",
        "user",
    )

    def __init__(self, server: "ProxyServer"):
        self.server = server
        self.config = server.config
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # before authentication: messages capped like PostgreSQL's (raised once authenticated)
        self.buf = ReceiveBuffer(min(AUTH_MESSAGE_MAX, self.config.limits.max_message_bytes))
        self.fstate = FrontendState()
        self.session_id = secrets.token_hex(8)
        self.kind_label = "unauthenticated"
        self.relaying = False
        self.closed = False
        self.tls = False
        self.user: str | None = None
        self.gate = None
        self.audited = False
        self.backend: BackendConnection | None = None
        self.bproto = None
        self.scanner: BackendScanner | None = None
        self.inflight: list[_Entry] = []  # oldest first (a list: an idle session stays small)
        self.tx_status = _ZERO
        self.key: tuple[int, int] | None = None
        self._waiter: asyncio.Future | None = None
        self._startup_task: asyncio.Task | None = None
        self._out: list[bytes] = []
        self._blocked = False
        self._held: tuple[bytes, bytes] | None = None  # a copy message waiting for CopyInResponse
        # statements and portals as PostgreSQL's replies confirm them (proxy/statement_ledger.py)
        self._ledger = StatementLedger()
        self._hold_seg = 0  # a held message waits for the replies of this Sync segment
        self._offloaded: tuple[bytes, Any] | None = None  # (payload, decision) analysed in the worker thread
        self._copy_check = None
        self._copy_failed = False
        self._markers: list[tuple[int, bytes, bytes]] = []
        self._marker_seq = 0
        self._seg_sent = 0
        self._seg_done = 0
        self._backend_fatal = False
        self._client_connected = False
        self._counted = False
        self._after_tasks: set[asyncio.Task] | None = None  # audit_after tasks still running
        self._bytes_in = 0  # added to the byte counters at each ReadyForQuery and at close
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_tx_s = self.config.timeouts.idle_in_transaction_s
        self._bwrite: Callable[[bytes], None] | None = None  # backend transport.write once relaying
        self._bytes_out = 0
        self._pool_marks = (0, 0)  # (_bytes_in, _bytes_out) already counted for the pool
        self._n_forwarded = 0  # statements forwarded since the last metrics flush
        self._metrics_t = time.perf_counter()
        self.database: str | None = None
        self.application_name: str | None = None
        self.connected_at = self.request_time = time.time()
        self.idle_ticks = 0  # seconds of silence counted by the server's sweeper (pool.client_idle_timeout_s)
        # transaction pooling (pool.mode: transaction): the backend is borrowed per transaction
        self.pooled = False
        self.pool = None
        self.sconn: ServerConn | None = None  # the pooled connection while lent to this session
        self._last_sconn: ServerConn | None = None
        self._wanted: dict[str, str] = {}  # settings this session's connection must have (varcache)
        self._connect_settings: dict[str, str] = {}  # connection-time settings: RESET ALL's values
        self._settings_reset = False  # a RESET ALL / DISCARD ALL ran since the last read-back
        self._refresh_retried: bytes | None = None  # the message re-checked after a catalog refresh
        self._bkey: bytes | None = None  # the backstop key, when the gate binds connections (proxy/backstop.py)
        self._binder = None  # session mode: the backend connection's BackendBinder
        self._wanted_epoch = None  # the gate's tenant_epoch _wanted was last updated for
        self._probe_names: tuple[str, ...] = ()
        self._probe_values: list | None = None
        self._swallowing = False  # the settings probe is being answered
        self._pinned = False  # session state on the connection: keep it (SQL PREPARE, WITH HOLD)
        self._unsynced = False  # extended-protocol messages sent without their Sync yet
        self._settings_dirty = False  # a SET ran since the connection was lent
        self._stmt_names: dict[str, str] = {}  # client statement name -> server statement name
        self._stmt_parse: dict[str, bytes] = {}  # server statement name -> its Parse message
        self._stmt_seq = 0
        self._unnamed_parse: bytes | None = None  # this client's unnamed statement (Parse message)
        # server names of statements that change settings ("" for the unnamed one): each Bind of
        # one makes a pooled session read its settings back
        self._setting_stmts: set[str] | None = None
        # the unnamed statement is a tenant switch: it runs once
        self._unnamed_single = False
        self._unnamed_spent = False
        self._cancels_pending = 0  # CancelRequests on their way to the borrowed connection
        self._parse_fifo: list[tuple[int, bool, str | None]] = []  # (segment, swallow?, name), oldest first
        self._attach_t0 = 0.0
        self._attach_task: asyncio.Task | None = None
        self._held_task: asyncio.Task | None = None  # PAUSE: waiting for RESUME (proxy/holds.py)
        self._console = None  # the admin console (SHOW POOLS, ...) instead of a backend

    # ------------------------------------------------------------------ asyncio callbacks (client socket)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._client_connected = True
        self.server.session_started(self)
        self._startup_task = self.loop.create_task(self._run_startup())

    def data_received(self, data: bytes) -> None:
        self.idle_ticks = 0
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        self._bytes_in += len(data)
        self.buf.feed(data)
        if self.relaying:
            self._process_client()
        elif len(self.buf) > PREAUTH_BUFFER_MAX:
            # a client that has not authenticated (or is waiting for its session to open) has
            # no reason to send more than one message ahead: do not buffer for it
            PROTOCOL_ERRORS_TOTAL.labels(reason="too_long").inc()
            note_connection(self, "protocol_error", "08P01", "too much data before the session started")
            self._fatal("08P01", "invalid startup sequence: too much data sent before the session started")
        else:
            w = self._waiter
            if w is not None and not w.done():
                w.set_result(None)

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self._client_connected = False
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        self._close(cancel_running=True)

    def pause_writing(self) -> None:  # client is slow: stop reading results
        if self.bproto is not None and self.bproto.transport is not None:
            self.bproto.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.bproto is not None and self.bproto.transport is not None and not self.bproto.closed:
            self.bproto.transport.resume_reading()

    # ------------------------------------------------------------------ startup

    async def _read(self, fn):
        while True:
            x = fn()
            if x is not None:
                return x
            if not self._client_connected:
                raise ConnectionResetError("client went away")
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def _read_auth_message(self) -> bytes:
        t, payload = await self._read(self.buf.next_message)
        if t == b"X":
            raise ConnectionResetError("client terminated during authentication")
        if t != b"p":
            raise ProtocolError(f"expected SASL response, got message type {t[0]}", reason="auth")
        return payload

    async def _run_startup(self) -> None:
        try:
            async with asyncio.timeout(self.config.timeouts.startup_s):
                await self._startup()
        except TimeoutError:
            note_connection(self, "startup_timeout", "08P01")
            PROTOCOL_ERRORS_TOTAL.labels(reason="startup_timeout").inc()
            self._fatal("08P01", f"startup timeout: the connection did not complete startup within "
                        f"{self.config.timeouts.startup_s:g} s")
        except ProtocolError as e:
            note_connection(self, "protocol_error", e.sqlstate, e.message)
            self._protocol_fatal(e)
        except _Fatal as e:
            note_connection(self, e.outcome, e.sqlstate, e.message)
            self._fatal(e.sqlstate, e.message, e.detail, e.hint)
        except (ConnectionError, asyncio.CancelledError):
            self._close()
        except Exception:  # never let one client crash the proxy
            log.exception("session %s: unexpected error during startup", self.session_id)
            note_connection(self, "internal_error", "XX000")
            self._fatal("XX000", "internal error in tenantgate during connection startup")

    async def _startup(self) -> None:
        server = self.server
        while True:
            payload = await self._read(self.buf.next_startup)
            pkt = parse_startup_packet(payload)
            if isinstance(pkt, SSLRequest):
                ctx = server.tls_context
                if ctx is None or self.tls:
                    self.transport.write(b"N")
                    continue
                if len(self.buf):
                    raise ProtocolError("received unencrypted data after SSL request", reason="tls")
                self.transport.write(b"S")
                try:
                    self.transport = await self.loop.start_tls(self.transport, self, ctx, server_side=True)
                except (OSError, ConnectionError, Exception) as e:  # handshake failures close the socket
                    log.info("session %s: TLS handshake failed: %s", self.session_id, e)
                    TLS_HANDSHAKE_FAILED.inc()
                    raise ConnectionResetError("TLS handshake failed")
                TLS_HANDSHAKE_OK.inc()
                self.tls = True
                continue
            if isinstance(pkt, GSSENCRequest):
                self.transport.write(b"N")
                continue
            if isinstance(pkt, CancelRequest):
                server.cancels.cancel(pkt.pid, pkt.secret)
                note_connection(self, "cancel_request")
                self._close()
                return
            assert isinstance(pkt, StartupMessage)
            break
        await self._authenticate_and_connect(pkt)

    async def _authenticate_and_connect(self, pkt: StartupMessage) -> None:
        cfg = self.config
        server = self.server
        params = pkt.params
        if cfg.tls.required and not self.tls:
            raise _Fatal("28000", "tenantgate requires TLS: connect with sslmode=require or stronger", outcome="no_tls")
        if server.active_sessions > cfg.limits.max_clients:
            raise _Fatal("53300", "sorry, too many clients already", outcome="too_many_clients")
        if server.draining:
            raise _Fatal("57P03", "tenantgate is shutting down", outcome="shutting_down")
        if params.get("replication", "false").lower() not in ("false", "0", "off", "no"):
            raise _Fatal("0A000", "replication connections are not supported by tenantgate", outcome="replication")
        user = pkt.user
        self.user = user
        self.database = pkt.database
        record = await server.gatekeeper.users.lookup(user)
        peer = self.transport.get_extra_info("peername")
        client_addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "unix"
        guard = getattr(server.gatekeeper, "auth_guard", None)  # operator throttling (proxy.control.auth_guard)
        if guard is not None:
            try:
                await guard.before(user, record, client_addr)
            except SessionRefused as e:
                raise _Fatal(e.sqlstate, e.message, e.detail, e.hint, outcome="auth_locked")
        verifier = None
        if record is not None:
            try:
                verifier = parse_verifier(record.scram_verifier)
            except ScramError:
                log.error("user %s has an invalid SCRAM verifier", user)
        exchange = ScramServerExchange(verifier or mock_verifier(user), always_fail=verifier is None)
        self.transport.write(m.encode_auth_sasl(["SCRAM-SHA-256"]))
        mech, first = m.decode_sasl_initial(await self._read_auth_message())
        if mech != "SCRAM-SHA-256":
            raise ProtocolError("client selected an invalid SASL authentication mechanism", reason="auth")
        auth_failed = _Fatal("28P01", f'password authentication failed for user "{user}"', outcome="auth_failed")
        try:
            server_first = exchange.client_first(first)
            self.transport.write(m.encode_auth(m.AUTH_SASL_CONTINUE, server_first))
            final = await self._read_auth_message()
            server_final = exchange.client_final(final)
        except ScramError:
            if guard is not None:
                await guard.failed(user, record, client_addr)
            raise auth_failed
        self.kind_label = getattr(record.kind, "value", "unknown")  # authenticated: label refusals by kind
        self.buf.max_length = cfg.limits.max_message_bytes
        self.transport.write(m.encode_auth(m.AUTH_SASL_FINAL, server_final) + m.encode_auth(m.AUTH_OK))
        if pkt.database == cfg.admin.database:
            self._start_admin_console(record)
            return

        # connection-time settings (startup packet and options=-c): the SET-able ones are applied
        # as PostgreSQL would, tenantgate.* go to the gate, anything else refuses the connection
        passthrough = record is not None and record.kind is SessionKind.PASSTHROUGH
        try:
            startup = split_startup(params, parse_options(params.get("options", "")), strict=not passthrough)
        except StartupRefusal as e:
            raise _Fatal(e.sqlstate, e.message, None, e.hint, outcome="refused")
        if cfg.backend.database and pkt.database != cfg.backend.database:
            # tenantgate fronts one database: any other name does not exist here (as in PostgreSQL)
            raise _Fatal("3D000", f'database "{pkt.database}" does not exist', None,
                         f'connect to database "{cfg.backend.database}"', outcome="refused")
        self.application_name = startup.settings.get("application_name")
        info = StartupInfo(
            user=user, database=pkt.database, client_addr=client_addr, options=startup.gate_options,
            application_name=self.application_name, session_id=self.session_id, tls=self.tls,
        )
        try:
            gate = await server.gatekeeper.open_session(record, info)
        except SessionRefused as e:
            raise _Fatal(e.sqlstate, e.message, e.detail, e.hint, outcome="refused")
        self.gate = gate
        self._bkey = backstop.key_for(cfg) if hasattr(gate, "backstop_binding") else None
        if self._bkey is not None and hasattr(gate, "backstop_bind"):
            gate.backstop_bind = self._backstop_call
        self.audited = bool(gate.audited)
        self.kind_label = getattr(gate.kind, "value", str(gate.kind))
        gate.set_terminator(self._terminator)

        forwarded = startup.settings
        database = cfg.backend.database or pkt.database
        if gate.kind is SessionKind.TENANT and cfg.pool_mode_for(user, pkt.database) == "transaction":
            backend = await self._start_pooled(gate, database, forwarded)
            if backend is None:
                return
            status = b"I"
        else:
            try:
                backend = await connect_backend(cfg.backend, database, forwarded)
            except BackendError as e:
                raise _Fatal(e.sqlstate, e.message, e.detail, outcome="backend_unavailable")
            self.backend = backend
            self.bproto = backend.protocol
            BACKEND_CONNECTIONS.inc()
            if self.closed:  # client vanished while we were connecting
                self._close()
                return
            setup = list(gate.backend_setup_sql)
            if self._bkey is not None:  # the PostgreSQL backstop: bind before anything else runs
                setup.insert(0, await self._backstop_setup(backend, gate))
            status = await self._run_setup_sql(backend, setup)

        self.key = server.cancels.register(self)
        out = [m.encode_parameter_status(k, v) for k, v in backend.parameters.items()]
        out.append(m.encode_backend_key_data(*self.key))
        out.append(m.encode_ready_for_query(status))
        self.tx_status = status
        self.transport.write(b"".join(out))
        gate.on_ready_for_query(status)
        note_connection(self, "accepted")
        CLIENT_CONNECTIONS.labels(kind=self.kind_label).inc()
        self._counted = True
        self._m_forwarded = STATEMENTS_TOTAL.labels(kind=self.kind_label, result="forwarded")
        self._m_forwarded = count_tenant_statements(self._m_forwarded, self)  # metrics.tenant_labels
        self._m_refused = STATEMENTS_TOTAL.labels(kind=self.kind_label, result="refused")

        bp = self.bproto
        bp.on_lost = self._backend_lost
        bp.on_pause_writing = self._pause_client
        bp.on_resume_writing = self._resume_client
        self.scanner = BackendScanner(POOLED_INTERESTING)
        self._bwrite = bp.transport.write
        self.relaying = True
        self._startup_task = None  # done: do not keep the finished task alive
        self.buf.compact()
        bp.start_relay(self._on_backend_data)
        self._process_client()
        if self.pooled:
            self._maybe_release()

    # ------------------------------------------------------------------ transaction pooling

    async def _start_pooled(self, gate, database: str, forwarded: dict[str, str]) -> BackendConnection | None:
        """Transaction mode: borrow a pooled connection for the startup (settings applied, their
        ParameterStatus reported to the client); it goes back at the first idle ReadyForQuery."""
        self.pooled = True
        self.pool = self.server.pools.get(database)
        settings = self._gate_settings()
        names = tuple(getattr(gate, "tracked_parameters", ())) + tuple(sorted(settings))
        self._probe_names = self.pool.probe_names.setdefault(names, names)  # one shared tuple per pool
        self._connect_settings = {k.lower(): v for k, v in forwarded.items()}
        self._wanted = dict(self._connect_settings)
        self._wanted.update(settings)
        gate.pooled = True  # RESET ALL / DISCARD ALL are followed by a settings read-back
        try:
            sc = await self.pool.acquire(self.config.pool.queue_timeout_s)
        except PoolTimeout as e:
            raise _Fatal("53300", str(e), hint="try again later, or raise pool.size", outcome="pool_timeout")
        except BackendError as e:
            raise _Fatal(e.sqlstate, e.message, e.detail, outcome="backend_unavailable")
        try:
            await self._sync_server(sc)
        except BackendError as e:
            self.pool.discard(sc)
            raise _Fatal(e.sqlstate, "session setup on the database server failed", detail=e.message,
                         outcome="setup_failed")
        except BaseException:
            self.pool.discard(sc)
            raise
        if self.closed:
            self.pool.release(sc)
            return None
        self._bind_server(sc, start=False)
        return sc.conn

    async def _sync_server(self, sc: ServerConn) -> None:
        """Give a borrowed connection this session's settings (one round trip, only when they differ)."""
        pool = self.pool
        if pool.baseline is None:
            names = self._probe_names
            values = await _server_query(sc.conn, varcache.probe_sql(names)) if names else []
            if pool.baseline is None:
                pool.baseline = {n: v.decode() for n, v in zip(names, values) if v is not None}
        to_set, to_reset = varcache.changes(sc.state, self._wanted, pool.baseline)
        if to_set or to_reset:
            sc.unnamed_owner = None  # a simple Query drops the unnamed statement
            bind = None
            if backstop.BINDING_SETTING in to_set or backstop.BINDING_SETTING in to_reset:
                bind = (await self._server_binder(sc)).call_value
            await _server_query(sc.conn, varcache.apply_sql(to_set, to_reset, bind))
        sc.state = dict(self._wanted)

    def _gate_settings(self) -> dict[str, str]:
        """The gate's backend settings plus, with the backstop configured, its binding."""
        settings = self.gate.backend_settings()
        if self._bkey is not None:
            settings[backstop.BINDING_SETTING] = backstop.binding_value(*self.gate.backstop_binding())
        return settings

    async def _server_binder(self, sc: ServerConn) -> backstop.BackendBinder:
        binder = sc.binder
        if binder is None:
            row = await _server_query(sc.conn, backstop.IDENTITY_SQL)
            binder = sc.binder = backstop.BackendBinder.from_identity_row(self._bkey, row)
        return binder

    def _backstop_call(self, tenant: str | None, mode: str, local: bool) -> str | None:
        """The gate's hook for a tenant switch: a bind call for the current backend connection, or
        None when the proxy rebinds by itself (transaction pooling: at the settings probe)."""
        if self.pooled:
            if not local:
                return None
            binder = self.sconn.binder if self.sconn is not None else None
        else:
            binder = self._binder
        return binder.call(tenant, mode, local) if binder is not None else None

    async def _backstop_setup(self, backend: BackendConnection, gate) -> str:
        """Session mode: the statement binding the new backend connection (its identity read first)."""
        try:
            row = await _server_query(backend, backstop.IDENTITY_SQL)
            self._binder = backstop.BackendBinder.from_identity_row(self._bkey, row)
        except (BackendError, backstop.BackstopError) as e:
            raise _Fatal("28000", "tenantgate could not bind the database connection to the tenant",
                         detail=getattr(e, "message", str(e)), hint="apply deploy/postgres/bootstrap.sql with the "
                         "proxy's backstop key (config backstop.key)", outcome="setup_failed")
        return self._binder.sql(*gate.backstop_binding())

    def _bind_server(self, sc: ServerConn, *, start: bool = True) -> None:
        self.sconn = sc
        self._last_sconn = sc
        sc.client = self
        backend = self.backend = sc.conn
        bp = self.bproto = backend.protocol
        self._attach_t0 = time.perf_counter()
        self.request_time = time.time()
        if start:
            bp.on_lost = self._backend_lost
            bp.on_pause_writing = self._pause_client
            bp.on_resume_writing = self._resume_client
            self._bwrite = bp.transport.write
            bp.start_relay(self._on_backend_data)

    def _attach(self) -> bool:
        """Borrow a connection for what the client sent; True when attached right away."""
        gate = self.gate
        epoch = getattr(gate, "tenant_epoch", None)
        wanted = self._wanted
        if epoch is None or epoch != self._wanted_epoch:  # the tenant may have changed
            wanted.update(self._gate_settings())
            self._wanted_epoch = epoch
        pool = self.pool
        sc = pool.take_idle(self._last_sconn, wanted)
        if sc is not None:
            if sc.state == wanted or varcache.changes(sc.state, wanted, pool.baseline or {}) == ({}, []):
                self._bind_server(sc)
                return True
        self._blocked = True
        self._pause_client()
        self._attach_task = self.loop.create_task(self._attach_slow(sc))
        return False

    async def _attach_slow(self, sc: ServerConn | None) -> None:
        pool = self.pool
        try:
            if sc is None:
                sc = await pool.acquire(self.config.pool.queue_timeout_s)
            await self._sync_server(sc)
        except PoolTimeout as e:
            self._fatal("53300", str(e), hint="try again later, or raise pool.size")
            return
        except BackendError as e:
            if sc is not None:
                pool.discard(sc)
            self._fatal(e.sqlstate, "could not prepare a database connection for this session", e.message)
            return
        except asyncio.CancelledError:
            if sc is not None:
                pool.discard(sc)
            return
        except Exception:
            log.exception("session %s: attaching a pooled connection failed", self.session_id)
            if sc is not None:
                pool.discard(sc)
            self._fatal("XX000", "internal error in tenantgate")
            return
        finally:
            self._attach_task = None
        if self.closed:
            pool.release(sc)
            return
        self._bind_server(sc)
        self._blocked = False
        self._resume_client()
        self._process_client()

    def _maybe_release(self) -> None:
        """Give the connection back when nothing is open on it (transaction mode)."""
        sc = self.sconn
        if (sc is None or self._pinned or self.closed or self.tx_status != b"I" or self.inflight
                or self._blocked or self._unsynced or self._out or self._held is not None
                or self.fstate.phase is not Phase.READY or not self.scanner.at_boundary):
            return
        if self._cancels_pending:
            # a cancel is on its way to this connection: hold the client's next messages and give
            # the connection back only once the cancel has been delivered (then queue as usual)
            self._blocked = True
            return
        if self._settings_dirty:
            self._settings_dirty = False
            self._send_probe()
            return
        self._detach_server()
        self._count_pool_bytes()
        self.pool.release(sc, xact_s=time.perf_counter() - self._attach_t0)

    def _detach_server(self) -> None:
        sc = self.sconn
        self.sconn = None
        self.backend = None
        self.bproto = None
        self._bwrite = None
        self._parse_fifo.clear()
        sc.client = None

    def _send_probe(self) -> None:
        """After a SET: read the settings back, so they follow the client to other connections."""
        self._probe_values = None
        self.sconn.unnamed_owner = None  # a simple Query drops the unnamed statement
        self._swallowing = True
        self.scanner.interesting = EVERYTHING
        self.inflight.append(_Entry(b"W"))
        self._seg_sent += 1
        sql = varcache.probe_sql(self._probe_names)
        if self._settings_reset:
            # RESET ALL / DISCARD ALL ran: put back what PostgreSQL's reset values would be (the
            # connection-time settings) and the proxy's own, before anything else runs here
            self._settings_reset = False
            restore = dict(self._connect_settings)
            restore.update(self.gate.backend_settings())
            if restore:
                sql = f"{varcache.apply_sql(restore, ())}; {sql}"
        binder = self.sconn.binder if self._bkey is not None else None
        if binder is not None:  # a SET may have switched the tenant: bind before reading back
            sql = f"{binder.sql(*self.gate.backstop_binding())}; {sql}"
        self._bwrite(m.encode_query(sql))

    def _swallow(self, t: int, payload: bytes, out: list[bytes]) -> None:
        """A message answering the settings probe (never shown to the client)."""
        if t == DATA_ROW:
            self._probe_values = m.decode_data_row(payload)
        elif t == PARAMETER_STATUS:
            k, v = m.decode_parameter_status(payload)
            self.backend.parameters[k] = v
        elif t == READY_FOR_QUERY:
            inflight = self.inflight
            inflight.pop(0)
            self._ledger.ready(self._seg_done + 1, self.tx_status)
            self._segment_done()
            self._swallowing = False
            while inflight and inflight[0].kind == b"R":  # refusals the client sent meanwhile
                out.append(inflight.pop(0).data + m.encode_ready_for_query(self.tx_status))
            self.scanner.interesting = POOLED_INTERESTING
            values = self._probe_values
            if values is not None and len(values) == len(self._probe_names):
                baseline = self.pool.baseline or {}
                actual = varcache.from_probe(self._probe_names, [None if v is None else v.decode() for v in values],
                                             baseline)
                self.sconn.state = actual
                self._wanted = dict(actual)
                self._wanted.update(self._gate_settings())
            else:  # the probe failed: the connection's state is unknown, do not lend it again
                self._pinned = True

    def _ensure_prepared(self, server_name: str) -> None:
        """Prepare one of this client's statements again on the borrowed connection if it lacks it."""
        sc = self.sconn
        if server_name not in sc.prepared:
            self._out.append(self._stmt_parse[server_name])
            self._ledger.placeholder_parse_sent(self._seg_sent + 1)
            self._parse_fifo.append((self._seg_sent + 1, True, server_name))
            sc.prepared.add(server_name)

    def _server_statement(self, name: str, what: str, marker: Callable[[str], bytes]) -> str | None:
        """The server-side name of client statement ``name`` (prepared on this connection), or None
        after refusing: a transaction-pooled client only reaches statements it prepared itself."""
        if not name:
            sc = self.sconn
            if sc.unnamed_owner is not self:  # the connection's unnamed statement is not this client's
                if self._unnamed_parse is None:
                    self._refuse_extended(f"<{what} of the unnamed statement>",
                                          Refuse("26000", "unnamed prepared statement does not exist"), marker)
                    return None
                self._out.append(self._unnamed_parse)
                self._ledger.placeholder_parse_sent(self._seg_sent + 1)
                self._parse_fifo.append((self._seg_sent + 1, True, None))
                sc.unnamed_owner = self
            return ""
        server = self._stmt_names.get(name)
        if server is None:
            self._refuse_extended(f"<{what} of statement {name!r}>",
                                  Refuse("26000", f'prepared statement "{name}" does not exist'), marker)
            return None
        self._ensure_prepared(server)
        return server

    # ------------------------------------------------------------------ admin console

    def _start_admin_console(self, record) -> None:
        if record is None or not getattr(record, "admin", False):
            raise _Fatal("28000", f'user "{self.user}" may not use the admin console',
                         hint="the admin console is for users with admin: true in tenantgate's config",
                         outcome="refused")
        from proxy.admin_console import AdminConsole

        self._console = AdminConsole(self.server, self._write_client, user=self.user,
                                     on_idle=self._process_client)
        self.kind_label = "admin"
        self._write_client(self._console.startup_messages())
        note_connection(self, "accepted")
        CLIENT_CONNECTIONS.labels(kind=self.kind_label).inc()
        self._counted = True
        self.relaying = True
        self._process_client()

    def _process_console(self) -> None:
        try:
            while not self.closed and not self._console.busy:  # busy: a PAUSE is waiting
                msg = self.buf.next_message()
                if msg is None:
                    return
                if not self._console.handle(*msg):
                    self._close()
                    return
        except ProtocolError as e:
            self._protocol_fatal(e)
        except Exception:
            log.exception("session %s: admin console failed", self.session_id)
            self._fatal("XX000", "internal error in tenantgate's admin console")

    async def _run_setup_sql(self, backend: BackendConnection, statements: list[str]) -> bytes:
        """Run the gate's setup statements (one round trip) before the client's first statement."""
        if statements:
            try:
                await _server_query(backend, "; ".join(statements))
            except BackendError as e:
                raise _Fatal(e.sqlstate, "session setup on the database server failed", detail=e.message,
                             outcome="setup_failed")
        return backend.tx_status

    # ------------------------------------------------------------------ client -> backend

    def _process_client(self) -> None:
        if self._blocked or self.closed:
            return
        if self._console is not None:
            self._process_console()
            return
        buf = self.buf
        if self.pooled and self.sconn is None:
            if not self._wants_backend():
                return
            if self.server.holds.active and hold_if_paused(self):  # PAUSE: before a transaction starts
                return
            if not self._attach():
                return
        elif self.server.holds.active and self.idle and not self._unsynced and hold_if_paused(self):
            return
        accept = self.fstate.accept
        handlers = _HANDLERS
        try:
            if self._held is not None:
                held, self._held = self._held, None
                handlers[held[0]](self, *held)
            fstate = self.fstate
            while not self._blocked:
                if fstate.phase is Phase.READY:
                    self._relay_verbatim_run()
                msg = buf.next_message()
                if msg is None:
                    break
                t, payload = msg
                action = accept(t[0])
                if action is Action.PROCESS:
                    handlers[t](self, t, payload)
                    if t in _EXTENDED_TYPES:
                        self._unsynced = True
                    elif t == b"S":
                        self._unsynced = False
                elif action is Action.TERMINATE:
                    self._flush_backend()
                    self._close(cancel_running=False)
                    return
        except ProtocolError as e:
            self._flush_backend()
            self._protocol_fatal(e)
            return
        except Exception:
            log.exception("session %s: internal error relaying client messages", self.session_id)
            self._fatal("XX000", "internal error in tenantgate")
            return
        self._flush_backend()
        if self.pooled:  # everything was answered by the proxy itself (refusals): nothing to wait for
            self._maybe_release()

    def _wants_backend(self) -> bool:
        """A detached pooled session has a complete message to act on (Terminate needs no backend)."""
        data, pos = self.buf.window()
        if len(data) - pos < 5:
            return False
        if data[pos] == 88:  # Terminate
            self._close(cancel_running=False)
            return False
        (length,) = _unpack_i32(data, pos + 1)
        return len(data) - pos >= 1 + length or length > self.buf.max_length or length < 4

    def _relay_verbatim_run(self) -> None:
        """Forward, as one slice of the receive buffer, the longest run of
        messages that pass unchanged and need no per-message objects: Bind
        (when no statement is checked), Describe, Execute of the unnamed portal
        (when no portal is tracked), Sync and Flush, in the READY phase.

        Anything else, or anything malformed, ends the run; the generic path
        then handles that message (and raises the precise ProtocolError).
        """
        data, pos = self.buf.window()
        start = pos
        n = len(data)
        max_len = self.buf.max_length
        ledger = self._ledger
        # nothing to check at Bind or Execute: no statement or portal with checks, no audit
        binds_free = not ledger.checked and not self.audited and not self._unnamed_single \
            and not self._setting_stmts
        pooled = self.pooled
        unsynced = self._unsynced
        executes_free = not ledger.checked and not self.audited
        inflight = self.inflight
        while n - pos >= 5:
            t = data[pos]
            (length,) = _unpack_i32(data, pos + 1)
            end = pos + 1 + length
            if length < 4 or length > max_len or end > n:
                break
            if t == 66:  # Bind
                # only the unnamed portal here (its BindComplete is recorded in the ledger)
                if not binds_free or data[pos + 5] != 0:
                    break
                if pooled:  # a named statement is renamed, a foreign unnamed one replaced (slow path)
                    if pos + 6 >= end or data[pos + 6] != 0 or self.sconn.unnamed_owner is not self:
                        break
                try:
                    m.validate_bind(data[pos + 5:end])
                except ProtocolError:
                    break
                ledger.bind_sent(self._seg_sent + 1, "", None)
            elif t == 69:  # Execute
                if not executes_free or length != 9 or data[pos + 5] != 0:
                    break
                inflight.append(_Entry(b"X"))
            elif t == 83:  # Sync
                if length != 4:
                    break
                inflight.append(_Entry(b"S"))
                self._seg_sent += 1
            elif t == 68:  # Describe
                if length < 6 or data[pos + 5] not in (83, 80) or data.find(b"\0", pos + 6, end) != end - 1:
                    break
                if pooled and data[pos + 5] == 83 and (length > 6 or self.sconn.unnamed_owner is not self):
                    break
            elif t == 72:  # Flush
                if length != 4:
                    break
            else:
                break
            if t == 83:
                unsynced = False
            elif t != 72:
                unsynced = True
            pos = end
        if pos > start:
            self._out.append(bytes(data[start:pos]))
            self.buf.consume_to(pos)
            self._unsynced = unsynced

    def _flush_backend(self) -> None:
        out = self._out
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            bwrite = self._bwrite
            if bwrite is not None:
                bwrite(data)
            elif self.bproto is not None:
                self.bproto.write(data)

    def _hold(self, t: bytes, payload: bytes, seg: int) -> None:
        """Keep this message (and everything after it) until PostgreSQL has answered segment ``seg``."""
        self._held = (t, payload)
        self._hold_seg = seg
        self._blocked = True

    def _segment_done(self) -> None:
        """One more ReadyForQuery: release a message held for this segment's replies."""
        self._seg_done += 1
        hold = self._hold_seg
        if hold and self._seg_done >= hold:
            self._hold_seg = 0
            self._unblock_soon()

    def _on_describe(self, t: bytes, payload: bytes) -> None:
        if payload[:1] not in (b"S", b"P") or payload.find(b"\0") != len(payload) - 1:
            m.decode_describe(payload)  # raises the precise ProtocolError
        if self.pooled and payload[:1] == b"S":
            name = m.decode_describe(payload).name
            server = self._server_statement(name, "describe", lambda tok: m.encode_describe(b"S", tok))
            if server is None:
                return
            payload = b"S" + server.encode() + b"\0"
        self._out.append(m.frame(t, payload))

    def _on_empty(self, t: bytes, payload: bytes) -> None:
        if payload:
            raise ProtocolError(f"invalid message format: {t.decode()} message has a body", reason="malformed")
        self._out.append(m.frame(t, payload))

    def _on_query(self, t: bytes, payload: bytes) -> None:
        if payload.find(b"\0") == len(payload) - 1 >= 0:
            try:
                sql = payload[:-1].decode("utf-8")
            except UnicodeDecodeError:
                sql = m.decode_query(payload).sql  # raises the precise ProtocolError
        else:
            sql = m.decode_query(payload).sql
        if len(payload) > self.config.limits.statement_offload_bytes:
            decision = self._large_statement(t, payload, sql, Origin.SIMPLE)
            if decision is None:  # being analysed off the event loop: this message comes back
                return
        else:
            decision = self._check(sql, Origin.SIMPLE)
        if isinstance(decision, Refuse):
            if decision.sqlstate == UNDEFINED_TABLE and self._recheck_after_refresh(t, payload):
                return
            self._refuse_simple(sql, decision)
            return
        if self.audited:
            self._audit_then(decision, None, lambda h: self._forward_query(sql, payload, decision, h),
                             lambda r: self._refuse_simple(sql, r))
            return
        self._forward_query(sql, payload, decision, None)

    def _large_statement(self, t: bytes, payload: bytes, sql: str, origin: Origin):
        """A long statement: refused above limits.max_statement_bytes, else analysed in the worker
        thread (statement_offload) while this session waits.  Returns the decision when it is
        ready, or None when the analysis was started (the message is handled again afterwards)."""
        limits = self.config.limits
        if len(payload) > limits.max_statement_bytes:
            return statement_offload.too_long(len(payload), limits.max_statement_bytes)
        off = self._offloaded
        if off is not None and off[0] is payload:
            self._offloaded = None
            # warmed up: the gate's check is now a cache hit (or the analysis was refused)
            return self._check(sql, origin) if off[1] is None else off[1]
        warm = getattr(self.gate, "warm_up", None)
        pair = warm(sql, origin) if warm is not None else None
        if pair is not None:  # the cold rewrite runs in a forked child (own GIL, own memory)
            self._blocked = True
            self._flush_backend()
            self._pause_client()
            _spawn(self.loop, self._warm_up_forked(t, payload, pair))
            return None
        if self._seg_done < self._seg_sent:
            # the gate must not be checked in another thread while a ReadyForQuery for this
            # session may arrive (on_ready_for_query): wait until every segment sent is answered
            self._hold(t, payload, self._seg_sent)
            return None
        self._blocked = True
        self._flush_backend()
        self._pause_client()
        _spawn(self.loop, self._analyse_off_loop(t, payload, sql, origin))
        return None

    async def _warm_up_forked(self, t: bytes, payload: bytes, pair) -> None:
        compute, adopt = pair
        try:
            result = await statement_offload.run_forked(compute, self.config.limits.statement_cpu_budget_s)
        except Exception:  # never leave the session blocked
            log.exception("session %s: analysing a long statement failed", self.session_id)
            result = Refuse("XX000", "internal error in tenantgate while checking the statement")
        if self.closed:
            return
        decision = None
        if isinstance(result, Refuse):
            decision = result
        else:
            try:
                adopt(result.value)
            except Exception:
                log.exception("session %s: adopting an analysed statement failed", self.session_id)
        self._resume_after_offload(t, payload, decision)

    def _resume_after_offload(self, t: bytes, payload: bytes, decision) -> None:
        self._offloaded = (payload, decision)
        self._held = (t, payload)
        self._blocked = False
        self._resume_client()
        self._process_client()

    async def _analyse_off_loop(self, t: bytes, payload: bytes, sql: str, origin: Origin) -> None:
        decision = await statement_offload.analyse(lambda: self._check(sql, origin),
                                                   self.config.limits.statement_cpu_budget_s)
        if self.closed:
            return
        self._resume_after_offload(t, payload, decision)

    def _recheck_after_refresh(self, t: bytes, payload: bytes) -> bool:
        """A statement names a relation the catalog snapshot lacks: it may have been created
        since (migrations run directly on PostgreSQL).  Wait for a fresh snapshot and check the
        message once more before refusing it.  True when the message will come back."""
        if self._refresh_retried is payload:
            self._refresh_retried = None
            return False
        catalog = getattr(self.server.gatekeeper, "catalog", None)
        if catalog is None or not hasattr(catalog, "refresh_after"):
            return False
        self._refresh_retried = payload
        self._blocked = True
        self._flush_backend()
        self._pause_client()
        _spawn(self.loop, self._refresh_then_recheck(t, payload, catalog, self.loop.time()))
        return True

    async def _refresh_then_recheck(self, t: bytes, payload: bytes, catalog, t0: float) -> None:
        try:
            await asyncio.wait_for(catalog.refresh_after(t0), CATALOG_RECHECK_TIMEOUT_S)
        except Exception:  # the old snapshot stays; the statement is refused as before
            log.warning("session %s: catalog refresh for an unknown relation failed", self.session_id, exc_info=True)
        if self.closed:
            return
        self._held = (t, payload)
        self._blocked = False
        self._resume_client()
        self._process_client()

    def _check(self, sql: str, origin: Origin):
        """gate.check; a policy that crashes refuses the statement (fail closed)."""
        try:
            decision = self.gate.check(sql, origin)
        except Exception:
            log.exception("session %s: policy check failed", self.session_id)
            return Refuse("XX000", "internal error in tenantgate while checking the statement")
        if not isinstance(decision, (Forward, Refuse)):
            log.error("session %s: policy returned %r", self.session_id, decision)
            return Refuse("XX000", "internal error in tenantgate while checking the statement")
        return decision

    def _forward_query(self, sql: str, payload: bytes, decision: Forward, handle: Any) -> None:
        self._unnamed_single = False  # a simple Query drops the unnamed statement
        if self.pooled:
            if self._setting_stmts:
                self._setting_stmts.discard("")
            self._note_session_state(decision)
            self._unnamed_parse = None  # a simple Query drops the unnamed statement
            self.sconn.unnamed_owner = None
        self._out.append(m.frame(b"Q", payload) if decision.sql == sql else m.encode_query(decision.sql))
        self._ledger.query_sent(self._seg_sent + 1)  # drops the unnamed statement and portal
        e = _Entry(b"Q", decision, handle)
        e.audited = self.audited
        self.inflight.append(e)
        self._seg_sent += 1
        self._n_forwarded += 1

    def _on_parse(self, t: bytes, payload: bytes) -> None:
        p = m.decode_parse(payload)
        decision = None
        if len(payload) > self.config.limits.statement_offload_bytes:
            decision = self._large_statement(t, payload, p.query, Origin.PARSE)
            if decision is None:  # being analysed off the event loop: this message comes back
                return
        if p.name and not self.pooled and not isinstance(decision, Refuse):  # pooled: renamed, see below
            exists = self._ledger.statement_exists(p.name, self._seg_sent + 1)
            if type(exists) is Wait:  # a Parse or Close of this name may still fail: wait for it
                self._hold(t, payload, exists.seg)
                return
            if exists:  # as PostgreSQL would answer; its statement stays what it is
                self._refuse_extended(p.query, Refuse("42P05", f'prepared statement "{p.name}" already exists'),
                                      lambda tok: m.encode_parse(p.name, tok))
                return
        if decision is None:
            decision = self._check(p.query, Origin.PARSE)
        if isinstance(decision, Refuse) and decision.sqlstate == UNDEFINED_TABLE \
                and self._recheck_after_refresh(t, payload):
            return
        if isinstance(decision, Forward) and decision.param_checks:
            decision = _check_declared_types(decision, p.param_types)
        if self.pooled and p.name and p.name in self._stmt_names and isinstance(decision, Forward):
            decision = Refuse("42P05", f'prepared statement "{p.name}" already exists')
        if isinstance(decision, Forward) and decision.single_use and p.name:
            decision = Refuse("0A000", "SET tenantgate.tenant cannot be a named prepared statement: it takes effect "
                                       "once, when tenantgate checks it",
                              hint="send it as a simple query, or as an unnamed statement")
        if isinstance(decision, Refuse):
            marker_name = p.name
            if self.pooled:
                if p.name:  # a name that exists nowhere (the client's own names are renamed)
                    self._marker_seq += 1
                    marker_name = f"tg_{self.session_id}_r{self._marker_seq}"
                else:  # the failing unnamed marker Parse drops the connection's unnamed statement
                    self._unnamed_parse = None
                    self.sconn.unnamed_owner = None
            self._refuse_extended(p.query, decision, lambda tok: m.encode_parse(marker_name, tok))
            return
        name = p.name
        if not name:
            self._unnamed_single = decision.single_use
            self._unnamed_spent = False
        if self.pooled:
            if name:
                self._stmt_seq += 1
                name = f"tg_{self.session_id}_{self._stmt_seq}"
            self._note_session_state(decision, name)
            if name:
                msg = m.encode_parse(name, decision.sql, p.param_types)
                self._stmt_names[p.name] = name
                self._stmt_parse[name] = msg
                self.sconn.prepared.add(name)
                self._parse_fifo.append((self._seg_sent + 1, False, name))
                self._out.append(msg)
            else:
                self._parse_fifo.append((self._seg_sent + 1, False, None))
                msg = m.frame(t, payload) if decision.sql == p.query else m.encode_parse("", decision.sql, p.param_types)
                self._unnamed_parse = msg
                self.sconn.unnamed_owner = self
                self._out.append(msg)
        else:
            self._out.append(m.frame(t, payload) if decision.sql == p.query
                             else m.encode_parse(p.name, decision.sql, p.param_types))
        # effective when PostgreSQL answers ParseComplete (statement_ledger)
        self._ledger.parse_sent(self._seg_sent + 1, name, decision)
        self._n_forwarded += 1

    def _note_session_state(self, decision: Forward, server_name: str | None = None) -> None:
        """Transaction mode: what this statement leaves on the connection (pins it, or dirties settings).
        ``server_name``: the statement it is prepared as (Parse), "" for the unnamed one."""
        if server_name is not None and self._setting_stmts:
            self._setting_stmts.discard(server_name)  # the name now holds this statement
        if decision.resets_settings:
            self._settings_reset = True  # the read-back puts the connection-time settings back
        if decision.pins_session:
            self._pinned = True
        elif decision.statement_class == "set" or decision.changes_settings:
            self._settings_dirty = True
            if server_name is not None:  # each later Bind of it dirties the settings again
                if self._setting_stmts is None:
                    self._setting_stmts = set()
                self._setting_stmts.add(server_name)

    def _forget_statement(self, server_name: str) -> None:
        self._stmt_parse.pop(server_name, None)
        if self._setting_stmts:
            self._setting_stmts.discard(server_name)
        for client_name, s in list(self._stmt_names.items()):
            if s == server_name:
                del self._stmt_names[client_name]

    def _on_bind(self, t: bytes, payload: bytes) -> None:
        ledger = self._ledger
        seg = self._seg_sent + 1
        inspect = self.audited or ledger.checked
        if inspect:  # which statement will PostgreSQL bind? Wait while an earlier segment may change it
            name = m.bind_statement_name(payload)
            found = ledger.statement(self._stmt_names.get(name, NO_STATEMENT) if self.pooled and name else name, seg)
            if type(found) is Wait:
                self._hold(t, payload, found.seg)
                return
        if self._unnamed_single and m.bind_statement_name(payload) == "":
            if self._unnamed_spent:  # its tenant switch was checked for one execution
                self._refuse_extended("<bind of the unnamed statement>", Refuse(
                    "0A000", "the unnamed statement (SET tenantgate.tenant) has already run once",
                    hint="send the SET again to switch tenants"),
                    lambda tok: m.encode_bind(m.decode_bind(payload).portal, tok))
                return
            self._unnamed_spent = True
        if self.pooled:
            name = m.bind_statement_name(payload)
            server = self._server_statement(name, "bind", lambda tok: m.encode_bind(m.decode_bind(payload).portal, tok))
            if server is None:
                return
            if name:
                z = payload.index(b"\0")
                payload = payload[:z + 1] + server.encode() + payload[payload.index(b"\0", z + 1):]
            if self._setting_stmts and server in self._setting_stmts:
                self._settings_dirty = True
        if not inspect:
            m.validate_bind(payload)  # malformed messages are refused even when nothing is checked
            ledger.bind_sent(seg, m.decode_text(payload[:payload.index(b"\0")]), None)
            self._out.append(m.frame(t, payload))
            return
        bind = m.decode_bind(payload)
        decision = ledger.statement(bind.statement, seg)  # exact: waited for above
        if decision is None or not decision.param_checks:
            ledger.bind_sent(seg, bind.portal, decision, bind.params)
            self._out.append(m.frame(t, payload))
            return
        for idx, check in decision.param_checks:
            value = bind.params[idx] if 0 <= idx < len(bind.params) else None
            try:
                ok = idx < len(bind.params) and bool(check.accepts(bind.format_of(idx), value))
                why = check.describe()
            except Exception as e:  # a broken check fails closed
                ok, why = False, f"check failed: {e}"
            if not ok:
                refusal = Refuse("42501", f"bound parameter ${idx + 1} is not allowed: {why}")
                self._refuse_extended(f"<bind of statement {bind.statement!r}>", refusal,
                                      lambda tok: m.encode_bind(bind.portal, tok))
                return
        ledger.bind_sent(seg, bind.portal, decision, bind.params)  # effective at BindComplete
        self._out.append(m.frame(t, payload))

    def _on_execute(self, t: bytes, payload: bytes) -> None:
        ex = m.decode_execute(payload)
        ledger = self._ledger
        if not ledger.checked and not self.audited:
            self._out.append(m.frame(t, payload))
            self.inflight.append(_Entry(b"X"))
            return
        info = ledger.portal(ex.portal, self._seg_sent + 1)
        if type(info) is Wait:  # the Bind of an earlier segment may still fail: wait for its answer
            self._hold(t, payload, info.seg)
            return
        if info is not None and info[0] is None:
            info = None
        if not self.audited:
            self._out.append(m.frame(t, payload))
            self.inflight.append(_Entry(b"X", info[0] if info else None))
            return
        if info is None:
            refusal = Refuse("42501", "cannot execute a portal whose statement tenantgate did not see",
                             hint="prepare statements with the Parse message through tenantgate")
            self._refuse_extended("<execute>", refusal, lambda tok: m.encode_execute(tok))
            return
        decision, params = info

        def forward(handle: Any) -> None:
            self._out.append(m.frame(t, payload))
            e = _Entry(b"X", decision, handle)
            e.audited = True
            self.inflight.append(e)

        self._audit_then(decision, params, forward,
                         lambda r: self._refuse_extended(decision.sql, r, lambda tok: m.encode_execute(tok)))

    def _on_close(self, t: bytes, payload: bytes) -> None:
        c = m.decode_close(payload)
        name = c.name
        if self.pooled and c.kind == b"S" and name:
            # closing a statement that does not exist is not an error in PostgreSQL either
            name = self._stmt_names.pop(name, NO_STATEMENT)
            self._stmt_parse.pop(name, None)
            self.sconn.prepared.discard(name)
            payload = b"S" + name.encode() + b"\0"
        elif self.pooled and c.kind == b"S":  # the unnamed statement: close it only if it is this client's
            if self.sconn.unnamed_owner is self:
                self.sconn.unnamed_owner = None
            else:
                payload = b"S" + NO_STATEMENT.encode() + b"\0"
            self._unnamed_parse = None
            self._unnamed_single = False
            if self._setting_stmts:
                self._setting_stmts.discard("")
        self._ledger.close_sent(self._seg_sent + 1, c.kind, name)  # effective at CloseComplete
        self._out.append(m.frame(t, payload))

    def _on_sync(self, t: bytes, payload: bytes) -> None:
        if payload:
            raise ProtocolError("invalid message format: Sync message has a body", reason="malformed")
        self._out.append(m.SYNC)
        if self.fstate.phase is Phase.COPY_IN:
            return  # PostgreSQL ignores Sync during COPY FROM STDIN: no ReadyForQuery follows
        self.inflight.append(_Entry(b"S"))
        self._seg_sent += 1

    def _on_function_call(self, t: bytes, payload: bytes) -> None:
        self._refuse_simple("<FunctionCall message>", FUNCTION_CALL_REFUSAL)

    def _on_copy_message(self, t: bytes, payload: bytes) -> None:
        if self.fstate.phase is not Phase.COPY_IN:
            if self.inflight:  # CopyInResponse may still be on its way: wait for it (or ReadyForQuery)
                self._held = (t, payload)
                self._blocked = True
            # otherwise PostgreSQL would ignore it too
            return
        if t == b"d":
            if self._copy_failed:
                return
            if self.audited and self.inflight:  # the data an operator loads is recorded with the outcome
                head = self.inflight[0]
                if head.audited:
                    if head.copy is None:
                        head.copy = CopyDigest(full=getattr(self.config.audit, "copy_data", "digest") == "full")
                    head.copy.feed(payload)
            check = self._copy_check
            if check is not None:
                try:
                    err = check.feed(payload)
                except Exception as e:
                    err = f"COPY data check failed: {e}"
                if err:
                    self._out.append(m.encode_copy_fail(err))
                    self._copy_failed = True
                    return
                if getattr(check, "fills", False):  # the rows with the tenant column added (policy/copy_fill.py)
                    out = check.take()
                    if out:
                        self._out.append(m.frame(t, out))
                    return
            self._out.append(m.frame(t, payload))
        elif t == b"c":
            check = self._copy_check
            if not self._copy_failed:
                err = None
                if check is not None:
                    try:
                        err = check.finish()
                        if not err and getattr(check, "fills", False):
                            out = check.take()
                            if out:
                                self._out.append(m.frame(b"d", out))
                    except Exception as e:
                        err = f"COPY data check failed: {e}"
                self._out.append(m.encode_copy_fail(err) if err else m.frame(t, payload))
            self._end_copy()
        else:  # CopyFail
            if not self._copy_failed:
                self._out.append(m.frame(t, payload))
            self._end_copy()

    def _end_copy(self) -> None:
        self.fstate.copy_in_ended()
        self._copy_check = None
        self._copy_failed = False

    # ------------------------------------------------------------------ refusals and audit

    def _note_refusal(self, sql: str, refusal: Refuse) -> None:
        self._m_refused.inc()
        self.server.tenant_counters.refusal(self)  # SHOW TENANTS
        note_refusal(self, sql, refusal)  # tenantgate_statements_refused_total{kind,reason,sqlstate} + log line
        try:
            self.gate.on_refused(sql, refusal)
        except Exception:
            log.exception("session %s: on_refused failed", self.session_id)

    def _refuse_simple(self, sql: str, refusal: Refuse) -> None:
        """ErrorResponse + ReadyForQuery where PostgreSQL's answer would be.

        A refusal must behave exactly like a PostgreSQL error: inside a transaction block the
        transaction is aborted (status E, COMMIT answers ROLLBACK).  So unless the session is
        known to be outside any transaction when this statement would run (idle, nothing in
        flight), a marker Query that fails in PostgreSQL is sent instead and its error is
        swapped for the refusal; PostgreSQL's ReadyForQuery then carries the true status."""
        self._note_refusal(sql, refusal)
        err = m.encode_error("ERROR", refusal.sqlstate, refusal.message, refusal.detail, refusal.hint)
        if self.backend is not None and (self.tx_status != _ZERO or any(e.kind != b"R" for e in self.inflight)):
            self._marker_seq += 1
            token = f"{MARKER_PREFIX}{self.session_id}_{self._marker_seq}"
            self._markers.append((self._seg_sent + 1, token.encode(), err))
            if self.pooled:  # a simple Query drops the unnamed statement
                self._unnamed_parse = None
                self.sconn.unnamed_owner = None
                if self._setting_stmts:
                    self._setting_stmts.discard("")
            self._unnamed_single = False
            self._out.append(m.encode_query(token))
            self._ledger.query_sent(self._seg_sent + 1)
            self.inflight.append(_Entry(b"Q"))
            self._seg_sent += 1
            return
        self.inflight.append(_Entry(b"R", data=err))
        if len(self.inflight) == 1:
            self.inflight.pop(0)
            self._write_client(err + m.encode_ready_for_query(self.tx_status))

    def _refuse_extended(self, sql: str, refusal: Refuse, marker: Callable[[str], bytes]) -> None:
        """Send a marker message that fails in PostgreSQL at this position, skip to Sync."""
        self._note_refusal(sql, refusal)
        self._marker_seq += 1
        token = f"{MARKER_PREFIX}{self.session_id}_{self._marker_seq}"
        err = m.encode_error("ERROR", refusal.sqlstate, refusal.message, refusal.detail, refusal.hint)
        self._markers.append((self._seg_sent + 1, token.encode(), err))
        self._out.append(marker(token))
        self.fstate.error_in_extended()

    def _audit_then(self, decision: Forward, params, forward: Callable[[Any], None],
                    refuse: Callable[[Refuse], None]) -> None:
        self._blocked = True
        self._flush_backend()
        _spawn(self.loop, self._audit_task(decision, params, forward, refuse))

    async def _audit_task(self, decision, params, forward, refuse) -> None:
        try:
            handle = await self.gate.audit_before(decision, params)
        except Exception as e:
            if self.closed:
                return
            sqlstate = getattr(e, "sqlstate", None) or "58000"
            msg = getattr(e, "message", None) or str(e) or "audit record could not be written"
            refuse(Refuse(sqlstate, f"statement not run: {msg}"))
        else:
            if self.closed:
                return
            forward(handle)
        self._blocked = False
        self._flush_backend()
        self._process_client()

    def _finish_audit(self, e: _Entry) -> None:
        rows = None
        if e.tag:
            counts = [m.rows_from_tag(tag) for tag in e.tag.split("; ")]
            rows = sum(c for c in counts if c is not None) if any(c is not None for c in counts) else None
        detail = e.copy.detail() if e.copy is not None else None
        outcome = Outcome(e.sqlstate, e.tag, rows, time.perf_counter() - e.t0, detail)
        task = self.loop.create_task(self._audit_after(e.handle, outcome))
        if self._after_tasks is None:
            self._after_tasks = set()
        self._after_tasks.add(task)
        task.add_done_callback(self._after_tasks.discard)

    async def _audit_after(self, handle, outcome: Outcome) -> None:
        try:
            await self.gate.audit_after(handle, outcome)
        except Exception:
            log.exception("session %s: audit_after failed", self.session_id)

    # ------------------------------------------------------------------ backend -> client

    def _on_backend_data(self, data: bytes) -> None:
        try:
            self._relay_backend(data)
        except ProtocolError as e:
            self._fatal("08006", f"invalid data from the database server: {e.message}")
        except LedgerError as e:  # the proxy no longer knows which statements exist: fail closed
            log.error("session %s: %s", self.session_id, e)
            self._fatal("08P01", "tenantgate lost track of the prepared statements of this session",
                        str(e))
        except Exception:
            log.exception("session %s: internal error relaying server messages", self.session_id)
            self._fatal("XX000", "internal error in tenantgate")

    def _relay_backend(self, data: bytes) -> None:
        items = self.scanner.feed(data)
        if len(items) == 1 and type(items[0]) is bytes:
            self._write_client(items[0])
            return
        out: list[bytes] = []
        for it in items:
            if type(it) is bytes:
                out.append(it)
                continue
            t, payload, raw = it
            if self._swallowing:
                self._swallow(t, payload, out)
                continue
            if t == READY_FOR_QUERY:
                out.append(raw)
                self._on_ready(payload[:1], out)
            elif t == COMMAND_COMPLETE or t == EMPTY_QUERY or t == PORTAL_SUSPENDED:
                out.append(raw)
                inflight = self.inflight
                if inflight:
                    head = inflight[0]
                    if head.kind == b"X":
                        inflight.pop(0)
                        if head.audited:
                            head.tag = m.command_tag(payload) if t == COMMAND_COMPLETE else None
                            self._finish_audit(head)
                    elif head.audited and t == COMMAND_COMPLETE:  # every statement of the Query
                        tag = m.command_tag(payload)
                        head.tag = tag if head.tag is None else f"{head.tag}; {tag}"
                if t == COMMAND_COMPLETE and payload[:1] == b"D" and not self.pooled and (
                        payload.startswith(b"DEALLOCATE ALL\0") or payload.startswith(b"DISCARD ALL\0")):
                    self._ledger.all_statements_dropped()
            elif t == ERROR_RESPONSE:
                out.append(self._on_backend_error(payload, raw))
            elif t == PARSE_COMPLETE:
                self._ledger.completed(t)
                fifo = self._parse_fifo
                if not fifo or not fifo.pop(0)[1]:
                    out.append(raw)
            elif t == BIND_COMPLETE or t == CLOSE_COMPLETE:
                self._ledger.completed(t)
                out.append(raw)
            elif t == COPY_IN_RESPONSE:
                out.append(raw)
                self._on_copy_in_response()
            elif t == COPY_BOTH_RESPONSE:
                self._write_client(b"".join(out))
                self._fatal("0A000", "COPY BOTH (replication) is not supported by tenantgate")
                return
            else:
                out.append(raw)
        self._write_client(b"".join(out))
        if self.pooled:
            self._maybe_release()

    def _write_client(self, data: bytes) -> None:
        if data and self._client_connected and not self.transport.is_closing():
            self._bytes_out += len(data)
            self.transport.write(data)

    def _flush_byte_counters(self) -> None:
        """Hand the locally counted metrics to prometheus_client."""
        self._metrics_t = time.perf_counter()
        if self._n_forwarded:
            self._m_forwarded.inc(self._n_forwarded)
            self._n_forwarded = 0
        if _DURATIONS[2]:
            _flush_durations(_DURATIONS[0], _DURATIONS[1])
            _DURATIONS[1] = 0.0
            _DURATIONS[2] = 0
        if self.pool is not None:
            self._count_pool_bytes()
            self._pool_marks = (0, 0)
        if self._bytes_in:
            _BYTES_IN.inc(self._bytes_in)
            self._bytes_in = 0
        if self._bytes_out:
            _BYTES_OUT.inc(self._bytes_out)
            self._bytes_out = 0

    def _count_pool_bytes(self) -> None:
        """Bytes since the last call, for the pool's SHOW STATS."""
        pool = self.pool
        mark_in, mark_out = self._pool_marks
        pool.bytes_received += self._bytes_in - mark_in
        pool.bytes_sent += self._bytes_out - mark_out
        self._pool_marks = (self._bytes_in, self._bytes_out)

    def _on_ready(self, status: bytes, out: list[bytes]) -> None:
        self.tx_status = status
        if status == b"I" and not self._swallowing:
            self.server.tenant_counters.transaction(self)  # SHOW TENANTS
        if self.pooled:
            self.pool.query_count += 1
        if self._bytes_in > 65536 or self._bytes_out > 65536:
            self._flush_byte_counters()
        inflight = self.inflight
        while inflight:
            e = inflight.pop(0)
            k = e.kind
            if k == b"R":
                out.append(e.data + m.encode_ready_for_query(status))
                continue
            if e.audited:
                self._finish_audit(e)
            if k == b"Q" or k == b"S":
                now = time.perf_counter()
                took = now - e.t0
                if _DURATION_BATCHED:
                    d = _DURATIONS
                    d[0][bisect_left(_DURATION_BOUNDS, took)] += 1
                    d[1] += took
                    d[2] += 1
                    if d[2] >= _METRICS_FLUSH_EVERY or now - self._metrics_t > _METRICS_FLUSH_S:
                        self._flush_byte_counters()
                else:
                    QUERY_DURATION_SECONDS.observe(took)
                break
        self._ledger.ready(self._seg_done + 1, status)
        self._segment_done()
        if self._markers:
            done = self._seg_done
            self._markers = [mk for mk in self._markers if mk[0] > done]
        while inflight and inflight[0].kind == b"R":
            out.append(inflight.pop(0).data + m.encode_ready_for_query(status))
        if self.fstate.phase is Phase.COPY_IN:
            self._end_copy()
        try:
            self.gate.on_ready_for_query(status)
        except Exception:
            log.exception("session %s: on_ready_for_query failed", self.session_id)
        if self._held is not None and self._blocked and not self._hold_seg \
                and not (inflight and self.fstate.phase is not Phase.COPY_IN):
            self._unblock_soon()
        if self.server.draining and status == b"I" and not inflight and not self._blocked:
            self.loop.call_soon(self._drain_close)
        idle_tx = self._idle_tx_s
        if idle_tx and status != b"I" and not inflight:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self._idle_timer = self.loop.call_later(
                idle_tx, self._fatal, "25P03", "terminating connection due to idle-in-transaction timeout")

    def _on_backend_error(self, payload: bytes, raw: bytes) -> bytes:
        if self._markers:
            for i, (_seg, token, err) in enumerate(self._markers):
                if token in raw:
                    del self._markers[i]
                    raw = err
                    payload = err[5:]
                    break
        if b"SFATAL\0" in payload or b"SPANIC\0" in payload:
            self._backend_fatal = True
        # PostgreSQL failed on, or skips, every Parse/Bind/Close of this segment not yet answered
        self._ledger.failed(self._seg_done + 1)
        fifo = self._parse_fifo
        if fifo:  # the rest of this segment is skipped by PostgreSQL: those Parses get no answer
            seg = self._seg_done + 1
            sc = self.sconn
            while fifo and fifo[0][0] <= seg:
                _, swallowed, name = fifo.pop(0)
                if sc is None:
                    continue
                if name is None:  # an unnamed Parse failed or was skipped
                    sc.unnamed_owner = None
                    if not swallowed:
                        self._unnamed_parse = None
                        if self._setting_stmts:
                            self._setting_stmts.discard("")
                else:
                    sc.prepared.discard(name)
                    if not swallowed:  # the client's own Parse failed: its statement does not exist
                        self._forget_statement(name)
        inflight = self.inflight
        if inflight:
            head = inflight[0]
            if head.kind == b"X":
                inflight.pop(0)
                if head.audited:
                    head.sqlstate = _sqlstate_of(payload)
                    self._finish_audit(head)
            elif head.audited and head.sqlstate is None:
                head.sqlstate = _sqlstate_of(payload)
        if self.fstate.phase is Phase.COPY_IN:
            self._end_copy()
        return raw

    def _on_copy_in_response(self) -> None:
        head = self.inflight[0] if self.inflight else None
        decision = head.decision if head is not None else None
        factory = decision.copy_in_check if decision is not None else None
        self._copy_failed = False
        self._copy_check = None
        self.fstate.copy_in_started()
        if factory is not None:
            try:
                self._copy_check = factory()
            except Exception as e:
                log.exception("session %s: creating the COPY check failed", self.session_id)
                self._out.append(m.encode_copy_fail(f"COPY data check could not start: {e}"))
                self._copy_failed = True
                self._flush_backend()
        if self._held is not None and self._blocked and not self._hold_seg:
            self._unblock_soon()

    def _unblock_soon(self) -> None:
        def go():
            self._blocked = False
            self._process_client()
        self.loop.call_soon(go)

    def _pause_client(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def _resume_client(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _backend_lost(self, exc) -> None:
        if self.closed:
            return
        sc = self.sconn
        if sc is not None:
            self._detach_server()
            self.pool.discard(sc)
        if not self._backend_fatal:
            self._write_client(m.encode_error(
                "FATAL", "08006", "the connection to the database server was lost",
                "the database server closed the connection unexpectedly"))
        self._close(cancel_running=False)

    # ------------------------------------------------------------------ ending

    def cancel_backend_query(self) -> None:
        """Called by the CancelRegistry for a valid CancelRequest.  A pooled connection is only
        cancelled while this client has a statement running on it, and is not given back until
        the cancel has been delivered (else it could hit the next client's query)."""
        b = self.backend
        if b is None or self.closed:
            return
        if self.pooled:
            if not self.inflight or self._cancels_pending:  # nothing running, or a cancel already on its way
                return
            self._cancels_pending += 1
        _spawn(self.loop, self._deliver_cancel(b))

    async def _deliver_cancel(self, b: BackendConnection) -> None:
        try:
            await send_cancel(self.config.backend, b.pid, b.secret)
        finally:
            if self.pooled:
                self._cancels_pending -= 1
                if self._cancels_pending == 0 and self._blocked and self.sconn is not None \
                        and self._attach_task is None and self._held is None and not self.closed:
                    self._blocked = False
                    self._maybe_release()
                    self._process_client()

    def _terminator(self, sqlstate: str, message: str) -> None:
        """Given to the gate: end this session (FATAL to the client, backend closed)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.loop.call_soon(self._fatal, sqlstate, message)
        else:
            self.loop.call_soon_threadsafe(self._fatal, sqlstate, message)

    def _drain_close(self) -> None:
        if not self.closed:
            self._fatal("57P01", "terminating connection because tenantgate is shutting down")

    def drain(self) -> None:
        """Server shutdown: close now when idle, else at the next idle ReadyForQuery."""
        if self.closed:
            return
        if not self.relaying:
            self._close()
        elif self.tx_status == b"I" and not self.inflight and not self._blocked:
            self._drain_close()

    @property
    def idle(self) -> bool:
        return self.relaying and self.tx_status == b"I" and not self.inflight

    def _protocol_fatal(self, e: ProtocolError) -> None:
        PROTOCOL_ERRORS_TOTAL.labels(reason=e.reason).inc()
        self._fatal(e.sqlstate, e.message)

    def _fatal(self, sqlstate: str, message: str, detail: str | None = None, hint: str | None = None) -> None:
        if self.closed:
            return
        self._write_client(m.encode_error("FATAL", sqlstate, message, detail, hint))
        self._close(cancel_running=True)

    def _close(self, cancel_running: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.relaying = False
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        task = self._startup_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        self._bwrite = None
        if self._attach_task is not None:
            self._attach_task.cancel()
        if self._held_task is not None:
            self._held_task.cancel()
        if self._console is not None:
            self._console.close()
        b = self.backend
        if b is not None:
            busy = self.inflight or self.fstate.phase is Phase.COPY_IN
            if cancel_running and busy and not b.protocol.closed:
                _spawn(self.loop, send_cancel(self.config.backend, b.pid, b.secret))
            sc = self.sconn
            if sc is not None:
                clean = not (busy or self._pinned or self._unsynced or self._settings_dirty or self._swallowing
                             or self._cancels_pending
                             or self.tx_status != b"I" or self._out
                             or (self.scanner is not None and not self.scanner.at_boundary))
                self._detach_server()
                if clean:
                    self.pool.release(sc, xact_s=time.perf_counter() - self._attach_t0)
                else:  # its state is unknown (open transaction, session state): never lend it again
                    self.pool.discard(sc)
            else:
                b.protocol.on_lost = None
                b.protocol.close(terminate=True)
                BACKEND_CONNECTIONS.dec()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if self.key is not None:
            self.server.cancels.unregister(self.key[0])
        self._flush_byte_counters()
        if self._counted:
            CLIENT_CONNECTIONS.labels(kind=self.kind_label).dec()
        gate = self.gate
        if gate is not None:
            _spawn(self.loop, self._close_gate(gate))
        self.server.session_ended(self)

    async def _close_gate(self, gate) -> None:
        if self._after_tasks:
            await asyncio.gather(*self._after_tasks, return_exceptions=True)
        try:
            await gate.close()
        except Exception:
            log.exception("session %s: gate.close failed", self.session_id)


_HANDLERS: dict[bytes, Callable[[ClientSession, bytes, bytes], None]] = {
    b"Q": ClientSession._on_query, b"P": ClientSession._on_parse, b"B": ClientSession._on_bind,
    b"E": ClientSession._on_execute, b"D": ClientSession._on_describe, b"H": ClientSession._on_empty,
    b"C": ClientSession._on_close, b"S": ClientSession._on_sync, b"d": ClientSession._on_copy_message,
    b"c": ClientSession._on_copy_message, b"f": ClientSession._on_copy_message,
    b"F": ClientSession._on_function_call,
}


async def _server_query(conn: BackendConnection, sql: str) -> list:
    """Run one tenantgate statement on a connection nobody relays (pooled, between clients):
    returns the first row's values; ParameterStatus updates ``conn.parameters``."""
    proto = conn.protocol
    proto.write(m.encode_query(sql))
    row: list = []
    error: str | None = None
    try:
        while True:
            t, payload = await proto.read_message()
            if t == b"D" and not row:
                row = m.decode_data_row(payload)
            elif t == b"S":
                k, v = m.decode_parameter_status(payload)
                conn.parameters[k] = v
            elif t == b"E" and error is None:
                error = m.decode_error_fields(payload).message
            elif t == b"Z":
                break
    except ProtocolError as e:
        raise BackendError(f"invalid data from the database server: {e.message}")
    if error is not None:
        raise BackendError(error, "XX000")
    return row


def _sqlstate_of(payload: bytes) -> str | None:
    try:
        return m.decode_error_fields(payload).sqlstate or None
    except ProtocolError:
        return None


def _check_declared_types(decision: Forward, param_types) -> Forward | Refuse:
    """A checked parameter must not be declared with a type that changes its value after the check."""
    for idx, check in decision.param_checks:
        declared = param_types[idx] if idx < len(param_types) else 0
        if declared != 0 and declared not in getattr(check, "type_oids", ()):
            return Refuse("42501", f"parameter ${idx + 1} is declared with type OID {declared}, which is not "
                                   f"allowed for it: {check.describe()}",
                          hint="leave the parameter's type unspecified or use the column's type")
    return decision


class _Fatal(Exception):
    def __init__(self, sqlstate: str, message: str, detail: str | None = None, hint: str | None = None,
                 *, outcome: str = "refused"):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.detail = detail
        self.hint = hint
        self.outcome = outcome
