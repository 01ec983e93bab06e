"""The one way tests run ``tenantgate serve`` (``python -m proxy serve --config FILE``) as a process.

::

    with serve(cfg_path, "--workers", "2", env=env) as served:   # returns once it is listening
        served.banner            # its "tenantgate: listening on ..." line
        served.proc.send_signal(signal.SIGHUP)
    # leaving the block: SIGTERM, then a kill if it has not exited after 20 s

``serve()`` also works without ``with`` (call ``served.stop()``, which returns the exit code).
stderr goes to ``log_path`` (default: next to the config); stdout carries only the banner.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from support import crash_watch

ROOT = Path(__file__).resolve().parents[2]


class Served:
    def __init__(self, proc: subprocess.Popen, log_path: Path, banner: str):
        self.proc, self.log_path, self.banner = proc, log_path, banner

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM (drain) if still running, wait, kill after ``timeout``; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def __enter__(self) -> "Served":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(config_path: Path | str, *args: str, env: dict | None = None, log_path: Path | None = None,
          watch_crashes: bool = False, cwd: Path = ROOT) -> Served:
    """Start ``python -m proxy serve --config config_path *args``; return once its first stdout line
    says "listening on".  Anything else (it exited, or printed something else) is a RuntimeError with
    the log.  ``watch_crashes``: a traceback in its log fails the running test (support.crash_watch)."""
    config_path = Path(config_path)
    log_path = Path(log_path) if log_path is not None else config_path.with_suffix(".log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--config", str(config_path), *args],
                                stdout=subprocess.PIPE, stderr=log, text=True, cwd=cwd, env=env)
    banner = proc.stdout.readline()
    if "listening on" not in banner:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        raise RuntimeError(f"tenantgate serve did not start: {banner!r}\n{log_path.read_text(errors='replace')}")
    if watch_crashes:
        crash_watch.register_log(log_path)
    return Served(proc, log_path, banner)
