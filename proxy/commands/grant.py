"""`tenantgate grant request|approve|deny|revoke|list|show`: just-in-time operator access.

    tenantgate grant request --tenant acme --access read --for 2h \\
        --reason "TICKET-123: customer reports missing invoices" --as bob
    tenantgate grant approve 7 --as alice          # someone other than bob
    PGOPTIONS='-c tenantgate.grant=7' psql "host=... user=bob dbname=app"
    tenantgate grant revoke 7 --as bob             # or an approver

States: pending -> approved | denied | expired (unanswered) | revoked;
approved -> expired | revoked.  Self-approval is impossible.  Every change is
in the audit chain.

The grant policy (maximum duration, approvals needed, how long a request
waits, the account change window, lockout limits) lives in the control
schema, not in the config file, and is re-checked at every approval:

    tenantgate grant policy show
    tenantgate grant policy set --max-duration 4h --approvals-required 2 --as alice
    tenantgate operator approve N --as carol        # another approver
"""

from __future__ import annotations

import argparse

from proxy.textsafe import safe_text

from .control_common import EXIT_OK, add_actor_args, add_config_arg, authenticate, control_plane, emit, run, table


def register(sub):
    p = sub.add_parser("grant", help="request, approve and revoke operator access grants",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ops = p.add_subparsers(dest="grant_command", required=True, metavar="ACTION")

    r = ops.add_parser("request", help="request access to one tenant")
    r.add_argument("--tenant", required=True)
    r.add_argument("--access", required=True, choices=["read", "write"])
    r.add_argument("--for", dest="duration", required=True, metavar="DURATION", help="e.g. 30m, 1h, 2h30m")
    r.add_argument("--reason", required=True, help="why (e.g. the ticket)")
    add_config_arg(r)
    add_actor_args(r)
    r.set_defaults(func=lambda args: run(args, _request))

    for name, helptext in (("approve", "approve a pending grant (approvers; not your own)"),
                           ("deny", "deny a pending grant (approvers; not your own)"),
                           ("revoke", "end a pending or active grant (requester or approver)")):
        c = ops.add_parser(name, help=helptext)
        c.add_argument("id", type=int)
        c.add_argument("--comment", "--reason", dest="comment")
        add_config_arg(c)
        add_actor_args(c)
        c.set_defaults(func=lambda args, _n=name: run(args, lambda a: _decide(a, _n)))

    ls = ops.add_parser("list", help="list grants (newest first)")
    ls.add_argument("--state", choices=["pending", "approved", "denied", "expired", "revoked"])
    ls.add_argument("--tenant")
    ls.add_argument("--requester")
    ls.add_argument("--limit", type=int, default=50)
    add_config_arg(ls)
    ls.set_defaults(func=lambda args: run(args, _list))

    pol = ops.add_parser("policy", help="show or change the grant policy (changes: two approvers)")
    pops = pol.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    ps = pops.add_parser("show", help="the grant policy in force")
    add_config_arg(ps)
    ps.set_defaults(func=lambda args: run(args, _policy_show))
    pset = pops.add_parser("set", help="request a policy change (bootstrap: set it directly, without --as)")
    from proxy.control.grant_policy import SETTINGS

    for name in SETTINGS:
        pset.add_argument("--" + name.replace("_", "-"), dest=name, metavar="VALUE")
    pset.add_argument("--reason")
    add_config_arg(pset)
    add_actor_args(pset, required=False)
    pset.set_defaults(func=lambda args: run(args, _policy_set))

    sh = ops.add_parser("show", help="show one grant with its approvals")
    sh.add_argument("id", type=int)
    add_config_arg(sh)
    sh.set_defaults(func=lambda args: run(args, _show))


def _fmt(d) -> str:
    return d.strftime("%Y-%m-%d %H:%M:%S UTC") if d else "-"


def _describe(g) -> str:
    lines = [
        f"grant {g.id}: {g.state}",
        f"  requester:  {safe_text(g.requester)}",
        f"  tenant:     {safe_text(g.tenant)}",
        f"  access:     {g.access}",
        f"  duration:   {g.to_json()['duration']}",
        f"  reason:     {safe_text(g.reason)}",
        f"  requested:  {_fmt(g.created_at)}",
        f"  approvals:  {sum(1 for a in g.approvals if a.decision == 'approve')} of {g.approvals_required}",
    ]
    if g.state == "pending":
        lines.append(f"  answer by:  {_fmt(g.pending_until)}")
    if g.approved_at:
        lines.append(f"  approved:   {_fmt(g.approved_at)}")
        lines.append(f"  expires:    {_fmt(g.expires_at)}")
    if g.ended_at:
        lines.append(f"  ended:      {_fmt(g.ended_at)}" + (f" by {safe_text(g.ended_by)}" if g.ended_by else "")
                     + (f" ({safe_text(g.end_reason)})" if g.end_reason else ""))
    for a in g.approvals:
        lines.append(f"    {a.decision:8} {safe_text(a.approver)} at {_fmt(a.decided_at)}" + (f": {safe_text(a.comment)}" if a.comment else ""))
    return "\n".join(lines)


async def _request(args) -> int:
    async with control_plane(args) as plane:
        actor = await authenticate(plane, args)
        from proxy.control.placement import check_residency

        from .control_common import load

        cfg = load(args)
        # operator residency: a tenant in a region the account may not reach is refused here (audited)
        await check_residency(plane, cfg, actor.name, args.tenant, audit=True)
        if cfg.regions:  # an unregistered tenant is looked up in the data of its own region
            from proxy.control.placement import tenant_config
            from proxy.control.tenant_discovery import data_probe

            plane.tenant_probe = data_probe(await tenant_config(plane, cfg, args.tenant))
        g = await plane.request_grant(actor, args.tenant, args.access, args.duration, args.reason)
        emit(args, g.to_json(), lambda: _describe(g) + f"\nAsk an approver: tenantgate grant approve {g.id}")
    return EXIT_OK


async def _decide(args, action: str) -> int:
    async with control_plane(args) as plane:
        actor = await authenticate(plane, args)
        fn = {"approve": plane.approve_grant, "deny": plane.deny_grant, "revoke": plane.revoke_grant}[action]
        g = await fn(actor, args.id, args.comment)
        emit(args, g.to_json(), lambda: _describe(g))
    return EXIT_OK


async def _list(args) -> int:
    async with control_plane(args) as plane:
        await plane.expire_due()
        grants = await plane.list_grants(state=args.state, tenant=args.tenant, requester=args.requester,
                                         limit=args.limit)
        emit(args, [g.to_json() for g in grants], lambda: table(
            ["id", "state", "requester", "tenant", "access", "duration", "expires", "reason"],
            [[g.id, g.state, g.requester, g.tenant, g.access, g.to_json()["duration"],
              _fmt(g.expires_at) if g.state == "approved" else "", g.reason[:40]] for g in grants]))
    return EXIT_OK


async def _show(args) -> int:
    async with control_plane(args) as plane:
        await plane.expire_due()
        g = await plane.get_grant(args.id)
        emit(args, g.to_json(), lambda: _describe(g))
    return EXIT_OK


async def _policy_show(args) -> int:
    async with control_plane(args) as plane:
        p = await plane.policy()
        d = p.to_json()
        emit(args, d, lambda: "grant policy (control schema):\n" + "\n".join(f"  {k:24} {v}" for k, v in d.items()))
    return EXIT_OK


async def _policy_set(args) -> int:
    from proxy.control.accounts import bootstrap_policy, request_change
    from proxy.control.grant_policy import SETTINGS

    settings = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}
    async with control_plane(args) as plane:
        if args.actor:
            actor = await authenticate(plane, args)
            req = await request_change(plane, actor, "policy.set", None, {"settings": settings}, args.reason)
            emit(args, req.to_json(), f"change request {req.id}: policy.set {settings}\n"
                 f"Another approver must approve it: tenantgate operator approve {req.id} --as NAME")
        else:
            p = await bootstrap_policy(plane, plane.platform_admin(), settings)
            emit(args, p.to_json(), "grant policy set [bootstrap]")
    return EXIT_OK
