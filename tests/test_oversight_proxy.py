"""Issue 20 at the proxy, against the running demo (real psql-protocol clients, real CLI).

* Break 13: ``tenantgate.grant`` values PostgreSQL's bigint cannot hold (or that are
  not plain ASCII digits) are refused with a clear FATAL 28000, never "internal error".
* Break 6: wrong passwords at the proxy are audited, lock the account after
  ``max_failures_account`` attempts (even with the right password next), and an
  approver unlocks it.
* Break 3: an operator session with a write grant follows its tenant's status: after
  ``tenant offboard`` the next write is refused (the session is ended); ``tenant purge``
  ends every session of the tenant before it deletes, and nothing is left after the
  receipt.
* Over-refusal wording: a statement refused by the policy in an operator session names
  the operator session and grant, not "a tenant session".
"""

from __future__ import annotations

import json
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote, urlsplit

import psycopg
import pyotp
import pytest
import yaml

from support.e2e import RawClient, RawServerError, admin_execute, errors

TABLES = ("order_items", "orders", "customers")


def cli(demo, who: str | None, *args: str, config=None, extra: str = ""):
    argv = [*args, "--config", str(config or demo.config_path)]
    password = None
    if who is not None:
        argv += ["--as", who, "--password-stdin"]
        password = demo.password(f"operator:{who}") + "\n" + extra
    elif extra:
        password = extra
    return demo.cli(*argv, password=password)


def ok(result) -> str:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    return result.stdout


def operator_dsn(demo, name: str, password: str) -> str:
    u = urlsplit(demo.operator("alice"))
    return f"postgresql://{quote(name, safe='')}:{quote(password, safe='')}@{u.hostname}:{u.port}/app?sslmode=disable"


def audit_rows(demo, type_: str, operator: str) -> list[dict]:
    with psycopg.connect(demo.admin, autocommit=True) as conn:
        rows = conn.execute("SELECT client_addr, detail FROM tenantgate_control.audit_log WHERE type = %s "
                            "AND operator = %s ORDER BY seq", [type_, operator]).fetchall()
    return [{"client_addr": a, "detail": json.loads(d) if d else None} for a, d in rows]


def fatal_of(dsn: str, options: dict | None = None) -> RawServerError:
    with pytest.raises(RawServerError) as ei:
        RawClient(dsn, options=options).close()
    return ei.value


def grant_for(demo, tenant: str, access: str, who: str = "alice") -> int:
    gid = json.loads(ok(cli(demo, who, "grant", "request", "--tenant", tenant, "--access", access, "--for", "15m",
                            "--reason", "OVERSIGHT-E2E", "--json")))["id"]
    ok(cli(demo, "bob", "grant", "approve", str(gid)))
    return gid


def test_grant_option_that_postgres_cannot_hold_is_a_clear_28000(demo):
    dsn = demo.operator("alice")
    for raw in ("99999999999999999999", "9223372036854775808", "\u0667", "1_0", "-3", "0x10"):
        e = fatal_of(dsn, {"options": f"-c tenantgate.grant={raw}"})
        assert (e.severity, e.sqlstate) == ("FATAL", "28000"), (raw, e)
        assert "tenantgate.grant" in e.message and "grant number" in e.message and "internal" not in e.message


def test_wrong_passwords_at_the_proxy_are_audited_and_lock_the_account(demo):
    name, password = f"lock_{secrets.token_hex(3)}", secrets.token_urlsafe(12)
    req = json.loads(ok(cli(demo, "bob", "operator", "add", name, "--json")))
    token = json.loads(ok(cli(demo, "carol", "operator", "approve", str(req["id"]), "--json")))["enrolment_token"]
    totp = pyotp.TOTP(json.loads(ok(cli(demo, None, "operator", "enrol", "--token", token, "--password-stdin",
                                        "--json", extra=password + "\n")))["secret"])
    try:
        wrong = operator_dsn(demo, name, "not-the-password")
        for _ in range(5):
            e = fatal_of(wrong)
            assert (e.sqlstate, e.message) == ("28P01", f'password authentication failed for user "{name}"')
        # the right password (and a right code) no longer get in: locked
        e = fatal_of(operator_dsn(demo, name, password), {"options": f"-c tenantgate.totp={totp.now()}"})
        assert e.sqlstate == "28000" and "locked until" in e.message and "operator unlock" in e.message
        failed = audit_rows(demo, "auth.failed", name)
        assert [f["detail"]["why"] for f in failed] == ["password"] * 5 + ["locked"]
        assert all(f["detail"]["via"] == "proxy" and f["client_addr"].startswith("127.0.0.1:") for f in failed)
        # an approver unlocks; then the password and a fresh code work (no grant yet: 28000 naming that)
        ok(cli(demo, "bob", "operator", "unlock", name))
        e = fatal_of(operator_dsn(demo, name, password), {"options": f"-c tenantgate.totp={totp.now()}"})
        assert e.sqlstate == "28000" and "no active grant" in e.message
        # Guessing TOTP codes in parallel with the right password: attempts are counted before
        # they are checked, so at most max_failures_account (5) of 30 concurrent guesses get a
        # verdict on the code; the rest are refused as locked, and so is the right code after.
        right = operator_dsn(demo, name, password)
        bad = [f"{(int(totp.now()) + 1000 * (i + 1)) % 1_000_000:06d}" for i in range(30)]
        bad = [c for c in bad if not totp.verify(c, valid_window=1)]
        with ThreadPoolExecutor(max_workers=30) as pool:
            got = list(pool.map(lambda c: fatal_of(right, {"options": f"-c tenantgate.totp={c}"}), bad))
        assert {(e.sqlstate, "locked" in e.message) for e in got} <= {("28P01", False), ("28000", True)}
        assert sum(e.sqlstate == "28P01" for e in got) <= 5
        assert all(e.message == f'password authentication failed for user "{name}"' for e in got
                   if e.sqlstate == "28P01")  # the same words as a wrong password
        e = fatal_of(right, {"options": f"-c tenantgate.totp={totp.now()}"})
        assert e.sqlstate == "28000" and "locked until" in e.message
        whys = [f["detail"]["why"] for f in audit_rows(demo, "auth.failed", name)]
        assert 1 <= whys.count("totp") <= 5 and whys.count("locked") >= len(bad) - 5
        ok(cli(demo, "bob", "operator", "unlock", name))
    finally:
        cli(demo, "bob", "operator", "unlock", "--address", "127.0.0.1")
        ok(cli(demo, "bob", "operator", "remove", name))


@pytest.fixture(scope="module")
def purge_config(demo, tmp_path_factory):
    cfg = yaml.safe_load(demo.config_path.read_text())
    cfg["lifecycle"] = {"data_dsn": demo.admin}
    path = tmp_path_factory.mktemp("oversight") / "tenantgate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


def _count(demo, tenant: str) -> int:
    with psycopg.connect(demo.admin, autocommit=True) as conn:
        return sum(conn.execute(f"SELECT count(*) FROM {t} WHERE tenant_id = %s", [tenant]).fetchone()[0]
                   for t in TABLES)


def test_operator_write_session_follows_offboard_and_purge(demo, purge_config):
    tenant = f"ov_{secrets.token_hex(3)}"
    admin_execute(demo, "INSERT INTO customers (tenant_id, customer_id, name) VALUES (%s, 1, 'one')", [tenant])
    gid = None
    try:
        ok(cli(demo, "bob", "tenant", "register", tenant))
        gid = grant_for(demo, tenant, "write")
        opts = {"options": f"-c tenantgate.grant={gid}"}
        s = RawClient(demo.operator("alice"), options=opts)
        assert not errors(s.query("INSERT INTO customers (customer_id, name) VALUES (2, 'two')"))
        # Over-refusal wording: the policy's refusal names the operator session, not a tenant session.
        msgs = errors(s.query("ANALYZE customers"))
        assert msgs and "tenant session" not in msgs[0].message and f"grant {gid}" in msgs[0].message, msgs
        ok(cli(demo, "bob", "tenant", "offboard", tenant))
        # the very next write: refused, nothing written (the session is ended)
        try:
            msgs = errors(s.query("INSERT INTO customers (customer_id, name) VALUES (3, 'three')"))
            assert msgs and msgs[0].sqlstate in ("57P01", "25006"), msgs
        except (RawServerError, ConnectionError) as e:
            assert getattr(e, "sqlstate", "57P01") == "57P01"
        s.close()
        assert _count(demo, tenant) == 2
        # a new session is read-only now
        s = RawClient(demo.operator("alice"), options=opts)
        msgs = errors(s.query("INSERT INTO customers (customer_id, name) VALUES (4, 'four')"))
        assert msgs and msgs[0].sqlstate == "25006", msgs
        # purge: the live session is ended before anything is deleted; nothing is left after the receipt
        receipt = json.loads(ok(cli(demo, "alice", "tenant", "purge", tenant, "--now", "--confirm", tenant,
                                    "--grant", str(gid), config=purge_config)))
        with pytest.raises((RawServerError, ConnectionError)):
            for _ in range(3):
                msgs = s.query("SELECT 1")
                if errors(msgs):
                    raise RawServerError("ERROR", errors(msgs)[0].sqlstate, errors(msgs)[0].message)
                time.sleep(0.2)
        s.close()
        assert receipt["verified_remaining_rows"] == 0 and receipt["total_rows"] == 2
        assert _count(demo, tenant) == 0
        with psycopg.connect(demo.admin, autocommit=True) as conn:
            ended = conn.execute("SELECT count(*) FROM tenantgate_control.audit_log WHERE type = 'session.ended' "
                                 "AND tenant = %s", [tenant]).fetchone()[0]
        assert ended >= 2
    finally:
        for t in TABLES:
            admin_execute(demo, f"DELETE FROM {t} WHERE tenant_id = %s", [tenant])
        if gid is not None:
            cli(demo, "alice", "grant", "revoke", str(gid))
