"""Transaction pooling: this client's prepared statements on borrowed connections.

A transaction-pooled client shares backend connections with other clients, so its named
statements are prepared under server-side names of its own (``tg_<session>_<n>``) and
prepared again on a connection that lacks them; the unnamed statement is tracked per
connection (``ServerConn.unnamed_owner``) and re-sent from the client's last unnamed Parse
when another client's stands there.  Pure bookkeeping (:class:`PooledStatements`), and the relay core's steps that use it
(:class:`PooledStatementSteps`, a base class of :class:`proxy.session.relay.Relay`).
"""

from __future__ import annotations

from typing import Callable

from proxy.seam import Forward, Refuse

#: a statement name no client uses: a Close or Describe of it is answered by PostgreSQL as for
#: a statement that does not exist
NO_STATEMENT = "tenantgate_no_such_statement"


class PooledStatements:
    __slots__ = ("names", "parses", "seq", "unnamed_parse", "setting", "parse_fifo")

    def __init__(self) -> None:
        self.names: dict[str, str] = {}  # client statement name -> server statement name
        self.parses: dict[str, bytes] = {}  # server statement name -> its Parse message
        self.seq = 0
        self.unnamed_parse: bytes | None = None  # this client's unnamed statement (Parse message)
        # server names of statements that change settings ("" for the unnamed one): each Bind
        # of one makes the session read its settings back
        self.setting: set[str] | None = None
        # Parses sent and not yet answered: (segment, sent by the proxy itself?, server name or
        # None for the unnamed statement), oldest first
        self.parse_fifo: list[tuple[int, bool, str | None]] = []

    def empty(self) -> bool:
        """Never named a statement, and holds nothing now (a new instance's state)."""
        return (not self.names and not self.parses and self.seq == 0 and self.unnamed_parse is None
                and not self.setting and not self.parse_fifo)

    def new_server_name(self, session_id: str) -> str:
        self.seq += 1
        return f"tg_{session_id}_{self.seq}"

    def remember(self, client_name: str, server_name: str, parse: bytes) -> None:
        self.names[client_name] = server_name
        self.parses[server_name] = parse

    def forget(self, server_name: str) -> None:
        """The statement does not exist (its Parse failed, or it was closed)."""
        self.parses.pop(server_name, None)
        if self.setting:
            self.setting.discard(server_name)
        for client_name, s in list(self.names.items()):
            if s == server_name:
                del self.names[client_name]

    def close(self, client_name: str) -> str:
        """A Close of a named statement: its server name (NO_STATEMENT when unknown)."""
        server = self.names.pop(client_name, NO_STATEMENT)
        self.parses.pop(server, None)
        return server

    def unnamed_dropped(self) -> None:
        """The unnamed statement is gone (a simple Query, a Close, a failed Parse)."""
        self.unnamed_parse = None
        if self.setting:
            self.setting.discard("")

    def changes_settings(self, server_name: str) -> None:
        if self.setting is None:
            self.setting = set()
        self.setting.add(server_name)


class PooledStatementSteps:
    """The relay core's transaction-mode statement steps (state lives in :class:`proxy.session.relay.Relay`)."""

    __slots__ = ()

    def _note_session_state(self, decision: Forward, server_name: str | None = None) -> None:
        """Transaction mode: what this statement leaves on the connection (pins it, or dirties settings).
        ``server_name``: the statement it is prepared as (Parse), "" for the unnamed one."""
        stmts, settings = self.stmts, self.settings
        if server_name is not None and stmts.setting:
            stmts.setting.discard(server_name)  # the name now holds this statement
        if decision.resets_settings:
            settings.reset = True  # the read-back puts the connection-time settings back
        if decision.pins_session:
            settings.pinned = True
        elif decision.statement_class == "set" or decision.changes_settings:
            settings.dirty = True
            if server_name is not None:  # each later Bind of it dirties the settings again
                stmts.changes_settings(server_name)

    def _ensure_prepared(self, server_name: str) -> None:
        """Prepare one of this client's statements again on the borrowed connection if it lacks it."""
        sc = self.sconn
        if server_name not in sc.prepared:
            self.to_backend.append(self.stmts.parses[server_name])
            self.ledger.placeholder_parse_sent(self.seg_sent + 1)
            self.parse_texts.append((self.seg_sent + 1, None, None))
            self.stmts.parse_fifo.append((self.seg_sent + 1, True, server_name))
            sc.prepared.add(server_name)

    def _server_statement(self, name: str, what: str, marker: Callable[[str], bytes]) -> str | None:
        """The server-side name of client statement ``name`` (prepared on this connection), or None
        after refusing: a transaction-pooled client only reaches statements it prepared itself."""
        stmts = self.stmts
        if not name:
            sc = self.sconn
            if sc.unnamed_owner is not self:  # the connection's unnamed statement is not this client's
                if stmts.unnamed_parse is None:
                    self._refuse_extended(f"<{what} of the unnamed statement>",
                                          Refuse("26000", "unnamed prepared statement does not exist"), marker)
                    return None
                self.to_backend.append(stmts.unnamed_parse)
                self.ledger.placeholder_parse_sent(self.seg_sent + 1)
                self.parse_texts.append((self.seg_sent + 1, None, None))
                stmts.parse_fifo.append((self.seg_sent + 1, True, None))
                sc.unnamed_owner = self
            return ""
        server = stmts.names.get(name)
        if server is None:
            self._refuse_extended(f"<{what} of statement {name!r}>",
                                  Refuse("26000", f'prepared statement "{name}" does not exist'), marker)
            return None
        self._ensure_prepared(server)
        return server
