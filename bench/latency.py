"""Per-transaction latencies from pgbench's ``--log`` files.

pgbench ``--log --log-prefix=P`` writes one line per transaction to ``P.<pid>``
(and ``P.<pid>.<thread>`` for further threads):
``client_id transaction_no latency_us script_no epoch epoch_us``.
"""

from __future__ import annotations

from pathlib import Path

from bench.stats import percentile


def log_args(prefix: Path) -> list[str]:
    return ["--log", f"--log-prefix={prefix}"]


def read_latencies_us(prefix: Path, *, remove: bool = True) -> list[float]:
    """Sorted latencies (µs) of every transaction logged under ``prefix``."""
    values: list[float] = []
    files = sorted(prefix.parent.glob(prefix.name + ".*"))
    for f in files:
        with f.open() as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    values.append(float(parts[2]))
        if remove:
            f.unlink()
    if not values:
        raise RuntimeError(f"pgbench wrote no latencies under {prefix}")
    values.sort()
    return values


def p50_p99(sorted_us: list[float]) -> tuple[float, float]:
    return percentile(sorted_us, 0.50), percentile(sorted_us, 0.99)
