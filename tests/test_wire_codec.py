"""Unit tests of the sans-IO codec: framing, messages, startup packets, scanner, state machine."""

from __future__ import annotations

import struct

import pytest

from proxy.wire import messages as m
from proxy.wire.backend import AUDIT_INTERESTING, BackendScanner
from proxy.wire.buffer import ReceiveBuffer
from proxy.wire.errors import ProtocolError
from proxy.wire.frontend import Action, FrontendState, Phase
from proxy.wire.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    parse_options,
    parse_startup_packet,
)


# ------------------------------------------------------------------ buffer

def test_buffer_frames_messages_split_anywhere():
    stream = m.encode_query("select 1") + m.SYNC + m.encode_copy_data(b"x" * 1000)
    for cut in range(len(stream) + 1):
        buf = ReceiveBuffer()
        buf.feed(stream[:cut])
        got = []
        while (msg := buf.next_message()) is not None:
            got.append(msg)
        buf.feed(stream[cut:])
        while (msg := buf.next_message()) is not None:
            got.append(msg)
        assert got == [(b"Q", b"select 1\0"), (b"S", b""), (b"d", b"x" * 1000)]


@pytest.mark.parametrize("length", [0, 1, 3, -1])
def test_buffer_rejects_length_under_4(length):
    buf = ReceiveBuffer()
    buf.feed(b"Q" + struct.pack("!i", length))
    with pytest.raises(ProtocolError) as e:
        buf.next_message()
    assert e.value.sqlstate == "08P01"


def test_buffer_rejects_length_over_max_before_data_arrives():
    buf = ReceiveBuffer(max_length=1024)
    buf.feed(b"Q" + struct.pack("!I", 1025))  # only the header: nothing allocated for the body
    with pytest.raises(ProtocolError) as e:
        buf.next_message()
    assert "exceeds" in e.value.message and e.value.sqlstate == "08P01"
    buf = ReceiveBuffer(max_length=1024)
    buf.feed(b"Q" + struct.pack("!I", 0xFFFFFFFF))
    with pytest.raises(ProtocolError):
        buf.next_message()


def test_startup_framing_limits():
    buf = ReceiveBuffer()
    buf.feed(struct.pack("!I", 4))
    with pytest.raises(ProtocolError):
        buf.next_startup()
    buf = ReceiveBuffer()
    buf.feed(struct.pack("!I", 100_000))
    with pytest.raises(ProtocolError):
        buf.next_startup()


# ------------------------------------------------------------------ startup packets

def test_startup_packets():
    assert isinstance(parse_startup_packet(m.encode_ssl_request()[4:]), SSLRequest)
    assert isinstance(parse_startup_packet(struct.pack("!i", 80877104)), GSSENCRequest)
    assert parse_startup_packet(m.encode_cancel_request(7, -5)[4:]) == CancelRequest(7, -5)
    sm = parse_startup_packet(m.encode_startup({"user": "u", "database": "d", "options": "-c a=b"})[4:])
    assert isinstance(sm, StartupMessage) and sm.user == "u" and sm.database == "d"
    assert parse_startup_packet(m.encode_startup({"user": "u"})[4:]).database == "u"


def test_startup_rejects_other_versions_and_garbage():
    with pytest.raises(ProtocolError) as e:
        parse_startup_packet(struct.pack("!i", 2 << 16) + b"user\0u\0\0")
    assert e.value.sqlstate == "0A000" and "2.0" in e.value.message
    with pytest.raises(ProtocolError) as e:
        parse_startup_packet(struct.pack("!i", (3 << 16) | 2) + b"user\0u\0\0")
    assert e.value.sqlstate == "0A000"
    for bad in [b"", b"\0\3\0\0user\0u", b"\0\3\0\0\0", struct.pack("!i", 80877102) + b"\0\0"]:
        with pytest.raises(ProtocolError) as e:
            parse_startup_packet(bad)
        assert e.value.sqlstate == "08P01"


def test_parse_options():
    assert parse_options("-c search_path=a -csome.x=1 --work-mem=4MB") == {
        "search_path": "a", "some.x": "1", "work_mem": "4MB"}
    assert parse_options(r"-c app=a\ b") == {"app": "a b"}
    assert parse_options("") == {}
    for bad in ["-c", "-x", "-c noequals", "plain"]:
        with pytest.raises(ProtocolError):
            parse_options(bad)
    # PostgreSQL splits options on ASCII white space only: a no-break space is part of the word
    assert parse_options("-c\tapp=a\u00a0b") == {"app": "a\u00a0b"}
    assert parse_options("-c\u00a0app=x") == {"\u00a0app": "x"}  # as PostgreSQL: an unknown parameter


# ------------------------------------------------------------------ messages

def test_parse_bind_roundtrip():
    raw = m.encode_parse("s1", "select $1, $2", (23, 25))
    p = m.decode_parse(raw[5:])
    assert p == m.Parse("s1", "select $1, $2", (23, 25))
    raw = m.encode_bind("", "s1", (b"\0\0\0\5", None, b"abc"), (1, 1, 0), (1,))
    b = m.decode_bind(raw[5:])
    assert b.params == (b"\0\0\0\5", None, b"abc") and b.format_of(0) == 1 and b.format_of(2) == 0
    assert m.decode_bind(m.encode_bind("", "s", (b"1",), (1,))[5:]).format_of(0) == 1
    assert m.decode_bind(m.encode_bind("", "s", (b"1",))[5:]).format_of(0) == 0
    assert m.bind_statement_name(raw[5:]) == "s1"


@pytest.mark.parametrize("payload", [
    b"portal\0stmt\0",  # truncated
    b"\0\0\0\2\0\0\0\0\0\0\0\0",  # 2 formats, 0 params
    b"\0\0\0\0\0\1\0\0\0\x10ab\0\0",  # param length beyond end
    b"\0\0\0\0\0\1\xff\xff\xff\xfe\0\0",  # length -2
    b"\0\0\0\1\0\7\0\0\0\0",  # format code 7
])
def test_bad_bind(payload):
    with pytest.raises(ProtocolError):
        m.decode_bind(payload)


def test_error_fields_roundtrip():
    raw = m.encode_error("ERROR", "42501", "no", "detail", "hint")
    f = m.decode_error_fields(raw[5:])
    assert (f.severity, f.sqlstate, f.message, f.fields["D"], f.fields["H"]) == ("ERROR", "42501", "no", "detail", "hint")
    assert raw[:1] == b"E" and m.encode_error("NOTICE", "00000", "x", notice=True)[:1] == b"N"


def test_query_must_be_utf8_and_terminated():
    with pytest.raises(ProtocolError) as e:
        m.decode_query(b"select '\xff'\0")
    assert e.value.sqlstate == "22021"
    with pytest.raises(ProtocolError):
        m.decode_query(b"select 1")
    with pytest.raises(ProtocolError):
        m.decode_query(b"select 1\0trailing")


def test_describe_close_execute():
    assert m.decode_describe(m.encode_describe(b"S", "x")[5:]) == m.Describe(b"S", "x")
    assert m.decode_close(m.encode_close(b"P", "")[5:]) == m.Close(b"P", "")
    assert m.decode_execute(m.encode_execute("p", 10)[5:]) == m.Execute("p", 10)
    with pytest.raises(ProtocolError):
        m.decode_describe(b"Xname\0")
    assert m.rows_from_tag("INSERT 0 3") == 3 and m.rows_from_tag("BEGIN") is None


# ------------------------------------------------------------------ backend scanner

def _backend_stream() -> bytes:
    rows = b"".join(m.frame(b"D", b"\0\1\0\0\0\3abc") for _ in range(50))
    return (m.frame(b"T", b"\0\1" + b"a\0" + b"\0" * 18) + rows + m.frame(b"C", b"SELECT 50\0")
            + m.encode_error("ERROR", "42P01", "nope") + m.encode_ready_for_query(b"I"))


def _collect(scanner: BackendScanner, stream: bytes, cut: int):
    out_bytes, events = bytearray(), []
    for part in (stream[:cut], stream[cut:]):
        for item in scanner.feed(part):
            if isinstance(item, bytes):
                out_bytes += item
            else:
                events.append(item[0])
                out_bytes += item[2]
    return bytes(out_bytes), events


def test_scanner_passes_bytes_through_and_reports_events_at_any_split():
    stream = _backend_stream()
    for cut in range(0, len(stream) + 1, 7):
        s = BackendScanner(AUDIT_INTERESTING)
        data, events = _collect(s, stream, cut)
        assert data == stream
        assert [chr(e) for e in events] == ["C", "E", "Z"]
        assert s.at_boundary


def test_scanner_streams_large_rows_without_buffering():
    s = BackendScanner()
    big = m.frame(b"D", b"x" * 100_000)
    first = s.feed(big[:1000])
    assert first == [big[:1000]]  # forwarded at once, not held back
    assert s.feed(big[1000:]) == [big[1000:]]
    assert s.at_boundary


def test_scanner_rejects_bad_lengths():
    with pytest.raises(ProtocolError):
        BackendScanner().feed(b"D\0\0\0\2")


# ------------------------------------------------------------------ frontend state machine

def test_frontend_state_machine():
    st = FrontendState()
    assert st.accept(ord("Q")) is Action.PROCESS
    with pytest.raises(ProtocolError) as e:
        st.accept(ord("?"))
    assert e.value.sqlstate == "08P01" and e.value.reason == "unknown_type"
    with pytest.raises(ProtocolError):
        st.accept(ord("p"))  # password message after authentication
    st.error_in_extended()
    assert st.accept(ord("B")) is Action.DISCARD
    assert st.accept(ord("E")) is Action.DISCARD
    assert st.accept(ord("S")) is Action.PROCESS and st.phase is Phase.READY
    st.copy_in_started()
    assert st.accept(ord("d")) is Action.PROCESS
    with pytest.raises(ProtocolError):
        st.accept(ord("Q"))
    st.copy_in_ended()
    assert st.accept(ord("X")) is Action.TERMINATE


def test_validate_bind_agrees_with_decode_bind():
    good = [m.encode_bind("", "s", ()), m.encode_bind("p", "s", (b"1", None, b""), (0, 1, 0), (1, 0)),
            m.encode_bind("", "", (b"abc",), (1,))]
    for raw in good:
        m.validate_bind(raw[5:])
        m.decode_bind(raw[5:])
    import itertools
    for raw in good:
        payload = raw[5:]
        for cut, (pos, val) in itertools.product(range(len(payload)), [(0, 0), (3, 255), (5, 2)]):
            for variant in (payload[:cut], bytes(b if i != (pos + cut) % len(payload) else val
                                                 for i, b in enumerate(payload))):
                outcomes = []
                for fn in (m.validate_bind, m.decode_bind):
                    try:
                        fn(variant)
                        outcomes.append(True)
                    except ProtocolError:
                        outcomes.append(False)
                assert outcomes[0] == outcomes[1] or not outcomes[1] and b"\xff" in variant, (variant, outcomes)
