"""The control plane: operators, just-in-time grants, the audit chain and tenant lifecycle.

Everything lives in the control schema (``schema.sql``) in PostgreSQL, so any
number of tenantgate instances and CLI invocations share it.  One
:class:`ControlPlane` per process::

    plane = ControlPlane.from_config(cfg)          # or ControlPlane(dsn, schema=...)
    await plane.start(install=True)                # pool; install the schema if missing
    ...
    await plane.close()                            # or: async with plane: ...

Who may do what (identities are always proven: :meth:`authenticate_actor`
checks the password and, when enrolled, a TOTP code that works once; it is
throttled, see :mod:`proxy.control.identities` and :mod:`proxy.control.throttle`):

* ``request_grant``: any enabled account (operator or approver role).
* ``approve_grant`` / ``deny_grant``: accounts with the ``approver`` role,
  never the requester (self-approval is impossible whatever the roles), nor
  an account made for or by the requester within the policy's account change
  window (:func:`proxy.control.accounts.entangled`); a grant becomes
  *approved* once it has the policy's ``approvals_required`` approvals; one
  deny denies it.
* ``revoke_grant``: the requester (giving access up) or any approver.
* accounts and the grant policy: change requests another approver approves
  (:mod:`proxy.control.accounts`); the platform admin (the holder of the
  control DSN) only bootstraps the first two approvers.

Grant states (Customer Lockbox): pending -> approved | denied | expired |
revoked; approved -> expired | revoked.  An approved grant runs for its
requested duration from the moment of approval.  The grant policy (maximum
duration, approvals required, pending TTL) is the control schema's
``grant_policy`` row (:mod:`proxy.control.grant_policy`), read when a grant
is requested and re-checked when it is approved; the config's ``grants.*``
only seed it at install.  Every state change and its audit record commit in
one transaction, and a trigger NOTIFYs all instances (see
:mod:`proxy.control.watcher`).

For the proxy: :meth:`bind_grant` at connect (raises
:class:`proxy.seam.SessionRefused`, SQLSTATE 28000, with instructions),
:meth:`append` / :meth:`complete` / :meth:`complete_nowait` for statement
audit (all wrapped by :mod:`proxy.control.operator_gate`), :meth:`watch` and
:meth:`watch_grant` to end sessions on expiry/revocation (call
``await plane.watcher()`` at server start so LISTEN is up before the first
operator connects), :class:`OperatorDirectory` as the operators'
:class:`proxy.seam.UserDirectory`.

For other commands: :meth:`authenticate_actor`, :meth:`active_grant_for`
(export/purge need a grant), the tenant methods (:meth:`register_tenant`,
:meth:`get_tenant`, :meth:`list_tenants`, :meth:`set_tenant_status`) and
:meth:`append` for their own audit records.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Sequence

import asyncpg

from proxy import metrics
from proxy.config import AuditConfig, Config, ConfigError, GrantsConfig, LifecycleConfig
from proxy.seam import Outcome, SessionRefused, UserRecord

from . import audit as A
from . import accounts as AC
from . import throttle as TH
from .credentials import make_verifier
from .grant_policy import read_policy, seed_policy
from .durations import format_duration, parse_duration
from .schema import check_schema_name, control_schema_installed, install_control_schema, notify_channel

log = logging.getLogger("tenantgate.control")

ROLES = ("operator", "approver")
ACCESS = ("read", "write")
GRANT_STATES = ("pending", "approved", "denied", "expired", "revoked")
TENANT_STATUSES = ("active", "offboarded", "purged")
PLATFORM_ADMIN = "platform-admin"
INVALID_AUTHORIZATION = "28000"
AUTH_FAILED_SQLSTATE = "28P01"  # invalid_password: what PostgreSQL says for a wrong password


# --------------------------------------------------------------------------- errors


class ControlError(Exception):
    """Base class: a control-plane request was refused or invalid."""


class AuthenticationFailed(ControlError):
    pass


class PermissionDenied(ControlError):
    pass


class NotFound(ControlError):
    pass


class InvalidRequest(ControlError):
    pass


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Operator:
    name: str
    roles: frozenset[str]
    totp_enrolled: bool
    enabled: bool
    created_at: datetime

    def to_json(self) -> dict:
        return {"name": self.name, "roles": sorted(self.roles), "totp_enrolled": self.totp_enrolled,
                "enabled": self.enabled, "created_at": self.created_at.isoformat()}


@dataclass(frozen=True)
class Actor:
    """A person whose identity was proven (or the platform admin holding the control DSN)."""

    name: str
    roles: frozenset[str]
    platform_admin: bool = False

    @property
    def is_approver(self) -> bool:
        return "approver" in self.roles


@dataclass(frozen=True)
class Approval:
    approver: str
    decision: str
    comment: str | None
    decided_at: datetime


@dataclass(frozen=True)
class Grant:
    id: int
    requester: str
    tenant: str
    access: str
    reason: str
    duration_s: int
    approvals_required: int
    state: str
    created_at: datetime
    pending_until: datetime
    approved_at: datetime | None
    expires_at: datetime | None
    ended_at: datetime | None
    ended_by: str | None
    end_reason: str | None
    approvals: tuple[Approval, ...] = ()

    def to_json(self) -> dict:
        iso = lambda d: d.isoformat() if d else None  # noqa: E731
        return {
            "id": self.id, "requester": self.requester, "tenant": self.tenant, "access": self.access,
            "reason": self.reason, "duration": format_duration(self.duration_s), "duration_s": self.duration_s,
            "approvals_required": self.approvals_required, "state": self.state,
            "created_at": iso(self.created_at), "pending_until": iso(self.pending_until),
            "approved_at": iso(self.approved_at), "expires_at": iso(self.expires_at),
            "ended_at": iso(self.ended_at), "ended_by": self.ended_by, "end_reason": self.end_reason,
            "approvals": [{"approver": a.approver, "decision": a.decision, "comment": a.comment,
                           "decided_at": iso(a.decided_at)} for a in self.approvals],
        }


@dataclass(frozen=True)
class ActiveGrant:
    """The grant an operator session is bound to."""

    id: int
    operator: str
    tenant: str
    access: str  # "read" | "write"
    expires_at: datetime
    reason: str

    @property
    def read_only(self) -> bool:
        return self.access == "read"


@dataclass(frozen=True)
class Tenant:
    name: str
    status: str
    created_at: datetime
    updated_at: datetime
    offboarded_at: datetime | None
    retention_end: datetime | None
    purged_at: datetime | None
    purge_started_at: datetime | None = None  # a purge began: no session of the tenant may run

    def to_json(self) -> dict:
        iso = lambda d: d.isoformat() if d else None  # noqa: E731
        return {"name": self.name, "status": self.status, "created_at": iso(self.created_at),
                "updated_at": iso(self.updated_at), "offboarded_at": iso(self.offboarded_at),
                "retention_end": iso(self.retention_end), "purged_at": iso(self.purged_at),
                "purge_started_at": iso(self.purge_started_at)}


def _grant(row, approvals: Iterable[Approval] = ()) -> Grant:
    return Grant(**{k: row[k] for k in Grant.__dataclass_fields__ if k != "approvals"}, approvals=tuple(approvals))


def _tenant(row) -> Tenant:
    return Tenant(**{k: row[k] for k in Tenant.__dataclass_fields__ if k in row})


def _operator(row) -> Operator:
    return Operator(row["name"], frozenset(row["roles"]), row["totp_secret"] is not None, row["enabled"],
                    row["created_at"])


_DUMMY: list[str] = []


def _dummy_verifier() -> str:
    if not _DUMMY:
        _DUMMY.append(make_verifier("tenantgate-no-such-operator"))
    return _DUMMY[0]


def request_hint(tenant: str | None = None) -> str:
    return ('Request one with: tenantgate grant request --tenant {} --access read --for 1h --reason "..." '
            "and have it approved by someone else.").format(tenant or "T")


# --------------------------------------------------------------------------- the plane

# Imported here, not at the top: identities.py uses the errors and values defined above.
from .identities import IdentityMethods  # noqa: E402


class ControlPlane(IdentityMethods):
    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "tenantgate_control",
        grants: GrantsConfig | None = None,
        audit: AuditConfig | None = None,
        lifecycle: LifecycleConfig | None = None,
        pool_max_size: int = 10,
    ):
        self.dsn = dsn
        self.schema = check_schema_name(schema)
        self.s = f'"{schema}"'
        self.channel = notify_channel(schema)
        self.grants_cfg = grants or GrantsConfig()
        self.audit_cfg = audit or AuditConfig()
        self.lifecycle_cfg = lifecycle or LifecycleConfig()
        # grants.* of the config only seed the control schema's grant_policy at first install
        parse_duration(self.grants_cfg.max_duration), parse_duration(self.grants_cfg.pending_ttl)
        self.pool_max_size = pool_max_size
        self.pool: asyncpg.Pool | None = None
        self.writer: A.AuditWriter | None = None
        self._watcher = None
        self._tx_audit: dict = {}  # connection -> records appended in its open transaction
        # async name -> bool | None: does a tenant table hold a row of it (proxy.control.tenants.data_probe).
        # Set by from_config; with it, grant requests for tenants neither registered nor in the data are refused.
        self.tenant_probe = None

    @classmethod
    def from_config(cls, cfg: Config, **kw) -> "ControlPlane":
        dsn = cfg.control.resolved_dsn()
        if not dsn:
            raise ConfigError("control.dsn (or control.dsn_env) is not set: the control plane needs it")
        from .tenants import data_probe

        plane = cls(dsn, schema=cfg.control.schema_, grants=cfg.grants, audit=cfg.audit,
                    lifecycle=cfg.lifecycle, **kw)
        plane.tenant_probe = data_probe(cfg)
        return plane

    # ---- lifecycle of the object

    async def connect(self) -> asyncpg.Connection:
        """A fresh connection to the control database (used for LISTEN)."""
        return await asyncpg.connect(self.dsn, server_settings=self._server_settings())

    def _server_settings(self) -> dict[str, str]:
        # Audit durability must not depend on the server's defaults.
        return {"synchronous_commit": "on", "lock_timeout": "5s", "application_name": "tenantgate-control"}

    async def start(self, *, install: bool = False) -> "ControlPlane":
        self.pool = await asyncpg.create_pool(
            self.dsn, min_size=1, max_size=self.pool_max_size, server_settings=self._server_settings()
        )
        async with self.pool.acquire() as conn:
            if not await control_schema_installed(conn, self.schema):
                if not install:
                    raise ConfigError(f"control schema {self.schema!r} is not installed "
                                      "(tenantgate operator add installs it, or install_control_schema())")
                await install_control_schema(conn, self.schema)
                await seed_policy(conn, self.s, self.grants_cfg)
            elif not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{self.s}.grant_policy"):
                await install_control_schema(conn, self.schema)  # upgrade to v2 (idempotent)
                await seed_policy(conn, self.s, self.grants_cfg)
        sink = A.JsonlSink(self.audit_cfg.jsonl_path) if self.audit_cfg.jsonl_path else None
        self.writer = A.AuditWriter(self.pool, self.schema, signer=A.signer_from_config(self.audit_cfg),
                                    checkpoint_every=self.audit_cfg.checkpoint_every, sink=sink,
                                    witness_file=self.audit_cfg.witness_file,
                                    checkpoint_interval_s=self.audit_cfg.checkpoint_interval_s)
        return self

    async def close(self) -> None:
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None
        if self.writer is not None:
            await self.writer.close()
        if self.pool is not None:
            await self.pool.close()

    async def __aenter__(self) -> "ControlPlane":
        if self.pool is None:
            await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- audit

    async def append(self, record: A.AuditRecord) -> int:
        """Durably append one audit record; returns its seq.  Raises AuditWriteError."""
        assert self.writer is not None, "ControlPlane.start() first"
        return await self.writer.append(record)

    async def complete(self, seq: int, outcome: Outcome, context: A.AuditRecord | None = None) -> int:
        """Append the outcome of the statement recorded at ``seq`` as its own chained record (durably)."""
        return await self.complete_nowait(seq, outcome, context)

    def complete_nowait(self, seq: int, outcome: Outcome, context: A.AuditRecord | None = None):
        """Queue the outcome record now; returns a future (its seq once committed).

        Because the queue is ordered, the outcome is committed no later than
        the next record this process appends, e.g. the session's next
        statement record: so it usually shares that statement's commit.
        """
        assert self.writer is not None, "ControlPlane.start() first"
        ctx = context or A.AuditRecord(type=A.OUTCOME)
        rec = A.AuditRecord(
            type=A.OUTCOME, operator=ctx.operator, grant_id=ctx.grant_id, tenant=ctx.tenant,
            client_addr=ctx.client_addr, session_id=ctx.session_id, ref_seq=seq,
            sqlstate=outcome.sqlstate, command_tag=outcome.command_tag, rows=outcome.rows,
            duration_us=int(round(outcome.duration_s * 1_000_000)),
            detail=getattr(outcome, "detail", None),
        )
        return self.writer.enqueue(rec)

    async def checkpoint(self) -> int | None:
        assert self.writer is not None
        return await self.writer.checkpoint()

    async def verify(self, *, witness=None, public_keys=None) -> A.VerifyReport:
        """Verify the chain (``public_keys``: default from the config; ``witness``: entries to check
        against, see proxy.control.witness)."""
        from .checkpoints import window_records

        keys = A.verify_keys_from_config(self.audit_cfg) if public_keys is None else public_keys
        cov = A.Coverage(window_records(self.audit_cfg), self.audit_cfg.checkpoint_window_s)
        async with self.pool.acquire() as conn:
            return await A.verify_chain(conn, self.schema, keys, coverage=cov, witness=witness)

    async def export(self, since: datetime | None = None, since_seq: int | None = None):
        """Async iterator of JSON lines (one audit record each), in chain order."""
        async with self.pool.acquire() as conn:
            async for line in A.export_records(conn, self.schema, since=since, since_seq=since_seq):
                yield line

    @asynccontextmanager
    async def _tx(self):
        """A pooled connection in a transaction; audit records added with :meth:`_in_tx_audit` commit
        with it (and reach the JSONL sink only after the commit)."""
        async with self.pool.acquire() as conn:
            committed: list = []
            signed: list = []
            self._tx_audit[conn] = (committed, signed)
            try:
                async with conn.transaction():
                    yield conn
            finally:
                self._tx_audit.pop(conn, None)
        for _, rec, _, _ in committed:
            metrics.AUDIT_RECORDS_TOTAL.labels(rec.type).inc()
        if self.writer.sink is not None and committed:
            self.writer.sink.write(committed)
        self.writer.after_commit(committed, signed)

    async def _in_tx_audit(self, conn, records: Sequence[A.AuditRecord]) -> None:
        """Append audit records inside the current :meth:`_tx` transaction (atomic with the change)."""
        committed, signed = self._tx_audit[conn]
        committed.extend(await A.chain_insert(conn, self.schema, records, signer=self.writer.signer,
                                              checkpoint_every=self.audit_cfg.checkpoint_every,
                                              checkpoints_out=signed))

    # ---- grants

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
        from .tenants import admit_grant_tenant, probe_unregistered

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

    # ---- tenants

    async def register_tenant(self, name: str, actor: Actor | None = None, *, source: str | None = None) -> Tenant:
        """Make ``name`` known as an active tenant (idempotent).  ``source="discovered"``: registered
        because its rows were found in the tenant tables (proxy.control.tenants)."""
        async with self._tx() as conn:
            row = await self._register_in_tx(conn, name, actor, source=source)
        return _tenant(row)

    async def _register_in_tx(self, conn, name: str, actor: Actor | None, *, source: str | None = None):
        row = await conn.fetchrow(
            f"INSERT INTO {self.s}.tenants (name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING *", name)
        if row is None:
            return await conn.fetchrow(f"SELECT * FROM {self.s}.tenants WHERE name = $1", name)
        d = {"status": "active", "event": "registered"}
        if source:
            d["source"] = source
        await self._in_tx_audit(conn, [A.AuditRecord(
            A.TENANT_STATUS, tenant=name, operator=actor.name if actor else None, detail=d)])
        return row

    async def get_tenant(self, name: str) -> Tenant | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(f"SELECT * FROM {self.s}.tenants WHERE name = $1", name)
        return _tenant(row) if row else None

    async def list_tenants(self) -> list[Tenant]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(f"SELECT * FROM {self.s}.tenants ORDER BY name")
        return [_tenant(r) for r in rows]

    async def set_tenant_status(self, name: str, status: str, *, retention_end: datetime | None = None,
                                actor: Actor | None = None, grant_id: int | None = None,
                                detail: dict | None = None) -> Tenant:
        """active | offboarded (retention_end defaults to now + lifecycle.retention_days) | purged.

        Purged is final.  The change and its audit record commit together; all
        instances are notified.
        """
        if status not in TENANT_STATUSES:
            raise InvalidRequest(f"tenant status must be one of {', '.join(TENANT_STATUSES)}")
        now = datetime.now(timezone.utc)
        async with self._tx() as conn:
            cur = await conn.fetchrow(f"SELECT * FROM {self.s}.tenants WHERE name = $1 FOR UPDATE", name)
            if cur is None:
                raise NotFound(f"tenant {name!r} is not registered")
            if cur["status"] == "purged" and status != "purged":
                raise InvalidRequest(f"tenant {name!r} has been purged; that cannot be undone")
            if status == "offboarded":
                end = retention_end or now + timedelta(days=self.lifecycle_cfg.retention_days)
                row = await conn.fetchrow(
                    f"UPDATE {self.s}.tenants SET status = 'offboarded', updated_at = now(), "
                    f"offboarded_at = coalesce(offboarded_at, now()), retention_end = $2 "
                    f"WHERE name = $1 RETURNING *", name, end)
            elif status == "active":
                row = await conn.fetchrow(
                    f"UPDATE {self.s}.tenants SET status = 'active', updated_at = now(), offboarded_at = NULL, "
                    f"retention_end = NULL, purge_started_at = NULL WHERE name = $1 RETURNING *", name)
            else:
                row = await conn.fetchrow(
                    f"UPDATE {self.s}.tenants SET status = 'purged', updated_at = now(), "
                    f"purged_at = coalesce(purged_at, now()) WHERE name = $1 RETURNING *", name)
            d = {"status": status, "was": cur["status"]}
            if row["retention_end"] is not None:
                d["retention_end"] = row["retention_end"].isoformat()
            if detail:
                d["detail"] = detail
            await self._in_tx_audit(conn, [A.AuditRecord(
                A.TENANT_STATUS, tenant=name, operator=actor.name if actor else None, grant_id=grant_id,
                detail=d)])
        return _tenant(row)

    async def tenant_state(self, name: str) -> tuple[str, datetime | None] | None:
        """(status, purge_started_at) read now from the control schema (None: not registered)."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(f"SELECT status, purge_started_at FROM {self.s}.tenants WHERE name = $1", name)
        return (row["status"], row["purge_started_at"]) if row else None

    async def mark_purge_started(self, name: str, *, actor: Actor | None = None, grant_id: int | None = None) -> Tenant:
        """Before a purge deletes anything: every instance ends the tenant's sessions (NOTIFY
        status 'purging') and accepts no new one; audited with the change."""
        async with self._tx() as conn:
            row = await conn.fetchrow(
                f"UPDATE {self.s}.tenants SET purge_started_at = coalesce(purge_started_at, now()), updated_at = now() "
                f"WHERE name = $1 RETURNING *", name)
            if row is None:
                raise NotFound(f"tenant {name!r} is not registered")
            await self._in_tx_audit(conn, [A.AuditRecord(
                A.TENANT_STATUS, tenant=name, operator=actor.name if actor else None, grant_id=grant_id,
                detail={"status": row["status"], "event": "purge started: sessions ended"})])
        return _tenant(row)

    # ---- watching (see proxy.control.watcher)

    async def watcher(self):
        """This process's :class:`~proxy.control.watcher.Watcher` (started on first use)."""
        if self._watcher is None:
            from .watcher import Watcher

            self._watcher = Watcher(self)
            await self._watcher.start()
        return self._watcher

    async def watch(self, on_grant_ended: Callable[[int, str], Any] | None = None,
                    on_tenant_changed: Callable[[str, str], Any] | None = None):
        """Call ``on_grant_ended(grant_id, reason)`` when any grant ends (revoked, expired, denied) and
        ``on_tenant_changed(name, status)`` on tenant status changes, across all instances.  Returns a
        subscription with ``.close()``."""
        w = await self.watcher()
        return w.subscribe(on_grant_ended, on_tenant_changed)

    async def watch_grant(self, grant: ActiveGrant, on_end: Callable[[int, str], Any]):
        """Call ``on_end(grant_id, reason)`` once when this grant expires (local timer) or is revoked
        (NOTIFY, or the periodic re-check).  Returns a handle with ``.cancel()``."""
        w = await self.watcher()
        return w.watch_grant(grant.id, grant.expires_at, on_end)


class OperatorDirectory:
    """:class:`proxy.seam.UserDirectory` over the control schema's operator accounts."""

    def __init__(self, plane: ControlPlane):
        self.plane = plane

    async def lookup(self, name: str) -> UserRecord | None:
        return await self.plane.user_record(name)
