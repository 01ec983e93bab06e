"""`tenantgate demo`: embedded PostgreSQL + demo schema + tenantgate (what `make run` starts)."""

from pathlib import Path


def register(sub):
    p = sub.add_parser("demo", help="start an embedded PostgreSQL with a demo SaaS schema behind tenantgate")
    p.add_argument("--state-dir", default=".tenantgate/demo", help="where the cluster, config and dsns.json live")
    p.add_argument("--listen", default="127.0.0.1:6432", help="HOST:PORT tenantgate listens on")
    p.add_argument("--metrics-port", default="auto", type=_metrics_port, metavar="PORT|auto|off",
                   help="serve Prometheus metrics (/metrics, /healthz, /readyz) on 127.0.0.1:PORT; "
                        "auto (default): a free port, the same one as last time when it is free; off: none")
    p.add_argument("--pool-mode", choices=("session", "transaction"), default="transaction",
                   help="how application sessions share PostgreSQL connections (operators always use session)")
    p.add_argument("--regions", metavar="A,B", help="one embedded PostgreSQL per region (wal_level=logical); "
                                                   "acme is placed in the first region, globex in the second")
    p.set_defaults(func=run)


def _metrics_port(value: str) -> str | int:
    import argparse

    if value in ("auto", "off"):
        return value
    if value.isdigit() and 1 <= int(value) <= 65535:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a port number, auto or off, not {value!r}")


def run(args) -> int:
    import asyncio

    from proxy.demo import parse_regions, run_demo
    from proxy.server import install_uvloop

    regions = parse_regions(args.regions)
    install_uvloop()
    return asyncio.run(run_demo(Path(args.state_dir), args.listen, args.metrics_port, pool_mode=args.pool_mode,
                                regions=regions))
