"""PAUSE and RESUME: holding new transactions while in-flight ones finish.

The admin console's ``PAUSE``, ``PAUSE db`` and ``PAUSE TENANT t`` (and the
later tenant-move cutover, through :meth:`proxy.server.ProxyServer.pause_tenant`)
put a hold here; every client session asks :func:`hold_if_paused` before it
starts a transaction (transaction pooling: before it borrows a connection;
session mode: when it is idle and the client sends something).  A held session
handles no client message until the hold is lifted; it reads ahead up to
``BLOCKED_READ_AHEAD`` bytes (proxy/session/protocol.py), then stops reading, so its bytes
wait in its receive buffer and in the kernel; nothing is refused or lost.

A transaction already open is never held: it runs to its end, and
:meth:`Holds.wait_quiet` is how a caller learns that every affected session is
between transactions.

Tenant holds fail closed: a session that may switch tenants with a signed token
(``tenantgate.tenant``) could switch to a held tenant inside its next
statement, after the check, so while any tenant is held such sessions are held
too.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Iterable

_NONE = object()

#: how often :meth:`Holds.wait_quiet` looks at the sessions again (as ProxyServer.drain does)
POLL_S = 0.05


def session_tenant(session) -> str | None:
    """The tenant the session's statements run for now (None: no tenant, or unknown).
    Operator gates have no ``tenant`` of their own: their grant's tenant is their binding's."""
    gate = session.gate
    if gate is None:
        return None
    inner = getattr(gate, "inner", gate)
    tenant = getattr(inner, "tenant", _NONE)
    if tenant is not _NONE:
        return tenant
    binding = getattr(gate, "backstop_binding", None)
    if binding is None:  # a passthrough gate: no tenant
        return None
    try:
        return binding()[0]
    except Exception:  # noqa: BLE001 - a gate without a binding has no tenant
        return None


def switches_tenants(session) -> bool:
    """Whether the session may pick its tenant with a token (its tenant can change in a statement)."""
    gate = getattr(session, "gate", None)
    inner = getattr(gate, "inner", gate)
    return bool(getattr(inner, "_allow_tokens", False))


def in_transaction(session) -> bool:
    """Whether the session has work open on PostgreSQL (a transaction, a statement in flight,
    extended-protocol messages without their Sync, or a connection being borrowed for one)."""
    if not getattr(session, "relaying", False) or getattr(session, "console", None) is not None:
        return False
    return (session.tx_status not in (b"I", b"\x00") or bool(session.inflight)
            or session.attach_task is not None or session.unsynced)


class Holds:
    """What is paused in one proxy process: everything, some databases, some tenants."""

    def __init__(self) -> None:
        self.everything = False
        self.databases: set[str] = set()
        self.tenants: set[str] = set()
        #: anything held at all: read by every client session before each transaction, so a plain
        #: attribute (kept up to date by the methods below), not a property
        self.active = False
        self._changed: asyncio.Event | None = None

    def hold(self, *, database: str | None = None, tenant: str | None = None) -> None:
        """Hold ``database``, or ``tenant``, or (neither given) everything."""
        if tenant is not None:
            self.tenants.add(tenant)
        elif database is not None:
            self.databases.add(database)
        else:
            self.everything = True
        self.active = True

    def release(self, *, database: str | None = None, tenant: str | None = None) -> None:
        """Lift a hold (neither given: everything and every database); waiting sessions check again."""
        if tenant is not None:
            self.tenants.discard(tenant)
        elif database is not None:
            self.databases.discard(database)
        else:
            self.everything = False
            self.databases.clear()
        self.active = self.everything or bool(self.databases) or bool(self.tenants)
        self.lift()

    def holds(self, session) -> bool:
        """Whether the session's next transaction must wait."""
        if self.everything:
            return True
        if self.databases and getattr(session, "database", None) in self.databases:
            return True
        if self.tenants:
            if switches_tenants(session):
                return True
            return session_tenant(session) in self.tenants
        return False

    def affected(self, sessions: Iterable, *, database: str | None = None, tenant: str | None = None) -> list:
        """The sessions a hold on ``database`` / ``tenant`` (neither: everything) covers."""
        out = []
        for s in sessions:
            if getattr(s, "console", None) is not None:
                continue
            if database is not None and getattr(s, "database", None) != database:
                continue
            if tenant is not None and not (switches_tenants(s) or session_tenant(s) == tenant):
                continue
            out.append(s)
        return out

    def lift(self) -> None:
        """Something was resumed: every waiting session checks again."""
        ev, self._changed = self._changed, None
        if ev is not None:
            ev.set()

    async def wait_released(self, session) -> None:
        """Return once the session is no longer held (or it closed)."""
        while self.holds(session) and not session.closed:
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()

    async def wait_quiet(self, sessions: Callable[[], Iterable], *, database: str | None = None,
                         tenant: str | None = None, held: Callable[[], bool] = lambda: True) -> bool:
        """Return once no affected session has a transaction open: True, or False when the hold
        was lifted meanwhile (``held()`` turned false: a RESUME during the PAUSE)."""
        while any(in_transaction(s) for s in self.affected(sessions(), database=database, tenant=tenant)):
            if not held():
                return False
            await asyncio.sleep(POLL_S)
        return held()


def hold_if_paused(session) -> bool:
    """Called by a client session before it starts a transaction.  True: the session is held
    (it handles no client message and resumes by itself when the hold is lifted)."""
    holds = session.server.holds
    if not holds.active or not holds.holds(session):
        return False
    session.block()
    session.request_time = time.time()

    async def wait() -> None:
        try:
            await holds.wait_released(session)
        finally:
            session.held_task = None
        if session.closed:
            return
        session.unblock()

    session.held_task = session.loop.create_task(wait())
    return True
