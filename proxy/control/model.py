"""The control plane's values and errors: what the other control modules and the commands exchange.

No I/O here: dataclasses for operators, actors, grants and tenants, their converters from control-schema
rows, the errors every control request may raise, and the constants (roles, access, states).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Iterable

from .credentials import make_verifier
from .durations import format_duration

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
