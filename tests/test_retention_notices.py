"""Retention notices (issue 18) end to end: real PostgreSQL, the real control plane, the CLI as a
subprocess, and a local HTTP server (http.server in a thread) as the tenant's webhook.

* ``tenant contact`` is approver-only and audited;
* ``tenant offboard`` schedules the notices (at offboarding, 30, 7 and 1 day before the purge);
  ``notices send`` delivers the due ones once, as signed JSON (HMAC-SHA256 over the body);
* a 500 is retried (same notice id, valid signature each time) until it is delivered;
* ``tenant purge-expired`` refuses a tenant whose final notice was not delivered (its rows stay),
  purges it once an approver forces it (audited), and purges a tenant whose final notice was delivered.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from support.lifecycle_fixtures import tenant_rows
from support.lifecycle_cli import PEOPLE, lifecycle_config, lifecycle_database
from proxy.lifecycle.webhook import NOTICE_ID_HEADER, SIGNATURE_HEADER, verify_signature

REPO = Path(__file__).resolve().parent.parent
PASSWORDS = {"alice": "alice-pw-1", "bob": "bob-pw-2"}
SECRET = "notice-secret-for-tests"


class Hook:
    """A webhook receiver: records every POST; answers with the queued statuses, then 200."""

    def __init__(self):
        self.received: list[dict] = []
        self.statuses: dict[str, list[int]] = {}  # path -> statuses to answer first
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.received.append({"path": self.path, "headers": dict(self.headers), "body": body})
                queue = hook.statuses.get(self.path) or []
                status = queue.pop(0) if queue else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def bodies(self, path: str) -> list[dict]:
        return [json.loads(r["body"]) for r in self.received if r["path"] == path]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook():
    h = Hook()
    yield h
    h.close()


@pytest.fixture
async def env(make_db, tmp_path):
    _, dsn = make_db("notices")
    conn, plane, admin = await lifecycle_database(dsn, {"acme": 6, "globex": 5}, PEOPLE[:2], PASSWORDS)
    for t in ("acme", "globex"):
        await plane.register_tenant(t)
    cfg = lifecycle_config(tmp_path, dsn, {"retention_days": 90, "service_name": "retention-bot",
                       "notices": {"webhook_secret": SECRET, "attempts_per_run": 3, "backoff_initial_s": 0,
                                   "timeout_s": 5}}, signed=False)
    yield {"dsn": dsn, "conn": conn, "plane": plane, "cfg": str(cfg)}
    await plane.close()
    await conn.close()


def cli(env, *args, who: str | None = None):
    argv = [sys.executable, "-m", "proxy.cli", *args, "--config", env["cfg"]]
    stdin = None
    if who:
        argv += ["--as", who, "--password-stdin"]
        stdin = PASSWORDS[who] + "\n"
    p = subprocess.run(argv, input=stdin, capture_output=True, text=True, cwd=REPO, timeout=120)
    return p.returncode, p.stdout, p.stderr


async def audit(conn, type_: str) -> list[dict]:
    rows = await conn.fetch("SELECT * FROM tenantgate_control.audit_log WHERE type = $1 ORDER BY seq", type_)
    return [dict(r, detail=json.loads(r["detail"]) if r["detail"] else None) for r in rows]


async def notices(conn, tenant: str) -> dict[str, dict]:
    rows = await conn.fetch("SELECT * FROM tenantgate_control.retention_notices WHERE tenant = $1 AND state <> "
                            "'cancelled'", tenant)
    return {r["kind"]: dict(r) for r in rows}


def check_signed(request) -> dict:
    assert verify_signature(request["body"], SECRET, request["headers"].get(SIGNATURE_HEADER)), request["headers"]
    assert not verify_signature(request["body"] + b" ", SECRET, request["headers"].get(SIGNATURE_HEADER))
    assert request["headers"]["Content-Type"] == "application/json"
    return json.loads(request["body"])


async def test_contact_is_set_by_an_approver_and_audited(env, hook):
    rc, _, err = cli(env, "tenant", "contact", "acme", "--webhook", hook.url("/acme"), who="alice")
    assert rc == 1 and "42501" in err
    rc, _, err = cli(env, "tenant", "contact", "acme", "--webhook", "file:///etc/passwd", who="bob")
    assert rc == 1 and "22023" in err
    rc, out, err = cli(env, "tenant", "contact", "acme", "--webhook", hook.url("/acme"), who="bob")
    assert rc == 0, err
    rc, out, _ = cli(env, "tenant", "contact", "acme")
    assert json.loads(out)["webhook"] == hook.url("/acme")
    rec = (await audit(env["conn"], "tenant.contact"))[-1]
    assert rec["operator"] == "bob" and rec["tenant"] == "acme" and rec["detail"]["webhook_url"] == hook.url("/acme")


async def test_offboarding_schedules_notices_and_due_ones_are_sent_once_signed(env, hook):
    conn = env["conn"]
    assert cli(env, "tenant", "contact", "acme", "--webhook", hook.url("/acme"), who="bob")[0] == 0
    rc, out, err = cli(env, "tenant", "offboard", "acme", who="bob")
    assert rc == 0, err
    kinds = [n["kind"] for n in json.loads(out)["notices"]]
    assert kinds == ["offboarded", "days_before:30", "days_before:7", "days_before:1"]
    scheduled = await notices(conn, "acme")
    assert scheduled["days_before:1"]["final"] and not scheduled["offboarded"]["final"]
    end = scheduled["days_before:1"]["retention_end"]
    assert scheduled["days_before:30"]["due_at"] == end - timedelta(days=30)

    rc, out, err = cli(env, "notices", "send")
    assert rc == 0, err
    assert [json.loads(line)["status"] for line in out.splitlines()] == ["delivered"]
    assert len(hook.received) == 1
    body = check_signed(hook.received[0])
    assert body["tenant"] == "acme" and body["kind"] == "offboarded" and body["final"] is False
    assert body["retention_end"] == end.isoformat() and body["type"] == "tenantgate.retention_notice"
    assert hook.received[0]["headers"][NOTICE_ID_HEADER] == body["notice_id"]
    # sent once: the next run finds nothing due
    rc, out, err = cli(env, "notices", "send")
    assert rc == 0 and out.strip() == "" and len(hook.received) == 1
    assert (await notices(conn, "acme"))["offboarded"]["state"] == "delivered"
    assert (await notices(conn, "acme"))["days_before:30"]["state"] == "pending"
    recs = await audit(conn, "tenant.notice")
    assert [(r["tenant"], r["detail"]["kind"], r["detail"]["status"]) for r in recs] == [
        ("acme", "offboarded", "delivered")]


async def test_500_is_retried_and_purge_waits_for_the_final_notice(env, hook):
    conn, plane = env["conn"], env["plane"]
    past = datetime.now(timezone.utc) - timedelta(seconds=1)
    assert cli(env, "tenant", "contact", "acme", "--webhook", hook.url("/acme"), who="bob")[0] == 0
    assert cli(env, "tenant", "contact", "globex", "--webhook", hook.url("/globex"), who="bob")[0] == 0
    # both retention periods have ended (offboarded through the plane: `notices send` schedules them)
    for t in ("acme", "globex"):
        await plane.set_tenant_status(t, "offboarded", retention_end=past)
    hook.statuses["/acme"] = [500]  # acme's receiver fails once, then accepts
    hook.statuses["/globex"] = [500] * 100  # globex's receiver is down
    before_globex = await tenant_rows(conn, "globex")

    rc, out, err = cli(env, "notices", "send")
    assert rc == 1, (out, err)  # globex's notices are still undelivered
    results = {(r["tenant"], r["kind"]): r for r in map(json.loads, out.splitlines())}
    assert results[("acme", "days_before:1")]["status"] == "delivered"
    assert results[("acme", "days_before:1")]["attempts"] == 2 and results[("acme", "days_before:1")]["final"]
    assert results[("globex", "days_before:1")]["status"] == "retrying"
    assert results[("globex", "days_before:1")]["attempts"] == 3  # attempts_per_run
    acme_final = [r for r in hook.received if r["path"] == "/acme" and json.loads(r["body"])["final"]]
    assert len(acme_final) == 2  # the 500, then the delivery: same notice, signed each time
    assert len({r["headers"][NOTICE_ID_HEADER] for r in acme_final}) == 1
    assert all(check_signed(r)["kind"] == "days_before:1" for r in acme_final)
    globex = await notices(conn, "globex")
    assert globex["days_before:1"]["state"] == "pending" and globex["days_before:1"]["attempts"] == 3
    statuses = {(r["tenant"], r["detail"]["kind"]): r["detail"]["status"] for r in await audit(conn, "tenant.notice")}
    assert statuses[("globex", "days_before:1")] == "retrying" and statuses[("acme", "days_before:1")] == "delivered"

    # purge-expired: acme (final notice delivered) is purged, globex is refused and untouched
    rc, out, err = cli(env, "tenant", "purge-expired")
    assert rc == 1
    assert [json.loads(line)["tenant"] for line in out.splitlines()] == ["acme"]
    assert 'tenant "globex" is not purged' in err and "55000" in err and "force-undelivered" in err
    assert (await plane.get_tenant("globex")).status == "offboarded"
    assert await tenant_rows(conn, "globex") == before_globex
    assert all(v == [] for v in (await tenant_rows(conn, "acme")).values())
    refused = [r for r in await audit(conn, "tenant.refused") if r["tenant"] == "globex"]
    assert refused and refused[-1]["detail"]["action"] == "purge-expired"

    # forcing needs an authenticated approver
    rc, _, err = cli(env, "tenant", "purge-expired", "--force-undelivered", "globex")
    assert rc == 1 and "--as" in err
    rc, _, err = cli(env, "tenant", "purge-expired", "--force-undelivered", "globex", who="alice")
    assert rc == 1 and "42501" in err
    assert await tenant_rows(conn, "globex") == before_globex
    rc, out, err = cli(env, "tenant", "purge-expired", "--force-undelivered", "globex", who="bob")
    assert rc == 0, err
    assert [json.loads(line)["tenant"] for line in out.splitlines()] == ["globex"]
    assert all(v == [] for v in (await tenant_rows(conn, "globex")).values())
    forced = (await audit(conn, "tenant.purge.forced_undelivered"))[-1]
    assert forced["operator"] == "bob" and forced["tenant"] == "globex"
    assert "pending after 3 attempt" in forced["detail"]["reason"]
    # the purged tenant's pending notices are cancelled, not sent
    rc, out, _ = cli(env, "notices", "send")
    assert {json.loads(line)["status"] for line in out.splitlines()} <= {"cancelled"}
    report = await plane.verify()
    assert report.ok, report.to_json()


def test_schedule_keeps_a_final_notice_when_the_retention_is_short():
    from proxy.config import NoticesConfig
    from proxy.control.notices import schedule_for

    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    plan = schedule_for(t0, t0 + timedelta(days=10), NoticesConfig())
    assert [(n.kind, n.due_at - t0, n.final) for n in plan] == [
        ("offboarded", timedelta(0), False), ("days_before:7", timedelta(days=3), False),
        ("days_before:1", timedelta(days=9), True)]
    plan = schedule_for(t0, t0, NoticesConfig(at_offboarding=False))
    assert [(n.kind, n.due_at, n.final) for n in plan] == [("days_before:1", t0, True)]


def test_unsigned_notices_are_never_sent():
    from proxy.lifecycle.webhook import deliver

    with pytest.raises(ValueError):
        deliver("http://127.0.0.1:9/", {"x": 1}, "", notice_id="x")


def test_systemd_timer_runs_notices_send():
    import configparser
    import shlex

    from proxy.cli import build_parser

    def unit(name):
        p = configparser.ConfigParser(strict=False, interpolation=None)
        p.optionxform = str
        p.read_string((REPO / "deploy" / "systemd" / name).read_text())
        return p

    service = unit("tenantgate-notices.service")["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/tenantgate") and argv[1:3] == ["notices", "send"]
    args = build_parser().parse_args(argv[1:])
    assert args.func is not None and args.config == "/etc/tenantgate/tenantgate.yaml"
    assert service["Type"] == "oneshot" and service["ProtectSystem"] == "strict" and service["User"] == "tenantgate"
    timer = unit("tenantgate-notices.timer")
    assert timer["Timer"]["Unit"] == "tenantgate-notices.service" and timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"
