"""Run ``python -m proxy ...`` under cProfile with a CPU-time clock (``BENCH_CPROFILE``).

py-spy and cProfile's default clock measure wall time: on 2 shared cores a socket write that
wakes PostgreSQL or pgbench is often followed by a preemption, and that waiting lands on the
write.  ``time.process_time`` counts only this process's CPU, so the profile says where the
CPU per transaction goes.  Usage (bench/common.py does this): ``python -m bench.cpu_profile
OUT.prof serve --config ...``; the profile is written when tenantgate exits.
"""

from __future__ import annotations

import cProfile
import runpy
import sys
import time


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["proxy", *sys.argv[2:]]
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    try:
        runpy.run_module("proxy", run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    finally:
        prof.disable()
        prof.dump_stats(out)


if __name__ == "__main__":
    main()
