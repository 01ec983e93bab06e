"""Transaction pooling: bounded pools of backend connections that client sessions borrow.

One :class:`BackendPool` per database.  A transaction-mode session borrows a
:class:`ServerConn` when it has something to send, and gives it back at the
first ReadyForQuery that leaves nothing open (idle, no transaction, nothing
in flight, no unsynced extended-protocol messages).  With ``pool.size``
connections busy, further sessions queue (FIFO) for up to
``pool.queue_timeout_s``.

Fairness between tenants (``pool.max_per_tenant``): at most that many connections are lent to
the sessions of one tenant at a time.  A session whose tenant is at its limit queues even when a
connection is idle, and a released connection goes to the first waiter (FIFO) whose tenant is
below its limit, so one tenant flooding the pool leaves connections for the others.

What belongs to a connection rather than to a client is tracked here too:
the settings applied to it (:mod:`proxy.varcache`) and the server-side names
of prepared statements it holds (the session renames each client's named
statements to names of its own and prepares them again on connections that
lack them; see :mod:`proxy.session.protocol`).

Upkeep (the janitor): idle connections older than ``server_idle_timeout_s``
are closed; a connection past ``server_lifetime_s`` or holding more than
``max_prepared_per_server`` statements is closed when it comes back.  A
connection that PostgreSQL closed while idle is dropped from the pool.

This module does not parse SQL or client messages; it moves connections.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from functools import partial
from typing import Awaitable, Callable

from proxy.backend_link import BackendConnection, BackendError, connect_backend
from proxy.config import Config
from proxy.stats_window import StatsWindow
from proxy.metrics import (
    BACKEND_CONNECTIONS,
    POOL_SERVER_CONNECTIONS,
    POOL_TRANSACTIONS_TOTAL,
    POOL_WAIT_SECONDS,
    POOL_WAITING_CLIENTS,
)

log = logging.getLogger("tenantgate.pool")

#: how often the janitor publishes the pool gauges (they are not touched per transaction)
GAUGE_EVERY_S = 1.0
_ids = itertools.count(1)


class PoolTimeout(Exception):
    """No backend connection became free within ``pool.queue_timeout_s``."""


class ServerConn:
    """One pooled backend connection and what is known about its session state."""

    __slots__ = ("conn", "pool", "state", "prepared", "created", "last_used", "client", "id", "closed",
                 "unnamed_owner", "on_lost", "binder", "generation", "tenant", "parked_by")

    def __init__(self, conn: BackendConnection, pool: "BackendPool"):
        self.conn = conn
        self.pool = pool
        self.state: dict[str, str] = {}  # non-default settings (varcache)
        self.prepared: set[str] = set()  # server-side prepared statement names
        self.created = self.last_used = time.time()
        self.client = None  # the ClientSession it is lent to
        self.id = next(_ids)
        self.closed = False
        self.unnamed_owner = None  # the session whose unnamed statement the connection holds
        self.binder = None  # proxy.backstop.BackendBinder: identity and nonce of the backstop binding
        self.generation = pool.generation  # RECONNECT: older generations are closed when they come back
        self.tenant: str | None = None  # while lent: the tenant it counts against (pool.max_per_tenant)
        self.on_lost = lambda exc: pool._lost(self)  # while idle in the pool: PostgreSQL closed it
        # idle in the pool but still wired to the session that last used it (see BackendPool.park)
        self.parked_by = None

    @property
    def protocol(self):
        return self.conn.protocol

    def healthy(self) -> bool:
        """Open, and nothing arrived while idle (a FATAL from PostgreSQL, say)."""
        p = self.conn.protocol
        return not p.closed and not self.closed and not p.has_buffered_data()


def _expire(fut: asyncio.Future, pool: "BackendPool", timeout: float) -> None:
    """A waiter's queue timeout (BackendPool.acquire)."""
    if not fut.done():
        fut.set_exception(PoolTimeout(
            f"no connection to the database server became free within {timeout:g} s "
            f"(all {pool.size} pooled connections of database {pool.database!r} are busy)"))


class BackendPool:
    """The pool of one database.  ``connect()`` opens a new authenticated backend connection."""

    def __init__(self, database: str, config: Config, connect: Callable[[], Awaitable[BackendConnection]],
                 region: str | None = None):
        self.database = database
        self.region = region or config.default_region()  # the backend entry (proxy/control/placement.py)
        self.config = config
        self._connect = connect
        # idle connections, most recently released last (LIFO reuse); a dict for O(1) removal
        self.idle: dict[ServerConn, None] = {}
        self.servers: set[ServerConn] = set()
        self.connecting = 0
        self.waiters: deque[tuple[asyncio.Future, float, str | None]] = deque()  # (future, since, tenant)
        self.lent_by_tenant: dict[str, int] = {}  # pool.max_per_tenant: connections lent per tenant
        self.baseline: dict[str, str] | None = None  # default settings of a fresh connection
        self.probe_names: dict[tuple[str, ...], tuple[str, ...]] = {}  # interned probe name lists
        # SHOW STATS
        self.xact_count = 0
        self.query_count = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.xact_time_s = 0.0
        self.wait_time_s = 0.0
        self.max_wait_started: float | None = None
        self.generation = 0  # bumped by RECONNECT

    # ------------------------------------------------------------------ borrowing

    @property
    def size(self) -> int:
        return self.config.pool.size

    def _at_limit(self, tenant: str | None) -> bool:
        limit = self.config.pool.max_per_tenant
        return bool(limit) and tenant is not None and self.lent_by_tenant.get(tenant, 0) >= limit

    def _lend(self, sc: ServerConn, tenant: str | None) -> ServerConn:
        if tenant is not None and self.config.pool.max_per_tenant:
            sc.tenant = tenant
            self.lent_by_tenant[tenant] = self.lent_by_tenant.get(tenant, 0) + 1
        return sc

    def _returned(self, sc: ServerConn) -> None:
        """A lent connection is back (released, discarded or lost): its tenant may borrow again."""
        tenant = sc.tenant
        if tenant is not None:
            sc.tenant = None
            n = self.lent_by_tenant.get(tenant, 0) - 1
            if n > 0:
                self.lent_by_tenant[tenant] = n
            else:
                self.lent_by_tenant.pop(tenant, None)

    def take_idle(self, prefer: ServerConn | None = None, wanted: dict[str, str] | None = None,
                  tenant: str | None = None) -> ServerConn | None:
        """A healthy idle connection now, or None.  Prefers ``prefer`` (the client's last one),
        then one whose settings already match ``wanted``, then the most recently used.  None
        when ``tenant`` has ``pool.max_per_tenant`` connections lent already."""
        if self._at_limit(tenant):
            return None
        sc = self._take_idle(prefer, wanted)
        return self._lend(sc, tenant) if sc is not None else None

    def _take_idle(self, prefer: ServerConn | None, wanted: dict[str, str] | None) -> ServerConn | None:
        idle = self.idle
        while idle:
            pick = None
            if prefer is not None and prefer in idle:
                pick = prefer
            elif wanted is not None:
                for sc in reversed(idle):
                    if sc.state == wanted:
                        pick = sc
                        break
            if pick is None:
                pick = next(reversed(idle))
            del idle[pick]
            self._unpark(pick)
            if pick.healthy():
                return pick
            self._drop(pick)
            prefer = None
        return None

    async def acquire(self, timeout: float, tenant: str | None = None) -> ServerConn:
        """An idle connection, a new one while below ``size``, or the next one released (FIFO
        among the sessions whose tenant is below ``pool.max_per_tenant``)."""
        if not self._at_limit(tenant):
            sc = self._take_idle(None, None)
            if sc is not None:
                return self._lend(sc, tenant)
            if len(self.servers) + self.connecting < self.size:
                self._lend_pending(tenant, +1)
                try:
                    sc = await self._open()
                finally:
                    self._lend_pending(tenant, -1)
                return self._lend(sc, tenant)
        fut = self.enqueue(timeout, tenant)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # cancelled just after a connection was handed over: pass it on
                self.release(fut.result())
            raise

    def must_wait(self, tenant: str | None) -> bool:
        """No idle connection may be lent to ``tenant`` now and no new one may be opened for it
        (what :meth:`acquire` finds before it queues; ``take_idle`` was asked first)."""
        return self._at_limit(tenant) or len(self.servers) + self.connecting >= self.size

    def enqueue(self, timeout: float, tenant: str | None = None) -> asyncio.Future:
        """Queue for the next connection released (FIFO among the sessions whose tenant is below
        ``pool.max_per_tenant``): a future that gets the connection, or PoolTimeout after
        ``timeout``; cancelling it leaves the queue.  For callers that checked ``take_idle``
        and the size limit already (:meth:`acquire`, and a pooled session directly, which adds
        a done callback instead of awaiting: no task per wait on a busy pool)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        entry = (fut, time.monotonic(), tenant)
        self.waiters.append(entry)  # (counted by PoolManager.publish: no gauge call per wait)
        # the queue timeout as one timer on the future (asyncio.wait_for costs a second future
        # and callbacks per wait, on the path every transaction takes when the pool is busy)
        timer = loop.call_later(timeout, _expire, fut, self, timeout)
        fut.add_done_callback(partial(self._waited, entry, timer, time.perf_counter()))
        return fut

    def _waited(self, entry, timer: asyncio.TimerHandle, t0: float, fut: asyncio.Future) -> None:
        """A wait ended (served, timed out or cancelled): statistics, and off the queue."""
        timer.cancel()
        took = time.perf_counter() - t0
        self.wait_time_s += took
        POOL_WAIT_SECONDS.observe(took)
        if fut.cancelled() or fut.exception() is not None:
            # a served waiter was taken off the queue by _next_waiter (and deque.remove's miss
            # would format the entry's repr for its ValueError)
            if entry in self.waiters:
                self.waiters.remove(entry)

    def _lend_pending(self, tenant: str | None, delta: int) -> None:
        """A connection being opened for ``tenant`` counts against its limit already."""
        if tenant is not None and self.config.pool.max_per_tenant:
            n = self.lent_by_tenant.get(tenant, 0) + delta
            if n > 0:
                self.lent_by_tenant[tenant] = n
            else:
                self.lent_by_tenant.pop(tenant, None)

    def _next_waiter(self) -> tuple[asyncio.Future, str | None] | None:
        """The first waiting session whose tenant is below its limit (dropping finished ones)."""
        waiters = self.waiters
        while waiters and waiters[0][0].done():
            waiters.popleft()
        for i, (fut, _, tenant) in enumerate(waiters):
            if not fut.done() and not self._at_limit(tenant):
                del waiters[i]
                return fut, tenant
        return None

    def _serve_waiters(self) -> None:
        """Hand idle connections to waiters that may take one now (a tenant's count went down)."""
        while self.idle and self.waiters:
            sc = self._take_idle(None, None)
            if sc is None:
                return
            nxt = self._next_waiter()
            if nxt is None:
                self.idle[sc] = None
                return
            nxt[0].set_result(self._lend(sc, nxt[1]))

    async def _open(self) -> ServerConn:
        self.connecting += 1
        try:
            conn = await self._connect()
        finally:
            self.connecting -= 1
        sc = ServerConn(conn, self)
        self.servers.add(sc)
        BACKEND_CONNECTIONS.inc()
        conn.protocol.on_lost = sc.on_lost
        return sc

    def release(self, sc: ServerConn, *, xact_s: float = 0.0) -> None:
        """Give a connection back (idle, no transaction, nothing in flight)."""
        if sc.closed:
            return
        self._returned(sc)
        sc.client = None
        sc.last_used = time.time()
        self.xact_count += 1
        self.xact_time_s += xact_s
        if not self._reusable(sc):
            self._drop(sc)
            self._serve_waiter_with_new()
            return
        p = sc.protocol
        p.detach()
        p.on_lost = sc.on_lost
        if self.waiters:
            nxt = self._next_waiter()
            if nxt is not None:
                nxt[0].set_result(self._lend(sc, nxt[1]))
                return
        self.idle[sc] = None

    def _reusable(self, sc: ServerConn) -> bool:
        """A connection coming back may be lent again (healthy, young, current generation, not too many prepared)."""
        cfg = self.config.pool
        return (sc.healthy() and sc.last_used - sc.created <= cfg.server_lifetime_s and sc.generation == self.generation
                and len(sc.prepared) <= cfg.max_prepared_per_server and len(self.servers) <= self.size)

    # ------------------------------------------------------------------ parking (the hot path of transaction mode)
    #
    # A connection released by a session at the end of its transaction is idle in the pool like
    # any other: any session may take it.  Parking only spares the releasing session the unwiring
    # and rewiring of the backend relay when it is the next one to use it (the common case: a
    # client's next transaction comes before anyone else needs that connection).  Whoever takes a
    # parked connection from ``idle`` (another session, the janitor, RECONNECT, PAUSE, a lost
    # connection) unparks it first: the session lets go of it synchronously (:meth:`_unpark`).

    def park(self, sc: ServerConn, session, *, xact_s: float = 0.0) -> bool:
        """Release ``sc`` into ``idle`` while ``session`` stays wired to it; False (nothing done)
        when it must be released normally instead (sessions waiting, or not reusable)."""
        if sc.closed or self.waiters:
            return False
        sc.last_used = now = time.time()
        cfg = self.config.pool
        if not (now - sc.created <= cfg.server_lifetime_s and sc.generation == self.generation
                and len(sc.prepared) <= cfg.max_prepared_per_server and len(self.servers) <= self.size
                and not sc.conn.protocol.closed):
            return False
        self._returned(sc)
        sc.client = None
        self.xact_count += 1
        self.xact_time_s += xact_s
        sc.parked_by = session
        sc.conn.protocol.on_lost = sc.on_lost
        self.idle[sc] = None
        return True

    def reclaim(self, sc: ServerConn, session, tenant: str | None, wanted: dict[str, str]) -> bool:
        """``session``'s parked connection lent to it again, when nobody took it meanwhile and its
        settings still match; otherwise it is unparked (and stays idle) and False is returned."""
        if sc.parked_by is not session:
            return False
        if sc.closed or (sc.state is not wanted and sc.state != wanted) or self._at_limit(tenant):
            self._unpark(sc)
            return False
        del self.idle[sc]
        sc.parked_by = None
        sc.client = session
        self._lend(sc, tenant)
        return True

    def unpark(self, sc: ServerConn) -> None:
        """The parked session lets go of ``sc`` (it closes, or follows its tenant elsewhere); it stays idle."""
        self._unpark(sc)

    def unsolicited(self, sc: ServerConn, data: bytes) -> None:
        """PostgreSQL sent something on a parked connection (a FATAL before closing, say): it is
        unparked and buffers the bytes, which make it unhealthy, as on any idle connection."""
        self._unpark(sc)
        sc.conn.protocol.data_received(data)

    def _unpark(self, sc: ServerConn) -> None:
        session = sc.parked_by
        if session is None:
            return
        sc.parked_by = None
        session.parked_connection_taken(sc)
        p = sc.conn.protocol
        p.detach()
        p.on_lost = sc.on_lost

    def discard(self, sc: ServerConn) -> None:
        """Close a lent connection whose state is unknown (client gone mid-transaction, pinned, broken)."""
        if sc.closed:
            return
        self._drop(sc)
        self._serve_waiters()
        self._serve_waiter_with_new()

    def _serve_waiter_with_new(self) -> None:
        """A connection went away while clients wait: open a replacement for the first waiter."""
        if not self.waiters or len(self.servers) + self.connecting >= self.size:
            return
        nxt = self._next_waiter()
        if nxt is None:
            return
        fut, tenant = nxt
        self._lend_pending(tenant, +1)

        async def open_for_waiter():
            try:
                sc = await self._open()
            except BaseException as e:  # hand the error to the waiter
                self._lend_pending(tenant, -1)
                if not fut.done():
                    fut.set_exception(e if isinstance(e, Exception) else BackendError("cancelled"))
                self._serve_waiters()
                return
            self._lend_pending(tenant, -1)
            if fut.done():
                self.release(sc)
            else:
                fut.set_result(self._lend(sc, tenant))

        asyncio.get_running_loop().create_task(open_for_waiter())

    def _lost(self, sc: ServerConn) -> None:
        """PostgreSQL closed a connection (while idle here; a lent one is the session's business)."""
        if sc in self.idle:
            del self.idle[sc]
            self._drop(sc)

    def _drop(self, sc: ServerConn) -> None:
        if sc.closed:
            return
        self._unpark(sc)
        self._returned(sc)
        sc.closed = True
        self.servers.discard(sc)
        BACKEND_CONNECTIONS.dec()
        p = sc.conn.protocol
        p.on_lost = None
        p.close(terminate=True)

    # ------------------------------------------------------------------ upkeep

    def janitor(self) -> None:
        """Close idle connections idle longer than ``server_idle_timeout_s`` or past their lifetime."""
        now = time.time()
        cfg = self.config.pool
        for sc in list(self.idle):
            if now - sc.last_used > cfg.server_idle_timeout_s or now - sc.created > cfg.server_lifetime_s \
                    or not sc.healthy():
                del self.idle[sc]
                self._drop(sc)

    def reconnect(self) -> int:
        """RECONNECT: close every connection of this pool once it is released (idle ones now);
        new ones are opened as needed.  Returns how many connections were marked."""
        self.generation += 1
        marked = len(self.servers)
        for sc in list(self.idle):
            del self.idle[sc]
            self._drop(sc)
        return marked

    def close_idle(self) -> None:
        """PAUSE: close the idle connections (PgBouncer disconnects its servers while paused)."""
        for sc in list(self.idle):
            del self.idle[sc]
            self._drop(sc)

    def close(self) -> None:
        for sc in list(self.idle):
            self._drop(sc)
        self.idle.clear()
        while self.waiters:
            fut = self.waiters.popleft()[0]
            if not fut.done():
                fut.set_exception(BackendError("tenantgate is shutting down", "57P01"))

    # ------------------------------------------------------------------ SHOW

    def totals(self) -> dict[str, int]:
        """The running totals SHOW STATS prints (PgBouncer's units: bytes, microseconds)."""
        xact_us = int(self.xact_time_s * 1e6)
        return {"total_xact_count": self.xact_count, "total_query_count": self.query_count,
                "total_received": self.bytes_received, "total_sent": self.bytes_sent,
                "total_xact_time_us": xact_us, "total_query_time_us": xact_us,
                "total_wait_time_us": int(self.wait_time_s * 1e6)}

    def maxwait_s(self) -> float:
        return time.monotonic() - self.waiters[0][1] if self.waiters else 0.0


class PoolManager:
    """All pools of one proxy process, by database, plus the janitor task."""

    def __init__(self, config: Config, connect: Callable[[str], Awaitable[BackendConnection]]):
        self.config = config
        self._connect = connect
        self.pools: dict[str, BackendPool] = {}
        self._janitor: asyncio.Task | None = None
        self.stats_window = StatsWindow()  # SHOW STATS averages: the last 60 s

    def get(self, database: str, region: str | None = None) -> BackendPool:
        """The pool of ``database`` on ``region``'s backend (None: the default region).  Pools of the
        default region are keyed by the database name alone, others by ``database@region``."""
        key = database if region is None or region == self.config.default_region() else f"{database}@{region}"
        pool = self.pools.get(key)
        if pool is None:
            if key == database:
                connect = lambda: self._connect(database)  # noqa: E731
            else:
                backend = self.config.backend_of(region)
                connect = lambda: connect_backend(backend, database, {})  # noqa: E731
            pool = self.pools[key] = BackendPool(database, self.config, connect, region)
            if self._janitor is None:
                self._janitor = asyncio.get_running_loop().create_task(self._run_janitor())
        return pool

    def reload(self, config: Config) -> None:
        self.config = config
        for p in self.pools.values():
            p.config = config

    async def _run_janitor(self) -> None:
        last_upkeep = time.monotonic()
        published = 0
        while True:
            await asyncio.sleep(GAUGE_EVERY_S)
            self.publish()
            self.stats_window.record(time.monotonic(), {n: p.totals() for n, p in self.pools.items()})
            xacts = sum(p.xact_count for p in self.pools.values())
            POOL_TRANSACTIONS_TOTAL.inc(xacts - published)
            published = xacts
            if time.monotonic() - last_upkeep < min(5.0, self.config.pool.server_idle_timeout_s / 2):
                continue
            last_upkeep = time.monotonic()
            for p in list(self.pools.values()):
                try:
                    p.janitor()
                except Exception:  # pragma: no cover - never let upkeep die
                    log.exception("pool janitor failed")

    def publish(self) -> None:
        """Set the pool gauges (lent and idle connections, waiting clients) from the pools' state."""
        by_region: dict[str, list[int]] = {r: [0, 0] for r in self.config.region_names()}
        waiting = 0
        for p in self.pools.values():
            waiting += sum(1 for w in p.waiters if not w[0].done())
            counts = by_region.setdefault(p.region, [0, 0])
            counts[0] += len(p.idle)
            counts[1] += len(p.servers)
        for region, (idle, total) in by_region.items():
            POOL_SERVER_CONNECTIONS.labels(state="idle", region=region).set(idle)
            POOL_SERVER_CONNECTIONS.labels(state="active", region=region).set(total - idle)
        POOL_WAITING_CLIENTS.set(waiting)

    def close(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
            self._janitor = None
        for p in self.pools.values():
            p.close()

