"""Bad input and faults: each ends with a clear FATAL/ERROR and nothing else breaks."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from proxy.pgcluster import make_cluster
from proxy.wire import messages as m
from support.proxy_harness import (RawClient, ensure_backend_role, errors_in, make_config, start_proxy,
                           wait_until_query_active)

PW = "app-pw"


@pytest.fixture(scope="module")
def db(pg, make_db):
    name, _ = make_db("faults")
    ensure_backend_role(pg, name)
    return name


@pytest.fixture(scope="module")
def proxy(pg, db):
    p = start_proxy(make_config(pg, db, {"app": PW}, limits={"max_message_bytes": 4096},
                                timeouts={"startup_s": 2.0}))  # generous: startups run on a loaded 2-core machine
    yield p
    p.stop()


def client(proxy, db, **params) -> RawClient:
    c = RawClient(proxy.host, proxy.port)
    c.startup("app", PW, database=db, **params)
    return c


def assert_fatal(msgs, sqlstate: str, text: str = "") -> dict:
    errs = errors_in(msgs)
    assert errs, f"no ErrorResponse in {msgs}"
    e = errs[-1]
    assert (e["S"], e["C"]) == ("FATAL", sqlstate), e
    assert text in e["M"], e
    return e


def assert_proxy_healthy(proxy, db):
    c = client(proxy, db)
    c.send(m.encode_query("SELECT 41 + 1"))
    msgs = c.read_until(b"Z")
    assert any(t == b"D" and b"42" in p for t, p in msgs)
    c.close()


def backends(pg, db: str, app: str) -> int:
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{db}' AND application_name = '{app}'"))


def wait_no_backends(pg, db, app, timeout=5.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := backends(pg, db, app)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


# ------------------------------------------------------------------ malformed messages

@pytest.mark.parametrize("length", [0, 3])
def test_length_under_4(proxy, db, length):
    c = client(proxy, db)
    c.send(b"Q" + struct.pack("!i", length))
    assert_fatal(c.read_all(), "08P01", "invalid message length")
    assert_proxy_healthy(proxy, db)


def test_length_over_max_is_refused_before_reading_it(proxy, db):
    c = client(proxy, db)
    c.send(b"Q" + struct.pack("!I", 500_000_000))  # header only: the proxy must not wait for 500 MB
    assert_fatal(c.read_all(), "08P01", "exceeds the maximum")
    assert_proxy_healthy(proxy, db)


def test_unknown_message_type(proxy, db):
    c = client(proxy, db)
    c.send(m.frame(b"y", b"junk"))
    assert_fatal(c.read_all(), "08P01", "invalid frontend message type")


@pytest.mark.parametrize("payload", [
    m.frame(b"Q", b"no terminator"),
    m.frame(b"B", b"\0\0\0\x05"),  # truncated Bind
    m.frame(b"P", b"s\0select 1\0\xff\xff"),  # negative parameter count
    m.frame(b"D", b"Zname\0"),
    m.frame(b"Q", b"select '\xff\xfe'\0"),
])
def test_malformed_messages(proxy, db, payload):
    c = client(proxy, db)
    c.send(payload)
    e = assert_fatal(c.read_all(), "22021" if b"\xff\xfe" in payload else "08P01")
    assert e["M"]
    assert_proxy_healthy(proxy, db)


def test_truncated_message_then_disconnect(proxy, db):
    c = client(proxy, db)
    c.send(m.encode_query("SELECT 1")[:-3])
    c.close()
    assert_proxy_healthy(proxy, db)


def packet_of(body: bytes) -> bytes:
    return struct.pack("!i", len(body) + 4) + body


def test_bad_startup_packets(proxy, db):
    for packet, state in [
        (struct.pack("!ii", 4, 0), "08P01"),  # length < 8
        (packet_of(struct.pack("!i", 2 << 16) + b"user\0u\0\0"), "0A000"),  # protocol 2.0
        (packet_of(struct.pack("!i", 3 << 16) + b"database\0x\0\0"), "08P01"),  # no user
        (packet_of(struct.pack("!i", 3 << 16) + b"user\0u"), "08P01"),  # unterminated
    ]:
        c = RawClient(proxy.host, proxy.port)
        c.send(packet)
        assert_fatal(c.read_all(), state)
    c = RawClient(proxy.host, proxy.port)
    c.send(struct.pack("!I", 1_000_000))
    assert_fatal(c.read_all(), "08P01", "exceeds")
    assert_proxy_healthy(proxy, db)


def test_client_that_sends_nothing_hits_the_startup_timeout(proxy, db):
    t0 = time.monotonic()
    c = RawClient(proxy.host, proxy.port)
    assert_fatal(c.read_all(), "08P01", "startup timeout")
    assert time.monotonic() - t0 < 5
    c = RawClient(proxy.host, proxy.port)  # half a startup packet
    c.send(m.encode_startup({"user": "app"})[:6])
    assert_fatal(c.read_all(), "08P01", "startup timeout")


def test_ssl_and_gssenc_requests_without_tls_get_n(proxy, db):
    c = RawClient(proxy.host, proxy.port)
    c.send(struct.pack("!ii", 8, 80877104))
    assert c.recv_exact(1) == b"N"
    c.send(m.encode_ssl_request())
    assert c.recv_exact(1) == b"N"
    c.startup("app", PW, database=db)
    assert c.parameters["server_encoding"] == "UTF8" and "server_version" in c.parameters
    c.close()


def test_wrong_password_and_unknown_user(proxy, db):
    for user, pw in [("app", "wrong"), ("nobody", "x")]:
        with pytest.raises(psycopg.OperationalError) as e:
            psycopg.connect(proxy.dsn(user, pw, db), connect_timeout=5)
        assert "password authentication failed" in str(e.value)


def test_function_call_is_refused_and_session_stays_usable(proxy, db):
    c = client(proxy, db)
    c.send(m.frame(b"F", struct.pack("!i", 1598) + b"\0\0\0\0\0\0"))  # lo_open-style call
    msgs = c.read_until(b"Z")
    err = errors_in(msgs)[0]
    assert (err["S"], err["C"]) == ("ERROR", "42501") and "FunctionCall" in err["M"]
    assert msgs[-1] == (b"Z", b"I")
    c.send(m.encode_query("SELECT 1"))
    assert c.read_until(b"Z")[-1] == (b"Z", b"I")


# ------------------------------------------------------------------ disconnects and cancel

def test_disconnect_mid_query_cancels_and_frees_the_backend(pg, proxy, db):
    c = client(proxy, db, application_name="tg_leak_query")
    c.send(m.encode_query("SELECT pg_sleep(30)"))
    time.sleep(0.3)
    assert backends(pg, db, "tg_leak_query") == 1
    c.close()
    assert wait_no_backends(pg, db, "tg_leak_query") == 0


def test_disconnect_mid_copy_commits_nothing_and_frees_the_backend(pg, proxy, db):
    pg.psql("CREATE TABLE IF NOT EXISTS copy_leak (v text)", database=db)
    pg.psql("GRANT ALL ON copy_leak TO tg_backend", database=db)
    c = client(proxy, db, application_name="tg_leak_copy")
    c.send(m.encode_query("COPY copy_leak FROM STDIN"))
    assert c.read_message()[0] == b"G"
    c.send(m.encode_copy_data(b"one\n") + m.encode_copy_data(b"two\n"))
    time.sleep(0.2)
    c.close()
    assert wait_no_backends(pg, db, "tg_leak_copy") == 0
    assert pg.psql("SELECT count(*) FROM copy_leak", database=db).strip() == "0"


def test_cancel_request_needs_the_exact_key(proxy, db, pg):
    c = client(proxy, db)
    pid, secret = c.key
    wrong = RawClient(proxy.host, proxy.port)
    c.send(m.encode_query("SELECT pg_sleep(1.51)"))
    # the wrong key is sent while the query runs (before it, it could hit nothing and prove nothing)
    wait_until_query_active(pg.admin_dsn, "pg_sleep(1.51)")
    wrong.send(m.encode_cancel_request(pid, secret ^ 1))
    assert wrong.read_all() == []  # no answer, connection closed
    msgs = c.read_until(b"Z")
    assert not errors_in(msgs)  # not cancelled
    c.send(m.encode_query("SELECT pg_sleep(30.5)"))
    wait_until_query_active(pg.admin_dsn, "pg_sleep(30.5)")
    t0 = time.monotonic()
    right = RawClient(proxy.host, proxy.port)
    right.send(m.encode_cancel_request(pid, secret))
    msgs = c.read_until(b"Z")
    assert errors_in(msgs)[0]["C"] == "57014"
    assert time.monotonic() - t0 < 25  # cancelled, not slept out


# ------------------------------------------------------------------ limits and backend faults

def test_max_clients(pg, db):
    p = start_proxy(make_config(pg, db, {"app": PW}, limits={"max_clients": 1}))
    try:
        first = client(p, db)
        c = RawClient(p.host, p.port)
        c.send(m.encode_startup({"user": "app", "database": db}))
        assert_fatal(c.read_all(), "53300", "too many clients")
        first.close()
    finally:
        p.stop()


def test_backend_down_and_restart():
    """A backend restart ends sessions with 57P01/08006; new sessions work once it is back."""
    base = Path(tempfile.mkdtemp(prefix="tenantgate-restart-"))
    os.chmod(base, 0o755)
    cluster = make_cluster(base, "restart")
    p = None
    try:
        cluster.psql("CREATE DATABASE r")
        ensure_backend_role(cluster, "r")
        p = start_proxy(make_config(cluster, "r", {"app": PW}))
        c = client(p, "r")
        cluster.stop("fast")
        e = errors_in(c.read_all())
        assert e and e[-1]["S"] == "FATAL" and e[-1]["C"] in ("57P01", "08006"), e
        # while it is down: a clear FATAL 08006
        with pytest.raises(psycopg.OperationalError) as err:
            psycopg.connect(p.dsn("app", PW, "r"), connect_timeout=5)
        assert "could not connect to the database server" in str(err.value)
        cluster.start()
        with psycopg.connect(p.dsn("app", PW, "r")) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert p.session_count() <= 1
    finally:
        if p:
            p.stop()
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)


def test_backend_key_data_is_tenantgates_own(proxy, db):
    c = client(proxy, db)
    c.send(m.encode_query("SELECT pg_backend_pid()"))
    backend_pid = int([p for t, p in c.read_until(b"Z") if t == b"D"][0][6:])
    assert c.key is not None and c.key[0] != backend_pid
    c.close()


@pytest.mark.parametrize("encoding", ["SJIS", "BIG5", "GBK"])
def test_client_encodings_that_can_hide_a_quote_are_refused_at_startup(proxy, db, encoding):
    # in these encodings a multi-byte character can end in a backslash or quote byte, so
    # PostgreSQL would split the statement text differently from the proxy
    c = RawClient(proxy.host, proxy.port)
    with pytest.raises(RuntimeError, match="0A000"):
        c.startup("app", PW, database=db, client_encoding=encoding)
    c.close()
    c = client(proxy, db, client_encoding="UTF8")
    c.close()
