"""The relay's fast path: runs of Bind/Describe/Execute/Sync/Flush forwarded as one
slice of the receive buffer.  Pipelines that mix fast and slow messages, and
malformed messages inside a run, behave exactly as on the generic path."""

from __future__ import annotations

import pytest

from proxy.wire import messages as m
from support.proxy_harness import RawClient, ensure_backend_role, errors_in, make_config, start_proxy

PW = "app-pw"


@pytest.fixture(scope="module")
def db(pg, make_db):
    name, _ = make_db("hotpath")
    ensure_backend_role(pg, name)
    return name


@pytest.fixture(scope="module")
def proxy(pg, db):
    p = start_proxy(make_config(pg, db, {"app": PW}, limits={"max_message_bytes": 4096}))
    yield p
    p.stop()


def client(proxy, db) -> RawClient:
    c = RawClient(proxy.host, proxy.port)
    c.startup("app", PW, database=db)
    return c


def data_rows(msgs) -> list[bytes]:
    return [p for t, p in msgs if t == b"D"]


def test_pipelined_fast_and_slow_messages_keep_their_order(proxy, db):
    c = client(proxy, db)
    c.send(m.encode_parse("s1", "SELECT $1::int + 1") + m.SYNC)
    assert [t for t, _ in c.read_until(b"Z")] == [b"1", b"Z"]
    batch = b"".join([
        m.encode_bind("", "s1", [b"1"]), m.encode_describe(b"P", ""), m.encode_execute(), m.SYNC,
        m.encode_query("SELECT 100"),                                         # slow path in between
        m.encode_bind("p", "s1", [b"2"]), m.encode_execute("p"), m.FLUSH, m.SYNC,  # named portal: slow Execute
        m.encode_bind("", "s1", [b"3"]), m.encode_execute(), m.SYNC,
    ])
    c.send(batch)
    msgs = []
    for _ in range(4):
        msgs += c.read_until(b"Z")
    rows = [p[6:] for p in data_rows(msgs)]
    assert rows == [b"2", b"100", b"3", b"4"]
    assert not errors_in(msgs)
    c.close()


@pytest.mark.parametrize("bad", [
    m.frame(b"E", b"\0\0\0\0\0extra"),    # Execute with trailing bytes
    m.frame(b"S", b"x"),                   # Sync with a body
    m.frame(b"H", b"x"),                   # Flush with a body
    m.frame(b"D", b"P\0name\0"),           # Describe with two strings
    m.frame(b"B", b"\0s1\0\0\x01\0\x05"),  # Bind with a bad format code
])
def test_malformed_message_inside_a_run_fails_like_on_its_own(proxy, db, bad):
    def fatal_for(prefix: bytes) -> dict:
        c = client(proxy, db)
        c.send(m.encode_parse("s1", "SELECT $1::int") + m.SYNC)
        c.read_until(b"Z")
        c.send(prefix + bad)
        errs = errors_in(c.read_all())
        assert errs, "no error"
        return errs[-1]

    alone = fatal_for(b"")
    in_run = fatal_for(m.encode_bind("", "s1", [b"7"]) + m.encode_describe(b"P", "") + m.encode_execute() + m.SYNC)
    assert (alone["S"], alone["C"]) == ("FATAL", "08P01"), alone
    assert (in_run["S"], in_run["C"], in_run["M"]) == (alone["S"], alone["C"], alone["M"])


def test_backend_over_a_unix_socket(pg, db):
    """backend.host naming a directory connects to PostgreSQL's unix socket there (as libpq does)."""
    import threading
    import time

    import psycopg

    p = start_proxy(make_config(pg, db, {"app": PW}, backend={"host": str(pg.sockdir)}))
    try:
        dsn = f"postgresql://app:{PW}@{p.host}:{p.port}/{db}?sslmode=disable"
        with psycopg.connect(dsn, autocommit=True) as conn:
            # a unix-socket session has no server address
            assert conn.execute("SELECT inet_server_addr() IS NULL").fetchone() == (True,)
            errors = []

            def sleeper():
                try:
                    conn.execute("SELECT pg_sleep(30)")
                except psycopg.Error as e:
                    errors.append(e)

            t = threading.Thread(target=sleeper)
            t.start()
            with psycopg.connect(pg.admin_dsn, autocommit=True) as admin:
                deadline = time.monotonic() + 10
                while not admin.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                                        "AND query = 'SELECT pg_sleep(30)'").fetchone()[0]:
                    assert time.monotonic() < deadline, "the query never started"
                    time.sleep(0.05)
            conn.cancel_safe()  # the real CancelRequest to PostgreSQL goes over the socket too
            t.join(10)
            assert not t.is_alive()
            assert isinstance(errors[0], psycopg.errors.QueryCanceled)
    finally:
        p.stop()
