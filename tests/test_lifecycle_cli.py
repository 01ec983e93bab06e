"""`tenantgate tenant …` end to end: real PostgreSQL, the real control plane, the CLI as a subprocess.

Authentication, grants (read for export, write for import/purge), approver-only
offboard/restore, retention and --now/--confirm, receipts in the audit chain,
purge-expired as the service identity, and the audit chain still verifying.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from support.lifecycle_cli import PASSWORDS, T, _keys, audit_records, cli, grant, lifecycle_config, lifecycle_database
from support.lifecycle_fixtures import tenant_rows
from proxy.lifecycle.purge import check_receipt, purge_tenant
from proxy.lifecycle.tables import discover

@pytest.fixture
async def env(make_db, tmp_path):
    _, dsn = make_db("lccli")
    conn, plane, admin = await lifecycle_database(dsn, {"acme": 6, T: 8, "globex": 5}, passwords=PASSWORDS)
    for t in ("acme", T, "globex", "newco"):
        await plane.register_tenant(t)
    cfg = lifecycle_config(tmp_path, dsn, {"purge_batch_rows": 7, "retention_days": 90, "service_name": "retention-bot"})
    yield {"dsn": dsn, "conn": conn, "plane": plane, "cfg": str(cfg), "tmp": tmp_path}
    await plane.close()
    await conn.close()


async def test_export_needs_authentication_and_a_read_grant(env):
    out = env["tmp"] / "exp"
    rc, _, err = cli(env, "export", T, "--out", str(out))
    assert rc == 1 and "--as NAME" in err and "28000" in err
    rc, _, err = cli(env, "export", T, "--out", str(out), who="alice", password="wrong")
    assert rc == 1 and "28P01" in err and "authentication failed" in err
    rc, _, err = cli(env, "export", T, "--out", str(out), who="alice")
    assert rc == 1 and "42501" in err and "grant request" in err
    assert not out.exists()
    refused = await audit_records(env["conn"], "tenant.refused")
    assert refused and refused[-1]["operator"] == "alice" and refused[-1]["tenant"] == T

    gid = await grant(env["plane"], "alice", T, "read")
    rc, _, err = cli(env, "export", "nobody", "--out", str(out), who="alice")
    assert rc == 1 and "42704" in err and '"nobody" is not known' in err
    rc, stdout, err = cli(env, "export", T, "--out", str(out), who="alice")
    assert rc == 0, err
    assert json.loads(stdout)["total_rows"] > 0
    rc, stdout, err = cli(env, "verify-export", str(out))
    assert rc == 0 and json.loads(stdout)["ok"] is True
    rc, _, err = cli(env, "export", T, "--out", str(out), who="alice")
    assert rc == 1 and "58P02" in err and "already exists" in err
    started = await audit_records(env["conn"], "tenant.export")
    assert [r["type"] for r in started][-4:] == [
        "tenant.export", "tenant.export.done", "tenant.export", "tenant.export.failed"]
    assert started[-1]["sqlstate"] == "58P02"
    done = started[-3]
    assert done["grant_id"] == gid and done["operator"] == "alice" and len(json.loads(done["detail"])["manifest_sha256"]) == 64
    # a tampered file is named
    f = out / "public.orders.csv"
    f.write_bytes(f.read_bytes().replace(b"10.25", b"99.99"))
    rc, _, err = cli(env, "verify-export", str(out))
    assert rc == 1 and "public.orders.csv" in err and "XX001" in err


async def test_offboard_retention_purge_receipt(env):
    plane, conn = env["plane"], env["conn"]
    others = {t: await tenant_rows(conn, t) for t in ("acme", "globex")}
    total = sum(len(v) for v in (await tenant_rows(conn, T)).values())
    await grant(plane, "alice", T, "read")

    rc, _, err = cli(env, "purge", T, who="alice")
    assert rc == 1 and "is active: offboard it first" in err
    rc, _, err = cli(env, "offboard", T, who="alice")
    assert rc == 1 and "42501" in err and "approver" in err
    rc, stdout, err = cli(env, "offboard", T, who="bob")
    assert rc == 0, err
    end = datetime.fromisoformat(json.loads(stdout)["retention_end"])
    assert timedelta(days=89) < end - datetime.now(timezone.utc) <= timedelta(days=90)

    rc, _, err = cli(env, "purge", T, who="alice")
    assert rc == 1 and "55000" in err and "retention period" in err and "--now --confirm" in err
    rc, _, err = cli(env, "purge", T, "--now", who="alice")
    assert rc == 1 and "confirmation" in err
    rc, _, err = cli(env, "purge", T, "--now", "--confirm", T, who="alice")  # read grant only
    assert rc == 1 and "42501" in err and "write grant" in err
    assert sum(len(v) for v in (await tenant_rows(conn, T)).values()) == total  # nothing deleted

    gid = await grant(plane, "alice", T, "write", approver="carol")
    rc, stdout, err = cli(env, "purge", T, "--now", "--confirm", T, who="alice")
    assert rc == 0, err
    receipt = json.loads(stdout)
    assert check_receipt(receipt, _keys(env))
    assert receipt["tenant"] == T and receipt["total_rows"] == total and receipt["operator"] == "alice"
    assert receipt["grant_id"] == str(gid) and receipt["verified_remaining_rows"] == 0
    assert all(v == [] for v in (await tenant_rows(conn, T)).values())
    assert {t: await tenant_rows(conn, t) for t in ("acme", "globex")} == others
    rec = (await audit_records(conn, "tenant.purge"))[-1]
    assert rec["type"] == "tenant.purge" and json.loads(rec["detail"]) == receipt and rec["grant_id"] == gid
    assert (await plane.get_tenant(T)).status == "purged"
    report = await plane.verify()
    assert report.ok, report.to_json()

    rc, stdout, _ = cli(env, "list", "--json")
    assert {t["name"]: t["status"] for t in json.loads(stdout)}[T] == "purged"
    rc, _, err = cli(env, "purge", T, who="alice")  # idempotent
    assert rc == 0 and "already purged" in err


async def test_restore_within_retention_only(env):
    plane = env["plane"]
    rc, _, err = cli(env, "offboard", "globex", who="bob")
    assert rc == 0, err
    rc, stdout, err = cli(env, "restore", "globex", who="carol")
    assert rc == 0 and json.loads(stdout)["status"] == "active"
    await plane.set_tenant_status("globex", "offboarded", retention_end=datetime.now(timezone.utc) - timedelta(seconds=1))
    rc, _, err = cli(env, "restore", "globex", who="bob")
    assert rc == 1 and "ended" in err


async def test_purge_expired_runs_as_service_identity(env):
    plane, conn = env["plane"], env["conn"]
    past = datetime.now(timezone.utc) - timedelta(days=1)
    await plane.set_tenant_status("acme", "offboarded", retention_end=past)
    await plane.set_tenant_status("globex", "offboarded")  # retention still running
    before_globex = await tenant_rows(conn, "globex")
    # acme's final retention notice was delivered (purge-expired waits for it; tests/test_retention_notices.py)
    from proxy.config import NoticesConfig
    from proxy.control.notices import schedule

    await schedule(plane, await plane.get_tenant("acme"), NoticesConfig())
    await conn.execute("UPDATE tenantgate_control.retention_notices SET state = 'delivered', delivered_at = now() "
                       "WHERE tenant = 'acme' AND final")
    rc, stdout, err = cli(env, "purge-expired")
    assert rc == 0, err
    receipts = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    assert [r["tenant"] for r in receipts] == ["acme"]
    assert receipts[0]["operator"] == "retention-bot" and receipts[0]["grant_id"] is None
    assert (await plane.get_tenant("acme")).status == "purged"
    assert (await plane.get_tenant("globex")).status == "offboarded"
    assert await tenant_rows(conn, "globex") == before_globex
    assert all(v == [] for v in (await tenant_rows(conn, "acme")).values())


async def test_import_needs_write_grant_and_an_empty_active_tenant(env):
    plane, conn = env["plane"], env["conn"]
    await grant(plane, "alice", "globex", "read")
    out = env["tmp"] / "globex.tar.zst"
    rc, _, err = cli(env, "export", "globex", "--out", str(out), "--format", "jsonl", who="alice")
    assert rc == 0, err
    before = await tenant_rows(conn, "globex")
    rc, _, err = cli(env, "import", "globex", str(out), who="alice")
    assert rc == 1 and "42501" in err  # read grant only
    await grant(plane, "alice", "globex", "write")
    rc, _, err = cli(env, "import", "globex", str(out), who="alice")
    assert rc == 1 and "55000" in err and "not empty" in err
    # empty the tenant's tables (library purge, status stays active), then load the export back
    await purge_tenant(conn, await discover(conn, "tenant_id"), "globex")
    rc, stdout, err = cli(env, "import", "globex", str(out), who="alice")
    assert rc == 0, err
    assert await tenant_rows(conn, "globex") == before
    assert [r["type"] for r in await audit_records(conn, "tenant.import")][-2:] == ["tenant.import", "tenant.import.done"]
