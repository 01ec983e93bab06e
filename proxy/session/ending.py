"""The end of a client session, and cancels: part of :class:`proxy.session.protocol.ClientSession`
(a base class of it).

A CancelRequest reaches PostgreSQL only while this client has a statement running on its
connection, and the client's next statement waits until the cancel has been delivered (in
transaction pooling it could hit another client's statement otherwise).  ``close`` is the one
way a session ends: the pooled connection goes back to the pool only when the relay core says
it is quiet (:meth:`proxy.session.relay.Relay.quiet`), else it is discarded.
"""

from __future__ import annotations

import asyncio
import logging
import time

from proxy.backend_link import BackendConnection, send_cancel
from proxy.metrics import BACKEND_CONNECTIONS, CLIENT_CONNECTIONS, PROTOCOL_ERRORS_TOTAL
from proxy.session.startup import session_backend
from proxy.wire import messages as m
from proxy.wire.errors import ProtocolError
from proxy.wire.frontend import Phase

log = logging.getLogger("tenantgate.session")

# Fire-and-forget tasks (cancel delivery, audit, gate close): the event loop keeps only weak
# references to tasks, so one that is waiting could be garbage-collected mid-flight ("Task was
# destroyed but it is pending"); this set holds them until they finish.
_BACKGROUND: set[asyncio.Task] = set()


def spawn(loop: asyncio.AbstractEventLoop, coro) -> asyncio.Task:
    task = loop.create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return task


class SessionEnd:
    """Cancel, drain and close of :class:`proxy.session.protocol.ClientSession`."""

    __slots__ = ()

    def cancel_backend_query(self) -> None:
        """Called by the CancelRegistry for a valid CancelRequest.  A pooled connection is only
        cancelled while this client has a statement running on it, and is not given back until
        the cancel has been delivered (else it could hit the next client's query)."""
        b = self.backend
        if b is None or self.closed:
            return
        # PostgreSQL ignores a cancel for an idle backend: so does tenantgate.  A cancel is
        # delivered asynchronously, so until it has reached PostgreSQL the client's next
        # statement waits (else the late cancel would hit it, or another client's in pooling)
        if not self.inflight or self._cancels_pending:  # nothing running, or a cancel already on its way
            return
        self._cancels_pending += 1
        spawn(self.loop, self._deliver_cancel(b))

    async def _deliver_cancel(self, b: BackendConnection) -> None:
        try:
            await send_cancel(session_backend(self), b.pid, b.secret)
        finally:
            self._cancels_pending -= 1
            if self._cancels_pending == 0 and self._cancel_hold:
                self._cancel_hold = False
                if not self.closed:
                    self.relay.blocked = False
                    if self.pooled:
                        self._maybe_release()
                    self.process_client()

    def terminator(self, sqlstate: str, message: str) -> None:
        """Given to the gate: end this session (FATAL to the client, backend closed)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.loop.call_soon(self.fatal, sqlstate, message)
        else:
            self.loop.call_soon_threadsafe(self.fatal, sqlstate, message)

    def _drain_close(self) -> None:
        if not self.closed:
            self.fatal("57P01", "terminating connection because tenantgate is shutting down")

    def drain(self) -> None:
        """Server shutdown: close now when idle, else at the next idle ReadyForQuery."""
        if self.closed:
            return
        if not self.relaying:
            self.close()
        elif self.tx_status == b"I" and not self.inflight and not self.blocked:
            self._drain_close()

    def protocol_fatal(self, e: ProtocolError) -> None:
        PROTOCOL_ERRORS_TOTAL.labels(reason=e.reason).inc()
        self.fatal(e.sqlstate, e.message)

    def fatal(self, sqlstate: str, message: str, detail: str | None = None, hint: str | None = None) -> None:
        if self.closed:
            return
        self.write_client(m.encode_error("FATAL", sqlstate, message, detail, hint))
        self.close(cancel_running=True)

    def close(self, cancel_running: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.relaying = False
        relay = self.relay
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        task = self._startup_task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
        self._bwrite = None
        if self.attach_task is not None:
            self.attach_task.cancel()
        if self.held_task is not None:
            self.held_task.cancel()
        if self.console is not None:
            self.console.close()
        b = self.backend
        if b is not None and self.parked:
            self.let_go_of_parked()  # released at the end of the last transaction: idle in the pool already
        elif b is not None:
            busy = relay is not None and (relay.inflight or relay.fstate.phase is Phase.COPY_IN)
            if cancel_running and busy and not b.protocol.closed:
                spawn(self.loop, send_cancel(session_backend(self), b.pid, b.secret))
            sc = self.sconn
            if sc is not None:
                clean = (relay.quiet() and not self.pooled_settings.dirty and not self._cancels_pending)
                self._detach_server()
                if clean:
                    self.pool.release(sc, xact_s=time.perf_counter() - self._attach_t0)
                else:  # its state is unknown (open transaction, session state): never lend it again
                    self.pool.discard(sc)
            else:
                b.protocol.on_lost = None
                b.protocol.close(terminate=True)
                BACKEND_CONNECTIONS.dec()
        elif self.lent is not None:  # borrowed for startup, closed before the relay started
            self.pool.discard(self.lent)
            self.lent = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if self.key is not None:
            self.server.cancels.unregister(self.key[0])
        self._drop_counters()
        if self._counted:
            CLIENT_CONNECTIONS.labels(kind=self.kind_label).dec()
        gate = self.gate
        if gate is not None:
            spawn(self.loop, self._close_gate(gate))
        self.server.session_ended(self)

    async def _close_gate(self, gate) -> None:
        if self._after_tasks:
            await asyncio.gather(*self._after_tasks, return_exceptions=True)
        try:
            await gate.close()
        except Exception:
            log.exception("session %s: gate.close failed", self.session_id)
