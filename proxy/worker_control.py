"""The admin console's control commands across worker processes (``workers: N``).

Each worker listens on ``<runtime dir>/control-<index>.sock`` (the supervisor's
private runtime directory, mode 0700; the socket itself 0600), next to its
cancel socket.  A console connection lands on one worker; for PAUSE, RESUME,
RECONNECT and KILL_CLIENT that worker acts locally and asks every sibling to do
the same through :class:`Peers`, so a PAUSE TENANT holds the tenant in every
worker and answers only once every worker is quiet.

Protocol: one JSON object per connection, one line each way.  The request is
``{"op": "pause"|"resume"|"reconnect"|"kill_client", "database": ..., "tenant":
..., "id": ...}``; the reply ``{"ok": true, ...}`` or ``{"ok": false, "error":
text}``.  RELOAD and SHUTDOWN do not use it: the supervisor's signals reach
every worker already.

A worker the supervisor restarts starts without holds: after a worker restart,
PAUSE again (``SHOW TENANTS`` on that worker shows what it holds).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("tenantgate.workers")

_MAX_REQUEST = 4096


def control_socket_path(runtime_dir: str | Path, index: int) -> str:
    return str(Path(runtime_dir) / f"control-{index}.sock")


async def apply_local(server: Any, req: dict) -> dict:
    """Carry out one request on this worker's server."""
    op = req.get("op")
    database, tenant = req.get("database"), req.get("tenant")
    if op == "pause":
        if tenant is not None:
            await server.pause_tenant(tenant)
        else:
            await server.pause(database)
        return {"ok": True}
    if op == "resume":
        if tenant is not None:
            server.resume_tenant(tenant)
        else:
            server.resume(database)
        return {"ok": True}
    if op == "reconnect":
        n = sum(p.reconnect() for name, p in list(server.pools.pools.items()) if database in (None, name))
        return {"ok": True, "connections": n}
    if op == "kill_client":
        killed = server.kill_client(str(req.get("id")))
        return {"ok": True, "found": killed}
    return {"ok": False, "error": f"unknown operation {op!r}"}


class ControlInbox(asyncio.Protocol):
    """One request from a sibling worker."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.data = b""
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.task is not None:
            return
        self.data += data
        if b"\n" not in self.data:
            if len(self.data) > _MAX_REQUEST:
                self.transport.close()
            return
        line = self.data.split(b"\n", 1)[0]
        self.task = asyncio.get_running_loop().create_task(self._answer(line))

    def connection_lost(self, exc) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the asking worker gave up (its console client went away)

    async def _answer(self, line: bytes) -> None:
        try:
            reply = await apply_local(self.server, json.loads(line))
        except asyncio.CancelledError:
            return
        except Exception as e:  # noqa: BLE001 - answer, do not die
            log.exception("worker control request failed")
            reply = {"ok": False, "error": str(e)}
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(json.dumps(reply).encode() + b"\n")
            self.transport.close()


async def serve_control(server: Any, runtime_dir: str | Path, index: int) -> asyncio.AbstractServer:
    path = control_socket_path(runtime_dir, index)
    if os.path.exists(path):
        os.unlink(path)
    inbox = await asyncio.get_running_loop().create_unix_server(lambda: ControlInbox(server), path)
    os.chmod(path, 0o600)
    return inbox


class Peers:
    """The sibling workers of one worker, for :mod:`proxy.admin_control`."""

    def __init__(self, runtime_dir: str | Path, index: int, count: int):
        self.runtime_dir, self.index, self.count = runtime_dir, index, count

    async def _ask(self, index: int, req: dict) -> dict:
        path = control_socket_path(self.runtime_dir, index)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 5)
        except (OSError, asyncio.TimeoutError) as e:
            return {"ok": False, "error": f"worker {index} unreachable: {e}"}
        try:
            writer.write(json.dumps(req).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()  # PAUSE: answered once that worker is quiet
            if not line:
                return {"ok": False, "error": f"worker {index} closed the connection"}
            return json.loads(line)
        except (OSError, ValueError) as e:
            return {"ok": False, "error": f"worker {index}: {e}"}
        finally:
            writer.close()

    async def broadcast(self, req: dict) -> list[dict]:
        """Ask every other worker; their replies (an unreachable worker gives ok: false)."""
        others = [i for i in range(self.count) if i != self.index]
        return list(await asyncio.gather(*(self._ask(i, req) for i in others)))
