"""The admin HTTP listener (``metrics.host:metrics.port``, off the data port).

A deliberately small HTTP/1.1 server on asyncio, running in the proxy's own
event loop (or, in the worker supervisor, in a thread with its own loop):

=========  =================================================================
path       answer
=========  =================================================================
/metrics   200, Prometheus text format 0.0.4 (refreshes the readiness gauges first)
/healthz   200 ``ok``: the process is alive and its event loop answers
/readyz    200 or 503 with a small JSON body naming each check (proxy.readiness)
other      404
=========  =================================================================

Only GET (and HEAD, which answers the same without a body) is allowed: other
methods get 405 with ``Allow: GET, HEAD``.  Every response closes the
connection.  A request line or header block larger than 8 KiB gets 431, a
malformed one 400, and a client that does not send its request within 10 s
is dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any

from prometheus_client import REGISTRY, generate_latest

#: the classic text format (what every Prometheus since 2.0 reads; prometheus_client 0.26 labels
#: its default "1.0.0", which older servers do not know)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

log = logging.getLogger("tenantgate.admin_http")

MAX_HEAD_BYTES = 8192
READ_TIMEOUT_S = 10.0

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


class AdminHttpServer:
    """Serves /metrics, /healthz and /readyz.

    ``registry``: the prometheus_client registry to expose (the default one, or
    a registry with a MultiProcessCollector in the supervisor).  ``readiness``:
    a :class:`proxy.readiness.Readiness` (None: /readyz is always ready).
    """

    def __init__(self, host: str, port: int, *, registry=None, readiness=None):
        self.host = host
        self.port = port
        self.registry = registry if registry is not None else REGISTRY
        self.readiness = readiness
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True,
                                                  limit=MAX_HEAD_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("admin HTTP listener on %s:%d (/metrics, /healthz, /readyz)", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                pass

    # ------------------------------------------------------------------ one request

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            except asyncio.LimitOverrunError:
                await self._send(writer, 431, b"request header too large\n")
                return
            except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
                return
            if len(head) > MAX_HEAD_BYTES:
                await self._send(writer, 431, b"request header too large\n")
                return
            status, body, ctype, extra, head_only = await self._respond(head)
            await self._send(writer, status, body, ctype, extra, head_only=head_only)
        except Exception:  # noqa: BLE001 - one bad request must not hurt the proxy
            log.exception("admin HTTP request failed")
            try:
                await self._send(writer, 500, b"internal error\n")
            except Exception:  # noqa: BLE001
                pass
        finally:
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    async def _respond(self, head: bytes) -> tuple[int, bytes, str, dict[str, str], bool]:
        line = head.split(b"\r\n", 1)[0]
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
            return 400, b"bad request\n", "text/plain; charset=utf-8", {}, False
        method = parts[0].decode("ascii", "replace")
        path = parts[1].split(b"?", 1)[0].decode("ascii", "replace")
        if path not in ("/metrics", "/healthz", "/readyz"):
            return 404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8", {}, False
        if method not in ("GET", "HEAD"):
            return (405, b"method not allowed\n", "text/plain; charset=utf-8", {"Allow": "GET, HEAD"}, False)
        head_only = method == "HEAD"
        if path == "/healthz":
            return 200, b"ok\n", "text/plain; charset=utf-8", {}, head_only
        if path == "/readyz":
            ready, checks = await self._readiness()
            body = json.dumps({"status": "ready" if ready else "not ready", "checks": checks}).encode() + b"\n"
            return (200 if ready else 503), body, "application/json", {}, head_only
        await self._readiness()  # refreshes tenantgate_backend_up / _control_up (cached)
        return 200, generate_latest(self.registry), CONTENT_TYPE, {}, head_only

    async def _readiness(self) -> tuple[bool, dict[str, Any]]:
        if self.readiness is None:
            return True, {}
        try:
            return await self.readiness.check()
        except Exception as e:  # noqa: BLE001 - a crashing probe means "not ready", not a 500
            log.exception("readiness check failed")
            return False, {"readiness": {"ok": False, "detail": f"{type(e).__name__}: {e}"}}

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8",
                    extra: dict[str, str] | None = None, *, head_only: bool = False) -> None:
        headers = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}", f"Content-Type: {ctype}",
                   f"Content-Length: {len(body)}", "Connection: close", "Cache-Control: no-store"]
        for k, v in (extra or {}).items():
            headers.append(f"{k}: {v}")
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body))
        try:
            await writer.drain()
        except ConnectionError:
            pass


async def start_admin_server(host: str, port: int, *, registry=None, readiness=None) -> AdminHttpServer:
    """Start the admin listener in the running event loop."""
    server = AdminHttpServer(host, port, registry=registry, readiness=readiness)
    await server.start()
    return server


def start_admin_server_in_thread(host: str, port: int, *, registry=None, readiness_factory=None) -> AdminHttpServer:
    """Start the admin listener in a daemon thread with its own event loop (for processes
    without one, like the worker supervisor).  Raises OSError when the port cannot be bound.

    ``readiness_factory()`` is called inside that loop and returns the Readiness (or None).
    """
    started = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            readiness = readiness_factory() if readiness_factory is not None else None
            server = loop.run_until_complete(start_admin_server(host, port, registry=registry, readiness=readiness))
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            box["error"] = e
            started.set()
            loop.close()
            return
        box["server"] = server
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="tenantgate-admin-http", daemon=True)
    thread.start()
    started.wait()
    if "error" in box:
        err = box["error"]
        raise err if isinstance(err, OSError) else OSError(str(err))
    return box["server"]


async def start_metrics_endpoint(config, server=None, gatekeeper=None):
    """Serve /metrics, /healthz and /readyz on ``metrics.host:metrics.port`` (unless the port is
    null) in the running event loop; returns the AdminHttpServer or None.
    ``server`` (a ProxyServer) lets readiness follow config reloads."""
    from proxy.session_events import TENANT_LABELS

    TENANT_LABELS.configure(config.metrics.tenant_labels, config.metrics.tenant_top_n)
    if config.metrics.port is None:
        return None
    from proxy.readiness import Readiness

    current = (lambda: server.config) if server is not None else (lambda: config)
    return await start_admin_server(config.metrics.host, config.metrics.port,
                                    readiness=Readiness(current, gatekeeper))
