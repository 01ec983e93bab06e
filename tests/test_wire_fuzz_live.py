"""Malformed byte streams against a live tenantgate while another client works.

Streams (derandomized: random.Random with a fixed seed) hit a running proxy before
authentication (mutated startup packets, random bytes) and after it (mutated valid message
streams on an authenticated session), from several connections at once.  Meanwhile a second
client runs one transaction of many statements through the same proxy; it must commit
untouched (every row as written, nothing else), the proxy must still serve new clients, every
fuzz session must be gone afterwards, and (crash_watch) no unhandled exception may occur.

TENANTGATE_WIRE_FUZZ_LIVE streams (default 150; ``make fuzz-wire`` runs 3,000).
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading

import psycopg
import pytest

from proxy.wire import messages as m
from support.proxy_harness import RawClient, ensure_backend_role, make_config, start_proxy, wait_until

PW = "fuzz-pw"
STREAMS = int(os.environ.get("TENANTGATE_WIRE_FUZZ_LIVE", "150"))
VALID = [
    m.encode_query("SELECT 1"), m.encode_query("SELECT 'x'; SELECT 2"), m.encode_parse("s1", "SELECT $1::int", (23,)),
    m.encode_bind("", "s1", (b"7",)), m.encode_describe(b"P", ""), m.encode_execute("", 0), m.SYNC, m.FLUSH,
    m.encode_close(b"S", "s1"), m.encode_copy_data(b"1\n"), m.COPY_DONE, m.encode_copy_fail("x"),
]


@pytest.fixture(scope="module")
def live(pg, make_db):
    db, _ = make_db("wirefuzz")
    ensure_backend_role(pg, db)
    pg.psql("CREATE TABLE ledger (id int PRIMARY KEY, v text NOT NULL)", database=db)
    pg.psql("GRANT ALL ON ledger TO PUBLIC", database=db)
    p = start_proxy(make_config(pg, db, {"app": PW}, limits={"max_message_bytes": 4096},
                                timeouts={"startup_s": 2.0}))
    yield p, db
    p.stop()


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not b:
            break
        pos, op = rng.randrange(len(b)), rng.random()
        if op < 0.5:
            b[pos] = rng.randrange(256)
        elif op < 0.7:
            del b[pos:pos + rng.randint(1, 6)]
        elif op < 0.85:
            b[pos:pos] = rng.randbytes(rng.randint(1, 6))
        else:
            b[pos:pos + 4] = struct.pack("!i", rng.choice([0, 3, -1, 2**31 - 1, 5000, 4097]))
    return bytes(b)


def _drain(sock: socket.socket, seconds: float) -> None:
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


def _one_stream(proxy, db: str, rng: random.Random) -> None:
    if rng.random() < 0.5:  # before authentication
        kind = rng.random()
        if kind < 0.4:
            data = _mutate(rng, m.encode_startup({"user": "app", "database": db}))
        elif kind < 0.6:
            data = _mutate(rng, m.encode_cancel_request(rng.randrange(2**31), rng.randrange(2**31)))
        else:
            data = rng.randbytes(rng.randint(1, 80))
        with socket.create_connection((proxy.host, proxy.port), timeout=5) as s:
            try:
                s.sendall(data)
            except OSError:
                return
            _drain(s, 0.3)
        return
    c = RawClient(proxy.host, proxy.port, timeout=10)
    try:
        c.startup("app", PW, database=db)
        stream = b"".join(rng.choice(VALID) for _ in range(rng.randint(1, 6)))
        try:
            c.send(_mutate(rng, stream))
        except OSError:
            return
        _drain(c.sock, 0.3)
    finally:
        c.close()


def test_malformed_streams_leave_other_clients_untouched(live):
    proxy, db = live
    baseline = proxy.session_count()
    done = threading.Event()
    victim: dict = {}

    def run_victim():
        try:
            with psycopg.connect(proxy.dsn("app", PW), autocommit=False) as conn:
                n = 0
                while not done.is_set() or n < 50:  # one transaction for the whole fuzz run
                    conn.execute("INSERT INTO ledger VALUES (%s, %s)", (n, f"row-{n}"))
                    n += 1
                conn.execute("SELECT pg_sleep(0.01)")
                conn.commit()
                victim["rows"] = n
        except Exception as e:  # noqa: BLE001
            victim["error"] = e

    t = threading.Thread(target=run_victim)
    t.start()
    rng = random.Random(4242)
    errors = []

    def fuzzer(seed):
        r = random.Random(seed)
        for _ in range(STREAMS // 3):
            try:
                _one_stream(proxy, db, r)
            except (OSError, ConnectionError, RuntimeError) as e:  # refused startups are fine
                errors.append(type(e).__name__)

    fuzzers = [threading.Thread(target=fuzzer, args=(rng.randrange(2**32),)) for _ in range(3)]
    for f in fuzzers:
        f.start()
    for f in fuzzers:
        f.join(600)
    done.set()
    t.join(120)
    assert "error" not in victim, victim
    n = victim["rows"]
    with psycopg.connect(proxy.dsn("app", PW), autocommit=True) as conn:
        got = conn.execute("SELECT id, v FROM ledger ORDER BY id").fetchall()
    assert got == [(i, f"row-{i}") for i in range(n)]
    # every fuzz session is gone (none leaked, none stuck) and the proxy serves new clients
    wait_until(lambda: proxy.session_count() <= baseline, 30.0, 0.1, "the fuzz sessions to end")
    with psycopg.connect(proxy.dsn("app", PW), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
