"""`make bench`: every benchmark of the project, one after another.

Each part prints its own figures; nothing here asserts on time.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback

PARTS = [
    ("proxy throughput (pgbench -S: direct, PgBouncer, tenantgate)", "bench.pgbench_proxy"),
    ("audit chain: audited operator statements per second", "bench.audit_bench"),
]


def main() -> int:
    only = os.environ.get("BENCH_ONLY")
    failed = 0
    for title, module in PARTS:
        if only and only not in module:
            continue
        print(f"\n#### {title}", flush=True)
        try:
            importlib.import_module(module).run()
        except Exception:
            failed += 1
            traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
