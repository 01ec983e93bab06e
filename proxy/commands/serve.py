"""`tenantgate serve --config FILE`: run the proxy in front of an existing PostgreSQL.

SIGHUP re-reads FILE (existing connections stay); SIGTERM/SIGINT drain:
stop accepting, let running transactions finish up to ``timeouts.drain_s``,
then close.

``workers`` (config) or ``--workers N`` (overrides it; 0 = one per CPU) above 1
runs a supervisor with N worker processes sharing the listen address
(:mod:`proxy.workers`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys

from proxy.admin_http import start_metrics_endpoint
from proxy.config import Config, ConfigError, check_rules_file, load_config


async def _serve(config: Config, config_path: str) -> None:
    from proxy.gatekeeper import build_gatekeeper  # the policy engine when rules_file is set
    from proxy.server import ProxyServer, freeze_startup_heap

    gatekeeper = await build_gatekeeper(config)
    server = ProxyServer(config, gatekeeper, config_path=config_path)
    await server.start()
    admin = await start_metrics_endpoint(config, server, gatekeeper)
    freeze_startup_heap()
    server.install_signal_handlers()
    print(f"tenantgate: listening on {server.host}:{server.port} (backend {config.backend.host}:{config.backend.port})",
          flush=True)
    await server.serve_forever()
    if admin is not None:
        await admin.close()
    closer = getattr(gatekeeper, "close", None)
    if closer is not None:
        r = closer()
        if inspect.isawaitable(r):
            await r


def run(args) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        check_rules_file(config, args.config)  # serving needs the rules; CLI commands on the same file do not
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 2
    from proxy.logformat import configure_logging

    configure_logging(config.logging, verbose=args.verbose)
    count = config.workers if args.workers is None else args.workers
    if count < 0:
        print("--workers must be 0 (one per CPU) or more", file=sys.stderr)
        return 2
    from proxy.workers import resolve_worker_count, run_supervisor

    count = resolve_worker_count(count)
    if count > 1:
        return run_supervisor(config, args.config, count, verbose=args.verbose)
    from proxy.server import install_uvloop

    install_uvloop()
    try:
        asyncio.run(_serve(config, args.config))
    except KeyboardInterrupt:
        pass
    except Exception as e:  # one line with the fix, never a traceback (startup_errors.py)
        from proxy.commands.startup_errors import describe

        if args.verbose:
            logging.getLogger("tenantgate").exception("startup failed")
        print(describe(e, config), file=sys.stderr)
        return 1
    return 0


def register(sub):
    p = sub.add_parser("serve", help="run the proxy in front of an existing PostgreSQL")
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="YAML configuration file")
    p.add_argument("--verbose", "-v", action="store_true", help="log connections and reloads")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes sharing the listen address (overrides `workers`; 0 = one per CPU)")
    p.set_defaults(func=run)
