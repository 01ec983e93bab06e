"""One client connection as an asyncio Protocol: the I/O around the relay core.

:class:`ClientSession` owns the client's transport, the backend connection, timers and tasks.
Startup is one coroutine (:mod:`proxy.session.startup`); afterwards everything runs in plain
callbacks: client bytes go into the receive buffer and the relay core
(:class:`proxy.session.relay.Relay`) handles them, backend bytes go to the core too, and after
each call this adapter writes what the core left in ``to_backend`` / ``to_client`` and acts
on its events (audit before an operator statement, off-loop analysis of a long statement, a
catalog refresh, a held message going on).  Transaction pooling's borrow and release
(:mod:`proxy.session.pooled`) and PAUSE holds (proxy/holds.py) live here; cancel, drain and close
in :mod:`proxy.session.ending`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from typing import TYPE_CHECKING

from proxy.backend_link import BackendConnection
from proxy.holds import hold_if_paused
from proxy.metrics import CLIENT_CONNECTIONS, PROTOCOL_ERRORS_TOTAL
from proxy.pool import ServerConn
from proxy.session.counters import SessionCounters
from proxy.session.ledger import LedgerError
from proxy.session.awaited import AwaitedSteps
from proxy.session.ending import SessionEnd, spawn
from proxy.session.pooled import PooledSession
from proxy.session.events import (
    AUDIT,
    AUDIT_AFTER,
    OFFLOAD,
    REFRESH,
    TERMINATE,
    UNBLOCK,
    WARM_UP,
    RelayFatal,
)
from proxy.session.relay import Relay
from proxy.session.startup import Fatal, retarget, run_startup
from proxy.session_events import note_connection
from proxy.wire import messages as m
from proxy.wire.buffer import AUTH_MESSAGE_MAX, PREAUTH_BUFFER_MAX, ReceiveBuffer
from proxy.wire.errors import ProtocolError

if TYPE_CHECKING:  # pragma: no cover
    from proxy.server import ProxyServer

log = logging.getLogger("tenantgate.session")

#: bytes a blocked session (borrowing a connection, or held by PAUSE) reads ahead before it
#: stops reading its client (ClientSession.block)
BLOCKED_READ_AHEAD = 64 * 1024

_unpack_i32 = struct.Struct("!I").unpack_from

class ClientSession(AwaitedSteps, PooledSession, SessionEnd, asyncio.Protocol):
    # slots, not a __dict__: an idle pooled session is kept small (10,000 idle clients per process)
    __slots__ = (
        "server", "config", "loop", "transport", "buf", "session_id", "kind_label", "relaying", "closed", "tls",
        "user", "database", "application_name", "client_addr", "connected_at", "request_time", "idle_ticks",
        "gate", "audited", "backend", "bproto", "key", "relay", "counters", "pooled", "pool", "sconn", "lent",
        "pooled_settings", "bkey", "binder", "console", "attach_task", "held_task", "_after_tasks",
        "_attach_t0", "_last_sconn", "_cancels_pending", "_cancel_hold", "_client_connected", "_counted", "_idle_timer",
        "_idle_tx_s", "_startup_task", "_waiter", "_bwrite",
    )

    def __init__(self, server: "ProxyServer"):
        self.server = server
        self.config = server.config
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        # before authentication: messages capped like PostgreSQL's (raised once authenticated)
        self.buf = ReceiveBuffer(min(AUTH_MESSAGE_MAX, self.config.limits.max_message_bytes))
        self.session_id = secrets.token_hex(8)
        self.kind_label = "unauthenticated"
        self.relaying = False
        self.closed = False
        self.tls = False
        self.user: str | None = None
        self.database: str | None = None
        self.application_name: str | None = None
        self.client_addr = "unix"
        self.connected_at = self.request_time = time.time()
        self.idle_ticks = 0  # seconds of silence counted by the server's sweeper (pool.client_idle_timeout_s)
        self.gate = None
        self.audited = False
        self.backend: BackendConnection | None = None
        self.bproto = None
        self.key: tuple[int, int] | None = None
        self.relay: Relay | None = None  # the protocol core, once the session relays
        self.counters = SessionCounters(self, server.tenant_counters)
        # transaction pooling (pool.mode: transaction): the backend is borrowed per transaction
        self.pooled = False
        self.pool = None
        self.sconn: ServerConn | None = None  # the pooled connection while lent to this session
        self.lent: ServerConn | None = None  # the connection borrowed for startup
        self.pooled_settings = None
        self.bkey: bytes | None = None  # the backstop key, when the gate binds connections (proxy/backstop.py)
        self.binder = None  # session mode: the backend connection's BackendBinder
        self.console = None  # the admin console (SHOW POOLS, ...) instead of a backend
        self.attach_task: asyncio.Task | None = None
        self.held_task: asyncio.Task | None = None  # PAUSE: waiting for RESUME (proxy/holds.py)
        self._after_tasks: set[asyncio.Task] | None = None  # audit_after tasks still running
        self._attach_t0 = 0.0
        self._last_sconn: ServerConn | None = None
        self._cancels_pending = 0  # CancelRequests on their way to the backend connection
        self._cancel_hold = False  # the client's next statement waits until that cancel is delivered
        self._client_connected = False
        self._counted = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_tx_s = self.config.timeouts.idle_in_transaction_s
        self._startup_task: asyncio.Task | None = None
        self._waiter: asyncio.Future | None = None
        self._bwrite = None  # backend transport.write once relaying

    # ------------------------------------------------------------------ what other modules read

    @property
    def tx_status(self) -> bytes:
        return self.relay.tx_status if self.relay is not None else b"I"

    @property
    def inflight(self) -> list:
        return self.relay.inflight if self.relay is not None else []

    @property
    def unsynced(self) -> bool:
        return self.relay is not None and self.relay.unsynced

    @property
    def prepared_statements(self) -> int:
        relay = self.relay
        if relay is None:
            return 0
        return len(relay.stmts.names) if relay.stmts is not None else 0

    @property
    def idle(self) -> bool:
        if not self.relaying:
            return False
        if self.relay is not None:
            return self.relay.idle
        return self.console is not None or self.pooled  # pooled: no core yet, nothing sent (start_relay)

    # ------------------------------------------------------------------ asyncio callbacks (client socket)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._client_connected = True
        self.server.session_started(self)
        self._startup_task = self.loop.create_task(run_startup(self))

    def data_received(self, data: bytes) -> None:
        self.idle_ticks = 0
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        (self.counters or self._new_counters()).bytes_in += len(data)
        self.buf.feed(data)
        if self.relaying:
            self.process_client()
            if len(self.buf) > BLOCKED_READ_AHEAD and (self.attach_task is not None or self.held_task is not None):
                self._pause_client()  # blocked (block()): the rest waits in the kernel until unblock()
        elif len(self.buf) > PREAUTH_BUFFER_MAX:
            # a client that has not authenticated (or is waiting for its session to open) has
            # no reason to send more than one message ahead: do not buffer for it
            PROTOCOL_ERRORS_TOTAL.labels(reason="too_long").inc()
            note_connection(self, "protocol_error", "08P01", "too much data before the session started")
            self.fatal("08P01", "invalid startup sequence: too much data sent before the session started")
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
        self.close(cancel_running=True)

    def pause_writing(self) -> None:  # client is slow: stop reading results
        if self.bproto is not None and self.bproto.transport is not None:
            self.bproto.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.bproto is not None and self.bproto.transport is not None and not self.bproto.closed:
            self.bproto.transport.resume_reading()

    # ------------------------------------------------------------------ startup (proxy/session/startup.py)

    async def read(self, fn):
        """Wait until ``fn()`` (a buffer reader) returns a message."""
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

    def start_relay(self, backend: BackendConnection, status: bytes) -> None:
        """Startup is done: report the backend's parameters, our BackendKeyData, ReadyForQuery."""
        server, gate = self.server, self.gate
        key = server.cancels.register(self)  # (also kept as self.key by the registry)
        out = [m.encode_parameter_status(k, v) for k, v in backend.parameters.items()]
        out.append(m.encode_backend_key_data(*key))
        out.append(m.encode_ready_for_query(status))
        self.transport.write(b"".join(out))
        gate.on_ready_for_query(status)
        note_connection(self, "accepted")
        CLIENT_CONNECTIONS.labels(kind=self.kind_label).inc()
        self._counted = True
        self.counters.started(self.kind_label)
        self.relaying = True
        self._startup_task = None  # done: do not keep the finished task alive
        self.buf.compact()
        if self.pooled:
            self.counters.pool = self.pool
            sc, self.lent = self.lent, None
            if not len(self.buf) and status == b"I" and not self.pooled_settings.dirty:
                # Nothing to relay yet: the connection borrowed for the startup goes back, and the
                # relay core (about 1.4 kB) is made at the client's first message (process_client),
                # so a client that connects and waits holds only this session (an idle pool).
                self._last_sconn = sc
                self.pool.release(sc)
                self._drop_counters()
                return
            self._make_relay(status)
            self._bind_server(sc)
        else:
            self._make_relay(status)
            self._start_backend_relay(backend)
        self.process_client()
        if self.pooled:
            self._maybe_release()

    def _new_counters(self) -> SessionCounters:
        """The session's counters, made again after an idle spell (_drop_counters)."""
        c = self.counters = SessionCounters(self, self.server.tenant_counters)
        if self.relaying:
            c.started(self.kind_label)
            c.pool = self.pool
        return c

    def _drop_counters(self) -> None:
        """An idle pooled session hands its counts to prometheus_client and holds no counters
        (about 170 bytes) until its next message (data_received makes new ones)."""
        c = self.counters
        if c is not None:
            c.flush()
            self.counters = None

    def _make_relay(self, status: bytes) -> Relay:
        catalog = getattr(self.server.gatekeeper, "catalog", None)
        relay = self.relay = Relay(
            self.buf, self.gate, session_id=self.session_id, limits=self.config.limits, audited=self.audited,
            copy_full=getattr(self.config.audit, "copy_data", "digest") == "full",
            counters=self.counters or self._new_counters(),
            tx_status=status, pooled_settings=self.pooled_settings,
            can_refresh=catalog is not None and hasattr(catalog, "refresh_after"))
        return relay

    def _start_backend_relay(self, backend: BackendConnection) -> None:
        self.backend = backend
        bp = self.bproto = backend.protocol
        bp.on_lost = self._backend_lost
        bp.on_pause_writing = self._pause_client
        bp.on_resume_writing = self._resume_client
        self._bwrite = bp.transport.write
        bp.start_relay(self._on_backend_data)

    def retarget(self, region: str) -> bool:
        """The tenant was placed in ``region``: follow it between transactions (startup.retarget)."""
        return retarget(self, region)

    def backstop_call(self, tenant: str | None, mode: str, local: bool) -> str | None:
        """The gate's hook for a tenant switch: a bind call for the current backend connection, or
        None when the proxy rebinds by itself (transaction pooling: at the settings probe)."""
        if self.pooled:
            if not local:
                return None
            binder = self.sconn.binder if self.sconn is not None else None
        else:
            binder = self.binder
        return binder.call(tenant, mode, local) if binder is not None else None

    # ------------------------------------------------------------------ admin console

    def start_admin_console(self, record) -> None:
        if record is None or not getattr(record, "admin", False):
            raise Fatal("28000", f'user "{self.user}" may not use the admin console',
                        hint="the admin console is for users with admin: true in tenantgate's config",
                        outcome="refused")
        from proxy.admin_console import AdminConsole  # the console imports the server's views

        self.console = AdminConsole(self.server, self.write_client, user=self.user, on_idle=self.process_client)
        self.kind_label = "admin"
        self.write_client(self.console.startup_messages())
        note_connection(self, "accepted")
        CLIENT_CONNECTIONS.labels(kind=self.kind_label).inc()
        self._counted = True
        self.relaying = True
        self.process_client()

    def _process_console(self) -> None:
        try:
            while not self.closed and not self.console.busy:  # busy: a PAUSE is waiting
                msg = self.buf.next_message()
                if msg is None:
                    return
                if not self.console.handle(*msg):
                    self.close()
                    return
        except ProtocolError as e:
            self.protocol_fatal(e)
        except Exception:
            log.exception("session %s: admin console failed", self.session_id)
            self.fatal("XX000", "internal error in tenantgate's admin console")

    # ------------------------------------------------------------------ client -> backend

    @property
    def blocked(self) -> bool:
        return self.relay is not None and self.relay.blocked

    def block(self) -> None:
        """Handle no more client messages for now (a PAUSE hold, a pooled connection being
        borrowed).  Reading goes on (so a client that leaves is noticed, and a waiting client
        costs no pause/resume of its socket) until :data:`BLOCKED_READ_AHEAD` bytes wait in the
        buffer; then :meth:`data_received` stops reading, and :meth:`unblock` resumes."""
        self.relay.blocked = True

    def unblock(self) -> None:
        self.relay.blocked = False
        self._resume_client()
        self.process_client()

    def process_client(self) -> None:
        if self.closed:
            return
        if self.console is not None:
            self._process_console()
            return
        relay = self.relay
        if relay is None:
            if not self.pooled or not len(self.buf):
                return
            relay = self._make_relay(b"I")  # the first message of a pooled session (start_relay)
        if relay.blocked:
            return
        if self._cancels_pending and relay.idle and not relay.unsynced:
            # a cancel is on its way to PostgreSQL: the next statement waits until it has arrived
            relay.blocked = self._cancel_hold = True
            return
        sc = self.sconn
        if self.pooled and (sc is None or sc.parked_by is self):  # between transactions
            if not self._wants_backend():
                return
            if self.server.holds.active and hold_if_paused(self):  # PAUSE: before a transaction starts
                return
            if not self._attach():
                return
        elif self.server.holds.active and relay.idle and not relay.unsynced and hold_if_paused(self):
            # held between transactions with a connection still lent (just borrowed for this
            # message, say): give it back, or the sessions PAUSE waits for could not get one
            if self.pooled:
                self._maybe_release()
            return
        try:
            relay.process_client()
        except ProtocolError as e:
            self._flush()
            self.protocol_fatal(e)
            return
        except Exception:
            log.exception("session %s: internal error relaying client messages", self.session_id)
            # what the failing handler left half-sent must not reach PostgreSQL, and the connection's
            # state is unknown: it is closed, never lent again
            relay.to_backend.clear()
            if self.pooled_settings is not None:
                self.pooled_settings.pinned = True
            self._flush()
            self.fatal("XX000", "internal error in tenantgate")
            return
        self._flush()
        if relay.events:
            self._handle_events()
            if self.closed:
                return
        if self.pooled and not relay.inflight:  # all answered by the proxy itself (refusals): release
            self._maybe_release()  # (with anything in flight the connection is not quiet: skip the call)

    def _flush(self) -> None:
        relay = self.relay
        out = relay.to_backend
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            bwrite = self._bwrite
            if bwrite is not None:
                bwrite(data)
            elif self.bproto is not None:
                self.bproto.write(data)
        out = relay.to_client
        if out:
            data = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            self.write_client(data)

    def _handle_events(self) -> None:
        relay = self.relay
        events = relay.events
        relay.events = []
        for ev in events:
            kind = ev[0]
            if kind == AUDIT_AFTER:
                task = self.loop.create_task(self._audit_after(ev[1], ev[2]))
                if self._after_tasks is None:
                    self._after_tasks = set()
                self._after_tasks.add(task)
                task.add_done_callback(self._after_tasks.discard)
            elif kind == UNBLOCK:
                self.loop.call_soon(self._unblock_held)
            elif kind == AUDIT:
                spawn(self.loop, self._audit_task(*ev[1:]))
            elif kind == TERMINATE:
                self.close(cancel_running=False)
                return
            elif kind == OFFLOAD:
                self._pause_client()
                spawn(self.loop, self._analyse_off_loop(*ev[1:]))
            elif kind == WARM_UP:
                self._pause_client()
                spawn(self.loop, self._warm_up_forked(*ev[1:]))
            elif kind == REFRESH:
                self._pause_client()
                spawn(self.loop, self._refresh_then_recheck(ev[1], ev[2], self.loop.time()))

    def _unblock_held(self) -> None:
        if self.relay is not None:
            self.relay.blocked = False
            self.process_client()

    def _wants_backend(self) -> bool:
        """A detached pooled session has a complete message to act on (Terminate needs no backend)."""
        data, pos = self.buf.window()
        if len(data) - pos < 5:
            return False
        if data[pos] == 88:  # Terminate
            self.close(cancel_running=False)
            return False
        (length,) = _unpack_i32(data, pos + 1)
        return len(data) - pos >= 1 + length or length > self.buf.max_length or length < 4

    # ------------------------------------------------------------------ backend -> client

    def _on_backend_data(self, data: bytes) -> None:
        relay = self.relay
        sc = self.sconn
        if sc is not None and sc.parked_by is self:  # nothing asked: not this session's business
            self.pool.unsolicited(sc, data)
            return
        try:
            relay.feed_backend(data)
        except Exception as e:
            # statements that completed earlier in this chunk still get their audit outcome
            relay.events = [ev for ev in relay.events if ev[0] == AUDIT_AFTER]
            self._handle_events()
            if isinstance(e, RelayFatal):
                self._flush()
                self.fatal(e.sqlstate, e.message, e.detail)
            elif isinstance(e, ProtocolError):
                self.fatal("08006", f"invalid data from the database server: {e.message}")
            elif isinstance(e, LedgerError):  # the proxy no longer knows which statements exist: fail closed
                log.error("session %s: %s", self.session_id, e)
                self.fatal("08P01", "tenantgate lost track of the prepared statements of this session", str(e))
            else:
                log.exception("session %s: internal error relaying server messages", self.session_id)
                self.fatal("XX000", "internal error in tenantgate")
            return
        self._flush()
        if relay.events:
            self._handle_events()
        if relay.saw_ready:
            relay.saw_ready = False
            self._after_ready()
        if self.pooled:
            self._maybe_release()

    def _after_ready(self) -> None:
        relay = self.relay
        if relay.tx_status == b"I":
            if self.server.draining and not relay.inflight and not relay.blocked:
                self.loop.call_soon(self._drain_close)
        elif self._idle_tx_s and not relay.inflight:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            self._idle_timer = self.loop.call_later(
                self._idle_tx_s, self.fatal, "25P03", "terminating connection due to idle-in-transaction timeout")

    def write_client(self, data: bytes) -> None:
        if data and self._client_connected and not self.transport.is_closing():
            (self.counters or self._new_counters()).bytes_out += len(data)
            self.transport.write(data)

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
        if not (self.relay is not None and self.relay.backend_fatal):
            self.write_client(m.encode_error(
                "FATAL", "08006", "the connection to the database server was lost",
                "the database server closed the connection unexpectedly"))
        self.close(cancel_running=False)
