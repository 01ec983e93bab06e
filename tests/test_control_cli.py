"""`tenantgate operator|grant|audit` as a person would run them (subprocess, real control database)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import asyncpg
import pyotp
import pytest
import yaml

from support.control import control_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
async def cli_env(pg, make_db, tmp_path_factory):
    env = await control_env(pg, make_db, "ctlcli")
    plane = env.plane()
    await plane.start()
    await plane.register_tenant("acme")  # no data DSN in this config: only registered tenants take grants
    await plane.close()
    d = tmp_path_factory.mktemp("ctlcli")
    key = d / "audit.key"
    assert tg(None, "audit", "keygen", "--out", str(key)).returncode == 0
    cfg = d / "tenantgate.yaml"
    cfg.write_text(yaml.safe_dump({"control": {"dsn": env.dsn},
                                   "audit": {"signing_key_file": str(key), "checkpoint_every": 10}}))
    return env, str(cfg)


def tg(cfg: str | None, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "proxy", *args] + (["--config", cfg] if cfg else [])
    return subprocess.run(cmd, input=stdin or "", capture_output=True, text=True, cwd=ROOT, timeout=60)


def as_(name: str, *extra: str) -> list[str]:
    return ["--as", name, "--password-stdin", *extra]


async def test_bootstrap_grant_flow_and_audit(cli_env):
    env, cfg = cli_env
    # Bootstrap: fewer than two approvers, so the control DSN holder adds the first ones without --as.
    r = tg(cfg, "operator", "add", "alice", "--role", "approver", "--password-stdin", stdin="alice-pw\n")
    assert r.returncode == 0, r.stderr
    r = tg(cfg, "operator", "add", "carol", "--role", "approver", "--password-stdin", stdin="carol-pw\n")
    assert r.returncode == 0, r.stderr
    r = tg(cfg, "operator", "add", "bob", "--password-stdin", stdin="bob-pw\n")
    assert r.returncode == 1 and "no longer added by the platform admin" in r.stderr
    # Then: one approver requests the account, another approves it, the person enrols.
    r = tg(cfg, "operator", "add", "bob", "--json", *as_("alice"), stdin="alice-pw\n")
    assert r.returncode == 0, r.stderr
    req = str(json.loads(r.stdout)["id"])
    r = tg(cfg, "operator", "approve", req, *as_("alice"), stdin="alice-pw\n")
    assert r.returncode == 1 and "another approver" in r.stderr
    r = tg(cfg, "operator", "approve", req, "--json", *as_("carol"), stdin="carol-pw\n")
    assert r.returncode == 0, r.stderr
    token = json.loads(r.stdout)["enrolment_token"]
    r = tg(cfg, "operator", "enrol", "--token", token, "--password-stdin", "--json", stdin="bob-pw\n")
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == "bob", r.stderr
    r = tg(cfg, "operator", "enrol", "--token", token, "--password-stdin", stdin="bob-pw2\n")
    assert r.returncode == 1 and "not valid" in r.stderr  # one time only
    conn = await asyncpg.connect(env.dsn)  # this test drives bob without TOTP until it enrols one below
    try:
        await conn.execute("UPDATE tenantgate_control.operators SET totp_secret = NULL WHERE name = 'bob'")
    finally:
        await conn.close()
    r = tg(cfg, "operator", "list", "--json")
    assert [o["name"] for o in json.loads(r.stdout)] == ["alice", "bob", "carol"]

    # Identity must be proven.
    r = tg(cfg, "grant", "request", "--tenant", "acme", "--access", "read", "--for", "1h", "--reason", "T-1",
           *as_("bob"), stdin="wrong\n")
    assert r.returncode == 1 and "authentication failed" in r.stderr
    r = tg(cfg, "grant", "request", "--tenant", "acme", "--access", "read", "--for", "1h", "--reason", "T-1", "--as", "bob")
    assert r.returncode == 2 and "--password-stdin" in r.stderr  # no terminal, no silent fallback
    r = tg(cfg, "grant", "request", "--tenant", "acme", "--access", "read", "--for", "12h", "--reason", "T-1",
           *as_("bob"), stdin="bob-pw\n")
    assert r.returncode == 1 and "maximum" in r.stderr

    r = tg(cfg, "grant", "request", "--tenant", "acme", "--access", "read", "--for", "1h",
           "--reason", "TICKET-123: invoices", "--json", *as_("bob"), stdin="bob-pw\n")
    assert r.returncode == 0, r.stderr
    gid = str(json.loads(r.stdout)["id"])
    r = tg(cfg, "grant", "approve", gid, *as_("bob"), stdin="bob-pw\n")
    assert r.returncode == 1 and "self-approval" in r.stderr
    r = tg(cfg, "grant", "approve", gid, "--comment", "ok", *as_("alice"), stdin="alice-pw\n")
    assert r.returncode == 0 and "approved" in r.stdout, r.stderr
    r = tg(cfg, "grant", "list")
    assert r.returncode == 0 and "approved" in r.stdout and "TICKET-123" in r.stdout
    r = tg(cfg, "grant", "show", gid, "--json")
    assert json.loads(r.stdout)["approvals"][0]["approver"] == "alice"
    r = tg(cfg, "grant", "revoke", gid, "--reason", "done", *as_("carol"), stdin="carol-pw\n")
    assert r.returncode == 0 and "revoked" in r.stdout
    r = tg(cfg, "grant", "show", "99999")
    assert r.returncode == 1 and "does not exist" in r.stderr

    # TOTP enrolment, then a code is required.
    r = tg(cfg, "operator", "enrol-totp", "--json", *as_("bob"), stdin="bob-pw\n")
    assert r.returncode == 0, r.stderr
    secret = json.loads(r.stdout)["secret"]
    r = tg(cfg, "grant", "request", "--tenant", "acme", "--access", "write", "--for", "30m", "--reason", "T-2",
           *as_("bob"), stdin="bob-pw\n")
    assert r.returncode == 1 and "--totp" in r.stderr and "wrong password or TOTP code" in r.stderr
    r = tg(cfg, "grant", "request", "--tenant", "acme", "--access", "write", "--for", "30m", "--reason", "T-2",
           *as_("bob", "--totp", pyotp.TOTP(secret).now()), stdin="bob-pw\n")
    assert r.returncode == 0, r.stderr

    # Audit: verify passes, export gives the lifecycle, checkpoint signs.
    r = tg(cfg, "audit", "checkpoint")
    assert r.returncode == 0 and "signed checkpoint" in r.stdout
    r = tg(cfg, "audit", "verify")
    assert r.returncode == 0 and "audit chain OK" in r.stdout and "signatures checked" in r.stdout, r.stdout
    r = tg(cfg, "audit", "export", "--since", "2000-01-01T00:00Z")
    types = [json.loads(x)["type"] for x in r.stdout.splitlines()]
    assert "grant.requested" in types and "grant.approved" in types and "grant.revoked" in types
    assert "auth.failed" in types and "operator.added" in types

    # Tamper with one row: verify fails, exits 1 and names it.
    conn = await asyncpg.connect(env.admin_dsn)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute("UPDATE tenantgate_control.audit_log SET operator = 'mallory' WHERE seq = 3")
    finally:
        await conn.close()
    r = tg(cfg, "audit", "verify")
    assert r.returncode == 1 and "record 3 was modified" in r.stdout
    r = tg(cfg, "audit", "verify", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["problems"][0] == {
        "kind": "modified", "seq": 3, "message": "record 3 was modified: its contents do not match its hash"}


def test_usage_errors():
    assert tg(None, "grant", "request").returncode == 2
    r = tg(None, "audit", "verify")
    assert r.returncode == 2 and "--config" in r.stderr
