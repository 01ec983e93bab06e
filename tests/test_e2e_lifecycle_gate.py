"""Tenant lifecycle at the gate, end to end (issue 6): the real CLI against the running demo.

* ``tenant offboard globex`` (approver bob): globex's live sessions end with FATAL 57P01;
  new globex sessions read and export, but every write fails with 25006 naming the
  retention end; ``tenant restore`` ends the sessions again and writes work.
* Purge (a tenant this module creates, never acme or globex): register, alice requests a
  write grant, bob approves and offboards, alice runs ``purge --now --confirm``; the
  tenant's live sessions end, its rows are gone, and its tokens are refused at connect
  with FATAL 28000.

The module leaves globex active again (try/finally) and removes the rows it inserted.
"""

from __future__ import annotations

import json
import secrets
import socket
import time

import asyncpg
import psycopg
import pytest
import yaml

from support.e2e import RawClient, RawServerError, admin_execute, admin_rows, data_rows, fresh_ids, pool_dsn, token

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

TENANT_TABLES = ("customers", "orders", "order_items")
WRITES = [
    "UPDATE orders SET status = 'changed' WHERE order_id = 1",
    "INSERT INTO customers (customer_id, name) VALUES (987654, 'new')",
    "DELETE FROM order_items",
    "INSERT INTO orders (order_id, customer_id) SELECT 987654, customer_id FROM customers LIMIT 1",
]

BUG_DEMO_PURGE = (
    "`tenantgate tenant purge T --now --confirm T --config <demo state>/tenantgate.yaml` fails with "
    "'ERROR:  permission denied for database app (SQLSTATE 42501)': the demo config has no lifecycle.data_dsn, so "
    "purge runs as tenantgate_app, which may not CREATE SCHEMA tenantgate_lifecycle for the purge journal "
    "(proxy/lifecycle/purge.py); if that schema already exists (created by another role) it fails with "
    "'permission denied for schema tenantgate_lifecycle' instead"
)


# ------------------------------------------------------------------------------ helpers


def cli(demo, who: str, *args: str, config=None):
    """``tenantgate ARGS --config CFG --as WHO --password-stdin`` with WHO's password."""
    argv = [*args, "--config", str(config or demo.config_path), "--as", who, "--password-stdin"]
    return demo.cli(*argv, password=demo.password(f"operator:{who}") + "\n")


def ok(result) -> str:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    return result.stdout


def status(demo, tenant: str) -> str | None:
    with psycopg.connect(demo.admin) as conn:
        row = conn.execute("SELECT status FROM tenantgate_control.tenants WHERE name = %s", [tenant]).fetchone()
    return row[0] if row else None


def snapshot(demo, tenant: str) -> dict:
    return {t: admin_rows(demo, t, tenant) for t in TENANT_TABLES}


def wait_for_fatal(client: RawClient, timeout: float = 5.0) -> RawServerError:
    """The FATAL error an idle session receives when the proxy ends it."""
    client.sock.settimeout(timeout)
    try:
        while True:
            client.until_ready()
    except RawServerError as e:
        return e
    except (socket.timeout, ConnectionError) as e:
        raise AssertionError(f"the session was not ended with a FATAL error within {timeout} s ({e!r})") from None


def seed_tenant(demo, tenant: str) -> None:
    admin_execute(demo, "INSERT INTO customers (tenant_id, customer_id, name) VALUES (%s, 1, 'one'), (%s, 2, 'two')",
                  [tenant, tenant])
    admin_execute(demo, "INSERT INTO orders (tenant_id, order_id, customer_id) VALUES (%s, 1, 1), (%s, 2, 2)",
                  [tenant, tenant])
    admin_execute(demo, "INSERT INTO order_items (tenant_id, order_id, line_no, product_id, quantity) "
                        "VALUES (%s, 1, 1, 1, 3)", [tenant])


def drop_tenant_rows(demo, tenant: str) -> None:
    for t in ("order_items", "orders", "customers"):
        admin_execute(demo, f"DELETE FROM {t} WHERE tenant_id = %s", [tenant])


def write_grant(demo, tenant: str, config=None) -> int:
    out = ok(cli(demo, "alice", "grant", "request", "--tenant", tenant, "--access", "write", "--for", "15m",
                 "--reason", "E2E-1: lifecycle gate test", "--json", config=config))
    grant_id = json.loads(out)["id"]
    ok(cli(demo, "bob", "grant", "approve", str(grant_id), config=config))
    return grant_id


def revoke(demo, grant_id: int | None) -> None:
    """End alice's grant again: a left-over active grant would change which grant her sessions bind to."""
    if grant_id is not None:
        ok(cli(demo, "alice", "grant", "revoke", str(grant_id), "--comment", "E2E-1: done"))


def new_tenant_name(prefix: str) -> str:
    return f"e2e_{prefix}_{secrets.token_hex(3)}"


def connect_refused(dsn: str, options: dict, timeout: float = 5.0) -> RawServerError:
    """Connect until the proxy refuses (the status change reaches the proxy asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            c = RawClient(dsn, options=options)
        except RawServerError as e:
            return e
        c.close()
        if time.monotonic() > deadline:
            raise AssertionError(f"still admitted {timeout} s after the status change")
        time.sleep(0.1)


# ------------------------------------------------------------------------------ offboard / restore


async def test_offboard_makes_sessions_read_only_and_restore_makes_them_writable(demo):
    before = {t: snapshot(demo, t) for t in ("acme", "globex")}
    live = RawClient(demo.app("globex"))
    live_pool = RawClient(pool_dsn(demo), options={"options": f"-c tenantgate.tenant={token(demo, 'globex')}"})
    live_acme = RawClient(demo.app("acme"))
    try:
        # only an approver may offboard
        r = cli(demo, "alice", "tenant", "offboard", "globex")
        assert r.returncode == 1 and "42501" in r.stderr, r.stderr
        assert status(demo, "globex") == "active"

        info = json.loads(ok(cli(demo, "bob", "tenant", "offboard", "globex")))
        assert info["status"] == "offboarded"
        retention_day = info["retention_end"][:10]

        # live sessions of globex are ended, acme's are not
        for client in (live, live_pool):
            err = wait_for_fatal(client)
            assert (err.severity, err.sqlstate) == ("FATAL", "57P01")
            assert "offboarded" in err.message and "may read and export, not write" in err.message, err.message
        assert live_acme.query("SELECT 1")[-1] == (b"Z", b"I")

        # a new session reads and exports ...
        conn = await asyncpg.connect(demo.app("globex"))
        try:
            assert await conn.fetchval("SELECT count(*) FROM orders") == len(before["globex"]["orders"])
            assert {r[0] for r in await conn.fetch("SELECT tenant_id FROM customers")} == {"globex"}
            exported = await conn.copy_from_query("SELECT * FROM order_items", output=_Sink())
            assert exported == f"COPY {len(before['globex']['order_items'])}"
            # ... and every write fails with 25006, naming the retention end
            for sql in WRITES:
                for run in (conn.execute, conn.fetch):
                    with pytest.raises(asyncpg.PostgresError) as e:
                        await run(sql)
                    assert e.value.sqlstate == "25006", (sql, e.value.sqlstate, str(e.value))
                    assert retention_day in str(e.value), str(e.value)
                    assert "will be purged when its retention period ends" in str(e.value), str(e.value)
            async with conn.transaction():
                with pytest.raises(asyncpg.PostgresError) as e:
                    await conn.execute("UPDATE customers SET name = 'x'")
                assert e.value.sqlstate == "25006"
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()
        # a token session for globex opened at startup is read-only too
        conn = await asyncpg.connect(pool_dsn(demo), server_settings={"options": f"-c tenantgate.tenant={token(demo, 'globex')}"})
        try:
            with pytest.raises(asyncpg.PostgresError) as e:
                await conn.execute(WRITES[0])
            assert e.value.sqlstate == "25006"
        finally:
            await conn.close()
        # acme is not affected
        with psycopg.connect(demo.app("acme")) as c:
            assert c.execute("UPDATE orders SET status = status WHERE order_id = 1").rowcount == 1
            c.rollback()
        assert {t: snapshot(demo, t) for t in ("acme", "globex")} == before

        # restore: the read-only sessions end, new ones write again
        live = RawClient(demo.app("globex"))
        info = json.loads(ok(cli(demo, "bob", "tenant", "restore", "globex")))
        assert info["status"] == "active"
        err = wait_for_fatal(live)
        assert (err.severity, err.sqlstate) == ("FATAL", "57P01")
        cid = fresh_ids()[0]
        try:
            conn = await asyncpg.connect(demo.app("globex"))
            try:
                assert await conn.execute("INSERT INTO customers (customer_id, name) VALUES ($1, 'back')", cid) == "INSERT 0 1"
                assert await conn.execute("UPDATE customers SET name = 'back again' WHERE customer_id = $1", cid) == "UPDATE 1"
            finally:
                await conn.close()
            assert [r[2] for r in admin_rows(demo, "customers", "globex") if r[1] == cid] == ["back again"]
        finally:
            admin_execute(demo, "DELETE FROM customers WHERE customer_id = %s", [cid])
    finally:
        for c in (live, live_pool, live_acme):
            c.close()
        if status(demo, "globex") != "active":
            cli(demo, "bob", "tenant", "restore", "globex")
    assert status(demo, "globex") == "active"
    assert {t: snapshot(demo, t) for t in ("acme", "globex")} == before


class _Sink:
    """A file-like object for asyncpg's COPY output that keeps only the byte count."""

    def __init__(self):
        self.n = 0

    def write(self, data: bytes) -> None:
        self.n += len(data)


async def test_set_token_for_an_offboarded_tenant_is_read_only(demo):
    tenant = new_tenant_name("ro")
    seed_tenant(demo, tenant)
    try:
        ok(cli(demo, "bob", "tenant", "register", tenant))
        ok(cli(demo, "bob", "tenant", "offboard", tenant))
        before = snapshot(demo, tenant)
        conn = await asyncpg.connect(pool_dsn(demo))
        try:
            await conn.execute(f"SET tenantgate.tenant = '{token(demo, tenant)}'")
            assert await conn.fetchval("SELECT count(*) FROM orders") == 2
            with pytest.raises(asyncpg.PostgresError) as e:
                await conn.execute("UPDATE orders SET status = 'changed'")
            assert e.value.sqlstate == "25006"
        finally:
            await conn.close()
        assert snapshot(demo, tenant) == before
    finally:
        drop_tenant_rows(demo, tenant)


def test_offboarding_a_tenant_chosen_by_set_ends_the_session(demo):
    tenant = new_tenant_name("setend")
    seed_tenant(demo, tenant)
    client = RawClient(pool_dsn(demo))  # connected without a tenant; SET chooses it later
    try:
        ok(cli(demo, "bob", "tenant", "register", tenant))
        assert client.query(f"SET tenantgate.tenant = '{token(demo, tenant)}'")[-1] == (b"Z", b"I")
        ok(cli(demo, "bob", "tenant", "offboard", tenant))
        err = wait_for_fatal(client)
        assert (err.severity, err.sqlstate) == ("FATAL", "57P01")
        assert "offboarded" in err.message
    finally:
        client.close()
        drop_tenant_rows(demo, tenant)


# ------------------------------------------------------------------------------ purge


def test_purge_with_the_demo_config_itself(demo):
    # runs before the `purged` fixture, whose superuser data_dsn would create the purge journal schema first
    tenant = new_tenant_name("demo_purge")
    seed_tenant(demo, tenant)
    grant_id = None
    try:
        ok(cli(demo, "bob", "tenant", "register", tenant))
        grant_id = write_grant(demo, tenant)
        ok(cli(demo, "bob", "tenant", "offboard", tenant))
        receipt = json.loads(ok(cli(demo, "alice", "tenant", "purge", tenant, "--now", "--confirm", tenant,
                                    "--grant", str(grant_id))))
        assert receipt["total_rows"] == 5
        assert snapshot(demo, tenant) == {t: [] for t in TENANT_TABLES}
    finally:
        drop_tenant_rows(demo, tenant)
        revoke(demo, grant_id)


@pytest.fixture(scope="module")
def purge_config(demo, tmp_path_factory):
    """The demo config plus a lifecycle.data_dsn that may run the purge (see BUG_DEMO_PURGE)."""
    cfg = yaml.safe_load(demo.config_path.read_text())
    cfg["lifecycle"] = {"data_dsn": demo.admin}
    path = tmp_path_factory.mktemp("e2e-lifecycle") / "tenantgate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def purged(demo, purge_config):
    """A tenant created, used, offboarded and purged through the CLI while a session of it was live."""
    tenant = new_tenant_name("purge")
    seed_tenant(demo, tenant)
    result = {"tenant": tenant}
    grant_id = None
    try:
        ok(cli(demo, "bob", "tenant", "register", tenant))
        opts = {"options": f"-c tenantgate.tenant={token(demo, tenant)}"}
        live = RawClient(pool_dsn(demo), options=opts)
        try:
            result["seen_before"] = sorted(r[0] for r in
                                           _rows(live.query("SELECT tenant_id || '/' || order_id FROM orders")))
            grant_id = write_grant(demo, tenant)
            # purge before the offboarding is refused
            r = cli(demo, "alice", "tenant", "purge", tenant, "--now", "--confirm", tenant, config=purge_config)
            assert r.returncode == 1 and "offboard it first" in r.stderr, r.stderr
            ok(cli(demo, "bob", "tenant", "offboard", tenant))
            result["offboard_fatal"] = wait_for_fatal(live)
        finally:
            live.close()
        # without --now (the retention period runs) it is refused too
        r = cli(demo, "alice", "tenant", "purge", tenant, config=purge_config)
        assert r.returncode == 1 and "retention" in r.stderr, r.stderr
        live = RawClient(pool_dsn(demo), options=opts)  # read-only, still admitted
        try:
            out = ok(cli(demo, "alice", "tenant", "purge", tenant, "--now", "--confirm", tenant, "--grant", str(grant_id),
                         config=purge_config))
            result["receipt"] = json.loads(out)
            result["purge_fatal"] = wait_for_fatal(live)
        finally:
            live.close()
    finally:
        drop_tenant_rows(demo, tenant)
        revoke(demo, grant_id)
    yield result


def _rows(msgs):
    return [[v.decode() if v is not None else None for v in row] for row in data_rows(msgs)]


def test_purge_deletes_the_rows_and_ends_the_live_session(demo, purged):
    tenant = purged["tenant"]
    assert purged["seen_before"] == [f"{tenant}/1", f"{tenant}/2"]
    for key in ("offboard_fatal", "purge_fatal"):
        assert (purged[key].severity, purged[key].sqlstate) == ("FATAL", "57P01"), key
    # after a purge there is nothing to reconnect to: the message says no new session is accepted
    assert "reconnect" not in purged["purge_fatal"].message, purged["purge_fatal"].message
    assert "no new session of it is accepted" in purged["purge_fatal"].message, purged["purge_fatal"].message
    receipt = purged["receipt"]
    assert receipt["tenant"] == tenant and receipt["total_rows"] == 5
    assert receipt["tables"] == {"public.order_items": 1, "public.orders": 2, "public.customers": 2}
    assert receipt["verified_remaining_rows"] == 0 and receipt["operator"] == "alice"
    assert snapshot(demo, tenant) == {t: [] for t in TENANT_TABLES}
    assert status(demo, tenant) == "purged"


def test_purged_tenant_token_is_refused_at_connect(demo, purged):
    opts = {"options": f"-c tenantgate.tenant={token(demo, purged['tenant'])}"}
    err = connect_refused(pool_dsn(demo), opts)
    assert (err.severity, err.sqlstate) == ("FATAL", "28000")
    assert "purged" in err.message
    # the other tenants are untouched and still connect
    with psycopg.connect(pool_dsn(demo), options=f"-c tenantgate.tenant={token(demo, 'globex')}") as conn:
        assert conn.execute("SELECT DISTINCT tenant_id FROM orders").fetchall() == [("globex",)]


async def test_purged_tenant_token_is_refused_at_set_time(demo, purged):
    conn = await asyncpg.connect(pool_dsn(demo))
    try:
        with pytest.raises(asyncpg.PostgresError) as e:
            await conn.execute(f"SET tenantgate.tenant = '{token(demo, purged['tenant'])}'")
        assert e.value.sqlstate == "28000"
    finally:
        await conn.close()
