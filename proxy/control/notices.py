"""Retention notices: scheduled at offboarding, sent once to the tenant's webhook, audited.

* **Contact** (``tenant_contacts``): one webhook URL per tenant, set by an
  approver (``tenantgate tenant contact T --webhook URL``), audited as
  ``tenant.contact``.
* **Schedule** (``retention_notices``): :func:`schedule_for` turns an
  offboarding into notices: ``offboarded`` (at offboarding, when
  ``lifecycle.notices.at_offboarding``) and ``days_before:N`` for each N of
  ``lifecycle.notices.days_before`` (30, 7, 1), due N days before the
  retention ends.  A "days before" notice whose time was already past at the
  offboarding is left out, except the final one (the smallest N), which is then
  due at once: the final notice always exists.  :func:`schedule` inserts the
  rows (idempotent; ``tenant offboard`` calls it, and so does every
  :func:`send_due` run, for tenants offboarded before notices existed).
* **Delivery** (:func:`send_due`, run by ``tenantgate notices send`` from a
  systemd timer or cron): each due, pending notice is claimed with ``FOR
  UPDATE SKIP LOCKED`` (two runs never send one notice twice), POSTed with
  :func:`proxy.lifecycle.webhook.deliver` (signed, retried with backoff within
  the run), and its state, attempts and last error are written back in the
  same transaction.  Every try of a run is recorded in the audit chain as
  ``tenant.notice`` with its delivery status.  A notice stays pending until it
  is delivered or has been tried ``max_attempts`` times over all runs (then
  ``failed``); a notice of an offboarding that no longer holds (the tenant was
  restored or purged) is ``cancelled``.
* **Purge gate** (:func:`final_notice_state`): ``tenant purge-expired`` does
  not purge a tenant whose final notice was not delivered, unless an approver
  forces it (``--force-undelivered T --as APPROVER``, audited).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable

from proxy.lifecycle.webhook import deliver

CONTACT_SET = "tenant.contact"
NOTICE = "tenant.notice"
NOTICE_SCHEDULED = "tenant.notice.scheduled"

OFFBOARDED = "offboarded"


def days_kind(days: int) -> str:
    return f"days_before:{days}"


@dataclass(frozen=True)
class PlannedNotice:
    kind: str
    due_at: datetime
    final: bool


def schedule_for(offboarded_at: datetime, retention_end: datetime, cfg) -> list[PlannedNotice]:
    """The notices of one offboarding (``cfg``: :class:`proxy.config.NoticesConfig`)."""
    out: list[PlannedNotice] = []
    if cfg.at_offboarding:
        out.append(PlannedNotice(OFFBOARDED, offboarded_at, False))
    days = sorted(set(cfg.days_before), reverse=True)
    for i, d in enumerate(days):
        final = i == len(days) - 1
        due = retention_end - timedelta(days=d)
        if due < offboarded_at:
            if not final:
                continue
            due = offboarded_at
        out.append(PlannedNotice(days_kind(d), due, final))
    if not any(n.final for n in out) and out:  # no days_before: the offboarding notice is the final one
        out[-1] = PlannedNotice(out[-1].kind, out[-1].due_at, True)
    return out


def _s(plane) -> str:
    return plane.s


async def schedule(plane, tenant, cfg) -> list[PlannedNotice]:
    """Insert the notices of ``tenant``'s current offboarding (idempotent); returns the new ones."""
    if tenant.status != "offboarded" or tenant.retention_end is None:
        return []
    planned = schedule_for(tenant.offboarded_at or tenant.updated_at, tenant.retention_end, cfg)
    added = []
    async with plane.pool.acquire() as conn:
        for n in planned:
            row = await conn.fetchrow(
                f"INSERT INTO {_s(plane)}.retention_notices (tenant, retention_end, kind, due_at, final) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING RETURNING kind",
                tenant.name, tenant.retention_end, n.kind, n.due_at, n.final)
            if row is not None:
                added.append(n)
    if added:
        from proxy.control.audit import AuditRecord

        await plane.append(AuditRecord(NOTICE_SCHEDULED, tenant=tenant.name, detail={
            "retention_end": tenant.retention_end.isoformat(),
            "notices": [{"kind": n.kind, "due_at": n.due_at.isoformat(), "final": n.final} for n in added]}))
    return added


async def set_contact(plane, tenant: str, webhook_url: str, actor_name: str) -> None:
    from proxy.control.audit import AuditRecord

    async with plane.pool.acquire() as conn:
        await conn.execute(
            f"INSERT INTO {_s(plane)}.tenant_contacts (tenant, webhook_url, updated_by) VALUES ($1, $2, $3) "
            "ON CONFLICT (tenant) DO UPDATE SET webhook_url = EXCLUDED.webhook_url, "
            "updated_by = EXCLUDED.updated_by, updated_at = now()", tenant, webhook_url, actor_name)
    await plane.append(AuditRecord(CONTACT_SET, tenant=tenant, operator=actor_name,
                                   detail={"webhook_url": webhook_url}))


async def get_contact(plane, tenant: str) -> str | None:
    async with plane.pool.acquire() as conn:
        return await conn.fetchval(f"SELECT webhook_url FROM {_s(plane)}.tenant_contacts WHERE tenant = $1", tenant)


async def list_notices(plane, tenant: str | None = None) -> list[dict]:
    async with plane.pool.acquire() as conn:
        rows = await conn.fetch(
            f"SELECT * FROM {_s(plane)}.retention_notices WHERE $1::text IS NULL OR tenant = $1 "
            "ORDER BY tenant, retention_end, due_at", tenant)
    return [dict(r) for r in rows]


async def final_notice_state(plane, tenant) -> tuple[bool, str]:
    """(delivered, what to say) for the final notice of ``tenant``'s current offboarding."""
    async with plane.pool.acquire() as conn:
        row = await conn.fetchrow(
            f"SELECT state, attempts, last_error, delivered_at FROM {_s(plane)}.retention_notices "
            "WHERE tenant = $1 AND retention_end = $2 AND final", tenant.name, tenant.retention_end)
    if row is None:
        return False, "its final retention notice was never scheduled"
    if row["state"] == "delivered":
        return True, f"final notice delivered at {row['delivered_at'].isoformat()}"
    return False, (f"its final retention notice is {row['state']} after {row['attempts']} attempt(s)"
                   + (f" (last error: {row['last_error']})" if row["last_error"] else ""))


def notice_id(tenant: str, retention_end: datetime, kind: str) -> str:
    return f"{tenant}/{retention_end.astimezone(timezone.utc).isoformat()}/{kind}"


def notice_body(row, tenant, now: datetime) -> dict:
    end = row["retention_end"]
    days_left = max(0, (end - now).days)
    return {
        "type": "tenantgate.retention_notice",
        "notice_id": notice_id(row["tenant"], end, row["kind"]),
        "tenant": row["tenant"],
        "kind": row["kind"],
        "final": row["final"],
        "offboarded_at": tenant.offboarded_at.isoformat() if tenant.offboarded_at else None,
        "retention_end": end.isoformat(),
        "days_left": days_left,
        "sent_at": now.isoformat(),
        "message": (f'The data of tenant "{row["tenant"]}" is kept until {end.isoformat()} and deleted after that. '
                    "It can still be read and exported (tenantgate export) until then."),
    }


_CLAIM = """
SELECT * FROM {s}.retention_notices
WHERE state = 'pending' AND due_at <= $1
  AND NOT EXISTS (SELECT 1 FROM unnest($2::text[], $3::text[], $4::timestamptz[]) AS x(t, k, e)
                  WHERE x.t = tenant AND x.k = kind AND x.e = retention_end)
ORDER BY due_at, tenant, kind
LIMIT 1
FOR UPDATE SKIP LOCKED
"""


async def send_due(plane, cfg, *, now: datetime | None = None, secret: str | None = None,
                   sleep: Callable[[float], None] = time.sleep) -> list[dict]:
    """Schedule what is missing, then send every due notice once; returns one result per notice tried."""
    from proxy.control.audit import AuditRecord

    if not secret:
        raise ValueError("lifecycle.notices.webhook_secret (or _env / _file) is not set: notices are sent signed only")
    now = now or datetime.now(timezone.utc)
    tenants = {t.name: t for t in await plane.list_tenants()}
    for t in tenants.values():
        await schedule(plane, t, cfg)
    results: list[dict] = []
    done: list[tuple[str, datetime, str]] = []
    while True:
        async with plane.pool.acquire() as conn:
            async with conn.transaction():
                # each notice is tried once per run (its retries happen inside deliver())
                row = await conn.fetchrow(_CLAIM.format(s=_s(plane)), now, [k[0] for k in done],
                                          [k[2] for k in done], [k[1] for k in done])
                if row is None:
                    break
                key = (row["tenant"], row["retention_end"], row["kind"])
                t = tenants.get(row["tenant"])
                result = {"tenant": row["tenant"], "kind": row["kind"], "final": row["final"],
                          "retention_end": row["retention_end"].isoformat()}
                if t is None or t.status != "offboarded" or t.retention_end != row["retention_end"]:
                    why = "the tenant is no longer offboarded with this retention end"
                    await conn.execute(
                        f"UPDATE {_s(plane)}.retention_notices SET state = 'cancelled', last_error = $4 "
                        "WHERE tenant = $1 AND retention_end = $2 AND kind = $3", *key, why)
                    result.update(status="cancelled", error=why)
                else:
                    url = await conn.fetchval(
                        f"SELECT webhook_url FROM {_s(plane)}.tenant_contacts WHERE tenant = $1", row["tenant"])
                    if url is None:
                        d = None
                        result.update(status="no_contact", attempts=0,
                                      error=f"no contact: tenantgate tenant contact {row['tenant']} --webhook URL")
                    else:
                        d = await asyncio.to_thread(
                            deliver, url, notice_body(row, t, datetime.now(timezone.utc)), secret,
                            notice_id=notice_id(*key), attempts=cfg.attempts_per_run, timeout_s=cfg.timeout_s,
                            backoff_initial_s=cfg.backoff_initial_s, backoff_max_s=cfg.backoff_max_s, sleep=sleep)
                        result.update(attempts=d.attempts, http_status=d.status, webhook_url=url)
                    attempts = row["attempts"] + (d.attempts if d else 0)
                    if d is not None and d.delivered:
                        state, err = "delivered", None
                    else:
                        err = result.get("error") or (d.error if d else None)
                        state = "failed" if attempts >= cfg.max_attempts else "pending"
                    result.setdefault("status", "delivered" if state == "delivered" else
                                      ("failed" if state == "failed" else "retrying"))
                    if err:
                        result["error"] = err
                    result["total_attempts"] = attempts
                    await conn.execute(
                        f"UPDATE {_s(plane)}.retention_notices SET state = $4, attempts = $5, last_error = $6, "
                        "last_attempt_at = now(), delivered_at = CASE WHEN $4 = 'delivered' THEN now() END "
                        "WHERE tenant = $1 AND retention_end = $2 AND kind = $3", *key, state, attempts, err)
        done.append(key)
        results.append(result)
        await plane.append(AuditRecord(NOTICE, tenant=result["tenant"], detail=result))
    return results

