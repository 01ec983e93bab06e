"""Tenant placement: which region (and so which PostgreSQL backend) holds each tenant's data.

API (used by the routing, the CLI and ``tenant move``; docs/scale-out.md):

* ``await get_placement(plane, tenant) -> Placement | None`` (None: never placed, so the tenant is in
  the config's ``placement.default_region``; :func:`region_of` resolves that);
* ``await set_placement(plane, actor, tenant, region, *, reason, conn=None, moving=False) -> Placement``:
  approvers only, audited in the chain as ``tenant.place`` in the same transaction as the change
  (with ``conn``: inside the caller's :meth:`ControlPlane._tx` transaction); a trigger NOTIFYs every
  instance (kind ``placement`` on the control channel), as grant changes are announced;
* ``await set_moving(plane, actor, tenant, moving, *, reason, conn=None) -> Placement`` (an addition:
  marks a tenant as being moved, audited as ``tenant.place`` with ``event: move started|ended``);
* ``await list_placements(plane) -> list[Placement]``;
* ``backend_for(cfg, region) -> BackendConfig`` (the config's backend entry of a region; ConfigError
  for a region the config does not have);
* ``check_region(cfg, rules, tenant, region)``: the region exists and the rules allow it for the tenant
  (``tenant_regions`` in the rules file), else :class:`InvalidRequest`.  ``set_placement`` checks only what
  the control schema knows (the actor, the name); callers with a config (the CLI) call this first.
* ``data_dsn_for(cfg, region)``: the lifecycle role's DSN on a region's server.

``Placement.backend`` is the name of the backend entry, which is the region's name (one backend per
region in the config's ``regions:`` map; ``default`` for a config with only ``backend:``).

Operator residency (``operators.regions``, NULL = every region): :func:`operator_regions`,
:func:`set_operator_regions` and :func:`check_residency`, which a grant request calls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from . import audit as A
from .model import Actor, InvalidRequest, NotFound, PermissionDenied

if TYPE_CHECKING:  # pragma: no cover
    from proxy.config import BackendConfig, Config

TENANT_PLACE = "tenant.place"
_REGION = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True)
class Placement:
    tenant: str
    region: str
    backend: str
    moving: bool
    updated_at: datetime | None
    updated_by: str | None = None

    def to_json(self) -> dict:
        return {"tenant": self.tenant, "region": self.region, "backend": self.backend, "moving": self.moving,
                "updated_at": self.updated_at.isoformat() if self.updated_at else None,
                "updated_by": self.updated_by}


def _placement(row) -> Placement:
    return Placement(row["tenant"], row["region"], row["region"], row["moving"], row["updated_at"],
                     row["updated_by"])


async def ensure_schema(plane) -> None:
    """Install the placement table on a control schema installed before it (idempotent)."""
    if getattr(plane, "_placement_ready", False):
        return
    from .schema import install_control_schema

    async with plane.pool.acquire() as conn:
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{plane.s}.placements"):
            await install_control_schema(conn, plane.schema)
    plane._placement_ready = True


# ---------------------------------------------------------------- config side (no I/O)


def backend_for(cfg: "Config", region: str) -> "BackendConfig":
    """The backend entry of ``region`` (ConfigError if the config has no such region)."""
    return cfg.backend_of(region)


def region_of(cfg: "Config", placement: Placement | None) -> str:
    """The region a tenant is in: its placement, else the configured default."""
    return placement.region if placement is not None else cfg.default_region()


def check_region(cfg: "Config", rules, tenant: str, region: str) -> None:
    """Refuse (InvalidRequest) a region the config lacks or the rules do not allow for ``tenant``."""
    if region not in cfg.region_names():
        raise InvalidRequest(f"region {region!r} is not configured (regions: {', '.join(cfg.region_names())})")
    allowed = (getattr(rules, "tenant_regions", None) or {}).get(tenant) if rules is not None else None
    if allowed is not None and region not in allowed:
        raise InvalidRequest(f"tenant {tenant!r} may not be placed in region {region!r}: the rules allow only "
                             f"{', '.join(allowed) or 'no region'} (tenant_regions in the rules file)")


def data_dsn_for(cfg: "Config", region: str) -> str:
    """The lifecycle role's DSN on ``region``'s server: ``regions.<r>.data_dsn``; for the default region
    ``lifecycle.data_dsn``; else built from the region's backend entry (as lifecycle does for ``backend``)."""
    from proxy.config import ConfigError

    r = cfg.regions.get(region) if cfg.regions else None
    if r is not None:
        dsn = r.resolved_data_dsn()
        if dsn:
            return dsn
    if region == cfg.default_region():
        dsn = cfg.lifecycle.resolved_data_dsn()
        if dsn:
            return dsn
    b = backend_for(cfg, region)
    if not b.database:
        raise ConfigError(f"region {region!r}: set regions.{region}.data_dsn (or its database) for tenant "
                          "export/import/purge")
    return b.url()


def config_for_region(cfg: "Config", region: str) -> "Config":
    """``cfg`` with ``backend`` and ``lifecycle.data_dsn`` of ``region``: what the lifecycle commands
    (export, import, offboard, purge) use to act on the server that holds a tenant."""
    if not cfg.regions:
        backend_for(cfg, region)  # the one implicit region, else ConfigError
        return cfg
    lc = cfg.lifecycle.model_copy(update={"data_dsn": data_dsn_for(cfg, region), "data_dsn_env": None})
    return cfg.model_copy(update={"backend": backend_for(cfg, region), "lifecycle": lc})


async def tenant_config(plane, cfg: "Config", tenant: str) -> "Config":
    """:func:`config_for_region` of the region ``tenant`` is placed in."""
    if not cfg.regions:
        return cfg
    return config_for_region(cfg, region_of(cfg, await get_placement(plane, tenant)))


# ---------------------------------------------------------------- control schema


async def get_placement(plane, tenant: str) -> Placement | None:
    await ensure_schema(plane)
    async with plane.pool.acquire() as conn:
        row = await conn.fetchrow(f"SELECT * FROM {plane.s}.placements WHERE tenant = $1", tenant)
    return _placement(row) if row else None


async def list_placements(plane) -> list[Placement]:
    await ensure_schema(plane)
    async with plane.pool.acquire() as conn:
        rows = await conn.fetch(f"SELECT * FROM {plane.s}.placements ORDER BY tenant")
    return [_placement(r) for r in rows]


def _require_approver(actor: Actor, what: str) -> None:
    if not (actor.platform_admin or actor.is_approver):
        raise PermissionDenied(f"{actor.name} may not {what} (needs the approver role)")


async def set_placement(plane, actor: Actor, tenant: str, region: str, *, reason: str, conn=None,
                        moving: bool = False) -> Placement:
    """Place ``tenant`` in ``region`` (approver; audited as ``tenant.place`` with the change; every
    instance is notified).  This only records where the data is: moving the rows is ``tenant move``."""
    _require_approver(actor, "place tenants")
    if not _REGION.match(region or ""):
        raise InvalidRequest(f"{region!r} is not a region name")
    if not tenant or not reason or not reason.strip():
        raise InvalidRequest("a placement needs the tenant and a reason")
    if conn is None:
        await ensure_schema(plane)
        async with plane._tx() as c:
            return await _place_in_tx(plane, c, actor, tenant, region, reason, moving)
    return await _place_in_tx(plane, conn, actor, tenant, region, reason, moving)


async def _place_in_tx(plane, conn, actor: Actor, tenant: str, region: str, reason: str, moving: bool) -> Placement:
    old = await conn.fetchrow(f"SELECT * FROM {plane.s}.placements WHERE tenant = $1 FOR UPDATE", tenant)
    row = await conn.fetchrow(
        f"INSERT INTO {plane.s}.placements (tenant, region, moving, updated_by) VALUES ($1, $2, $3, $4) "
        f"ON CONFLICT (tenant) DO UPDATE SET region = EXCLUDED.region, moving = EXCLUDED.moving, "
        f"updated_at = now(), updated_by = EXCLUDED.updated_by RETURNING *", tenant, region, moving, actor.name)
    await plane._in_tx_audit(conn, [A.AuditRecord(
        TENANT_PLACE, tenant=tenant, operator=actor.name,
        detail={"region": region, "was": old["region"] if old else None, "moving": moving,
                "reason": reason.strip()})])
    return _placement(row)


async def set_moving(plane, actor: Actor, tenant: str, moving: bool, *, reason: str, conn=None,
                     default_region: str | None = None) -> Placement:
    """Mark ``tenant`` as being moved (or not); its region stays.  A tenant without a placement row
    gets one in ``default_region`` (required then)."""
    _require_approver(actor, "move tenants")

    async def run(c):
        old = await c.fetchrow(f"SELECT * FROM {plane.s}.placements WHERE tenant = $1 FOR UPDATE", tenant)
        region = old["region"] if old else default_region
        if region is None:
            raise NotFound(f"tenant {tenant!r} has no placement (pass default_region)")
        row = await c.fetchrow(
            f"INSERT INTO {plane.s}.placements (tenant, region, moving, updated_by) VALUES ($1, $2, $3, $4) "
            f"ON CONFLICT (tenant) DO UPDATE SET moving = EXCLUDED.moving, updated_at = now(), "
            f"updated_by = EXCLUDED.updated_by RETURNING *", tenant, region, moving, actor.name)
        await plane._in_tx_audit(c, [A.AuditRecord(
            TENANT_PLACE, tenant=tenant, operator=actor.name,
            detail={"region": region, "moving": moving, "event": "move started" if moving else "move ended",
                    "reason": reason})])
        return _placement(row)

    if conn is None:
        await ensure_schema(plane)
        async with plane._tx() as c:
            return await run(c)
    return await run(conn)


# ---------------------------------------------------------------- operator residency


async def operator_regions(plane, name: str) -> list[str] | None:
    """The regions whose tenants ``name`` may be granted (None: every region)."""
    await ensure_schema(plane)
    async with plane.pool.acquire() as conn:
        row = await conn.fetchrow(f"SELECT regions FROM {plane.s}.operators WHERE name = $1", name)
    if row is None:
        raise NotFound(f"no operator {name!r}")
    return list(row["regions"]) if row["regions"] is not None else None


async def set_operator_regions(plane, actor: Actor, name: str, regions: list[str] | None) -> None:
    """An approver sets the regions an account may be granted (None: every region); not their own."""
    _require_approver(actor, "change operator regions")
    if actor.name == name:
        raise PermissionDenied("nobody may change their own regions")
    for r in regions or ():
        if not _REGION.match(r):
            raise InvalidRequest(f"{r!r} is not a region name")
    await ensure_schema(plane)
    async with plane._tx() as conn:
        old = await conn.fetchrow(f"SELECT regions FROM {plane.s}.operators WHERE name = $1 FOR UPDATE", name)
        if old is None:
            raise NotFound(f"no operator {name!r}")
        await conn.execute(f"UPDATE {plane.s}.operators SET regions = $2, updated_at = now() WHERE name = $1",
                           name, sorted(set(regions)) if regions is not None else None)
        await plane._in_tx_audit(conn, [A.AuditRecord(
            A.OPERATOR_CHANGED, operator=actor.name,
            detail={"account": name, "change": "regions",
                    "regions": sorted(set(regions)) if regions is not None else "all",
                    "was": list(old["regions"]) if old["regions"] is not None else "all"})])


async def all_operator_regions(plane) -> dict[str, list[str] | None]:
    """Every account's regions (None: every region)."""
    await ensure_schema(plane)
    async with plane.pool.acquire() as conn:
        rows = await conn.fetch(f"SELECT name, regions FROM {plane.s}.operators")
    return {r["name"]: (list(r["regions"]) if r["regions"] is not None else None) for r in rows}


GRANT_REFUSED = "grant.refused"


def residency_message(operator: str, tenant: str, region: str, allowed: list[str]) -> str:
    return (f"operator {operator} may not access tenant {tenant!r}: its data is in region {region!r}, and "
            f"{operator} may only be granted tenants in {', '.join(allowed) or 'no region'} (operator residency; "
            "ask an operator of that region)")


async def check_residency(plane, cfg: "Config", operator: str, tenant: str, *, audit: bool = False) -> str:
    """The tenant's region, if ``operator`` may be granted access there; else PermissionDenied (with
    ``audit``: the refusal is appended to the audit chain first, as ``grant.refused``)."""
    region = region_of(cfg, await get_placement(plane, tenant))
    allowed = await operator_regions(plane, operator)
    if allowed is not None and region not in allowed:
        msg = residency_message(operator, tenant, region, allowed)
        if audit:
            await plane.append(A.AuditRecord(GRANT_REFUSED, operator=operator, tenant=tenant, sqlstate="42501",
                                             detail={"reason": "operator residency", "region": region,
                                                     "operator_regions": allowed, "message": msg}))
        raise PermissionDenied(msg)
    return region
