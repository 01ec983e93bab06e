"""What the `tenantgate tenant` CLI tests share: the people, the tenant with a quote in its name, the CLI
as a subprocess, grants, audit records and a signing key (tests/test_lifecycle_cli.py,
tests/test_tenant_registry.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from proxy.control.model import Actor

REPO = Path(__file__).resolve().parents[2]
T = "o'neil"
PASSWORDS = {"alice": "alice-pw-1", "bob": "bob-pw-2", "carol": "carol-pw-3"}


PEOPLE = (("alice", "operator"), ("bob", "approver"), ("carol", "approver"))


async def lifecycle_database(dsn: str, tenants: dict[str, int], people=PEOPLE, passwords=None):
    """A database with the lifecycle schema (support.lifecycle_fixtures), ``tenants`` ({tenant: rows})
    and an installed control plane with ``people`` ((name, role), ...).  Returns (conn, plane, admin)."""
    import asyncpg

    from proxy.control.plane import ControlPlane
    from support.lifecycle_fixtures import SCHEMA_SQL, data_sql

    passwords = passwords or PASSWORDS
    conn = await asyncpg.connect(dsn)
    await conn.execute(SCHEMA_SQL)
    for tenant, n in tenants.items():
        await conn.execute(data_sql(tenant, n))
    plane = ControlPlane(dsn)
    await plane.start(install=True)
    admin = plane.platform_admin()
    for name, role in people:
        await plane.add_operator(admin, name, passwords[name], [role])
    return conn, plane, admin


def lifecycle_config(tmp_path, dsn: str, lifecycle: dict, *, signed: bool = True) -> Path:
    """The config the lifecycle CLI tests run with: demo-style rules, the control schema and the
    data in ``dsn``, ``lifecycle`` settings (``data_dsn`` is ``dsn``), an audit signing key (``signed``)."""
    import yaml

    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"tenant_column": "tenant_id", "schemas": ["public"]}))
    doc = {"rules_file": "rules.yaml", "control": {"dsn": dsn}, "lifecycle": {"data_dsn": dsn, **lifecycle}}
    if signed:
        doc["audit"] = {"signing_key_file": str(_signing_key(tmp_path))}
    cfg = tmp_path / "tenantgate.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    return cfg


def _signing_key(d):
    from proxy.signing import new_signing_key_pem

    priv, pub = new_signing_key_pem()
    (d / "audit.key").write_bytes(priv)
    (d / "audit.key.pub").write_bytes(pub)
    return d / "audit.key"


def _keys(env) -> dict:
    from proxy.signing import keys_from_files

    return keys_from_files([env["tmp"] / "audit.key.pub"])


def cli(env, *args, who: str | None = None, password: str | None = None):
    argv = [sys.executable, "-m", "proxy.cli", "tenant", args[0], "--config", env["cfg"], *args[1:]]
    stdin = None
    if who:
        argv += ["--as", who, "--password-stdin"]
        stdin = (password if password is not None else PASSWORDS[who]) + "\n"
    p = subprocess.run(argv, input=stdin, capture_output=True, text=True, cwd=REPO, timeout=60)
    return p.returncode, p.stdout, p.stderr


async def grant(plane, who: str, tenant: str, access: str, approver: str = "bob") -> int:
    g = await plane.request_grant(Actor(who, frozenset({"operator"})), tenant, access, "1h", "TICKET-1: lifecycle")
    await plane.approve_grant(Actor(approver, frozenset({"approver"})), g.id)
    return g.id


async def audit_records(conn, type_prefix: str) -> list:
    return await conn.fetch(
        "SELECT * FROM tenantgate_control.audit_log WHERE type LIKE $1 ORDER BY seq", type_prefix + "%")
