"""The placement API of proxy/control/placement.py against a real control schema (one PostgreSQL).

Who may place a tenant, that every change is in the audit chain (and the chain verifies), that
every instance hears of a change (NOTIFY, through the watcher), operator residency, and the
config side (regions, the default region, the rules' allowed regions).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from proxy.config import Config, ConfigError
from proxy.control import placement as P
from proxy.control.model import InvalidRequest, NotFound, PermissionDenied
from proxy.policy.rules import Rules
from support.control import actor, add_people, control_env

CFG = Config.model_validate({"regions": {"cn-east": {"port": 5001, "database": "app"},
                                         "cn-north": {"port": 5002, "database": "app",
                                                      "data_dsn": "postgresql://life@north/app"}},
                             "lifecycle": {"data_dsn": "postgresql://life@east/app"}})


@pytest.fixture(scope="module")
async def env(pg, make_db):
    e = await control_env(pg, make_db, "place")
    plane = e.plane()
    await plane.start()
    await add_people(plane, ("bob", ("approver",)), ("carol", ("approver",)), ("alice", ("operator",)))
    yield e, plane
    await plane.close()


async def _records(plane, type_: str) -> list[dict]:
    async with plane.pool.acquire() as conn:
        rows = await conn.fetch(f"SELECT tenant, operator, detail FROM {plane.s}.audit_log WHERE type = $1 "
                                "ORDER BY seq", type_)
    return [{"tenant": r["tenant"], "operator": r["operator"], **json.loads(r["detail"])} for r in rows]


async def test_place_is_approver_only_audited_and_announced(env):
    _, plane = env
    heard: list = []
    got = asyncio.Event()

    def on_placement(tenant, region, moving):
        heard.append((tenant, region, moving))
        got.set()

    sub = await plane.watch()
    sub.close()
    w = await plane.watcher()
    sub = w.subscribe(on_placement_changed=on_placement)
    try:
        assert await P.get_placement(plane, "acme") is None
        with pytest.raises(PermissionDenied):
            await P.set_placement(plane, await actor(plane, "alice"), "acme", "cn-east", reason="T-1")
        assert await P.get_placement(plane, "acme") is None
        bob = await actor(plane, "bob")
        with pytest.raises(InvalidRequest):
            await P.set_placement(plane, bob, "acme", "CN East", reason="T-1")
        with pytest.raises(InvalidRequest):
            await P.set_placement(plane, bob, "acme", "cn-east", reason="  ")
        p = await P.set_placement(plane, bob, "acme", "cn-east", reason="T-1 residency")
        assert (p.tenant, p.region, p.backend, p.moving) == ("acme", "cn-east", "cn-east", False)
        await asyncio.wait_for(got.wait(), 30)
        assert heard[-1] == ("acme", "cn-east", False)
        got.clear()
        p = await P.set_placement(plane, bob, "acme", "cn-north", reason="T-2 move")
        await asyncio.wait_for(got.wait(), 30)
        assert heard[-1] == ("acme", "cn-north", False)
        m = await P.set_moving(plane, bob, "acme", True, reason="move 7")
        assert (m.region, m.moving) == ("cn-north", True)
        assert [x.tenant for x in await P.list_placements(plane)] == ["acme"]
        recs = await _records(plane, P.TENANT_PLACE)
        assert [(r["tenant"], r["operator"], r["region"], r.get("was"), r["moving"]) for r in recs] == [
            ("acme", "bob", "cn-east", None, False), ("acme", "bob", "cn-north", "cn-east", False),
            ("acme", "bob", "cn-north", None, True)]
        assert recs[0]["reason"] == "T-1 residency"
        assert (await plane.verify()).ok
    finally:
        sub.close()


async def test_set_placement_inside_a_caller_transaction_rolls_back_with_it(env):
    _, plane = env
    bob = await actor(plane, "bob")
    before = len(await _records(plane, P.TENANT_PLACE))
    with pytest.raises(RuntimeError):
        async with plane._tx() as conn:
            await P.set_placement(plane, bob, "globex", "cn-north", reason="T-3", conn=conn)
            raise RuntimeError("the move failed before the flip")
    assert await P.get_placement(plane, "globex") is None
    assert len(await _records(plane, P.TENANT_PLACE)) == before


async def test_operator_residency(env):
    _, plane = env
    bob, carol = await actor(plane, "bob"), await actor(plane, "carol")
    assert await P.operator_regions(plane, "alice") is None
    with pytest.raises(PermissionDenied):
        await P.set_operator_regions(plane, bob, "bob", ["cn-east"])
    with pytest.raises(PermissionDenied):
        await P.set_operator_regions(plane, await actor(plane, "alice"), "alice", None)
    await P.set_operator_regions(plane, bob, "alice", ["cn-east"])
    assert await P.operator_regions(plane, "alice") == ["cn-east"]
    await P.set_placement(plane, carol, "initech", "cn-north", reason="T-4")
    with pytest.raises(PermissionDenied, match="region 'cn-north'.*only be granted tenants in cn-east"):
        await P.check_residency(plane, CFG, "alice", "initech")
    assert await P.check_residency(plane, CFG, "alice", "unplaced") == "cn-east"  # the default region
    with pytest.raises(NotFound):
        await P.operator_regions(plane, "nobody")
    recs = await _records(plane, "operator.changed")
    assert recs[-1]["change"] == "regions" and recs[-1]["regions"] == ["cn-east"] and recs[-1]["was"] == "all"


def test_config_regions_and_rules():
    assert CFG.region_names() == ["cn-east", "cn-north"]
    assert CFG.backend.port == 5001 and P.backend_for(CFG, "cn-north").port == 5002
    with pytest.raises(ConfigError):
        P.backend_for(CFG, "eu-west")
    assert P.data_dsn_for(CFG, "cn-east") == "postgresql://life@east/app"
    assert P.data_dsn_for(CFG, "cn-north") == "postgresql://life@north/app"
    north = P.config_for_region(CFG, "cn-north")  # what the lifecycle commands use for a cn-north tenant
    assert north.backend.port == 5002 and north.lifecycle.resolved_data_dsn() == "postgresql://life@north/app"
    assert P.config_for_region(CFG, "cn-east").lifecycle.resolved_data_dsn() == "postgresql://life@east/app"
    assert north.region_names() == CFG.region_names() and north.backend_of("cn-east").port == 5001
    rules = Rules(tenant_regions={"acme": ["cn-east"]})
    P.check_region(CFG, rules, "acme", "cn-east")
    P.check_region(CFG, rules, "globex", "cn-north")
    with pytest.raises(InvalidRequest, match="allow only cn-east"):
        P.check_region(CFG, rules, "acme", "cn-north")
    with pytest.raises(InvalidRequest, match="not configured"):
        P.check_region(CFG, rules, "globex", "eu-west")
    single = Config()
    assert single.region_names() == ["default"] and P.backend_for(single, "default") is single.backend
    with pytest.raises(Exception, match="set either backend or regions"):
        Config.model_validate({"backend": {"port": 1}, "regions": {"a": {}}})
    with pytest.raises(Exception, match="not one of regions"):
        Config.model_validate({"regions": {"a": {}}, "placement": {"default_region": "b"}})
