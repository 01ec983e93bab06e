"""What the relay core (proxy/session/relay.py) hands to the I/O layer besides bytes.

Events are tuples in ``Relay.events``; the first item is one of the kinds below (see the
relay's module docstring for the rest of each tuple).  :class:`RelayFatal` is raised when the
session must end.  Pure: no I/O.
"""

from __future__ import annotations

AUDIT = "audit"  # (AUDIT, decision, params, forward, refuse): audit, then forward(handle) or refuse(Refuse)
AUDIT_AFTER = "audit_after"  # (AUDIT_AFTER, handle, outcome): the statement's outcome for its audit record
OFFLOAD = "offload"  # (OFFLOAD, t, payload, sql, origin): analyse a long statement off the event loop
WARM_UP = "warm_up"  # (WARM_UP, t, payload, (compute, adopt)): analyse it in a forked child
REFRESH = "refresh"  # (REFRESH, t, payload): refresh the catalog, then check the message again
UNBLOCK = "unblock"  # (UNBLOCK,): a held message may go on, on the next loop iteration
TERMINATE = "terminate"  # (TERMINATE,): the client sent Terminate


class RelayFatal(Exception):
    """The session must end with this FATAL error."""

    def __init__(self, sqlstate: str, message: str, detail: str | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.detail = detail
