"""Audited operator statements per second through the control plane's audit chain.

One audited statement = one durable chained record before it runs
(``ControlPlane.append``) plus its outcome record after
(``ControlPlane.complete_nowait``), as
:class:`proxy.control.operator_gate.OperatorSessionGate` does; also with the
outcome awaited.  Runs with 1, 16 and 64 concurrent sessions in one process,
with fsync on and off, then verifies the chain.
Standalone: ``.venv/bin/python -m bench.audit_bench``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

import asyncpg

from proxy.control.audit import AuditRecord
from proxy.control.plane import ControlPlane
from proxy.control.schema import install_control_schema
from proxy.seam import Outcome

from proxy.pgcluster import make_cluster

STATEMENTS_PER_SESSION = {1: 400, 16: 150, 64: 60}


async def _session(plane: ControlPlane, sid: int, n: int, wait_outcome: bool) -> None:
    ctx = AuditRecord("statement", operator="bench", grant_id=1, tenant="acme", client_addr="127.0.0.1:1",
                      session_id=f"s{sid}")
    for i in range(n):
        seq = await plane.append(AuditRecord(
            "statement", operator="bench", grant_id=1, tenant="acme", client_addr="127.0.0.1:1",
            session_id=f"s{sid}", statement_class="read",
            original_sql=f"SELECT * FROM orders WHERE id = {i}",
            rewritten_sql=f"SELECT * FROM orders WHERE id = {i} AND tenant_id = 'acme'", params=[]))
        fut = plane.complete_nowait(seq, Outcome(None, "SELECT 1", 1, 0.0003), ctx)
        if wait_outcome or i == n - 1:
            await fut


async def _measure(dsn: str) -> list[tuple[str, int, float]]:
    plane = ControlPlane(dsn)
    await plane.start()
    results = []
    try:
        for wait_outcome, mode in ((False, "outcome queued (gate default)"), (True, "outcome awaited")):
            for sessions, per in STATEMENTS_PER_SESSION.items():
                t0 = time.perf_counter()
                await asyncio.gather(*(_session(plane, s, per, wait_outcome) for s in range(sessions)))
                dt = time.perf_counter() - t0
                results.append((mode, sessions, sessions * per / dt))
        report = await plane.verify()
        assert report.ok, report.problems[:3]
    finally:
        await plane.close()
    return results


def run() -> None:
    for label, conf in (("fsync = on (durable, as in production)", "fsync = on\n"),
                        ("fsync = off (the test clusters)", "")):
        base = Path(tempfile.mkdtemp(prefix="tenantgate-auditbench-"))
        os.chmod(base, 0o755)
        pg = make_cluster(base, "pg", extra_conf=conf)
        try:
            async def main(pg=pg):
                conn = await asyncpg.connect(pg.admin_dsn)
                await install_control_schema(conn)
                await conn.close()
                return await _measure(pg.admin_dsn)

            results = asyncio.run(main())
        finally:
            pg.destroy()
            shutil.rmtree(base, ignore_errors=True)
        print(f"audited operator statements (pre-record + outcome record, synchronous_commit=on), {label}:")
        for mode, sessions, rate in results:
            print(f"  {mode:30s} {sessions:3d} sessions: {rate:7.0f} statements/s ({2 * rate:7.0f} records/s)")


if __name__ == "__main__":
    run()
