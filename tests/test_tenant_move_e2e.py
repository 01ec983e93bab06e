"""`tenant move` end to end: `tenantgate demo --regions cn-east,cn-north` (two real PostgreSQL clusters, the
real proxy routing by placement), acme's application writing through the proxy the whole time, the CLI run
by two approvers with the demo's admin console as the hold.  What a user notices: every write the
application got acknowledged is on cn-north afterwards, nothing of acme is left on cn-east, globex's rows
are untouched on both servers, acme's new sessions land on cn-north, and the audit chain verifies."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

import psycopg
import pytest

from support.demo import start_demo, stop_demo
from support.e2e import fresh_ids
from support.operators import demo_tenantgate

REGIONS = ("cn-east", "cn-north")


@pytest.fixture(scope="module")
def rdemo():
    base = Path(tempfile.mkdtemp(prefix="tenantgate-move-e2e-"))
    os.chmod(base, 0o755)
    d = start_demo(base, "--regions", ",".join(REGIONS), "--metrics-port", "off")
    yield d
    assert stop_demo(d) == 0


def rows(rdemo, region: str, tenant: str, table: str = "customers") -> list[tuple]:
    with psycopg.connect(rdemo.dsns["backend_admin_by_region"][region], autocommit=True) as conn:
        return conn.execute(f"SELECT * FROM {table} WHERE tenant_id = %s ORDER BY 1, 2", [tenant]).fetchall()


class AppWriter(threading.Thread):
    """acme's application through the proxy: one INSERT per transaction; a serialization failure (the
    move's fence) or an ended session is retried, as applications do."""

    def __init__(self, dsn: str):
        super().__init__(daemon=True)
        self.dsn = dsn
        self.acked: list[int] = []
        self.retries = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        conn = None
        try:
            while not self.stop.is_set():
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True, application_name="move-e2e-writer")
                cid, = fresh_ids(1)
                try:
                    conn.execute("INSERT INTO customers (customer_id, name) VALUES (%s, 'written during the move')",
                                 [cid])
                except (psycopg.errors.SerializationFailure, psycopg.OperationalError):
                    self.retries += 1
                    if conn.closed or conn.broken:
                        conn = None
                    continue
                self.acked.append(cid)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
        finally:
            if conn is not None:
                conn.close()


def test_move_through_the_proxy_while_the_application_writes(rdemo):
    tg = demo_tenantgate(rdemo)
    globex_east, globex_north = rows(rdemo, "cn-east", "globex"), rows(rdemo, "cn-north", "globex")
    acme_before = {t: rows(rdemo, "cn-east", "acme", t) for t in ("customers", "orders", "order_items")}
    assert acme_before["customers"] and rows(rdemo, "cn-north", "acme") == []

    writer = AppWriter(rdemo.app("acme"))
    try:
        r = tg.run("tenant", "move", "acme", "--to", "cn-north", "--reason", "T-19 e2e", actor="bob")
        assert r.returncode == 0, r.stderr
        move_id = json.loads(r.stdout)["id"]
        # the servers: each region's data_dsn in the demo's config (its superuser)
        r = tg.run("tenant", "move", "--approve", str(move_id), "--console", rdemo.dsns["admin_console"],
                   actor="carol", timeout=240)
        assert r.returncode == 0, r.stdout + r.stderr
        done = json.loads(r.stdout)
        assert done["step"] == "done" and "flipped to cn-north" in r.stderr
        assert done["detail"]["cutover"]["pause_ms"] >= 0 and done["detail"]["verified"]["checksums"]
        n = len(writer.acked)
        while len(writer.acked) < n + 20 and writer.is_alive():  # acme goes on writing, now on cn-north
            writer.join(0.05)
    finally:
        writer.stop.set()
        writer.join(30)
    assert writer.error is None, writer.error
    assert len(writer.acked) > 20

    # every acknowledged write is on cn-north; nothing of acme is left on cn-east
    north_ids = {row[1] for row in rows(rdemo, "cn-north", "acme")}
    assert set(writer.acked) <= north_ids
    for t in ("customers", "orders", "order_items"):
        assert rows(rdemo, "cn-east", "acme", t) == []
    for t in ("orders", "order_items"):
        assert rows(rdemo, "cn-north", "acme", t) == acme_before[t]
    before_ids = {row[1] for row in acme_before["customers"]}
    assert before_ids <= north_ids
    # globex untouched on both servers
    assert rows(rdemo, "cn-east", "globex") == globex_east
    assert rows(rdemo, "cn-north", "globex") == globex_north
    # a new acme session sees its rows, from cn-north
    with psycopg.connect(rdemo.app("acme"), autocommit=True) as conn:
        got = {r[0] for r in conn.execute("SELECT customer_id FROM customers").fetchall()}
    assert got == north_ids
    listed = {t["name"]: t for t in tg.ok("tenant", "list")}
    assert listed["acme"].get("region") == "cn-north"
    assert tg.verify().returncode == 0
