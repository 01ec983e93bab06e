"""The pass-through policy: every statement is forwarded unchanged.

This is issue 2's policy and what the bare-proxy tests use (users with
``passthrough: true``).  By default only PASSTHROUGH users may open sessions;
``allow_all=True`` lets every registered user through (the demo before tenant
rewriting exists).
"""

from __future__ import annotations

from typing import Callable, Sequence

from proxy.admin_console import refuse_admin_outside_console
from proxy.config import Config
from proxy.seam import (
    Decision,
    Forward,
    Origin,
    Outcome,
    Refuse,
    SessionKind,
    SessionRefused,
    StartupInfo,
    UserRecord,
)
from proxy.users import ConfigUserDirectory


class PassthroughGate:
    """A SessionGate that forwards everything and audits nothing."""

    audited = False
    # proxy.seam.PooledGate: a tenant-kind passthrough gate may be transaction-pooled (tests' bare proxy);
    # it keeps no settings of its own on the connection
    pooled = False
    tenant_epoch = 0
    tracked_parameters: tuple[str, ...] = ()

    def __init__(self, kind: SessionKind = SessionKind.PASSTHROUGH, backend_setup_sql: Sequence[str] = ()):
        self.kind = kind
        self.backend_setup_sql = tuple(backend_setup_sql)
        self.terminate: Callable[[str, str], None] | None = None
        self.closed = False

    def check(self, sql: str, origin: Origin) -> Decision:
        return Forward(sql)

    def on_ready_for_query(self, tx_status: bytes) -> None:
        pass

    async def audit_before(self, decision: Forward, params) -> None:  # pragma: no cover - never audited
        return None

    async def audit_after(self, handle, outcome: Outcome) -> None:  # pragma: no cover
        pass

    def backend_settings(self) -> dict[str, str]:
        return {}

    def warm_up(self, sql: str, origin: Origin):
        return None  # nothing to analyse

    def on_refused(self, sql: str, refusal: Refuse) -> None:
        pass

    def set_terminator(self, terminate: Callable[[str, str], None]) -> None:
        self.terminate = terminate

    async def close(self) -> None:
        self.closed = True


class PassthroughGatekeeper:
    """A Gatekeeper whose sessions forward every statement unchanged."""

    def __init__(self, config: Config, *, allow_all: bool = False):
        self.users = ConfigUserDirectory.from_config(config)
        self.allow_all = allow_all
        self.admin_database = config.admin.database

    def reload(self, config: Config) -> None:
        self.users.replace(config.users)
        self.admin_database = config.admin.database

    async def open_session(self, user: UserRecord, startup: StartupInfo) -> PassthroughGate:
        refuse_admin_outside_console(user, self.admin_database)  # admin users reach only the admin console
        if user.kind is not SessionKind.PASSTHROUGH and not self.allow_all:
            raise SessionRefused(
                "28000",
                f"user \"{user.name}\" has no policy: this tenantgate runs without a policy engine",
                hint="only users with passthrough: true can connect",
            )
        return PassthroughGate(user.kind)
