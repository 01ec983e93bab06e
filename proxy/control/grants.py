"""The grant workflow (Customer Lockbox): request, approve, deny, revoke, expire, and binding a session.

Mixed into :class:`~proxy.control.plane.ControlPlane`, which provides ``pool``, ``s``, ``_tx``,
``_in_tx_audit`` and ``_op_row``.  Every state change and its audit record commit in one transaction.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from proxy import metrics
from proxy.seam import SessionRefused

from . import accounts as AC
from . import audit as A
from . import throttle as TH
from .durations import format_duration, parse_duration
from .grant_policy import read_policy
from .model import (
    ACCESS,
    AUTH_FAILED_SQLSTATE,
    INVALID_AUTHORIZATION,
    ActiveGrant,
    Actor,
    Approval,
    Grant,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    _grant,
    request_hint,
)
from .tenant_discovery import admit_grant_tenant, probe_unregistered


class GrantMethods:
    async def _grant_row(self, conn, grant_id: int, *, lock: bool = False):
        return await conn.fetchrow(
            f"SELECT * FROM {self.s}.grants WHERE id = $1" + (" FOR UPDATE" if lock else ""), grant_id)

    async def _approvals(self, conn, grant_id: int) -> list[Approval]:
        rows = await conn.fetch(
            f"SELECT approver, decision, comment, decided_at FROM {self.s}.approvals WHERE grant_id = $1 "
            f"ORDER BY decided_at", grant_id)
        return [Approval(**dict(r)) for r in rows]

    async def get_grant(self, grant_id: int) -> Grant:
        async with self.pool.acquire() as conn:
            row = await self._grant_row(conn, grant_id)
            if row is None:
                raise NotFound(f"grant {grant_id} does not exist")
            return _grant(row, await self._approvals(conn, grant_id))

    async def list_grants(self, *, state: str | None = None, requester: str | None = None,
                          tenant: str | None = None, limit: int = 100) -> list[Grant]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT * FROM {self.s}.grants WHERE ($1::text IS NULL OR state = $1) "
                f"AND ($2::text IS NULL OR requester = $2) AND ($3::text IS NULL OR tenant = $3) "
                f"ORDER BY id DESC LIMIT $4", state, requester, tenant, limit)
        return [_grant(r) for r in rows]

    async def request_grant(self, actor: Actor, tenant: str, access: str, duration: timedelta | str,
                            reason: str) -> Grant:
        if actor.platform_admin:
            raise PermissionDenied("grants are requested by a person: use --as NAME")
        if access not in ACCESS:
            raise InvalidRequest(f"access must be read or write, not {access!r}")
        if not reason or not reason.strip():
            raise InvalidRequest("a reason is required (e.g. the ticket: --reason \"TICKET-123: ...\")")
        if not tenant or not tenant.strip():
            raise InvalidRequest("a tenant is required")
        if isinstance(duration, str):
            try:
                duration = parse_duration(duration)
            except ValueError as e:
                raise InvalidRequest(str(e))
        if duration.total_seconds() <= 0:
            raise InvalidRequest("the duration must be positive")
        if duration.total_seconds() > 2**31 - 1:
            raise InvalidRequest(f"the duration {format_duration(duration)} is out of range")
        in_data = await probe_unregistered(self, tenant)
        async with self._tx() as conn:
            # the policy of the control schema, not of the requester's config file
            policy = await read_policy(conn, self.s)
            if duration.total_seconds() > policy.max_duration_s:
                raise InvalidRequest(f"the duration {format_duration(duration)} exceeds the grant policy's maximum "
                                     f"{format_duration(policy.max_duration_s)} (tenantgate grant policy show)")
            await admit_grant_tenant(self, conn, tenant, access, actor, in_data)
            row = await conn.fetchrow(
                f"INSERT INTO {self.s}.grants (requester, tenant, access, reason, duration_s, approvals_required, "
                f"pending_until) VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7)) RETURNING *",
                actor.name, tenant, access, reason.strip(), int(duration.total_seconds()),
                policy.approvals_required, policy.pending_ttl_s,
            )
            await self._in_tx_audit(conn, [A.AuditRecord(
                A.GRANT_REQUESTED, operator=actor.name, grant_id=row["id"], tenant=tenant,
                detail={"access": access, "duration_s": row["duration_s"], "reason": row["reason"],
                        "approvals_required": row["approvals_required"]})])
        metrics.GRANT_EVENTS_TOTAL.labels("requested").inc()
        return _grant(row)

    async def _pending_for_decision(self, conn, actor: Actor, grant_id: int):
        row = await self._grant_row(conn, grant_id, lock=True)
        if row is None:
            raise NotFound(f"grant {grant_id} does not exist")
        if row["state"] == "pending" and row["pending_until"] <= datetime.now(timezone.utc):
            return row, "expired"
        if row["state"] != "pending":
            raise InvalidRequest(f"grant {grant_id} is {row['state']}, not pending")
        if row["requester"] == actor.name:
            raise PermissionDenied(f"self-approval is not allowed: grant {grant_id} was requested by {actor.name}; "
                                   "another approver must decide")
        if actor.platform_admin or not actor.is_approver:
            raise PermissionDenied(f"{actor.name} does not have the approver role")
        prior = await conn.fetchval(
            f"SELECT decision FROM {self.s}.approvals WHERE grant_id = $1 AND approver = $2", grant_id, actor.name)
        if prior is not None:
            raise InvalidRequest(f"{actor.name} has already decided on grant {grant_id} ({prior})")
        return row, None

    async def _recheck_policy(self, conn, actor: Actor, row):
        """At approval: the current grant policy applies, whatever it was when the grant was requested.

        Returns the grant row with ``approvals_required`` raised to the policy's when that is higher."""
        policy = await read_policy(conn, self.s, lock=True)
        if row["duration_s"] > policy.max_duration_s:
            raise PermissionDenied(
                f"grant {row['id']} asks for {format_duration(row['duration_s'])}, more than the grant policy's "
                f"maximum {format_duration(policy.max_duration_s)}: deny it and have a shorter one requested")
        why = await AC.entangled(conn, self.s, policy, actor.name, row["requester"])
        if why:
            raise PermissionDenied(why)
        if policy.approvals_required > row["approvals_required"]:
            row = await conn.fetchrow(f"UPDATE {self.s}.grants SET approvals_required = $2 WHERE id = $1 "
                                      f"RETURNING *", row["id"], policy.approvals_required)
        return row

    async def approve_grant(self, actor: Actor, grant_id: int, comment: str | None = None) -> Grant:
        async with self._tx() as conn:
            row, expired = await self._pending_for_decision(conn, actor, grant_id)
            if not expired:
                row = await self._recheck_policy(conn, actor, row)
                await conn.execute(
                    f"INSERT INTO {self.s}.approvals (grant_id, approver, decision, comment) "
                    f"VALUES ($1, $2, 'approve', $3)", grant_id, actor.name, comment)
                n = await conn.fetchval(
                    f"SELECT count(*) FROM {self.s}.approvals WHERE grant_id = $1 AND decision = 'approve'",
                    grant_id)
                recs = [A.AuditRecord(A.GRANT_APPROVAL, operator=actor.name, grant_id=grant_id,
                                      tenant=row["tenant"],
                                      detail={"approvals": n, "required": row["approvals_required"],
                                              "comment": comment})]
                if n >= row["approvals_required"]:
                    row = await conn.fetchrow(
                        f"UPDATE {self.s}.grants SET state = 'approved', approved_at = now(), "
                        f"expires_at = now() + make_interval(secs => duration_s) WHERE id = $1 RETURNING *",
                        grant_id)
                    recs.append(A.AuditRecord(A.GRANT_APPROVED, operator=actor.name, grant_id=grant_id,
                                              tenant=row["tenant"],
                                              detail={"requester": row["requester"], "access": row["access"],
                                                      "expires_at": row["expires_at"].isoformat()}))
                await self._in_tx_audit(conn, recs)
        if expired:
            await self.expire_due()
            raise InvalidRequest(f"grant {grant_id} expired unanswered")
        metrics.GRANT_EVENTS_TOTAL.labels("approved" if row["state"] == "approved" else "approval").inc()
        return await self.get_grant(grant_id)

    async def deny_grant(self, actor: Actor, grant_id: int, comment: str | None = None) -> Grant:
        async with self._tx() as conn:
            row, expired = await self._pending_for_decision(conn, actor, grant_id)
            if not expired:
                await conn.execute(
                    f"INSERT INTO {self.s}.approvals (grant_id, approver, decision, comment) "
                    f"VALUES ($1, $2, 'deny', $3)", grant_id, actor.name, comment)
                await conn.execute(
                    f"UPDATE {self.s}.grants SET state = 'denied', ended_at = now(), ended_by = $2, "
                    f"end_reason = $3 WHERE id = $1", grant_id, actor.name, comment)
                await self._in_tx_audit(conn, [A.AuditRecord(
                    A.GRANT_DENIED, operator=actor.name, grant_id=grant_id, tenant=row["tenant"],
                    detail={"comment": comment})])
        if expired:
            await self.expire_due()
            raise InvalidRequest(f"grant {grant_id} expired unanswered")
        metrics.GRANT_EVENTS_TOTAL.labels("denied").inc()
        return await self.get_grant(grant_id)

    async def revoke_grant(self, actor: Actor, grant_id: int, reason: str | None = None) -> Grant:
        await self.expire_due()  # a grant whose time is up is expired, not revoked
        async with self._tx() as conn:
            row = await self._grant_row(conn, grant_id, lock=True)
            if row is None:
                raise NotFound(f"grant {grant_id} does not exist")
            if not (actor.name == row["requester"] or actor.is_approver or actor.platform_admin):
                raise PermissionDenied(f"{actor.name} may not revoke grant {grant_id} "
                                       "(only its requester or an approver)")
            if row["state"] not in ("pending", "approved"):
                raise InvalidRequest(f"grant {grant_id} is already {row['state']}")
            await conn.execute(
                f"UPDATE {self.s}.grants SET state = 'revoked', ended_at = now(), ended_by = $2, end_reason = $3 "
                f"WHERE id = $1", grant_id, actor.name, reason)
            await self._in_tx_audit(conn, [A.AuditRecord(
                A.GRANT_REVOKED, operator=actor.name, grant_id=grant_id, tenant=row["tenant"],
                detail={"reason": reason, "was": row["state"]})])
        metrics.GRANT_EVENTS_TOTAL.labels("revoked").inc()
        return await self.get_grant(grant_id)

    async def expire_due(self) -> list[Grant]:
        """Expire elapsed approved grants and unanswered pending ones (safe to run on every instance)."""
        async with self._tx() as conn:
            rows = await conn.fetch(
                f"UPDATE {self.s}.grants SET state = 'expired', ended_at = now(), "
                f"end_reason = CASE state WHEN 'pending' THEN 'unanswered' ELSE 'elapsed' END "
                f"WHERE (state = 'approved' AND expires_at <= now()) "
                f"   OR (state = 'pending' AND pending_until <= now()) RETURNING *")
            if rows:
                await self._in_tx_audit(conn, [A.AuditRecord(
                    A.GRANT_EXPIRED, grant_id=r["id"], tenant=r["tenant"], operator=r["requester"],
                    detail={"why": r["end_reason"]}) for r in rows])
        for _ in rows:
            metrics.GRANT_EVENTS_TOTAL.labels("expired").inc()
        return [_grant(r) for r in rows]

    async def count_active_grants(self) -> int:
        async with self.pool.acquire() as conn:
            return await conn.fetchval(
                f"SELECT count(*) FROM {self.s}.grants WHERE state = 'approved' AND expires_at > now()")

    async def bind_grant(self, operator_name: str, grant_id: int | None = None,
                         totp_code: str | None = None) -> ActiveGrant:
        """The grant an operator session runs under, or SessionRefused (28000) saying how to get one.

        The operator's password has already been checked by the proxy's SCRAM
        exchange; here the account must be enabled, the TOTP code (startup
        option ``tenantgate.totp``) must be current when enrolled, and the grant
        (``tenantgate.grant``, or the only active one) must be approved, unexpired,
        requested by this operator, for a tenant that is not purged.
        """
        def refuse(msg: str, hint: str | None = None) -> SessionRefused:
            # The instructions go into the message itself: every client shows the message.
            return SessionRefused(INVALID_AUTHORIZATION, f"{msg}. {hint}" if hint else msg, hint=None)

        async with self.pool.acquire() as conn:
            op = await self._op_row(conn, operator_name)
            if op is None or not op["enabled"]:
                raise refuse(f'operator "{operator_name}" is not enabled in tenantgate')
            if op["totp_secret"] is not None and not await TH.consume_totp(
                    conn, self.s, operator_name, op["totp_secret"], totp_code):
                # the same error as a wrong password: a guesser learns nothing about which one was wrong
                raise SessionRefused(AUTH_FAILED_SQLSTATE,
                                     f'password authentication failed for user "{operator_name}"')
            rows = await conn.fetch(
                f"SELECT g.*, t.status AS tenant_status, t.purge_started_at FROM {self.s}.grants g "
                f"LEFT JOIN {self.s}.tenants t ON t.name = g.tenant "
                f"WHERE g.requester = $1 AND g.state = 'approved' AND g.expires_at > now() "
                f"AND ($2::bigint IS NULL OR g.id = $2) ORDER BY g.id", operator_name, grant_id)
            if grant_id is not None and not rows:
                g = await self._grant_row(conn, grant_id)
                if g is None or g["requester"] != operator_name:
                    raise refuse(f"grant {grant_id} does not exist for operator \"{operator_name}\"",
                                 hint=request_hint())
                state = "expired" if g["state"] == "approved" else g["state"]
                if state == "pending":
                    raise refuse(f"grant {grant_id} is pending, not active yet",
                                 hint=f"Ask an approver to approve it: tenantgate grant approve {grant_id}")
                raise refuse(f"grant {grant_id} is {state}, not active", hint=request_hint(g["tenant"]))
        if not rows:
            async with self.pool.acquire() as conn:
                pending = await conn.fetch(
                    f"SELECT id FROM {self.s}.grants WHERE requester = $1 AND state = 'pending' ORDER BY id",
                    operator_name)
            if pending:
                ids = ", ".join(str(r["id"]) for r in pending)
                raise refuse(f'operator "{operator_name}" has no active grant: grant {ids} is pending',
                             hint=f"Ask an approver to approve it: tenantgate grant approve {pending[0]['id']} "
                                  f"(for another tenant: tenantgate grant request --tenant T ...)")
            raise refuse(f'operator "{operator_name}" has no active grant', hint=request_hint())
        if len(rows) > 1:
            ids = ", ".join(str(r["id"]) for r in rows)
            raise refuse(f'operator "{operator_name}" has several active grants ({ids}): choose one',
                         hint="Pass it as a startup option: PGOPTIONS='-c tenantgate.grant=ID' psql ...")
        r = rows[0]
        if r["tenant_status"] == "purged":
            raise refuse(f"tenant \"{r['tenant']}\" has been purged")
        if r["purge_started_at"] is not None:
            raise refuse(f"tenant \"{r['tenant']}\" is being purged: its sessions were ended")
        return ActiveGrant(r["id"], operator_name, r["tenant"], r["access"], r["expires_at"], r["reason"])

    async def active_grant_for(self, actor: Actor, tenant: str, access: str,
                               grant_id: int | None = None) -> ActiveGrant:
        """For privileged commands (export, purge): the actor's active grant on ``tenant`` with at least
        ``access`` ("write" covers "read").  Raises PermissionDenied with instructions."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                f"SELECT * FROM {self.s}.grants WHERE requester = $1 AND tenant = $2 AND state = 'approved' "
                f"AND expires_at > now() AND ($3::bigint IS NULL OR id = $3) "
                f"AND (access = 'write' OR $4 = 'read') ORDER BY id DESC", actor.name, tenant, grant_id, access)
        if not rows:
            raise PermissionDenied(
                f"{actor.name} has no active {access} grant on tenant {tenant!r}. "
                f'Request one with: tenantgate grant request --tenant {tenant} --access {access} --for 1h '
                f'--reason "..."')
        r = rows[0]
        return ActiveGrant(r["id"], actor.name, r["tenant"], r["access"], r["expires_at"], r["reason"])
