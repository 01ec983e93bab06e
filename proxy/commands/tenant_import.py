"""`tenantgate tenant import TENANT PATH [--reactivate]`: load an export back into a tenant.

The model (docs/lifecycle.md, "Import"):

* an **active** tenant with no rows (a new tenant, or one whose rows were
  removed) takes its own export: a write grant on the tenant is needed;
* a **purged** tenant can be brought back from its export with
  ``--reactivate``: the same write grant (requested by one person, approved
  by another: the two-person rule), the purge must have finished, and after
  the rows are loaded the tenant becomes active again (audited as
  ``tenant.status`` ``event: reactivated by import``);
* an **offboarded** tenant is refused (restore it, or let it be purged).

An export only loads into the tenant it was taken from.
"""

from __future__ import annotations

import os
import time

from proxy.commands.receipt import read_limits
from proxy.signing import verify_keys_from_config
from proxy.lifecycle.tables import OBJECT_NOT_IN_STATE, LifecycleError

IMPORT = "tenant.import"


async def run_import(args) -> int:
    from proxy.commands.tenant_context import DONE, FAILED, _context, _data, _pending, _print_json, _schema
    from proxy.lifecycle.importer import import_tenant

    async with _context(args) as ctx:
        await ctx.authenticate("import", args.tenant)
        from proxy.control.placement import tenant_config

        ctx.cfg = await tenant_config(ctx.plane, ctx.cfg, args.tenant)  # the server of the tenant's region
        t = await ctx.tenant(args.tenant, "import")
        reactivate = t.status == "purged"
        if t.status == "offboarded":
            raise await ctx.refuse(LifecycleError(
                OBJECT_NOT_IN_STATE, f'tenant "{t.name}" is offboarded: import loads only into an active or purged tenant',
                hint=f"restore it first (tenantgate tenant restore {t.name}), or purge it and import with --reactivate"),
                t.name, "import")
        if reactivate and not args.reactivate:
            raise await ctx.refuse(LifecycleError(
                OBJECT_NOT_IN_STATE, f'tenant "{t.name}" has been purged',
                hint=f"to load its export back and make it active again: tenantgate tenant import {t.name} PATH "
                     "--reactivate (under an approved write grant)"), t.name, "import")
        if reactivate and t.name in await _pending(ctx.cfg):
            raise await ctx.refuse(LifecycleError(
                OBJECT_NOT_IN_STATE, f'the purge of tenant "{t.name}" has not finished',
                hint=f"finish it first: tenantgate tenant purge {t.name}"), t.name, "import")
        if args.reactivate and not reactivate:
            raise await ctx.refuse(LifecycleError(
                OBJECT_NOT_IN_STATE, f'tenant "{t.name}" is {t.status}, not purged: --reactivate does not apply',
                hint="drop --reactivate to import into an active tenant with no rows"), t.name, "import")
        g = await ctx.grant(t.name, "write", "import")
        seq = await ctx.audit(IMPORT, grant_id=g.id, tenant=t.name,
                              detail={"path": os.path.abspath(args.path), "reactivate": reactivate})
        t0 = time.monotonic()
        try:
            async with _data(ctx.cfg) as conn:
                schema = await _schema(ctx.cfg, conn)
                result = await import_tenant(conn, schema, t.name, args.path, limits=read_limits(ctx.cfg),
                                             keys=verify_keys_from_config(ctx.cfg.audit) or None)
            if reactivate:
                t = await ctx.plane.reactivate_purged(t.name, actor=ctx.actor, grant_id=g.id,
                                                      detail={"import_seq": seq, "rows": result["total_rows"]})
        except Exception as e:
            await ctx.audit(IMPORT + FAILED, grant_id=g.id, tenant=t.name, ref_seq=seq,
                            sqlstate=getattr(e, "sqlstate", "XX000"), detail={"message": str(getattr(e, "message", e))})
            raise
        await ctx.audit(IMPORT + DONE, grant_id=g.id, tenant=t.name, ref_seq=seq, rows=result["total_rows"],
                        duration_us=int((time.monotonic() - t0) * 1e6), detail={"tables": result["tables"]})
    _print_json({"tenant": t.name, "status": t.status, "total_rows": result["total_rows"], "tables": result["tables"]})
    return 0
