"""Tampering with the audit trail as the control role (no superuser, no signing key), caught by `audit verify`.

The control role owns the control schema: it cannot UPDATE/DELETE/TRUNCATE the
audit tables while the triggers stand, but as the owner it can disable them.
Each test does exactly that, for real, over its own connection, then runs
`tenantgate audit verify` as a person would and checks that it fails with a
message naming the case.  Checkpoints are made by a writer holding the key
(checkpoint_every = 5) and copied to a witness file outside the database.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
import yaml

from proxy.config import AuditConfig
from proxy.control import audit as A
from proxy.control.audit import AuditRecord

from support.control import OWNER, SCHEMA, control_env

ROOT = Path(__file__).resolve().parent.parent
LOG = f"{SCHEMA}.audit_log"
CPS = f"{SCHEMA}.audit_checkpoints"
HEAD = f"{SCHEMA}.audit_head"


class Env:
    def __init__(self, env, tmp_path: Path, audit: dict):
        self.env = env
        self.key = tmp_path / "audit.key"
        self.witness = tmp_path / "witness.jsonl"
        priv, pub = A.new_signing_key_pem()
        self.key.write_bytes(priv)
        (tmp_path / "audit.key.pub").write_bytes(pub)
        self.pub = tmp_path / "audit.key.pub"
        self.audit = {"signing_key_file": str(self.key), "checkpoint_every": 5,
                      "witness_file": str(self.witness), **audit}
        self.cfg = tmp_path / "tenantgate.yaml"
        self.write_config()

    def write_config(self, **audit) -> Path:
        self.cfg.write_text(yaml.safe_dump({"control": {"dsn": self.env.dsn}, "audit": {**self.audit, **audit}}))
        return self.cfg

    def audit_config(self, **kw) -> AuditConfig:
        return AuditConfig(**{**self.audit, **kw})

    async def write_records(self, n: int, **audit) -> None:
        """n records by a key-holding writer (which signs every 5 and the head on close)."""
        plane = self.env.plane(audit=self.audit_config(**audit))
        await plane.start()
        try:
            for i in range(n):
                await plane.append(AuditRecord(A.STATEMENT, operator="alice", grant_id=1, tenant="acme",
                                               statement_class="write", original_sql=f"DELETE FROM t WHERE id = {i}"))
        finally:
            await plane.close()

    def verify(self, *extra: str, cfg: Path | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "proxy", "audit", "verify", "--config", str(cfg or self.cfg), *extra]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=60)

    async def as_control_role(self, *statements: str) -> None:
        """Run SQL as the control role, the schema's owner, with the audit triggers disabled."""
        conn = await asyncpg.connect(self.env.dsn)
        try:
            assert await conn.fetchval("SELECT current_user") == OWNER
            assert not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            for t in (LOG, CPS, HEAD):
                await conn.execute(f"ALTER TABLE {t} DISABLE TRIGGER USER")
            for sql in statements:
                await conn.execute(sql)
            for t in (LOG, CPS, HEAD):
                await conn.execute(f"ALTER TABLE {t} ENABLE TRIGGER USER")
        finally:
            await conn.close()

    async def rewrite_from(self, seq: int, new_sql: str) -> list[str]:
        """Statements that rewrite record ``seq`` and recompute every later hash and the head."""
        conn = await asyncpg.connect(self.env.dsn)
        try:
            rows = await conn.fetch(f"SELECT * FROM {LOG} ORDER BY seq")
        finally:
            await conn.close()
        prev, stmts = A.GENESIS_HASH, []
        for row in rows:
            rec = A.record_from_row(row)
            if row["seq"] == seq:
                rec = AuditRecord(**{**rec.__dict__, "original_sql": new_sql})
            h = A.record_hash(rec, prev)
            if row["seq"] >= seq:
                stmts.append(f"UPDATE {LOG} SET prev_hash = '{prev}', record_hash = '{h}', "
                             f"original_sql = '{rec.original_sql}' WHERE seq = {row['seq']}")
            prev = h
        stmts.append(f"UPDATE {HEAD} SET hash = '{prev}'")
        return stmts


@pytest.fixture
async def tenv(pg, make_db, tmp_path):
    env = await control_env(pg, make_db, "tamper")
    return Env(env, tmp_path, {})


def _fails(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    first = r.stdout.splitlines()[0]
    assert first.startswith("audit chain FAILED"), r.stdout
    for w in words:
        assert w in first, (w, r.stdout)
    return first


async def test_untampered_log_verifies_with_signatures_and_witness(tenv):
    await tenv.write_records(23)
    r = tenv.verify()
    assert r.returncode == 0, r.stdout + r.stderr
    assert "audit chain OK: 23 records" in r.stdout and "signatures checked" in r.stdout, r.stdout
    witness = [json.loads(x) for x in tenv.witness.read_text().splitlines()]
    # signed where the unsigned stretch reached 5, and the head on close
    assert [w["seq"] for w in witness] == [5, 10, 15, 20, 23]
    assert "5 witness entries" in r.stdout


async def test_plain_truncate_is_refused_by_the_triggers(tenv):
    await tenv.write_records(6)
    conn = await asyncpg.connect(tenv.env.dsn)
    try:
        for t in (CPS, LOG, HEAD):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(f"TRUNCATE {t}")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f"DELETE FROM {CPS}")
    finally:
        await conn.close()


async def test_rewrite_record_9_recompute_hashes_and_truncate_checkpoints(tenv):
    await tenv.write_records(30)
    await tenv.as_control_role(*await tenv.rewrite_from(9, "SELECT 1"), f"TRUNCATE {CPS}")
    # the database alone: a stretch of 30 records without any checkpoint
    first = _fails(tenv.verify("--witness", "/dev/null"), "checkpoints missing", "1..")
    assert "audit.checkpoint_window_records" in first
    # with the witness (the configured audit.witness_file): its checkpoints are gone from the database
    r = tenv.verify()
    assert r.returncode == 1
    assert "[witness_checkpoint_missing] checkpoint at record 5" in r.stdout, r.stdout
    assert "record 10 does not match the signed checkpoint in the witness" in r.stdout, r.stdout


async def test_the_next_signed_write_does_not_launder_a_rewrite(tenv):
    """After the checkpoints are deleted, the proxy's next write signs the forged head: still caught."""
    await tenv.write_records(30)
    await tenv.as_control_role(*await tenv.rewrite_from(9, "SELECT 1"), f"TRUNCATE {CPS}")
    await tenv.write_records(2)
    _fails(tenv.verify("--witness", "/dev/null"), "checkpoints missing", "1..30")
    r = tenv.verify()
    assert "witness_checkpoint_missing" in r.stdout and "witness_mismatch" in r.stdout, r.stdout


async def test_wiping_the_whole_log(tenv):
    await tenv.write_records(12)
    await tenv.as_control_role(f"TRUNCATE {LOG}", f"TRUNCATE {CPS}",
                               f"UPDATE {HEAD} SET seq = 0, hash = '{A.GENESIS_HASH}'")
    first = _fails(tenv.verify(), "log is truncated", "ends at record 0", "record 12")
    assert "records 1..12 were deleted" in first


async def test_log_shorter_than_the_witness(tenv):
    await tenv.write_records(20)
    conn = await asyncpg.connect(tenv.env.dsn)
    h = await conn.fetchval(f"SELECT record_hash FROM {LOG} WHERE seq = 14")
    await conn.close()
    await tenv.as_control_role(f"DELETE FROM {LOG} WHERE seq > 14", f"DELETE FROM {CPS} WHERE seq > 14",
                               f"UPDATE {HEAD} SET seq = 14, hash = '{h}'")
    _fails(tenv.verify(), "log is truncated", "ends at record 14", "records 15..20 were deleted")


async def test_checkpoints_deleted_in_the_middle(tenv):
    await tenv.write_records(30)
    await tenv.as_control_role(f"DELETE FROM {CPS} WHERE seq BETWEEN 10 AND 20")
    _fails(tenv.verify("--witness", "/dev/null"), "checkpoints missing", "between records 5 and 25")
    r = tenv.verify()
    assert r.returncode == 1 and "[witness_checkpoint_missing] checkpoint at record 10" in r.stdout, r.stdout


async def test_checkpoint_contradicting_the_witness(tenv):
    await tenv.write_records(10)
    await tenv.as_control_role(f"UPDATE {CPS} SET record_hash = repeat('b', 64) WHERE seq = 5")
    r = tenv.verify()
    assert r.returncode == 1
    assert "the database's checkpoint at record 5 contradicts the witness" in r.stdout, r.stdout


async def test_record_after_the_last_checkpoint_rewritten_in_time_window(tenv):
    """An unsigned tail is what an attacker can rewrite: verify bounds it in records and seconds."""
    await tenv.write_records(10)
    # records appended by a writer without the key (e.g. a CLI on an operator's laptop) stay unsigned
    keyless = tenv.env.plane(audit=AuditConfig(checkpoint_every=5))
    await keyless.start()
    for i in range(6):
        await keyless.append(AuditRecord(A.STATEMENT, operator="bob", original_sql=f"UPDATE t SET x = {i}"))
    await keyless.close()
    await tenv.as_control_role(*await tenv.rewrite_from(12, "SELECT 1"))
    assert tenv.verify().returncode == 0  # within the window: the bounded exposure, documented
    await asyncio.sleep(1.2)
    first = _fails(tenv.verify(cfg=tenv.write_config(checkpoint_window_s=1)), "head is not covered",
                   "records 11..16", "audit.checkpoint_window_s")
    assert "no signed checkpoint for" in first
    # and in records: more unsigned records than the window
    first = _fails(tenv.verify(cfg=tenv.write_config(checkpoint_window_records=5)), "head is not covered",
                   "records 11..16", "audit.checkpoint_window_records")


async def test_a_key_holder_signs_the_head_on_a_timer(tenv):
    plane = tenv.env.plane(audit=tenv.audit_config(checkpoint_interval_s=0.2))
    await plane.start()
    try:
        await plane.append(AuditRecord(A.STATEMENT, operator="alice", original_sql="SELECT 1"))
        for _ in range(50):
            await asyncio.sleep(0.1)
            async with plane.pool.acquire() as conn:
                if await conn.fetchval(f"SELECT max(seq) FROM {CPS}") == 1:
                    break
        else:
            pytest.fail("the head was not signed within the interval")
    finally:
        await plane.close()
    assert [json.loads(x)["seq"] for x in tenv.witness.read_text().splitlines()] == [1]


async def test_altered_witness_file(tenv):
    await tenv.write_records(10)
    lines = tenv.witness.read_text().splitlines()
    d = json.loads(lines[0])
    d["record_hash"] = "c" * 64
    tenv.witness.write_text("\n".join([json.dumps(d)] + lines[1:]) + "\n")
    r = tenv.verify()
    assert r.returncode == 1, r.stdout
    assert "witness line 1 holds a checkpoint at record 5 whose signature does not verify" in r.stdout, r.stdout
    assert "the witness file was altered" in r.stdout


async def test_verify_without_a_key_is_an_error_unless_no_signatures(tenv, tmp_path):
    await tenv.write_records(6)
    nokey = tmp_path / "nokey.yaml"
    nokey.write_text(yaml.safe_dump({"control": {"dsn": tenv.env.dsn}}))
    r = tenv.verify(cfg=nokey)
    assert r.returncode == 2 and "no key to check checkpoint signatures" in r.stderr and "--no-signatures" in r.stderr
    r = tenv.verify("--no-signatures", cfg=nokey)
    assert r.returncode == 0 and "signatures and checkpoint coverage NOT checked" in r.stdout, r.stdout
    # a public key alone is enough to verify offline-style (no private key needed)
    r = tenv.verify("--key", str(tenv.pub), cfg=nokey)
    assert r.returncode == 0 and "signatures checked" in r.stdout, r.stdout + r.stderr
