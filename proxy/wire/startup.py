"""The first packet a client sends: SSLRequest, GSSENCRequest, CancelRequest or StartupMessage."""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass, field

from proxy.wire.errors import FEATURE_NOT_SUPPORTED, ProtocolError
from proxy.wire.messages import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
    PROTOCOL_3_0,
    SSL_REQUEST_CODE,
    Reader,
)


@dataclass(frozen=True, slots=True)
class SSLRequest:
    pass


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    pass


@dataclass(frozen=True, slots=True)
class CancelRequest:
    pid: int
    secret: int


@dataclass(frozen=True, slots=True)
class StartupMessage:
    params: dict[str, str] = field(default_factory=dict)

    @property
    def user(self) -> str:
        return self.params.get("user", "")

    @property
    def database(self) -> str:
        return self.params.get("database") or self.user


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def parse_startup_packet(payload: bytes) -> StartupPacket:
    """``payload`` is the packet without its length word."""
    if len(payload) < 4:
        raise ProtocolError("invalid startup packet layout", reason="bad_startup")
    (code,) = struct.unpack_from("!i", payload, 0)
    if code == SSL_REQUEST_CODE and len(payload) == 4:
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE and len(payload) == 4:
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if len(payload) != 12:
            raise ProtocolError("invalid length of cancel request packet", reason="bad_startup")
        pid, secret = struct.unpack_from("!ii", payload, 4)
        return CancelRequest(pid, secret)
    if code != PROTOCOL_3_0:
        major, minor = (code >> 16) & 0xFFFF, code & 0xFFFF
        raise ProtocolError(
            f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0",
            sqlstate=FEATURE_NOT_SUPPORTED,
            reason="bad_protocol_version",
        )
    r = Reader(payload)
    r.pos = 4
    params: dict[str, str] = {}
    while True:
        name = r.cstring()
        if name == "":
            break
        if name in params:
            raise ProtocolError(f"duplicate startup parameter \"{name}\"", reason="bad_startup")
        # interned: the sessions of one application share their user, database and settings
        # strings (an idle session keeps a few of them)
        params[sys.intern(name)] = sys.intern(r.cstring())
    r.end()
    if not params.get("user"):
        raise ProtocolError("no PostgreSQL user name specified in startup packet", reason="bad_startup")
    return StartupMessage(params)


_PG_SPACE = frozenset(" \t\n\r\f\v")


def parse_options(options: str) -> dict[str, str]:
    """Parse the libpq ``options`` startup parameter (``-c a=b --c=d``) into a dict.

    Backslash escapes a space, like PostgreSQL.  Anything that is not a
    ``-c name=value`` / ``--name=value`` setting raises ProtocolError.
    """
    words: list[str] = []
    cur: list[str] = []
    esc = False
    for ch in options:
        if esc:
            cur.append(ch)
            esc = False
        elif ch == "\\":
            esc = True
        elif ch in _PG_SPACE:  # PostgreSQL splits options on ASCII white space only (pg_split_opts)
            if cur:
                words.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        words.append("".join(cur))
    out: dict[str, str] = {}
    i = 0
    while i < len(words):
        w = words[i]
        if w == "-c":
            if i + 1 >= len(words):
                raise ProtocolError("invalid command-line argument in options: -c needs name=value", reason="bad_startup")
            setting = words[i + 1]
            i += 2
        elif w.startswith("-c"):
            setting = w[2:]
            i += 1
        elif w.startswith("--"):
            setting = w[2:]
            i += 1
        else:
            raise ProtocolError(f"invalid command-line argument in options: {w}", reason="bad_startup")
        name, eq, value = setting.partition("=")
        if not eq or not name:
            raise ProtocolError(f"invalid command-line argument in options: {setting}", reason="bad_startup")
        out[name.replace("-", "_")] = value
    return out
