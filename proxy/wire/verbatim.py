"""The verbatim-run scanner: the longest run of frontend messages that pass unchanged.

In the extended protocol most traffic is Bind / Describe / Execute / Sync / Flush that the
proxy forwards exactly as received.  :func:`verbatim_run` finds the longest run of such
messages at the front of the receive buffer, so the session forwards it as one slice without
building a message object per message.  What may be in the run depends on the session's
state, which the caller passes as flags; anything else, or anything malformed, ends the run
(the caller's generic path then handles that message and raises the precise ProtocolError).

Pure: no I/O, no session state.
"""

from __future__ import annotations

import struct

from proxy.wire import messages as m
from proxy.wire.errors import ProtocolError

_unpack_i32 = struct.Struct("!I").unpack_from

BIND = 66  # B
EXECUTE = 69  # E
SYNC = 83  # S
DESCRIBE = 68  # D
FLUSH = 72  # H
_STATEMENT = 83  # Describe 'S'
_PORTAL = 80  # Describe 'P'


def verbatim_run(data, pos: int, max_len: int, *, binds_free: bool, executes_free: bool, pooled: bool,
                 own_unnamed: bool) -> tuple[int, bytes]:
    """Scan ``data[pos:]``.  Returns ``(end, kinds)``: the run is ``data[pos:end]`` and
    ``kinds`` holds the type byte of each message in it, in order.

    - ``binds_free``: a Bind of the unnamed portal needs no check (no checked statement, no audit);
    - ``executes_free``: an Execute of the unnamed portal needs no check;
    - ``pooled``: transaction pooling — named statements are renamed, so only the unnamed
      statement passes, and only when the connection's unnamed statement is this client's
      (``own_unnamed``).
    """
    n = len(data)
    kinds = bytearray()
    while n - pos >= 5:
        t = data[pos]
        (length,) = _unpack_i32(data, pos + 1)
        end = pos + 1 + length
        if length < 4 or length > max_len or end > n:
            break
        if t == BIND:
            # only the unnamed portal here (its BindComplete is recorded by the caller)
            if not binds_free or data[pos + 5] != 0:
                break
            if pooled and (pos + 6 >= end or data[pos + 6] != 0 or not own_unnamed):
                break
            try:
                m.validate_bind(data[pos + 5:end])
            except ProtocolError:
                break
        elif t == EXECUTE:
            if not executes_free or length != 9 or data[pos + 5] != 0:
                break
        elif t == SYNC:
            if length != 4:
                break
        elif t == DESCRIBE:
            if length < 6 or data[pos + 5] not in (_STATEMENT, _PORTAL) or data.find(b"\0", pos + 6, end) != end - 1:
                break
            if pooled and data[pos + 5] == _STATEMENT and (length > 6 or not own_unnamed):
                break
        elif t == FLUSH:
            if length != 4:
                break
        else:
            break
        kinds.append(t)
        pos = end
    return pos, bytes(kinds)
