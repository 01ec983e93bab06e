"""`tenantgate export --dsn DSN --out DIR|FILE.tar.zst`: a tenant exports its own rows through tenantgate.

Runs with the tenant's own connection string (its application credential, or a
token user plus ``--token``/``$TENANTGATE_TOKEN``): no operator, no grant, no
config file.  The proxy records the export in its audit chain; the output is
the same format as ``tenantgate tenant export`` (check it with ``tenantgate
tenant verify-export PATH --no-signature``: a self-service manifest is not
signed).  A progress line is drawn on a terminal only.  See docs/lifecycle.md.
Exit status 0 on success, 1 on an error (printed as ``ERROR:  … (SQLSTATE …)``).
"""

from __future__ import annotations

import json
import os
import sys


async def _run(args) -> int:
    from proxy.lifecycle.progress import Progress
    from proxy.lifecycle.self_export import self_export

    dsn = args.dsn or os.environ.get("TENANTGATE_DSN")
    if not dsn:
        print("ERROR:  the tenant's connection string is needed: --dsn DSN or $TENANTGATE_DSN", file=sys.stderr)
        return 2
    token = args.token or os.environ.get("TENANTGATE_TOKEN")
    m = await self_export(dsn, args.out, data_format=args.format, token=token, progress=Progress())
    print(json.dumps({"tenant": m["tenant"], "out": args.out, "total_rows": m["total_rows"],
                      "tables": {t["name"]: t["rows"] for t in m["tables"]},
                      "snapshot_time": m["snapshot_time"]}, indent=2, ensure_ascii=False))
    return 0


def _main(args) -> int:
    from proxy.commands.tenant import _runner  # the same error reporting as the tenant commands

    return _runner(_run)(args)


def register(sub):
    p = sub.add_parser("export", help="export your tenant's rows through tenantgate (self-service)",
                       description=__doc__.splitlines()[0])
    p.add_argument("--dsn", help="the tenant's connection string to tenantgate (default: $TENANTGATE_DSN)")
    p.add_argument("--token", help="tenant token for a token user (default: $TENANTGATE_TOKEN)")
    p.add_argument("--out", required=True, help="a new directory, or a FILE.tar.zst")
    p.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    p.set_defaults(func=_main)
