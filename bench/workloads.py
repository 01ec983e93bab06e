"""The pgbench workloads of the comparison.

A :class:`Workload` is one pgbench invocation: a built-in script (``-S``) or a
custom script, a client count and a query mode.  Tenant-scoped scripts come in
two forms: unfiltered (what an application sends through tenantgate) and
pre-filtered with ``AND tenant_id = 'acme'`` (what direct PostgreSQL and
PgBouncer run, so all targets do the same work in the database).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.targets import TENANT, Target

# name -> (statement without the tenant predicate); :aid is random(1, rows)
TENANT_SCRIPTS = {
    "read": "SELECT abalance FROM accounts WHERE aid = :aid",
    "write": "UPDATE accounts SET abalance = abalance + 1 WHERE aid = :aid",
}


@dataclass(frozen=True)
class Workload:
    key: str  # short label in the tables, e.g. "-S c16 simple"
    clients: int
    mode: str  # pgbench -M: simple | extended | prepared
    script: str | None = None  # None: built-in -S; else a TENANT_SCRIPTS key

    @property
    def title(self) -> str:
        what = "pgbench -S" if self.script is None else f"tenant {self.script}"
        return f"{what}, {self.clients} client{'s' if self.clients != 1 else ''}, -M {self.mode}"

    def args(self, target: Target, seconds: float, scripts_dir: Path, rows: int) -> list[str]:
        """pgbench arguments for ``target`` (threads: at most 2, this is a 2-core machine)."""
        threads = min(2, self.clients)
        base = ["-n", "-c", str(self.clients), "-j", str(threads), "-T", str(max(1, round(seconds))), "-M", self.mode]
        if self.script is None:
            return ["-S", *base]
        return [*base, "-f", str(script_file(scripts_dir, self.script, target.filtered, rows))]


def script_file(scripts_dir: Path, name: str, filtered: bool, rows: int) -> Path:
    sql = TENANT_SCRIPTS[name] + (f" AND tenant_id = '{TENANT}'" if filtered else "")
    path = scripts_dir / f"tenant-{name}-{'filtered' if filtered else 'plain'}.sql"
    if not path.exists():
        path.write_text(f"\\set aid random(1, {rows})\n{sql};\n")
    return path


def all_workloads() -> list[Workload]:
    """Everything ``make bench`` runs, in the order it runs them within a round."""
    return [
        Workload("-S c1 simple", 1, "simple"),
        Workload("-S c16 simple", 16, "simple"),
        Workload("-S c64 simple", 64, "simple"),
        Workload("-S c16 extended", 16, "extended"),
        Workload("-S c16 prepared", 16, "prepared"),
        Workload("read c16 simple", 16, "simple", "read"),
        Workload("read c16 extended", 16, "extended", "read"),
        Workload("read c16 prepared", 16, "prepared", "read"),
        Workload("write c16 simple", 16, "simple", "write"),
    ]
