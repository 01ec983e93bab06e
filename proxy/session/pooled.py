"""Transaction pooling for a client session: borrow, sync, release.

A tenant session in transaction mode borrows a backend connection (proxy/pool.py) when it
starts a transaction and gives it back at the first idle ReadyForQuery.  A borrowed
connection gets this session's settings first (one round trip, only when they differ:
proxy/varcache.py); a connection goes back to the pool only when the relay core says it is
quiet (:meth:`proxy.session.relay.Relay.quiet`), which is the same rule at release and at
close.  The I/O side of the pooled session lives here; the protocol state in the relay core.
"""

from __future__ import annotations

import asyncio
import logging
import time

from proxy import backstop, varcache
from proxy.backend_link import BackendConnection, BackendError
from proxy.pool import PoolTimeout, ServerConn
from proxy.wire import messages as m
from proxy.wire.errors import ProtocolError

log = logging.getLogger("tenantgate.session")


async def server_query(conn: BackendConnection, sql: str) -> list:
    """Run one tenantgate statement on a connection nobody relays (pooled, between clients, or
    during startup): returns the first row's values; ParameterStatus updates ``conn.parameters``."""
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


async def server_binder(sc: ServerConn, bkey: bytes) -> backstop.BackendBinder:
    """The backstop binder of a pooled connection (its identity is read once)."""
    binder = sc.binder
    if binder is None:
        row = await server_query(sc.conn, backstop.IDENTITY_SQL)
        binder = sc.binder = backstop.BackendBinder.from_identity_row(bkey, row)
    return binder


async def sync_server(sc: ServerConn, settings) -> None:
    """Give a borrowed connection this session's settings (one round trip, only when they differ)."""
    pool = settings.pool
    if pool.baseline is None:
        names = settings.probe_names
        values = await server_query(sc.conn, varcache.probe_sql(names)) if names else []
        if pool.baseline is None:
            pool.baseline = {n: v.decode() for n, v in zip(names, values) if v is not None}
    wanted = settings.wanted
    if sc.state == wanted:  # the common case: nothing to send, nothing to copy
        return
    to_set, to_reset = varcache.changes(sc.state, wanted, pool.baseline)
    if to_set or to_reset:
        sc.unnamed_owner = None  # a simple Query drops the unnamed statement
        bind = None
        if backstop.BINDING_SETTING in to_set or backstop.BINDING_SETTING in to_reset:
            bind = (await server_binder(sc, settings.bkey)).call_value
        await server_query(sc.conn, varcache.apply_sql(to_set, to_reset, bind))
    sc.state = settings.wanted  # read-only and shared (proxy.session.settings.shared)


def take_idle_in_sync(settings, gate, last: ServerConn | None) -> tuple[ServerConn | None, bool]:
    """An idle connection for this session without waiting: ``(sc, ready)``; ``ready`` when its
    settings already match (no round trip needed)."""
    wanted = settings.refresh_wanted(gate)
    pool = settings.pool
    sc = pool.take_idle(last, wanted, getattr(gate, "tenant", None))
    return sc, sc is not None and in_sync(sc, wanted, pool)


def in_sync(sc: ServerConn, wanted: dict[str, str], pool) -> bool:
    """Whether ``sc`` already has the settings ``wanted`` (it may be lent without a round trip)."""
    return sc.state == wanted or varcache.changes(sc.state, wanted, pool.baseline or {}) == ({}, [])


class PooledSession:
    """Borrow and release of :class:`proxy.session.protocol.ClientSession` (a base class of it)."""

    __slots__ = ()

    def _bind_server(self, sc: ServerConn) -> None:
        self.sconn = sc
        self.relay.sconn = sc
        self._last_sconn = sc
        sc.client = self
        self._attach_t0 = time.perf_counter()
        self.request_time = time.time()
        self._start_backend_relay(sc.conn)

    def _attach(self) -> bool:
        """Borrow a connection for what the client sent; True when attached right away."""
        sc = self.sconn
        if sc is not None:  # parked since this session's last transaction (BackendPool.park)
            gate = self.gate
            if self.pool.reclaim(sc, self, getattr(gate, "tenant", None), self.pooled_settings.refresh_wanted(gate)):
                self.bproto.on_lost = self._backend_lost
                self._attach_t0 = time.perf_counter()
                self.request_time = time.time()
                return True
            # taken back by the pool (unparked): this session no longer holds it
        sc, ready = take_idle_in_sync(self.pooled_settings, self.gate, self._last_sconn)
        if ready:
            self._bind_server(sc)
            return True
        self.block()
        pool = self.pool
        tenant = getattr(self.gate, "tenant", None)
        if sc is None and pool.must_wait(tenant):
            # the pool is busy: queue with a callback (no task per transaction on a busy pool)
            fut = self.attach_task = pool.enqueue(self.config.pool.queue_timeout_s, tenant)
            fut.add_done_callback(self._attach_handed)
            return False
        self.attach_task = self.loop.create_task(self._attach_slow(sc))
        return False

    def _attach_handed(self, fut) -> None:
        """The pool's answer to :meth:`_attach`'s place in the queue (a done callback)."""
        if self.attach_task is fut:
            self.attach_task = None
        if fut.cancelled():  # the session closed while queued (ending.py cancels attach_task)
            return
        exc = fut.exception()
        if exc is not None:
            self._attach_failed(exc, None)
            return
        sc = fut.result()
        if self.closed:
            self.pool.release(sc)
            return
        settings = self.pooled_settings
        if not in_sync(sc, settings.wanted, settings.pool):  # one round trip first
            self.attach_task = self.loop.create_task(self._attach_slow(sc))
            return
        self._bind_server(sc)
        self.unblock()

    def _attach_failed(self, e: BaseException, sc: ServerConn | None) -> None:
        """Borrowing failed: the session ends with the error (a connection it got is closed)."""
        pool = self.pool
        if isinstance(e, PoolTimeout):
            self.fatal("53300", str(e), hint="try again later, or raise pool.size")
            return
        if sc is not None:
            pool.discard(sc)
        if isinstance(e, BackendError):
            self.fatal(e.sqlstate, "could not prepare a database connection for this session", e.message)
        elif not isinstance(e, asyncio.CancelledError):
            log.error("session %s: attaching a pooled connection failed", self.session_id, exc_info=e)
            self.fatal("XX000", "internal error in tenantgate")

    async def _attach_slow(self, sc: ServerConn | None) -> None:
        pool = self.pool
        try:
            if sc is None:
                sc = await pool.acquire(self.config.pool.queue_timeout_s, getattr(self.gate, "tenant", None))
            await sync_server(sc, self.pooled_settings)
        except (Exception, asyncio.CancelledError) as e:
            self._attach_failed(e, sc)
            return
        finally:
            self.attach_task = None
        if self.closed:
            pool.release(sc)
            return
        self._bind_server(sc)
        self.unblock()

    def _maybe_release(self) -> None:
        """Give the connection back when nothing is open on it (transaction mode)."""
        sc = self.sconn
        relay = self.relay
        # (blocked by a PAUSE hold is no reason to keep it: only a borrow or a cancel in progress)
        if sc is None or self.closed or (relay.blocked and self.held_task is None) or relay.held is not None \
                or sc.parked_by is not None or not relay.quiet():
            return
        if self._cancels_pending:
            # a cancel is on its way to this connection: hold the client's next messages and give
            # the connection back only once the cancel has been delivered (then queue as usual)
            relay.blocked = self._cancel_hold = True
            return
        if self.pooled_settings.dirty:
            relay.send_probe()
            self._flush()
            return
        self.counters.count_pool_bytes()
        xact_s = time.perf_counter() - self._attach_t0
        # parked: idle in the pool, still wired to this session for its next transaction
        if not self.pool.park(sc, self, xact_s=xact_s):
            self._detach_server()
            self.pool.release(sc, xact_s=xact_s)

    def shed_idle_core(self) -> bool:
        """A pooled session idle between transactions drops its relay core when the core holds
        nothing a new one would not (Relay.pristine), letting go of its parked connection (which
        stays idle in the pool); its next message makes a new core (protocol.process_client).
        Called by the server's once-a-second sweep; True when the core was dropped."""
        relay = self.relay
        if (relay is None or self.closed or not self.relaying or not self.pooled or self.attach_task is not None
                or self.held_task is not None or self._cancels_pending or self._cancel_hold or len(self.buf)
                or not relay.pristine()):
            return False
        sc = self.sconn
        if sc is not None:
            if sc.parked_by is not self:  # lent to this session (pristine says quiet: not expected)
                return False
            self.let_go_of_parked()
        self.relay = None
        self._drop_counters()
        log.debug("session %s: idle, relay core dropped%s", self.session_id,
                  " and its parked connection let go" if sc is not None else "")
        return True

    @property
    def parked(self) -> bool:
        """Between transactions, with the connection of the last one parked (idle in the pool)."""
        sc = self.sconn
        return sc is not None and sc.parked_by is self

    def parked_connection_taken(self, sc: ServerConn) -> None:
        """The pool took back the connection parked for this session (BackendPool._unpark)."""
        if self.sconn is sc:
            self._detach_server()

    def let_go_of_parked(self) -> None:
        """Unwire the parked connection (it stays idle in the pool)."""
        sc = self.sconn
        if sc is not None and sc.parked_by is self:
            self.pool.unpark(sc)

    def _detach_server(self) -> None:
        sc = self.sconn
        self.sconn = None
        self.relay.sconn = None
        self.backend = None
        self.bproto = None
        self._bwrite = None
        self.relay.stmts.parse_fifo.clear()
        sc.client = None
