"""Round trip of every message type the codec both writes and reads: decode(encode(m)) == m.

Plus framing: a stream of encoded messages fed in arbitrary chunks comes out as the same
messages, and a large mutation run (TENANTGATE_WIRE_FUZZ_INPUTS inputs, default 20,000;
``make fuzz-wire`` runs 1,000,000) in which the codec raises nothing but ProtocolError.
TENANTGATE_WIRE_FUZZ_EXAMPLES inputs per round-trip test (default 300).

Every process checks the same inputs: case ``i`` of a test is made from its own seed
(support.fuzzcases; not hypothesis, whose derandomized draws depend on the modules of proxy a
process has imported), and a failure names the test, case number, seed and input
(TENANTGATE_FUZZ_SEED picks other inputs).
"""

from __future__ import annotations

import os
import random
import struct

from proxy.wire import messages as m
from proxy.wire.backend import AUDIT_INTERESTING, BackendScanner
from proxy.wire.buffer import ReceiveBuffer
from proxy.wire.errors import ProtocolError
from proxy.wire.startup import CancelRequest, SSLRequest, parse_startup_packet
from support.fuzzcases import Draw, assert_same_plan_in_fresh_processes, fuzz_cases

EXAMPLES = int(os.environ.get("TENANTGATE_WIRE_FUZZ_EXAMPLES", "300"))
INPUTS = int(os.environ.get("TENANTGATE_WIRE_FUZZ_INPUTS", "20000"))


def text(d: Draw, min_size: int = 0) -> str:
    return d.text(min_size=min_size, max_size=60, exclude="\0")


def name(d: Draw, min_size: int = 0) -> str:
    return d.text(min_size=min_size, max_size=20, exclude="\0")


def int32(d: Draw) -> int:
    return d.integer(-(2**31), 2**31 - 1)


def oid(d: Draw) -> int:
    return d.integer(0, 2**32 - 1)


def payload_of(frame: bytes, mtype: bytes) -> bytes:
    assert frame[:1] == mtype
    (length,) = struct.unpack("!I", frame[1:5])
    assert length == len(frame) - 1
    return frame[5:]


@fuzz_cases(EXAMPLES, lambda d: {"sql": text(d)})
def test_query(sql):
    assert m.decode_query(payload_of(m.encode_query(sql), b"Q")) == m.Query(sql)


@fuzz_cases(EXAMPLES, lambda d: {"n": name(d), "sql": text(d), "types": tuple(d.lists(lambda: oid(d), max_size=5))})
def test_parse(n, sql, types):
    assert m.decode_parse(payload_of(m.encode_parse(n, sql, types), b"P")) == m.Parse(n, sql, types)


@fuzz_cases(EXAMPLES, lambda d: {
    "portal": name(d), "stmt": name(d), "params": tuple(d.lists(lambda: d.optional(lambda: d.binary(30)), max_size=5)),
    "fmt_kind": d.choice(["none", "one", "each"]), "rformats": tuple(d.lists(lambda: d.choice([0, 1]), max_size=4)),
    "fmt": d.integer(0, 1)})
def test_bind(portal, stmt, params, fmt_kind, rformats, fmt):
    formats = {"none": (), "one": (fmt,), "each": tuple((fmt + i) % 2 for i in range(len(params)))}[fmt_kind]
    if fmt_kind == "each" and not params:
        formats = ()
    got = m.decode_bind(payload_of(m.encode_bind(portal, stmt, params, formats, rformats), b"B"))
    assert got == m.Bind(portal, stmt, formats, params, rformats)


@fuzz_cases(EXAMPLES, lambda d: {"kind": d.choice([b"S", b"P"]), "n": name(d)})
def test_describe_and_close(kind, n):
    assert m.decode_describe(payload_of(m.encode_describe(kind, n), b"D")) == m.Describe(kind, n)
    assert m.decode_close(payload_of(m.encode_close(kind, n), b"C")) == m.Close(kind, n)


@fuzz_cases(EXAMPLES, lambda d: {"portal": name(d), "max_rows": d.integer(0, 2**31 - 1)})
def test_execute(portal, max_rows):
    assert m.decode_execute(payload_of(m.encode_execute(portal, max_rows), b"E")) == m.Execute(portal, max_rows)


@fuzz_cases(EXAMPLES, lambda d: {"message": text(d)})
def test_copy_fail(message):
    assert m.decode_copy_fail(payload_of(m.encode_copy_fail(message), b"f")) == message


@fuzz_cases(EXAMPLES, lambda d: {"mechanism": name(d), "data": d.binary(max_size=80)})
def test_sasl_initial(mechanism, data):
    assert m.decode_sasl_initial(payload_of(m.encode_sasl_initial(mechanism, data), b"p")) == (mechanism, data)


@fuzz_cases(EXAMPLES, lambda d: {
    "code": d.choice([m.AUTH_OK, m.AUTH_CLEARTEXT, m.AUTH_SASL, m.AUTH_SASL_CONTINUE, m.AUTH_SASL_FINAL]),
    "data": d.binary(max_size=80)})
def test_auth(code, data):
    assert m.decode_auth(payload_of(m.encode_auth(code, data), b"R")) == (code, data)


@fuzz_cases(EXAMPLES, lambda d: {"k": name(d), "v": text(d)})
def test_parameter_status(k, v):
    assert m.decode_parameter_status(payload_of(m.encode_parameter_status(k, v), b"S")) == (k, v)


@fuzz_cases(EXAMPLES, lambda d: {"pid": int32(d), "secret": int32(d)})
def test_backend_key_data_and_cancel_request(pid, secret):
    assert m.decode_backend_key_data(payload_of(m.encode_backend_key_data(pid, secret), b"K")) == (pid, secret)
    buf = ReceiveBuffer()
    buf.feed(m.encode_cancel_request(pid, secret))
    assert parse_startup_packet(buf.next_startup()) == CancelRequest(pid, secret)


@fuzz_cases(EXAMPLES, lambda d: {
    "severity": d.choice(["ERROR", "FATAL", "NOTICE"]),
    "sqlstate": d.text(min_size=5, max_size=5, alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    "message": text(d), "detail": d.optional(lambda: text(d, min_size=1)), "hint": d.optional(lambda: text(d, min_size=1)),
    "notice": d.boolean()})
def test_error_and_notice(severity, sqlstate, message, detail, hint, notice):
    frame = m.encode_error(severity, sqlstate, message, detail, hint, notice=notice)
    fields = m.decode_error_fields(payload_of(frame, b"N" if notice else b"E"))
    want = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    want.update({"D": detail} if detail else {})
    want.update({"H": hint} if hint else {})
    assert fields.fields == want


@fuzz_cases(EXAMPLES, lambda d: {"params": d.dictionary(lambda: name(d, min_size=1), lambda: text(d), max_size=6),
                                  "user": name(d, min_size=1)})
def test_startup_message(params, user):
    params = {**params, "user": user}  # a startup packet without a user is refused by design
    buf = ReceiveBuffer()
    buf.feed(m.encode_startup(params))
    assert parse_startup_packet(buf.next_startup()).params == params
    buf = ReceiveBuffer()
    buf.feed(m.encode_ssl_request())
    assert parse_startup_packet(buf.next_startup()) == SSLRequest()


_ANY_MESSAGE = (
    lambda d: m.encode_query(text(d)),
    lambda d: m.encode_parse(name(d), text(d)),
    lambda d: m.encode_bind(name(d), name(d), tuple(d.lists(lambda: d.optional(lambda: d.binary(20)), max_size=3))),
    lambda d: m.encode_describe(b"P", name(d)),
    lambda d: m.encode_copy_data(d.binary(max_size=200)),
    lambda d: d.choice([m.SYNC, m.FLUSH, m.COPY_DONE]),
)


def any_message(d: Draw) -> bytes:
    return d.choice(_ANY_MESSAGE)(d)


@fuzz_cases(EXAMPLES, lambda d: {"frames": d.lists(lambda: any_message(d), min_size=1, max_size=10),
                                  "cuts": d.lists(lambda: d.integer(1, 64), max_size=20)})
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


# ---- the long run --------------------------------------------------------------------------

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


@fuzz_cases(INPUTS, lambda d: {"data": _one_input(d)})
def test_codec_raises_only_protocol_errors_on_many_inputs(data):
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


def test_inputs_are_the_same_in_every_process():
    """Two fresh processes with different hash seeds and different modules of proxy loaded make
    exactly the same inputs (with hypothesis' derandomized draws they did not)."""
    records = assert_same_plan_in_fresh_processes(  # at the default sizes (case i does not depend on them)
        __name__, 13 * 300 + 20000, env={"TENANTGATE_WIRE_FUZZ_EXAMPLES": "300", "TENANTGATE_WIRE_FUZZ_INPUTS": "20000"})
    assert len({r[3] for r in records}) > 0.9 * len(records), "inputs repeat"
