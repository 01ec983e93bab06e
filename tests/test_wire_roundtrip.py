"""Round trip of every message type the codec both writes and reads: decode(encode(m)) == m.

Plus framing: a stream of encoded messages fed in arbitrary chunks comes out as the same
messages, and a large derandomized mutation run (TENANTGATE_WIRE_FUZZ_INPUTS inputs, default
20,000; ``make fuzz-wire`` runs 1,000,000) in which the codec raises nothing but ProtocolError.
All derandomized: every run checks the same inputs.
"""

from __future__ import annotations

import os
import random
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.wire import messages as m
from proxy.wire.backend import AUDIT_INTERESTING, BackendScanner
from proxy.wire.buffer import ReceiveBuffer
from proxy.wire.errors import ProtocolError
from proxy.wire.startup import CancelRequest, SSLRequest, parse_startup_packet

EXAMPLES = int(os.environ.get("TENANTGATE_WIRE_FUZZ_EXAMPLES", "300"))
INPUTS = int(os.environ.get("TENANTGATE_WIRE_FUZZ_INPUTS", "20000"))
PROP = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

text = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=60)
name = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=20)
int32 = st.integers(-(2**31), 2**31 - 1)
oid = st.integers(0, 2**32 - 1)


def payload_of(frame: bytes, mtype: bytes) -> bytes:
    assert frame[:1] == mtype
    (length,) = struct.unpack("!I", frame[1:5])
    assert length == len(frame) - 1
    return frame[5:]


@PROP
@given(text)
def test_query(sql):
    assert m.decode_query(payload_of(m.encode_query(sql), b"Q")) == m.Query(sql)


@PROP
@given(name, text, st.lists(oid, max_size=5).map(tuple))
def test_parse(n, sql, types):
    assert m.decode_parse(payload_of(m.encode_parse(n, sql, types), b"P")) == m.Parse(n, sql, types)


@PROP
@given(name, name, st.lists(st.one_of(st.none(), st.binary(max_size=30)), max_size=5).map(tuple),
       st.sampled_from(["none", "one", "each"]), st.lists(st.sampled_from([0, 1]), max_size=4).map(tuple),
       st.integers(0, 1))
def test_bind(portal, stmt, params, fmt_kind, rformats, fmt):
    formats = {"none": (), "one": (fmt,), "each": tuple((fmt + i) % 2 for i in range(len(params)))}[fmt_kind]
    if fmt_kind == "each" and not params:
        formats = ()
    got = m.decode_bind(payload_of(m.encode_bind(portal, stmt, params, formats, rformats), b"B"))
    assert got == m.Bind(portal, stmt, formats, params, rformats)


@PROP
@given(st.sampled_from([b"S", b"P"]), name)
def test_describe_and_close(kind, n):
    assert m.decode_describe(payload_of(m.encode_describe(kind, n), b"D")) == m.Describe(kind, n)
    assert m.decode_close(payload_of(m.encode_close(kind, n), b"C")) == m.Close(kind, n)


@PROP
@given(name, st.integers(0, 2**31 - 1))
def test_execute(portal, max_rows):
    assert m.decode_execute(payload_of(m.encode_execute(portal, max_rows), b"E")) == m.Execute(portal, max_rows)


@PROP
@given(text)
def test_copy_fail(message):
    assert m.decode_copy_fail(payload_of(m.encode_copy_fail(message), b"f")) == message


@PROP
@given(name, st.binary(max_size=80))
def test_sasl_initial(mechanism, data):
    assert m.decode_sasl_initial(payload_of(m.encode_sasl_initial(mechanism, data), b"p")) == (mechanism, data)


@PROP
@given(st.sampled_from([m.AUTH_OK, m.AUTH_CLEARTEXT, m.AUTH_SASL, m.AUTH_SASL_CONTINUE, m.AUTH_SASL_FINAL]),
       st.binary(max_size=80))
def test_auth(code, data):
    assert m.decode_auth(payload_of(m.encode_auth(code, data), b"R")) == (code, data)


@PROP
@given(name, text)
def test_parameter_status(k, v):
    assert m.decode_parameter_status(payload_of(m.encode_parameter_status(k, v), b"S")) == (k, v)


@PROP
@given(int32, int32)
def test_backend_key_data_and_cancel_request(pid, secret):
    assert m.decode_backend_key_data(payload_of(m.encode_backend_key_data(pid, secret), b"K")) == (pid, secret)
    buf = ReceiveBuffer()
    buf.feed(m.encode_cancel_request(pid, secret))
    assert parse_startup_packet(buf.next_startup()) == CancelRequest(pid, secret)


@PROP
@given(st.sampled_from(["ERROR", "FATAL", "NOTICE"]), st.text("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=5,
       max_size=5), text, st.one_of(st.none(), text.filter(bool)), st.one_of(st.none(), text.filter(bool)),
       st.booleans())
def test_error_and_notice(severity, sqlstate, message, detail, hint, notice):
    frame = m.encode_error(severity, sqlstate, message, detail, hint, notice=notice)
    fields = m.decode_error_fields(payload_of(frame, b"N" if notice else b"E"))
    want = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    want.update({"D": detail} if detail else {})
    want.update({"H": hint} if hint else {})
    assert fields.fields == want


@PROP
@given(st.dictionaries(name.filter(bool), text, max_size=6), name.filter(bool))
def test_startup_message(params, user):
    params = {**params, "user": user}  # a startup packet without a user is refused by design
    buf = ReceiveBuffer()
    buf.feed(m.encode_startup(params))
    assert parse_startup_packet(buf.next_startup()).params == params
    buf = ReceiveBuffer()
    buf.feed(m.encode_ssl_request())
    assert parse_startup_packet(buf.next_startup()) == SSLRequest()


_ANY_MESSAGE = st.one_of(
    text.map(m.encode_query),
    st.tuples(name, text).map(lambda a: m.encode_parse(a[0], a[1])),
    st.tuples(name, name, st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=3).map(tuple)).map(
        lambda a: m.encode_bind(a[0], a[1], a[2])),
    name.map(lambda n: m.encode_describe(b"P", n)),
    st.binary(max_size=200).map(m.encode_copy_data),
    st.sampled_from([m.SYNC, m.FLUSH, m.COPY_DONE]),
)


@PROP
@given(st.lists(_ANY_MESSAGE, min_size=1, max_size=10), st.lists(st.integers(1, 64), max_size=20))
def test_framing_survives_any_chunking(frames, cuts):
    """The same messages come out of a ReceiveBuffer however the stream is split into reads."""
    stream = b"".join(frames)
    buf = ReceiveBuffer()
    got, pos = [], 0
    for size in [*cuts, len(stream)]:
        buf.feed(stream[pos:pos + size])
        pos += size
        while (msg := buf.next_message()) is not None:
            got.append(msg)
        if pos >= len(stream):
            break
    assert got == [(f[:1], f[5:]) for f in frames]


# ---- the long derandomized run ------------------------------------------------------------

_VALID = [
    m.encode_query("select 1; select 'ü'"), m.encode_parse("s", "select $1", (23,)),
    m.encode_bind("p", "s", (b"\0\0\0\1", None), (1,), (1,)), m.encode_describe(b"P", "p"),
    m.encode_execute("p", 0), m.encode_close(b"S", "s"), m.SYNC, m.FLUSH, m.encode_copy_data(b"1\tx\n"),
    m.COPY_DONE, m.encode_copy_fail("stop"), m.encode_error("ERROR", "42000", "x"), m.encode_ready_for_query(b"T"),
    m.encode_startup({"user": "u", "database": "d", "options": "-c a=b"}), m.encode_cancel_request(1, 2),
]
_DECODERS = {b"Q": m.decode_query, b"P": m.decode_parse, b"B": m.decode_bind, b"D": m.decode_describe,
             b"E": m.decode_execute, b"C": m.decode_close, b"f": m.decode_copy_fail}


def _one_input(rng: random.Random) -> bytes:
    if rng.random() < 0.2:
        return rng.randbytes(rng.randint(0, 64))
    stream = bytearray(b"".join(rng.choice(_VALID) for _ in range(rng.randint(1, 4))))
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        pos = rng.randrange(len(stream))
        if op < 0.5:
            stream[pos] = rng.randrange(256)
        elif op < 0.7:
            del stream[pos:pos + rng.randint(1, 8)]
        elif op < 0.9:
            stream[pos:pos] = rng.randbytes(rng.randint(1, 8))
        else:
            stream[pos:pos + 4] = struct.pack("!i", rng.choice([0, 3, 4, -1, 2**31 - 1, 5000, 65536]))
        if not stream:
            break
    return bytes(stream)


def test_codec_raises_only_protocol_errors_on_many_inputs():
    rng = random.Random(20260)
    for _ in range(INPUTS):
        data = _one_input(rng)
        buf = ReceiveBuffer(max_length=4096)
        try:
            buf.feed(data)
            while (msg := buf.next_message()) is not None:
                dec = _DECODERS.get(msg[0])
                if dec is not None:
                    dec(msg[1])
        except ProtocolError:
            pass
        buf = ReceiveBuffer(max_length=4096)
        try:
            buf.feed(data)
            if (p := buf.next_startup()) is not None:
                parse_startup_packet(p)
        except ProtocolError:
            pass
        scanner = BackendScanner(AUDIT_INTERESTING)
        try:
            scanner.feed(data)
        except ProtocolError:
            pass
