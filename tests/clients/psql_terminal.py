"""Drive an interactive psql on a pseudo-terminal, as a person at a terminal would (issue 14).

psql behaves differently when its input is a terminal: Ctrl-C stops a ``\\watch`` loop or
cancels the running statement and the session goes on, where a script (``-f``, a pipe) would
end at the first Ctrl-C, and Tab completes only with the line editor on a terminal.
:class:`PsqlTerminal` starts psql on a pty (no pager, no echo unless readline echoes, a marker
prompt), sends lines or keys, waits for output, and "presses Ctrl-C" by sending SIGINT to
psql, which is what the terminal does for the foreground process.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import termios
import time

PROMPT = "@@psql-ready@@"


class PsqlTerminal:
    """psql on a pty.  ``readline=False`` (``-n``): lines are read as typed; ``readline=True``:
    the line editor runs, so Tab completes (and echoes what it completed)."""

    def __init__(self, dsn: str, deadline_s: float = 60, readline: bool = False) -> None:
        master, slave = os.openpty()
        if not readline:  # readline echoes itself, and only when the terminal would
            attrs = termios.tcgetattr(slave)
            attrs[3] &= ~termios.ECHO  # lflag: the terminal does not echo what we type
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
        env = dict(os.environ, PGCONNECT_TIMEOUT="10", PSQL_PAGER="cat", PAGER="cat", TERM="dumb",
                   INPUTRC="/dev/null")
        env.pop("PSQLRC", None)
        self.proc = subprocess.Popen(
            ["psql", dsn, "-X", *([] if readline else ["-n"]), "-P", "pager=off",
             "-v", f"PROMPT1={PROMPT}", "-v", f"PROMPT2={PROMPT}"],
            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True, close_fds=True)
        os.close(slave)
        self.fd = master
        self.deadline_s = deadline_s  # guards against a hang only; nothing asserts on time
        self.out = ""
        self.mark = 0
        self.wait_for(PROMPT)
        self.mark = len(self.out)

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: psql closed the terminal
            return False
        self.out += data.decode("utf-8", "replace").replace("\r\n", "\n")
        return bool(data)

    def wait_for(self, pattern: str, count: int = 1, since: int | None = None) -> str:
        """Read until ``pattern`` (a regular expression) occurs ``count`` times after ``since``."""
        start = self.mark if since is None else since
        end = time.monotonic() + self.deadline_s
        while len(re.findall(pattern, self.out[start:])) < count:
            if time.monotonic() > end or self.proc.poll() is not None and not self._read(0.1):
                raise AssertionError(f"psql did not print {pattern!r} ×{count}; it printed:\n{self.out[start:]}")
            self._read(0.2)
        return self.out[start:]

    def command(self, line: str, wait: bool = True) -> str:
        """Type ``line`` and Enter; with ``wait``, return what psql printed up to its next prompt."""
        self.mark = len(self.out)
        os.write(self.fd, line.encode() + b"\n")
        if not wait:
            return ""
        text = self.wait_for(re.escape(PROMPT))
        self.mark = len(self.out)
        return text.split(PROMPT)[0]

    def keys(self, typed: str) -> None:
        """Type ``typed`` as it is (Tab, Ctrl-U, … included), without waiting."""
        self.mark = len(self.out)
        os.write(self.fd, typed.encode())

    def ctrl_c(self) -> str:
        """Press Ctrl-C and return what psql printed up to its next prompt."""
        start = self.mark
        self.proc.send_signal(signal.SIGINT)
        text = self.wait_for(re.escape(PROMPT), since=start)
        self.mark = len(self.out)
        return text.split(PROMPT)[0]

    def close(self) -> int:
        if self.proc.poll() is None:
            try:
                os.write(self.fd, b"\\q\n")
                self.proc.wait(timeout=self.deadline_s)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        os.close(self.fd)
        return self.proc.returncode
