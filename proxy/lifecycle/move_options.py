"""What a tenant move (:mod:`proxy.lifecycle.move`) is given: the tenant's tables, the hooks into
the control plane (hold, release, flip, audit) and the timing options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

from proxy.lifecycle.purge import PurgeOptions


@dataclass
class TableSpec:
    """Which tables are the tenant's (the rules file: proxy/policy/rules.py)."""

    tenant_column: str = "tenant_id"
    schemas: Sequence[str] = ("public",)
    tables: Sequence[str] | None = None  # None: every table in ``schemas`` with the tenant column


async def _noop(*_a, **_k) -> None:
    return None


@dataclass
class MoveHooks:
    hold: Callable[[], Awaitable[None]] = _noop  # hold the tenant everywhere; returns when in-flight work ended
    release: Callable[[], Awaitable[None]] = _noop
    flip: Callable[[object], Awaitable[None]] = _noop  # flip the placement, given the control transaction's conn
    audit: Callable[[str, dict], Awaitable[None]] = _noop  # (record type, detail) into the audit chain
    progress: Callable[[str], None] = lambda _msg: None
    record_receipt: Callable[[dict], Awaitable[None]] | None = None  # the source purge's deletion receipt
    # test hook: awaited after a step is recorded (a test kills the move there)
    after_step: Callable[[str], Awaitable[None]] = _noop


@dataclass
class MoveOptions:
    poll_s: float = 0.2
    sync_timeout_s: float = 3600.0  # initial copy and catch-up
    sync_lag_bytes: int = 1 << 20  # catch-up is done when the subscription is this close to the source
    hold_timeout_s: float = 10.0  # in-flight transactions of the tenant must end within this
    catchup_timeout_s: float = 30.0  # under the hold: the target must confirm the source's LSN within this
    source_conninfo: str | None = None  # how the target server reaches the source (default: the source DSN)
    purge_unverified: bool = False  # purge the source although the checksums at the flip were not compared equal
    purge: PurgeOptions = field(default_factory=PurgeOptions)
