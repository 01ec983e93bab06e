"""`tenantgate notices send | list`: retention notices to tenants' webhooks (docs/lifecycle.md).

``send`` is what the platform schedules (deploy/systemd/tenantgate-notices.timer,
hourly): it schedules the notices of every offboarded tenant that lacks them,
then sends each due notice once, signed, retried with backoff, each try
recorded in the audit chain (:mod:`proxy.control.notices`).  It runs as the
platform's service identity (the holder of the config's control DSN and the
webhook secret).  Exit status 0 when every due notice was delivered (or there
was none), 1 when one is still undelivered (it is tried again by the next run),
2 for a bad config.

``list`` shows the scheduled notices and their delivery state.
"""

from __future__ import annotations

import json
import os


async def _send(args) -> int:
    from proxy.commands.tenant import _context
    from proxy.control.notices import send_due

    async with _context(args) as ctx:
        ncfg = ctx.cfg.lifecycle.notices
        secret = ncfg.resolved_secret()
        if not secret:
            from proxy.config import ConfigError

            raise ConfigError("lifecycle.notices.webhook_secret (or webhook_secret_env / webhook_secret_file) is not "
                              "set: retention notices are only sent signed")
        results = await send_due(ctx.plane, ncfg, secret=secret)
    for r in results:
        print(json.dumps(r, ensure_ascii=False, default=str))
    return 1 if any(r["status"] not in ("delivered", "cancelled") for r in results) else 0


async def _list(args) -> int:
    from proxy.commands.tenant import _context
    from proxy.control.notices import list_notices

    async with _context(args) as ctx:
        rows = await list_notices(ctx.plane, args.tenant)
    docs = [{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()} for r in rows]
    if args.json:
        print(json.dumps(docs, indent=2, ensure_ascii=False))
        return 0
    print(f"{'tenant':<24} {'kind':<16} {'due_at':<26} {'state':<10} attempts  last_error")
    for d in docs:
        print(f"{d['tenant']:<24} {d['kind']:<16} {d['due_at'][:25]:<26} {d['state']:<10} {d['attempts']:>8}  "
              f"{d['last_error'] or '-'}")
    return 0


def register(sub):
    from proxy.commands.tenant import _runner

    p = sub.add_parser("notices", help="retention notices to tenants' webhooks: send, list",
                       description=__doc__.splitlines()[0])
    nsub = p.add_subparsers(dest="notices_command", required=True, metavar="ACTION")
    for name, fn, help_ in (("send", _send, "send every due retention notice once (service identity)"),
                            ("list", _list, "scheduled notices and their delivery state")):
        sp = nsub.add_parser(name, help=help_)
        sp.add_argument("--config", default=os.environ.get("TENANTGATE_CONFIG", "tenantgate.yaml"),
                        help="config file (default: $TENANTGATE_CONFIG or tenantgate.yaml)")
        if name == "list":
            sp.add_argument("--tenant")
            sp.add_argument("--json", action="store_true")
        sp.set_defaults(func=_runner(fn))
