"""Reviewing operator access after the fact: reproducible grant samples and reviewers' attestations.

``tenantgate audit sample --grants N --seed S`` draws N grants at random
from every grant that was ever approved (ids up to ``--max-grant-id``, which
defaults to the newest and is printed, so the same command draws the same
sample later), each with its approvals and every audit record made under it
(statements with their outcomes, sessions, exports).  The draw itself is
recorded in the audit chain (``audit.sample``), so a reviewer cannot quietly
redraw until a convenient sample comes up.

``tenantgate audit attest --grant ID --verdict legitimate|concern --note …``
records a reviewer's verdict (``audit.attest``) in the chain, naming the last
audit record of the grant the reviewer saw.  The reviewer proves who they are,
holds the approver role, and is independent of the grant: not its requester,
not one of its approvers, and not entangled with the requester (an account made
or changed by or for the other within the grant policy's account change window).
"""

from __future__ import annotations

import json
import random
import shlex

from . import accounts as AC
from .audit import AuditRecord
from .grant_policy import read_policy

SAMPLE = "audit.sample"
ATTEST = "audit.attest"
VERDICTS = ("legitimate", "concern")
MAX_SAMPLE = 1000


def _errors():
    from .model import InvalidRequest, NotFound, PermissionDenied

    return InvalidRequest, NotFound, PermissionDenied


def draw(ids: list[int], n: int, seed: str) -> list[int]:
    """The sample: the same ids, n and seed always give the same grants (Python's Random, seeded
    with the string, is stable across runs and versions)."""
    return sorted(random.Random(f"tenantgate-audit-sample:{seed}").sample(sorted(ids), min(n, len(ids))))


def _iso(d):
    return d.isoformat() if d else None


async def sample_grants(plane, n: int, seed: str, *, max_grant_id: int | None = None,
                        drawn_by: str | None = None) -> dict:
    InvalidRequest, _, _ = _errors()
    if not 1 <= n <= MAX_SAMPLE:
        raise InvalidRequest(f"--grants must be between 1 and {MAX_SAMPLE}")
    async with plane.pool.acquire() as conn:
        if max_grant_id is None:
            max_grant_id = await conn.fetchval(f"SELECT coalesce(max(id), 0) FROM {plane.s}.grants")
        ids = [r["id"] for r in await conn.fetch(
            f"SELECT id FROM {plane.s}.grants WHERE approved_at IS NOT NULL AND id <= $1 ORDER BY id", max_grant_id)]
    chosen = draw(ids, n, seed)
    grants = []
    for gid in chosen:  # one connection at a time (get_grant takes its own)
        g = await plane.get_grant(gid)
        async with plane.pool.acquire() as conn:
            records = await conn.fetch(
                f"SELECT seq, at, type, operator, session_id, statement_class, original_sql, rewritten_sql, params, "
                f"ref_seq, sqlstate, command_tag, rows, detail FROM {plane.s}.audit_log "
                f"WHERE grant_id = $1 ORDER BY seq", gid)
        grants.append({**g.to_json(), "records": [_record(r) for r in records]})
    doc = {"seed": seed, "requested": n, "max_grant_id": max_grant_id, "population": len(ids),
           "grant_ids": chosen, "grants": grants,
           "reproduce": f"tenantgate audit sample --grants {n} --seed {shlex.quote(seed)} --max-grant-id {max_grant_id}"}
    await plane.append(AuditRecord(SAMPLE, operator=drawn_by, detail={
        "seed": seed, "requested": n, "max_grant_id": max_grant_id, "population": len(ids), "grant_ids": chosen}))
    return doc


def _record(r) -> dict:
    out = {k: r[k] for k in ("seq", "type", "operator", "session_id", "statement_class", "original_sql",
                             "rewritten_sql", "ref_seq", "sqlstate", "command_tag", "rows") if r[k] is not None}
    out["at"] = _iso(r["at"])
    for k in ("params", "detail"):
        if r[k] is not None:
            try:
                out[k] = json.loads(r[k])
            except ValueError:
                out[k] = r[k]
    return out


async def attest(plane, actor, grant_id: int, verdict: str, note: str | None) -> dict:
    """Record a reviewer's verdict on one grant; returns the attestation (with its audit seq)."""
    InvalidRequest, NotFound, PermissionDenied = _errors()
    if verdict not in VERDICTS:
        raise InvalidRequest(f"--verdict must be one of {', '.join(VERDICTS)}")
    if verdict == "concern" and not (note and note.strip()):
        raise InvalidRequest("a concern needs a --note saying what is wrong")
    if actor.platform_admin or not actor.is_approver:
        raise PermissionDenied(f"{actor.name} may not attest grants (needs the approver role)")
    async with plane._tx() as conn:
        g = await conn.fetchrow(f"SELECT * FROM {plane.s}.grants WHERE id = $1", grant_id)
        if g is None:
            raise NotFound(f"grant {grant_id} does not exist")
        if g["requester"] == actor.name:
            raise PermissionDenied(f"{actor.name} requested grant {grant_id}: nobody attests their own grant")
        approvers = [r["approver"] for r in await conn.fetch(
            f"SELECT approver FROM {plane.s}.approvals WHERE grant_id = $1", grant_id)]
        if actor.name in approvers:
            raise PermissionDenied(f"{actor.name} decided on grant {grant_id}: an independent reviewer must attest it")
        why = await AC.entangled(conn, plane.s, await read_policy(conn, plane.s), actor.name, g["requester"])
        if why:
            raise PermissionDenied(why)
        through = await conn.fetchval(f"SELECT max(seq) FROM {plane.s}.audit_log WHERE grant_id = $1", grant_id)
        doc = {"grant_id": grant_id, "tenant": g["tenant"], "requester": g["requester"], "verdict": verdict,
               "note": note, "reviewer": actor.name, "reviewed_through_seq": through}
        await plane._in_tx_audit(conn, [AuditRecord(ATTEST, operator=actor.name, grant_id=grant_id,
                                                    tenant=g["tenant"], detail=doc)])
    return doc
