"""`tenant contact` and the retention-notice gate of `tenant purge-expired` (docs/lifecycle.md).

Kept apart from :mod:`proxy.commands.tenant` (which registers the parsers and calls these); the
notices themselves are :mod:`proxy.control.notices`.
"""

from __future__ import annotations

import sys

from proxy.lifecycle.tables import OBJECT_NOT_IN_STATE, LifecycleError


async def contact(args) -> int:
    """Set (approver) or show where a tenant's retention notices go."""
    from urllib.parse import urlsplit

    from proxy.commands.tenant_context import _context, _print_json
    from proxy.control.notices import get_contact, set_contact

    async with _context(args) as ctx:
        if args.webhook is None:
            _print_json({"tenant": args.tenant, "webhook": await get_contact(ctx.plane, args.tenant)})
            return 0
        await ctx.authenticate("contact", args.tenant)
        await ctx.require_approver(args.tenant, "set the contact of")
        u = urlsplit(args.webhook)
        if u.scheme not in ("https", "http") or not u.hostname:
            raise await ctx.refuse(LifecycleError("22023", f"not an http(s) URL: {args.webhook!r}"),
                                   args.tenant, "contact")
        t = await ctx.tenant(args.tenant, "contact")
        await set_contact(ctx.plane, t.name, args.webhook, ctx.actor.name)
        _print_json({"tenant": t.name, "webhook": args.webhook})
    return 0


async def final_notice_ok(ctx, t, forced: set[str], approver) -> bool:
    """purge-expired purges a tenant only once its final retention notice was delivered, or an approver
    forced it for this tenant (--force-undelivered T, audited); a refusal is printed and audited."""
    from proxy.commands.tenant_context import PURGE_FORCED, _format_error
    from proxy.control.audit import AuditRecord
    from proxy.control.notices import final_notice_state

    if not ctx.cfg.lifecycle.notices.require_final_for_purge:
        return True
    delivered, why = await final_notice_state(ctx.plane, t)
    if delivered:
        return True
    if t.name in forced:
        await ctx.plane.append(AuditRecord(PURGE_FORCED, operator=approver.name, tenant=t.name,
                                           detail={"reason": why, "service": ctx.cfg.lifecycle.service_name}))
        return True
    err = LifecycleError(OBJECT_NOT_IN_STATE, f'tenant "{t.name}" is not purged: {why}',
                         hint=f"deliver it (tenantgate notices send), or an approver forces the purge: "
                              f"tenant purge-expired --force-undelivered {t.name} --as NAME")
    await ctx.refuse(err, t.name, "purge-expired")
    print(_format_error(err), file=sys.stderr)
    return False

