"""The three targets of the comparison, set up once for a whole benchmark run.

:class:`BenchEnv` starts a PostgreSQL 15 cluster with

* the standard pgbench tables (``pgbench -i``, scale ``scale``), shared tables
  for tenantgate (readable by every tenant);
* ``accounts``, a tenant table (``tenant_id``, ``aid``) with ``rows`` rows for
  each of four tenants, for the tenant-scoped workloads;
* least-privileged roles with the same grants: ``tg_bench`` for direct
  clients, ``tg_bouncer`` for PgBouncer and ``tg_gate`` for tenantgate's
  backend connections (so pg_stat_activity tells them apart);

then PgBouncer (transaction mode, 20 server connections, SCRAM toward clients),
the bare relay (:mod:`bench.bare_relay`: framing, a raw-bytes Query cache and
pooling bookkeeping over uvloop, no policy; the limit of tenantgate's
architecture) and tenantgate (a tenant-bound application user ``acme_app``, rules loaded, so
every statement is parsed, checked and rewritten; pool mode and size from the
arguments).  ``targets`` maps each target name to how a client reaches it.
Direct, PgBouncer and bare-relay clients send statements already filtered with the tenant
predicate (``filtered``); tenantgate clients send the unfiltered statement and
tenantgate adds the predicate.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.common import ROOT, bench_cluster, free_port, raise_nofile_limit, stop_process, tenantgate_process, wait_port
from proxy.scram import make_verifier

DB = "bench"
BACKEND, BACKEND_PW = "tg_bench", "tg-bench-pw"  # direct clients
BOUNCER_ROLE = "tg_bouncer"  # PgBouncer's clients and server connections
GATE_ROLE = "tg_gate"  # tenantgate's backend connections
BARE_ROLE = "tg_bare"  # the bare relay's clients (authentication is passed through)
ROLES = (BACKEND, BOUNCER_ROLE, GATE_ROLE, BARE_ROLE)  # same password and grants; apart in pg_stat_activity
APP, APP_PW = "acme_app", "acme-pw"
TENANT = "acme"
TENANTS = ("acme", "globex", "initech", "umbrella")
POOL_SIZE = 20
MAX_CLIENTS = 10_500

DIRECT, PGBOUNCER, BARE, TENANTGATE = "direct", "pgbouncer", "bare", "tenantgate"


@dataclass(frozen=True)
class Target:
    """How a client reaches one target."""

    name: str
    port: int
    user: str
    password: str
    filtered: bool  # statements must already carry the tenant predicate
    pid: int | None = None  # the process to measure (tenantgate, PgBouncer)


def _pgbouncer_version() -> tuple[int, int]:
    out = subprocess.run(["pgbouncer", "--version"], capture_output=True, text=True).stdout.split()
    try:
        return tuple(int(x) for x in out[1].split(".")[:2])  # type: ignore[return-value]
    except (IndexError, ValueError):
        return (0, 0)


class BenchEnv:
    """Cluster, schema, PgBouncer and tenantgate for one run (a context manager)."""

    def __init__(self, workdir: Path, *, scale: int = 10, rows: int = 100_000, pool_mode: str = "transaction",
                 workers: int = 1):
        self.workdir = workdir
        self.scale = scale
        self.rows = rows
        self.pool_mode = pool_mode
        self.workers = workers
        self.targets: dict[str, Target] = {}
        self.bouncer_prepared = False  # PgBouncer >= 1.21 keeps prepared statements in transaction mode
        self.bouncer_version = ""
        self.cluster = None
        self._stack = ExitStack()

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "BenchEnv":
        try:
            self.cluster = self._stack.enter_context(bench_cluster(self.workdir))
            self._setup_database()
            self.targets[DIRECT] = Target(DIRECT, self.cluster.port, BACKEND, BACKEND_PW, filtered=True)
            self._start_pgbouncer()
            self._start_bare_relay()
            tg = self._stack.enter_context(tenantgate_process(self.tenantgate_config(), self.workdir))
            self.tenantgate_log = tg.log_path
            self.targets[TENANTGATE] = Target(TENANTGATE, tg.port, APP, APP_PW, filtered=False, pid=tg.pid)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    # ------------------------------------------------------------------ setup

    def _setup_database(self) -> None:
        c = self.cluster
        # one stored verifier for PostgreSQL and PgBouncer's auth_file: PgBouncer logs in to the
        # server with the client's SCRAM keys, which only works when both hold the same verifier
        self.backend_verifier = make_verifier(BACKEND_PW)
        for role in ROLES:
            c.psql(f"CREATE ROLE {role} LOGIN PASSWORD '{self.backend_verifier}'")
        c.psql(f"CREATE DATABASE {DB}")
        env = {**os.environ, "PGPASSWORD": c.superuser_password, "PGSSLMODE": "disable"}
        subprocess.run(["pgbench", "-i", "-s", str(self.scale), "-q", "-h", "127.0.0.1", "-p", str(c.port),
                        "-U", "postgres", DB], check=True, env=env, capture_output=True)
        c.psql(
            "CREATE TABLE accounts (tenant_id text NOT NULL, aid int NOT NULL, abalance int NOT NULL DEFAULT 0,"
            " filler char(84), PRIMARY KEY (tenant_id, aid));"
            " INSERT INTO accounts (tenant_id, aid, abalance)"
            f"  SELECT t, g, 0 FROM unnest(ARRAY{list(TENANTS)}) t, generate_series(1, {self.rows}) g;",
            database=DB)
        c.psql("VACUUM ANALYZE", database=DB)
        roles = ", ".join(ROLES)
        c.psql(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {roles}; GRANT UPDATE ON accounts TO {roles}",
               database=DB)

    def rules(self) -> dict:
        return {
            "tenant_column": "tenant_id",
            "schemas": ["public"],
            "discover": True,
            "tenant_tables": ["accounts"],
            "shared_tables": ["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history"],
        }

    def tenantgate_config(self, **overrides) -> dict:
        rules = self.workdir / "rules.yaml"
        rules.write_text(yaml.safe_dump(self.rules()))
        config = {
            "backend": {"host": "127.0.0.1", "port": self.cluster.port, "database": DB, "user": GATE_ROLE,
                        "password": BACKEND_PW, "sslmode": "disable"},
            "users": [{"name": APP, "scram_verifier": make_verifier(APP_PW), "tenant": TENANT,
                       "pool_mode": self.pool_mode}],
            "rules_file": str(rules),
            "workers": self.workers,
            "pool": {"mode": self.pool_mode, "size": POOL_SIZE},
            "limits": {"max_clients": MAX_CLIENTS},
        }
        config.update(overrides)
        return config

    def _start_pgbouncer(self) -> None:
        if shutil.which("pgbouncer") is None:
            print("  (pgbouncer is not installed: PgBouncer figures are skipped)")
            return
        version = _pgbouncer_version()
        self.bouncer_version = ".".join(map(str, version))
        self.bouncer_prepared = version >= (1, 21)
        port = free_port()
        d = self.workdir / "pgbouncer"
        d.mkdir()
        (d / "userlist.txt").write_text(f'"{BOUNCER_ROLE}" "{self.backend_verifier}"\n')
        prepared = "max_prepared_statements = 200\n" if self.bouncer_prepared else ""
        (d / "pgbouncer.ini").write_text(
            f"[databases]\n{DB} = host=127.0.0.1 port={self.cluster.port} dbname={DB}\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = scram-sha-256\n"
            f"auth_file = {d}/userlist.txt\npool_mode = transaction\nmax_client_conn = {MAX_CLIENTS}\n"
            f"default_pool_size = {POOL_SIZE}\n{prepared}unix_socket_dir =\n"
            f"logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n"
        )
        os.chmod(d, 0o777)
        for f in d.iterdir():
            os.chmod(f, 0o666)
        proc = subprocess.Popen(["pgbouncer", str(d / "pgbouncer.ini")], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, preexec_fn=_as_postgres_with_many_files)
        self._stack.callback(stop_process, proc)
        wait_port("127.0.0.1", port, proc=proc)
        pid_file = d / "pgbouncer.pid"
        pid = int(pid_file.read_text().strip()) if pid_file.exists() else proc.pid
        self.targets[PGBOUNCER] = Target(PGBOUNCER, port, BOUNCER_ROLE, BACKEND_PW, filtered=True, pid=pid)

    def _start_bare_relay(self) -> None:
        port = free_port()
        log = open(self.workdir / "bare-relay.log", "w")
        self._stack.callback(log.close)
        proc = subprocess.Popen([sys.executable, "-m", "bench.bare_relay", "--port", str(port),
                                 "--backend-port", str(self.cluster.port)],
                                stdout=log, stderr=subprocess.STDOUT, preexec_fn=raise_nofile_limit, cwd=ROOT)
        self._stack.callback(stop_process, proc)
        wait_port("127.0.0.1", port, proc=proc)
        self.targets[BARE] = Target(BARE, port, BARE_ROLE, BACKEND_PW, filtered=True, pid=proc.pid)

    # ------------------------------------------------------------------ queries

    def backend_connections(self, target: str) -> int:
        """Connections PostgreSQL sees from a proxy target that serve clients (each proxy logs in as
        its own role).  tenantgate's catalog connection (application_name 'tenantgate: catalog',
        which LISTENs for DDL and reads the catalog) is one per process and serves no client: it is
        not counted against the pool."""
        role = {PGBOUNCER: BOUNCER_ROLE, TENANTGATE: GATE_ROLE, BARE: BARE_ROLE}.get(target, BACKEND)
        return int(self.cluster.psql(
            f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}' AND backend_type = 'client backend'"
            " AND application_name IS DISTINCT FROM 'tenantgate: catalog'"
        ).strip())


def _as_postgres_with_many_files() -> None:
    """preexec_fn: raise RLIMIT_NOFILE, then drop root for the postgres OS user
    (PgBouncer refuses to run as root; runuser would reset the limit through PAM)."""
    raise_nofile_limit()
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)


