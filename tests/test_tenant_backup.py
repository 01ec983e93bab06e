"""Encrypted tenant backups end to end: real PostgreSQL, the control plane, the CLI as a subprocess.

A backup taken before a purge restores before it (rows identical, other
tenants untouched); an altered backup is refused; after the purge the same
backup cannot be restored (its data key is destroyed, the deletion receipt
says so), and the audit chain records all of it and still verifies.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from support.lifecycle_fixtures import tenant_rows
from support.lifecycle_cli import lifecycle_config, lifecycle_database
from proxy.control.model import Actor
from proxy.lifecycle.purge import check_receipt, purge_tenant
from proxy.lifecycle.tables import discover

REPO = Path(__file__).resolve().parent.parent
PASSWORDS = {"alice": "alice-pw-1", "bob": "bob-pw-2", "carol": "carol-pw-3"}


@pytest.fixture
async def env(make_db, tmp_path):

    _, dsn = make_db("backup")
    conn, plane, admin = await lifecycle_database(dsn, {"acme": 6, "globex": 5}, passwords=PASSWORDS)
    for t in ("acme", "globex"):
        await plane.register_tenant(t)
    cfg = lifecycle_config(tmp_path, dsn, {"backup_master_key_file": str(tmp_path / "master.key")})
    yield {"dsn": dsn, "conn": conn, "plane": plane, "cfg": str(cfg), "tmp": tmp_path}
    await plane.close()
    await conn.close()


def tg(env, *args, who=None):
    argv = [sys.executable, "-m", "proxy.cli", "tenant", args[0], *args[1:]]
    if args[0] != "backup-keygen":
        argv += ["--config", env["cfg"]]
    stdin = None
    if who:
        argv += ["--as", who, "--password-stdin"]
        stdin = PASSWORDS[who] + "\n"
    p = subprocess.run(argv, input=stdin, capture_output=True, text=True, cwd=REPO, timeout=120)
    return p.returncode, p.stdout, p.stderr


async def grant(plane, who, tenant, access, approver="bob") -> int:
    g = await plane.request_grant(Actor(who, frozenset({"operator"})), tenant, access, "1h", "TICKET-9: backup")
    await plane.approve_grant(Actor(approver, frozenset({"approver"})), g.id)
    return g.id


async def test_backup_restores_before_purge_and_never_after(env):
    plane, conn, tmp = env["plane"], env["conn"], env["tmp"]
    before = await tenant_rows(conn, "acme")
    globex = await tenant_rows(conn, "globex")
    out = tmp / "acme.tgbk"

    # no grant, then no master key file yet: clear refusals, nothing written
    rc, _, err = tg(env, "backup", "acme", "--out", str(out), who="alice")
    assert rc == 1 and "42501" in err  # no read grant
    await grant(plane, "alice", "acme", "read")
    rc, _, err = tg(env, "backup", "acme", "--out", str(out), who="alice")
    assert rc == 1 and "cannot read the backup master key" in err and "22023" in err and not out.exists()

    rc, stdout, err = tg(env, "backup-keygen", "--out", str(tmp / "master.key"))
    assert rc == 0, err
    assert (tmp / "master.key").stat().st_mode & 0o077 == 0
    rc, stdout, err = tg(env, "backup", "acme", "--out", str(out), who="alice")
    assert rc == 0, err
    made = json.loads(stdout)
    assert made["total_rows"] == sum(len(v) for v in before.values())
    raw = out.read_bytes()
    assert raw.startswith(b"TGBACKUP1\n") and b"O'Brien" not in raw and b"public.customers" not in raw
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]  # no plaintext left behind
    # the control schema holds the data key only wrapped
    row = await conn.fetchrow("SELECT * FROM tenantgate_control.tenant_keys WHERE key_id = $1", made["key_id"])
    assert row["tenant"] == "acme" and len(row["wrapped_key"]) == 40 and row["destroyed_at"] is None

    # an altered copy fails authentication and loads nothing
    bad = tmp / "altered.tgbk"
    b = bytearray(raw)
    b[len(b) // 2] ^= 1
    bad.write_bytes(bytes(b))
    await purge_tenant(conn, await discover(conn, "tenant_id"), "acme")  # data lost (no key destroyed)
    await grant(plane, "alice", "acme", "write", approver="carol")
    rc, _, err = tg(env, "restore-backup", str(bad), who="alice")
    assert rc == 1 and "XX001" in err and "authentication" in err
    assert all(v == [] for v in (await tenant_rows(conn, "acme")).values())

    # restored before the purge: every row back, the other tenant untouched
    rc, stdout, err = tg(env, "restore-backup", str(out), who="alice")
    assert rc == 0, err
    assert await tenant_rows(conn, "acme") == before
    assert await tenant_rows(conn, "globex") == globex

    # the purge destroys the data key and says so in the signed receipt
    rc, _, err = tg(env, "offboard", "acme", who="bob")
    assert rc == 0, err
    rc, stdout, err = tg(env, "purge", "acme", "--now", "--confirm", "acme", who="alice")
    assert rc == 0, err
    receipt = json.loads(stdout)
    from proxy.signing import keys_from_files

    assert check_receipt(receipt, keys_from_files([tmp / "audit.key.pub"]))
    assert [k["key_id"] for k in receipt["backup_keys_destroyed"]] == [made["key_id"]]
    row = await conn.fetchrow("SELECT * FROM tenantgate_control.tenant_keys WHERE key_id = $1", made["key_id"])
    assert row["wrapped_key"] is None and row["destroyed_at"] is not None
    with pytest.raises(asyncpg.InsufficientPrivilegeError):  # a destroyed key stays destroyed
        await conn.execute("UPDATE tenantgate_control.tenant_keys SET wrapped_key = '\\x00' WHERE key_id = $1",
                           made["key_id"])

    # ... so the backup taken before it can no longer be restored
    rc, _, err = tg(env, "restore-backup", str(out), who="alice")
    assert rc == 1 and "55000" in err and "can no longer be decrypted" in err and made["key_id"] in err
    assert all(v == [] for v in (await tenant_rows(conn, "acme")).values())
    assert await tenant_rows(conn, "globex") == globex

    types = [r["type"] for r in await conn.fetch(
        "SELECT type FROM tenantgate_control.audit_log WHERE tenant = 'acme' ORDER BY seq")]
    assert "tenant.backup.done" in types and "tenant.restore_backup.done" in types
    assert "tenant.restore_backup.failed" in types and "tenant.keys_destroyed" in types
    assert types[-1] == "tenant.refused"
    assert types.index("tenant.keys_destroyed") < types.index("tenant.purge")
    report = await plane.verify()
    assert report.ok, report.to_json()


def test_backup_records_are_authenticated_in_order_and_to_the_end(tmp_path):
    """The container alone (no database): a file cut short, records swapped or appended, a changed
    header, or another data key all fail before any plaintext is returned."""
    import io
    import os
    import struct

    from proxy.lifecycle.backup import CHUNK, decrypt_records, encrypt_file, read_header
    from proxy.lifecycle.keys import DataKey, MasterKey
    from proxy.lifecycle.tables import LifecycleError

    key, master = DataKey("k1", "acme", os.urandom(32)), MasterKey(os.urandom(32))
    plain = os.urandom(CHUNK * 2 + 123)
    buf = io.BytesIO()
    encrypt_file(io.BytesIO(plain), buf, key, master, {})
    raw = buf.getvalue()

    def decrypt(data: bytes, k: DataKey = key) -> bytes:
        f = io.BytesIO(data)
        header, hb = read_header(f, "b")
        return b"".join(decrypt_records(f, k, header, hb, "b"))

    assert decrypt(raw) == plain
    hlen = len(b"TGBACKUP1\n") + 4 + struct.unpack(">I", raw[10:14])[0]
    recs, pos = [], hlen
    while pos < len(raw):
        n = struct.unpack(">I", raw[pos + 1:pos + 5])[0]
        recs.append(raw[pos:pos + 5 + n])
        pos += 5 + n
    assert len(recs) == 3
    head = raw[:hlen]
    cases = {
        "truncated": head + recs[0] + recs[1],
        "swapped": head + recs[1] + recs[0] + recs[2],
        "appended": raw + recs[2],
        "header": raw.replace(b'"tenant":"acme"', b'"tenant":"acmf"', 1),
    }
    for name, data in cases.items():
        with pytest.raises(LifecycleError) as e:
            decrypt(data)
        assert e.value.sqlstate == "XX001", name
    with pytest.raises(LifecycleError) as e:
        decrypt(raw, DataKey("k1", "acme", os.urandom(32)))
    assert "fails authentication" in e.value.message
    empty = io.BytesIO()
    encrypt_file(io.BytesIO(b""), empty, key, master, {})
    assert decrypt(empty.getvalue()) == b""
