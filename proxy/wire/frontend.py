"""The frontend (client-side) protocol state machine, as a transition table.

It knows which message types a client may send in each phase and what each
message does to the phase.  It does not look at SQL and does no I/O; the
session (``proxy.client_session``) asks it ``accept(type)`` for every
message and acts on the answer.
"""

from __future__ import annotations

import enum

from proxy.wire.errors import ProtocolError


class Phase(enum.Enum):
    READY = "ready"  # normal operation: simple and extended protocol
    DISCARD_UNTIL_SYNC = "discard"  # an extended-protocol error: skip until Sync
    COPY_IN = "copy_in"  # after CopyInResponse: CopyData / CopyDone / CopyFail
    TERMINATED = "terminated"


#: every message type a client may send after startup
FRONTEND_TYPES = frozenset(b"QPBDEHSCdcfFX")
EXTENDED = frozenset(b"PBDEHC")


class Action(enum.Enum):
    PROCESS = "process"  # handle the message
    DISCARD = "discard"  # silently drop it (like PostgreSQL)
    TERMINATE = "terminate"


class FrontendState:
    """Tracks the client's phase.  ``accept(t)`` classifies one message type."""

    __slots__ = ("phase",)

    def __init__(self) -> None:
        self.phase = Phase.READY

    def accept(self, t: int) -> Action:
        if t not in FRONTEND_TYPES:
            raise ProtocolError(
                f"invalid frontend message type {t}" + (f" ('{chr(t)}')" if 32 < t < 127 else ""),
                reason="unknown_type",
            )
        phase = self.phase
        if t == 88:  # X
            self.phase = Phase.TERMINATED
            return Action.TERMINATE
        if phase is Phase.READY:
            return Action.PROCESS
        if phase is Phase.DISCARD_UNTIL_SYNC:
            if t == 83:  # S
                self.phase = Phase.READY
                return Action.PROCESS
            return Action.DISCARD
        if phase is Phase.COPY_IN:
            if t in (100, 99, 102):  # d c f
                return Action.PROCESS
            if t in (72, 83):  # Flush and Sync are allowed (and ignored by the server) during COPY
                return Action.PROCESS
            raise ProtocolError(f"unexpected message type 0x{t:02X} during COPY from stdin", reason="copy")
        raise ProtocolError("message after Terminate", reason="terminated")

    def error_in_extended(self) -> None:
        self.phase = Phase.DISCARD_UNTIL_SYNC

    def copy_in_started(self) -> None:
        self.phase = Phase.COPY_IN

    def copy_in_ended(self) -> None:
        if self.phase is Phase.COPY_IN:
            self.phase = Phase.READY
