"""Refusals and audits in the relay core: answering where PostgreSQL's answer would be.

Part of :class:`proxy.session.relay.Relay` (a base class of it).  A refused statement must
behave exactly like a PostgreSQL error at the same position: a simple Query refused while the
session is idle is answered by the proxy alone; anywhere else a *marker* statement that fails
in PostgreSQL is sent in its place and its error is swapped for the refusal on the way back
(:mod:`proxy.session.replies`), so transactions and pipelines abort exactly as they would.
An operator statement is audited before it runs: the relay blocks and asks the I/O layer.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from proxy.seam import Forward, Refuse
from proxy.session.events import AUDIT
from proxy.session.replies import Entry
from proxy.wire import messages as m

log = logging.getLogger("tenantgate.session")

MARKER_PREFIX = "tenantgate_refused_"
_ZERO = b"I"


class Refusals:
    """Refusal and audit methods of the relay core (state lives in :class:`Relay`)."""

    __slots__ = ()

    def _note_refusal(self, sql: str, refusal: Refuse) -> None:
        self.counters.refusal(sql, refusal)
        try:
            self.gate.on_refused(sql, refusal)
        except Exception:
            log.exception("session %s: on_refused failed", self.session_id)

    def _marker_token(self) -> str:
        self.marker_seq += 1
        return f"{MARKER_PREFIX}{self.session_id}_{self.marker_seq}"

    def _refuse_simple(self, sql: str, refusal: Refuse) -> None:
        """ErrorResponse + ReadyForQuery where PostgreSQL's answer would be.

        A refusal must behave exactly like a PostgreSQL error: inside a transaction block the
        transaction is aborted (status E, COMMIT answers ROLLBACK).  So unless the session is
        known to be outside any transaction when this statement would run (idle, nothing in
        flight), a marker Query that fails in PostgreSQL is sent instead and its error is
        swapped for the refusal; PostgreSQL's ReadyForQuery then carries the true status."""
        self._note_refusal(sql, refusal)
        err = m.encode_error("ERROR", refusal.sqlstate, refusal.message, refusal.detail, refusal.hint)
        if self.tx_status != _ZERO or any(e.kind != b"R" for e in self.inflight):
            token = self._marker_token()
            self.markers.append((self.seg_sent + 1, token.encode(), err))
            self._unnamed_dropped()
            self.to_backend.append(m.encode_query(token))
            self.ledger.query_sent(self.seg_sent + 1)
            self.inflight.append(Entry(b"Q"))
            self.seg_sent += 1
            return
        self.inflight.append(Entry(b"R", data=err))
        if len(self.inflight) == 1:
            self.inflight.pop(0)
            self.to_client.append(err + m.encode_ready_for_query(self.tx_status))

    def _refuse_extended(self, sql: str, refusal: Refuse, marker: Callable[[str], bytes]) -> None:
        """Send a marker message that fails in PostgreSQL at this position, skip to Sync."""
        self._note_refusal(sql, refusal)
        token = self._marker_token()
        err = m.encode_error("ERROR", refusal.sqlstate, refusal.message, refusal.detail, refusal.hint)
        self.markers.append((self.seg_sent + 1, token.encode(), err))
        self.to_backend.append(marker(token))
        self.fstate.error_in_extended()

    def _refuse_copy(self, message: str, internal: bool = False) -> None:
        """The COPY data check refused a row: CopyFail ends the COPY in PostgreSQL (nothing of it
        is stored), and its error (57014, "COPY from stdin failed") is swapped for the refusal,
        42501 as for an INSERT of the same row (XX000 when the check itself failed)."""
        refusal = (Refuse("XX000", message) if internal
                   else Refuse("42501", message, hint="COPY only rows of the session's tenant"))
        self._note_refusal("<COPY data>", refusal)
        token = self._marker_token()
        err = m.encode_error("ERROR", refusal.sqlstate, refusal.message, refusal.detail, refusal.hint)
        self.markers.append((self.seg_done + 1, token.encode(), err))
        self.to_backend.append(m.encode_copy_fail(f"{message} ({token})"))

    def _audit_then(self, decision: Forward, params, forward: Callable[[Any], None],
                    refuse: Callable[[Refuse], None]) -> None:
        self.blocked = True
        self.events.append((AUDIT, decision, params, forward, refuse))
