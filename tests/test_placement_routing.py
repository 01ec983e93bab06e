"""Tenant placement end to end: `tenantgate demo --regions cn-east,cn-north` (two real PostgreSQL
clusters), real clients (psycopg, asyncpg, psql through the CLI), what a user notices.

* each tenant's session reaches its own region's server: rows written land on that server only, the
  other tenant's rows stay untouched on both (credential-bound, token and operator sessions);
* a token switch to a tenant on another backend is refused (0A000), and the session stays usable;
* `tenant place` is approver-only, refuses a tenant that has rows in its current region, is audited,
  and every instance learns it (a new session of the tenant goes to the new region);
* operator residency: a grant request for a tenant in another region is refused (and audited);
* `doctor` checks both servers.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest

from support.demo import start_demo, stop_demo
from support.e2e import fresh_ids, pool_dsn, token
from support.operators import conninfo, demo_tenantgate, pg_options

REGIONS = ("cn-east", "cn-north")


@pytest.fixture(scope="module")
def rdemo():
    base = Path(tempfile.mkdtemp(prefix="tenantgate-regions-"))
    os.chmod(base, 0o755)
    d = start_demo(base, "--regions", ",".join(REGIONS), "--metrics-port", "off")
    yield d
    assert stop_demo(d) == 0
    for name in ("pg", "pg-cn-north"):
        assert not (d.state_dir / name / "postmaster.pid").exists(), f"{name} still running"


@pytest.fixture(scope="module")
def tg(rdemo):
    return demo_tenantgate(rdemo)


def server(rdemo, region: str) -> str:
    return rdemo.dsns["backend_admin_by_region"][region]


def rows(rdemo, region: str, table: str = "customers") -> dict[str, list[tuple]]:
    """Every tenant's rows of ``table`` on ``region``'s server, read directly as the superuser."""
    with psycopg.connect(server(rdemo, region), autocommit=True) as conn:
        out: dict[str, list[tuple]] = {}
        for r in conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall():
            out.setdefault(r[0], []).append(r)
    return out


def test_dsns_and_seed_rows_per_region(rdemo):
    d = rdemo.dsns
    assert set(d) >= {"app", "operator", "backend_admin", "backend_admin_by_region"}
    assert list(d["backend_admin_by_region"]) == list(REGIONS)
    assert d["backend_admin"] == d["backend_admin_by_region"]["cn-east"]
    assert d["backend_admin_by_region"]["cn-east"] != d["backend_admin_by_region"]["cn-north"]
    for table in ("customers", "orders", "order_items"):
        assert set(rows(rdemo, "cn-east", table)) == {"acme"}
        assert set(rows(rdemo, "cn-north", table)) == {"globex"}
    for region in REGIONS:
        with psycopg.connect(server(rdemo, region), autocommit=True) as conn:
            assert conn.execute("SHOW wal_level").fetchone()[0] == "logical"


def test_each_tenant_writes_to_its_own_server_only(rdemo):
    east, north = rows(rdemo, "cn-east"), rows(rdemo, "cn-north")
    a, g = fresh_ids(2)
    with psycopg.connect(rdemo.app("acme"), autocommit=True) as conn:
        conn.execute("INSERT INTO customers (customer_id, name) VALUES (%s, 'placed-east')", [a])
        seen = conn.execute("SELECT tenant_id, customer_id FROM customers ORDER BY 2").fetchall()
    assert {t for t, _ in seen} == {"acme"} and (("acme", a) in seen)
    with psycopg.connect(rdemo.app("globex"), autocommit=True) as conn:
        conn.execute("INSERT INTO customers (customer_id, name) VALUES (%s, 'placed-north')", [g])
        seen = conn.execute("SELECT tenant_id, customer_id FROM customers ORDER BY 2").fetchall()
    assert {t for t, _ in seen} == {"globex"} and ("globex", g) in seen
    east2, north2 = rows(rdemo, "cn-east"), rows(rdemo, "cn-north")
    assert [r[1] for r in east2["acme"]] == sorted([r[1] for r in east["acme"]] + [a])
    assert [r[1] for r in north2["globex"]] == sorted([r[1] for r in north["globex"]] + [g])
    assert set(east2) == {"acme"} and set(north2) == {"globex"}  # nothing of one landed on the other


async def test_token_sessions_route_by_tenant_and_cannot_switch_backends(rdemo):
    north_before = rows(rdemo, "cn-north")
    conn = await asyncpg.connect(pool_dsn(rdemo), server_settings={"options": f"-c tenantgate.tenant={token(rdemo, 'globex')}"})
    try:
        assert {r["tenant_id"] for r in await conn.fetch("SELECT tenant_id FROM orders")} == {"globex"}
        with pytest.raises(asyncpg.exceptions.FeatureNotSupportedError) as e:
            await conn.execute(f"SET tenantgate.tenant = '{token(rdemo, 'acme')}'")
        assert 'tenant "acme" is in region cn-east' in str(e.value) and "new connection" in str(e.value)
        # still globex, on cn-north, and usable
        assert {r["tenant_id"] for r in await conn.fetch("SELECT tenant_id FROM customers")} == {"globex"}
    finally:
        await conn.close()
    # a token session without a tenant at connect is on the default region: it may pick acme, not globex
    with psycopg.connect(pool_dsn(rdemo), autocommit=True) as c:
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            c.execute(f"SET tenantgate.tenant = '{token(rdemo, 'globex')}'")
        c.execute(f"SET tenantgate.tenant = '{token(rdemo, 'acme')}'")
        assert {r[0] for r in c.execute("SELECT tenant_id FROM customers").fetchall()} == {"acme"}
    assert rows(rdemo, "cn-north") == north_before


def test_place_is_audited_refuses_tenants_with_rows_and_reaches_the_proxy(rdemo, tg):
    r = tg.run("tenant", "place", "globex", "--region", "cn-east", actor="alice")
    assert r.returncode == 1 and "approver" in r.stderr
    r = tg.run("tenant", "place", "globex", "--region", "cn-east", actor="bob")
    assert r.returncode == 1 and "has rows in region cn-north" in r.stderr and "tenant move globex" in r.stderr
    r = tg.run("tenant", "place", "initech", "--region", "eu-west", actor="bob")
    assert r.returncode == 1 and "not configured" in r.stderr
    # a new tenant, no rows anywhere: placed in cn-north
    (i,) = fresh_ids(1)
    with psycopg.connect(server(rdemo, "cn-north"), autocommit=True) as conn:
        conn.execute("INSERT INTO customers (tenant_id, customer_id, name) VALUES ('initech', %s, 'north only')", [i])
    r = tg.run("tenant", "place", "initech", "--region", "cn-north", "--reason", "T-19 residency", actor="bob",
               timeout=60)
    # initech has a row in cn-north only: from its current (default) region cn-east it has none to leave behind
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["region"] == "cn-north"
    r = tg.run("tenant", "list", "--json")
    assert r.returncode == 0, r.stderr
    regions = {t["name"]: t["region"] for t in json.loads(r.stdout)}
    assert regions["acme"] == "cn-east" and regions["globex"] == "cn-north" and regions["initech"] == "cn-north"
    # the running proxy learned it (NOTIFY): initech's token session sees the cn-north row
    seen = None
    for _ in range(100):
        with psycopg.connect(pool_dsn(rdemo), autocommit=True,
                             options=f"-c tenantgate.tenant={token(rdemo, 'initech')}") as c:
            seen = c.execute("SELECT customer_id, name FROM customers").fetchall()
        if seen:
            break
        time.sleep(0.1)  # the NOTIFY is on its way: poll (bounded), assert on what is seen
    assert seen == [(i, "north only")]
    # audited, and the chain verifies
    recs = [x for x in tg.export(1) if x["type"] == "tenant.place"]
    assert [(x["tenant"], x["operator"], x["detail"]["region"]) for x in recs][-1] == ("initech", "bob", "cn-north")
    assert {x["tenant"]: x["detail"]["region"] for x in recs if x["operator"].startswith("platform-admin")} == {
        "acme": "cn-east", "globex": "cn-north"}
    # a grant request for initech (unregistered, its rows only on cn-north) finds it in its region's data
    g = tg.request("alice", "initech", "read")
    assert g["state"] == "pending" and g["tenant"] == "initech"
    tg.revoke(g["id"])
    refused = [x for x in tg.export(1) if x["type"] == "tenant.refused" and x["tenant"] == "globex"]
    assert refused and "has rows" in refused[-1]["detail"]["message"]
    assert tg.verify().returncode == 0


def test_operator_residency_and_operator_sessions_on_the_tenants_server(rdemo, tg):
    r = tg.run("operator", "regions", "alice", "--regions", "cn-north", actor="bob")
    assert r.returncode == 0, r.stderr
    try:
        ops = {o["name"]: o for o in tg.ok("operator", "list")}
        assert ops["alice"]["regions"] == ["cn-north"] and ops["bob"]["regions"] is None
        r = tg.run("grant", "request", "--tenant", "acme", "--access", "read", "--for", "1h", "--reason", "T-5",
                   actor="alice")
        assert r.returncode == 1
        assert "region 'cn-east'" in r.stderr and "operator residency" in r.stderr
        assert not [g for g in tg.ok("grant", "list", "--tenant", "acme", "--requester", "alice")
                    if g["reason"] == "T-5"]
        refused = [x for x in tg.export(1) if x["type"] == "grant.refused"]
        assert refused[-1]["operator"] == "alice" and refused[-1]["tenant"] == "acme"
        assert refused[-1]["detail"]["region"] == "cn-east"
        # a tenant of alice's region: granted, and her session reads globex's rows on cn-north
        g = tg.active_grant("alice", "globex", "read")
        dsn = conninfo("127.0.0.1", rdemo.port, "alice", rdemo.password("operator:alice"))
        with psycopg.connect(dsn, autocommit=True, options=pg_options(g["id"])) as conn:
            got = {r[0] for r in conn.execute("SELECT tenant_id FROM orders").fetchall()}
        assert got == {"globex"}
        # the account is restricted to cn-east after the approval: the grant no longer opens a session
        assert tg.run("operator", "regions", "alice", "--regions", "cn-east", actor="bob").returncode == 0
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(dsn, autocommit=True, options=pg_options(g["id"])).close()
        assert "operator residency" in str(e.value) and "region 'cn-north'" in str(e.value)
        refused = [x for x in tg.export(1) if x["type"] == "connection.refused" and x["operator"] == "alice"]
        assert "operator residency" in refused[-1]["detail"]["message"]
        tg.revoke(g["id"])
    finally:
        assert tg.run("operator", "regions", "alice", "--regions", "all", actor="bob").returncode == 0


def test_doctor_checks_every_region(rdemo):
    r = rdemo.cli("doctor", "--config", str(rdemo.config_path), "--json")
    out = json.loads(r.stdout)
    assert list(out["regions"]) == list(REGIONS)
    for region in REGIONS:
        assert out["regions"][region]["ok"], out["regions"][region]
        assert not [f for f in out["regions"][region]["findings"] if f["status"] == "fail"]
    assert [f["status"] for f in out["across_regions"]["findings"]] == ["pass"]
    assert r.returncode == 0 and out["ok"]
    # a region whose server drifted: doctor fails and names the table
    with psycopg.connect(server(rdemo, "cn-north"), autocommit=True) as conn:
        conn.execute("ALTER TABLE customers ADD COLUMN drift int")
    try:
        r = rdemo.cli("doctor", "--config", str(rdemo.config_path), "--json")
        out = json.loads(r.stdout)
        assert r.returncode == 1 and not out["ok"]
        bad = [f for f in out["across_regions"]["findings"] if f["status"] == "fail"]
        assert [f["subject"] for f in bad] == ["public.customers"]
    finally:
        with psycopg.connect(server(rdemo, "cn-north"), autocommit=True) as conn:
            conn.execute("ALTER TABLE customers DROP COLUMN drift")


def test_admin_console_shows_each_sessions_region(rdemo):
    with psycopg.connect(rdemo.app("acme"), autocommit=True) as a, \
            psycopg.connect(rdemo.app("globex"), autocommit=True) as g:
        a.execute("SELECT 1")
        g.execute("SELECT 1")
        with psycopg.connect(rdemo.dsns["admin_console"], autocommit=True) as console:
            cur = console.execute("SHOW CLIENTS")
            names = [d.name for d in cur.description]
            clients = [dict(zip(names, r)) for r in cur.fetchall()]
            cur = console.execute("SHOW POOLS")
            names = [d.name for d in cur.description]
            pools = [dict(zip(names, r)) for r in cur.fetchall()]
    by_user = {c["user"]: c["region"] for c in clients if c["user"] in ("acme_app", "globex_app")}
    assert by_user == {"acme_app": "cn-east", "globex_app": "cn-north"}
    assert {p["region"] for p in pools if p["database"] == "app"} == {"cn-east", "cn-north"}


def _count(rdemo, region: str, tenant: str) -> int:
    with psycopg.connect(server(rdemo, region), autocommit=True) as conn:
        return sum(conn.execute(f"SELECT count(*) FROM {t} WHERE tenant_id = %s", [tenant]).fetchone()[0]
                   for t in ("customers", "orders", "order_items"))


def test_export_and_purge_act_on_the_tenants_server(rdemo, tg, tmp_path):
    # export globex (cn-north): every row comes from cn-north, where the default region has none
    g = tg.active_grant("alice", "globex", "read")
    r = tg.run("tenant", "export", "globex", "--out", str(tmp_path / "globex-export"), "--grant", str(g["id"]),
               actor="alice")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total_rows"] == _count(rdemo, "cn-north", "globex") > 0
    assert _count(rdemo, "cn-east", "globex") == 0
    tg.revoke(g["id"])
    # a tenant on cn-north only, offboarded and purged: its rows go from cn-north, nobody else's change
    (i,) = fresh_ids(1)
    with psycopg.connect(server(rdemo, "cn-north"), autocommit=True) as conn:
        conn.execute("INSERT INTO customers (tenant_id, customer_id, name) VALUES ('umbrella', %s, 'u')", [i])
    assert tg.run("tenant", "register", "umbrella", actor="bob").returncode == 0
    r = tg.run("tenant", "place", "umbrella", "--region", "cn-north", actor="bob")
    assert r.returncode == 0, r.stderr
    others = {(reg, t): _count(rdemo, reg, t) for reg in REGIONS for t in ("acme", "globex")}
    r = tg.run("tenant", "offboard", "umbrella", actor="bob")
    assert r.returncode == 0, r.stderr
    w = tg.active_grant("alice", "umbrella", "write")
    r = tg.run("tenant", "purge", "umbrella", "--now", "--confirm", "umbrella", "--grant", str(w["id"]),
               actor="alice", timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total_rows"] == 1
    assert _count(rdemo, "cn-north", "umbrella") == 0
    assert {(reg, t): _count(rdemo, reg, t) for reg in REGIONS for t in ("acme", "globex")} == others


def test_a_placement_change_moves_idle_pooled_sessions_and_ends_open_transactions(rdemo, tg):
    (i,) = fresh_ids(1)
    for region in REGIONS:
        with psycopg.connect(server(rdemo, region), autocommit=True) as conn:
            conn.execute("INSERT INTO customers (tenant_id, customer_id, name) VALUES ('hooli', %s, %s)", [i, region])
    opts = f"-c tenantgate.tenant={token(rdemo, 'hooli')}"
    idle = psycopg.connect(pool_dsn(rdemo), autocommit=True, options=opts)
    busy = psycopg.connect(pool_dsn(rdemo), autocommit=True, options=opts)
    try:
        assert idle.execute("SELECT name FROM customers").fetchall() == [("cn-east",)]
        busy.execute("BEGIN")
        assert busy.execute("SELECT name FROM customers").fetchall() == [("cn-east",)]
        r = tg.run("tenant", "place", "hooli", "--region", "cn-north", actor="bob")
        assert r.returncode == 1 and "has rows in region cn-east" in r.stderr  # without --force
        r = tg.run("tenant", "place", "hooli", "--region", "cn-north", "--force", actor="bob")
        assert r.returncode == 0, r.stderr
        seen = None
        for _ in range(100):  # the NOTIFY is on its way
            seen = idle.execute("SELECT name FROM customers").fetchall()
            if seen == [("cn-north",)]:
                break
            time.sleep(0.1)
        assert seen == [("cn-north",)]  # the same client connection, now on cn-north's server
        with pytest.raises(psycopg.OperationalError) as e:  # its transaction was on cn-east: ended
            for _ in range(100):
                busy.execute("SELECT name FROM customers").fetchall()
                time.sleep(0.1)
        assert "moved to region cn-north" in str(e.value)
    finally:
        idle.close()
        busy.close()
    with psycopg.connect(server(rdemo, "cn-east"), autocommit=True) as conn:  # nothing was written anywhere
        assert conn.execute("SELECT name FROM customers WHERE tenant_id = 'hooli'").fetchall() == [("cn-east",)]
