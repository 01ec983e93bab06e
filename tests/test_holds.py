"""proxy/holds.py without a network: who a PAUSE holds, and when a PAUSE is quiet.

The end-to-end behaviour (held clients, in-flight transactions, other tenants untouched) is
tested against the demo in tests/test_admin_control.py; this pins the decision table.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from proxy.holds import Holds, in_transaction, session_tenant


class Gate:
    def __init__(self, tenant, tokens=False):
        self.tenant, self._allow_tokens = tenant, tokens


def session(tenant="acme", database="app", tokens=False, tx=b"I", inflight=(), console=None):
    return SimpleNamespace(gate=Gate(tenant, tokens), database=database, relaying=True, tx_status=tx,
                           inflight=list(inflight), attach_task=None, unsynced=False, console=console,
                           closed=False)


def test_who_is_held():
    h = Holds()
    acme, globex, tokens, other_db = session("acme"), session("globex"), session("globex", tokens=True), \
        session("acme", database="other")
    assert not h.active and not any(h.holds(s) for s in (acme, globex, tokens, other_db))
    h.hold(tenant="acme")
    assert h.active
    assert h.holds(acme) and h.holds(other_db)  # a tenant hold covers every database
    assert not h.holds(globex)
    assert h.holds(tokens), "a token session may switch to acme inside its next statement: held"
    h.release(tenant="acme")
    assert not h.active and not h.holds(acme) and not h.holds(tokens)
    h.hold(database="app")
    assert h.holds(acme) and h.holds(globex) and not h.holds(other_db)
    h.hold()
    assert h.holds(other_db)
    h.release()  # RESUME: everything and every database
    assert not h.active and not h.databases and not h.everything


def test_operator_sessions_are_held_by_their_grants_tenant():
    inner = Gate("acme")
    operator = SimpleNamespace(gate=SimpleNamespace(inner=inner, backstop_binding=lambda: ("acme", "read")))
    assert session_tenant(operator) == "acme"
    assert session_tenant(SimpleNamespace(gate=None)) is None
    h = Holds()
    h.hold(tenant="acme")
    operator.database = "app"
    assert h.holds(operator)


def test_in_transaction_and_affected():
    busy = [session(tx=b"T"), session(tx=b"E"), session(inflight=[1])]
    idle = session()
    assert all(in_transaction(s) for s in busy) and not in_transaction(idle)
    assert not in_transaction(session(tx=b"T", console=object())), "the console itself is never waited for"
    h = Holds()
    sessions = [session("acme"), session("globex"), session("globex", tokens=True)]
    assert [s.gate.tenant for s in h.affected(sessions, tenant="acme")] == ["acme", "globex"]  # + token session
    assert len(h.affected(sessions, database="app")) == 3 and h.affected(sessions, database="x") == []


def test_wait_quiet_returns_when_the_transaction_ends_or_the_hold_is_lifted():
    async def main():
        h = Holds()
        s = session("acme", tx=b"T")
        h.hold(tenant="acme")
        waiter = asyncio.ensure_future(h.wait_quiet(lambda: [s], tenant="acme",
                                                    held=lambda: "acme" in h.tenants))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        s.tx_status = b"I"
        assert await waiter is True
        s.tx_status = b"T"
        waiter = asyncio.ensure_future(h.wait_quiet(lambda: [s], tenant="acme",
                                                    held=lambda: "acme" in h.tenants))
        await asyncio.sleep(0.1)
        h.release(tenant="acme")
        assert await waiter is False  # RESUME before quiet

        held = session("acme")
        h.hold(tenant="acme")
        released = asyncio.ensure_future(h.wait_released(held))
        await asyncio.sleep(0.1)
        assert not released.done()
        h.release(tenant="acme")
        await asyncio.wait_for(released, 5)

    asyncio.run(main())
