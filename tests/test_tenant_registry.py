"""Tenants known from the data, and the import story, end to end (real PostgreSQL, the CLI as a subprocess).

A fresh deployment: tenant rows in the tables, nothing registered in the control plane.

* `tenant list` shows the tenants found in the data, marked "discovered";
* `grant request` for a tenant neither registered nor in the data is refused (nothing recorded), for a
  discovered one it registers the tenant (audited) and records the request;
* `tenant offboard` works without a prior `tenant register` (the tenant is registered first, audited);
* export -> offboard -> purge -> import --reactivate gives back identical rows and an active tenant,
  other tenants untouched throughout;
* the messages of issue 15 item 9: a pending grant says to ask an approver.
"""

from __future__ import annotations

import json
import subprocess
import sys

import asyncpg
import pytest
import yaml

from support.lifecycle_fixtures import tenant_rows
from support.lifecycle_cli import lifecycle_config, lifecycle_database
from proxy.control.model import Actor, InvalidRequest
from proxy.seam import SessionRefused
from support.lifecycle_cli import PASSWORDS, REPO, T, audit_records, cli, grant


@pytest.fixture
async def fresh(make_db, tmp_path):
    """Data for three tenants; operators; NO tenant registered (as in a new deployment)."""
    _, dsn = make_db("tnreg")
    conn, plane, admin = await lifecycle_database(dsn, {"acme": 6, T: 8, "globex": 5}, passwords=PASSWORDS)
    cfg = lifecycle_config(tmp_path, dsn, {"purge_batch_rows": 7, "retention_days": 90})
    yield {"dsn": dsn, "conn": conn, "plane": plane, "cfg": str(cfg), "tmp": tmp_path}
    await plane.close()
    await conn.close()


def grant_cli(env, who: str, *args: str):
    argv = [sys.executable, "-m", "proxy", "grant", *args, "--as", who, "--password-stdin", "--config", env["cfg"]]
    return subprocess.run(argv, input=PASSWORDS[who] + "\n", capture_output=True, text=True, cwd=REPO, timeout=60)


async def _registered(conn) -> list[str]:
    return [r["name"] for r in await conn.fetch("SELECT name FROM tenantgate_control.tenants ORDER BY name")]


async def test_fresh_deployment_lists_discovered_tenants(fresh):
    assert await _registered(fresh["conn"]) == []
    rc, stdout, err = cli(fresh, "list", "--json")
    assert rc == 0, err
    assert {d["name"]: (d["status"], d["source"]) for d in json.loads(stdout)} == {
        "acme": ("active", "discovered"), T: ("active", "discovered"), "globex": ("active", "discovered")}
    rc, stdout, err = cli(fresh, "list")
    assert rc == 0 and "discovered" in stdout and "acme" in stdout
    # once registered, the same tenant is listed once, as registered
    await fresh["plane"].register_tenant("acme")
    rc, stdout, _ = cli(fresh, "list", "--json")
    assert [(d["name"], d["source"]) for d in json.loads(stdout) if d["name"] == "acme"] == [("acme", "registered")]


async def test_grant_request_for_an_unknown_tenant_is_refused(fresh):
    conn = fresh["conn"]
    r = grant_cli(fresh, "alice", "request", "--tenant", "nosuch", "--access", "read", "--for", "1h", "--reason", "T-1")
    assert r.returncode == 1
    assert 'tenant "nosuch" is not known' in r.stderr and "no tenant table holds a row of it" in r.stderr
    assert "tenantgate tenant register nosuch" in r.stderr
    assert await conn.fetchval("SELECT count(*) FROM tenantgate_control.grants") == 0
    assert await _registered(conn) == []
    # an id with a quote in it: still just "not known", nothing recorded
    r = grant_cli(fresh, "alice", "request", "--tenant", "o'", "--access", "read", "--for", "1h", "--reason", "T-1")
    assert r.returncode == 1 and "is not known" in r.stderr
    # a tenant found in the data: registered on first use, in the audit chain before the request
    r = grant_cli(fresh, "alice", "request", "--tenant", "globex", "--access", "read", "--for", "1h", "--reason", "T-2")
    assert r.returncode == 0, r.stderr
    assert await _registered(conn) == ["globex"]
    recs = await conn.fetch("SELECT type, tenant, operator, detail FROM tenantgate_control.audit_log "
                            "WHERE tenant = 'globex' ORDER BY seq")
    assert [x["type"] for x in recs] == ["tenant.status", "grant.requested"]
    assert json.loads(recs[0]["detail"]) == {"status": "active", "event": "registered", "source": "discovered"}
    assert recs[0]["operator"] == "alice"
    assert (await fresh["plane"].verify()).ok


async def test_offboard_needs_no_prior_register(fresh):
    conn = fresh["conn"]
    others = {t: await tenant_rows(conn, t) for t in ("acme", T)}
    rc, _, err = cli(fresh, "offboard", "nosuch", who="bob")
    assert rc == 1 and "42704" in err and 'tenant "nosuch" is not known' in err
    assert await _registered(conn) == []
    rc, stdout, err = cli(fresh, "offboard", "globex", who="bob")
    assert rc == 0, err
    assert json.loads(stdout)["status"] == "offboarded"
    types = [(x["type"], json.loads(x["detail"]).get("event") or json.loads(x["detail"]).get("status"))
             for x in await audit_records(conn, "tenant.status")]
    assert types == [("tenant.status", "registered"), ("tenant.status", "offboarded")]
    assert {t: await tenant_rows(conn, t) for t in ("acme", T)} == others


async def test_export_purge_import_reactivates_with_identical_rows(fresh):
    plane, conn = fresh["plane"], fresh["conn"]
    before = await tenant_rows(conn, T)
    others = {t: await tenant_rows(conn, t) for t in ("acme", "globex")}
    await grant(plane, "alice", T, "write")
    out = fresh["tmp"] / "oneil.tar.zst"
    rc, _, err = cli(fresh, "export", T, "--out", str(out), who="alice")  # registers T first (discovered)
    assert rc == 0, err
    first = (await audit_records(conn, "tenant.status"))[0]
    assert first["tenant"] == T and first["operator"] == "alice"
    assert json.loads(first["detail"]) == {"status": "active", "event": "registered", "source": "discovered"}
    # import into the same, non-empty tenant: the hint is the real way, not "purge it first"
    rc, _, err = cli(fresh, "import", T, str(out), who="alice")
    assert rc == 1 and "not empty" in err and "import --reactivate" in err
    rc, _, err = cli(fresh, "offboard", T, who="bob")
    assert rc == 0, err
    rc, _, err = cli(fresh, "purge", T, "--now", "--confirm", T, who="alice")
    assert rc == 0, err
    assert all(v == [] for v in (await tenant_rows(conn, T)).values())
    assert (await plane.get_tenant(T)).status == "purged"

    rc, _, err = cli(fresh, "import", T, str(out), who="alice")
    assert rc == 1 and "55000" in err and "has been purged" in err and "--reactivate" in err
    with pytest.raises(InvalidRequest, match="nothing to read"):
        await plane.request_grant(Actor("alice", frozenset({"operator"})), T, "read", "1h", "T-9")
    gid = await grant(plane, "alice", T, "write", approver="carol")  # two persons: alice asks, carol approves
    rc, stdout, err = cli(fresh, "import", T, str(out), "--reactivate", "--grant", str(gid), who="alice")
    assert rc == 0, err
    assert json.loads(stdout)["status"] == "active"
    assert await tenant_rows(conn, T) == before
    assert {t: await tenant_rows(conn, t) for t in ("acme", "globex")} == others
    t = await plane.get_tenant(T)
    assert t.status == "active" and t.purged_at is None and t.purge_started_at is None
    last = (await audit_records(conn, "tenant.status"))[-1]
    assert json.loads(last["detail"])["event"] == "reactivated by import" and last["grant_id"] == gid
    assert [r["type"] for r in await audit_records(conn, "tenant.import")][-2:] == ["tenant.import", "tenant.import.done"]
    # --reactivate on an active tenant is refused, nothing loaded twice
    rc, _, err = cli(fresh, "import", T, str(out), "--reactivate", who="alice")
    assert rc == 1 and "not purged" in err
    assert await tenant_rows(conn, T) == before
    assert (await plane.verify()).ok


async def test_a_pending_grant_says_ask_an_approver(fresh):
    plane = fresh["plane"]
    g = await plane.request_grant(Actor("alice", frozenset({"operator"})), "acme", "read", "1h", "T-3")
    for grant_id in (g.id, None):
        with pytest.raises(SessionRefused) as ei:
            await plane.bind_grant("alice", grant_id)
        assert ei.value.sqlstate == "28000"
        assert "pending" in ei.value.message and f"tenantgate grant approve {g.id}" in ei.value.message
        assert "Request one" not in ei.value.message and (grant_id is None or "grant request" not in ei.value.message)


async def test_discovery_with_an_integer_tenant_column(make_db):
    """A tenant id that does not cast to the column's type is simply not in the data (no error, nothing hidden)."""
    from proxy.control.tenant_discovery import tenant_in_data, tenant_values
    from proxy.lifecycle.tables import discover

    _, dsn = make_db("tnint")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE TABLE invoices (tenant_id int NOT NULL, n int);"
                           "INSERT INTO invoices VALUES (5, 1), (5, 2), (7, 1)")
        schema = await discover(conn, "tenant_id", ["public"])
        assert await tenant_values(conn, schema) == ["5", "7"]
        assert await tenant_in_data(conn, schema, "5") is True
        assert await tenant_in_data(conn, schema, "6") is False
        assert await tenant_in_data(conn, schema, "acme") is False
        assert await tenant_in_data(conn, schema, "99999999999") is False
    finally:
        await conn.close()


async def test_data_role_without_bypassrls(fresh):
    """Under tenantgate's GUC-keyed RLS policies a role without BYPASSRLS cannot list tenant values (the
    list says so and shows the registry), but still finds one tenant's rows for a grant request."""
    import uuid

    conn = fresh["conn"]
    role = f"tn_life_{uuid.uuid4().hex[:6]}"
    await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'; GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    for t in ("customers", "orders", "order_items", "employees", "teams", "members", '"Notes ü.v2"'):
        await conn.execute(f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY")
        await conn.execute(f"CREATE POLICY tenantgate_tenant_access ON {t} AS PERMISSIVE FOR ALL TO PUBLIC "
                           "USING (tenant_id = current_setting('tenantgate.tenant_id', true))")
    cfg = yaml.safe_load(open(fresh["cfg"]).read())
    cfg["lifecycle"]["data_dsn"] = fresh["dsn"].replace("postgres:postgres-admin@", f"{role}:pw@")
    assert cfg["lifecycle"]["data_dsn"] != fresh["dsn"]
    open(fresh["cfg"], "w").write(yaml.safe_dump(cfg))

    rc, stdout, err = cli(fresh, "list", "--json")
    assert rc == 0, err
    assert json.loads(stdout) == [] and "cannot see every row" in err
    r = grant_cli(fresh, "alice", "request", "--tenant", "nosuch", "--access", "read", "--for", "1h", "--reason", "T-1")
    assert r.returncode == 1 and "is not known" in r.stderr
    r = grant_cli(fresh, "alice", "request", "--tenant", "acme", "--access", "read", "--for", "1h", "--reason", "T-1")
    assert r.returncode == 0, r.stderr
    assert await _registered(conn) == ["acme"]
