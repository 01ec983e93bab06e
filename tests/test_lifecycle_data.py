"""Tenant export, verify, purge and import (proxy.lifecycle) against a real PostgreSQL.

The schema (tests/support/lifecycle_fixtures.py) has composite FKs, a self-referencing
FK with a self-pointing row and a two-row cycle, a two-table FK cycle, a shared
table, NULLs, unicode, bytea, jsonb, arrays, timestamps, a generated and an
identity column.  The tenant under test has a quote in its id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import asyncpg
import pytest
import zstandard

from support.lifecycle_fixtures import SCHEMA_SQL, TENANT_TABLES, data_sql, table_key, tenant_rows
from proxy.lifecycle.export import export_tenant, verify_export
from proxy.lifecycle.importer import import_tenant
from proxy.lifecycle.purge import PurgeOptions, check_receipt, purge_tenant
from proxy.lifecycle.tables import LifecycleError, discover

T = "o'neil"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
async def db(make_db):
    name, dsn = make_db("lcdata")
    conn = await asyncpg.connect(dsn)
    await conn.execute(SCHEMA_SQL)
    await conn.execute(data_sql("acme", 12))
    await conn.execute(data_sql(T, 10))
    await conn.execute(data_sql("globex", 5))
    yield dsn, conn
    await conn.close()


async def _others(conn):
    return {t: await tenant_rows(conn, t) for t in ("acme", "globex")}


async def test_discovery_orders_parents_first_and_finds_cycles(db):
    _, conn = db
    s = await discover(conn, "tenant_id")
    assert sorted(s.tables) == sorted(table_key(t) for t in TENANT_TABLES)
    assert s.shared_tables == ["public.products"]
    order = s.import_order()
    assert order.index("public.customers") < order.index("public.orders") < order.index("public.order_items")
    purge = s.purge_order()
    assert purge.index("public.order_items") < purge.index("public.orders") < purge.index("public.customers")
    assert [c.tables for c in s.cycles()] == [("public.members", "public.teams")]
    assert [fk.child for fk in s.self_references("public.employees")] == ["public.employees"]
    # explicit list
    s2 = await discover(conn, "tenant_id", tables=["customers", "public.orders"])
    assert sorted(s2.tables) == ["public.customers", "public.orders"]
    with pytest.raises(LifecycleError) as e:
        await discover(conn, "tenant_id", tables=["products"])
    assert e.value.sqlstate == "42703"


@pytest.mark.parametrize("kind,fmt", [("dir", "csv"), ("tar.zst", "csv"), ("dir", "jsonl"), ("tar.zst", "jsonl")])
async def test_export_purge_import_round_trip(db, tmp_path, kind, fmt):
    _, conn = db
    s = await discover(conn, "tenant_id")
    before = await tenant_rows(conn, T)
    others = await _others(conn)
    out = tmp_path / ("export" if kind == "dir" else "export.tar.zst")

    manifest = await export_tenant(conn, s, T, out, data_format=fmt)
    assert manifest["tenant"] == T and manifest["complete"] is True
    assert manifest["foreign_key_order"] == s.import_order()
    assert manifest["shared_tables"] == ["public.products"]
    assert {t["name"]: t["rows"] for t in manifest["tables"]} == {table_key(k): len(v) for k, v in before.items()}
    assert "public.Notes%20%C3%BC%2Ev2.csv" in {t["file"] for t in manifest["tables"]} or fmt == "jsonl"
    assert all(len(t["sha256"]) == 64 and t["columns"] for t in manifest["tables"])
    assert verify_export(out) == manifest
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers

    from proxy.signing import Signer, key_id_of, load_private_key, new_signing_key_pem

    key = load_private_key(new_signing_key_pem()[0])
    signer = Signer(key, key_id_of(key.public_key()))
    receipt = await purge_tenant(conn, s, T, PurgeOptions(batch_rows=3, operator="alice", grant_id="g-1",
                                                          signer=signer))
    assert receipt["tables"] == {table_key(k): len(v) for k, v in before.items()}
    assert receipt["total_rows"] == sum(len(v) for v in before.values())
    assert receipt["operator"] == "alice" and receipt["grant_id"] == "g-1"
    keys = {signer.key_id: signer.public_key}
    assert check_receipt(receipt, keys) and not check_receipt({**receipt, "total_rows": 0}, keys)
    assert all(v == [] for v in (await tenant_rows(conn, T)).values())
    assert await _others(conn) == others

    result = await import_tenant(conn, s, T, out)
    assert result["total_rows"] == receipt["total_rows"]
    assert await tenant_rows(conn, T) == before  # row for row, values identical
    assert await _others(conn) == others


async def test_export_refuses_existing_path(db, tmp_path):
    _, conn = db
    s = await discover(conn, "tenant_id")
    (tmp_path / "x").mkdir()
    (tmp_path / "y.tar.zst").write_bytes(b"keep me")
    for name in ("x", "y.tar.zst"):
        with pytest.raises(LifecycleError) as e:
            await export_tenant(conn, s, T, tmp_path / name)
        assert e.value.sqlstate == "58P02" and "already exists" in e.value.message
    assert (tmp_path / "y.tar.zst").read_bytes() == b"keep me"


async def _export(conn, tmp_path, name="e", tenant=T, fmt="csv"):
    s = await discover(conn, "tenant_id")
    out = tmp_path / name
    await export_tenant(conn, s, tenant, out, data_format=fmt)
    return s, out


async def test_tampered_directory_export_is_refused(db, tmp_path):
    _, conn = db
    s, out = await _export(conn, tmp_path)
    f = out / "public.customers.csv"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # flip one bit in the last row
    f.write_bytes(bytes(data))
    with pytest.raises(LifecycleError) as e:
        verify_export(out)
    assert e.value.sqlstate == "XX001" and "public.customers.csv" in e.value.message
    await purge_tenant(conn, s, T)
    with pytest.raises(LifecycleError) as e:
        await import_tenant(conn, s, T, out)
    assert "public.customers.csv" in e.value.message
    assert all(v == [] for v in (await tenant_rows(conn, T)).values())  # nothing loaded


async def test_missing_or_extra_file_and_missing_manifest(db, tmp_path):
    _, conn = db
    _, out = await _export(conn, tmp_path)
    (out / "public.orders.csv").unlink()
    with pytest.raises(LifecycleError, match="public.orders.csv.*missing"):
        verify_export(out)
    _, out2 = await _export(conn, tmp_path, "e2")
    (out2 / "extra.csv").write_text("x\n")
    with pytest.raises(LifecycleError, match="extra.csv"):
        verify_export(out2)
    (out2 / "extra.csv").unlink()
    (out2 / "manifest.json").unlink()
    with pytest.raises(LifecycleError, match="no manifest"):
        verify_export(out2)


async def test_truncated_or_tampered_archive_is_refused(db, tmp_path):
    _, conn = db
    s, out = await _export(conn, tmp_path, "e.tar.zst")
    raw = out.read_bytes()
    (tmp_path / "cut.tar.zst").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(LifecycleError) as e:
        verify_export(tmp_path / "cut.tar.zst")
    assert e.value.sqlstate == "XX001" and "cut.tar.zst" in e.value.message

    # re-pack with one modified member but the original manifest
    members = []
    with open(out, "rb") as f, tarfile.open(fileobj=zstandard.ZstdDecompressor().stream_reader(f), mode="r|") as tar:
        for info in tar:
            members.append((info, tar.extractfile(info).read()))
    bad = tmp_path / "bad.tar.zst"
    with open(bad, "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as zw, tarfile.open(fileobj=zw, mode="w|") as tar:
        for info, data in members:
            if info.name == "public.employees.csv":
                data = data.replace(b"emp 1", b"emp X")
            info.size = len(data)
            import io

            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(LifecycleError) as e:
        verify_export(bad)
    assert "public.employees.csv" in e.value.message and "checksum" in e.value.message
    await purge_tenant(conn, s, T)
    with pytest.raises(LifecycleError):
        await import_tenant(conn, s, T, bad)
    assert all(v == [] for v in (await tenant_rows(conn, T)).values())


async def test_import_refuses_non_empty_tenant(db, tmp_path):
    _, conn = db
    s, out = await _export(conn, tmp_path)
    before = await tenant_rows(conn, T)
    with pytest.raises(LifecycleError) as e:
        await import_tenant(conn, s, T, out)
    assert e.value.sqlstate == "55000" and "not empty" in e.value.message
    assert await tenant_rows(conn, T) == before


async def test_import_refuses_rows_of_another_tenant(db, tmp_path):
    """A consistent export (checksums fixed up) whose file carries another tenant's id is refused."""
    _, conn = db
    s, out = await _export(conn, tmp_path)
    # wrong target tenant
    with pytest.raises(LifecycleError) as e:
        await import_tenant(conn, s, "newco", out)
    assert e.value.sqlstate == "23514"
    # smuggle a row for tenant "newco" into T's export, and fix the manifest up
    f = out / "public.customers.csv"
    f.write_bytes(f.read_bytes() + b"newco,999,Mallory,,\n")
    import hashlib

    m = json.loads((out / "manifest.json").read_text())
    for t in m["tables"]:
        if t["file"] == f.name:
            t["rows"] += 1
            t["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(m))
    verify_export(out)  # consistent...
    await purge_tenant(conn, s, T)
    with pytest.raises(LifecycleError) as e:
        await import_tenant(conn, s, T, out)
    assert e.value.sqlstate == "23514" and "public.customers" in e.value.message
    assert all(v == [] for v in (await tenant_rows(conn, T)).values())
    assert await conn.fetchval("SELECT count(*) FROM customers WHERE tenant_id = 'newco'") == 0


async def test_purge_is_idempotent_and_leaves_others_untouched(db):
    _, conn = db
    s = await discover(conn, "tenant_id")
    others = await _others(conn)
    first = await purge_tenant(conn, s, T, PurgeOptions(batch_rows=4))
    again = await purge_tenant(conn, s, T, PurgeOptions(batch_rows=4))
    assert first["total_rows"] > 0 and again["total_rows"] == 0
    assert await _others(conn) == others


async def test_purge_reports_rows_referenced_by_another_tenant(db):
    """A reference from another tenant's row blocks the purge with 23503 and a clear message."""
    _, conn = db
    s = await discover(conn, "tenant_id")
    await conn.execute("UPDATE employees SET manager_id = NULL WHERE tenant_id = 'acme'")
    await conn.execute(
        "ALTER TABLE employees ADD COLUMN peer_tenant text, ADD COLUMN peer_id int, "
        "ADD FOREIGN KEY (peer_tenant, peer_id) REFERENCES employees (tenant_id, id)"
    )
    await conn.execute("UPDATE employees SET peer_tenant = $1, peer_id = 2 WHERE tenant_id = 'acme' AND id = 1", T)
    s = await discover(conn, "tenant_id")
    before = await tenant_rows(conn, T)
    with pytest.raises(LifecycleError) as e:
        await purge_tenant(conn, s, T, PurgeOptions(batch_rows=5))
    assert e.value.sqlstate == "23503" and "public.employees" in e.value.message
    assert "nothing was deleted" in e.value.detail
    assert await tenant_rows(conn, T) == before  # reported before anything was deleted


async def test_purge_reports_references_from_a_shared_table(db):
    _, conn = db
    await conn.execute(
        "CREATE TABLE audit_notes (id int PRIMARY KEY, cust_tenant text, cust_id int, "
        "FOREIGN KEY (cust_tenant, cust_id) REFERENCES customers (tenant_id, id))"
    )
    await conn.execute("INSERT INTO audit_notes VALUES (1, $1, 3)", T)
    s = await discover(conn, "tenant_id")
    assert [fk.child for fk in s.blockers] == ["public.audit_notes"]
    before = await tenant_rows(conn, T)
    with pytest.raises(LifecycleError) as e:
        await purge_tenant(conn, s, T)
    assert e.value.sqlstate == "23503" and "public.audit_notes" in e.value.message
    assert await tenant_rows(conn, T) == before
    await conn.execute("DELETE FROM audit_notes")
    assert (await purge_tenant(conn, s, T))["total_rows"] == sum(len(v) for v in before.values())


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


@pytest.mark.parametrize("name", ["out", "out.tar.zst"])
async def test_disk_full_mid_export_leaves_nothing(db, tmp_path, name):
    _, conn = db
    await conn.execute(
        "INSERT INTO customers SELECT 'big', i, md5(i::text) || md5((i*7)::text) || md5((i*13)::text), NULL, now() "
        "FROM generate_series(1, 3000) i"
    )
    s = await discover(conn, "tenant_id")
    small = tmp_path / "small"
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs and needs root (the project's test environment runs as root)")
    _mount_tmpfs(small, "64k")
    try:
        with pytest.raises(LifecycleError) as e:
            await export_tenant(conn, s, "big", small / name)
        assert e.value.sqlstate == "58030" and "No space left" in e.value.message
        assert list(small.iterdir()) == []  # partial output removed
        # the connection is still usable afterwards
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        subprocess.run(["umount", str(small)], check=True)


_CHILD = r"""
import asyncio, sys, time, asyncpg
from proxy.lifecycle.tables import discover
from proxy.lifecycle.purge import purge_tenant, PurgeOptions
async def main():
    conn = await asyncpg.connect(sys.argv[1])
    s = await discover(conn, "tenant_id")
    def slow(table, n):
        print(table, n, flush=True)
        time.sleep(0.01)
    await purge_tenant(conn, s, sys.argv[2], PurgeOptions(batch_rows=25), on_batch=slow)
    print("FINISHED", flush=True)
asyncio.run(main())
"""


async def test_kill_9_mid_purge_then_rerun_finishes(db):
    dsn, conn = db
    await conn.execute(data_sql("victim", 400))
    s = await discover(conn, "tenant_id")
    total = sum(len(v) for v in (await tenant_rows(conn, "victim")).values())
    others = {t: await tenant_rows(conn, t) for t in ("acme", T)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, dsn, "victim"], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        for _ in range(3):  # wait until a few batches are committed
            line = proc.stdout.readline()
            assert line and not line.startswith("FINISHED"), line
    finally:
        proc.kill()  # SIGKILL
        proc.wait()
    left = sum(len(v) for v in (await tenant_rows(conn, "victim")).values())
    assert 0 < left < total  # really interrupted mid-way
    receipt = await purge_tenant(conn, s, "victim", PurgeOptions(batch_rows=500))
    assert receipt["total_rows"] == total  # counts across both runs
    assert all(v == [] for v in (await tenant_rows(conn, "victim")).values())
    assert {t: await tenant_rows(conn, t) for t in ("acme", T)} == others


async def test_foreign_rls_policy_is_refused_before_anything_happens(db, tmp_path):
    """A policy other than tenantgate's could hide rows: refused (42501), never a partial export or purge."""
    dsn, conn = db
    role = f"lc_rls_{uuid.uuid4().hex[:6]}"
    await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'; GRANT SELECT, DELETE, INSERT ON ALL TABLES IN SCHEMA public TO {role}")
    await conn.execute("ALTER TABLE customers ENABLE ROW LEVEL SECURITY")
    await conn.execute(f"CREATE POLICY only_acme ON customers TO {role} USING (tenant_id = 'acme')")
    other = await asyncpg.connect(dsn.replace("postgres:postgres-admin@", f"{role}:pw@"))
    try:
        s = await discover(other, "tenant_id")
        before = await tenant_rows(conn, T)
        for action in (lambda: export_tenant(other, s, T, tmp_path / "rls"), lambda: purge_tenant(other, s, T)):
            with pytest.raises(LifecycleError) as e:
                await action()
            assert e.value.sqlstate == "42501" and '"only_acme" on public.customers' in e.value.message
        assert not (tmp_path / "rls").exists()
        assert await tenant_rows(conn, T) == before
    finally:
        await other.close()


async def test_least_privileged_role_under_tenantgate_rls_policies(db, tmp_path):
    """With RLS forced and tenantgate's GUC-keyed policies (as deploy/postgres/bootstrap.sql sets up),
    a role without BYPASSRLS can export, purge and import exactly the tenant's rows."""
    dsn, conn = db
    role = f"lc_life_{uuid.uuid4().hex[:6]}"
    dbname = dsn.rsplit("/", 1)[1].split("?")[0]
    await conn.execute(
        f"CREATE ROLE {role} LOGIN PASSWORD 'pw'; GRANT SELECT, DELETE, INSERT ON ALL TABLES IN SCHEMA public TO {role};"
        f'GRANT CREATE ON DATABASE "{dbname}" TO {role}'
    )
    for t in TENANT_TABLES:
        await conn.execute(f"ALTER TABLE {t} ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY")
        for name, kind in (("tenantgate_tenant_access", "PERMISSIVE"), ("tenantgate_tenant_isolation", "RESTRICTIVE")):
            await conn.execute(
                f"CREATE POLICY {name} ON {t} AS {kind} FOR ALL TO PUBLIC "
                "USING (tenant_id = current_setting('tenantgate.tenant_id', true)) "
                "WITH CHECK (tenant_id = current_setting('tenantgate.tenant_id', true))"
            )
    before = await tenant_rows(conn, T)
    others = await _others(conn)
    life = await asyncpg.connect(dsn.replace("postgres:postgres-admin@", f"{role}:pw@"))
    try:
        s = await discover(life, "tenant_id")
        m = await export_tenant(life, s, T, tmp_path / "x.tar.zst")
        assert m["total_rows"] == sum(len(v) for v in before.values())
        r = await purge_tenant(life, s, T, PurgeOptions(batch_rows=4))
        assert r["total_rows"] == m["total_rows"]
        assert all(v == [] for v in (await tenant_rows(conn, T)).values())
        await import_tenant(life, s, T, tmp_path / "x.tar.zst")
    finally:
        await life.close()
    assert await tenant_rows(conn, T) == before
    assert await _others(conn) == others


def test_progress_draws_only_on_a_terminal():
    import io

    from proxy.lifecycle.progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    quiet, tty = io.StringIO(), Tty()
    for stream in (quiet, tty):
        p = Progress(stream, interval_s=0)
        p.start("public.orders")
        p.update(1500, 2_500_000)
        p.done(3000, 5_000_000)
    assert quiet.getvalue() == ""
    out = tty.getvalue()
    assert "public.orders" in out and "3,000 rows" in out and "4.8 MB" in out and out.endswith("\n")
    # while streaming only bytes are shown: a guessed row count (line breaks) above COPY's exact
    # count would make the rows go down on the final line
    interim = [seg for seg in out.split("\r") if seg and not seg.endswith("\n")]
    assert interim and all("rows" not in seg for seg in interim) and "2.4 MB" in out
    assert out.count(" rows ") == 1


def test_status_helpers_for_the_gate():
    from datetime import datetime, timezone
    from types import SimpleNamespace

    from proxy.lifecycle.status import connect_refusal, write_refusal

    end = datetime(2027, 2, 24, 10, 0, tzinfo=timezone.utc)
    active = SimpleNamespace(name="acme", status="active", retention_end=None)
    off = SimpleNamespace(name="acme", status="offboarded", retention_end=end)
    gone = SimpleNamespace(name="acme", status="purged", retention_end=end)
    assert connect_refusal(active) is None and connect_refusal(off) is None and connect_refusal(None) is None
    assert connect_refusal(gone).sqlstate == "28000"
    assert write_refusal(active) is None and write_refusal(gone) is None
    r = write_refusal(off)
    assert r.sqlstate == "25006" and "2027-02-24" in r.message
    # after the retention period the tenant is purged, not writable again: the message says so
    assert "will be purged when its retention period ends on 2027-02-24" in r.message
    assert "read-only until" not in r.message and "tenantgate tenant restore acme" in r.hint


def test_session_ended_messages_name_what_happens_next():
    from proxy.lifecycle.status import ended_message

    for status in ("purged", "purging"):
        m = ended_message("acme", status)
        assert "reconnect" not in m and "no new session of it is accepted" in m
    assert "may read and export, not write" in ended_message("acme", "offboarded")
    assert "reconnect to continue" in ended_message("acme", "active")


async def test_concurrent_purge_of_the_same_tenant_is_refused(db):
    dsn, conn = db
    s = await discover(conn, "tenant_id")
    holder = await asyncpg.connect(dsn)
    try:
        await holder.execute("SELECT pg_advisory_lock(hashtext($1))", f"tenantgate.purge:{T}")
        with pytest.raises(LifecycleError) as e:
            await purge_tenant(conn, s, T)
        assert e.value.sqlstate == "55P03"
    finally:
        await holder.close()
    assert (await purge_tenant(conn, s, T))["total_rows"] > 0
