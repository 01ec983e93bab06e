"""Reload without dropping connections, drain on shutdown, `tenantgate serve` and `passwd`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psycopg
import pytest
import yaml

from proxy.scram import ScramClientExchange, ScramError, ScramServerExchange, parse_verifier
from proxy.wire import messages as m
from support.serve import serve
from support.proxy_harness import (
    BACKEND_PASSWORD,
    BACKEND_ROLE,
    RawClient,
    ensure_backend_role,
    errors_in,
    make_config,
    start_proxy,
    verifier_for,
)

PY = sys.executable


@pytest.fixture(scope="module")
def db(pg, make_db):
    name, _ = make_db("life")
    ensure_backend_role(pg, name)
    pg.psql("CREATE TABLE drained (v text); ALTER TABLE drained OWNER TO tg_backend", database=name)
    return name


def test_reload_keeps_connections_and_applies_to_new_ones(pg, db):
    p = start_proxy(make_config(pg, db, {"old": "old-pw"}))
    try:
        conn = psycopg.connect(p.dsn("old", "old-pw", db))
        conn.execute("BEGIN")
        conn.execute("INSERT INTO drained VALUES ('during reload')")
        p.reload(make_config(pg, db, {"new": "new-pw"}))
        conn.execute("COMMIT")  # the existing session survived the reload
        assert conn.execute("SELECT count(*) FROM drained WHERE v = 'during reload'").fetchone() == (1,)
        conn.close()
        with psycopg.connect(p.dsn("new", "new-pw", db)) as c2:
            assert c2.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(p.dsn("old", "old-pw", db))
    finally:
        p.stop()


def test_drain_lets_open_transactions_finish(pg, db):
    p = start_proxy(make_config(pg, db, {"app": "pw"}))
    idle = RawClient(p.host, p.port)
    idle.startup("app", "pw", database=db)
    busy = RawClient(p.host, p.port)
    busy.startup("app", "pw", database=db)
    busy.send(m.encode_query("BEGIN"))
    busy.read_until(b"Z")
    t = threading.Thread(target=p.stop, kwargs={"drain": True, "timeout": 10})
    t0 = time.monotonic()
    t.start()
    e = errors_in(idle.read_all())
    assert e and e[0]["C"] == "57P01"  # idle sessions end at once
    busy.send(m.encode_query("INSERT INTO drained VALUES ('drain')"))
    busy.read_until(b"Z")
    busy.send(m.encode_query("COMMIT"))
    assert busy.read_until(b"Z")[-1] == (b"Z", b"I")
    e = errors_in(busy.read_all())  # closed once its transaction ended
    assert e and e[0]["C"] == "57P01"
    t.join(15)
    assert time.monotonic() - t0 < 8
    assert pg.psql("SELECT count(*) FROM drained WHERE v = 'drain'", database=db).strip() == "1"
    with pytest.raises(OSError):
        RawClient(p.host, p.port, timeout=2).startup("app", "pw", database=db)


def test_drain_timeout_closes_stuck_transactions(pg, db):
    p = start_proxy(make_config(pg, db, {"app": "pw"}))
    busy = RawClient(p.host, p.port)
    busy.startup("app", "pw", database=db)
    busy.send(m.encode_query("BEGIN; INSERT INTO drained VALUES ('never committed')"))
    busy.read_until(b"Z")
    t0 = time.monotonic()
    p.stop(drain=True, timeout=0.5)
    assert time.monotonic() - t0 < 5
    e = errors_in(busy.read_all())
    assert e and e[-1]["C"] == "57P01"
    time.sleep(0.3)
    assert pg.psql("SELECT count(*) FROM drained WHERE v = 'never committed'", database=db).strip() == "0"


def test_serve_command_sighup_and_sigterm(pg, db, tmp_path):
    cfg_path = tmp_path / "tenantgate.yaml"
    port = __import__("proxy.pgcluster", fromlist=["free_port"]).free_port()

    def write(users):
        cfg_path.write_text(yaml.safe_dump({
            "listen": {"host": "127.0.0.1", "port": port},
            "backend": {"host": pg.host, "port": pg.port, "database": db, "user": BACKEND_ROLE,
                        "password_env": "TG_TEST_BACKEND_PW", "sslmode": "disable"},
            "users": [{"name": n, "scram_verifier": verifier_for(pw), "passthrough": True} for n, pw in users.items()],
            "metrics": {"port": None},
            "timeouts": {"drain_s": 5},
        }))

    write({"app": "pw"})
    env = dict(os.environ, TG_TEST_BACKEND_PW=BACKEND_PASSWORD)
    with serve(cfg_path, env=env) as proxy:
        dsn = f"postgresql://app:pw@127.0.0.1:{port}/{db}?sslmode=disable"
        kept = psycopg.connect(dsn)
        kept.execute("SELECT 1")
        write({"app": "pw", "second": "pw2"})
        proxy.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            try:
                with psycopg.connect(f"postgresql://second:pw2@127.0.0.1:{port}/{db}?sslmode=disable") as c:
                    c.execute("SELECT 1")
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline, "reload did not take effect"
                time.sleep(0.2)
        assert kept.execute("SELECT 2").fetchone() == (2,)  # not dropped by the reload
        kept.close()
        assert proxy.stop() == 0  # SIGTERM: drained and exited cleanly


def test_serve_rejects_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backend:\n  port: not-a-number\n")
    r = subprocess.run([PY, "-m", "proxy", "serve", "--config", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "backend.port" in r.stderr


def test_passwd_makes_a_working_verifier():
    r = subprocess.run([PY, "-m", "proxy", "passwd"], input="s3cret\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    verifier = r.stdout.strip()
    assert verifier.startswith("SCRAM-SHA-256$4096:")
    for pw, ok in [("s3cret", True), ("wrong", False)]:
        client, server = ScramClientExchange("u", pw), ScramServerExchange(parse_verifier(verifier))
        final = client.server_first(server.client_first(client.client_first()))
        if ok:
            client.server_final(server.client_final(final))
        else:
            with pytest.raises(ScramError, match="password authentication failed"):
                server.client_final(final)
    r = subprocess.run([PY, "-m", "proxy", "passwd", "alice"], input="pw\n", capture_output=True, text=True, timeout=60)
    snippet = yaml.safe_load(r.stdout)
    assert snippet["users"][0]["name"] == "alice" and snippet["users"][0]["scram_verifier"].startswith("SCRAM-SHA-256$")
    r = subprocess.run([PY, "-m", "proxy", "passwd"], input="\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "empty password" in r.stderr


def test_idle_in_transaction_timeout(pg, db):
    p = start_proxy(make_config(pg, db, {"app": "pw"}, timeouts={"idle_in_transaction_s": 0.3}))
    try:
        c = RawClient(p.host, p.port)
        c.startup("app", "pw", database=db)
        c.send(m.encode_query("SELECT 1"))
        c.read_until(b"Z")
        time.sleep(0.5)  # idle outside a transaction: fine
        c.send(m.encode_query("BEGIN"))
        assert c.read_until(b"Z")[-1] == (b"Z", b"T")
        e = errors_in(c.read_all())
        assert e and (e[0]["S"], e[0]["C"]) == ("FATAL", "25P03")
    finally:
        p.stop()
