"""What the `tenantgate tenant` commands share: the acting person's context (:class:`_Ctx`: control
plane, authentication, grants, refusals into the audit chain), the lifecycle metrics, the audit record
types, and small helpers.  Used by :mod:`proxy.commands.tenant` and :mod:`proxy.commands.tenant_import`.
"""

from __future__ import annotations

import getpass
import json
import sys
from contextlib import asynccontextmanager
from datetime import datetime, timezone

from proxy.config import Config, load_config
from proxy.control.tenant_discovery import tenant_schema as _schema
from proxy.lifecycle.tables import (
    INSUFFICIENT_PRIVILEGE,
    INVALID_AUTHORIZATION,
    UNDEFINED_OBJECT,
    LifecycleError,
)


class _NoopMetric:
    def labels(self, *a, **k):
        return self

    def inc(self, *a, **k):
        pass

    def observe(self, *a, **k):
        pass


class _Metrics:
    """proxy.metrics' lifecycle counters; no-ops when the module cannot be imported."""

    def __init__(self):
        try:
            from proxy import metrics as m

            self.TENANT_EXPORTS_TOTAL = m.TENANT_EXPORTS_TOTAL
            self.TENANT_PURGES_TOTAL = m.TENANT_PURGES_TOTAL
            self.TENANT_PURGED_ROWS_TOTAL = m.TENANT_PURGED_ROWS_TOTAL
            self.TENANT_EXPORTED_ROWS_TOTAL = m.TENANT_EXPORTED_ROWS_TOTAL
            self.TENANT_EXPORT_SECONDS = m.TENANT_EXPORT_SECONDS
            self.TENANT_PURGE_SECONDS = m.TENANT_PURGE_SECONDS
        except Exception:  # e.g. a registry clash while the project is assembled: counting must not block purges
            self.TENANT_EXPORTS_TOTAL = self.TENANT_PURGES_TOTAL = self.TENANT_PURGED_ROWS_TOTAL = _NoopMetric()
            self.TENANT_EXPORTED_ROWS_TOTAL = self.TENANT_EXPORT_SECONDS = self.TENANT_PURGE_SECONDS = _NoopMetric()


metrics = _Metrics()

# audit record types written by this command
EXPORT = "tenant.export"
IMPORT = "tenant.import"
PURGE_STARTED = "tenant.purge.started"
PURGE_RECEIPT = "tenant.purge"  # detail = the deletion receipt
PURGE_FORCED = "tenant.purge.forced_undelivered"  # an approver purged without a delivered final notice
DONE = ".done"
FAILED = ".failed"
REFUSED = "tenant.refused"


def _control_error(e: Exception) -> LifecycleError:
    from proxy.control import model as P

    code = {
        P.AuthenticationFailed: "28P01",
        P.PermissionDenied: INSUFFICIENT_PRIVILEGE,
        P.NotFound: UNDEFINED_OBJECT,
        P.InvalidRequest: "22023",
    }.get(type(e), "XX000")
    return LifecycleError(code, str(e))


class _Ctx:
    def __init__(self, args, cfg: Config, plane):
        self.args = args
        self.cfg = cfg
        self.plane = plane
        self.actor = None

    async def audit(self, type_: str, **kw) -> int:
        from proxy.control.audit import AuditRecord

        return await self.plane.append(AuditRecord(type_, operator=self.actor.name if self.actor else kw.pop("operator", None), **kw))

    async def refuse(self, err: LifecycleError, tenant: str | None, action: str, name: str | None = None) -> LifecycleError:
        """Record a refused action in the audit chain (best effort), return the error to raise."""
        try:
            from proxy.control.audit import AuditRecord

            await self.plane.append(AuditRecord(
                REFUSED, operator=self.actor.name if self.actor else name, tenant=tenant, sqlstate=err.sqlstate,
                detail={"action": action, "message": err.message}))
        except Exception:
            pass
        return err

    async def authenticate(self, action: str, tenant: str | None):
        from proxy.control.model import ControlError

        name = self.args.as_
        if not name:
            raise await self.refuse(LifecycleError(INVALID_AUTHORIZATION, f"{action} needs the acting person: --as NAME"), tenant, action)
        if self.args.password_stdin:
            password = sys.stdin.readline().rstrip("\n")
        elif sys.stdin.isatty():
            password = getpass.getpass(f"Password for {name}: ")
        else:
            raise LifecycleError(INVALID_AUTHORIZATION, "no terminal for the password prompt: use --password-stdin")
        try:
            self.actor = await self.plane.authenticate_actor(name, password, self.args.totp)
        except ControlError as e:  # the plane audits failed authentications itself
            raise _control_error(e)
        return self.actor

    async def tenant(self, name: str, action: str):
        """The registered tenant; one found in the data is registered first (audited), else 42704."""
        from proxy.control.tenant_discovery import data_connection, tenant_in_data, unknown_tenant_message

        t = await self.plane.get_tenant(name)
        if t is not None:
            return t
        async with data_connection(self.cfg) as conn:
            found = await tenant_in_data(conn, await _schema(self.cfg, conn), name)
        if not found:
            msg, hint = unknown_tenant_message(name, found)
            raise await self.refuse(LifecycleError(UNDEFINED_OBJECT, msg, hint=hint), name, action)
        return await self.plane.register_tenant(name, self.actor, source="discovered")

    async def grant(self, tenant: str, access: str, action: str):
        from proxy.control.model import ControlError

        try:
            return await self.plane.active_grant_for(self.actor, tenant, access, self.args.grant)
        except ControlError as e:
            raise await self.refuse(_control_error(e), tenant, action)

    async def require_approver(self, tenant: str, action: str) -> None:
        if not self.actor.is_approver:
            raise await self.refuse(
                LifecycleError(INSUFFICIENT_PRIVILEGE, f"{self.actor.name} may not {action} tenants (needs the approver role)"),
                tenant, action)


@asynccontextmanager
async def _context(args):
    from proxy.control.plane import ControlPlane

    cfg = load_config(args.config)
    plane = ControlPlane.from_config(cfg, pool_max_size=2)
    await plane.start()
    try:
        yield _Ctx(args, cfg, plane)
    finally:
        await plane.close()


def _data(cfg: Config):
    from proxy.control.tenant_discovery import data_connection

    return data_connection(cfg)


def _print_json(doc) -> None:
    print(json.dumps(doc, indent=2, ensure_ascii=False, default=str))


def _iso(d: datetime | None) -> str:
    return d.astimezone(timezone.utc).isoformat(timespec="seconds") if d else "-"


async def _pending(cfg: Config) -> list[str]:
    from proxy.lifecycle.purge import pending_purges

    async with _data(cfg) as conn:
        return await pending_purges(conn, cfg.lifecycle.journal_schema)


def _format_error(e: BaseException) -> str:
    if isinstance(e, LifecycleError):
        return str(e)
    sqlstate = getattr(e, "sqlstate", None)
    if sqlstate:
        return f"ERROR:  {e} (SQLSTATE {sqlstate})"
    return f"ERROR:  {e}"
