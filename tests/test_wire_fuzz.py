"""Property test: random and mutated byte streams never make the codec raise
anything but ProtocolError.

TENANTGATE_WIRE_FUZZ_EXAMPLES inputs per test (default 300).  Every process checks the same
inputs: case ``i`` of a test is made from its own seed (support.fuzzcases; not hypothesis,
whose derandomized draws depend on the modules of proxy a process has imported), and a failure
names the test, case number, seed and input (TENANTGATE_FUZZ_SEED picks other inputs).
"""

from __future__ import annotations

import os
import zlib

import pytest

from proxy.wire import messages as m
from proxy.wire.backend import AUDIT_INTERESTING, BackendScanner
from proxy.wire.buffer import ReceiveBuffer
from proxy.wire.errors import ProtocolError
from proxy.wire.frontend import FrontendState
from proxy.wire.startup import parse_options, parse_startup_packet
from support.fuzzcases import Draw, assert_same_plan_in_fresh_processes, case_seed, fuzz_cases, rerun, run_seed

EXAMPLES = int(os.environ.get("TENANTGATE_WIRE_FUZZ_EXAMPLES", "300"))

DECODERS = {
    b"Q": m.decode_query, b"P": m.decode_parse, b"B": m.decode_bind, b"D": m.decode_describe,
    b"E": m.decode_execute, b"C": m.decode_close, b"f": m.decode_copy_fail,
}

VALID = [
    m.encode_query("select 1; select 'ü'"),
    m.encode_parse("s", "select $1", (23,)),
    m.encode_bind("p", "s", (b"\0\0\0\1", None), (1,), (1,)),
    m.encode_describe(b"P", "p"),
    m.encode_execute("p", 0),
    m.encode_close(b"S", "s"),
    m.SYNC, m.FLUSH, m.encode_copy_data(b"1\tx\n"), m.COPY_DONE, m.encode_copy_fail("stop"),
    m.encode_error("ERROR", "42000", "x"), m.encode_ready_for_query(b"T"),
]


def run_frontend(stream: bytes) -> None:
    buf = ReceiveBuffer(max_length=4096)
    state = FrontendState()
    try:
        buf.feed(stream)
        while (msg := buf.next_message()) is not None:
            t, payload = msg
            state.accept(t[0])
            dec = DECODERS.get(t)
            if dec is not None:
                dec(payload)
            m.decode_error_fields(payload) if t == b"E" and payload.endswith(b"\0") else None
    except ProtocolError:
        pass


def run_startup(data: bytes) -> None:
    buf = ReceiveBuffer()
    try:
        buf.feed(data)
        p = buf.next_startup()
        if p is not None:
            pkt = parse_startup_packet(p)
            if hasattr(pkt, "params"):
                parse_options(pkt.params.get("options", ""))
    except ProtocolError:
        pass


def run_backend(stream: bytes, cut: int) -> None:
    s = BackendScanner(AUDIT_INTERESTING)
    try:
        s.feed(stream[:cut])
        s.feed(stream[cut:])
    except ProtocolError:
        pass
    for dec in (m.decode_error_fields, m.decode_parameter_status, m.decode_backend_key_data, m.decode_auth,
                m.decode_sasl_initial):
        try:
            dec(stream)
        except ProtocolError:
            pass


def mutations(d: Draw) -> list[tuple[int, int]]:
    """Up to 8 (position, byte) overwrites."""
    return d.lists(lambda: (d.integer(0, 10_000), d.integer(0, 255)), max_size=8)


def mutate(data: bytes, muts) -> bytes:
    b = bytearray(data)
    for pos, val in muts:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


@fuzz_cases(EXAMPLES, lambda d: {"data": d.binary(max_size=300)})
def test_random_bytes(data):
    run_frontend(data)
    run_startup(data)
    run_backend(data, len(data) // 2)


@fuzz_cases(EXAMPLES, lambda d: {"msgs": d.lists(lambda: d.choice(VALID), min_size=1, max_size=8),
                                  "muts": mutations(d), "cut": d.integer(0, 400)})
def test_mutated_valid_streams(msgs, muts, cut):
    stream = mutate(b"".join(msgs), muts)
    run_frontend(stream)
    run_backend(stream, cut)
    for msg in msgs:
        t, payload = msg[:1], mutate(msg[5:], muts)
        dec = DECODERS.get(t)
        if dec is not None:
            try:
                dec(payload)
            except ProtocolError:
                pass


@fuzz_cases(EXAMPLES, lambda d: {
    "params": d.dictionary(lambda: d.text(min_size=1, max_size=10), lambda: d.text(max_size=20), max_size=4),
    "muts": mutations(d), "options": d.text(max_size=40)})
def test_mutated_startup(params, muts, options):
    params = {k.replace("\0", ""): v.replace("\0", "") for k, v in params.items() if k.replace("\0", "")}
    params.setdefault("user", "u")
    params["options"] = options.replace("\0", "")
    run_startup(mutate(m.encode_startup(params), muts))
    run_startup(m.encode_startup(params))


def test_inputs_are_the_same_in_every_process():
    """Two fresh processes with different hash seeds and different modules of proxy loaded make
    exactly the same inputs (with hypothesis' derandomized draws they did not)."""
    records = assert_same_plan_in_fresh_processes(
        __name__, 3 * 300, env={"TENANTGATE_WIRE_FUZZ_EXAMPLES": "300"})  # the default size
    assert len({r[3] for r in records}) > 0.9 * len(records), "inputs repeat"


def test_a_failure_names_its_case_and_rerun_reproduces_it():
    @fuzz_cases(50, lambda d: {"data": d.binary(max_size=300)})
    def test_short(data):
        assert len(data) < 100

    with pytest.raises(AssertionError) as failure:
        test_short()
    case = next(c for c in test_short.cases() if len(c.args["data"]) >= 100)  # the first failing one
    message = str(failure.value)
    assert f"test_short case={case.index} seed={case.seed} (TENANTGATE_FUZZ_SEED={run_seed()};" in message
    assert repr(case.args) in message and f"rerun(test_wire_fuzz.test_short, {case.seed})" in message
    assert case.seed == case_seed(case.index, zlib.crc32(b"test_wire_fuzz/test_short"), run_seed())
    assert test_short.inputs(Draw(case.seed)) == case.args
    with pytest.raises(AssertionError):
        rerun(test_short, case.seed)
