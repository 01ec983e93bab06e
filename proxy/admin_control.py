"""The admin console's control commands: PgBouncer's PAUSE, RESUME, RECONNECT, KILL_CLIENT,
RELOAD and SHUTDOWN, plus PAUSE TENANT / RESUME TENANT, which PgBouncer cannot offer.

:class:`ControlCommands` is mixed into :class:`proxy.admin_console.AdminConsole`.
Each ``cmd_<verb>(args)`` returns the response bytes (no ReadyForQuery), or a
coroutine for the commands that wait (PAUSE: until in-flight transactions have
ended), or raises :class:`proxy.admin_show.ConsoleError`.  Errors carry SQLSTATE
08P01 with PgBouncer's wording, as PgBouncer's console does, so scripts written
for PgBouncer read them the same way.

What acts on the proxy lives on :class:`proxy.server.ProxyServer` (``pause``,
``resume``, ``pause_tenant``, ``resume_tenant``) and :class:`proxy.pool.BackendPool`
(``reconnect``); this module parses, checks and reports.  With ``workers: N``,
RELOAD and SHUTDOWN reach every worker through the supervisor's signals
(SIGHUP, SIGTERM); PAUSE, RESUME, RECONNECT and KILL_CLIENT act on the worker
that serves the console connection and, through ``server.peers``
(:mod:`proxy.worker_control`), on every other worker (docs/admin-console.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any, Awaitable

from proxy.admin_show import ConsoleError, Result, _cols
from proxy.wire import messages as m
from proxy.wire.rows import encode_command_complete

log = logging.getLogger("tenantgate.admin")

#: PgBouncer's SQLSTATE for every admin console error
ADMIN_ERROR = "08P01"


def reload_configuration(server: Any) -> tuple[bool, str]:
    """The reload entry point of RELOAD (the same as SIGHUP): (ok, what happened).

    The one place to change when the reload entry point changes."""
    if getattr(server, "config_path", None) is None:
        return False, "no configuration file to reload (the proxy was started without one)"
    ok = server.reload_from_file()
    if ok:
        return True, f"configuration reloaded from {server.config_path}"
    return False, "RELOAD failed, the old configuration stays in force: see the proxy's log"


def _signal_supervisor(server: Any, sig: int) -> bool:
    """With worker processes: signal the supervisor, which forwards to every worker."""
    pid = getattr(server, "supervisor_pid", None)
    if not pid:
        return False
    try:
        os.kill(pid, sig)
        return True
    except OSError as e:
        log.warning("could not signal the supervisor (pid %s): %s", pid, e)
        return False


class ControlCommands:
    """The control commands; the console provides ``server`` and ``user``."""

    server: Any
    user: str | None

    CONTROL = ("PAUSE", "RESUME", "RECONNECT", "KILL_CLIENT", "RELOAD", "SHUTDOWN")

    # ---- helpers

    def _control(self, verb: str) -> Any:
        """The server, when it can be controlled (a bare console in tests has only SHOW data)."""
        server = self.server
        if getattr(server, "holds", None) is None:
            raise ConsoleError("0A000", f"{verb} is not available: this console has no proxy to control")
        return server

    def _admin_database(self) -> str:
        cfg = getattr(self.server, "config", None)
        return getattr(getattr(cfg, "admin", None), "database", "tenantgate")

    def _known_databases(self) -> set[str]:
        names: set[str] = set()
        pools = getattr(getattr(self.server, "pools", None), "pools", {}) or {}
        names.update(pools)
        for s in list(getattr(self.server, "sessions", ())):
            if getattr(s, "database", None) and getattr(s, "console", None) is None:
                names.add(s.database)
        backend = getattr(getattr(self.server, "config", None), "backend", None)
        if getattr(backend, "database", None):
            names.add(backend.database)
        return names

    def _database_arg(self, verb: str, args: list[str]) -> str | None:
        if not args:
            return None
        if len(args) != 1:
            raise ConsoleError("42601", f"syntax error: {verb} takes at most one database name")
        db = args[0].strip('"')
        if db == self._admin_database():
            raise ConsoleError(ADMIN_ERROR, f"cannot {verb.lower()} admin db: {db}")
        if db not in self._known_databases():
            raise ConsoleError(ADMIN_ERROR, f"no such database: {db}")
        return db

    @staticmethod
    def _tenant_arg(verb: str, args: list[str]) -> str | None:
        """``TENANT name`` -> name; None when the command is not about a tenant."""
        if not args or args[0].upper() != "TENANT":
            return None
        if len(args) != 2:
            raise ConsoleError("42601", f"syntax error: {verb} TENANT takes exactly one tenant name")
        return args[1].strip("'\"")

    async def _on_peers(self, verb: str, req: dict) -> list[dict]:
        """With worker processes: the same request on every other worker; raises when one failed."""
        peers = getattr(self.server, "peers", None)
        if peers is None:
            return []
        replies = await peers.broadcast(req)
        failed = [r.get("error", "failed") for r in replies if not r.get("ok")]
        if failed:
            raise ConsoleError(ADMIN_ERROR, f"{verb} did not reach every worker process",
                               detail="; ".join(failed),
                               hint="this worker has done it; check the workers and repeat the command")
        return replies

    # ---- PAUSE / RESUME

    def cmd_pause(self, args: list[str]) -> Awaitable[bytes] | bytes:
        server = self._control("PAUSE")
        holds = server.holds
        tenant = self._tenant_arg("PAUSE", args)
        if tenant is not None:
            if tenant in holds.tenants:
                raise ConsoleError(ADMIN_ERROR, f"tenant {tenant} is already paused")
            log.info("PAUSE TENANT %s issued by %s", tenant, self.user)

            async def pause_tenant() -> bytes:
                await asyncio.gather(server.pause_tenant(tenant),
                                     self._on_peers("PAUSE", {"op": "pause", "tenant": tenant}))
                return encode_command_complete("PAUSE")
            return pause_tenant()
        if holds.everything:
            raise ConsoleError(ADMIN_ERROR, "already suspended/paused")
        db = self._database_arg("PAUSE", args)
        log.info("PAUSE %s issued by %s", db or "(all databases)", self.user)

        async def pause() -> bytes:
            await asyncio.gather(server.pause(db), self._on_peers("PAUSE", {"op": "pause", "database": db}))
            return encode_command_complete("PAUSE")
        return pause()

    def cmd_resume(self, args: list[str]) -> Awaitable[bytes]:
        server = self._control("RESUME")
        holds = server.holds
        tenant = self._tenant_arg("RESUME", args)
        db = None
        if tenant is not None:
            if tenant not in holds.tenants:
                raise ConsoleError(ADMIN_ERROR, f"tenant {tenant} is not paused")
            server.resume_tenant(tenant)
        elif not args:
            if getattr(server, "draining", False):
                raise ConsoleError(ADMIN_ERROR, "pooler is shutting down")
            if not holds.everything and not holds.databases:
                raise ConsoleError(ADMIN_ERROR, "pooler is not paused/suspended")
            server.resume(None)
        else:
            db = self._database_arg("RESUME", args)
            if db not in holds.databases:
                raise ConsoleError(ADMIN_ERROR, f"database {db} is not paused")
            server.resume(db)
        log.info("RESUME %s issued by %s", " ".join(args) or "(all)", self.user)

        async def on_peers() -> bytes:
            await self._on_peers("RESUME", {"op": "resume", "database": db, "tenant": tenant})
            return encode_command_complete("RESUME")
        return on_peers()

    # ---- RECONNECT, KILL_CLIENT

    def cmd_reconnect(self, args: list[str]) -> bytes:
        self._control("RECONNECT")
        db = self._database_arg("RECONNECT", args)
        n = 0
        for name, pool in list(self.server.pools.pools.items()):
            if db is None or name == db:
                n += pool.reconnect()
        log.info("RECONNECT %s issued by %s: %d server connections to recycle", db or "(all)", self.user, n)

        async def on_peers() -> bytes:
            await self._on_peers("RECONNECT", {"op": "reconnect", "database": db})
            return encode_command_complete("RECONNECT")
        return on_peers()

    def cmd_kill_client(self, args: list[str]) -> Awaitable[bytes] | bytes:
        if len(args) != 1:
            raise ConsoleError(ADMIN_ERROR, "invalid client pointer supplied")
        target = args[0].strip("'\"")
        server = self._control("KILL_CLIENT")
        log.info("KILL_CLIENT %s issued by %s", target, self.user)
        if server.kill_client(target):
            return encode_command_complete("KILL_CLIENT")
        if getattr(server, "peers", None) is None:
            raise ConsoleError(ADMIN_ERROR, "client not found")

        async def on_peers() -> bytes:  # the client may be on another worker
            replies = await self._on_peers("KILL_CLIENT", {"op": "kill_client", "id": target})
            if not any(r.get("found") for r in replies):
                raise ConsoleError(ADMIN_ERROR, "client not found")
            return encode_command_complete("KILL_CLIENT")
        return on_peers()

    # ---- RELOAD, SHUTDOWN

    def cmd_reload(self, args: list[str]) -> bytes:
        if args:
            raise ConsoleError("42601", "syntax error: RELOAD takes no arguments")
        log.info("RELOAD issued by %s", self.user)
        ok, detail = reload_configuration(self._control("RELOAD"))
        if ok and _signal_supervisor(self.server, signal.SIGHUP):
            detail += "; SIGHUP sent to the supervisor, every worker reloads"
        if not ok:
            raise ConsoleError("F0000", "RELOAD failed, see logs for additional details", detail=detail)
        return Result(_cols("result detail"), (("ok", detail),), tag="RELOAD").encode()

    def cmd_shutdown(self, args: list[str]) -> bytes:
        if args:
            raise ConsoleError("42601", "syntax error: SHUTDOWN takes no arguments")
        server = self._control("SHUTDOWN")
        log.info("SHUTDOWN issued by %s: draining", self.user)
        if not _signal_supervisor(server, signal.SIGTERM):
            task = asyncio.get_running_loop().create_task(server.drain())
            server._shutdown_task = task  # keep a reference until it is done
        return m.encode_error("NOTICE", "00000", "tenantgate is shutting down: sessions close as their "
                              "transactions end", notice=True) + encode_command_complete("SHUTDOWN")
