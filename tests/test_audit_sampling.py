"""`tenantgate audit sample` and `audit attest` end to end, on the demo (real proxy, psql, the CLI).

An operator works under a grant through the proxy; the sample (same seed,
same sample) shows the grant with the statements the proxy audited; an
independent approver's verdict is recorded in the chain, while the requester
and the grant's own approver cannot attest it.
"""

from __future__ import annotations

import json
import secrets

import pytest

from support.operators import demo_tenantgate, pg_options, psql_once
from proxy.control.sampling import draw


@pytest.fixture(scope="module")
def tg(demo):  # noqa: F811
    return demo_tenantgate(demo)


def test_draw_is_reproducible_and_seed_dependent():
    ids = list(range(1, 200))
    assert draw(ids, 5, "q4") == draw(list(reversed(ids)), 5, "q4")
    assert draw(ids, 5, "q4") != draw(ids, 5, "q3")
    assert draw(ids, 500, "x") == ids  # asking for more than exist: all of them
    assert draw([], 3, "x") == []


def test_sample_shows_statements_and_attest_records_an_independent_verdict(demo, tg):  # noqa: F811
    marker = f"sample_{secrets.token_hex(4)}"
    g = tg.active_grant("alice", "acme", "read")  # approved by bob
    r = psql_once(demo.operator("alice"), "-c", f"SELECT count(*) AS {marker} FROM customers",
                  options=pg_options(g["id"]))
    assert r.returncode == 0, r.stderr

    first = tg.ok("audit", "sample", "--grants", "3", "--seed", "review-1")
    again = tg.ok("audit", "sample", "--grants", "3", "--seed", "review-1",
                  "--max-grant-id", str(first["max_grant_id"]))
    assert again["grant_ids"] == first["grant_ids"] and len(first["grant_ids"]) == min(3, first["population"])
    assert first["max_grant_id"] >= g["id"]

    every = tg.ok("audit", "sample", "--grants", "1000", "--seed", "all")
    mine = next(x for x in every["grants"] if x["id"] == g["id"])
    assert mine["requester"] == "alice" and [a["approver"] for a in mine["approvals"]] == ["bob"]
    statements = [x for x in mine["records"] if x["type"] == "statement"]
    assert any(marker in (x.get("original_sql") or "") for x in statements), mine["records"]
    outcomes = [x for x in mine["records"] if x["type"] == "statement.outcome"]
    assert outcomes and all(x["ref_seq"] for x in outcomes)
    r = tg.run("audit", "sample", "--grants", "1000", "--seed", "all", "--max-grant-id", str(g["id"]))
    assert r.returncode == 0 and marker in r.stdout and f"attest --grant {g['id']}" in r.stdout

    # who may attest: an approver independent of the grant
    r = tg.run("audit", "attest", "--grant", str(g["id"]), "--verdict", "legitimate", actor="alice")
    assert r.returncode == 1 and "approver role" in r.stderr
    r = tg.run("audit", "attest", "--grant", str(g["id"]), "--verdict", "legitimate", actor="bob")
    assert r.returncode == 1 and "independent reviewer" in r.stderr
    r = tg.run("audit", "attest", "--grant", str(g["id"]), "--verdict", "concern", actor="carol")
    assert r.returncode == 1 and "needs a --note" in r.stderr
    own = tg.active_grant("carol", "globex", "read")  # carol's own grant (approved by bob)
    r = tg.run("audit", "attest", "--grant", str(own["id"]), "--verdict", "legitimate", actor="carol")
    assert r.returncode == 1 and "nobody attests their own grant" in r.stderr
    done = tg.ok("audit", "attest", "--grant", str(g["id"]), "--verdict", "legitimate",
                 "--note", f"{marker}: count only, matches the ticket", actor="carol")
    assert done["verdict"] == "legitimate" and done["reviewer"] == "carol"
    assert done["reviewed_through_seq"] >= max(x["seq"] for x in mine["records"])

    records = tg.export(1)
    attests = [x for x in records if x["type"] == "audit.attest" and x["grant_id"] == g["id"]]
    assert len(attests) == 1 and attests[0]["operator"] == "carol"
    detail = attests[0]["detail"] if isinstance(attests[0]["detail"], dict) else json.loads(attests[0]["detail"])
    assert detail["verdict"] == "legitimate" and marker in detail["note"]
    samples = [x for x in records if x["type"] == "audit.sample"]
    assert len(samples) >= 4  # every draw is on the record
    for rid in (g["id"], own["id"]):
        tg.revoke(rid)
    r = tg.verify()
    assert r.returncode == 0, r.stdout + r.stderr
