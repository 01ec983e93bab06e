"""Third-party demands end to end: real PostgreSQL, the control plane, the CLI as a subprocess,
and a local HTTP server standing in for the tenant's webhook.

Registration (approver only, signed record, verifiable offline), the tenant
notice at registration or when the gag ends, the disclosure grant (two
approvers besides the requester, distinct persons), an export only under it
(once, by its requester, holding only the demanded tenant's rows), the list,
and the audit chain.
"""

from __future__ import annotations

import csv
import http.server
import io
import json
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import zstandard

from support.lifecycle_fixtures import tenant_rows
from support.lifecycle_cli import lifecycle_config, lifecycle_database
from proxy.control.model import Actor

REPO = Path(__file__).resolve().parent.parent
PASSWORDS = {"alice": "alice-pw-1", "bob": "bob-pw-2", "carol": "carol-pw-3", "dave": "dave-pw-4"}


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def webhook():
    _Hook.received = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/notices/{{tenant}}", _Hook.received
    srv.shutdown()
    srv.server_close()


@pytest.fixture
async def env(make_db, tmp_path, webhook):
    from proxy.control.accounts import decide_change, enrol, request_change

    _, dsn = make_db("demands")
    conn, plane, admin = await lifecycle_database(dsn, {"acme": 6, "globex": 5}, passwords=PASSWORDS)
    # dave: an approver account that bob requested just now (so bob and dave may be one person)
    bob = await plane.authenticate_actor("bob", PASSWORDS["bob"], None)
    carol = await plane.authenticate_actor("carol", PASSWORDS["carol"], None)
    req = await request_change(plane, bob, "account.create", "dave", {"roles": ["approver"]}, "test")
    _, token = await decide_change(plane, carol, req.id, True)
    await enrol(plane, token, PASSWORDS["dave"])
    await conn.execute("UPDATE tenantgate_control.operators SET totp_secret = NULL WHERE name = 'dave'")
    for t in ("acme", "globex"):
        await plane.register_tenant(t)
    cfg = lifecycle_config(tmp_path, dsn, {"demand_notice_url": webhook[0]})
    yield {"dsn": dsn, "conn": conn, "plane": plane, "cfg": str(cfg), "tmp": tmp_path, "received": webhook[1]}
    await plane.close()
    await conn.close()


def tg(env, *args, who=None):
    argv = [sys.executable, "-m", "proxy.cli", *args, "--config", env["cfg"]]
    stdin = None
    if who:
        argv += ["--as", who, "--password-stdin"]
        stdin = PASSWORDS[who] + "\n"
    p = subprocess.run(argv, input=stdin, capture_output=True, text=True, cwd=REPO, timeout=120)
    return p.returncode, p.stdout, p.stderr


async def test_demand_disclosure_and_notices(env):
    conn, tmp, received = env["conn"], env["tmp"], env["received"]
    acme_rows = sum(len(v) for v in (await tenant_rows(conn, "acme")).values())
    globex_before = await tenant_rows(conn, "globex")

    rc, _, err = tg(env, "demand", "register", "--tenant", "acme", "--authority", "Court X", "--reference", "AB-1",
                    who="alice")
    assert rc == 1 and "approver role" in err
    rc, _, err = tg(env, "demand", "register", "--tenant", "acme", "--authority", "Court X", "--reference", "AB-1",
                    "--gag-until", "2001-01-01", who="bob")
    assert rc == 1 and "must end in the future" in err

    # registered without a gag: the tenant is told at once
    rc, out, err = tg(env, "demand", "register", "--tenant", "acme", "--authority", "Court X", "--reference", "AB-1",
                      "--json", who="bob")
    assert rc == 0, err
    record = json.loads(out)
    assert record["type"] == "tenant_demand_record" and record["tenant"] == "acme" and record["signature"]
    (tmp / "demand.json").write_text(json.dumps(record))
    rc, out, err = tg(env, "receipt", "verify", str(tmp / "demand.json"), "--public-key", str(tmp / "audit.key.pub"))
    assert rc == 0 and "demand record OK" in out and "Court X" in out, err
    (tmp / "forged.json").write_text(json.dumps({**record, "tenant": "globex"}))
    rc, _, err = tg(env, "receipt", "verify", str(tmp / "forged.json"), "--public-key", str(tmp / "audit.key.pub"))
    assert rc == 1 and "forged or altered" in err
    assert [(p, n["tenant"], n["demand_id"]) for p, n in received] == [("/notices/acme", "acme", record["demand_id"])]
    assert received[0][1]["record"] == record

    # gagged: no notice until the gag ends
    rc, out, err = tg(env, "demand", "register", "--tenant", "globex", "--authority", "Agency Y", "--reference", "Q-7",
                      "--gag-until", "2099-01-01", "--json", who="carol")
    assert rc == 0, err
    gagged = json.loads(out)["demand_id"]
    rc, out, err = tg(env, "demand", "notify-due")
    assert rc == 0 and "no notice is due" in out and len(received) == 1
    await conn.execute("UPDATE tenantgate_control.demand_notices SET due_at = now() - interval '1 second' "
                       "WHERE demand_id = $1", gagged)  # the gag has ended
    rc, out, err = tg(env, "demand", "notify-due")
    assert rc == 0 and "sent" in out, err
    assert [(p, n["demand_id"]) for p, n in received][1:] == [("/notices/globex", gagged)]

    # no export without the demand's disclosure grant: not even with an ordinary read grant
    g = await env["plane"].request_grant(Actor("alice", frozenset({"operator"})), "acme", "read", "1h", "T-1")
    await env["plane"].approve_grant(Actor("bob", frozenset({"approver"})), g.id)
    out_path = tmp / "disclosure.tar.zst"
    rc, _, err = tg(env, "demand", "export", str(record["demand_id"]), "--out", str(out_path), who="alice")
    assert rc == 1 and "no approved disclosure grant" in err and not out_path.exists()

    rc, out, err = tg(env, "demand", "request", str(record["demand_id"]), "--for", "1h", "--reason", "order AB-1",
                      "--json", who="alice")
    assert rc == 0, err
    dg = json.loads(out)
    assert dg["approvals_required"] == 2 and dg["state"] == "pending"
    gid = str(dg["id"])
    rc, _, err = tg(env, "demand", "approve", gid, who="alice")
    assert rc == 1 and "self-approval" in err
    rc, out, err = tg(env, "demand", "approve", gid, who="bob")
    assert rc == 0 and "pending (1 of 2" in out, err
    rc, _, err = tg(env, "demand", "approve", gid, who="bob")
    assert rc == 1 and "already decided" in err
    rc, _, err = tg(env, "demand", "approve", gid, who="dave")  # bob had dave's account made: same person?
    assert rc == 1 and "account 'dave'" in err and "another approver must decide" in err
    rc, _, err = tg(env, "demand", "export", str(record["demand_id"]), "--out", str(out_path), who="alice")
    assert rc == 1 and "no approved disclosure grant" in err  # one approval is not enough
    rc, out, err = tg(env, "demand", "approve", gid, who="carol")
    assert rc == 0 and "approved (2 of 2" in out, err

    rc, _, err = tg(env, "demand", "export", str(record["demand_id"]), "--out", str(out_path), who="bob")
    assert rc == 1 and "no approved disclosure grant" in err  # only its requester
    rc, out, err = tg(env, "demand", "export", str(record["demand_id"]), "--out", str(out_path), who="alice")
    assert rc == 0, err
    assert json.loads(out)["total_rows"] == acme_rows
    with tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(open(out_path, "rb")), mode="r|") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    manifest = json.loads(members["manifest.json"])
    assert manifest["tenant"] == "acme" and manifest["disclosure"]["demand_id"] == record["demand_id"]
    assert manifest["disclosure"]["disclosure_grant"] == dg["id"] and manifest["signature"]
    customers = list(csv.DictReader(io.StringIO(members["public.customers.csv"].decode())))
    assert len(customers) == 6 and {r["tenant_id"] for r in customers} == {"acme"}  # no other tenant's rows
    rc, out, err = tg(env, "receipt", "verify", str(out_path), "--public-key", str(tmp / "audit.key.pub"))
    assert rc == 0, err
    # once
    rc, _, err = tg(env, "demand", "export", str(record["demand_id"]), "--out", str(tmp / "again"), who="alice")
    assert rc == 1 and "no approved disclosure grant" in err and not (tmp / "again").exists()
    assert await tenant_rows(conn, "globex") == globex_before

    rc, out, err = tg(env, "demand", "list", "--json")
    assert rc == 0, err
    listed = {d["id"]: d for d in json.loads(out)}
    assert listed[record["demand_id"]]["state"] == "disclosed"
    assert listed[record["demand_id"]]["grants"][0]["state"] == "used"
    assert [a["approver"] for a in listed[record["demand_id"]]["grants"][0]["approvals"]] == ["bob", "carol"]
    assert listed[gagged]["state"] == "open" and listed[gagged]["notices"][0]["state"] == "sent"
    rc, out, _ = tg(env, "demand", "list")
    assert rc == 0 and "Court X" in out and "disclosed" in out

    types = [r["type"] for r in await conn.fetch(
        "SELECT type FROM tenantgate_control.audit_log WHERE type LIKE 'demand.%' ORDER BY seq")]
    for t in ("demand.registered", "demand.notice.sent", "demand.grant.requested", "demand.grant.approval",
              "demand.grant.approved", "demand.export", "demand.export.done", "demand.refused"):
        assert t in types, (t, types)
    refused = [json.loads(r["detail"]) for r in await conn.fetch(
        "SELECT detail FROM tenantgate_control.audit_log WHERE type = 'demand.refused' ORDER BY seq")]
    assert [r["action"] for r in refused] == ["register", "export", "approve", "approve", "approve",
                                              "export", "export", "export"], refused
    assert "dave" in refused[4]["message"]
    report = await env["plane"].verify()
    assert report.ok, report.to_json()


async def test_disclosure_grant_distinct_persons_both_ways_and_expiry(env):
    from proxy.control import demands as D
    from proxy.control.model import InvalidRequest, PermissionDenied

    plane, conn = env["plane"], env["conn"]
    who = {n: await plane.authenticate_actor(n, PASSWORDS[n], None) for n in PASSWORDS}
    record = await D.register_demand(plane, who["carol"], "globex", "Regulator Z", "R-1", None)
    assert "signature" not in record  # no signer given: unsigned (receipt verify then refuses it)
    g = await D.request_disclosure(plane, who["alice"], record["demand_id"], "30m", "R-1")
    # dave approves first; bob (who had dave's account made) is then refused, the other way round too.
    # (carol approved dave's account and received its token: entangled as well; here only bob is)
    await conn.execute("UPDATE tenantgate_control.account_events SET involved = '{bob}', token_to = NULL "
                       "WHERE account = 'dave'")
    assert (await D.decide_disclosure(plane, who["dave"], g["id"], True))["state"] == "pending"
    with pytest.raises(PermissionDenied, match="account 'dave'"):
        await D.decide_disclosure(plane, who["bob"], g["id"], True)
    done = await D.decide_disclosure(plane, who["carol"], g["id"], True)
    assert done["state"] == "approved" and [a["approver"] for a in done["approvals"]] == ["dave", "carol"]

    # a request nobody answers in time expires, and so does an approved grant nobody used
    late = await D.request_disclosure(plane, who["alice"], record["demand_id"], "30m", "R-1 again")
    await conn.execute("UPDATE tenantgate_control.disclosure_grants SET pending_until = now() - interval '1 s' "
                       "WHERE id = $1", late["id"])
    await conn.execute("UPDATE tenantgate_control.disclosure_grants SET expires_at = now() - interval '1 s' "
                       "WHERE id = $1", g["id"])
    with pytest.raises(InvalidRequest, match="is expired, not pending"):
        await D.decide_disclosure(plane, who["bob"], late["id"], True)
    with pytest.raises(PermissionDenied, match="no approved disclosure grant"):
        await D.disclosure_grant_for(plane, who["alice"], record["demand_id"])
    states = {x["id"]: x["state"] for x in (await D.list_demands(plane, "globex"))[0]["grants"]}
    assert states == {g["id"]: "expired", late["id"]: "expired"}
    expired = await conn.fetchval("SELECT count(*) FROM tenantgate_control.audit_log WHERE type = 'demand.grant.expired'")
    assert expired == 2
    # a demand for a tenant nobody registered is refused
    with pytest.raises(Exception, match="not registered"):
        await D.register_demand(plane, who["carol"], "nobody", "X", "Y", None)
