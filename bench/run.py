"""`make bench`: the benchmarks of the project, one after another.

1. :mod:`bench.compare`: direct PostgreSQL, PgBouncer and tenantgate in one
   interleaved run (throughput, latency, idle clients, rewrite cost, targets);
   its summary is what docs/benchmarks.md shows.
2. :mod:`bench.audit_bench`: audited operator statements per second (skipped
   with ``BENCH_QUICK=1``).
3. :mod:`bench.backstop_bench`: the per-statement cost of the PostgreSQL
   backstop's binding check (µs/statement, target < 5).
4. :mod:`bench.move_bench`: an online tenant move of 1,000,000 rows between two
   servers while the tenant writes (longest pause, lost writes, total time;
   ``BENCH_MOVE_ROWS``; skipped with ``BENCH_QUICK=1``).

``BENCH_ONLY=compare`` (or ``audit``, ``backstop``, ``move``) runs one part.  Each part prints its own
figures; nothing here asserts on time.  Options of the comparison:
``python -m bench.compare --help`` (or the ``BENCH_*`` variables it names).
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

PARTS = [
    ("direct PostgreSQL vs PgBouncer vs tenantgate", "bench.compare", False),
    ("audit chain: audited operator statements per second", "bench.audit_bench", True),
    ("PostgreSQL backstop: per-statement cost of the binding check", "bench.backstop_bench", False),
    ("tenant move: 1,000,000 rows online between two servers (issue 19)", "bench.move_bench", True),
]


def main() -> int:
    only = os.environ.get("BENCH_ONLY")
    quick = os.environ.get("BENCH_QUICK", "").strip().lower() in ("1", "true", "yes", "on")
    failed = 0
    for title, module, full_only in PARTS:
        if only and only not in module:
            continue
        if quick and full_only and not only:
            continue
        print(f"\n#### {title}", flush=True)
        try:
            rc = importlib.import_module(module).run()
            if isinstance(rc, int) and rc:
                failed += 1
        except Exception:
            failed += 1
            traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
