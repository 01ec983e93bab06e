"""Tenant status in the control schema: registered, active, offboarded, purged (and a purge under way).

Mixed into :class:`~proxy.control.plane.ControlPlane`, which provides ``pool``, ``s``, ``_tx``,
``_in_tx_audit`` and ``lifecycle_cfg``.  Which tenants exist in the data (discovery) is
:mod:`proxy.control.tenant_discovery`.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from . import audit as A
from .model import TENANT_STATUSES, Actor, InvalidRequest, NotFound, Tenant, _tenant


class TenantStatusMethods:
    async def register_tenant(self, name: str, actor: Actor | None = None, *, source: str | None = None) -> Tenant:
        """Make ``name`` known as an active tenant (idempotent).  ``source="discovered"``: registered
        because its rows were found in the tenant tables (proxy.control.tenant_discovery)."""
        async with self._tx() as conn:
            row = await self._register_in_tx(conn, name, actor, source=source)
        return _tenant(row)

    async def _register_in_tx(self, conn, name: str, actor: Actor | None, *, source: str | None = None):
        row = await conn.fetchrow(
            f"INSERT INTO {self.s}.tenants (name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING *", name)
        if row is None:
            return await conn.fetchrow(f"SELECT * FROM {self.s}.tenants WHERE name = $1", name)
        d = {"status": "active", "event": "registered"}
        if source:
            d["source"] = source
        await self._in_tx_audit(conn, [A.AuditRecord(
            A.TENANT_STATUS, tenant=name, operator=actor.name if actor else None, detail=d)])
        return row

    async def get_tenant(self, name: str) -> Tenant | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(f"SELECT * FROM {self.s}.tenants WHERE name = $1", name)
        return _tenant(row) if row else None

    async def list_tenants(self) -> list[Tenant]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(f"SELECT * FROM {self.s}.tenants ORDER BY name")
        return [_tenant(r) for r in rows]

    async def set_tenant_status(self, name: str, status: str, *, retention_end: datetime | None = None,
                                actor: Actor | None = None, grant_id: int | None = None,
                                detail: dict | None = None) -> Tenant:
        """active | offboarded (retention_end defaults to now + lifecycle.retention_days) | purged.

        Purged is final.  The change and its audit record commit together; all
        instances are notified.
        """
        if status not in TENANT_STATUSES:
            raise InvalidRequest(f"tenant status must be one of {', '.join(TENANT_STATUSES)}")
        now = datetime.now(timezone.utc)
        async with self._tx() as conn:
            cur = await conn.fetchrow(f"SELECT * FROM {self.s}.tenants WHERE name = $1 FOR UPDATE", name)
            if cur is None:
                raise NotFound(f"tenant {name!r} is not registered")
            if cur["status"] == "purged" and status != "purged":
                raise InvalidRequest(f"tenant {name!r} has been purged; that cannot be undone")
            if status == "offboarded":
                end = retention_end or now + timedelta(days=self.lifecycle_cfg.retention_days)
                row = await conn.fetchrow(
                    f"UPDATE {self.s}.tenants SET status = 'offboarded', updated_at = now(), "
                    f"offboarded_at = coalesce(offboarded_at, now()), retention_end = $2 "
                    f"WHERE name = $1 RETURNING *", name, end)
            elif status == "active":
                row = await conn.fetchrow(
                    f"UPDATE {self.s}.tenants SET status = 'active', updated_at = now(), offboarded_at = NULL, "
                    f"retention_end = NULL, purge_started_at = NULL WHERE name = $1 RETURNING *", name)
            else:
                row = await conn.fetchrow(
                    f"UPDATE {self.s}.tenants SET status = 'purged', updated_at = now(), "
                    f"purged_at = coalesce(purged_at, now()) WHERE name = $1 RETURNING *", name)
            d = {"status": status, "was": cur["status"]}
            if row["retention_end"] is not None:
                d["retention_end"] = row["retention_end"].isoformat()
            if detail:
                d["detail"] = detail
            await self._in_tx_audit(conn, [A.AuditRecord(
                A.TENANT_STATUS, tenant=name, operator=actor.name if actor else None, grant_id=grant_id,
                detail=d)])
        return _tenant(row)

    async def tenant_state(self, name: str) -> tuple[str, datetime | None] | None:
        """(status, purge_started_at) read now from the control schema (None: not registered)."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(f"SELECT status, purge_started_at FROM {self.s}.tenants WHERE name = $1", name)
        return (row["status"], row["purge_started_at"]) if row else None

    async def mark_purge_started(self, name: str, *, actor: Actor | None = None, grant_id: int | None = None) -> Tenant:
        """Before a purge deletes anything: every instance ends the tenant's sessions (NOTIFY
        status 'purging') and accepts no new one; audited with the change."""
        async with self._tx() as conn:
            row = await conn.fetchrow(
                f"UPDATE {self.s}.tenants SET purge_started_at = coalesce(purge_started_at, now()), updated_at = now() "
                f"WHERE name = $1 RETURNING *", name)
            if row is None:
                raise NotFound(f"tenant {name!r} is not registered")
            await self._in_tx_audit(conn, [A.AuditRecord(
                A.TENANT_STATUS, tenant=name, operator=actor.name if actor else None, grant_id=grant_id,
                detail={"status": row["status"], "event": "purge started: sessions ended"})])
        return _tenant(row)

    async def reactivate_purged(self, name: str, *, actor: Actor, grant_id: int, detail: dict) -> Tenant:
        """An import brought a purged tenant's rows back: it becomes active again (audited, all instances notified)."""
        async with self._tx() as conn:
            cur = await conn.fetchrow(f"SELECT * FROM {self.s}.tenants WHERE name = $1 FOR UPDATE", name)
            if cur is None:
                raise NotFound(f"tenant {name!r} is not registered")
            if cur["status"] != "purged":
                raise InvalidRequest(f"tenant {name!r} is {cur['status']}, not purged")
            row = await conn.fetchrow(
                f"UPDATE {self.s}.tenants SET status = 'active', updated_at = now(), offboarded_at = NULL, "
                f"retention_end = NULL, purged_at = NULL, purge_started_at = NULL WHERE name = $1 RETURNING *", name)
            await self._in_tx_audit(conn, [A.AuditRecord(
                A.TENANT_STATUS, tenant=name, operator=actor.name, grant_id=grant_id,
                detail={"status": "active", "was": "purged", "event": "reactivated by import", "detail": detail})])
        return _tenant(row)
