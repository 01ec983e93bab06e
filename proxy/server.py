"""The listener: accepts clients, owns TLS, reload (SIGHUP) and drain (SIGTERM).

Start it in-process::

    server = ProxyServer(config, gatekeeper)
    await server.start()            # binds; server.port is the real port (listen.port 0 works)
    ...
    await server.drain()            # or: await server.close()

or run it until a signal with :func:`run_server`.  The server speaks to the
policy only through the :class:`proxy.seam.Gatekeeper` it is given.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time
from pathlib import Path

from proxy.backend_link import connect_backend
from proxy.cancel import CancelRegistry
from proxy.config import Config, load_config, check_rules_file
from proxy.metrics import CONFIG_RELOADS_TOTAL
from proxy.holds import Holds
from proxy.pool import PoolManager
from proxy.seam import Gatekeeper
from proxy.tenant_counters import TenantCounters, tenant_snapshot
from proxy.session.protocol import ClientSession

log = logging.getLogger("tenantgate.server")


def server_ssl_context(config: Config) -> ssl.SSLContext | None:
    """TLS context toward clients, or None when no certificate is configured."""
    if not config.tls.cert_file or not config.tls.key_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.tls.cert_file, config.tls.key_file)
    return ctx


def freeze_startup_heap() -> None:
    """Move everything allocated so far (modules, sqlglot, the rules, pools) out of
    the cyclic GC's reach, so full collections during relaying scan only
    objects made since (``gc.freeze``).  Call once the server has started."""
    import gc

    gc.collect()
    gc.freeze()


def install_uvloop() -> bool:
    """Use uvloop for new event loops when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


#: seconds of client silence after which a pooled session drops an empty relay core (memory)
SHED_IDLE_CORE_S = 5


class ProxyServer:
    """tenantgate's listener.  One instance per listening address.

    ``config`` is the validated :class:`proxy.config.Config`; ``gatekeeper``
    any :class:`proxy.seam.Gatekeeper`.  ``config_path`` (optional) is
    re-read on SIGHUP when signal handlers are installed.  A worker process
    (:mod:`proxy.workers`) passes its own ``cancels`` registry and
    ``reuse_port=True`` so all workers bind the same address.
    """

    def __init__(self, config: Config, gatekeeper: Gatekeeper, *, config_path: str | Path | None = None,
                 cancels: CancelRegistry | None = None, reuse_port: bool = False):
        self.config = config
        self.gatekeeper = gatekeeper
        self.config_path = Path(config_path) if config_path else None
        self.tls_context = server_ssl_context(config)
        self.cancels = cancels if cancels is not None else CancelRegistry()
        self.reuse_port = reuse_port  # several worker processes share the listen address
        self.sessions: set = set()
        self.draining = False
        self.started_at = time.time()
        # transaction pooling: backend connections shared by sessions, per database
        self.pools = PoolManager(config, lambda database: connect_backend(self.config.backend, database, {}))
        self.holds = Holds()  # PAUSE / RESUME (proxy/holds.py)
        self.supervisor_pid: int | None = None  # set in a worker process (proxy/workers.py)
        self.peers = None  # the other workers (proxy/worker_control.Peers), set in a worker process
        self._shutdown_task: asyncio.Task | None = None  # the admin console's SHUTDOWN
        self.tenant_counters = TenantCounters()  # SHOW TENANTS
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task | None = None
        self._closed = asyncio.Event()

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientSession(self), self.config.listen.host, self.config.listen.port,
            reuse_address=True, reuse_port=self.reuse_port or None, backlog=1024,
        )
        self._port = self._server.sockets[0].getsockname()[1]
        self._sweeper = loop.create_task(self._sweep_idle_clients())
        log.info("tenantgate listening on %s:%d", self.host, self.port)

    async def _sweep_idle_clients(self) -> None:
        """``pool.client_idle_timeout_s``: close clients that sent nothing for that long and hold
        no transaction open (a tick a second, reset by each chunk the client sends; the setting
        can change on reload).  A pooled session silent for :data:`SHED_IDLE_CORE_S` seconds
        drops its relay core if it holds nothing (proxy/session/pooled.py, shed_idle_core)."""
        while True:
            await asyncio.sleep(1.0)
            limit = self.config.pool.client_idle_timeout_s
            for s in list(self.sessions):
                s.idle_ticks += 1
                if limit and s.relaying and s.idle and s.idle_ticks > limit:
                    s.fatal("57P05", f"terminating connection due to idle timeout "
                                      f"(pool.client_idle_timeout_s = {limit:g} s)")
                elif s.idle_ticks == SHED_IDLE_CORE_S and s.pooled:
                    s.shed_idle_core()

    @property
    def host(self) -> str:
        return self.config.listen.host

    @property
    def port(self) -> int:
        """The bound port (the real one when listen.port is 0)."""
        assert self._server is not None, "call start() first"
        return self._port

    @property
    def active_sessions(self) -> int:
        return len(self.sessions)

    def session_started(self, session) -> None:
        self.sessions.add(session)

    def session_ended(self, session) -> None:
        self.sessions.discard(session)

    async def serve_forever(self) -> None:
        await self._closed.wait()

    def reload(self, config: Config) -> None:
        """Apply a new config to new connections; existing sessions keep running.

        Changing ``listen`` needs a restart (logged); everything else takes effect
        for the next connection.  Raises (and keeps the old config) when the new
        TLS files cannot be loaded.
        """
        try:
            tls = server_ssl_context(config)
            reload_gatekeeper = getattr(self.gatekeeper, "reload", None)
            if reload_gatekeeper is not None:
                reload_gatekeeper(config)
        except Exception:
            CONFIG_RELOADS_TOTAL.labels(result="error").inc()
            raise
        if config.listen != self.config.listen:
            log.warning("listen address changes need a restart; keeping %s:%s", self.host, self.config.listen.port)
            config = config.model_copy(update={"listen": self.config.listen})
        self.config = config
        self.tls_context = tls
        self.pools.reload(config)
        CONFIG_RELOADS_TOTAL.labels(result="ok").inc()
        log.info("configuration reloaded")

    def reload_from_file(self) -> bool:
        if self.config_path is None:
            return False
        try:
            config = load_config(self.config_path)
            check_rules_file(config, self.config_path)
        except Exception as e:
            CONFIG_RELOADS_TOTAL.labels(result="error").inc()
            log.error("reload failed, keeping the old configuration: %s", e)
            return False
        try:
            self.reload(config)  # counts its own failure
            return True
        except Exception as e:  # RulesError, TLS files, ...: nothing changes
            log.error("reload failed, keeping the old configuration: %s", e)
            return False

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting; close idle sessions now and busy ones when their
        transaction ends, or when ``timeout`` (default ``timeouts.drain_s``) runs out."""
        if timeout is None:
            timeout = self.config.timeouts.drain_s
        self.draining = True
        if self._server is not None:
            self._server.close()
        for s in list(self.sessions):
            if getattr(s, "held_task", None) is not None:  # held by PAUSE: between transactions
                s._drain_close()
            else:
                s.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for s in list(self.sessions):
            s.fatal("57P01", "terminating connection because tenantgate is shutting down")
        await self.close()

    async def close(self) -> None:
        """Close the listener and every session at once."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for s in list(self.sessions):
            s.fatal("57P01", "terminating connection because tenantgate is shutting down")
        self.pools.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 5)
            except (asyncio.TimeoutError, Exception):
                pass
        await asyncio.sleep(0)
        self._closed.set()

    # -------------------------------------------------------------- pause and resume

    async def pause(self, database: str | None = None) -> None:
        """Hold new transactions (of ``database``, or all); return once in-flight ones ended and
        the idle backend connections of the paused pools are closed (PgBouncer's PAUSE)."""
        holds = self.holds
        holds.hold(database=database)
        still = (lambda: holds.everything) if database is None else (lambda: database in holds.databases)
        if not await holds.wait_quiet(lambda: list(self.sessions), database=database, held=still):
            return  # resumed before it was quiet: nothing to close
        for name, pool in list(self.pools.pools.items()):
            if database is None or name == database:
                pool.close_idle()

    def resume(self, database: str | None = None) -> None:
        """Lift PAUSE ``database``, or (None) PAUSE and every PAUSE db."""
        self.holds.release(database=database)

    async def pause_tenant(self, tenant: str) -> None:
        """Hold the tenant's new transactions; return once its in-flight ones have ended.
        The building block of a tenant move: nothing of the tenant runs until resume_tenant()."""
        holds = self.holds
        holds.hold(tenant=tenant)
        await holds.wait_quiet(lambda: list(self.sessions), tenant=tenant, held=lambda: tenant in holds.tenants)

    def resume_tenant(self, tenant: str) -> None:
        self.holds.release(tenant=tenant)

    def kill_client(self, session_id: str) -> bool:
        """KILL_CLIENT: end that client session now (FATAL 08P01, as PgBouncer); False when unknown."""
        for s in list(self.sessions):
            if s.session_id == session_id and not s.closed:
                log.info("KILL_CLIENT: ending session %s (user %s)", session_id, s.user)
                s.fatal("08P01", "admin forced disconnect",
                         detail="the session was ended with KILL_CLIENT in the tenantgate admin console")
                return True
        return False

    def tenant_snapshot(self) -> list[dict]:
        """What SHOW TENANTS prints: per tenant, sessions, transactions, refusals, paused."""
        return tenant_snapshot(self)

    def pool_snapshot(self) -> dict:
        """What the admin console's SHOW POOLS / CLIENTS / SERVERS / STATS print (plain data)."""
        from proxy.pool_view import snapshot

        return snapshot(self)

    def install_signal_handlers(self) -> None:
        """SIGHUP: reload config_path.  SIGTERM/SIGINT: drain and stop."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload_from_file)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: loop.create_task(self.drain()))


async def run_server(
    config: Config,
    gatekeeper: Gatekeeper,
    *,
    ready: asyncio.Event | None = None,
    config_path: str | Path | None = None,
    signals: bool = True,
) -> ProxyServer:
    """Start a :class:`ProxyServer` and serve until it is drained (SIGTERM) or closed."""
    server = ProxyServer(config, gatekeeper, config_path=config_path)
    await server.start()
    if signals:
        server.install_signal_handlers()
    if ready is not None:
        ready.set()
    await server.serve_forever()
    return server
