"""`tenantgate doctor`: check that the PostgreSQL behind tenantgate is locked behind the gate.

Exit status: 0 when no check failed (warnings allowed), 1 when any check
failed, 2 on a usage or configuration error.
"""

from __future__ import annotations

import asyncio
import sys

from proxy.config import ConfigError, load_config
from proxy.doctor import diagnose


def register(sub):
    p = sub.add_parser(
        "doctor",
        help="check that PostgreSQL is locked behind tenantgate (roles, RLS, pg_hba, ssl, ...)",
        description="Connects as tenantgate's backend role and reports every posture problem with a fix. "
        "Exits 1 if any check fails.",
    )
    p.add_argument("--backend", metavar="DSN", help="DSN of tenantgate's backend role (e.g. tenantgate_app)")
    p.add_argument("--config", metavar="FILE", help="take the backend DSN from tenantgate's config (backend.*)")
    p.add_argument("--admin-dsn", metavar="[REGION=]DSN", action="append",
                   help="superuser DSN: also check pg_hba.conf rules and password storage (with regions in the "
                        "config: REGION=postgresql://... for that region's server; repeatable)")
    p.add_argument("--tenant-column", default="tenant_id", help="the tenant column (default: tenant_id)")
    p.add_argument("--schema", action="append", dest="schemas", metavar="SCHEMA",
                   help="application schema to check (repeatable; default: public)")
    p.add_argument("--control-schema", default=None, help="control schema name (default: tenantgate_control)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def _dsn_from_config(path: str) -> tuple[str, str, bytes | None]:
    cfg = load_config(path)
    b = cfg.backend
    if not b.database:
        raise ConfigError(f"{path}: backend.database is not set; pass --backend DSN instead")
    return b.url(), cfg.control.schema_, cfg.backstop.resolved_key()


def run(args) -> int:
    if args.backend is None and args.config:  # every region's backend when the config has regions:
        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            print(f"tenantgate doctor: {e}", file=sys.stderr)
            return 2
        if cfg.regions:
            return _run_regions(args, cfg)
    control_schema = args.control_schema
    backend = args.backend
    backstop_key = None
    if backend is None:
        if not args.config:
            print("tenantgate doctor: pass --backend DSN or --config FILE", file=sys.stderr)
            return 2
        try:
            backend, cfg_control, backstop_key = _dsn_from_config(args.config)
        except ConfigError as e:
            print(f"tenantgate doctor: {e}", file=sys.stderr)
            return 2
        control_schema = control_schema or cfg_control
    report = asyncio.run(
        diagnose(
            backend,
            admin_dsn=args.admin_dsn[-1] if args.admin_dsn else None,
            tenant_column=args.tenant_column,
            schemas=args.schemas or ["public"],
            control_schema=control_schema or "tenantgate_control",
            backstop_key=backstop_key,
        )
    )
    print(report.to_json() if args.json else report.to_text())
    return 0 if report.ok else 1


def _run_regions(args, cfg) -> int:
    from proxy.doctor_regions import diagnose_regions, split_admin_dsns

    try:
        for region in cfg.region_names():
            if not cfg.backend_of(region).database:
                raise ConfigError(f"{args.config}: regions.{region}.database is not set")
    except ConfigError as e:
        print(f"tenantgate doctor: {e}", file=sys.stderr)
        return 2
    report = asyncio.run(diagnose_regions(
        cfg, admin_dsns=split_admin_dsns(args.admin_dsn, cfg.region_names()), tenant_column=args.tenant_column,
        schemas=args.schemas or ["public"], control_schema=args.control_schema))
    print(report.to_json() if args.json else report.to_text())
    return 0 if report.ok else 1
