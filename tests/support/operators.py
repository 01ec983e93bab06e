"""What the operator end-to-end tests drive: the tenantgate CLI, live psql sessions, admin probes.

* :class:`Tenantgate` runs ``python -m proxy grant|operator|audit ...`` as a
  person would: ``--as NAME --password-stdin`` with the password on standard
  input, and ``--config`` of the demo.
* :class:`LivePsql` keeps a real ``psql`` process open, reading commands from
  a pipe; each batch ends with an ``\\echo`` marker so the test knows where
  psql's output (stdout and stderr, merged) for that batch ends.
* :class:`Admin` talks to the backend directly as the superuser of the demo
  (``demo.admin``) to look at the rows and the control schema.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[2]
CONTROL = "tenantgate_control"  # the demo's control schema (proxy/control/schema.sql)
PSQL = next((p for p in ("/usr/lib/postgresql/15/bin/psql", shutil.which("psql")) if p and os.path.exists(p)), "psql")


def conninfo(host: str, port: int, user: str, password: str, dbname: str = "app") -> str:
    return f"host={host} port={port} dbname={dbname} user={user} password={password} sslmode=disable connect_timeout=10"


def pg_options(grant: int | None = None, totp: str | None = None) -> str:
    """The startup options an operator passes (PGOPTIONS or ``options=`` in the conninfo)."""
    parts = []
    if grant is not None:
        parts.append(f"-c tenantgate.grant={grant}")
    if totp is not None:
        parts.append(f"-c tenantgate.totp={totp}")
    return " ".join(parts)


def psql_env(options: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if options:
        env["PGOPTIONS"] = options
    return env


def psql_once(dsn: str, *args: str, options: str = "", stdin: str | None = None,
              timeout: float = 30) -> subprocess.CompletedProcess:
    """One ``psql DSN -X ARGS`` run; stdout and stderr separately."""
    return subprocess.run([PSQL, dsn, "-X", *args], input=stdin, capture_output=True, text=True,
                          env=psql_env(options), timeout=timeout)


@dataclass
class Tenantgate:
    """The tenantgate CLI against the demo's control schema."""

    config: Path
    passwords: dict[str, str] = field(default_factory=dict)  # account -> password

    def run(self, *args: str, actor: str | None = None, extra_lines: tuple[str, ...] = (),
            totp: str | None = None, json_out: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "proxy", *args, "--config", str(self.config)]
        lines: list[str] = []
        if actor is not None:
            cmd += ["--as", actor, "--password-stdin"]
            lines.append(self.passwords[actor])
        lines += extra_lines
        if totp is not None:
            cmd += ["--totp", totp]
        if json_out:
            cmd.append("--json")
        stdin = "".join(line + "\n" for line in lines) if lines else ""
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=timeout)

    def ok(self, *args: str, **kw) -> dict | list:
        """Run with --json; assert exit 0 and return the parsed output."""
        r = self.run(*args, json_out=True, **kw)
        assert r.returncode == 0, f"tenantgate {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
        return json.loads(r.stdout)

    def request(self, actor: str, tenant: str, access: str, duration: str = "1h",
                reason: str = "TICKET-E2E: end-to-end test", totp: str | None = None) -> dict:
        return self.ok("grant", "request", "--tenant", tenant, "--access", access, "--for", duration,
                       "--reason", reason, actor=actor, totp=totp)

    def approve(self, grant_id: int, actor: str = "bob") -> dict:
        return self.ok("grant", "approve", str(grant_id), actor=actor)

    def active_grant(self, actor: str, tenant: str, access: str, duration: str = "1h") -> dict:
        """Request as ``actor`` and approve as bob; returns the approved grant."""
        g = self.approve(self.request(actor, tenant, access, duration)["id"])
        assert g["state"] == "approved", g
        return g

    def revoke(self, grant_id: int, actor: str = "bob") -> subprocess.CompletedProcess:
        return self.run("grant", "revoke", str(grant_id), "--reason", "end-to-end test done", actor=actor)

    def show(self, grant_id: int) -> dict:
        return self.ok("grant", "show", str(grant_id))

    def verify(self) -> subprocess.CompletedProcess:
        return self.run("audit", "verify")

    def export(self, since_seq: int) -> list[dict]:
        r = self.run("audit", "export", "--since-seq", str(since_seq))
        assert r.returncode == 0, r.stderr
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


class PsqlClosed(Exception):
    pass


class LivePsql:
    """A long-lived ``psql`` fed through a pipe; output is read by a thread line by line."""

    def __init__(self, dsn: str, options: str = ""):
        self.proc = subprocess.Popen(
            [PSQL, dsn, "-X", "-v", "ON_ERROR_STOP=0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1, env=psql_env(options))
        self.lines: queue.Queue[tuple[float, str | None]] = queue.Queue()
        self.transcript: list[str] = []
        self._n = 0
        self._marker = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line))
        self.lines.put((time.monotonic(), None))

    def send(self, text: str) -> None:
        try:
            self.proc.stdin.write(text if text.endswith("\n") else text + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            raise PsqlClosed(self.output())

    def run(self, text: str, timeout: float = 20) -> str:
        """Send commands and return what psql printed for them; PsqlClosed if psql ended meanwhile."""
        self.start(text)
        return self.collect(timeout)

    def start(self, text: str) -> None:
        """Send commands without waiting for their output (read it with :meth:`collect`)."""
        self._n += 1
        self._marker = f"__tg_e2e_done_{self._n}__"
        self.send(f"{text}\n\\echo {self._marker}")

    def collect(self, timeout: float = 20) -> str:
        out: list[str] = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    _, line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    raise TimeoutError(f"psql did not answer within {timeout}s; so far: {''.join(out)}")
                if line is None:
                    raise PsqlClosed("".join(out))
                if line.strip() == self._marker:
                    return "".join(out)
                out.append(line)
        finally:
            self.transcript += out

    def wait_closed(self, within: float, every: float = 0.1) -> tuple[float, str]:
        """Send ``SELECT 1;`` every ``every`` seconds until psql ends.

        Returns (seconds waited, everything psql printed meanwhile)."""
        t0 = time.monotonic()
        start = len(self.transcript)
        while time.monotonic() - t0 < within + 3:
            try:
                self.run("SELECT 1;", timeout=within + 3)
            except PsqlClosed:
                self.proc.wait(10)
                return time.monotonic() - t0, "".join(self.transcript[start:])
            time.sleep(every)
        raise AssertionError(f"psql session still open {within + 3:.1f}s later")

    def output(self) -> str:
        rest = []
        while True:
            try:
                _, line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                rest.append(line)
        self.transcript += rest
        return "".join(self.transcript)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("\\q\n")
                self.proc.stdin.flush()
                self.proc.stdin.close()
                self.proc.wait(5)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "LivePsql":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Admin:
    """The backend superuser (direct, not through tenantgate)."""

    def __init__(self, dsn: str):
        self.dsn = dsn

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.dsn, autocommit=True) as c:
            return c.execute(sql, params or None).fetchall()

    def one(self, sql: str, params: tuple = ()):
        r = self.rows(sql, params)
        return r[0][0] if r else None

    def execute(self, *statements: str) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as c:
            for s in statements:
                c.execute(s)

    def head_seq(self) -> int:
        return self.one(f"SELECT seq FROM {CONTROL}.audit_head")

    def backend_alive(self, pid: int) -> bool:
        return bool(self.one("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)))

    def wait_backend_gone(self, pid: int, within: float) -> float:
        t0 = time.monotonic()
        while self.backend_alive(pid):
            if time.monotonic() - t0 > within + 3:
                raise AssertionError(f"backend {pid} still connected {within + 3:.1f}s later")
            time.sleep(0.05)
        return time.monotonic() - t0

    def snapshot(self) -> dict[str, list[tuple]]:
        """Every tenant row, to show that nothing changed."""
        return {t: self.rows(f"SELECT * FROM {t} ORDER BY 1, 2, 3") for t in ("customers", "orders", "order_items")}


DEMO_OPERATORS = ("alice", "bob", "carol")


def demo_tenantgate(demo) -> "Tenantgate":
    """The CLI driven as the demo's operators (passwords from the demo's state)."""
    return Tenantgate(demo.config_path, {n: demo.password(f"operator:{n}") for n in DEMO_OPERATORS})
