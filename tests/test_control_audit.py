"""The audit chain: append, verify, tamper detection, signed checkpoints, failures, concurrency, export."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from proxy.config import AuditConfig
from proxy.control import audit as A
from proxy.control.audit import AuditRecord, AuditWriteError
from proxy.seam import Outcome

from support.control import OWNER, control_env, write_signing_key


async def _plane_with_records(pg, make_db, n: int = 10, audit: AuditConfig | None = None):
    env = await control_env(pg, make_db, "ctlaudit")
    plane = env.plane(audit=audit or AuditConfig())
    await plane.start()
    for i in range(n):
        seq = await plane.append(AuditRecord(
            A.STATEMENT, operator="op", grant_id=1, tenant="acme", client_addr="127.0.0.1:5000",
            session_id="s1", statement_class="read", original_sql=f"SELECT {i}",
            rewritten_sql=f"SELECT {i} WHERE tenant_id = 'acme'", params=["a", None, {"hex": "00ff"}]))
        await plane.complete(seq, Outcome(None, "SELECT 1", 1, 0.0015))
    return env, plane


async def _tamper(env, *statements: str) -> None:
    """Run SQL as a superuser with the append-only triggers bypassed (a privileged attacker)."""
    conn = await asyncpg.connect(env.admin_dsn)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            for sql in statements:
                await conn.execute(sql)
    finally:
        await conn.close()


LOG = "tenantgate_control.audit_log"


async def test_append_verify_export_and_outcome_records(pg, make_db, tmp_path):
    sink = tmp_path / "audit.jsonl"
    env, plane = await _plane_with_records(pg, make_db, 5, AuditConfig(jsonl_path=str(sink)))
    try:
        report = await plane.verify()
        assert report.ok and report.records == 10 and report.head_seq == 10
        lines = [json.loads(x) async for x in plane.export()]
        assert [x["seq"] for x in lines] == list(range(1, 11))
        first, outcome = lines[0], lines[1]
        assert first["type"] == "statement" and first["original_sql"] == "SELECT 0"
        assert first["rewritten_sql"].endswith("'acme'") and first["params"] == ["a", None, {"hex": "00ff"}]
        assert (outcome["type"], outcome["ref_seq"], outcome["rows"], outcome["duration_us"]) == (
            "statement.outcome", 1, 1, 1500)
        assert outcome["prev_hash"] == first["record_hash"]
        assert [json.loads(x)["seq"] async for x in plane.export(since_seq=9)] == [9, 10]
        # the JSONL sink holds the same records
        assert [json.loads(x)["record_hash"] for x in sink.read_text().splitlines()] == [
            x["record_hash"] for x in lines]
        # the owner role cannot rewrite the log in place: the table is append-only
        async with plane.pool.acquire() as conn:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(f"UPDATE {LOG} SET original_sql = 'x' WHERE seq = 1")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(f"DELETE FROM {LOG} WHERE seq = 1")
    finally:
        await plane.close()


async def test_params_redaction_and_rich_detail_values(pg, make_db):
    env, plane = await _plane_with_records(pg, make_db, 0)
    try:
        assert A.encode_params([b"secret", None], redact=True) == ["<redacted>", None]
        assert A.encode_params([b"\xff\x00"], redact=False) == [{"hex": "ff00"}]
        from datetime import datetime, timezone
        from decimal import Decimal

        detail = {"when": datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc), "amount": Decimal("1.50"),
                  "tables": {"b", "a"}, "ratio": 0.1, "big": 10**20, "nested": [{"z": 1, "a": None}], "t": "é\n"}
        seq = await plane.append(AuditRecord("purge.receipt", tenant="acme", detail=detail))
        assert (await plane.verify()).ok
        row = json.loads([x async for x in plane.export(since_seq=seq)][0])
        assert row["detail"]["when"] == "2026-01-02T03:04:05.000006+00:00" and row["detail"]["tables"] == ["a", "b"]
        assert row["detail"]["amount"] == "1.50" and row["detail"]["big"] == 10**20
    finally:
        await plane.close()


@pytest.mark.parametrize("tamper, kind, seq", [
    (f"UPDATE {LOG} SET original_sql = 'SELECT harmless' WHERE seq = 5", "modified", 5),
    (f"DELETE FROM {LOG} WHERE seq = 6", "deleted", 6),
    (f"UPDATE {LOG} SET seq = -5 WHERE seq = 5; UPDATE {LOG} SET seq = 5 WHERE seq = 6; "
     f"UPDATE {LOG} SET seq = 6 WHERE seq = -5", "reordered", 5),
    (f"INSERT INTO {LOG} (seq, prev_hash, record_hash, at, type, operator) "
     f"SELECT 21, record_hash, repeat('a', 64), now(), 'statement', 'ghost' FROM {LOG} WHERE seq = 20",
     "inserted", 21),
    (f"DELETE FROM {LOG} WHERE seq >= 19", "deleted", 19),
])
async def test_tampering_is_detected_and_named(pg, make_db, tamper, kind, seq):
    env, plane = await _plane_with_records(pg, make_db, 10)
    try:
        assert (await plane.verify()).ok
        await _tamper(env, *tamper.split("; "))
        report = await plane.verify()
        assert not report.ok
        assert (report.first.kind, report.first.seq) == (kind, seq), report.problems
        assert str(seq) in report.first.message
    finally:
        await plane.close()


async def test_forged_record_with_valid_hash_and_renumbering(pg, make_db):
    """A careful forger recomputes the hash and shifts later records: still caught."""
    env, plane = await _plane_with_records(pg, make_db, 5)
    try:
        async with plane.pool.acquire() as conn:
            r4 = await conn.fetchrow(f"SELECT * FROM {LOG} WHERE seq = 4")
        forged = AuditRecord(A.STATEMENT, operator="ghost", original_sql="SELECT 1", at=r4["at"])
        h = A.record_hash(forged, r4["record_hash"])
        await _tamper(
            env,
            f"UPDATE {LOG} SET seq = seq + 1000 WHERE seq > 4",
            f"UPDATE {LOG} SET seq = seq - 999 WHERE seq > 1000",
            f"INSERT INTO {LOG} (seq, prev_hash, record_hash, at, type, operator, original_sql) "
            f"VALUES (5, '{r4['record_hash']}', '{h}', '{r4['at'].isoformat()}', 'statement', 'ghost', 'SELECT 1')",
            "UPDATE tenantgate_control.audit_head SET seq = seq + 1",
        )
        report = await plane.verify()
        assert (report.first.kind, report.first.seq) == ("inserted", 5), report.problems
    finally:
        await plane.close()


async def test_signed_checkpoints(pg, make_db, tmp_path):
    audit = write_signing_key(tmp_path)  # checkpoint every 5 records
    env, plane = await _plane_with_records(pg, make_db, 6, audit)
    try:
        async with plane.pool.acquire() as conn:
            cps = [r["seq"] for r in await conn.fetch("SELECT seq FROM tenantgate_control.audit_checkpoints")]
        assert cps == [5, 10]
        assert await plane.checkpoint() == 12
        report = await plane.verify()
        assert report.ok and report.checkpoints == 3 and report.signatures_checked
        # rewrite history up to a checkpoint, recomputing every hash: only the signature can tell
        async with plane.pool.acquire() as conn:
            rows = await conn.fetch(f"SELECT * FROM {LOG} ORDER BY seq")
        prev, stmts = A.GENESIS_HASH, []
        for row in rows:
            rec = A.record_from_row(row)
            if row["seq"] == 3:
                rec = AuditRecord(**{**rec.__dict__, "original_sql": "SELECT nothing_to_see"})
            h = A.record_hash(rec, prev)
            sql_text = rec.original_sql.replace("'", "''") if rec.original_sql else None
            stmts.append(f"UPDATE {LOG} SET prev_hash = '{prev}', record_hash = '{h}'"
                         + (f", original_sql = '{sql_text}'" if row["seq"] == 3 else "") + f" WHERE seq = {row['seq']}")
            prev = h
        stmts.append(f"UPDATE tenantgate_control.audit_head SET hash = '{prev}'")
        await _tamper(env, *stmts)
        report = await plane.verify()
        assert not report.ok and report.first.kind == "checkpoint_mismatch" and report.first.seq == 5
        # a forged signature
        await _tamper(env, "UPDATE tenantgate_control.audit_checkpoints SET signature = "
                           "encode(decode(repeat('ab', 64), 'hex'), 'base64') WHERE seq = 10")
        assert any(p.kind == "bad_signature" and p.seq == 10 for p in (await plane.verify()).problems)
    finally:
        await plane.close()


async def test_audit_write_failure_raises(pg, make_db):
    env, plane = await _plane_with_records(pg, make_db, 2)
    try:
        admin = await asyncpg.connect(env.admin_dsn)
        try:
            await admin.execute(f"REVOKE INSERT ON {LOG} FROM {OWNER}")
            with pytest.raises(AuditWriteError, match="permission denied"):
                await plane.append(AuditRecord(A.STATEMENT, operator="op", original_sql="DELETE FROM t"))
            # nothing half-written: the chain is intact and the head did not move
            report = await plane.verify()
            assert report.ok and report.head_seq == 4
            await admin.execute(f"GRANT INSERT ON {LOG} TO {OWNER}")
            assert await plane.append(AuditRecord(A.STATEMENT, operator="op")) == 5
        finally:
            await admin.close()
    finally:
        await plane.close()


async def test_one_bad_record_fails_alone_in_a_batch(pg, make_db):
    env, plane = await _plane_with_records(pg, make_db, 0)
    try:
        good = [plane.append(AuditRecord(A.STATEMENT, original_sql=f"SELECT {i}")) for i in range(5)]
        bad = plane.append(AuditRecord(A.STATEMENT, original_sql="SELECT '\x00'"))  # text cannot hold NUL
        results = await asyncio.gather(*good, bad, return_exceptions=True)
        assert all(isinstance(r, int) for r in results[:5]) and isinstance(results[5], AuditWriteError)
        assert (await plane.verify()).ok
    finally:
        await plane.close()


async def test_concurrent_appends_keep_a_valid_chain(pg, make_db):
    env, plane = await _plane_with_records(pg, make_db, 0)
    other = env.plane()  # a second instance on the same schema
    await other.start()
    try:
        async def session(p, sid: int) -> list[int]:
            seqs = []
            for i in range(20):
                s = await p.append(AuditRecord(A.STATEMENT, session_id=f"s{sid}", original_sql=f"SELECT {i}"))
                seqs.append(await p.complete(s, Outcome(None, "SELECT 1", 1, 0.001)))
            return seqs

        results = await asyncio.gather(*(session(plane if i % 2 else other, i) for i in range(20)))
        all_seqs = sorted(s for r in results for s in r)
        assert all_seqs == sorted(set(all_seqs)) and len(all_seqs) == 400
        report = await plane.verify()
        assert report.ok and report.records == 800 and report.head_seq == 800
    finally:
        await other.close()
        await plane.close()
