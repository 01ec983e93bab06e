"""PostgreSQL v3 messages: small immutable types plus encode/decode helpers.

Only the messages tenantgate must build or inspect are modelled.  Everything
else travels as raw bytes.  Every ``decode_*`` function raises only
:class:`ProtocolError` on malformed input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from proxy.wire.errors import ProtocolError

_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_HDR = struct.Struct("!cI")


# --------------------------------------------------------------------------- framing


def frame(mtype: bytes, payload: bytes = b"") -> bytes:
    """One message: type byte + length + payload."""
    return _HDR.pack(mtype, len(payload) + 4) + payload


def cstr(s: str) -> bytes:
    b = s.encode()
    if b"\0" in b:
        raise ProtocolError("string contains a zero byte")
    return b + b"\0"


class Reader:
    """Bounds-checked reader over one message payload."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def _need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise ProtocolError("message is truncated", reason="truncated")

    def byte(self) -> bytes:
        self._need(1)
        b = self.data[self.pos : self.pos + 1]
        self.pos += 1
        return b

    def int16(self) -> int:
        self._need(2)
        (v,) = _I16.unpack_from(self.data, self.pos)
        self.pos += 2
        return v

    def uint16(self) -> int:
        self._need(2)
        (v,) = _U16.unpack_from(self.data, self.pos)
        self.pos += 2
        return v

    def int32(self) -> int:
        self._need(4)
        (v,) = _I32.unpack_from(self.data, self.pos)
        self.pos += 4
        return v

    def raw(self, n: int) -> bytes:
        self._need(n)
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def cstring_bytes(self) -> bytes:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolError("string is not zero-terminated", reason="truncated")
        b = self.data[self.pos : end]
        self.pos = end + 1
        return b

    def cstring(self) -> str:
        return decode_text(self.cstring_bytes())

    def rest(self) -> bytes:
        b = self.data[self.pos :]
        self.pos = len(self.data)
        return b

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError("message has trailing bytes", reason="malformed")


def decode_text(b: bytes) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("invalid byte sequence for encoding \"UTF8\"", sqlstate="22021", reason="encoding")


# --------------------------------------------------------------------------- frontend messages

#: PostgreSQL keeps prepared statements and portals under the first 63 bytes of their names
#: (NAMEDATALEN - 1): two longer names with the same start are one statement to it, and two to a
#: proxy that tracks what stands behind each name.  Longer names are refused.
MAX_NAME_BYTES = 63


def _short_name(name: str, what: str) -> str:
    if len(name) > MAX_NAME_BYTES // 4 and len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ProtocolError(f"{what} name longer than {MAX_NAME_BYTES} bytes: PostgreSQL would truncate it, and "
                            "tenantgate does not accept names it reads differently", sqlstate="42622",
                            reason="malformed")
    return name


@dataclass(frozen=True, slots=True)
class Query:
    sql: str


@dataclass(frozen=True, slots=True)
class Parse:
    name: str
    query: str
    param_types: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Bind:
    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]

    def format_of(self, index: int) -> int:
        """Format code of parameter ``index`` (0 text, 1 binary) by the protocol's rules."""
        if not self.param_formats:
            return 0
        if len(self.param_formats) == 1:
            return self.param_formats[0]
        return self.param_formats[index]


@dataclass(frozen=True, slots=True)
class Describe:
    kind: bytes  # b"S" statement or b"P" portal
    name: str


@dataclass(frozen=True, slots=True)
class Execute:
    portal: str
    max_rows: int


@dataclass(frozen=True, slots=True)
class Close:
    kind: bytes
    name: str


def decode_query(payload: bytes) -> Query:
    r = Reader(payload)
    q = Query(r.cstring())
    r.end()
    return q


def encode_query(sql: str) -> bytes:
    return frame(b"Q", cstr(sql))


def decode_parse(payload: bytes) -> Parse:
    r = Reader(payload)
    name = _short_name(r.cstring(), "prepared statement")
    query = r.cstring()
    n = r.int16()
    if n < 0:
        raise ProtocolError("negative parameter count in Parse")
    r._need(4 * n)
    types = tuple(r.int32() & 0xFFFFFFFF for _ in range(n))
    r.end()
    return Parse(name, query, types)


def encode_parse(name: str, query: str, param_types: tuple[int, ...] = ()) -> bytes:
    return frame(
        b"P",
        cstr(name) + cstr(query) + _I16.pack(len(param_types)) + b"".join(struct.pack("!I", t) for t in param_types),
    )


def decode_bind(payload: bytes) -> Bind:
    r = Reader(payload)
    portal = _short_name(r.cstring(), "portal")
    stmt = _short_name(r.cstring(), "prepared statement")
    nf = r.int16()
    if nf < 0:
        raise ProtocolError("negative format count in Bind")
    r._need(2 * nf)
    formats = tuple(r.int16() for _ in range(nf))
    np_ = r.int16()
    if np_ < 0:
        raise ProtocolError("negative parameter count in Bind")
    if nf > 1 and nf != np_:
        raise ProtocolError(f"bind message has {nf} parameter formats but {np_} parameters")
    for f in formats:
        if f not in (0, 1):
            raise ProtocolError(f"unsupported format code: {f}", reason="malformed")
    params: list[bytes | None] = []
    for _ in range(np_):
        ln = r.int32()
        if ln == -1:
            params.append(None)
        elif ln < -1:
            raise ProtocolError(f"invalid parameter length {ln} in Bind")
        else:
            params.append(r.raw(ln))
    nr = r.int16()
    if nr < 0:
        raise ProtocolError("negative result format count in Bind")
    r._need(2 * nr)
    rformats = tuple(r.int16() for _ in range(nr))
    r.end()
    return Bind(portal, stmt, formats, tuple(params), rformats)


def encode_bind(
    portal: str,
    statement: str,
    params: tuple[bytes | None, ...] = (),
    param_formats: tuple[int, ...] = (),
    result_formats: tuple[int, ...] = (),
) -> bytes:
    parts = [cstr(portal), cstr(statement), _I16.pack(len(param_formats))]
    parts += [_I16.pack(f) for f in param_formats]
    parts.append(_I16.pack(len(params)))
    for p in params:
        parts.append(_I32.pack(-1) if p is None else _I32.pack(len(p)) + p)
    parts.append(_I16.pack(len(result_formats)))
    parts += [_I16.pack(f) for f in result_formats]
    return frame(b"B", b"".join(parts))


_unpack_h = _I16.unpack_from
_unpack_i = _I32.unpack_from


def validate_bind(payload: bytes) -> None:
    """Check a Bind message's structure without building objects (hot path).

    Raises ProtocolError exactly when :func:`decode_bind` would (names are
    checked for termination only, not for UTF-8)."""
    n = len(payload)
    p0 = payload.find(b"\0")
    if p0 < 0:
        raise ProtocolError("message is truncated", reason="truncated")
    p = payload.find(b"\0", p0 + 1)
    if p < 0 or p + 3 > n:
        raise ProtocolError("message is truncated", reason="truncated")
    if p0 > MAX_NAME_BYTES or p - p0 - 1 > MAX_NAME_BYTES:
        _short_name(decode_text(payload[:p0]), "portal")
        _short_name(decode_text(payload[p0 + 1:p]), "prepared statement")
    p += 1
    (nf,) = _unpack_h(payload, p)
    p += 2
    if nf < 0 or p + 2 * nf + 2 > n:
        raise ProtocolError("invalid format count in Bind", reason="truncated")
    for i in range(nf):
        if _unpack_h(payload, p + 2 * i)[0] not in (0, 1):
            raise ProtocolError("unsupported format code in Bind", reason="malformed")
    p += 2 * nf
    (np_,) = _unpack_h(payload, p)
    p += 2
    if np_ < 0 or (nf > 1 and nf != np_):
        raise ProtocolError(f"bind message has {nf} parameter formats but {np_} parameters")
    for _ in range(np_):
        if p + 4 > n:
            raise ProtocolError("message is truncated", reason="truncated")
        (ln,) = _unpack_i(payload, p)
        p += 4
        if ln > 0:
            p += ln
        elif ln < -1:
            raise ProtocolError(f"invalid parameter length {ln} in Bind")
    if p + 2 > n:
        raise ProtocolError("message is truncated", reason="truncated")
    (nr,) = _unpack_h(payload, p)
    if nr < 0 or p + 2 + 2 * nr != n:
        raise ProtocolError("invalid result format section in Bind", reason="malformed")


def bind_statement_name(payload: bytes) -> str:
    """Only the statement name of a Bind (cheap; for the hot path)."""
    r = Reader(payload)
    portal = r.cstring_bytes()
    if len(portal) > MAX_NAME_BYTES:
        _short_name(decode_text(portal), "portal")
    return _short_name(r.cstring(), "prepared statement")


def decode_describe(payload: bytes) -> Describe:
    r = Reader(payload)
    kind = r.byte()
    if kind not in (b"S", b"P"):
        raise ProtocolError(f"invalid DESCRIBE message subtype {kind!r}")
    d = Describe(kind, _short_name(r.cstring(), "portal" if kind == b"P" else "prepared statement"))
    r.end()
    return d


def encode_describe(kind: bytes, name: str) -> bytes:
    return frame(b"D", kind + cstr(name))


def decode_execute(payload: bytes) -> Execute:
    r = Reader(payload)
    e = Execute(_short_name(r.cstring(), "portal"), r.int32())
    r.end()
    return e


def encode_execute(portal: str = "", max_rows: int = 0) -> bytes:
    return frame(b"E", cstr(portal) + _I32.pack(max_rows))


def decode_close(payload: bytes) -> Close:
    r = Reader(payload)
    kind = r.byte()
    if kind not in (b"S", b"P"):
        raise ProtocolError(f"invalid CLOSE message subtype {kind!r}")
    c = Close(kind, _short_name(r.cstring(), "portal" if kind == b"P" else "prepared statement"))
    r.end()
    return c


def encode_close(kind: bytes, name: str) -> bytes:
    return frame(b"C", kind + cstr(name))


def decode_copy_fail(payload: bytes) -> str:
    r = Reader(payload)
    m = r.cstring()
    r.end()
    return m


SYNC = frame(b"S")
FLUSH = frame(b"H")
TERMINATE = frame(b"X")
COPY_DONE = frame(b"c")


def encode_copy_data(data: bytes) -> bytes:
    return frame(b"d", data)


def encode_copy_fail(message: str) -> bytes:
    return frame(b"f", cstr(message.replace("\0", " ")))


def encode_password(password: str) -> bytes:
    return frame(b"p", cstr(password))


def encode_sasl_initial(mechanism: str, data: bytes) -> bytes:
    return frame(b"p", cstr(mechanism) + _I32.pack(len(data)) + data)


def encode_sasl_response(data: bytes) -> bytes:
    return frame(b"p", data)


def decode_sasl_initial(payload: bytes) -> tuple[str, bytes]:
    r = Reader(payload)
    mech = r.cstring()
    n = r.int32()
    data = b"" if n == -1 else r.raw(n)
    r.end()
    return mech, data


# --------------------------------------------------------------------------- backend messages

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


def encode_auth(code: int, data: bytes = b"") -> bytes:
    return frame(b"R", _I32.pack(code) + data)


def encode_auth_sasl(mechanisms: list[str]) -> bytes:
    return encode_auth(AUTH_SASL, b"".join(cstr(m) for m in mechanisms) + b"\0")


def decode_auth(payload: bytes) -> tuple[int, bytes]:
    r = Reader(payload)
    return r.int32(), r.rest()


def encode_parameter_status(name: str, value: str) -> bytes:
    return frame(b"S", cstr(name) + cstr(value))


def decode_parameter_status(payload: bytes) -> tuple[str, str]:
    r = Reader(payload)
    p = (r.cstring(), r.cstring())
    r.end()
    return p


def encode_backend_key_data(pid: int, secret: int) -> bytes:
    return frame(b"K", struct.pack("!ii", pid, secret))


def decode_backend_key_data(payload: bytes) -> tuple[int, int]:
    r = Reader(payload)
    pid, key = r.int32(), r.int32()
    r.end()
    return pid, key


def encode_ready_for_query(status: bytes) -> bytes:
    return frame(b"Z", status)


@dataclass(frozen=True, slots=True)
class ErrorFields:
    """Fields of an ErrorResponse / NoticeResponse, by their one-letter codes."""

    fields: dict[str, str]

    @property
    def severity(self) -> str:
        return self.fields.get("V") or self.fields.get("S", "")

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")


def decode_error_fields(payload: bytes) -> ErrorFields:
    r = Reader(payload)
    out: dict[str, str] = {}
    while True:
        code = r.byte()
        if code == b"\0":
            break
        out[code.decode("latin-1")] = r.cstring_bytes().decode("utf-8", "replace")
    r.end()
    return ErrorFields(out)


def encode_error(
    severity: str,
    sqlstate: str,
    message: str,
    detail: str | None = None,
    hint: str | None = None,
    *,
    notice: bool = False,
) -> bytes:
    def f(code: bytes, v: str) -> bytes:
        return code + v.replace("\0", " ").encode() + b"\0"

    parts = [f(b"S", severity), f(b"V", severity), f(b"C", sqlstate), f(b"M", message)]
    if detail:
        parts.append(f(b"D", detail))
    if hint:
        parts.append(f(b"H", hint))
    return frame(b"N" if notice else b"E", b"".join(parts) + b"\0")


def command_tag(payload: bytes) -> str:
    """Tag of a CommandComplete payload ("SELECT 3")."""
    return payload.rstrip(b"\0").decode("utf-8", "replace")


def rows_from_tag(tag: str) -> int | None:
    last = tag.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() and " " in tag else None


# --------------------------------------------------------------------------- startup phase

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
PROTOCOL_3_0 = 196608


def encode_startup(params: dict[str, str]) -> bytes:
    body = struct.pack("!i", PROTOCOL_3_0) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def encode_ssl_request() -> bytes:
    return struct.pack("!ii", 8, SSL_REQUEST_CODE)


def encode_cancel_request(pid: int, secret: int) -> bytes:
    return struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, pid, secret)


def decode_data_row(payload: bytes) -> list[bytes | None]:
    """The column values of a DataRow (NULL as None)."""
    (n,) = _unpack_h(payload, 0)
    pos = 2
    out: list[bytes | None] = []
    for _ in range(n):
        if pos + 4 > len(payload):
            raise ProtocolError("truncated DataRow", reason="malformed")
        (length,) = struct.unpack_from("!i", payload, pos)
        pos += 4
        if length < 0:
            out.append(None)
            continue
        if pos + length > len(payload):
            raise ProtocolError("truncated DataRow", reason="malformed")
        out.append(payload[pos:pos + length])
        pos += length
    return out
