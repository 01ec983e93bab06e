"""Issue 20, breaks 4, 5 and 6 through the real CLI against a real control database.

* Break 4: one approver cannot make a second identity: account creation, role
  changes and credential resets are change requests another approver approves;
  nobody sees another person's TOTP secret (enrolment token); an approval by an
  account made at the requester's request (or by the receiver of the
  requester's enrolment token) is refused; every step is audited.
* Break 5: the grant policy is the control schema's, not the requester's config
  file; approve re-checks it.
* Break 6 (CLI side): per-account lockout, the same error for a wrong password
  and a wrong TOTP code, a TOTP code works once, failures audited, an approver
  unlocks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pyotp
import pytest
import yaml

from support.control import control_env

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
async def env(pg, make_db, tmp_path_factory):
    e = await control_env(pg, make_db, "ovtp")
    plane = e.plane()
    await plane.start()
    await plane.register_tenant("acme")  # no data DSN in these configs: only registered tenants take grants
    await plane.close()
    d = tmp_path_factory.mktemp("ovtp")
    key = d / "audit.key"
    assert tg(None, "audit", "keygen", "--out", str(key)).returncode == 0
    cfg = d / "tenantgate.yaml"
    cfg.write_text(yaml.safe_dump({"control": {"dsn": e.dsn}, "audit": {"signing_key_file": str(key)}}))
    # the config a requester could point the CLI at: a 300-day maximum, one approval
    loose = d / "loose.yaml"
    loose.write_text(yaml.safe_dump({"control": {"dsn": e.dsn}, "audit": {"signing_key_file": str(key)},
                                     "grants": {"max_duration": "300d", "approvals_required": 1}}))
    return e, str(cfg), str(loose)


def tg(cfg: str | None, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "proxy", *args] + (["--config", cfg] if cfg else [])
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=60)


def ok(cfg: str, *args: str, stdin: str = "") -> dict:
    r = tg(cfg, *args, "--json", stdin=stdin)
    assert r.returncode == 0, (args, r.stdout, r.stderr)
    return json.loads(r.stdout)


def as_(name: str) -> list[str]:
    return ["--as", name, "--password-stdin"]


async def _sql(env, query: str, *args):
    conn = await asyncpg.connect(env.dsn)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


def _create(cfg: str, name: str, role: str, requester: str, approver: str, password: str) -> str:
    """Request (requester), approve (approver), enrol (the person): returns the person's TOTP secret."""
    req = ok(cfg, "operator", "add", name, "--role", role, *as_(requester), stdin=f"{requester}-pw\n")
    assert req["state"] == "pending"
    done = ok(cfg, "operator", "approve", str(req["id"]), *as_(approver), stdin=f"{approver}-pw\n")
    assert "secret" not in json.dumps(done)  # the approver gets a one-time token, never a TOTP secret
    enrolled = ok(cfg, "operator", "enrol", "--token", done["enrolment_token"], "--password-stdin",
                  stdin=f"{password}\n")
    assert enrolled["name"] == name
    return enrolled["secret"]


def _drop_totp(env, name):  # these CLI tests act without codes unless a test enrols one
    return _sql(env, "UPDATE tenantgate_control.operators SET totp_secret = NULL WHERE name = $1", name)


async def test_one_approver_cannot_make_a_second_identity(env):
    e, cfg, _ = env
    # Bootstrap by the database owner: until two approvers exist.
    for name, role in (("op", "operator"), ("alice", "approver"), ("carol", "approver")):
        r = tg(cfg, "operator", "add", name, "--role", role, "--password-stdin", stdin=f"{name}-pw\n")
        assert r.returncode == 0, r.stderr
    r = tg(cfg, "operator", "add", "bob2", "--role", "approver", "--password-stdin", stdin="x\n")
    assert r.returncode == 1 and "no longer added by the platform admin" in r.stderr

    # alice alone: a request, no account; she cannot approve it herself.
    req = ok(cfg, "operator", "add", "bob2", "--role", "approver", *as_("alice"), stdin="alice-pw\n")
    assert "bob2" not in [o["name"] for o in ok(cfg, "operator", "list")]
    r = tg(cfg, "operator", "approve", str(req["id"]), *as_("alice"), stdin="alice-pw\n")
    assert r.returncode == 1 and "another approver must decide" in r.stderr
    r = tg(cfg, "operator", "approve", str(req["id"]), *as_("op"), stdin="op-pw\n")
    assert r.returncode == 1 and "approver role" in r.stderr
    r = tg(cfg, "operator", "deny", str(req["id"]), *as_("carol"), stdin="carol-pw\n")
    assert r.returncode == 0
    assert "bob2" not in [o["name"] for o in ok(cfg, "operator", "list")]

    # Nobody resets or sees another person's credentials directly.
    r = tg(cfg, "operator", "enrol-totp", "op", *as_("alice"), stdin="alice-pw\n")
    assert r.returncode == 1 and "nobody sets another person's TOTP secret" in r.stderr
    r = tg(cfg, "operator", "passwd", "op", *as_("alice"), stdin="alice-pw\nnew\n")
    assert r.returncode == 1 and "nobody sets another person's password" in r.stderr

    # With a second approver's consent the account exists; the person enrols themselves.
    dave_secret = _create(cfg, "dave", "approver", "alice", "carol", "dave-pw")
    assert pyotp.TOTP(dave_secret).now().isdigit()
    await _drop_totp(e, "dave")

    # dave was made at alice's request: dave may not approve alice's grants (nor change requests).
    g = ok(cfg, "grant", "request", "--tenant", "acme", "--access", "write", "--for", "1h", "--reason", "T-1",
           *as_("alice"), stdin="alice-pw\n")
    r = tg(cfg, "grant", "approve", str(g["id"]), *as_("dave"), stdin="dave-pw\n")
    assert r.returncode == 1 and "account change window" in r.stderr and "another approver" in r.stderr
    # carol received dave's enrolment token: carol may not approve dave's grants.
    g2 = ok(cfg, "grant", "request", "--tenant", "acme", "--access", "read", "--for", "1h", "--reason", "T-2",
            *as_("dave"), stdin="dave-pw\n")
    r = tg(cfg, "grant", "approve", str(g2["id"]), *as_("carol"), stdin="carol-pw\n")
    assert r.returncode == 1 and "account change window" in r.stderr
    # people not entangled decide as usual
    assert ok(cfg, "grant", "approve", str(g["id"]), *as_("carol"), stdin="carol-pw\n")["state"] == "approved"
    assert ok(cfg, "grant", "approve", str(g2["id"]), *as_("alice"), stdin="alice-pw\n")["state"] == "approved"

    # A role change is a request too, and the person concerned cannot approve it.
    req = ok(cfg, "operator", "roles", "op", "--role", "approver", *as_("alice"), stdin="alice-pw\n")
    assert ok(cfg, "operator", "list")[[o["name"] for o in ok(cfg, "operator", "list")].index("op")]["roles"] == [
        "operator"]
    r = tg(cfg, "operator", "approve", str(req["id"]), *as_("dave"), stdin="dave-pw\n")
    assert r.returncode == 1 and "account change window" in r.stderr  # dave was made at alice's request
    ok(cfg, "operator", "deny", str(req["id"]), *as_("carol"), stdin="carol-pw\n")

    # A credential reset: op's password stops working, the approver gets a token, op enrols again.
    req = ok(cfg, "operator", "reset", "op", *as_("alice"), stdin="alice-pw\n")
    done = ok(cfg, "operator", "approve", str(req["id"]), *as_("carol"), stdin="carol-pw\n")
    assert "secret" not in json.dumps(done)
    r = tg(cfg, "grant", "list", "--requester", "op")  # read-only commands need no identity
    assert r.returncode == 0
    r = tg(cfg, "grant", "request", "--tenant", "acme", "--access", "read", "--for", "1h", "--reason", "x",
           *as_("op"), stdin="op-pw\n")
    assert r.returncode == 1 and "authentication failed" in r.stderr  # the old password is gone
    ok(cfg, "operator", "enrol", "--token", done["enrolment_token"], "--password-stdin", stdin="op-pw2\n")

    # Every step is in the audit chain.
    types = [json.loads(x)["type"] for x in tg(cfg, "audit", "export", "--since-seq", "0").stdout.splitlines()]
    for t in ("account.bootstrap", "change.requested", "change.approved", "change.denied", "operator.added",
              "operator.changed", "account.enrolled", "auth.failed"):
        assert t in types, t


async def test_grant_policy_lives_in_the_control_schema(env):
    e, cfg, loose = env
    # The requester's own config says 300d and 1 approval: the control schema's policy (8h) decides.
    r = tg(loose, "grant", "request", "--tenant", "acme", "--access", "write", "--for", "300d", "--reason", "T-9",
           *as_("alice"), stdin="alice-pw\n")
    assert r.returncode == 1 and "exceeds the grant policy's maximum 8h" in r.stderr
    assert ok(cfg, "grant", "policy", "show")["max_duration"] == "8h"
    # Changing it takes two approvers; the platform admin is out once approvers exist.
    r = tg(cfg, "grant", "policy", "set", "--max-duration", "300d")
    assert r.returncode == 1 and "approvers exist" in r.stderr
    g = ok(cfg, "grant", "request", "--tenant", "acme", "--access", "read", "--for", "4h", "--reason", "T-10",
           *as_("alice"), stdin="alice-pw\n")
    req = ok(cfg, "grant", "policy", "set", "--max-duration", "1h", "--approvals-required", "2", *as_("alice"),
             stdin="alice-pw\n")
    assert ok(cfg, "grant", "policy", "show")["max_duration"] == "8h"  # not yet
    r = tg(cfg, "operator", "approve", str(req["id"]), *as_("alice"), stdin="alice-pw\n")
    assert r.returncode == 1
    ok(cfg, "operator", "approve", str(req["id"]), *as_("carol"), stdin="carol-pw\n")
    pol = ok(cfg, "grant", "policy", "show")
    assert (pol["max_duration"], pol["approvals_required"], pol["updated_by"]) == ("1h", 2, "carol")
    # Approval re-checks the policy: the 4h grant asked under the old one is refused now.
    r = tg(cfg, "grant", "approve", str(g["id"]), *as_("carol"), stdin="carol-pw\n")
    assert r.returncode == 1 and "more than the grant policy's maximum 1h" in r.stderr
    # and a grant frozen at 1 approval needs the policy's 2 now
    rows = await _sql(e, "INSERT INTO tenantgate_control.grants (requester, tenant, access, reason, duration_s, "
                         "approvals_required, pending_until) VALUES ('alice', 'acme', 'read', 'old', 600, 1, "
                         "now() + interval '1h') RETURNING id")
    gid = str(rows[0]["id"])
    after = ok(cfg, "grant", "approve", gid, *as_("carol"), stdin="carol-pw\n")
    assert (after["state"], after["approvals_required"]) == ("pending", 2)
    # restore the policy for the other tests
    req = ok(cfg, "grant", "policy", "set", "--max-duration", "8h", "--approvals-required", "1", *as_("carol"),
             stdin="carol-pw\n")
    ok(cfg, "operator", "approve", str(req["id"]), *as_("alice"), stdin="alice-pw\n")
    audit = [json.loads(x) for x in tg(cfg, "audit", "export", "--since-seq", "0").stdout.splitlines()]
    assert [a["detail"]["changes"] for a in audit if a["type"] == "grant_policy.changed"][-2]["max_duration_s"] == 3600


def _same_error(stderr: str) -> str:
    return stderr.strip()


async def test_lockout_same_error_and_totp_used_once(env):
    e, cfg, _ = env
    secret = _create(cfg, "tess", "operator", "alice", "carol", "tess-pw")
    totp = pyotp.TOTP(secret)
    t = time.time()
    if t % 30 > 20:
        time.sleep(30 - t % 30 + 0.2)
    now = time.time()
    req = ["grant", "request", "--tenant", "acme", "--access", "read", "--for", "1h", "--reason", "T-L"]
    # A wrong password and a wrong TOTP code: the same error.
    wrong_pw = tg(cfg, *req, *as_("tess"), "--totp", totp.at(now), stdin="nope\n")
    wrong_code = tg(cfg, *req, *as_("tess"), "--totp", "000000" if totp.at(now) != "000000" else "111111",
                    stdin="tess-pw\n")
    assert wrong_pw.returncode == wrong_code.returncode == 1
    assert _same_error(wrong_pw.stderr) == _same_error(wrong_code.stderr)
    # The right code works once.
    assert tg(cfg, *req, *as_("tess"), "--totp", totp.at(now), stdin="tess-pw\n").returncode == 0
    again = tg(cfg, *req, *as_("tess"), "--totp", totp.at(now), stdin="tess-pw\n")
    assert again.returncode == 1 and _same_error(again.stderr) == _same_error(wrong_pw.stderr)
    # Guessing codes: after max_failures_account (5) failures the account is locked, right code or not.
    for i in range(4):
        tg(cfg, *req, *as_("tess"), "--totp", f"{(int(totp.at(now)) + 1 + i) % 1_000_000:06d}", stdin="tess-pw\n")
    locked = tg(cfg, *req, *as_("tess"), "--totp", totp.at(now + 30), stdin="tess-pw\n")
    assert locked.returncode == 1 and "is locked until" in locked.stderr and "operator unlock" in locked.stderr
    rows = await _sql(e, "SELECT detail FROM tenantgate_control.audit_log WHERE type = 'auth.failed' "
                         "AND operator = 'tess' ORDER BY seq")
    whys = [json.loads(r["detail"])["why"] for r in rows]
    assert whys.count("password") == 1 and whys.count("totp") >= 5 and whys[-1] == "locked"
    # An operator may not unlock; an approver may.
    assert tg(cfg, "operator", "unlock", "tess", *as_("op"), stdin="op-pw2\n").returncode == 1
    assert ok(cfg, "operator", "unlock", "tess", *as_("alice"), stdin="alice-pw\n")["was_locked"] is True
    assert tg(cfg, *req, *as_("tess"), "--totp", totp.at(now + 30), stdin="tess-pw\n").returncode == 0
