"""The frontend (client-side) protocol state machine, as a transition table.

It knows which message types a client may send in each phase and what each
message does to the phase.  It does not look at SQL and does no I/O; the
session's relay core (``proxy.session.relay``) asks it ``accept(type)`` for every
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


def _transitions() -> dict[Phase, dict[int, tuple[Action, Phase]]]:
    """The table: for each phase, message type -> (action, next phase).  A type missing from a
    phase's row is a protocol violation in that phase (see :data:`_VIOLATION`)."""
    table: dict[Phase, dict[int, tuple[Action, Phase]]] = {phase: {} for phase in Phase}
    for t in FRONTEND_TYPES:
        table[Phase.READY][t] = (Action.PROCESS, Phase.READY)
        # after an extended-protocol error PostgreSQL skips everything up to Sync
        table[Phase.DISCARD_UNTIL_SYNC][t] = (Action.DISCARD, Phase.DISCARD_UNTIL_SYNC)
    table[Phase.DISCARD_UNTIL_SYNC][ord("S")] = (Action.PROCESS, Phase.READY)
    # COPY FROM STDIN: CopyData, CopyDone, CopyFail; Flush and Sync are allowed (and ignored)
    for t in b"dcfHS":
        table[Phase.COPY_IN][t] = (Action.PROCESS, Phase.COPY_IN)
    for phase in (Phase.READY, Phase.DISCARD_UNTIL_SYNC, Phase.COPY_IN):
        table[phase][ord("X")] = (Action.TERMINATE, Phase.TERMINATED)
    return table


TRANSITIONS = _transitions()
#: the error for a known message type that a phase does not accept
_VIOLATION = {
    Phase.COPY_IN: ("unexpected message type 0x{t:02X} during COPY from stdin", "copy"),
    Phase.TERMINATED: ("message after Terminate", "terminated"),
}


class FrontendState:
    """Tracks the client's phase.  ``accept(t)`` classifies one message type by :data:`TRANSITIONS`."""

    __slots__ = ("phase", "_row")

    def __init__(self) -> None:
        self._enter(Phase.READY)

    def _enter(self, phase: Phase) -> None:
        self.phase = phase
        self._row = TRANSITIONS[phase]  # (an Enum member hashes in Python code: looked up once per change)

    def accept(self, t: int) -> Action:
        step = self._row.get(t)
        if step is None:
            if t not in FRONTEND_TYPES:
                raise ProtocolError(
                    f"invalid frontend message type {t}" + (f" ('{chr(t)}')" if 32 < t < 127 else ""),
                    reason="unknown_type",
                )
            message, reason = _VIOLATION[self.phase]
            raise ProtocolError(message.format(t=t), reason=reason)
        action, phase = step
        if phase is not self.phase:
            self._enter(phase)
        return action

    def error_in_extended(self) -> None:
        self._enter(Phase.DISCARD_UNTIL_SYNC)

    def copy_in_started(self) -> None:
        self._enter(Phase.COPY_IN)

    def copy_in_ended(self) -> None:
        if self.phase is Phase.COPY_IN:
            self._enter(Phase.READY)
