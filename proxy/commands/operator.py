"""`tenantgate operator add|remove|list|enrol-totp|passwd`: operator and approver accounts.

Accounts live in the control schema.  Managing them (add, remove, someone
else's TOTP or password) needs an approver (``--as NAME``, password, TOTP).

Bootstrap: while no approver account exists, the platform admin who holds
the control DSN (the config's ``control.dsn``) adds the first accounts
without ``--as``; this also installs the control schema if it is missing::

    tenantgate operator add alice --role approver --config tenantgate.yaml
    tenantgate operator add bob --config tenantgate.yaml            # role operator

TOTP enrolment (then every request, approval and connection needs a code)::

    tenantgate operator enrol-totp --as bob --config tenantgate.yaml
    # prints the secret and an otpauth:// URI for an authenticator app
"""

from __future__ import annotations

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
    p = sub.add_parser("operator", help="manage operator and approver accounts",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=_raw())
    ops = p.add_subparsers(dest="operator_command", required=True, metavar="ACTION")

    a = ops.add_parser("add", help="add an account (password from a prompt or --password-stdin)")
    a.add_argument("name")
    a.add_argument("--role", action="append", choices=["operator", "approver"],
                   help="role (repeatable; default: operator)")
    add_config_arg(a)
    add_actor_args(a, required=False)
    a.set_defaults(func=lambda args: run(args, _add))

    r = ops.add_parser("remove", help="remove an account (its pending and active grants are revoked)")
    r.add_argument("name")
    add_config_arg(r)
    add_actor_args(r)
    r.set_defaults(func=lambda args: run(args, _remove))

    ls = ops.add_parser("list", help="list accounts")
    add_config_arg(ls)
    ls.set_defaults(func=lambda args: run(args, _list))

    t = ops.add_parser("enrol-totp", help="enrol (or replace) a TOTP secret; prints it once")
    t.add_argument("name", nargs="?", help="account (default: the --as person)")
    add_config_arg(t)
    add_actor_args(t)
    t.set_defaults(func=lambda args: run(args, _enrol_totp))

    pw = ops.add_parser("passwd", help="set a new password")
    pw.add_argument("name", nargs="?", help="account (default: the --as person)")
    add_config_arg(pw)
    add_actor_args(pw)
    pw.set_defaults(func=lambda args: run(args, _passwd))


def _raw():
    import argparse

    return argparse.RawDescriptionHelpFormatter


async def _add(args) -> int:
    async with control_plane(args, install=True) as plane:
        if args.actor:
            actor = await authenticate(plane, args)
        elif not await plane.has_approver():
            actor = plane.platform_admin()  # bootstrap by the control DSN holder
        else:
            from proxy.control.plane import PermissionDenied

            raise PermissionDenied("approver accounts exist: add accounts --as an approver")
        password = read_secret(args, f"new password for {args.name}: ", confirm=True)
        op = await plane.add_operator(actor, args.name, password, args.role or ["operator"])
        emit(args, op.to_json(), f"added {op.name} ({', '.join(sorted(op.roles))})")
    return EXIT_OK


async def _remove(args) -> int:
    async with control_plane(args) as plane:
        actor = await authenticate(plane, args)
        await plane.remove_operator(actor, args.name)
        emit(args, {"removed": args.name}, f"removed {args.name}")
    return EXIT_OK


async def _list(args) -> int:
    async with control_plane(args) as plane:
        ops = await plane.list_operators()
        emit(args, [o.to_json() for o in ops], lambda: table(
            ["name", "roles", "totp", "enabled", "created"],
            [[o.name, ",".join(sorted(o.roles)), "yes" if o.totp_enrolled else "no",
              "yes" if o.enabled else "no", o.created_at.strftime("%Y-%m-%d %H:%M")] for o in ops]))
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
             "PGOPTIONS='-c tenantgate.totp=CODE'.")
    return EXIT_OK


async def _passwd(args) -> int:
    async with control_plane(args) as plane:
        actor = await authenticate(plane, args)
        name = args.name or actor.name
        password = read_secret(args, f"new password for {name}: ", confirm=True)
        await plane.set_password(actor, name, password)
        emit(args, {"name": name, "password": "changed"}, f"password changed for {name}")
    return EXIT_OK
