"""The control plane: operators, just-in-time grants, the audit chain and tenant lifecycle.

This module holds the pool, the transactions (:meth:`ControlPlane._tx`, audit records committed with
the change) and the audit façade; the parts are mixed in: :mod:`proxy.control.operators` (accounts and
identities), :mod:`proxy.control.grants` (the grant workflow), :mod:`proxy.control.tenant_status`; the
values and errors are in :mod:`proxy.control.model`.

Everything lives in the control schema (``schema.sql``) in PostgreSQL, so any
number of tenantgate instances and CLI invocations share it.  One
:class:`ControlPlane` per process::

    plane = ControlPlane.from_config(cfg)          # or ControlPlane(dsn, schema=...)
    await plane.start(install=True)                # pool; install the schema if missing
    ...
    await plane.close()                            # or: async with plane: ...

Who may do what (identities are always proven: :meth:`authenticate_actor`
checks the password and, when enrolled, a TOTP code that works once; it is
throttled, see :mod:`proxy.control.operators` and :mod:`proxy.control.throttle`):

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
from datetime import datetime
from typing import Any, Callable, Sequence

import asyncpg

from proxy import metrics
from proxy.config import AuditConfig, Config, ConfigError, GrantsConfig, LifecycleConfig
from proxy.seam import Outcome

from . import audit as A
from .audit_verify import Coverage, VerifyReport, verify_chain
from .checkpoints import window_records
from .durations import parse_duration
from .grant_policy import seed_policy
from .grants import GrantMethods
from .model import ActiveGrant
from .operators import OperatorMethods
from .schema import check_schema_name, control_schema_installed, install_control_schema, notify_channel
from .tenant_status import TenantStatusMethods
from .tenant_discovery import data_probe
from .watcher import Watcher

log = logging.getLogger("tenantgate.control")


class ControlPlane(OperatorMethods, GrantMethods, TenantStatusMethods):
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
        # async name -> bool | None: does a tenant table hold a row of it (proxy.control.tenant_discovery.data_probe).
        # Set by from_config; with it, grant requests for tenants neither registered nor in the data are refused.
        self.tenant_probe = None

    @classmethod
    def from_config(cls, cfg: Config, **kw) -> "ControlPlane":
        dsn = cfg.control.resolved_dsn()
        if not dsn:
            raise ConfigError("control.dsn (or control.dsn_env) is not set: the control plane needs it")
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

    async def verify(self, *, witness=None, public_keys=None) -> VerifyReport:
        """Verify the chain (``public_keys``: default from the config; ``witness``: entries to check
        against, see proxy.control.witness)."""
        keys = A.verify_keys_from_config(self.audit_cfg) if public_keys is None else public_keys
        cov = Coverage(window_records(self.audit_cfg), self.audit_cfg.checkpoint_window_s)
        async with self.pool.acquire() as conn:
            return await verify_chain(conn, self.schema, keys, coverage=cov, witness=witness)

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

    # ---- watching (see proxy.control.watcher)

    async def watcher(self):
        """This process's :class:`~proxy.control.watcher.Watcher` (started on first use)."""
        if self._watcher is None:
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
