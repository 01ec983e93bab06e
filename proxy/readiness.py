"""Is this tenantgate ready for traffic?  The checks behind ``/readyz``.

:class:`Readiness` runs, at most once per ``metrics.readiness_cache_s``
(1 s), these checks; every one must pass:

* ``backend``: a real connection to PostgreSQL with tenantgate's own
  credentials (the same code path client sessions use, SCRAM/TLS included),
  bounded by ``metrics.readiness_timeout_s``, then closed;
* ``rules``: the tenancy rules are loaded (only when ``rules_file`` is set);
* ``control``: the control schema answers ``SELECT 1`` (only when
  ``control.dsn`` is set);
* any extra named check given by the caller (the worker supervisor adds
  ``workers``: at least one worker process is running).

With ``regions``, ``backend`` is the default region's backend, and every other region gets a
check ``backend:<region>`` of the same kind.  Those are reported (and set
``tenantgate_region_backend_up{region}``) but do not decide readiness: one region's
PostgreSQL being down must not take the instances serving every other region out of the load
balancer (``"required": false`` in the JSON).

Each run also sets ``tenantgate_backend_up`` and ``tenantgate_control_up`` (1 when the
control schema is not configured),
and ``/metrics`` triggers a (cached) run before every scrape, so the
"backend unreachable" alert works without anyone polling ``/readyz``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from proxy import metrics

log = logging.getLogger("tenantgate.readiness")

#: SQLSTATEs that prove PostgreSQL answered even though the probe could not log in fully
_SERVER_ANSWERED = {"3D000"}  # invalid_catalog_name: the probe's database does not exist


class Readiness:
    """Readiness checks of one process.

    ``config`` is a callable returning the current :class:`proxy.config.Config`
    (so a SIGHUP reload is followed); ``gatekeeper`` (optional) supplies the
    loaded rules (``.engine``) and the control plane (``.plane.pool``).
    """

    def __init__(self, config: Callable[[], Any], gatekeeper: Any = None,
                 extra: dict[str, Callable[[], tuple[bool, str]]] | None = None):
        self._config = config
        self.gatekeeper = gatekeeper
        self.extra = dict(extra or {})
        self._result: tuple[bool, dict[str, dict]] | None = None
        self._at = 0.0
        self._running: asyncio.Future | None = None

    async def check(self) -> tuple[bool, dict[str, dict]]:
        """(ready, {check name: {"ok": bool, "detail": str}}), cached for ``readiness_cache_s``."""
        cfg = self._config()
        now = time.monotonic()
        if self._result is not None and now - self._at < cfg.metrics.readiness_cache_s:
            return self._result
        if self._running is not None and not self._running.done():
            return await asyncio.shield(self._running)
        self._running = asyncio.ensure_future(self._run(cfg))
        result = await asyncio.shield(self._running)
        self._result, self._at = result, time.monotonic()
        return result

    async def _run(self, cfg) -> tuple[bool, dict[str, dict]]:
        timeout = cfg.metrics.readiness_timeout_s
        checks: dict[str, dict] = {}
        names: list[str] = ["backend"]
        coros: list[Awaitable[tuple[bool, str]]] = [self._backend(cfg, timeout)]
        default = cfg.default_region()
        check_of = {r: "backend" if r == default else f"backend:{r}" for r in cfg.region_names()}
        optional = {name for name in check_of.values() if name != "backend"}  # reported, not required
        for r, name in check_of.items():
            if name in optional:
                names.append(name)
                coros.append(self._backend(cfg, timeout, cfg.backend_of(r)))
        if cfg.rules_file:
            names.append("rules")
            coros.append(self._rules())
        if cfg.control.dsn or cfg.control.dsn_env:
            names.append("control")
            coros.append(self._control(cfg, timeout))
        results = await asyncio.gather(*coros, return_exceptions=True)
        for name, r in zip(names, results):
            if isinstance(r, BaseException):
                r = (False, f"{type(r).__name__}: {r}")
            checks[name] = {"ok": bool(r[0]), "detail": r[1]}
            if name in optional:
                checks[name]["required"] = False
        for name, fn in self.extra.items():
            try:
                ok, detail = fn()
            except Exception as e:  # noqa: BLE001 - a broken check is a failed check
                ok, detail = False, f"{type(e).__name__}: {e}"
            checks[name] = {"ok": bool(ok), "detail": detail}
        metrics.BACKEND_UP.set(1 if checks["backend"]["ok"] else 0)
        for r, name in check_of.items():
            metrics.REGION_BACKEND_UP.labels(region=r).set(1 if checks[name]["ok"] else 0)
        metrics.CONTROL_UP.set(0 if "control" in checks and not checks["control"]["ok"] else 1)
        return all(c["ok"] for c in checks.values() if c.get("required", True)), checks

    async def _backend(self, cfg, timeout: float, backend=None) -> tuple[bool, str]:
        from proxy.backend_link import BackendError, connect_backend

        backend = backend or cfg.backend
        backend_cfg = backend.model_copy(update={"connect_timeout_s": min(timeout, backend.connect_timeout_s)})
        database = backend.database or "postgres"
        try:
            async with asyncio.timeout(timeout):
                conn = await connect_backend(backend_cfg, database, {"application_name": "tenantgate-readiness"})
        except BackendError as e:
            if e.sqlstate in _SERVER_ANSWERED:
                return True, f"PostgreSQL answered ({e.message})"
            return False, e.message
        except (OSError, TimeoutError) as e:
            return False, f"could not connect to {backend.host}:{backend.port}: {e or 'timeout'}"
        try:
            conn.protocol.close(terminate=True)
        except Exception:  # noqa: BLE001 - closing a probe connection must not fail the probe
            pass
        return True, f"connected to {backend.host}:{backend.port}"

    async def _rules(self) -> tuple[bool, str]:
        gk = self.gatekeeper
        if gk is None:
            return True, "checked by the workers"
        engine = getattr(gk, "engine", None)
        if engine is None:
            return False, "rules_file is set but no policy engine is loaded"
        return True, "loaded"

    async def _control(self, cfg, timeout: float) -> tuple[bool, str]:
        plane = getattr(self.gatekeeper, "plane", None) if self.gatekeeper is not None else None
        pool = getattr(plane, "pool", None)
        if pool is not None:
            async with asyncio.timeout(timeout):
                async with pool.acquire() as conn:
                    await conn.fetchval("SELECT 1")
            return True, "reachable"
        import asyncpg

        dsn = cfg.control.resolved_dsn()
        async with asyncio.timeout(timeout):
            conn = await asyncpg.connect(dsn, timeout=timeout)
            try:
                await conn.fetchval("SELECT 1")
            finally:
                await conn.close()
        return True, "reachable"
