"""Transaction pooling: this client's prepared statements on borrowed connections.

A transaction-pooled client shares backend connections with other clients, so its named
statements are prepared under server-side names of its own (``tg_<session>_<n>``) and
prepared again on a connection that lacks them; the unnamed statement is tracked per
connection (``ServerConn.unnamed_owner``) and re-sent from the client's last unnamed Parse
when another client's stands there.  Pure bookkeeping: the relay core decides and sends.
"""

from __future__ import annotations

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
