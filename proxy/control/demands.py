"""Third-party demands: an authority asks for one tenant's data.

The workflow (``tenantgate demand …``, docs/operator-access.md):

1. **register** (approver role): tenant, authority, reference, optional gag
   date.  The demand gets a *signed demand record* (Ed25519, the audit key;
   ``tenantgate receipt verify`` checks it offline) and a pending *tenant
   notice* due at registration, or when the gag ends.
2. **request** a *disclosure grant* bound to the demand: read-only, export
   only (never a psql session: it lives in its own table, so
   :meth:`ControlPlane.bind_grant` never sees it), for a limited time.
3. **approve**: at least two approvers besides the requester
   (``max(2, grant policy approvals_required)``).  The two-person rule of
   grants holds and is stricter: the requester never approves; approvers are
   distinct accounts; and no approver may be *entangled* with the requester
   or with another approver of the same grant (an account made or changed by
   or for the other within the policy's account change window,
   :func:`proxy.control.accounts.entangled`): distinct persons, not just
   accounts.  One deny denies it.
4. **export** under the approved grant, by its requester, once: the export's
   signed manifest names the demand and the grant (``disclosure``); the grant
   becomes ``used``.
5. **notices**: :func:`deliver_due` sends every notice whose time has come
   through :func:`notify_tenant` (``tenantgate demand notify-due``, run it
   from cron like ``tenant purge-expired``); registration tries at once when
   there is no gag.

Every step is in the audit chain, in the same transaction as the change it
records; the CLI (proxy/commands/demand.py) records refusals as ``demand.refused``.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone
from typing import Callable

from . import accounts as AC
from .audit import AuditRecord
from .durations import format_duration, parse_duration
from .grant_policy import read_policy

DEMAND_RECORD_TYPE = "tenant_demand_record"
NOTICE_TYPE = "tenant_demand_notice"
MIN_APPROVALS = 2

REGISTERED = "demand.registered"
GRANT_REQUESTED = "demand.grant.requested"
GRANT_APPROVAL = "demand.grant.approval"
GRANT_APPROVED = "demand.grant.approved"
GRANT_DENIED = "demand.grant.denied"
EXPORT = "demand.export"
NOTICE_SENT = "demand.notice.sent"
NOTICE_FAILED = "demand.notice.failed"


def _errors():
    from .model import InvalidRequest, NotFound, PermissionDenied

    return InvalidRequest, NotFound, PermissionDenied


async def ensure_schema(plane) -> None:
    """Install the rights tables on a control schema installed before them (idempotent)."""
    from .schema import install_control_schema

    async with plane.pool.acquire() as conn:
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{plane.s}.demand_notices"):
            await install_control_schema(conn, plane.schema)


def parse_gag(value: str | None, now: datetime | None = None) -> datetime | None:
    """``--gag-until``: an ISO date or time (UTC when no zone is given), in the future."""
    InvalidRequest, _, _ = _errors()
    if value is None:
        return None
    try:
        d = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"--gag-until {value!r}: use an ISO date or time, e.g. 2027-03-01 or 2027-03-01T12:00Z")
    if d.tzinfo is None:
        d = d.replace(tzinfo=timezone.utc)
    if d <= (now or datetime.now(timezone.utc)):
        raise InvalidRequest(f"--gag-until {value}: the gag must end in the future")
    return d


def _iso(d: datetime | None) -> str | None:
    return d.astimezone(timezone.utc).isoformat() if d else None


# --------------------------------------------------------------------------- register


async def register_demand(plane, actor, tenant: str, authority: str, reference: str,
                          gag_until: datetime | None, signer=None) -> dict:
    """Record a demand (approver role); returns its signed demand record."""
    InvalidRequest, NotFound, PermissionDenied = _errors()
    if actor.platform_admin or not actor.is_approver:
        raise PermissionDenied(f"{actor.name} may not register demands (needs the approver role)")
    if not authority or not authority.strip() or not reference or not reference.strip():
        raise InvalidRequest("a demand needs the authority and its reference")
    if await plane.get_tenant(tenant) is None:
        raise NotFound(f"tenant {tenant!r} is not registered")
    await ensure_schema(plane)
    async with plane._tx() as conn:
        row = await conn.fetchrow(
            f"INSERT INTO {plane.s}.demands (tenant, authority, reference, gag_until, registered_by) "
            f"VALUES ($1, $2, $3, $4, $5) RETURNING *", tenant, authority.strip(), reference.strip(), gag_until,
            actor.name)
        doc = {"type": DEMAND_RECORD_TYPE, "demand_id": row["id"], "tenant": tenant, "authority": row["authority"],
               "reference": row["reference"], "gag_until": _iso(gag_until), "registered_by": actor.name,
               "registered_at": _iso(row["registered_at"]),
               "disclosure_rule": f"read-only export under a disclosure grant approved by at least {MIN_APPROVALS} "
                                  "approvers besides its requester"}
        if signer is not None:
            from proxy.signing import sign_document

            doc = sign_document(doc, signer)
        await conn.execute(f"UPDATE {plane.s}.demands SET record = $2::jsonb WHERE id = $1", row["id"],
                           json.dumps(doc))
        notice = await conn.fetchrow(
            f"INSERT INTO {plane.s}.demand_notices (demand_id, tenant, due_at) VALUES ($1, $2, coalesce($3, now())) "
            f"RETURNING *", row["id"], tenant, gag_until)
        await plane._in_tx_audit(conn, [AuditRecord(
            REGISTERED, operator=actor.name, tenant=tenant,
            detail={"record": doc, "notice_id": notice["id"], "notice_due": _iso(notice["due_at"])})])
    return doc


# --------------------------------------------------------------------------- disclosure grants


async def _expire(plane, conn) -> None:
    rows = await conn.fetch(
        f"UPDATE {plane.s}.disclosure_grants SET state = 'expired', ended_at = now() "
        f"WHERE (state = 'approved' AND expires_at <= now()) OR (state = 'pending' AND pending_until <= now()) "
        f"RETURNING id, demand_id, tenant, requester")
    if rows:
        await plane._in_tx_audit(conn, [AuditRecord(
            "demand.grant.expired", operator=r["requester"], tenant=r["tenant"],
            detail={"disclosure_grant": r["id"], "demand": r["demand_id"]}) for r in rows])


async def request_disclosure(plane, actor, demand_id: int, duration: str | timedelta, reason: str) -> dict:
    InvalidRequest, NotFound, PermissionDenied = _errors()
    if actor.platform_admin:
        raise PermissionDenied("disclosure grants are requested by a person: use --as NAME")
    if not reason or not reason.strip():
        raise InvalidRequest("a reason is required")
    try:
        d = parse_duration(duration) if isinstance(duration, str) else duration
    except ValueError as e:
        raise InvalidRequest(str(e))
    if d.total_seconds() <= 0:
        raise InvalidRequest("the duration must be positive")
    await ensure_schema(plane)
    async with plane._tx() as conn:
        demand = await conn.fetchrow(f"SELECT * FROM {plane.s}.demands WHERE id = $1", demand_id)
        if demand is None:
            raise NotFound(f"demand {demand_id} does not exist")
        policy = await read_policy(conn, plane.s)
        if d.total_seconds() > policy.max_duration_s:
            raise InvalidRequest(f"the duration {format_duration(d)} exceeds the grant policy's maximum "
                                 f"{format_duration(policy.max_duration_s)}")
        row = await conn.fetchrow(
            f"INSERT INTO {plane.s}.disclosure_grants (demand_id, tenant, requester, reason, duration_s, "
            f"approvals_required, pending_until) VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7)) "
            f"RETURNING *", demand_id, demand["tenant"], actor.name, reason.strip(), int(d.total_seconds()),
            max(MIN_APPROVALS, policy.approvals_required), policy.pending_ttl_s)
        await plane._in_tx_audit(conn, [AuditRecord(
            GRANT_REQUESTED, operator=actor.name, tenant=demand["tenant"],
            detail={"disclosure_grant": row["id"], "demand": demand_id, "access": "read (export only)",
                    "duration_s": row["duration_s"], "reason": row["reason"],
                    "approvals_required": row["approvals_required"]})])
    return _grant_json(row, [])


async def decide_disclosure(plane, actor, grant_id: int, approve: bool, comment: str | None = None) -> dict:
    """One approver's decision; the grant is approved when it has ``approvals_required`` approvals."""
    InvalidRequest, NotFound, PermissionDenied = _errors()
    await ensure_schema(plane)
    async with plane._tx() as conn:
        await _expire(plane, conn)
    async with plane._tx() as conn:
        row = await conn.fetchrow(f"SELECT * FROM {plane.s}.disclosure_grants WHERE id = $1 FOR UPDATE", grant_id)
        if row is None:
            raise NotFound(f"disclosure grant {grant_id} does not exist")
        if row["state"] != "pending":
            raise InvalidRequest(f"disclosure grant {grant_id} is {row['state']}, not pending")
        if row["requester"] == actor.name:
            raise PermissionDenied(f"self-approval is not allowed: disclosure grant {grant_id} was requested by "
                                   f"{actor.name}; two other approvers must decide")
        if actor.platform_admin or not actor.is_approver:
            raise PermissionDenied(f"{actor.name} does not have the approver role")
        prior = await conn.fetch(f"SELECT approver, decision FROM {plane.s}.disclosure_approvals WHERE grant_id = $1",
                                 grant_id)
        if any(p["approver"] == actor.name for p in prior):
            raise InvalidRequest(f"{actor.name} has already decided on disclosure grant {grant_id}")
        policy = await read_policy(conn, plane.s, lock=True)
        if approve:
            # distinct persons: not entangled with the requester, nor with another approver (either way)
            why = await AC.entangled(conn, plane.s, policy, actor.name, row["requester"])
            for p in prior:
                why = why or await AC.entangled(conn, plane.s, policy, actor.name, p["approver"]) \
                    or await AC.entangled(conn, plane.s, policy, p["approver"], actor.name)
            if why:
                raise PermissionDenied(why)
        await conn.execute(
            f"INSERT INTO {plane.s}.disclosure_approvals (grant_id, approver, decision, comment) VALUES ($1, $2, $3, $4)",
            grant_id, actor.name, "approve" if approve else "deny", comment)
        ref = {"disclosure_grant": grant_id, "demand": row["demand_id"], "comment": comment}
        if not approve:
            row = await conn.fetchrow(f"UPDATE {plane.s}.disclosure_grants SET state = 'denied', ended_at = now() "
                                      f"WHERE id = $1 RETURNING *", grant_id)
            recs = [AuditRecord(GRANT_DENIED, operator=actor.name, tenant=row["tenant"], detail=ref)]
        else:
            n = 1 + sum(1 for p in prior if p["decision"] == "approve")
            recs = [AuditRecord(GRANT_APPROVAL, operator=actor.name, tenant=row["tenant"],
                                detail={**ref, "approvals": n, "required": row["approvals_required"]})]
            if n >= row["approvals_required"]:
                row = await conn.fetchrow(
                    f"UPDATE {plane.s}.disclosure_grants SET state = 'approved', approved_at = now(), "
                    f"expires_at = now() + make_interval(secs => duration_s) WHERE id = $1 RETURNING *", grant_id)
                recs.append(AuditRecord(GRANT_APPROVED, operator=actor.name, tenant=row["tenant"],
                                        detail={**ref, "requester": row["requester"],
                                                "expires_at": _iso(row["expires_at"])}))
        await plane._in_tx_audit(conn, recs)
        approvals = await _approvals(plane, conn, grant_id)
    return _grant_json(row, approvals)


async def disclosure_grant_for(plane, actor, demand_id: int, grant_id: int | None = None) -> dict:
    """The actor's approved, unexpired, unused disclosure grant for the demand; else PermissionDenied."""
    _, NotFound, PermissionDenied = _errors()
    await ensure_schema(plane)
    async with plane._tx() as conn:
        await _expire(plane, conn)
        demand = await conn.fetchrow(f"SELECT * FROM {plane.s}.demands WHERE id = $1", demand_id)
        if demand is None:
            raise NotFound(f"demand {demand_id} does not exist")
        row = await conn.fetchrow(
            f"SELECT * FROM {plane.s}.disclosure_grants WHERE demand_id = $1 AND requester = $2 AND state = 'approved' "
            f"AND expires_at > now() AND ($3::bigint IS NULL OR id = $3) ORDER BY id DESC LIMIT 1",
            demand_id, actor.name, grant_id)
    if row is None:
        raise PermissionDenied(
            f"{actor.name} has no approved disclosure grant for demand {demand_id}: request one with "
            f"tenantgate demand request {demand_id} --for 1h --reason \"...\" and have two other approvers approve it")
    return {"grant": dict(row), "demand": dict(demand)}


async def mark_used(plane, actor, grant_id: int, detail: dict) -> None:
    async with plane._tx() as conn:
        row = await conn.fetchrow(f"UPDATE {plane.s}.disclosure_grants SET state = 'used', ended_at = now() "
                                  f"WHERE id = $1 AND state = 'approved' RETURNING *", grant_id)
        if row is None:
            InvalidRequest, _, _ = _errors()
            raise InvalidRequest(f"disclosure grant {grant_id} is no longer approved")
        await plane._in_tx_audit(conn, [AuditRecord(
            EXPORT + ".done", operator=actor.name, tenant=row["tenant"], rows=detail.get("total_rows"),
            detail={"disclosure_grant": grant_id, "demand": row["demand_id"], **detail})])


async def _approvals(plane, conn, grant_id: int) -> list[dict]:
    rows = await conn.fetch(f"SELECT approver, decision, comment, decided_at FROM {plane.s}.disclosure_approvals "
                            f"WHERE grant_id = $1 ORDER BY decided_at", grant_id)
    return [{"approver": r["approver"], "decision": r["decision"], "comment": r["comment"],
             "decided_at": _iso(r["decided_at"])} for r in rows]


def _grant_json(row, approvals: list[dict]) -> dict:
    return {"id": row["id"], "demand_id": row["demand_id"], "tenant": row["tenant"], "requester": row["requester"],
            "access": "read (export only)", "reason": row["reason"], "duration": format_duration(row["duration_s"]),
            "approvals_required": row["approvals_required"], "state": row["state"],
            "created_at": _iso(row["created_at"]), "pending_until": _iso(row["pending_until"]),
            "approved_at": _iso(row["approved_at"]), "expires_at": _iso(row["expires_at"]),
            "ended_at": _iso(row["ended_at"]), "approvals": approvals}


# --------------------------------------------------------------------------- listing


async def list_demands(plane, tenant: str | None = None) -> list[dict]:
    await ensure_schema(plane)
    async with plane._tx() as conn:
        await _expire(plane, conn)
        demands = await conn.fetch(f"SELECT * FROM {plane.s}.demands WHERE ($1::text IS NULL OR tenant = $1) "
                                   f"ORDER BY id", tenant)
        out = []
        for d in demands:
            grants = [_grant_json(g, await _approvals(plane, conn, g["id"])) for g in await conn.fetch(
                f"SELECT * FROM {plane.s}.disclosure_grants WHERE demand_id = $1 ORDER BY id", d["id"])]
            notices = await conn.fetch(f"SELECT * FROM {plane.s}.demand_notices WHERE demand_id = $1 ORDER BY id",
                                       d["id"])
            states = [g["state"] for g in grants]
            state = ("disclosed" if "used" in states else "disclosure approved" if "approved" in states
                     else "disclosure pending" if "pending" in states else "open")
            out.append({"id": d["id"], "tenant": d["tenant"], "authority": d["authority"],
                        "reference": d["reference"], "gag_until": _iso(d["gag_until"]),
                        "registered_by": d["registered_by"], "registered_at": _iso(d["registered_at"]),
                        "state": state, "grants": grants,
                        "notices": [{"id": n["id"], "state": n["state"], "due_at": _iso(n["due_at"]),
                                     "sent_at": _iso(n["sent_at"]), "attempts": n["attempts"],
                                     "last_error": n["last_error"]} for n in notices]})
    return out


# --------------------------------------------------------------------------- tenant notices


def notify_tenant(notice: dict, *, url: str | None, secret: str | None = None, timeout_s: float = 10.0) -> None:
    """Deliver one tenant notice: POST it as JSON to ``url`` ("{tenant}" replaced by the URL-quoted
    tenant id).  Raises on any failure (the notice then stays pending and is retried).

    With a webhook secret (``lifecycle.notices.webhook_secret``) the notice goes out as the
    retention notices do: HMAC-signed, with retries and backoff (proxy/lifecycle/webhook.py)."""
    if not url:
        raise RuntimeError("no notice URL is configured (lifecycle.demand_notice_url)")
    target = url.replace("{tenant}", urllib.parse.quote(notice["tenant"], safe=""))
    if urllib.parse.urlsplit(target).scheme not in ("http", "https"):
        raise RuntimeError(f"notice URL {target!r} is not http(s)")
    if secret:
        from proxy.lifecycle.webhook import deliver

        result = deliver(target, notice, secret, notice_id=f"demand-{notice.get('demand_id')}", timeout_s=timeout_s)
        if not result.delivered:
            raise RuntimeError(result.error or f"HTTP {result.status}")
        return
    req = urllib.request.Request(target, data=json.dumps(notice, sort_keys=True).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 (scheme checked above)
        if not 200 <= resp.status < 300:
            raise RuntimeError(f"HTTP {resp.status}")


async def deliver_due(plane, *, url: str | None, secret: str | None = None,
                      deliver: Callable[..., None] = notify_tenant) -> list[dict]:
    """Send every pending notice whose time has come; each result is audited.  Returns the results.

    A notice goes to the tenant's contact webhook (``tenantgate tenant contact``) when it has one,
    else to ``url`` (``lifecycle.demand_notice_url``)."""
    from proxy.control.notices import get_contact

    await ensure_schema(plane)
    results = []
    async with plane.pool.acquire() as conn:
        due = await conn.fetch(
            f"SELECT n.*, d.record, d.authority, d.reference, d.gag_until, d.registered_at FROM {plane.s}.demand_notices n "
            f"JOIN {plane.s}.demands d ON d.id = n.demand_id WHERE n.state = 'pending' AND n.due_at <= now() "
            f"ORDER BY n.id")
    for n in due:
        notice = {"type": NOTICE_TYPE, "tenant": n["tenant"], "demand_id": n["demand_id"],
                  "authority": n["authority"], "reference": n["reference"], "gag_until": _iso(n["gag_until"]),
                  "registered_at": _iso(n["registered_at"]),
                  "record": json.loads(n["record"]) if n["record"] else None}
        error = None
        try:
            target = await get_contact(plane, n["tenant"]) or url
            if secret:
                await asyncio.to_thread(deliver, notice, url=target, secret=secret)
            else:
                await asyncio.to_thread(deliver, notice, url=target)
        except Exception as e:  # delivery failures are recorded, the notice stays pending
            error = str(e) or type(e).__name__
        async with plane._tx() as conn:
            if error is None:
                await conn.execute(f"UPDATE {plane.s}.demand_notices SET state = 'sent', sent_at = now(), "
                                   f"attempts = attempts + 1, last_error = NULL WHERE id = $1", n["id"])
            else:
                await conn.execute(f"UPDATE {plane.s}.demand_notices SET attempts = attempts + 1, last_error = $2 "
                                   f"WHERE id = $1", n["id"], error[:500])
            await plane._in_tx_audit(conn, [AuditRecord(
                NOTICE_SENT if error is None else NOTICE_FAILED, tenant=n["tenant"],
                detail={"notice_id": n["id"], "demand": n["demand_id"], "error": error})])
        results.append({"notice_id": n["id"], "demand_id": n["demand_id"], "tenant": n["tenant"],
                        "sent": error is None, "error": error})
    return results
