"""The one receive buffer: frames PostgreSQL messages out of a byte stream.

Regular messages are ``type byte + int32 length (including itself) + payload``;
the startup packet has no type byte.  A length under 4 (or 8 for startup) or
over ``max_length`` raises :class:`ProtocolError` *before* anything is
allocated for it: memory is never reserved from an untrusted length.
"""

from __future__ import annotations

import struct

from proxy.wire.errors import ProtocolError

_I32 = struct.Struct("!I")
_unpack_i32 = _I32.unpack_from

STARTUP_MAX = 10_000  # PostgreSQL's own limit for the startup packet
AUTH_MESSAGE_MAX = 65_535  # PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH: SASL and password messages
#: bytes a client may have sent and not yet had read before it is authenticated (a startup
#: packet plus one authentication message, with room for TCP coalescing): beyond, FATAL 08P01
PREAUTH_BUFFER_MAX = STARTUP_MAX + 2 * AUTH_MESSAGE_MAX


class ReceiveBuffer:
    """Accumulates bytes; hands out complete messages.

    ``next_message()`` returns ``(type_byte, payload)`` (type as a 1-byte
    ``bytes``) or None when no complete message is buffered yet.
    ``next_startup()`` returns the startup packet payload (without length).
    ``take_frames()`` returns the longest prefix of complete messages as raw
    bytes together with their boundaries, for bulk forwarding.
    """

    __slots__ = ("_buf", "_pos", "max_length")

    def __init__(self, max_length: int = 64 * 1024 * 1024):
        self._buf = bytearray()
        self._pos = 0
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def compact(self) -> None:
        """Give back the storage of consumed bytes (e.g. after startup, before a session idles)."""
        self._buf = bytearray(self._buf[self._pos:])
        self._pos = 0

    def _compact(self) -> None:
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0

    def peek_type(self) -> bytes | None:
        if self._pos < len(self._buf):
            return bytes(self._buf[self._pos : self._pos + 1])
        return None

    def next_message(self) -> tuple[bytes, bytes] | None:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 5:
            return None
        (length,) = _unpack_i32(buf, pos + 1)
        if length < 4:
            raise ProtocolError(f"invalid message length {length}", reason="bad_length")
        if length > self.max_length:
            raise ProtocolError(
                f"message length {length} exceeds the maximum of {self.max_length} bytes", reason="too_long"
            )
        end = pos + 1 + length
        if len(buf) < end:
            return None
        mtype = bytes(buf[pos : pos + 1])
        payload = bytes(buf[pos + 5 : end])
        self._pos = end
        self._compact()
        return mtype, payload

    def window(self) -> tuple[bytearray, int]:
        """The internal buffer and the offset of the first unread byte, for
        callers that scan many small messages in place (the relay's hot path).
        Read only; hand back what was used with :meth:`consume_to`."""
        return self._buf, self._pos

    def consume_to(self, pos: int) -> None:
        """Mark everything before ``pos`` (an offset into :meth:`window`) as read."""
        self._pos = pos
        self._compact()

    def next_startup(self) -> bytes | None:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 4:
            return None
        (length,) = _unpack_i32(buf, pos)
        if length < 8:
            raise ProtocolError(f"invalid startup packet length {length}", reason="bad_length")
        if length > STARTUP_MAX:
            raise ProtocolError(f"startup packet length {length} exceeds {STARTUP_MAX} bytes", reason="too_long")
        end = pos + length
        if len(buf) < end:
            return None
        payload = bytes(buf[pos + 4 : end])
        self._pos = end
        self._compact()
        return payload

    def take_rest(self) -> bytes:
        """Everything still buffered (e.g. bytes that arrived before a TLS switch)."""
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return rest
