"""Gauges read from the control schema: tenants by lifecycle status, grants, overdue purges.

:func:`publish_control_stats` runs one small query (a handful of aggregates
over ``tenants`` and the live part of ``grants``) and sets:

* ``tenantgate_active_grants``: approved, unexpired grants;
* ``tenantgate_oldest_active_grant_age_seconds``: since the oldest of them was approved;
* ``tenantgate_tenants{status}``: tenants per lifecycle status (active, offboarded, purged);
* ``tenantgate_tenants_purge_overdue``: offboarded tenants whose retention ended, not purged yet;
* ``tenantgate_tenants_purge_overdue_seconds``: how long the longest-overdue one has waited;
* ``tenantgate_control_stats_timestamp_seconds``: when this was read;

and counts the exports and purges the audit chain recorded since the last call (:class:`AuditTail`).

The grant watcher (:mod:`proxy.control.watcher`) calls it on its recheck
tick (every second), so the gauges are never more than a few seconds old.
"""

from __future__ import annotations

import json
import time

from proxy import metrics

TENANT_STATUSES = ("active", "offboarded", "purged")


def stats_sql(schema: str) -> str:
    """The query; ``schema`` is the quoted control schema name."""
    return f"""
SELECT
  (SELECT coalesce(json_object_agg(status, n), '{{}}')
     FROM (SELECT status, count(*) AS n FROM {schema}.tenants GROUP BY status) AS t) AS tenants,
  (SELECT count(*) FROM {schema}.grants
    WHERE state = 'approved' AND expires_at > now()) AS active_grants,
  (SELECT coalesce(extract(epoch FROM now() - min(coalesce(approved_at, created_at))), 0)::float8
     FROM {schema}.grants WHERE state = 'approved' AND expires_at > now()) AS oldest_grant_age,
  (SELECT count(*) FROM {schema}.tenants
    WHERE status = 'offboarded' AND retention_end <= now()) AS purge_overdue,
  (SELECT coalesce(extract(epoch FROM now() - min(retention_end)), 0)::float8 FROM {schema}.tenants
    WHERE status = 'offboarded' AND retention_end <= now()) AS purge_overdue_age
"""


async def read_control_stats(plane) -> dict:
    async with plane.pool.acquire() as conn:
        row = await conn.fetchrow(stats_sql(plane.s))
    tenants = row["tenants"]
    if isinstance(tenants, str):
        tenants = json.loads(tenants)
    return {
        "tenants": {s: int(tenants.get(s, 0)) for s in (*TENANT_STATUSES, *tenants)},
        "active_grants": int(row["active_grants"]),
        "oldest_grant_age": float(row["oldest_grant_age"]),
        "purge_overdue": int(row["purge_overdue"]),
        "purge_overdue_age": float(row["purge_overdue_age"]),
    }


# ---- tenant exports and purges, from the audit chain --------------------------------------------

#: audit record types of finished exports and purges (written by `tenantgate tenant ...`)
EXPORT_DONE, EXPORT_FAILED = "tenant.export.done", "tenant.export.failed"
PURGE_DONE, PURGE_FAILED = "tenant.purge", "tenant.purge.failed"
LIFECYCLE_TYPES = (EXPORT_DONE, EXPORT_FAILED, PURGE_DONE, PURGE_FAILED)


class AuditTail:
    """Counts the exports and purges recorded in the audit chain since this process started.

    Exports and purges run in their own CLI processes (a CronJob, a timer, an admin's shell),
    which Prometheus does not scrape; the audit chain records every one of them, so the proxy
    reports them: ``tenantgate_tenant_exports_total``, ``tenantgate_tenant_exported_rows_total``,
    ``tenantgate_tenant_export_seconds``, ``tenantgate_tenant_purges_total``,
    ``tenantgate_tenant_purged_rows_total`` and ``tenantgate_tenant_purge_seconds``.
    Each poll reads only the records appended since the last one (by ``seq``, up to the chain's
    head).  Every tenantgate instance sees every event: aggregate instances with ``max``, not
    ``sum``.  With worker processes only worker 0 polls (``enabled``).
    """

    def __init__(self) -> None:
        self.enabled = True
        self.last_seq: int | None = None

    async def poll(self, plane) -> int:
        """Count the new lifecycle records; returns how many were counted."""
        if not self.enabled:
            return 0
        async with plane.pool.acquire() as conn:
            head = await conn.fetchval(f"SELECT seq FROM {plane.s}.audit_head")
            if head is None:
                return 0
            if self.last_seq is None or head < self.last_seq:  # first poll (or a new chain): start here
                self.last_seq = head
                return 0
            if head == self.last_seq:
                return 0
            rows = await conn.fetch(
                f"SELECT type, rows, duration_us, detail FROM {plane.s}.audit_log "
                "WHERE seq > $1 AND seq <= $2 AND type = ANY($3::text[]) ORDER BY seq",
                self.last_seq, head, list(LIFECYCLE_TYPES))
        self.last_seq = head
        for r in rows:
            count_lifecycle_record(r["type"], r["rows"], r["duration_us"], r["detail"])
        return len(rows)


def _purge_seconds(detail) -> float | None:
    from datetime import datetime

    try:
        receipt = json.loads(detail) if isinstance(detail, str) else detail
        started = datetime.fromisoformat(receipt["started_at"])
        finished = datetime.fromisoformat(receipt["finished_at"])
        return max(0.0, (finished - started).total_seconds())
    except (TypeError, ValueError, KeyError):
        return None


def count_lifecycle_record(type_: str, rows, duration_us, detail) -> None:
    if type_ == EXPORT_DONE:
        metrics.TENANT_EXPORTS_TOTAL.labels("ok").inc()
        metrics.TENANT_EXPORTED_ROWS_TOTAL.inc(rows or 0)
        if duration_us is not None:
            metrics.TENANT_EXPORT_SECONDS.observe(duration_us / 1e6)
    elif type_ == EXPORT_FAILED:
        metrics.TENANT_EXPORTS_TOTAL.labels("error").inc()
    elif type_ == PURGE_DONE:
        metrics.TENANT_PURGES_TOTAL.labels("ok").inc()
        metrics.TENANT_PURGED_ROWS_TOTAL.inc(rows or 0)
        took = _purge_seconds(detail)
        if took is not None:
            metrics.TENANT_PURGE_SECONDS.observe(took)
    elif type_ == PURGE_FAILED:
        metrics.TENANT_PURGES_TOTAL.labels("error").inc()


#: the process's tail of the audit chain (proxy.workers turns it off in workers other than 0)
AUDIT_TAIL = AuditTail()


async def publish_control_stats(plane) -> dict:
    """Read the stats and set the gauges (and count new exports and purges); returns what was read."""
    await AUDIT_TAIL.poll(plane)
    stats = await read_control_stats(plane)
    metrics.ACTIVE_GRANTS.set(stats["active_grants"])
    metrics.OLDEST_ACTIVE_GRANT_AGE_SECONDS.set(stats["oldest_grant_age"])
    for status, n in stats["tenants"].items():
        metrics.TENANTS.labels(status=status).set(n)
    metrics.TENANTS_PURGE_OVERDUE.set(stats["purge_overdue"])
    metrics.TENANTS_PURGE_OVERDUE_SECONDS.set(stats["purge_overdue_age"])
    metrics.CONTROL_STATS_TIMESTAMP.set(time.time())
    return stats
