"""Size and time limits (issue 12 breaks 4 and 5).

* Before authentication the proxy buffers no more than PostgreSQL would: a SASL message over
  64 KiB, or a flood of bytes before the session starts, ends the connection with FATAL 08P01.
* A statement over ``limits.max_statement_bytes`` is refused with 54000 (the hint names the key),
  on the simple and the extended protocol.
* A long statement is analysed off the event loop: while one client sends the largest allowed
  statement, another client's ``SELECT 1`` keeps answering (a generous bound here; measured
  figures are in docs/benchmarks.md).
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from support.e2e import RawClient, errors
from support.pool import serve_pooled
from proxy.wire import messages as m

MAX_STATEMENT = 256 * 1024


@pytest.fixture(scope="module")
def px(demo, tmp_path_factory):  # noqa: F811
    with serve_pooled(demo, tmp_path_factory.mktemp("limits"), {"mode": "session"},
                      limits={"max_statement_bytes": MAX_STATEMENT}) as proxy:
        yield proxy


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    sock.settimeout(10)
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            return out
        if not chunk:
            return out
        out += chunk


def _fatal_sqlstate(data: bytes) -> str | None:
    pos = 0
    while pos + 5 <= len(data):
        t = data[pos:pos + 1]
        (length,) = struct.unpack_from("!I", data, pos + 1)
        if t == b"E":
            fields = m.decode_error_fields(data[pos + 5:pos + 1 + length])
            return f"{fields.severity} {fields.sqlstate}"
        pos += 1 + length
    return None


def _until_sasl(px) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", px.port), timeout=10)
    s.sendall(m.encode_startup({"user": "acme_app", "database": "app"}))
    head = s.recv(5)
    assert head[:1] == b"R"
    (length,) = struct.unpack("!I", head[1:])
    s.recv(length - 4)
    return s


def test_an_oversized_sasl_message_is_refused_before_it_is_buffered(px):
    s = _until_sasl(px)
    try:  # announce a 1 MiB SASLInitialResponse: refused on its header, like PostgreSQL (64 KiB cap)
        s.sendall(b"p" + struct.pack("!I", 1024 * 1024) + b"SCRAM-SHA-256\0")
        assert _fatal_sqlstate(_read_all(s)) == "FATAL 08P01"
    finally:
        s.close()


def test_a_flood_before_authentication_ends_the_connection(px):
    s = _until_sasl(px)
    try:  # many small messages nobody asked for
        flood = (b"p" + struct.pack("!I", 8) + b"xxxx") * 40_000
        try:
            s.sendall(flood)
        except OSError:
            pass
        assert _fatal_sqlstate(_read_all(s)) == "FATAL 08P01"
    finally:
        s.close()


def _big_select(n_bytes: int) -> str:
    return "SELECT " + ",".join(["1"] * (n_bytes // 2))


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_statements_over_the_limit_are_refused_with_54000(px, demo, mode):  # noqa: F811
    # the demo (transaction pooling) has the default limit, 1 MiB
    c = RawClient(px.dsn("acme") if mode == "session" else demo.app("acme"))
    limit = MAX_STATEMENT if mode == "session" else 1024 * 1024
    try:
        sql = _big_select(limit + 10)
        errs = errors(c.query(sql))
        assert [e.sqlstate for e in errs] == ["54000"] and "limits.max_statement_bytes" in errs[0].fields.get("H", "")
        c.send(m.encode_parse("", sql), m.encode_bind("", "", ()), m.encode_execute(""), m.SYNC)
        assert [e.sqlstate for e in errors(c.until_ready())] == ["54000"]
        assert not errors(c.query("SELECT 1")), "the session stays usable"
    finally:
        c.close()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_long_statement_does_not_stall_other_clients(px):
    rss_before = _rss_kib(px.proc.pid)
    other = RawClient(px.dsn("globex"))
    big = RawClient(px.dsn("acme"), timeout=120)
    try:
        sql = _big_select(MAX_STATEMENT - 64)
        result: dict = {}

        def send_big():
            t0 = time.perf_counter()
            result["msgs"] = big.query(sql)
            result["s"] = time.perf_counter() - t0

        th = threading.Thread(target=send_big)
        th.start()
        lat: list[float] = []
        while th.is_alive():
            t0 = time.perf_counter()
            assert not errors(other.query("SELECT 1"))
            lat.append(time.perf_counter() - t0)
            time.sleep(0.01)
        lat.sort()
        worst, n = lat[-1], len(lat)
        th.join()
        msgs = result["msgs"]
        states = [e.sqlstate for e in errors(msgs)]
        assert states in ([], ["54011"], ["57014"]), states  # ran (PostgreSQL: too many columns), or over budget
        print(f"big statement {len(sql)} bytes: {result['s']:.2f} s; other client: {n} queries, "
              f"p50 {lat[n // 2] * 1000:.1f} ms, p99 {lat[int(n * 0.99)] * 1000:.1f} ms, worst {worst * 1000:.1f} ms")
        growth = _rss_kib(px.proc.pid) - rss_before
        print(f"proxy RSS growth: {growth} KiB for a {len(sql) // 1024} KiB statement")
        assert growth < 64 * 1024, f"the proxy grew by {growth} KiB"
        assert result["s"] > 0.2, "the statement should take a while (else this test measures nothing)"
        assert worst < 1.0, f"another client waited {worst:.2f} s while a long statement was analysed"
    finally:
        big.close()
        other.close()
