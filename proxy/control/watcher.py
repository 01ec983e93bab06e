"""Ending operator sessions on grant expiry or revocation, across all instances.

One :class:`Watcher` per process (``await plane.watcher()``):

* a dedicated connection LISTENs on the control schema's channel
  (``<schema>_events``); the trigger in ``schema.sql`` NOTIFYs there when a
  grant changes state or a tenant changes status, whoever made the change;
* a tick every ``tick_s`` (0.25 s) fires local sessions whose grant's
  ``expires_at`` has passed (no database needed for that), and every
  ``recheck_s`` (1 s) it re-reads the state of every watched grant (so a lost
  notification or a dropped LISTEN connection cannot keep a session alive)
  and runs :meth:`ControlPlane.expire_due` so expired grants change state
  (and are announced) even when no CLI runs.

So a revocation reaches every instance within one round trip (and at worst
``recheck_s``), and an expiry within ``tick_s``: both well within 2 s.
Callbacks may be plain functions or coroutine functions; exceptions in them
are logged, never propagated.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import asyncpg

from proxy import metrics  # noqa: F401 - metrics.ACTIVE_GRANTS is set by proxy.control.stats
from proxy.control.stats import publish_control_stats

log = logging.getLogger("tenantgate.watcher")

ENDED_STATES = ("revoked", "expired", "denied")


@dataclass
class _GrantWatch:
    id: int
    grant_id: int
    expires_at: datetime
    callback: Callable[[int, str], Any]
    watcher: "Watcher"
    done: bool = False

    def cancel(self) -> None:
        self.done = True
        self.watcher._watches.pop(self.id, None)


@dataclass
class Subscription:
    id: int
    on_grant_ended: Callable[[int, str], Any] | None
    on_tenant_changed: Callable[[str, str], Any] | None
    watcher: "Watcher"
    on_placement_changed: Callable[[str, str | None, bool], Any] | None = None  # (tenant, region, moving)

    def close(self) -> None:
        self.watcher._subs.pop(self.id, None)


class Watcher:
    def __init__(self, plane, *, tick_s: float = 0.25, recheck_s: float = 1.0):
        self.plane = plane
        self.tick_s = tick_s
        self.recheck_s = recheck_s
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task | None = None
        self._ids = itertools.count(1)
        self._watches: dict[int, _GrantWatch] = {}
        self._subs: dict[int, Subscription] = {}
        self._announced: set[int] = set()  # grants already reported to subscribers
        self._bg: set[asyncio.Task] = set()

    async def start(self) -> None:
        await self._listen()
        self._task = asyncio.create_task(self._loop(), name="tenantgate-grant-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._conn is not None and not self._conn.is_closed():
            await self._conn.close()

    # ---- registration

    def watch_grant(self, grant_id: int, expires_at: datetime, callback: Callable[[int, str], Any]) -> _GrantWatch:
        w = _GrantWatch(next(self._ids), grant_id, expires_at, callback, self)
        self._watches[w.id] = w
        if expires_at <= datetime.now(timezone.utc):
            self._end(grant_id, "expired")
        return w

    def subscribe(self, on_grant_ended=None, on_tenant_changed=None, on_placement_changed=None) -> Subscription:
        sub = Subscription(next(self._ids), on_grant_ended, on_tenant_changed, self, on_placement_changed)
        self._subs[sub.id] = sub
        return sub

    # ---- internals

    async def _listen(self) -> None:
        self._conn = await self.plane.connect()
        await self._conn.add_listener(self.plane.channel, self._on_notify)

    def _on_notify(self, _conn, _pid, _channel, payload: str) -> None:
        try:
            msg = json.loads(payload)
        except ValueError:
            return
        if msg.get("kind") == "grant" and msg.get("state") in ENDED_STATES:
            self._end(int(msg["id"]), msg["state"])
        elif msg.get("kind") == "tenant":
            for sub in list(self._subs.values()):
                if sub.on_tenant_changed is not None:
                    self._call(sub.on_tenant_changed, msg.get("name"), msg.get("status"))
        elif msg.get("kind") == "placement":  # proxy/control/placement.py
            for sub in list(self._subs.values()):
                if sub.on_placement_changed is not None:
                    self._call(sub.on_placement_changed, msg.get("tenant"), msg.get("region"),
                               bool(msg.get("moving")))

    def _end(self, grant_id: int, reason: str) -> None:
        for w in list(self._watches.values()):
            if w.grant_id == grant_id and not w.done:
                w.cancel()
                self._call(w.callback, grant_id, reason)
        if grant_id not in self._announced:
            self._announced.add(grant_id)
            for sub in list(self._subs.values()):
                if sub.on_grant_ended is not None:
                    self._call(sub.on_grant_ended, grant_id, reason)

    def _call(self, fn, *args) -> None:
        try:
            res = fn(*args)
            if inspect.isawaitable(res):
                t = asyncio.ensure_future(res)
                self._bg.add(t)
                t.add_done_callback(self._bg.discard)
        except Exception:
            log.exception("watcher callback failed")

    async def _loop(self) -> None:
        last_recheck = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick_s)
            now = datetime.now(timezone.utc)
            for w in list(self._watches.values()):
                if not w.done and w.expires_at <= now:
                    self._end(w.grant_id, "expired")
            if loop.time() - last_recheck < self.recheck_s:
                continue
            last_recheck = loop.time()
            try:
                if self._conn is None or self._conn.is_closed():
                    await self._listen()
                await self._recheck()
                for g in await self.plane.expire_due():
                    self._end(g.id, "expired")
                await publish_control_stats(self.plane)  # active grants, tenants by status, overdue purges
                if len(self._announced) > 100_000:
                    self._announced.clear()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("grant watcher: %s", e)

    async def _recheck(self) -> None:
        ids = sorted({w.grant_id for w in self._watches.values() if not w.done})
        if not ids:
            return
        async with self.plane.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT id, state, expires_at FROM {self.plane.s}.grants WHERE id = ANY($1::bigint[])", ids)
        found = {r["id"]: r for r in rows}
        now = datetime.now(timezone.utc)
        for gid in ids:
            r = found.get(gid)
            if r is None:
                self._end(gid, "revoked")
            elif r["state"] != "approved":
                self._end(gid, r["state"])
            elif r["expires_at"] is not None and r["expires_at"] <= now:
                self._end(gid, "expired")
