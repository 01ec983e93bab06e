"""The text edits a rewrite pass produces, and the marker for where the tenant literal goes.

The rewriting passes (:mod:`proxy.policy.inject`, :mod:`proxy.policy.inject_writes`,
:mod:`proxy.policy.copy`, :mod:`proxy.policy.utility_statements`, ...) never put the tenant into
the text themselves: they leave a :data:`TENANT` marker, so a rewrite is cached once and reused
for every tenant (:mod:`proxy.policy.normalize` and the pipeline fill it in).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class _TenantMarker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


TENANT = _TenantMarker("TENANT")
# The tenant inside a statement that outlives this execution (the body of SQL PREPARE): in
# sessions whose tenant can change it becomes a reference to the backend GUC, not a literal.
TENANT_LASTING = _TenantMarker("TENANT_LASTING")


@dataclass(frozen=True)
class Edit:
    """Replace ``sql[start:end]`` with ``parts`` (strings and TENANT markers)."""

    start: int
    end: int
    parts: tuple


@dataclass
class Injection:
    edits: list[Edit] = field(default_factory=list)
    touches_tenant: bool = False
    writes: bool = False
    param_checks: set[int] = field(default_factory=set)  # 0-based parameter indexes in the tenant column
    required_literals: list[str] = field(default_factory=list)  # literals that must equal the tenant
    tenant_relations: list[str] = field(default_factory=list)
    shared_relations: list[str] = field(default_factory=list)
