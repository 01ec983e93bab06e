"""Per-tenant counters for the admin console's ``SHOW TENANTS``.

Client sessions report each finished transaction (a ReadyForQuery that leaves
the session idle) and each refused statement; :func:`tenant_snapshot` adds the
tenant's current sessions and whether it is paused (:mod:`proxy.holds`).
Counts are per process (with ``workers: N``, per worker) since it started.
"""

from __future__ import annotations

from proxy.holds import session_tenant


class TenantCounters:
    def __init__(self) -> None:
        self.transactions: dict[str, int] = {}
        self.refusals: dict[str, int] = {}

    @staticmethod
    def tenant_of(session) -> str | None:
        """The tenant ``session``'s statements run for now (proxy.holds.session_tenant)."""
        return session_tenant(session)

    def add_transactions(self, tenant: str, n: int) -> None:
        """``n`` transactions of ``tenant`` finished (sessions count them locally and add them in
        bulk: proxy/session/counters.py)."""
        self.transactions[tenant] = self.transactions.get(tenant, 0) + n

    def refusal(self, session) -> None:
        tenant = session_tenant(session)
        if tenant is not None:
            self.refusals[tenant] = self.refusals.get(tenant, 0) + 1


def tenant_snapshot(server) -> list[dict]:
    """One dict per tenant seen (sessions now, transactions, refusals, paused), sorted by name."""
    counters: TenantCounters = server.tenant_counters
    sessions: dict[str, int] = {}
    for s in list(server.sessions):
        if not s.relaying or s.console is not None:
            continue
        if s.counters is not None:  # an idle pooled session holds none (protocol._drop_counters)
            s.counters.flush()  # transactions counted by the session and not yet added to its tenant's
        tenant = session_tenant(s)
        if tenant is not None:
            sessions[tenant] = sessions.get(tenant, 0) + 1
    paused = server.holds.tenants
    names = set(sessions) | set(counters.transactions) | set(counters.refusals) | set(paused)
    return [{"tenant": t, "sessions": sessions.get(t, 0), "transactions": counters.transactions.get(t, 0),
             "refusals": counters.refusals.get(t, 0), "paused": t in paused} for t in sorted(names)]
