"""`tenantgate operator ...`: operator and approver accounts, under the two-person rule.

Accounts live in the control schema.  Anything that could create access is
a change request that a *different* approver approves; nobody ever sees
another person's password or TOTP secret.

Bootstrap (while fewer than two approvers exist): the platform admin who
holds the control DSN (the config's ``control.dsn``) adds the first accounts
without ``--as``; this also installs the control schema if it is missing.
The password is read from a prompt, or with ``--password-stdin`` from the
first line of standard input::

    tenantgate operator add alice --role approver --config tenantgate.yaml
    tenantgate operator add carol --role approver --config tenantgate.yaml

Afterwards (``--as`` an approver; with ``--password-stdin`` the first line
of standard input is that approver's password)::

    tenantgate operator add bob --as alice            # change request N
    tenantgate operator approve N --as carol          # prints bob's one-time enrolment token
    tenantgate operator enrol --token TOKEN           # bob: own password, own TOTP secret
    tenantgate operator roles bob --role approver --as alice    # request; another approves
    tenantgate operator reset bob --as alice          # request: bob's password and TOTP are wiped,
                                                      # the approval prints a new enrolment token
    tenantgate operator enable bob --as alice         # request
    tenantgate operator disable|remove bob --as alice # immediate (takes access away)
    tenantgate operator unlock bob --as alice         # lift a lockout after failed logins
    tenantgate operator regions bob --regions cn-east --as alice  # residency: grants only for
                                                      # tenants placed in cn-east ('all': any region)
    tenantgate operator requests [--state pending]    # change requests (accounts and grant policy)

Your own credentials: ``operator passwd --as bob`` (old password on the first
line, new one on the second with ``--password-stdin``) and ``operator
enrol-totp --as bob`` (replaces your TOTP secret and prints it to you).
"""

from __future__ import annotations

import argparse

from .control_common import (
    EXIT_OK,
    add_actor_args,
    add_config_arg,
    authenticate,
    control_plane,
    emit,
    read_secret,
    run,
    table,
)


def register(sub):
    p = sub.add_parser("operator", help="manage operator and approver accounts (two-person rule)",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ops = p.add_subparsers(dest="operator_command", required=True, metavar="ACTION")

    a = ops.add_parser("add", help="request a new account (bootstrap: add it directly, without --as)")
    a.add_argument("name")
    a.add_argument("--role", action="append", choices=["operator", "approver"],
                   help="role (repeatable; default: operator)")
    a.add_argument("--reason")
    a.add_argument("--regions", metavar="A,B", help="regions whose tenants the account may be granted "
                                                   "(bootstrap only; later: operator regions)")
    add_config_arg(a)
    add_actor_args(a, required=False)
    a.set_defaults(func=lambda args: run(args, _add))

    rg = ops.add_parser("regions", help="set the regions whose tenants an account may be granted (approver)")
    rg.add_argument("name")
    rg.add_argument("--regions", required=True, metavar="A,B", help="comma-separated regions, or 'all'")
    add_config_arg(rg)
    add_actor_args(rg)
    rg.set_defaults(func=lambda args: run(args, _regions))

    for name, helptext in (("roles", "request new roles for an account"),
                           ("reset", "request a credential reset (the person enrols again with a token)"),
                           ("enable", "request that a disabled account is enabled again")):
        c = ops.add_parser(name, help=helptext)
        c.add_argument("name")
        if name == "roles":
            c.add_argument("--role", action="append", choices=["operator", "approver"], required=True)
        c.add_argument("--reason")
        add_config_arg(c)
        add_actor_args(c)
        c.set_defaults(func=lambda args, _k=name: run(args, lambda a: _request(a, _k)))

    for name, helptext in (("approve", "approve a change request of someone else (prints an enrolment token)"),
                           ("deny", "deny a change request")):
        c = ops.add_parser(name, help=helptext)
        c.add_argument("id", type=int)
        c.add_argument("--comment")
        add_config_arg(c)
        add_actor_args(c)
        c.set_defaults(func=lambda args, _n=name: run(args, lambda a: _decide(a, _n == "approve")))

    rq = ops.add_parser("requests", help="list change requests (accounts and grant policy)")
    rq.add_argument("--state", choices=["pending", "approved", "denied", "expired"])
    add_config_arg(rq)
    rq.set_defaults(func=lambda args: run(args, _requests))

    e = ops.add_parser("enrol", help="enrol with a one-time token: set your password, get your TOTP secret")
    e.add_argument("--token", required=True)
    e.add_argument("--password-stdin", action="store_true", help="read the new password from standard input")
    add_config_arg(e)
    e.set_defaults(func=lambda args: run(args, _enrol))

    for name, helptext in (("remove", "remove an account (its pending and active grants are revoked)"),
                           ("disable", "disable an account at once"),
                           ("unlock", "lift the lockout of an account (or --address) after failed authentications")):
        c = ops.add_parser(name, help=helptext)
        c.add_argument("name", nargs="?" if name == "unlock" else None)
        if name == "unlock":
            c.add_argument("--address", metavar="IP", help="unlock a client address instead of an account")
        add_config_arg(c)
        add_actor_args(c)
        c.set_defaults(func=lambda args, _n=name: run(args, lambda a: _single(a, _n)))

    ls = ops.add_parser("list", help="list accounts")
    add_config_arg(ls)
    ls.set_defaults(func=lambda args: run(args, _list))

    t = ops.add_parser("enrol-totp", help="replace your own TOTP secret; prints it once")
    t.add_argument("name", nargs="?", help="your account (default: the --as person)")
    add_config_arg(t)
    add_actor_args(t)
    t.set_defaults(func=lambda args: run(args, _enrol_totp))

    pw = ops.add_parser("passwd", help="change your own password")
    pw.add_argument("name", nargs="?", help="your account (default: the --as person)")
    add_config_arg(pw)
    add_actor_args(pw)
    pw.set_defaults(func=lambda args: run(args, _passwd))


def _request_text(req) -> str:
    return (f"change request {req.id}: {req.kind} {req.account or ''} "
            f"{req.payload if req.payload else ''}".rstrip()
            + f"\nAnother approver must approve it: tenantgate operator approve {req.id} --as NAME")


async def _add(args) -> int:
    from proxy.control.accounts import request_change

    async with control_plane(args, install=True) as plane:
        if args.actor:
            if args.regions:
                from .control_common import UsageError

                raise UsageError("--regions: set them once the account exists (tenantgate operator regions NAME "
                                 "--regions A,B --as APPROVER)")
            actor = await authenticate(plane, args)
            req = await request_change(plane, actor, "account.create", args.name,
                                       {"roles": args.role or ["operator"]}, args.reason)
            emit(args, req.to_json(), _request_text(req))
            return EXIT_OK
        actor = plane.platform_admin()  # bootstrap by the control DSN holder (refused once 2 approvers exist)
        password = read_secret(args, f"new password for {args.name}: ", confirm=True)
        op = await plane.add_operator(actor, args.name, password, args.role or ["operator"])
        if args.regions:
            from proxy.control.placement import set_operator_regions

            await set_operator_regions(plane, actor, args.name, _region_list(args.regions))
        emit(args, op.to_json(), f"added {op.name} ({', '.join(sorted(op.roles))}) [bootstrap]")
    return EXIT_OK


def _region_list(text: str) -> list[str] | None:
    if text.strip() == "all":
        return None
    return [r.strip() for r in text.split(",") if r.strip()]


async def _regions(args) -> int:
    """Operator residency (proxy/control/placement.py): grant requests for tenants elsewhere are refused."""
    from proxy.control.placement import operator_regions, set_operator_regions

    async with control_plane(args) as plane:
        actor = await authenticate(plane, args)
        await set_operator_regions(plane, actor, args.name, _region_list(args.regions))
        now = await operator_regions(plane, args.name)
        emit(args, {"name": args.name, "regions": now}, f"{args.name}: regions {', '.join(now) if now is not None else 'all'}")
    return EXIT_OK


async def _request(args, what: str) -> int:
    from proxy.control.accounts import request_change

    kind = {"roles": "account.roles", "reset": "account.reset", "enable": "account.enable"}[what]
    async with control_plane(args) as plane:
        actor = await authenticate(plane, args)
        payload = {"roles": args.role} if what == "roles" else {}
        req = await request_change(plane, actor, kind, args.name, payload, args.reason)
        emit(args, req.to_json(), _request_text(req))
    return EXIT_OK


async def _decide(args, approve: bool) -> int:
    from proxy.control.accounts import decide_change

    async with control_plane(args) as plane:
        actor = await authenticate(plane, args)
        req, token = await decide_change(plane, actor, args.id, approve, args.comment)
        out = req.to_json()
        text = f"change request {req.id} ({req.kind} {req.account or ''}) {req.state}"
        if token:
            out["enrolment_token"] = token
            text += (f"\nOne-time enrolment token for {req.account} (give it to them, and to nobody else):\n"
                     f"  {token}\nThey run: tenantgate operator enrol --token TOKEN --config FILE")
        emit(args, out, text)
    return EXIT_OK


async def _requests(args) -> int:
    from proxy.control.accounts import list_changes

    async with control_plane(args) as plane:
        reqs = await list_changes(plane, args.state)
        emit(args, [r.to_json() for r in reqs], lambda: table(
            ["id", "state", "kind", "account", "requested_by", "decided_by", "payload"],
            [[r.id, r.state, r.kind, r.account or "", r.requested_by, r.decided_by or "",
              str(r.payload) if r.payload else ""] for r in reqs]))
    return EXIT_OK


async def _enrol(args) -> int:
    from proxy.control.accounts import enrol

    async with control_plane(args) as plane:
        password = read_secret(args, "choose your password: ", confirm=True)
        name, secret, uri = await enrol(plane, args.token, password)
        emit(args, {"name": name, "secret": secret, "uri": uri},
             f"enrolled {name}.\n  TOTP secret: {secret}\n  uri:         {uri}\n"
             "Add it to your authenticator app now; it is not shown again.\n"
             "Give --totp CODE to tenantgate commands and connect with PGOPTIONS='-c tenantgate.totp=CODE' "
             "(each code works once).")
    return EXIT_OK


async def _single(args, what: str) -> int:
    from proxy.control.accounts import unlock_account

    async with control_plane(args) as plane:
        actor = await authenticate(plane, args)
        if what == "remove":
            await plane.remove_operator(actor, args.name)
            emit(args, {"removed": args.name}, f"removed {args.name}")
        elif what == "disable":
            await plane.set_enabled(actor, args.name, False)
            emit(args, {"disabled": args.name}, f"disabled {args.name}")
        else:
            what = args.name or args.address
            was = await unlock_account(plane, actor, args.name, args.address)
            emit(args, {"unlocked": what, "was_locked": was}, f"unlocked {what}" if was else f"{what} was not locked")
    return EXIT_OK


async def _list(args) -> int:
    from proxy.control.placement import all_operator_regions

    async with control_plane(args) as plane:
        ops = await plane.list_operators()
        regions = await all_operator_regions(plane)
        emit(args, [dict(o.to_json(), regions=regions.get(o.name)) for o in ops], lambda: table(
            ["name", "roles", "totp", "enabled", "created", "regions"],
            [[o.name, ",".join(sorted(o.roles)), "yes" if o.totp_enrolled else "no",
              "yes" if o.enabled else "no", o.created_at.strftime("%Y-%m-%d %H:%M"),
              ",".join(regions.get(o.name) or []) if regions.get(o.name) is not None else "all"] for o in ops]))
    return EXIT_OK


async def _enrol_totp(args) -> int:
    async with control_plane(args) as plane:
        actor = await authenticate(plane, args)
        name = args.name or actor.name
        secret, uri = await plane.enrol_totp(actor, name)
        emit(args, {"name": name, "secret": secret, "uri": uri},
             f"TOTP enrolled for {name}.\n  secret: {secret}\n  uri:    {uri}\n"
             "Add it to an authenticator app now; it is not shown again.\n"
             "From now on give --totp CODE to tenantgate commands, and connect with "
             "PGOPTIONS='-c tenantgate.totp=CODE' (each code works once).")
    return EXIT_OK


async def _passwd(args) -> int:
    async with control_plane(args) as plane:
        actor = await authenticate(plane, args)
        name = args.name or actor.name
        password = read_secret(args, f"new password for {name}: ", confirm=True)
        await plane.set_password(actor, name, password)
        emit(args, {"name": name, "password": "changed"}, f"password changed for {name}")
    return EXIT_OK
