"""Sampling profile of tenantgate with py-spy, reduced to the top functions by own time.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``);
the last frame of each stack is where the sample was taken, so summing counts
per last frame gives each function's own time.  Idle samples (the event loop
waiting in epoll) are left out by py-spy, so percentages are of busy time.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from pathlib import Path


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


RATE_HZ = 250


def start_record(pid: int, seconds: float, out: Path, *, subprocesses: bool = False) -> subprocess.Popen | None:
    """Start sampling ``pid`` for ``seconds`` in the background; None when py-spy is missing."""
    exe = py_spy()
    if exe is None:
        return None
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", str(RATE_HZ),
           "--format", "raw", "--function", "--nonblocking", "--output", str(out)]
    if subprocesses:
        cmd.append("--subprocesses")
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _short(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py:12)`` with the package kept for our code."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("/site-packages/", "/work/main/", "/lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})" if where else name


def top_own_time(raw_file: Path, n: int = 15) -> tuple[int, list[tuple[str, int]]]:
    """(total samples, [(function, samples)] of the ``n`` functions with most own time)."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_file.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        own[_short(leaf)] += int(count)
        total += int(count)
    return total, own.most_common(n)


NOTES = {
    # uvloop's C code shows up as its Python caller: time spent inside the event loop itself
    "Runner.run (asyncio/runners.py": "  <- uvloop's event loop in C: polling, socket reads, callback dispatch",
}


def format_top(total: int, top: list[tuple[str, int]]) -> list[str]:
    """Table lines; socket writes by uvloop (C) are counted in the Python function that calls them."""
    lines = [f"  {'own %':>6}  {'samples':>7}  function"]
    for func, count in top:
        note = next((n for k, n in NOTES.items() if func.startswith(k)), "")
        lines.append(f"  {100 * count / max(1, total):6.1f}  {count:7d}  {func}{note}")
    return lines
