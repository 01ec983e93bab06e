"""`tenantgate tenant move`: move a tenant's rows to another region's server, online (docs/scale-out.md).

Two approvers (the two-person rule)::

    tenantgate tenant move acme --to cn-north --as bob          # asks: prints the move id
    tenantgate tenant move --approve 7 --as carol --console DSN  # a second approver confirms; it runs
    tenantgate tenant move acme --resume --as carol --console DSN
    tenantgate tenant move acme --abort --as carol --console DSN
    tenantgate tenant move --status [acme]

The engine is :mod:`proxy.lifecycle.move`.  The cutover holds the tenant at **every tenantgate
instance** through their admin consoles (``PAUSE TENANT`` / ``RESUME TENANT``, each returns once the
tenant's in-flight transactions ended): give each instance's admin console DSN with ``--console`` (or
``$TENANTGATE_MOVE_CONSOLES``, comma separated).  Without any, the move refuses to run unless
``--no-proxies`` says no tenantgate instance serves the tenant (nothing to hold).

The servers are reached with ``--source-dsn`` / ``--target-dsn`` (default: each region's
``regions.<r>.data_dsn``, :func:`proxy.control.placement.data_dsn_for`); the roles must be able to
create a publication (the tables' owner, or a superuser) on the source and a subscription (a superuser)
on the target, and see every row.  ``--source-conninfo`` is how the target server reaches the source
(default: the source DSN).

Every request, approval, step, refusal and the source's deletion receipt are in the audit chain
(``tenant.move.*``).
"""

from __future__ import annotations

import os
import sys

from proxy.commands.tenant_context import _context, _print_json
from proxy.config import ConfigError
from proxy.lifecycle.tables import INSUFFICIENT_PRIVILEGE, OBJECT_NOT_IN_STATE, LifecycleError

REQUESTED = "tenant.move.requested"
APPROVED = "tenant.move.approved"
DONE = "tenant.move.done"
FAILED = "tenant.move.failed"
RECEIPT = "tenant.move.purge"  # detail = the source's deletion receipt


class Consoles:
    """PAUSE TENANT / RESUME TENANT on every instance's admin console (psycopg 3, simple queries)."""

    def __init__(self, dsns: list[str], tenant: str):
        if dsns and (not tenant or any(c.isspace() or c in ';"' for c in tenant) or tenant[0] == "'"):
            # PAUSE TENANT takes one bare word: a name it would read differently cannot be held
            raise LifecycleError("22023", f"tenant {tenant!r} cannot be named in the admin console's PAUSE TENANT",
                                 hint="such a tenant can only be moved with --no-proxies")
        self.dsns = dsns
        self.tenant = tenant

    async def _run(self, dsn: str, sql: str, ok_if: str) -> None:
        import psycopg

        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            try:
                await conn.execute(sql, prepare=False)
            except psycopg.Error as e:
                if ok_if not in str(e):  # already paused (a resumed cutover) / not paused: the state we want
                    raise

    async def hold(self) -> None:
        import asyncio

        await asyncio.gather(*(self._run(d, f"PAUSE TENANT {self.tenant}", "already paused") for d in self.dsns))

    async def release(self) -> None:
        import asyncio

        res = await asyncio.gather(*(self._run(d, f"RESUME TENANT {self.tenant}", "is not paused") for d in self.dsns),
                                   return_exceptions=True)
        failed = [str(r) for r in res if isinstance(r, BaseException)]
        if failed:
            print(f"WARNING:  RESUME TENANT {self.tenant} failed on an instance: {'; '.join(failed)}\n"
                  f"HINT:  run RESUME TENANT {self.tenant} on its admin console", file=sys.stderr)


def _console_dsns(args) -> list[str]:
    dsns = list(args.console or ())
    env = os.environ.get("TENANTGATE_MOVE_CONSOLES", "")
    dsns += [d.strip() for d in env.split(",") if d.strip()]
    return dsns


async def _ensure_table(plane) -> None:
    from proxy.control.schema import install_control_schema

    async with plane.pool.acquire() as conn:
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{plane.s}.tenant_moves"):
            await install_control_schema(conn, plane.schema)


def _spec(cfg):
    from proxy.lifecycle.move import TableSpec

    if cfg.rules_file:
        from proxy.policy.rules import load_rules

        rules = load_rules(cfg.rules_file)
        return TableSpec(rules.tenant_column, rules.schemas, None if rules.discover else sorted(rules.tenant_table_keys)), rules
    return TableSpec(), None


async def _request(ctx, args) -> int:
    from proxy.control.model import ControlError
    from proxy.control.placement import check_region, get_placement, region_of
    from proxy.lifecycle.move_state import MoveStore

    await ctx.authenticate("move", args.tenant)
    await ctx.require_approver(args.tenant, "move")
    t = await ctx.tenant(args.tenant, "move")
    if t.status != "active":
        raise await ctx.refuse(LifecycleError(OBJECT_NOT_IN_STATE, f'tenant "{t.name}" is {t.status}: only an active '
                                              "tenant is moved"), t.name, "move")
    source = region_of(ctx.cfg, await get_placement(ctx.plane, t.name))
    _, rules = _spec(ctx.cfg)
    try:
        check_region(ctx.cfg, rules, t.name, args.to)
    except ControlError as e:
        raise await ctx.refuse(LifecycleError("22023", str(e)), t.name, "move")
    if args.to == source:
        raise await ctx.refuse(LifecycleError(OBJECT_NOT_IN_STATE, f'tenant "{t.name}" is in {source} already'),
                               t.name, "move")
    store = MoveStore(ctx.plane.pool, ctx.plane.s)
    try:
        m = await store.create(t.name, source, args.to, ctx.actor.name, {"reason": args.reason or ""})
    except LifecycleError as e:
        raise await ctx.refuse(e, t.name, "move")
    await ctx.audit(REQUESTED, tenant=t.name, detail={"move_id": m.id, "from": source, "to": args.to,
                                                      "reason": args.reason or ""})
    print(f"move {m.id}: tenant {t.name} from {source} to {args.to} requested by {ctx.actor.name}; "
          f"a second approver confirms it with: tenantgate tenant move --approve {m.id} --as NAME", file=sys.stderr)
    _print_json(m.to_json())
    return 0


async def _require_hold(ctx, args, tenant: str | None) -> list[str]:
    """The admin consoles to hold the tenant at; refused (before anything happens) when there are none and
    --no-proxies was not given: a cutover that holds nothing could lose the tenant's last writes."""
    consoles = _console_dsns(args)
    if not consoles and not args.no_proxies:
        raise await ctx.refuse(LifecycleError(
            OBJECT_NOT_IN_STATE, "the cutover must hold the tenant at every tenantgate instance",
            hint="give each instance's admin console with --console DSN (or $TENANTGATE_MOVE_CONSOLES), or "
                 "--no-proxies when no tenantgate instance serves the tenant"), tenant, "move")
    if consoles and tenant is not None:
        try:
            Consoles(consoles, tenant)
        except LifecycleError as e:
            raise await ctx.refuse(e, tenant, "move")
    return consoles


async def _engine(ctx, args, move):
    """The engine for ``move``, wired to the placement, the consoles and the audit chain."""
    from proxy.control.audit import AuditRecord
    from proxy.control.placement import data_dsn_for, set_placement
    from proxy.lifecycle.move import MoveHooks, MoveOptions, TenantMove
    from proxy.lifecycle.move_state import MoveStore
    from proxy.lifecycle.purge import PurgeOptions
    from proxy.signing import signer_from_config

    consoles = await _require_hold(ctx, args, move.tenant)
    hold = Consoles(consoles, move.tenant)
    source_dsn = args.source_dsn or data_dsn_for(ctx.cfg, move.source_region)
    target_dsn = args.target_dsn or data_dsn_for(ctx.cfg, move.target_region)
    actor = ctx.actor

    async def audit(type_: str, detail: dict) -> None:
        await ctx.plane.append(AuditRecord(type_, operator=actor.name, tenant=move.tenant, detail=detail))

    async def flip(conn) -> None:
        await set_placement(ctx.plane, actor, move.tenant, move.target_region, moving=True, conn=conn,
                            reason=f"tenant move {move.id}: {move.source_region} -> {move.target_region}")

    async def receipt(doc: dict) -> None:
        await ctx.plane.append(AuditRecord(RECEIPT, operator=actor.name, tenant=move.tenant, rows=doc["total_rows"],
                                           detail=doc))

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    spec, _ = _spec(ctx.cfg)
    opts = MoveOptions(hold_timeout_s=args.hold_timeout, source_conninfo=args.source_conninfo,
                       purge_unverified=args.purge_unverified,
                       purge=PurgeOptions(batch_rows=ctx.cfg.lifecycle.purge_batch_rows,
                                          journal_schema=ctx.cfg.lifecycle.journal_schema, operator=actor.name,
                                          signer=signer_from_config(ctx.cfg.audit)))
    hooks = MoveHooks(flip=flip, audit=audit, progress=progress, record_receipt=receipt)
    if consoles:
        hooks.hold, hooks.release = hold.hold, hold.release
    return TenantMove(MoveStore(ctx.plane.pool, ctx.plane.s), move, source_dsn, target_dsn, spec, hooks, opts,
                      control_tx=ctx.plane._tx)


async def _set_moving(ctx, move, moving: bool) -> None:
    from proxy.control.placement import set_moving

    await set_moving(ctx.plane, ctx.actor, move.tenant, moving, default_region=move.source_region,
                     reason=f"tenant move {move.id}")


async def _run(ctx, args, move) -> int:
    engine = await _engine(ctx, args, move)
    if move.step == "approved":
        await _set_moving(ctx, move, True)
    try:
        move = await engine.run()
    except BaseException as e:
        await ctx.audit(FAILED, tenant=move.tenant, sqlstate=getattr(e, "sqlstate", "XX000"),
                        detail={"move_id": move.id, "step": move.step, "message": str(getattr(e, "message", e)),
                                "on": move.target_region if move.flipped else move.source_region})
        raise
    await _set_moving(ctx, move, False)
    await ctx.audit(DONE, tenant=move.tenant, detail={"move_id": move.id, "from": move.source_region,
                                                      "to": move.target_region, "cutover": move.detail.get("cutover"),
                                                      "source_purge": move.detail.get("source_purge")})
    _print_json(move.to_json())
    return 0


async def _approve(ctx, args) -> int:
    from proxy.lifecycle.move_state import MoveStore

    store = MoveStore(ctx.plane.pool, ctx.plane.s)
    m = await store.get(args.approve)
    tenant = m.tenant if m else None
    await ctx.authenticate("approve a move", tenant)
    await ctx.require_approver(tenant, "move")
    await _require_hold(ctx, args, tenant)
    try:
        m = await store.approve(args.approve, ctx.actor.name)
    except LifecycleError as e:
        raise await ctx.refuse(e, tenant, "move")
    await ctx.audit(APPROVED, tenant=m.tenant, detail={"move_id": m.id, "requested_by": m.requested_by,
                                                       "from": m.source_region, "to": m.target_region})
    return await _run(ctx, args, m)


async def _resume_or_abort(ctx, args) -> int:
    from proxy.lifecycle.move_state import MoveStore

    action = "resume" if args.resume else "abort"
    await ctx.authenticate(f"{action} a move", args.tenant)
    await ctx.require_approver(args.tenant, "move")
    await _require_hold(ctx, args, args.tenant)
    m = await MoveStore(ctx.plane.pool, ctx.plane.s).open_for(args.tenant)
    if m is None:
        raise await ctx.refuse(LifecycleError(OBJECT_NOT_IN_STATE, f'tenant "{args.tenant}" has no unfinished move'),
                               args.tenant, action)
    if m.step == "requested" and action == "resume":
        raise await ctx.refuse(LifecycleError(INSUFFICIENT_PRIVILEGE, f"move {m.id} awaits a second approver",
                                              hint=f"tenantgate tenant move --approve {m.id} --as NAME"),
                               m.tenant, action)
    await ctx.audit(f"tenant.move.{action}", tenant=m.tenant, detail={"move_id": m.id, "step": m.step})
    if action == "resume" or m.flipped:
        return await _run(ctx, args, m)
    if m.step == "requested":  # nothing was done yet
        await MoveStore(ctx.plane.pool, ctx.plane.s).set_step(m, "aborted")
        await ctx.audit("tenant.move.aborted", tenant=m.tenant, detail={"move_id": m.id, "from": "requested"})
        _print_json(m.to_json())
        return 0
    engine = await _engine(ctx, args, m)
    m = await engine.abort()
    await _set_moving(ctx, m, False)
    _print_json(m.to_json())
    return 0


async def _status(ctx, args) -> int:
    rows = await ctx.plane.pool.fetch(
        f"SELECT * FROM {ctx.plane.s}.tenant_moves WHERE $1::text IS NULL OR tenant = $1 ORDER BY id", args.tenant)
    from proxy.lifecycle.move_state import Move

    _print_json([Move.from_row(r).to_json() for r in rows])
    return 0


async def move(args) -> int:
    async with _context(args) as ctx:
        await _ensure_table(ctx.plane)
        if args.status:
            return await _status(ctx, args)
        if args.approve is not None:
            return await _approve(ctx, args)
        if not args.tenant:
            raise ConfigError("tenant move needs TENANT (or --approve MOVE_ID, or --status)")
        if args.resume or args.abort:
            return await _resume_or_abort(ctx, args)
        if not args.to:
            raise ConfigError("tenant move TENANT needs --to REGION (or --resume / --abort)")
        return await _request(ctx, args)


def register(add, common, actor) -> None:
    sp = add("move", move, "move a tenant to another region online (two approvers; logical replication)",
             [common, actor])
    sp.add_argument("tenant", nargs="?")
    sp.add_argument("--to", metavar="REGION", help="the region to move the tenant to (asks for the move)")
    sp.add_argument("--reason", help="why (recorded in the audit chain)")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--approve", type=int, metavar="MOVE_ID", help="confirm a move another approver asked for; runs it")
    g.add_argument("--resume", action="store_true", help="carry an interrupted move on from its last step")
    g.add_argument("--abort", action="store_true", help="roll back a move before its flip (after it: finish it)")
    g.add_argument("--status", action="store_true", help="list moves (of TENANT) as JSON")
    sp.add_argument("--console", action="append", metavar="DSN",
                    help="an instance's admin console (repeat for every instance): the cutover holds the tenant there")
    sp.add_argument("--no-proxies", action="store_true", help="no tenantgate instance serves the tenant: hold nothing")
    sp.add_argument("--source-dsn", help="the source server (default: the region's data_dsn)")
    sp.add_argument("--target-dsn", help="the target server (default: the region's data_dsn)")
    sp.add_argument("--source-conninfo", help="how the target server connects to the source (default: --source-dsn)")
    sp.add_argument("--purge-unverified", action="store_true",
                    help="with --resume: purge the source although the checksums at the flip were not compared equal "
                         "(after you compared the rows yourself)")
    sp.add_argument("--hold-timeout", type=float, default=10.0, metavar="SECONDS",
                    help="in-flight transactions must end within this at cutover, else the cutover is abandoned")
