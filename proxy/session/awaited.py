"""The awaited steps of a client session: audit before an operator statement, the off-loop
analysis of a long statement, and a catalog refresh for an unknown relation.

Part of :class:`proxy.session.protocol.ClientSession` (a base class of it).  The relay core
asks for each step with an event and blocks; these coroutines do the awaiting, then hand the
result back to the core and let the session read its client again.
"""

from __future__ import annotations

import asyncio
import logging

from proxy import statement_offload
from proxy.seam import Refuse

log = logging.getLogger("tenantgate.session")

#: how long a statement naming an unknown relation waits for a fresh catalog snapshot
CATALOG_RECHECK_TIMEOUT_S = 10.0


class AwaitedSteps:
    __slots__ = ()

    async def _audit_task(self, decision, params, forward, refuse) -> None:
        try:
            handle = await self.gate.audit_before(decision, params)
        except Exception as e:
            if self.closed:
                return
            sqlstate = getattr(e, "sqlstate", None) or "58000"
            msg = getattr(e, "message", None) or str(e) or "audit record could not be written"
            refuse(Refuse(sqlstate, f"statement not run: {msg}"))
        else:
            if self.closed:
                return
            forward(handle)
        self.relay.blocked = False
        self._flush()
        self.process_client()

    async def _audit_after(self, handle, outcome) -> None:
        try:
            await self.gate.audit_after(handle, outcome)
        except Exception:
            log.exception("session %s: audit_after failed", self.session_id)

    async def _warm_up_forked(self, t: bytes, payload: bytes, pair) -> None:
        compute, adopt = pair
        try:
            result = await statement_offload.run_forked(compute, self.config.limits.statement_cpu_budget_s)
        except Exception:  # never leave the session blocked
            log.exception("session %s: analysing a long statement failed", self.session_id)
            result = Refuse("XX000", "internal error in tenantgate while checking the statement")
        if self.closed:
            return
        decision = None
        if isinstance(result, Refuse):
            decision = result
        else:
            try:
                adopt(result.value)
            except Exception:
                log.exception("session %s: adopting an analysed statement failed", self.session_id)
        self._resume(t, payload, decision, offloaded=True)

    async def _analyse_off_loop(self, t: bytes, payload: bytes, sql: str, origin) -> None:
        relay = self.relay
        decision = await statement_offload.analyse(lambda: relay._check(sql, origin),
                                                   self.config.limits.statement_cpu_budget_s)
        if self.closed:
            return
        self._resume(t, payload, decision, offloaded=True)

    async def _refresh_then_recheck(self, t: bytes, payload: bytes, t0: float) -> None:
        keeper = self.server.gatekeeper
        catalog_for = getattr(keeper, "catalog_for", None)  # the catalog of the session's region
        catalog = catalog_for(getattr(self.gate, "region", None)) if catalog_for is not None else keeper.catalog
        try:
            await asyncio.wait_for(catalog.refresh_after(t0), CATALOG_RECHECK_TIMEOUT_S)
        except Exception:  # the old snapshot stays; the statement is refused as before
            log.warning("session %s: catalog refresh for an unknown relation failed", self.session_id, exc_info=True)
        if self.closed:
            return
        self._resume(t, payload)

    def _resume(self, t: bytes, payload: bytes, decision=None, *, offloaded: bool = False) -> None:
        self.relay.resume_with(t, payload, decision, offloaded=offloaded)
        self._resume_client()
        self.process_client()
