"""`tenantgate tenant move` as a subprocess, on two real PostgreSQL clusters with a regions config: the
two-person rule, a move killed with SIGKILL during the initial copy and then resumed (the placement
flipped, the source purged with its receipt, every step in the audit chain, which still verifies), an
aborted move, and the refusals (no hold configured, a region the config lacks)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import asyncpg
import pytest
import yaml

from proxy.control.placement import get_placement
from proxy.control.plane import ControlPlane
from support.lifecycle_cli import PASSWORDS, REPO, _signing_key, audit_records
from support.move_env import cluster_pair, data_sql, fresh_pair, private_dir, tenant_state


@pytest.fixture(scope="module")
def clusters():
    with cluster_pair("tenantgate-movecli-") as pair:
        yield pair


@pytest.fixture
async def env(clusters):
    src, tgt = clusters
    tmp_path = private_dir("tenantgate-movecli-cfg-")
    name, sdsn, tdsn = fresh_pair(src, tgt, "mvcli")
    s, t = await asyncpg.connect(sdsn), await asyncpg.connect(tdsn)
    await s.execute(data_sql("acme", 300, 900, 1200) + data_sql("initech", 30, 60, 60))
    await t.execute(data_sql("globex", 20, 40, 40))
    src.psql(f'CREATE DATABASE "{name}_ctl"')
    cdsn = src.dsn(database=f"{name}_ctl")
    plane = ControlPlane(cdsn)
    await plane.start(install=True)
    admin = plane.platform_admin()
    await plane.add_operator(admin, "alice", PASSWORDS["alice"], ["operator"])
    await plane.add_operator(admin, "bob", PASSWORDS["bob"], ["approver"])
    await plane.add_operator(admin, "carol", PASSWORDS["carol"], ["approver"])
    for tenant in ("acme", "initech", "globex"):
        await plane.register_tenant(tenant)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"tenant_column": "tenant_id", "schemas": ["public"]}))
    region = {c: {"host": "127.0.0.1", "port": cl.port, "database": name, "data_dsn": cl.dsn(database=name)}
              for c, cl in (("cn-east", src), ("cn-north", tgt))}
    cfg = tmp_path / "tenantgate.yaml"
    cfg.write_text(yaml.safe_dump({
        "rules_file": "rules.yaml", "control": {"dsn": cdsn}, "regions": region,
        "placement": {"default_region": "cn-east"},
        "lifecycle": {"purge_batch_rows": 500}, "audit": {"signing_key_file": str(_signing_key(tmp_path))},
    }))
    env_ctl = await asyncpg.connect(cdsn)
    yield {"src": s, "tgt": t, "plane": plane, "cfg": str(cfg), "ctl": env_ctl}
    await plane.close()
    for c in (s, t, env_ctl):
        await c.close()
    shutil.rmtree(tmp_path, ignore_errors=True)


def argv(env, *args, who=None):
    a = [sys.executable, "-m", "proxy.cli", "tenant", "move", "--config", env["cfg"], *args]
    if who:
        a += ["--as", who, "--password-stdin"]
    return a


def cli(env, *args, who=None):
    p = subprocess.run(argv(env, *args, who=who), input=(PASSWORDS[who] + "\n") if who else None,
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    return p.returncode, p.stdout, p.stderr


async def step_of(env, move_id) -> str:
    return await env["ctl"].fetchval("SELECT step FROM tenantgate_control.tenant_moves WHERE id = $1", move_id)


async def test_two_approvers_kill_during_copy_then_resume(env):
    import asyncio

    src, tgt = env["src"], env["tgt"]
    acme = await tenant_state(src, "acme")
    initech, globex = await tenant_state(src, "initech"), await tenant_state(tgt, "globex")

    rc, _, err = cli(env, "acme", "--to", "cn-north", who="alice")
    assert rc == 1 and "42501" in err and "approver" in err
    rc, _, err = cli(env, "acme", "--to", "mars", who="bob")
    assert rc == 1 and "22023" in err and "not configured" in err
    rc, out, err = cli(env, "acme", "--to", "cn-north", "--reason", "data residency", who="bob")
    assert rc == 0, err
    move_id = json.loads(out)["id"]
    assert "--approve" in err
    rc, _, err = cli(env, "--approve", str(move_id), "--no-proxies", who="bob")
    assert rc == 1 and "42501" in err and "second approver" in err
    rc, _, err = cli(env, "--approve", str(move_id), who="carol")
    assert rc == 1 and "hold the tenant at every tenantgate instance" in err and "--console" in err
    assert await step_of(env, move_id) == "requested"

    # the initial copy cannot finish while a target table is locked against writes: the move waits in 'copying'; kill -9 it
    blocker_conn = env["tgt"]
    tx = blocker_conn.transaction()
    await tx.start()
    await blocker_conn.execute("LOCK TABLE orders IN SHARE MODE")
    p = subprocess.Popen(argv(env, "--approve", str(move_id), "--no-proxies", who="carol"), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    p.stdin.write(PASSWORDS["carol"] + "\n")
    p.stdin.close()
    try:
        while await step_of(env, move_id) != "copying":
            assert p.poll() is None, p.stderr.read()
            await asyncio.sleep(0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        p.stderr.close()
        await tx.rollback()
    assert await tenant_state(src, "acme") == acme
    assert (await get_placement(env["plane"], "acme")).region == "cn-east"

    rc, out, err = cli(env, "acme", "--resume", "--no-proxies", who="bob")
    assert rc == 0, err
    done = json.loads(out)
    assert done["step"] == "done" and "flipped to cn-north" in err
    p = await get_placement(env["plane"], "acme")
    assert p.region == "cn-north" and p.moving is False
    assert await tenant_state(tgt, "acme") == acme
    assert all(v == [] for v in (await tenant_state(src, "acme")).values())
    assert await tenant_state(src, "initech") == initech and await tenant_state(tgt, "globex") == globex
    types = [r["type"] for r in await audit_records(env["ctl"], "tenant.")]
    for t in ("tenant.move.requested", "tenant.move.approved", "tenant.move.resume", "tenant.move.step",
              "tenant.place", "tenant.move.purge", "tenant.move.done"):
        assert t in types, t
    receipt = json.loads((await audit_records(env["ctl"], "tenant.move.purge"))[-1]["detail"])
    assert receipt["tenant"] == "acme" and receipt["total_rows"] == sum(len(v) for v in acme.values())
    assert "signature" in receipt
    assert (await env["plane"].get_tenant("acme")).status == "active"  # moved, not purged
    report = await env["plane"].verify()
    assert report.ok, report
    rc, out, _ = cli(env, "--status", "acme")
    assert rc == 0 and json.loads(out)[-1]["step"] == "done"


async def test_abort_by_cli(env):
    src, tgt = env["src"], env["tgt"]
    initech = await tenant_state(src, "initech")
    rc, out, err = cli(env, "initech", "--to", "cn-north", who="bob")
    assert rc == 0, err
    move_id = json.loads(out)["id"]
    rc, _, err = cli(env, "initech", "--to", "cn-north", who="carol")
    assert rc == 1 and "already under way" in err
    rc, out, err = cli(env, "initech", "--abort", "--no-proxies", who="carol")
    assert rc == 0, err
    assert json.loads(out)["step"] == "aborted" and await step_of(env, move_id) == "aborted"
    assert await tenant_state(src, "initech") == initech
    assert all(v == [] for v in (await tenant_state(tgt, "initech")).values())
    rc, _, err = cli(env, "initech", "--resume", "--no-proxies", who="carol")
    assert rc == 1 and "no unfinished move" in err
