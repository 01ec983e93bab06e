"""The relay core's backend side: PostgreSQL's replies, scanned and forwarded in bulk.

Part of :class:`proxy.session.relay.Relay` (a base class of it, kept in its own module because
it is the other direction).  Result rows pass through as raw chunks (proxy/wire/backend.py);
the few messages the session must see update its state: ReadyForQuery ends a Sync segment
(the in-flight queue, the ledger, refusal replies written in their place), ErrorResponse
swaps a refusal marker's error for the refusal, ParseComplete answers a Parse the proxy sent
on its own, CopyInResponse starts the COPY check, and in transaction pooling the settings
probe's answer is read and never shown to the client.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from proxy import varcache
from proxy.seam import Forward, Outcome
from proxy.session.events import AUDIT_AFTER, UNBLOCK, RelayFatal
from proxy.session.ledger import COMPLETIONS
from proxy.wire import messages as m
from proxy.wire.backend import (
    AUDIT_INTERESTING,
    BIND_COMPLETE,
    CLOSE_COMPLETE,
    COMMAND_COMPLETE,
    COPY_BOTH_RESPONSE,
    COPY_IN_RESPONSE,
    DATA_ROW,
    EMPTY_QUERY,
    ERROR_RESPONSE,
    PARAMETER_STATUS,
    PARSE_COMPLETE,
    PORTAL_SUSPENDED,
    READY_FOR_QUERY,
)
from proxy.wire.error_position import remap_error_position
from proxy.wire.errors import ProtocolError
from proxy.wire.frontend import Phase

log = logging.getLogger("tenantgate.session")

#: what every session must see: command tags (audit, DEALLOCATE ALL), and ParseComplete,
#: BindComplete and CloseComplete (the statement ledger is updated by PostgreSQL's replies)
POOLED_INTERESTING = AUDIT_INTERESTING | COMPLETIONS
#: while a swallowed query (the settings probe) is answered: everything
EVERYTHING = frozenset(range(256))


class Entry:
    """Something PostgreSQL (or the proxy) still has to answer, in order.

    kind: b"Q" simple query, b"X" Execute, b"S" Sync, b"R" synthetic reply, b"W" settings probe.
    """

    __slots__ = ("kind", "decision", "handle", "t0", "sqlstate", "tag", "data", "audited", "copy", "texts")

    def __init__(self, kind: bytes, decision: Forward | None = None, handle: Any = None, data: bytes = b""):
        self.kind = kind
        self.decision = decision
        self.handle = handle
        self.t0 = time.perf_counter()
        self.sqlstate: str | None = None
        self.tag: str | None = None
        self.data = data
        self.audited = False
        self.copy = None  # the data of an audited COPY FROM STDIN (proxy.session.copy_digest)
        self.texts: tuple[str, str] | None = None  # (client text, text sent) of a rewritten Query


class BackendReplies:
    """Backend → client methods of the relay core (state lives in :class:`Relay`)."""

    __slots__ = ()

    def feed_backend(self, data: bytes) -> None:
        """Bytes from PostgreSQL: what the client gets is appended to ``to_client``."""
        items = self.scanner.feed(data)
        if len(items) == 1 and type(items[0]) is bytes:
            self.to_client.append(items[0])
            return
        out: list[bytes] = []
        for it in items:
            if type(it) is bytes:
                out.append(it)
                continue
            t, payload, raw = it
            if self.swallowing:
                self._swallow(t, payload, out)
                continue
            if t == READY_FOR_QUERY:
                out.append(raw)
                self._on_ready(payload[:1], out)
            elif t == COMMAND_COMPLETE or t == EMPTY_QUERY or t == PORTAL_SUSPENDED:
                out.append(raw)
                inflight = self.inflight
                if inflight:
                    head = inflight[0]
                    if head.kind == b"X":
                        inflight.pop(0)
                        if head.audited:
                            head.tag = m.command_tag(payload) if t == COMMAND_COMPLETE else None
                            self._finish_audit(head)
                    elif head.audited and t == COMMAND_COMPLETE:  # every statement of the Query
                        tag = m.command_tag(payload)
                        head.tag = tag if head.tag is None else f"{head.tag}; {tag}"
                if t == COMMAND_COMPLETE and payload[:1] == b"D" and not self.pooled and (
                        payload.startswith(b"DEALLOCATE ALL\0") or payload.startswith(b"DISCARD ALL\0")):
                    self.ledger.all_statements_dropped()
            elif t == ERROR_RESPONSE:
                if b"P" in payload:  # a position: in the client's text, not in the rewrite
                    raw = self._position_in_client_text(raw)
                    payload = raw[5:]
                out.append(self._on_backend_error(payload, raw))
            elif t == PARSE_COMPLETE:
                self.ledger.completed(t)
                if self.parse_texts:
                    self.parse_texts.pop(0)
                fifo = self.stmts.parse_fifo if self.stmts is not None else None
                if not fifo or not fifo.pop(0)[1]:
                    out.append(raw)
            elif t == BIND_COMPLETE or t == CLOSE_COMPLETE:
                self.ledger.completed(t)
                out.append(raw)
            elif t == COPY_IN_RESPONSE:
                out.append(raw)
                self._on_copy_in_response()
            elif t == COPY_BOTH_RESPONSE:
                self.to_client.append(b"".join(out))
                raise RelayFatal("0A000", "COPY BOTH (replication) is not supported by tenantgate")
            else:
                out.append(raw)
        self.to_client.append(b"".join(out))

    def _on_ready(self, status: bytes, out: list[bytes]) -> None:
        self.tx_status = status
        self.saw_ready = True
        inflight = self.inflight
        took = None
        while inflight:
            e = inflight.pop(0)
            k = e.kind
            if k == b"R":
                out.append(e.data + m.encode_ready_for_query(status))
                continue
            if e.audited:
                self._finish_audit(e)
            if k == b"Q" or k == b"S":
                took = time.perf_counter() - e.t0
                break
        self.counters.ready(status == b"I", took)
        self.ledger.ready(self.seg_done + 1, status)
        # (_segment_done, inline: once per ReadyForQuery)
        self.seg_done += 1
        hold = self.hold_seg
        if hold and self.seg_done >= hold:
            self.hold_seg = 0
            self.events.append((UNBLOCK,))
        if self.markers:
            done = self.seg_done
            self.markers = [mk for mk in self.markers if mk[0] > done]
        while inflight and inflight[0].kind == b"R":
            out.append(inflight.pop(0).data + m.encode_ready_for_query(status))
        if self.fstate.phase is Phase.COPY_IN:
            self._end_copy()
        try:
            self.gate.on_ready_for_query(status)
        except Exception:
            log.exception("session %s: on_ready_for_query failed", self.session_id)
        if self.held is not None and self.blocked and not self.hold_seg \
                and not (inflight and self.fstate.phase is not Phase.COPY_IN):
            self.events.append((UNBLOCK,))

    def _segment_done(self) -> None:
        """One more ReadyForQuery: release a message held for this segment's replies."""
        self.seg_done += 1
        hold = self.hold_seg
        if hold and self.seg_done >= hold:
            self.hold_seg = 0
            self.events.append((UNBLOCK,))

    def _position_in_client_text(self, raw: bytes) -> bytes:
        """An error of a rewritten statement: its position (field P) moved to the client's text.
        The failing statement is the segment's oldest unanswered Parse, or else its Query."""
        seg = self.seg_done + 1
        texts = self.parse_texts
        if texts and texts[0][0] == seg:
            original, sent = texts[0][1], texts[0][2]
        else:
            head = self.inflight[0] if self.inflight else None
            if head is None or head.texts is None:
                return raw
            original, sent = head.texts
        if original is None:
            return raw
        return remap_error_position(raw, original, sent)

    def _on_backend_error(self, payload: bytes, raw: bytes) -> bytes:
        if self.markers:
            for i, (_seg, token, err) in enumerate(self.markers):
                if token in raw:
                    del self.markers[i]
                    raw = err
                    payload = err[5:]
                    break
        if b"SFATAL\0" in payload or b"SPANIC\0" in payload:
            self.backend_fatal = True
        # PostgreSQL failed on, or skips, every Parse/Bind/Close of this segment not yet answered
        self.ledger.failed(self.seg_done + 1)
        texts = self.parse_texts
        while texts and texts[0][0] <= self.seg_done + 1:
            texts.pop(0)
        stmts = self.stmts
        fifo = stmts.parse_fifo if stmts is not None else None
        if fifo:  # the rest of this segment is skipped by PostgreSQL: those Parses get no answer
            seg = self.seg_done + 1
            sc = self.sconn
            while fifo and fifo[0][0] <= seg:
                _, swallowed, name = fifo.pop(0)
                if sc is None:
                    continue
                if name is None:  # an unnamed Parse failed or was skipped
                    sc.unnamed_owner = None
                    if not swallowed:
                        stmts.unnamed_dropped()
                else:
                    sc.prepared.discard(name)
                    if not swallowed:  # the client's own Parse failed: its statement does not exist
                        stmts.forget(name)
        inflight = self.inflight
        if inflight:
            head = inflight[0]
            if head.kind == b"X":
                inflight.pop(0)
                if head.audited:
                    head.sqlstate = _sqlstate_of(payload)
                    self._finish_audit(head)
            elif head.audited and head.sqlstate is None:
                head.sqlstate = _sqlstate_of(payload)
        if self.fstate.phase is Phase.COPY_IN:
            self._end_copy()
        return raw

    def _on_copy_in_response(self) -> None:
        head = self.inflight[0] if self.inflight else None
        decision = head.decision if head is not None else None
        factory = decision.copy_in_check if decision is not None else None
        self.fstate.copy_in_started()
        err = self.copy.started(factory)
        if err is not None:
            log.error("session %s: %s", self.session_id, err)
            self.to_backend.append(m.encode_copy_fail(err))
        if self.held is not None and self.blocked and not self.hold_seg:
            self.events.append((UNBLOCK,))

    def _finish_audit(self, e) -> None:
        rows = None
        if e.tag:
            counts = [m.rows_from_tag(tag) for tag in e.tag.split("; ")]
            rows = sum(c for c in counts if c is not None) if any(c is not None for c in counts) else None
        detail = e.copy.detail() if e.copy is not None else None
        outcome = Outcome(e.sqlstate, e.tag, rows, time.perf_counter() - e.t0, detail)
        self.events.append((AUDIT_AFTER, e.handle, outcome))

    # ------------------------------------------------------------------ transaction pooling: the settings probe

    def send_probe(self) -> None:
        """After a SET: read the settings back, so they follow the client to other connections."""
        settings = self.settings
        settings.dirty = False
        settings.probe_values = None
        self.sconn.unnamed_owner = None  # a simple Query drops the unnamed statement
        self.swallowing = True
        self.scanner.interesting = EVERYTHING
        self.inflight.append(Entry(b"W"))
        self.seg_sent += 1
        sql = varcache.probe_sql(settings.probe_names)
        if settings.reset:
            # RESET ALL / DISCARD ALL ran: put back what PostgreSQL's reset values would be (the
            # connection-time settings) and the proxy's own, before anything else runs here
            settings.reset = False
            restore = dict(settings.connect)
            restore.update(self.gate.backend_settings())
            if restore:
                sql = f"{varcache.apply_sql(restore, ())}; {sql}"
        binder = self.sconn.binder if settings.bkey is not None else None
        if binder is not None:  # a SET may have switched the tenant: bind before reading back
            sql = f"{binder.sql(*self.gate.backstop_binding())}; {sql}"
        self.to_backend.append(m.encode_query(sql))

    def _swallow(self, t: int, payload: bytes, out: list[bytes]) -> None:
        """A message answering the settings probe (never shown to the client)."""
        settings = self.settings
        if t == DATA_ROW:
            settings.probe_values = m.decode_data_row(payload)
        elif t == PARAMETER_STATUS:
            k, v = m.decode_parameter_status(payload)
            self.sconn.conn.parameters[k] = v
        elif t == READY_FOR_QUERY:
            inflight = self.inflight
            inflight.pop(0)
            self.ledger.ready(self.seg_done + 1, self.tx_status)
            self._segment_done()
            self.swallowing = False
            while inflight and inflight[0].kind == b"R":  # refusals the client sent meanwhile
                out.append(inflight.pop(0).data + m.encode_ready_for_query(self.tx_status))
            self.scanner.interesting = POOLED_INTERESTING
            values = settings.probe_values
            names = settings.probe_names
            if values is not None and len(values) == len(names):
                baseline = settings.pool.baseline or {}
                actual = varcache.from_probe(names, [None if v is None else v.decode() for v in values], baseline)
                self.sconn.state = actual
                settings.want(actual, self.gate)
            else:  # the probe failed: the connection's state is unknown, do not lend it again
                settings.pinned = True


def _sqlstate_of(payload: bytes) -> str | None:
    try:
        return m.decode_error_fields(payload).sqlstate or None
    except ProtocolError:
        return None


