"""SHOW TENANTS' transaction counts when sessions count locally and add them in bulk
(proxy/session/counters.py): each transaction counts for the tenant it ran for, and SHOW
TENANTS includes what sessions have not handed over yet."""

from __future__ import annotations

from types import SimpleNamespace

from proxy.session.counters import FLUSH_EVERY, SessionCounters
from proxy.tenant_counters import TenantCounters, tenant_snapshot


class TokenGate:
    """A tenant-token gate: its tenant changes with a SET (LOCAL) and tenant_epoch follows."""

    def __init__(self, tenant):
        self.tenant = tenant
        self.tenant_epoch = 0

    def switch(self, tenant):
        self.tenant = tenant
        self.tenant_epoch += 1


class OperatorGate:
    """No tenant of its own and no epoch: the binding says which tenant its grant is for."""

    def __init__(self, tenant):
        self.grant_tenant = tenant

    def backstop_binding(self):
        return self.grant_tenant, "read"


def _session(gate):
    owner = SimpleNamespace(gate=gate, relaying=True, console=None, kind_label="tenant", user="u")
    tenants = TenantCounters()
    owner.counters = SessionCounters(owner, tenants)
    return owner, tenants


def test_each_transaction_counts_for_the_tenant_it_ran_for():
    owner, tenants = _session(TokenGate("acme"))
    c = owner.counters
    for _ in range(3):
        c.ready(True, 0.001)
    c.ready(False, 0.001)  # inside a transaction: not a finished one
    owner.gate.switch("globex")  # SET LOCAL tenantgate.tenant inside the next transaction
    c.ready(False, 0.001)
    c.ready(True, 0.001)  # the COMMIT's ReadyForQuery: still globex's transaction
    owner.gate.switch("acme")  # the local tenant ends with the transaction
    c.ready(True, 0.001)
    c.flush()
    assert tenants.transactions == {"acme": 4, "globex": 1}


def test_gates_without_an_epoch_are_asked_every_time():
    owner, tenants = _session(OperatorGate("acme"))
    c = owner.counters
    c.ready(True, None)
    owner.gate.grant_tenant = "globex"
    c.ready(True, None)
    c.ready(True, None)
    c.flush()
    assert tenants.transactions == {"acme": 1, "globex": 2}


def test_counts_reach_the_tenant_in_bulk_and_show_tenants_sees_the_rest():
    owner, tenants = _session(TokenGate("acme"))
    c = owner.counters
    for _ in range(FLUSH_EVERY - 1):
        c.ready(True, 0.001)
    assert tenants.transactions.get("acme", 0) < FLUSH_EVERY - 1  # not yet handed over
    server = SimpleNamespace(tenant_counters=tenants, sessions=[owner], holds=SimpleNamespace(tenants=set()))
    assert tenant_snapshot(server) == [
        {"tenant": "acme", "sessions": 1, "transactions": FLUSH_EVERY - 1, "refusals": 0, "paused": False}]
    c.ready(True, 0.001)
    c.flush()
    assert tenants.transactions == {"acme": FLUSH_EVERY}
