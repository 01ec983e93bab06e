"""Helpers for the transaction-pooling tests (tests/test_pool_*.py).

* :func:`serve_pooled` — runs ``tenantgate serve`` as a subprocess against the
  running demo's PostgreSQL (same users, rules, tokens and control schema as the
  demo), with the pool settings and worker count a test asks for, and yields a
  :class:`PooledProxy`;
* :func:`raise_nofile` — lifts RLIMIT_NOFILE of this process (and the proxies it
  starts afterwards) to the hard limit;
* :func:`local_ports_towards` — the local ports of a process's TCP connections to
  PostgreSQL (to tell its rows in ``pg_stat_activity`` from the demo proxy's);
* :class:`AsyncClient` — a light asyncio protocol client (SCRAM with a cached salted
  password) for thousands of concurrent sessions.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import hashlib
import hmac
import io
import os
import resource
import struct
import subprocess
from pathlib import Path
from urllib.parse import quote

import yaml

from support.serve import serve
from proxy.pgcluster import free_port

ROOT = Path(__file__).resolve().parents[2]
APP_USERS = {"acme": ("acme_app", "app:acme"), "globex": ("globex_app", "app:globex")}


def raise_nofile() -> int:
    """Soft RLIMIT_NOFILE := hard limit (inherited by subprocesses started later); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class PooledProxy:
    """A ``tenantgate serve`` subprocess in front of the demo's database."""

    def __init__(self, demo, proc: subprocess.Popen, port: int, cfg_path: Path, log_path: Path, raw: dict):
        self.demo, self.proc, self.port, self.cfg_path, self.log_path, self.raw = (
            demo, proc, port, cfg_path, log_path, raw)

    def dsn(self, tenant: str) -> str:
        """DSN of the credential-bound application user of ``tenant`` (acme or globex)."""
        user, secret = APP_USERS[tenant]
        return self.dsn_for(user, self.demo.password(secret))

    def metrics_url(self) -> str:
        """/metrics of this proxy (``serve_pooled(..., metrics=True)``)."""
        m = self.raw["metrics"]
        assert m.get("port"), "started without metrics=True"
        return f"http://{m['host']}:{m['port']}/metrics"

    def pool_dsn(self) -> str:
        """DSN of ``pool_app`` (picks its tenant with a signed token)."""
        return self.dsn_for("pool_app", self.demo.password("app:pool"))

    def dsn_for(self, user: str, password: str, database: str = "app") -> str:
        return f"postgresql://{user}:{quote(password, safe='')}@127.0.0.1:{self.port}/{database}?sslmode=disable"

    def console(self, command: str) -> list[dict]:
        """Rows of an admin-console command (``SHOW CLIENTS`` ...), read with psql --csv."""
        dsn = self.dsn_for(ADMIN_USER, ADMIN_PASSWORD, self.raw.get("admin", {}).get("database", "tenantgate"))
        out = subprocess.run(["psql", dsn, "--csv", "-c", command], capture_output=True, text=True, timeout=20,
                             check=True).stdout
        return list(csv.DictReader(io.StringIO(out)))

    @property
    def backend_role(self) -> str:
        return self.raw["backend"]["user"]

    async def backend_pids(self, admin) -> list[int]:
        """PIDs of this proxy's pooled connections in PostgreSQL (``admin``: an asyncpg connection
        of a superuser), without the catalog's own connection."""
        ports = local_ports_towards([self.proc.pid], self.raw["backend"]["port"])
        rows = await admin.fetch("SELECT pid FROM pg_stat_activity WHERE usename = $1 AND client_port = ANY($2::int[])"
                                 " AND application_name NOT LIKE 'tenantgate: %'", self.backend_role, list(ports))
        return [r["pid"] for r in rows]

    def worker_pids(self) -> dict[int, int]:
        """{worker index: OS pid} of the supervisor's worker processes (``workers`` > 1)."""
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            children = [int(x) for x in f.read().split()]
        out = {}
        for pid in children:
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if b"--index" in argv:
                out[int(argv[argv.index(b"--index") + 1])] = pid
        return out

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


ADMIN_USER, ADMIN_PASSWORD = "pool_console", "pool-console-pw"


def proxy_config(demo, port: int, pool: dict, workers: int = 1, max_clients: int = 1000,
                 user_settings: dict[str, dict] | None = None, backend: dict | None = None) -> dict:
    """The demo's own config (users, rules, tokens, control), on ``port`` with ``pool`` settings,
    plus an admin-console user (:data:`ADMIN_USER`)."""
    from proxy.scram import make_verifier

    raw = yaml.safe_load(demo.config_path.read_text())
    raw["users"] = [u for u in raw["users"] if u["name"] != ADMIN_USER]
    raw["users"].append({"name": ADMIN_USER, "scram_verifier": make_verifier(ADMIN_PASSWORD), "admin": True})
    for u in raw["users"]:
        u.update((user_settings or {}).get(u["name"], {}))
    raw["listen"] = {"host": "127.0.0.1", "port": port}
    raw["backend"] = {**raw["backend"], **(backend or {})}  # e.g. another backend role
    raw["pool"] = dict(pool)
    raw["workers"] = workers
    raw["limits"] = {"max_clients": max_clients}
    raw["metrics"] = {"host": "127.0.0.1", "port": None}
    raw["logging"] = {"events": False}
    raw["timeouts"] = {"drain_s": 2}
    return raw


@contextlib.contextmanager
def serve_pooled(demo, tmp_path: Path, pool: dict, workers: int = 1, max_clients: int = 1000,
                 user_settings: dict[str, dict] | None = None, limits: dict | None = None,
                 backend: dict | None = None, rules_file: str | None = None, verbose: bool = False,
                 log_level: str | None = None, metrics: bool = False):
    """``tenantgate serve`` with ``pool`` (e.g. ``{"mode": "transaction", "size": 1}``) and extra
    per-user settings (e.g. ``{"globex_app": {"pool_mode": "session"}}``); yields a PooledProxy
    (``metrics``: with /metrics on a free port, :meth:`PooledProxy.metrics_url`)."""
    port = free_port()
    raw = proxy_config(demo, port, pool, workers, max_clients, user_settings, backend)
    if metrics:
        raw["metrics"]["port"] = free_port()
    raw["limits"].update(limits or {})
    if rules_file is not None:
        raw["rules_file"] = rules_file
    if log_level is not None:
        raw.setdefault("logging", {})["level"] = log_level
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg_path = tmp_path / f"tenantgate-pool-{port}.yaml"
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    os.chmod(cfg_path, 0o600)
    log_path = tmp_path / f"tenantgate-pool-{port}.log"
    with serve(cfg_path, *(["--verbose"] if verbose else []), log_path=log_path, watch_crashes=True) as served:
        yield PooledProxy(demo, served.proc, port, cfg_path, log_path, raw)


def local_ports_towards(pids, remote_port: int) -> set[int]:
    """Local TCP ports of the sockets that processes ``pids`` hold open toward ``remote_port``."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[9] in inodes and int(f[2].rsplit(":", 1)[1], 16) == remote_port:
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


# ---------------------------------------------------------------------------- a light asyncio client

_salted_cache: dict[tuple[str, bytes, int], bytes] = {}


def _salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    """SCRAM's SaltedPassword, computed once per (password, salt, iterations): the salt and
    iteration count come from the user's stored verifier, so every login of a user repeats them."""
    key = (password, salt, iterations)
    got = _salted_cache.get(key)
    if got is None:
        got = _salted_cache[key] = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return got


def _scram_final(password: str, client_first_bare: str, server_first: str) -> tuple[str, bytes]:
    """(client-final message, expected server signature) for SCRAM-SHA-256 without channel binding."""
    attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
    salted = _salted_password(password, base64.b64decode(attrs["s"]), int(attrs["i"]))
    without_proof = f"c=biws,r={attrs['r']}"
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    signature = hmac.new(stored_key, auth_message, "sha256").digest()
    proof = bytes(x ^ y for x, y in zip(client_key, signature))
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    server_signature = hmac.new(server_key, auth_message, "sha256").digest()
    return f"{without_proof},p={base64.b64encode(proof).decode()}", server_signature


class ServerError(Exception):
    def __init__(self, fields):
        super().__init__(f"{fields.severity} {fields.sqlstate}: {fields.message}")
        self.fields = fields
        self.sqlstate = fields.sqlstate


class AsyncClient:
    """A minimal protocol-3 client on asyncio streams (startup, SCRAM, simple and extended queries):
    cheap enough to keep thousands of sessions open from one test process."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        from proxy.wire.buffer import ReceiveBuffer

        self.reader, self.writer = reader, writer
        self.buf = ReceiveBuffer()
        self.backend_pid = None

    @classmethod
    async def connect(cls, port: int, user: str, password: str, database: str = "app",
                      options: dict[str, str] | None = None) -> "AsyncClient":
        from proxy.wire import messages as m

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self = cls(reader, writer)
        try:
            params = {"user": user, "database": database}
            params.update(options or {})
            writer.write(m.encode_startup(params))
            first_bare = f"n=,r={base64.b64encode(os.urandom(18)).decode()}"
            expected = None
            while True:
                t, p = await self.recv()
                if t == b"E":
                    raise ServerError(m.decode_error_fields(p))
                if t == b"R":
                    code, data = m.decode_auth(p)
                    if code == 10:
                        writer.write(m.encode_sasl_initial("SCRAM-SHA-256", ("n,," + first_bare).encode()))
                    elif code == 11:
                        final, expected = _scram_final(password, first_bare, data.decode())
                        writer.write(m.encode_sasl_response(final.encode()))
                    elif code == 12:
                        got = dict(kv.split("=", 1) for kv in data.decode().split(","))
                        if base64.b64decode(got["v"]) != expected:
                            raise AssertionError("the server's SCRAM signature is wrong")
                    elif code != 0:
                        raise AssertionError(f"unexpected authentication request {code}")
                elif t == b"K":
                    self.backend_pid = struct.unpack("!i", p[:4])[0]
                elif t == b"Z":
                    return self
        except BaseException:
            writer.close()
            raise

    async def recv(self) -> tuple[bytes, bytes]:
        while True:
            msg = self.buf.next_message()
            if msg is not None:
                return msg
            data = await self.reader.read(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.buf.feed(data)

    async def _until_ready(self) -> list[list[str | None]]:
        from proxy.wire import messages as m

        rows, error = [], None
        while True:
            t, p = await self.recv()
            if t == b"D":
                rows.append([None if v is None else v.decode() for v in m.decode_data_row(p)])
            elif t == b"E" and error is None:
                error = ServerError(m.decode_error_fields(p))
                if error.fields.severity in ("FATAL", "PANIC"):
                    raise error
            elif t == b"Z":
                if error is not None:
                    raise error
                return rows

    async def query(self, sql: str) -> list[list[str | None]]:
        """Simple Query; rows as text; raises ServerError on an ErrorResponse."""
        from proxy.wire import messages as m

        self.writer.write(m.encode_query(sql))
        return await self._until_ready()

    async def extended(self, sql: str, params: tuple[str, ...] = (), name: str = "") -> list[list[str | None]]:
        """Parse (unless ``name`` is already prepared: pass sql=None) / Bind / Execute / Sync."""
        from proxy.wire import messages as m

        out = b"" if sql is None else m.encode_parse(name, sql)
        out += m.encode_bind("", name, tuple(p.encode() for p in params)) + m.encode_execute("") + m.SYNC
        self.writer.write(out)
        return await self._until_ready()

    async def close(self) -> None:
        from proxy.wire import messages as m

        try:
            self.writer.write(m.TERMINATE)
            self.writer.close()
            await self.writer.wait_closed()
        except (OSError, ConnectionError):
            pass
