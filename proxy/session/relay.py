"""The sans-IO core of one client session: the relay between a client and PostgreSQL.

:class:`Relay` owns the session's protocol state once startup is over: the queue of what
PostgreSQL (or the proxy) still has to answer, refusal markers, the statement ledger,
Sync segments, held messages, COPY state and, in transaction pooling, the client's statement
names and settings.  It takes frontend messages (from the receive buffer) and backend bytes,
and leaves behind bytes to send (``to_backend``, ``to_client``) and events for the I/O layer
(:mod:`proxy.session.protocol`), which does every await.  No asyncio, no sockets.

Ordering.  Everything the proxy forwards is answered by PostgreSQL in order.  ``inflight``
holds one entry per forwarded Query / Execute / Sync and per synthetic reply (a refused simple
Query or FunctionCall), so a synthetic reply is written exactly where PostgreSQL's would have
been.  A statement refused inside the extended protocol is replaced by a *marker* message that
makes PostgreSQL fail at that very position (so the pipeline aborts exactly as it would for a
real error); the marker's error is swapped for the refusal's ErrorResponse on the way back
(:mod:`proxy.session.replies`).

Events (tuples in ``events``, first item the kind):

- ``(AUDIT, decision, params, forward, refuse)``: an operator statement must be audited before
  it runs; call ``forward(handle)`` or ``refuse(Refuse)``, then unblock.
- ``(AUDIT_AFTER, handle, outcome)``: a statement's audit record gets its outcome.
- ``(OFFLOAD, t, payload, sql, origin)`` / ``(WARM_UP, t, payload, pair)``: a long statement is
  analysed away from the event loop; then :meth:`Relay.resume_with`.
- ``(REFRESH, t, payload)``: a statement names an unknown relation; refresh the catalog, then
  :meth:`Relay.resume_with`.
- ``(UNBLOCK,)``: a held message may go on (on the next loop iteration).
- ``(TERMINATE,)``: the client sent Terminate.

A condition that must end the session raises :class:`RelayFatal`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from proxy.policy.errors import PolicyRefusal
from proxy.policy.void_params import VOID_OID, drop_void_arguments
from proxy.seam import Forward, Origin, Refuse
from proxy.session.copy_in import CopyIn
from proxy.session.events import OFFLOAD, REFRESH, TERMINATE, WARM_UP
from proxy.session.ledger import StatementLedger, Wait
from proxy.session.refusals import Refusals
from proxy.session.replies import POOLED_INTERESTING, BackendReplies, Entry
from proxy.session.statements import NO_STATEMENT, PooledStatements, PooledStatementSteps
from proxy.wire import messages as m
from proxy.wire.backend import BackendScanner
from proxy.wire.errors import ProtocolError
from proxy.wire.frontend import Action, FrontendState, Phase
from proxy.wire.verbatim import verbatim_run

log = logging.getLogger("tenantgate.session")


UNDEFINED_TABLE = "42P01"
FUNCTION_CALL_REFUSAL = Refuse(
    "42501",
    "FunctionCall messages are not allowed: they call functions without SQL the proxy could inspect",
)
_ZERO = b"I"
_QUIET_PHASES = (Phase.READY, Phase.TERMINATED)  # after Terminate nothing more comes from the client
_EXTENDED_TYPES = frozenset((b"P", b"B", b"D", b"E", b"C"))  # Flush (H) leaves nothing pending by itself
_SYNC_B = 83
_EXECUTE_B = 69
_BIND_B = 66
_FLUSH_B = 72
_VERBATIM_FIRST = frozenset(b"BESDH")  # the message types proxy/wire/verbatim.py may pass in a run


class Relay(Refusals, BackendReplies, PooledStatementSteps):
    """One session's protocol state and its message handlers (see the module docstring)."""

    __slots__ = (
        "buf", "gate", "session_id", "limits", "audited", "copy_full", "counters", "can_refresh",
        "to_backend", "to_client", "events", "blocked", "held", "hold_seg", "offloaded", "refresh_retried",
        "inflight", "tx_status", "fstate", "scanner", "ledger", "markers", "marker_seq", "seg_sent", "seg_done",
        "unsynced", "unnamed_single", "unnamed_spent", "copy", "backend_fatal", "saw_ready", "parse_texts",
        "pooled", "sconn", "stmts", "settings", "swallowing",
    )

    def __init__(self, buf, gate, *, session_id: str, limits, audited: bool, copy_full: bool, counters,
                 tx_status: bytes = _ZERO, pooled_settings=None, can_refresh: bool = False):
        self.buf = buf  # the session's ReceiveBuffer (frontend messages)
        self.gate = gate
        self.session_id = session_id
        self.limits = limits  # config.limits: statement_offload_bytes, max_statement_bytes
        self.audited = audited
        self.copy_full = copy_full  # audit.copy_data == "full"
        self.counters = counters  # proxy.session.counters.SessionCounters
        self.can_refresh = can_refresh  # the catalog can be refreshed for an unknown relation
        self.to_backend: list[bytes] = []
        self.to_client: list[bytes] = []
        self.events: list[tuple] = []
        self.blocked = False  # no further client message is read (something is awaited)
        self.held: tuple[bytes, bytes] | None = None  # a message handled again once unblocked
        self.hold_seg = 0  # the held message waits for the replies of this Sync segment
        self.offloaded: tuple[bytes, Any] | None = None  # (payload, decision) analysed off the loop
        self.refresh_retried: bytes | None = None  # the message re-checked after a catalog refresh
        self.inflight: list[Entry] = []  # oldest first (a list: an idle session stays small)
        self.tx_status = tx_status
        self.fstate = FrontendState()
        self.scanner = BackendScanner(POOLED_INTERESTING)
        # statements and portals as PostgreSQL's replies confirm them (proxy/session/ledger.py)
        self.ledger = StatementLedger()
        self.markers: list[tuple[int, bytes, bytes]] = []
        self.marker_seq = 0
        self.seg_sent = 0
        self.seg_done = 0
        self.unsynced = False  # extended-protocol messages sent without their Sync yet
        self.unnamed_single = False  # the unnamed statement is a tenant switch: it runs once
        self.unnamed_spent = False
        self.copy = CopyIn()
        # one per Parse sent and not yet answered, oldest first: (segment, client text, text sent)
        # when tenantgate rewrote it, else (segment, None, None); an error's position is mapped
        # back to the client's text (proxy/wire/error_position.py)
        self.parse_texts: list[tuple[int, str | None, str | None]] = []
        self.backend_fatal = False
        self.saw_ready = False  # a ReadyForQuery went by since the I/O layer last looked
        # transaction pooling: the borrowed connection (proxy.pool.ServerConn) while lent
        self.pooled = pooled_settings is not None
        self.sconn = None
        self.stmts = PooledStatements() if self.pooled else None
        self.settings = pooled_settings  # proxy.session.settings.PooledSettings
        self.swallowing = False  # the settings probe is being answered

    # ------------------------------------------------------------------ state the I/O layer asks about

    @property
    def idle(self) -> bool:
        return self.tx_status == _ZERO and not self.inflight

    def quiet(self) -> bool:
        """Nothing of this session is open on its connection: no transaction, nothing in flight or
        unsent, no pipeline without its Sync, no COPY, no session state, at a message boundary.
        The one rule for lending a pooled connection to another client (release and close)."""
        return (self.tx_status == _ZERO and not self.inflight and not self.unsynced and not self.to_backend
                and self.fstate.phase in _QUIET_PHASES and not self.swallowing and self.scanner.at_boundary
                and not (self.settings is not None and self.settings.pinned))

    def pristine(self) -> bool:
        """Nothing but what a new core holds: the I/O layer may drop this core while its session
        idles and make a new one at the next message (transaction pooling; an idle client stays
        small).  Conservative: a session that ever named a statement keeps its core (the server
        names it made are numbered per core), as does anything open, held, pending or dirty."""
        stmts = self.stmts
        settings = self.settings
        return (self.quiet() and self.fstate.phase is Phase.READY and not self.blocked and self.held is None
                and self.offloaded is None and self.refresh_retried is None and not self.events
                and not self.to_client and not self.markers and not self.parse_texts and not self.unnamed_single
                and not self.unnamed_spent and self.seg_sent == self.seg_done and not self.hold_seg
                and self.copy.check is None and not self.copy.failed and not self.backend_fatal
                and self.ledger.empty() and (stmts is None or stmts.empty())
                and not (settings is not None and (settings.dirty or settings.reset)))

    # ------------------------------------------------------------------ client -> backend

    def process_client(self) -> None:
        """Handle every complete client message in the buffer until the relay blocks."""
        buf = self.buf
        accept = self.fstate.accept
        handlers = _HANDLERS
        if self.held is not None:
            held, self.held = self.held, None
            handlers[held[0]](self, *held)
        fstate = self.fstate
        while not self.blocked:
            data, pos = buf.window()
            if pos >= len(data):  # all read (the common end of the loop: no call to next_message)
                break
            # verbatim_run stops at once at any other type: skip the call (a Query, a Parse)
            if fstate.phase is Phase.READY and data[pos] in _VERBATIM_FIRST:
                self._relay_verbatim_run()
            msg = buf.next_message()
            if msg is None:
                break
            t, payload = msg
            action = accept(t[0])
            if action is Action.PROCESS:
                handlers[t](self, t, payload)
                if t in _EXTENDED_TYPES:
                    self.unsynced = True
                elif t == b"S":
                    self.unsynced = False
            elif action is Action.TERMINATE:
                self.events.append((TERMINATE,))
                return

    def resume_with(self, t: bytes, payload: bytes, decision=None, *, offloaded: bool = False) -> None:
        """An awaited step is over: handle ``t``/``payload`` again first (``decision``: the result
        of an off-loop analysis), then go on reading."""
        if offloaded:
            self.offloaded = (payload, decision)
        self.held = (t, payload)
        self.blocked = False

    def _relay_verbatim_run(self) -> None:
        """Forward the longest run of messages that pass unchanged as one slice (proxy/wire/verbatim.py)."""
        data, pos = self.buf.window()
        ledger = self.ledger
        checked = ledger.checked or self.audited
        sconn = self.sconn
        end, kinds = verbatim_run(
            data, pos, self.buf.max_length,
            binds_free=not checked and not self.unnamed_single and not (self.stmts and self.stmts.setting),
            executes_free=not checked, pooled=self.pooled,
            own_unnamed=sconn is not None and sconn.unnamed_owner is self)
        if end == pos:
            return
        inflight = self.inflight
        unsynced = self.unsynced
        for t in kinds:
            if t == _BIND_B:
                ledger.bind_sent(self.seg_sent + 1, "", None)
            elif t == _EXECUTE_B:
                inflight.append(Entry(b"X"))
            elif t == _SYNC_B:
                inflight.append(Entry(b"S"))
                self.seg_sent += 1
            if t == _SYNC_B:
                unsynced = False
            elif t != _FLUSH_B:
                unsynced = True
        self.to_backend.append(bytes(data[pos:end]))
        self.buf.consume_to(end)
        self.unsynced = unsynced

    def _hold(self, t: bytes, payload: bytes, seg: int) -> None:
        """Keep this message (and everything after it) until PostgreSQL has answered segment ``seg``."""
        self.held = (t, payload)
        self.hold_seg = seg
        self.blocked = True

    def _check(self, sql: str, origin: Origin):
        """gate.check; a policy that crashes refuses the statement (fail closed)."""
        try:
            decision = self.gate.check(sql, origin)
        except Exception:
            log.exception("session %s: policy check failed", self.session_id)
            return Refuse("XX000", "internal error in tenantgate while checking the statement")
        if not isinstance(decision, (Forward, Refuse)):
            log.error("session %s: policy returned %r", self.session_id, decision)
            return Refuse("XX000", "internal error in tenantgate while checking the statement")
        return decision

    def _large_statement(self, t: bytes, payload: bytes, sql: str, origin: Origin):
        """A long statement: refused above limits.max_statement_bytes, else analysed away from the
        event loop while this session waits.  Returns the decision when it is ready, or None when
        the analysis was asked for (the message is handled again afterwards)."""
        limits = self.limits
        if len(payload) > limits.max_statement_bytes:
            return too_long(len(payload), limits.max_statement_bytes)
        off = self.offloaded
        if off is not None and off[0] is payload:
            self.offloaded = None
            # warmed up: the gate's check is now a cache hit (or the analysis was refused)
            return self._check(sql, origin) if off[1] is None else off[1]
        pair = self.gate.warm_up(sql, origin)
        if pair is not None:  # the cold rewrite runs in a forked child (own GIL, own memory)
            self.blocked = True
            self.events.append((WARM_UP, t, payload, pair))
            return None
        if self.seg_done < self.seg_sent:
            # the gate must not be checked in another thread while a ReadyForQuery for this
            # session may arrive (on_ready_for_query): wait until every segment sent is answered
            self._hold(t, payload, self.seg_sent)
            return None
        self.blocked = True
        self.events.append((OFFLOAD, t, payload, sql, origin))
        return None

    def _recheck_after_refresh(self, t: bytes, payload: bytes) -> bool:
        """A statement names a relation the catalog snapshot lacks: it may have been created
        since (migrations run directly on PostgreSQL).  Ask for a fresh snapshot and check the
        message once more before refusing it.  True when the message will come back."""
        if self.refresh_retried is payload:
            self.refresh_retried = None
            return False
        if not self.can_refresh:
            return False
        self.refresh_retried = payload
        self.blocked = True
        self.events.append((REFRESH, t, payload))
        return True

    def _on_query(self, t: bytes, payload: bytes) -> None:
        if payload.find(b"\0") == len(payload) - 1 >= 0:
            try:
                sql = payload[:-1].decode("utf-8")
            except UnicodeDecodeError:
                sql = m.decode_query(payload).sql  # raises the precise ProtocolError
        else:
            sql = m.decode_query(payload).sql
        if len(payload) > self.limits.statement_offload_bytes:
            decision = self._large_statement(t, payload, sql, Origin.SIMPLE)
            if decision is None:  # being analysed off the event loop: this message comes back
                return
        else:
            decision = self._check(sql, Origin.SIMPLE)
        if isinstance(decision, Refuse):
            if decision.sqlstate == UNDEFINED_TABLE and self._recheck_after_refresh(t, payload):
                return
            self._refuse_simple(sql, decision)
            return
        if self.audited:
            self._audit_then(decision, None, lambda h: self._forward_query(sql, payload, decision, h),
                             lambda r: self._refuse_simple(sql, r))
            return
        self._forward_query(sql, payload, decision, None)

    def _unnamed_dropped(self) -> None:
        """A simple Query (or its marker) drops the unnamed statement."""
        self.unnamed_single = False
        if self.pooled:
            self.stmts.unnamed_dropped()
            self.sconn.unnamed_owner = None

    def _forward_query(self, sql: str, payload: bytes, decision: Forward, handle: Any) -> None:
        if self.pooled:
            self._note_session_state(decision)
        self._unnamed_dropped()
        self.to_backend.append(m.frame(b"Q", payload) if decision.sql == sql else m.encode_query(decision.sql))
        self.ledger.query_sent(self.seg_sent + 1)  # drops the unnamed statement and portal
        e = Entry(b"Q", decision, handle)
        if decision.sql != sql:
            e.texts = (sql, decision.sql)
        e.audited = self.audited
        self.inflight.append(e)
        self.seg_sent += 1
        self.counters.n_forwarded += 1

    def _on_parse(self, t: bytes, payload: bytes) -> None:
        p = m.decode_parse(payload)
        decision = None
        query = p.query
        if VOID_OID in p.param_types:  # pgjdbc's CallableStatement: arguments PostgreSQL drops
            try:
                query = drop_void_arguments(query, p.param_types)
            except PolicyRefusal as e:
                decision = e.to_refuse()
        if decision is None and len(payload) > self.limits.statement_offload_bytes:
            decision = self._large_statement(t, payload, query, Origin.PARSE)
            if decision is None:  # being analysed off the event loop: this message comes back
                return
        if p.name and not self.pooled and not isinstance(decision, Refuse):  # pooled: renamed, see below
            exists = self.ledger.statement_exists(p.name, self.seg_sent + 1)
            if type(exists) is Wait:  # a Parse or Close of this name may still fail: wait for it
                self._hold(t, payload, exists.seg)
                return
            if exists:  # as PostgreSQL would answer; its statement stays what it is
                self._refuse_extended(p.query, Refuse("42P05", f'prepared statement "{p.name}" already exists'),
                                      lambda tok: m.encode_parse(p.name, tok))
                return
        if decision is None:
            decision = self._check(query, Origin.PARSE)
        if isinstance(decision, Refuse) and decision.sqlstate == UNDEFINED_TABLE \
                and self._recheck_after_refresh(t, payload):
            return
        if isinstance(decision, Forward) and decision.param_checks:
            decision = _check_declared_types(decision, p.param_types)
        if self.pooled and p.name and p.name in self.stmts.names and isinstance(decision, Forward):
            decision = Refuse("42P05", f'prepared statement "{p.name}" already exists')
        if isinstance(decision, Forward) and decision.single_use and p.name:
            decision = Refuse("0A000", "SET tenantgate.tenant cannot be a named prepared statement: it takes effect "
                                       "once, when tenantgate checks it",
                              hint="send it as a simple query, or as an unnamed statement")
        if isinstance(decision, Refuse):
            marker_name = p.name
            if self.pooled:
                if p.name:  # a name that exists nowhere (the client's own names are renamed)
                    self.marker_seq += 1
                    marker_name = f"tg_{self.session_id}_r{self.marker_seq}"
                else:  # the failing unnamed marker Parse drops the connection's unnamed statement
                    self.stmts.unnamed_parse = None
                    self.sconn.unnamed_owner = None
            self._refuse_extended(p.query, decision, lambda tok: m.encode_parse(marker_name, tok))
            return
        name = p.name
        if not name:
            self.unnamed_single = decision.single_use
            self.unnamed_spent = False
        if self.pooled:
            stmts = self.stmts
            if name:
                name = stmts.new_server_name(self.session_id)
            self._note_session_state(decision, name)
            if name:
                msg = m.encode_parse(name, decision.sql, p.param_types)
                stmts.remember(p.name, name, msg)
                self.sconn.prepared.add(name)
                stmts.parse_fifo.append((self.seg_sent + 1, False, name))
                self.to_backend.append(msg)
            else:
                stmts.parse_fifo.append((self.seg_sent + 1, False, None))
                msg = m.frame(t, payload) if decision.sql == p.query else m.encode_parse("", decision.sql, p.param_types)
                stmts.unnamed_parse = msg
                self.sconn.unnamed_owner = self
                self.to_backend.append(msg)
        else:
            if name:  # session mode: the name is PostgreSQL's, shared with SQL PREPARE (policy/session.py)
                _note_protocol_statement(self.gate, name, True)
            self.to_backend.append(m.frame(t, payload) if decision.sql == p.query
                                   else m.encode_parse(p.name, decision.sql, p.param_types))
        self.parse_texts.append((self.seg_sent + 1, p.query, decision.sql) if decision.sql != p.query
                                else (self.seg_sent + 1, None, None))
        # effective when PostgreSQL answers ParseComplete (proxy/session/ledger.py)
        self.ledger.parse_sent(self.seg_sent + 1, name, decision)
        self.counters.n_forwarded += 1

    def _on_bind(self, t: bytes, payload: bytes) -> None:
        ledger = self.ledger
        seg = self.seg_sent + 1
        inspect = self.audited or ledger.checked
        if inspect:  # which statement will PostgreSQL bind? Wait while an earlier segment may change it
            name = m.bind_statement_name(payload)
            found = ledger.statement(self.stmts.names.get(name, NO_STATEMENT) if self.pooled and name else name, seg)
            if type(found) is Wait:
                self._hold(t, payload, found.seg)
                return
        if self.unnamed_single and m.bind_statement_name(payload) == "":
            if self.unnamed_spent:  # its tenant switch was checked for one execution
                self._refuse_extended("<bind of the unnamed statement>", Refuse(
                    "0A000", "the unnamed statement (SET tenantgate.tenant) has already run once",
                    hint="send the SET again to switch tenants"),
                    lambda tok: m.encode_bind(m.decode_bind(payload).portal, tok))
                return
            self.unnamed_spent = True
        if self.pooled:
            name = m.bind_statement_name(payload)
            server = self._server_statement(name, "bind", lambda tok: m.encode_bind(m.decode_bind(payload).portal, tok))
            if server is None:
                return
            if name:
                z = payload.index(b"\0")
                payload = payload[:z + 1] + server.encode() + payload[payload.index(b"\0", z + 1):]
            if self.stmts.setting and server in self.stmts.setting:
                self.settings.dirty = True
        if not inspect:
            m.validate_bind(payload)  # malformed messages are refused even when nothing is checked
            ledger.bind_sent(seg, m.decode_text(payload[:payload.index(b"\0")]), None)
            self.to_backend.append(m.frame(t, payload))
            return
        bind = m.decode_bind(payload)
        decision = ledger.statement(bind.statement, seg)  # exact: waited for above
        if decision is None or not decision.param_checks:
            ledger.bind_sent(seg, bind.portal, decision, bind.params)
            self.to_backend.append(m.frame(t, payload))
            return
        for idx, check in decision.param_checks:
            value = bind.params[idx] if 0 <= idx < len(bind.params) else None
            try:
                ok = idx < len(bind.params) and bool(check.accepts(bind.format_of(idx), value))
                why = check.describe()
            except Exception as e:  # a broken check fails closed
                ok, why = False, f"check failed: {e}"
            if not ok:
                refusal = Refuse("42501", f"bound parameter ${idx + 1} is not allowed: {why}")
                self._refuse_extended(f"<bind of statement {bind.statement!r}>", refusal,
                                      lambda tok: m.encode_bind(bind.portal, tok))
                return
        ledger.bind_sent(seg, bind.portal, decision, bind.params)  # effective at BindComplete
        self.to_backend.append(m.frame(t, payload))

    def _on_execute(self, t: bytes, payload: bytes) -> None:
        ex = m.decode_execute(payload)
        ledger = self.ledger
        if not ledger.checked and not self.audited:
            self.to_backend.append(m.frame(t, payload))
            self.inflight.append(Entry(b"X"))
            return
        info = ledger.portal(ex.portal, self.seg_sent + 1)
        if type(info) is Wait:  # the Bind of an earlier segment may still fail: wait for its answer
            self._hold(t, payload, info.seg)
            return
        if info is not None and info[0] is None:
            info = None
        if not self.audited:
            self.to_backend.append(m.frame(t, payload))
            self.inflight.append(Entry(b"X", info[0] if info else None))
            return
        if info is None:
            refusal = Refuse("42501", "cannot execute a portal whose statement tenantgate did not see",
                             hint="prepare statements with the Parse message through tenantgate")
            self._refuse_extended("<execute>", refusal, lambda tok: m.encode_execute(tok))
            return
        decision, params = info

        def forward(handle: Any) -> None:
            self.to_backend.append(m.frame(t, payload))
            e = Entry(b"X", decision, handle)
            e.audited = True
            self.inflight.append(e)

        self._audit_then(decision, params, forward,
                         lambda r: self._refuse_extended(decision.sql, r, lambda tok: m.encode_execute(tok)))

    def _on_describe(self, t: bytes, payload: bytes) -> None:
        if payload[:1] not in (b"S", b"P") or payload.find(b"\0") != len(payload) - 1:
            m.decode_describe(payload)  # raises the precise ProtocolError
        if self.pooled and payload[:1] == b"S":
            name = m.decode_describe(payload).name
            server = self._server_statement(name, "describe", lambda tok: m.encode_describe(b"S", tok))
            if server is None:
                return
            payload = b"S" + server.encode() + b"\0"
        self.to_backend.append(m.frame(t, payload))

    def _on_close(self, t: bytes, payload: bytes) -> None:
        c = m.decode_close(payload)
        name = c.name
        if self.pooled and c.kind == b"S" and name:
            # closing a statement that does not exist is not an error in PostgreSQL either
            name = self.stmts.close(name)
            self.sconn.prepared.discard(name)
            payload = b"S" + name.encode() + b"\0"
        elif self.pooled and c.kind == b"S":  # the unnamed statement: close it only if it is this client's
            if self.sconn.unnamed_owner is self:
                self.sconn.unnamed_owner = None
            else:
                payload = b"S" + NO_STATEMENT.encode() + b"\0"
            self.stmts.unnamed_dropped()
            self.unnamed_single = False
        elif c.kind == b"S" and name:
            _note_protocol_statement(self.gate, name, False)
        self.ledger.close_sent(self.seg_sent + 1, c.kind, name)  # effective at CloseComplete
        self.to_backend.append(m.frame(t, payload))

    def _on_empty(self, t: bytes, payload: bytes) -> None:
        if payload:
            raise ProtocolError(f"invalid message format: {t.decode()} message has a body", reason="malformed")
        self.to_backend.append(m.frame(t, payload))

    def _on_sync(self, t: bytes, payload: bytes) -> None:
        if payload:
            raise ProtocolError("invalid message format: Sync message has a body", reason="malformed")
        self.to_backend.append(m.SYNC)
        if self.fstate.phase is Phase.COPY_IN:
            return  # PostgreSQL ignores Sync during COPY FROM STDIN: no ReadyForQuery follows
        self.inflight.append(Entry(b"S"))
        self.seg_sent += 1

    def _on_function_call(self, t: bytes, payload: bytes) -> None:
        self._refuse_simple("<FunctionCall message>", FUNCTION_CALL_REFUSAL)

    def _on_copy_message(self, t: bytes, payload: bytes) -> None:
        if self.fstate.phase is not Phase.COPY_IN:
            if self.inflight:  # CopyInResponse may still be on its way: wait for it (or ReadyForQuery)
                self.held = (t, payload)
                self.blocked = True
            # otherwise PostgreSQL would ignore it too
            return
        head = self.inflight[0] if self.audited and self.inflight else None
        self.copy.message(t, payload, self.to_backend, head if head is not None and head.audited else None,
                          self.copy_full, self._refuse_copy)
        if t != b"d":
            self._end_copy()

    def _end_copy(self) -> None:
        self.fstate.copy_in_ended()
        self.copy.reset()


_HANDLERS: dict[bytes, Callable[[Relay, bytes, bytes], None]] = {
    b"Q": Relay._on_query, b"P": Relay._on_parse, b"B": Relay._on_bind,
    b"E": Relay._on_execute, b"D": Relay._on_describe, b"H": Relay._on_empty,
    b"C": Relay._on_close, b"S": Relay._on_sync, b"d": Relay._on_copy_message,
    b"c": Relay._on_copy_message, b"f": Relay._on_copy_message,
    b"F": Relay._on_function_call,
}


def too_long(n: int, limit: int) -> Refuse:
    """The refusal of a statement above ``limits.max_statement_bytes``."""
    return Refuse("54000", f"statement too long: {n} bytes, tenantgate accepts at most {limit}",
                  hint="raise limits.max_statement_bytes in tenantgate's config, or send bulk data with COPY",
                  reason="other")


def _note_protocol_statement(gate, name: str, exists: bool) -> None:
    note = getattr(gate, "protocol_statement", None)
    if note is not None:
        note(name, exists)


def _check_declared_types(decision: Forward, param_types) -> Forward | Refuse:
    """A checked parameter must not be declared with a type that changes its value after the check."""
    for idx, check in decision.param_checks:
        declared = param_types[idx] if idx < len(param_types) else 0
        if declared != 0 and declared not in getattr(check, "type_oids", ()):
            return Refuse("42501", f"parameter ${idx + 1} is declared with type OID {declared}, which is not "
                                   f"allowed for it: {check.describe()}",
                          hint="leave the parameter's type unspecified or use the column's type")
    return decision

