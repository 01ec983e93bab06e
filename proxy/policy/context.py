"""What the policy engine is given and what it returns, besides the decision itself.

:class:`PolicyContext` (the session's tenant and state), :class:`Effects` (session-state changes the
gate applies when a statement is forwarded), :class:`Analysis` (decision + effects).  Shared by
:mod:`proxy.policy.engine` and :mod:`proxy.policy.pipeline`, which is why they live here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Protocol

from proxy.seam import Forward, Refuse

DEFAULT_READ_ONLY_MESSAGE = "cannot execute a write statement in a read-only tenant session"


class FunctionCheckerLike(Protocol):
    def check(self, tree: Any) -> None: ...


@dataclass(frozen=True)
class PolicyContext:
    tenant: str | None
    read_only: bool = False
    read_only_message: str = DEFAULT_READ_ONLY_MESSAGE
    prepared_names: frozenset[str] = frozenset()
    # Sessions whose tenant can change (tenant tokens): the session's tenant right now.  Given,
    # statements that outlive one execution reference the backend GUC and checks read it late.
    tenant_source: Callable[[], str | None] | None = None


@dataclass(frozen=True)
class Effects:
    """Session-state changes the gate applies when the statement is forwarded."""

    prepared: tuple[str, ...] = ()  # PREPARE name
    deallocated: tuple[str, ...] = ()  # DEALLOCATE name
    deallocate_all: bool = False
    tenant_token: tuple[str, bool] | None = None  # (token, is_local) from SET tenantgate.tenant
    executed: tuple[str, ...] = ()  # EXECUTE name (PREPAREd earlier): the gate classes it as that statement


class Analysis(NamedTuple):
    """Immutable like the other results; a named tuple because one is made per statement (the
    hot path of a cache hit: a frozen dataclass's __init__ costs three times as much)."""

    decision: Forward | Refuse
    effects: Effects = Effects()
    cached: bool = False
