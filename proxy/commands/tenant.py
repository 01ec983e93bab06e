"""`tenantgate tenant …`: list, place, register, export, verify-export, import, offboard, restore, purge, purge-expired,
backup, restore-backup, backup-keygen (proxy/commands/tenant_backup.py).

The data path is :mod:`proxy.lifecycle` (export, import, purge over the
``lifecycle.data_dsn`` role); who may act and the audit chain are the control
plane's (:class:`proxy.control.plane.ControlPlane`):

* the acting person is authenticated (``--as NAME``, password prompt or
  ``--password-stdin``, ``--totp CODE`` when enrolled), never taken from a bare flag;
* export needs an approved read (or write) grant for the tenant, import and
  purge an approved write grant (``--grant ID`` to choose one);
* offboard, restore and register need the approver role;
* a tenant is known when registered or found in the tenant tables (then it is
  registered on first use, audited: :mod:`proxy.control.tenant_discovery`); ``list``
  shows both;
* ``import --reactivate`` brings a purged tenant back from its export
  (:mod:`proxy.commands.tenant_import`);
* ``purge-expired`` runs as the platform's service identity (the holder of
  the config's control and data DSNs), recorded as ``lifecycle.service_name``;
* every action is appended to the audit chain before it runs, its outcome
  after, and refusals too.

Errors are printed as ``ERROR:  message (SQLSTATE xxxxx)``; exit status 1
(2 for a bad config).  See docs/lifecycle.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import datetime, timezone

from proxy.commands.receipt import add_key_args
from proxy.commands.tenant_backup import key_destroyer, register as register_backup
from proxy.commands.tenant_move import register as register_move
from proxy.commands.tenant_context import (
    DONE,
    EXPORT,
    FAILED,
    PURGE_RECEIPT,
    PURGE_STARTED,
    _context,
    _control_error,
    _Ctx,
    _data,
    _format_error,
    _iso,
    _pending,
    _print_json,
    _schema,
    metrics,
)
from proxy.config import ConfigError
from proxy.signing import signer_from_config
from proxy.lifecycle.tables import OBJECT_NOT_IN_STATE, LifecycleError
from proxy.textsafe import safe_text


# --------------------------------------------------------------------------- actions
async def _list(args) -> int:
    """Registered tenants, plus the tenant values found in the tenant tables (``source: discovered``),
    with the region each is placed in (proxy/control/placement.py)."""
    from proxy.control.placement import config_for_region, list_placements
    from proxy.control.tenant_discovery import tenant_values

    async with _context(args) as ctx:
        tenants = await ctx.plane.list_tenants()
        placed = {p.tenant: p for p in await list_placements(ctx.plane)}
        found, notes = set(), []
        for region in ctx.cfg.region_names():
            note = None
            try:
                async with _data(config_for_region(ctx.cfg, region)) as conn:
                    values = await tenant_values(conn, await _schema(ctx.cfg, conn))
                if values is None:
                    note = "the lifecycle.data_dsn role cannot see every row (it needs BYPASSRLS)"
                found.update(values or ())
            except ConfigError as e:
                note = str(e)  # no data DSN configured: the registry only
            except Exception as e:  # the data database is unreachable or refuses: still list the registry
                if not (isinstance(e, (OSError, LifecycleError)) or getattr(e, "sqlstate", None)):
                    raise
                note = _format_error(e)
            if note:
                notes.append(note if not ctx.cfg.regions else f"region {region}: {note}")
    registered = {t.name for t in tenants}
    docs = [dict(t.to_json(), source="registered") for t in tenants]
    docs += [{"name": v, "status": "active", "source": "discovered"} for v in sorted(found) if v not in registered]
    for d in docs:
        p = placed.get(d["name"])
        d["region"] = p.region if p else ctx.cfg.default_region()
        d["moving"] = bool(p and p.moving)
    docs.sort(key=lambda d: d["name"])
    for note in notes:
        print(f"(tenant values in the data not listed: {note})", file=sys.stderr)
    if args.json:
        _print_json(docs)
        return 0
    print(f"{'tenant':<24} {'status':<11} {'source':<11} {'region':<14} {'retention_end':<26} purged_at")
    for d in docs:
        region = d["region"] + (" (moving)" if d["moving"] else "")
        print(f"{safe_text(d['name']):<24} {d['status']:<11} {d['source']:<11} {safe_text(region):<14} "
              f"{d.get('retention_end') or '-':<26} {d.get('purged_at') or '-'}")
    return 0


async def _place(args) -> int:
    """Record the region a tenant's data lives in (approver, audited).  Refused when the tenant has rows
    on its current server and the region changes: moving rows is `tenant move`."""
    from proxy.control.placement import check_region, get_placement, region_of, set_placement
    from proxy.control.tenant_discovery import tenant_in_data
    from proxy.lifecycle.tables import OBJECT_NOT_IN_STATE as _STATE
    from proxy.policy.rules import load_rules

    async with _context(args) as ctx:
        await ctx.authenticate("place", args.tenant)
        await ctx.require_approver(args.tenant, "place")
        rules = load_rules(ctx.cfg.rules_file) if ctx.cfg.rules_file else None
        try:
            check_region(ctx.cfg, rules, args.tenant, args.region)
        except Exception as e:
            raise await ctx.refuse(_control_error(e), args.tenant, "place")
        current = region_of(ctx.cfg, await get_placement(ctx.plane, args.tenant))
        if current != args.region and not args.force:
            ctx.cfg = await _tenant_cfg(ctx, args.tenant)
            try:
                async with _data(ctx.cfg) as conn:
                    has_rows = await tenant_in_data(conn, await _schema(ctx.cfg, conn), args.tenant)
            except ConfigError:
                has_rows = None
            if has_rows is not False:
                why = ("has rows" if has_rows else "may have rows (they could not be looked up)")
                raise await ctx.refuse(LifecycleError(
                    _STATE, f'tenant "{args.tenant}" {why} in region {current}: placing it in {args.region} '
                    "would leave them behind",
                    hint=f"move it instead: tenantgate tenant move {args.tenant} --to {args.region} "
                         "(or --force when the rows are to stay unreachable)"), args.tenant, "place")
        p = await set_placement(ctx.plane, ctx.actor, args.tenant, args.region,
                                reason=args.reason or f"tenant place --region {args.region}"
                                + (" --force" if args.force else ""))
        _print_json(p.to_json())
    return 0


async def _tenant_cfg(ctx, tenant: str):
    """The config whose backend and lifecycle.data_dsn are those of the tenant's region."""
    from proxy.control.placement import tenant_config

    return await tenant_config(ctx.plane, ctx.cfg, tenant)


async def _register(args) -> int:
    async with _context(args) as ctx:
        await ctx.authenticate("register", args.tenant)
        await ctx.require_approver(args.tenant, "register")
        t = await ctx.plane.register_tenant(args.tenant, ctx.actor)
        _print_json(t.to_json())
    return 0


async def _export(args) -> int:
    from proxy.lifecycle.export import export_tenant, manifest_sha256

    async with _context(args) as ctx:
        await ctx.authenticate("export", args.tenant)
        ctx.cfg = await _tenant_cfg(ctx, args.tenant)  # the tenant's region's server
        t = await ctx.tenant(args.tenant, "export")
        if t.status == "purged":
            raise await ctx.refuse(LifecycleError(OBJECT_NOT_IN_STATE, f'tenant "{t.name}" has been purged: nothing to export'), t.name, "export")
        g = await ctx.grant(t.name, "read", "export")
        seq = await ctx.audit(EXPORT, grant_id=g.id, tenant=t.name,
                              detail={"out": os.path.abspath(args.out), "format": args.format})
        t0 = time.monotonic()
        try:
            async with _data(ctx.cfg) as conn:
                schema = await _schema(ctx.cfg, conn)
                manifest = await export_tenant(conn, schema, t.name, args.out, data_format=args.format,
                                               signer=signer_from_config(ctx.cfg.audit))
        except Exception as e:
            metrics.TENANT_EXPORTS_TOTAL.labels("error").inc()
            await ctx.audit(EXPORT + FAILED, grant_id=g.id, tenant=t.name, ref_seq=seq,
                            sqlstate=getattr(e, "sqlstate", "XX000"), detail={"message": str(getattr(e, "message", e))})
            raise
        metrics.TENANT_EXPORTS_TOTAL.labels("ok").inc()
        metrics.TENANT_EXPORTED_ROWS_TOTAL.inc(manifest["total_rows"])
        metrics.TENANT_EXPORT_SECONDS.observe(time.monotonic() - t0)
        await ctx.audit(EXPORT + DONE, grant_id=g.id, tenant=t.name, ref_seq=seq, rows=manifest["total_rows"],
                        duration_us=int((time.monotonic() - t0) * 1e6),
                        detail={"manifest_sha256": manifest_sha256(manifest), "snapshot_time": manifest["snapshot_time"],
                                "tables": {x["name"]: x["rows"] for x in manifest["tables"]}})
    _print_json({"tenant": t.name, "out": args.out, "total_rows": manifest["total_rows"],
                 "tables": {x["name"]: x["rows"] for x in manifest["tables"]},
                 "snapshot_time": manifest["snapshot_time"]})
    return 0


async def _verify_export(args) -> int:
    from proxy.commands.receipt import KeyUsageError, optional_config, public_keys, read_limits
    from proxy.lifecycle.export import verify_export

    cfg = optional_config(args)
    try:
        keys = public_keys(args, cfg)
    except KeyUsageError as e:
        raise ConfigError(str(e))
    m = verify_export(args.path, keys=keys, limits=read_limits(cfg))
    _print_json({"ok": True, "path": args.path, "tenant": m["tenant"], "total_rows": m.get("total_rows"),
                 "tables": {x["name"]: x["rows"] for x in m["tables"]}, "snapshot_time": m.get("snapshot_time")})
    return 0


async def _import(args) -> int:
    from proxy.commands.tenant_import import run_import

    return await run_import(args)


async def _offboard(args) -> int:
    async with _context(args) as ctx:
        await ctx.authenticate("offboard", args.tenant)
        await ctx.require_approver(args.tenant, "offboard")
        ctx.cfg = await _tenant_cfg(ctx, args.tenant)  # the tenant's region's server
        t = await ctx.tenant(args.tenant, "offboard")
        if t.status != "active":
            raise await ctx.refuse(LifecycleError(OBJECT_NOT_IN_STATE, f'tenant "{t.name}" is {t.status}, not active'), t.name, "offboard")
        t = await ctx.plane.set_tenant_status(t.name, "offboarded", actor=ctx.actor)
        from proxy.control.notices import schedule

        notices = await schedule(ctx.plane, t, ctx.cfg.lifecycle.notices)  # sent by `tenantgate notices send`
        _print_json(dict(t.to_json(), notices=[{"kind": n.kind, "due_at": n.due_at.isoformat(), "final": n.final}
                                              for n in notices]))
    return 0


async def _restore(args) -> int:
    async with _context(args) as ctx:
        await ctx.authenticate("restore", args.tenant)
        await ctx.require_approver(args.tenant, "restore")
        t = await ctx.tenant(args.tenant, "restore")
        if t.status != "offboarded":
            raise await ctx.refuse(LifecycleError(OBJECT_NOT_IN_STATE, f'tenant "{t.name}" is {t.status}, not offboarded'), t.name, "restore")
        if t.retention_end <= datetime.now(timezone.utc):
            raise await ctx.refuse(LifecycleError(
                OBJECT_NOT_IN_STATE, f'the retention period of tenant "{t.name}" ended at {_iso(t.retention_end)}',
                hint="a tenant can be restored only within its retention period"), t.name, "restore")
        t = await ctx.plane.set_tenant_status(t.name, "active", actor=ctx.actor)
        _print_json(t.to_json())
    return 0


async def _run_purge(ctx: _Ctx, tenant: str, *, operator: str, grant_id: int | None, mode: str) -> dict:
    """Purge one tenant; the receipt goes into the audit chain and the tenant becomes purged."""
    from proxy.control.audit import AuditRecord
    from proxy.lifecycle.purge import PurgeOptions, purge_tenant

    await ctx.plane.append(AuditRecord(PURGE_STARTED, operator=operator, grant_id=grant_id, tenant=tenant,
                                       detail={"mode": mode}))
    # every instance ends the tenant's sessions and accepts no new one; purge_tenant then waits
    # until the operator sessions' shared lock is free, so nothing writes while it deletes and verifies
    await ctx.plane.mark_purge_started(tenant, actor=ctx.actor, grant_id=grant_id)

    async def record(receipt: dict) -> None:
        await ctx.plane.append(AuditRecord(PURGE_RECEIPT, operator=operator, grant_id=grant_id, tenant=tenant,
                                           rows=receipt["total_rows"], detail=receipt))
        await ctx.plane.set_tenant_status(tenant, "purged", actor=ctx.actor, grant_id=grant_id,
                                          detail={"receipt_sha256": receipt["receipt_sha256"]})

    opts = PurgeOptions(batch_rows=ctx.cfg.lifecycle.purge_batch_rows, journal_schema=ctx.cfg.lifecycle.journal_schema,
                        operator=operator, grant_id=None if grant_id is None else str(grant_id),
                        signer=signer_from_config(ctx.cfg.audit), destroy_keys=key_destroyer(ctx, tenant, operator))
    t0 = time.monotonic()
    try:
        async with _data(ctx.cfg) as conn:
            schema = await _schema(ctx.cfg, conn)
            receipt = await purge_tenant(conn, schema, tenant, opts, record_receipt=record)
    except Exception as e:
        metrics.TENANT_PURGES_TOTAL.labels("error").inc()
        try:
            await ctx.plane.append(AuditRecord(PURGE_RECEIPT + FAILED, operator=operator, grant_id=grant_id, tenant=tenant,
                                               sqlstate=getattr(e, "sqlstate", "XX000"),
                                               detail={"message": str(getattr(e, "message", e))}))
        except Exception:
            pass
        raise
    metrics.TENANT_PURGES_TOTAL.labels("ok").inc()
    metrics.TENANT_PURGED_ROWS_TOTAL.inc(receipt["total_rows"])
    metrics.TENANT_PURGE_SECONDS.observe(time.monotonic() - t0)
    return receipt


async def _purge(args) -> int:
    async with _context(args) as ctx:
        await ctx.authenticate("purge", args.tenant)
        ctx.cfg = await _tenant_cfg(ctx, args.tenant)  # the tenant's region's server
        t = await ctx.tenant(args.tenant, "purge")
        now = datetime.now(timezone.utc)
        resuming = t.name in await _pending(ctx.cfg)
        if t.status == "purged" and not resuming:
            print(f'tenant "{t.name}" is already purged (at {_iso(t.purged_at)}); its receipt is in the audit chain',
                  file=sys.stderr)
            return 0
        if t.status == "active":
            raise await ctx.refuse(LifecycleError(
                OBJECT_NOT_IN_STATE, f'tenant "{t.name}" is active: offboard it first (tenantgate tenant offboard {t.name})'),
                t.name, "purge")
        mode = "resume" if t.status == "purged" else "retention ended"
        if t.status == "offboarded" and t.retention_end > now:
            if not args.now:
                raise await ctx.refuse(LifecycleError(
                    OBJECT_NOT_IN_STATE,
                    f'the retention period of tenant "{t.name}" ends at {_iso(t.retention_end)}',
                    hint=f"to purge before that, add --now --confirm {t.name}"), t.name, "purge")
            if args.confirm != t.name:
                raise await ctx.refuse(LifecycleError(
                    OBJECT_NOT_IN_STATE, "purging before the retention ends needs confirmation",
                    hint=f"repeat the tenant id: --now --confirm {t.name}"), t.name, "purge")
            mode = "now"
        g = await ctx.grant(t.name, "write", "purge")
        receipt = await _run_purge(ctx, t.name, operator=ctx.actor.name, grant_id=g.id, mode=mode)
    _print_json(receipt)
    return 0


async def _purge_expired(args) -> int:
    failures = 0
    from proxy.commands.tenant_notices import final_notice_ok
    from proxy.control.model import Actor

    async with _context(args) as ctx:
        service = ctx.cfg.lifecycle.service_name
        ctx.actor = Actor(service, frozenset())  # names the service in the audit records; it holds no roles
        now = datetime.now(timezone.utc)
        from proxy.control.placement import config_for_region

        base_cfg = ctx.cfg
        pending = set()
        for region in base_cfg.region_names():  # purges under way on any region's server
            pending.update(await _pending(config_for_region(base_cfg, region)))
        due = [t for t in await ctx.plane.list_tenants()
               if (t.status == "offboarded" and t.retention_end is not None and t.retention_end <= now)
               or (t.name in pending and t.status != "active")]
        forced = set(args.force_undelivered or ())
        approver = None
        if forced:  # only an approver may purge without a delivered final notice
            approver = await ctx.authenticate("purge without a delivered final notice", None)
            await ctx.require_approver(None, "force the purge of")
            ctx.actor = Actor(service, frozenset())
        for t in due:
            if (t.status == "offboarded" and t.purge_started_at is None
                    and not await final_notice_ok(ctx, t, forced, approver)):
                failures += 1
                continue
            try:
                ctx.cfg = base_cfg
                ctx.cfg = await _tenant_cfg(ctx, t.name)
                receipt = await _run_purge(ctx, t.name, operator=service, grant_id=None,
                                           mode="resume" if t.status == "purged" else "retention ended")
                print(json.dumps(receipt, ensure_ascii=False))
            except Exception as e:
                failures += 1
                print(_format_error(e), file=sys.stderr)
    return 1 if failures else 0


# --------------------------------------------------------------------------- argparse
def _run_loop(coro):
    """uvloop when available (export throughput depends on per-chunk loop overhead)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def _runner(coro_fn):
    def run(args) -> int:
        from proxy.control.model import ControlError

        try:
            return _run_loop(coro_fn(args))
        except ConfigError as e:
            print(f"ERROR:  {e}", file=sys.stderr)
            return 2
        except ControlError as e:
            print(str(_control_error(e)), file=sys.stderr)
            return 1
        except (LifecycleError, OSError) as e:
            print(_format_error(e), file=sys.stderr)
            return 1
        except Exception as e:
            if getattr(e, "sqlstate", None):
                print(_format_error(e), file=sys.stderr)
                return 1
            raise

    return run


def register(sub):
    p = sub.add_parser("tenant", help="tenant lifecycle: export, import, offboard, restore, purge, list",
                       description=__doc__.splitlines()[0])
    tsub = p.add_subparsers(dest="tenant_command", required=True, metavar="ACTION")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=os.environ.get("TENANTGATE_CONFIG", "tenantgate.yaml"),
                        help="config file (default: $TENANTGATE_CONFIG or tenantgate.yaml)")
    actor = argparse.ArgumentParser(add_help=False)
    actor.add_argument("--as", dest="as_", metavar="NAME", help="the person acting (authenticated)")
    actor.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    actor.add_argument("--totp", metavar="CODE", help="current TOTP code (when enrolled)")
    granted = argparse.ArgumentParser(add_help=False)
    granted.add_argument("--grant", type=int, metavar="ID", help="the grant to act under (default: the newest active one)")

    def add(name, fn, help_, parents):
        sp = tsub.add_parser(name, help=help_, parents=parents)
        sp.set_defaults(func=_runner(fn))
        return sp

    sp = add("list", _list, "tenants and their lifecycle status", [common])
    sp.add_argument("--json", action="store_true")
    sp = add("place", _place, "set the region a tenant's data lives in (approver; rows move with `tenant move`)",
             [common, actor])
    sp.add_argument("tenant")
    sp.add_argument("--region", required=True)
    sp.add_argument("--reason", help="why (recorded in the audit chain)")
    sp.add_argument("--force", action="store_true", help="place it although it has rows in its current region")
    sp = add("register", _register, "register a tenant as active (approver)", [common, actor])
    sp.add_argument("tenant")
    sp = add("export", _export, "export a tenant's rows (read grant)", [common, actor, granted])
    sp.add_argument("tenant")
    sp.add_argument("--out", required=True, help="a new directory, or a FILE.tar.zst")
    sp.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    sp = tsub.add_parser("verify-export", help="re-check an export's signature, row counts and checksums (offline)",
                         parents=[common])
    sp.add_argument("path")
    add_key_args(sp)
    sp.set_defaults(func=_runner(_verify_export))
    sp = add("import", _import, "load an export into an empty tenant, or bring a purged one back (write grant)",
             [common, actor, granted])
    sp.add_argument("tenant")
    sp.add_argument("path")
    sp.add_argument("--reactivate", action="store_true",
                    help="the tenant was purged: load its export and make it active again")
    sp = add("offboard", _offboard, "start the retention period: read and export only (approver)", [common, actor])
    sp.add_argument("tenant")
    sp = add("restore", _restore, "undo an offboarding within the retention period (approver)", [common, actor])
    sp.add_argument("tenant")
    sp = add("purge", _purge, "delete every row of a tenant after retention (write grant)", [common, actor, granted])
    sp.add_argument("tenant")
    sp.add_argument("--now", action="store_true", help="purge before the retention period ends")
    sp.add_argument("--confirm", metavar="TENANT", help="with --now: the tenant id again")
    sp = add("purge-expired", _purge_expired, "purge every tenant whose retention ended and whose final notice "
             "was delivered (service identity)", [common, actor])
    sp.add_argument("--force-undelivered", action="append", metavar="TENANT",
                    help="purge TENANT although its final notice was not delivered (approver, with --as)")
    from proxy.commands.tenant_notices import contact

    sp = add("contact", contact, "show, or set (approver), where a tenant's retention notices go", [common, actor])
    sp.add_argument("tenant")
    sp.add_argument("--webhook", metavar="URL", help="HTTP(S) URL that receives the signed notices (JSON POST)")
    register_backup(tsub, add, common, actor, granted)  # backup, restore-backup, backup-keygen
    register_move(add, common, actor)  # move (proxy/commands/tenant_move.py)
