"""Scanner for the backend's result stream: message boundaries without decoding rows.

PostgreSQL's replies are forwarded to the client in bulk.  The scanner walks
the headers only, passes runs of uninteresting messages (RowDescription,
DataRow, ...) through as raw byte chunks, and hands out the few messages the
proxy must look at (ReadyForQuery, ErrorResponse, CopyInResponse, and,
when asked, CommandComplete and friends) as ``Event`` tuples.  The body of a
large uninteresting message is never buffered: its bytes are passed on as
they arrive.
"""

from __future__ import annotations

import struct

from proxy.wire.errors import ProtocolError

_unpack_i32 = struct.Struct("!I").unpack_from

READY_FOR_QUERY = ord("Z")
ERROR_RESPONSE = ord("E")
COPY_IN_RESPONSE = ord("G")
COPY_OUT_RESPONSE = ord("H")
COPY_BOTH_RESPONSE = ord("W")
COMMAND_COMPLETE = ord("C")
EMPTY_QUERY = ord("I")
PORTAL_SUSPENDED = ord("s")
PARAMETER_STATUS = ord("S")
NOTICE_RESPONSE = ord("N")
PARSE_COMPLETE = ord("1")
BIND_COMPLETE = ord("2")
CLOSE_COMPLETE = ord("3")
DATA_ROW = ord("D")

#: what the relay always needs to see
BASE_INTERESTING = frozenset({READY_FOR_QUERY, ERROR_RESPONSE, COPY_IN_RESPONSE, COPY_BOTH_RESPONSE})
#: additionally needed to close audit records per statement
AUDIT_INTERESTING = BASE_INTERESTING | {COMMAND_COMPLETE, EMPTY_QUERY, PORTAL_SUSPENDED}

# An Event is (type as int, payload bytes, raw message bytes).
Event = tuple[int, bytes, bytes]


class BackendScanner:
    """Incremental scanner.  ``feed(data)`` returns a list whose items are
    either ``bytes`` (raw chunks to forward as they are) or ``Event`` tuples."""

    __slots__ = ("interesting", "max_length", "_skip", "_partial")

    def __init__(self, interesting: frozenset[int] = BASE_INTERESTING, max_length: int = 1 << 30 | 1 << 20):
        self.interesting = interesting
        self.max_length = max_length
        self._skip = 0  # bytes of an uninteresting message still to pass through
        self._partial = b""  # incomplete header or incomplete interesting message

    @property
    def at_boundary(self) -> bool:
        return self._skip == 0 and not self._partial

    def feed(self, data: bytes) -> list:
        out: list = []
        n = len(data)
        if self._skip:
            if self._skip >= n:
                self._skip -= n
                return [data]
            out.append(data[: self._skip])
            data = data[self._skip :]
            n = len(data)
            self._skip = 0
        if self._partial:
            data = self._partial + data
            n = len(data)
            self._partial = b""
        interesting = self.interesting
        pos = 0
        run = 0  # start of the current run of uninteresting bytes
        while pos < n:
            if n - pos < 5:
                self._partial = data[pos:]
                break
            t = data[pos]
            (length,) = _unpack_i32(data, pos + 1)
            if length < 4 or length > self.max_length:
                raise ProtocolError(f"invalid message length {length} from the server", reason="backend")
            end = pos + 1 + length
            if t in interesting:
                if end > n:
                    self._partial = data[pos:]
                    break
                if run < pos:
                    out.append(data[run:pos])
                out.append((t, data[pos + 5 : end], data[pos:end]))
                run = end
            elif end > n:
                self._skip = end - n
                pos = n
                break
            pos = end
        stop = n - len(self._partial)
        if run < stop:
            out.append(data if run == 0 and stop == n else data[run:stop])
        return out
