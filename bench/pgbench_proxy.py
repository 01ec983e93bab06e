"""`pgbench -S` with 16 clients: PostgreSQL directly, through PgBouncer
(transaction mode) and through tenantgate (pass-through users) with 1 and with
2 worker processes (``tenantgate-2w``), interleaved in one run.

Prints each target's median TPS over the rounds and its ratio to direct, per
pgbench query mode (``modes``: simple, extended, prepared).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.common import bench_cluster, free_port, median, pgbench, tenantgate_process, wait_port
from proxy.scram import make_verifier

USER, PASSWORD, DB = "bench", "bench-pw", "bench"
BOUNCER_PREPARED = False  # set by start_pgbouncer: PgBouncer >= 1.21 tracks prepared statements


def setup_database(cluster) -> None:
    cluster.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
    cluster.psql(f"CREATE DATABASE {DB} OWNER {USER}")


def start_pgbouncer(cluster, workdir: Path):
    if shutil.which("pgbouncer") is None:
        return None, None
    global BOUNCER_PREPARED
    version = subprocess.run(["pgbouncer", "--version"], capture_output=True, text=True).stdout.split()
    try:
        BOUNCER_PREPARED = tuple(int(x) for x in version[1].split(".")[:2]) >= (1, 21)
    except (IndexError, ValueError):
        BOUNCER_PREPARED = False
    port = free_port()
    d = workdir / "pgbouncer"
    d.mkdir()
    (d / "userlist.txt").write_text(f'"{USER}" "{PASSWORD}"\n')
    (d / "pgbouncer.ini").write_text(
        f"[databases]\n{DB} = host=127.0.0.1 port={cluster.port} dbname={DB}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nauth_type = scram-sha-256\n"
        f"auth_file = {d}/userlist.txt\npool_mode = transaction\nmax_client_conn = 200\n"
        f"default_pool_size = 20\n{'max_prepared_statements = 200' + chr(10) if BOUNCER_PREPARED else ''}unix_socket_dir =\nlogfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n"
    )
    os.chmod(d, 0o777)
    for f in d.iterdir():
        os.chmod(f, 0o666)
    cmd = ["pgbouncer", str(d / "pgbouncer.ini")]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port("127.0.0.1", port)
    return proc, port


def _label(workers: int) -> str:
    return "tenantgate" if workers == 1 else f"tenantgate-{workers}w"


def run(rounds: int = 3, seconds: int = 10, clients: int = 16, scale: int = 10,
        workers: tuple[int, ...] = (1, 2), modes: tuple[str, ...] = ("simple",)) -> dict:
    work = Path(tempfile.mkdtemp(prefix="tenantgate-bench-"))
    os.chmod(work, 0o755)
    results: dict[str, list[float]] = {}
    with bench_cluster(work) as cluster:
        setup_database(cluster)
        env = {**os.environ, "PGPASSWORD": PASSWORD}
        subprocess.run(["pgbench", "-i", "-s", str(scale), "-q", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", USER, DB],
                       check=True, env=env, capture_output=True)
        config = {
            "backend": {"host": "127.0.0.1", "port": cluster.port, "user": USER, "password": PASSWORD, "sslmode": "disable"},
            "users": [{"name": USER, "scram_verifier": make_verifier(PASSWORD), "passthrough": True}],
        }
        bouncer, bouncer_port = start_pgbouncer(cluster, work)
        try:
            with ExitStack() as stack:
                targets = {"direct": cluster.port}
                if bouncer_port:
                    targets["pgbouncer"] = bouncer_port
                for n in workers:
                    targets[_label(n)] = stack.enter_context(tenantgate_process({**config, "workers": n}, work))
                for _ in range(rounds):
                    for mode in modes:
                        args = ["-S", "-n", "-c", str(clients), "-j", "2", "-T", str(seconds), "-M", mode]
                        for name, port in targets.items():
                            if name == "pgbouncer" and mode == "prepared" and not BOUNCER_PREPARED:
                                continue  # transaction mode keeps no prepared statements before 1.21
                            tps, _ = pgbench(args, host="127.0.0.1", port=port, user=USER, password=PASSWORD,
                                             database=DB)
                            results.setdefault(f"{name}/{mode}", []).append(tps)
        finally:
            if bouncer:
                bouncer.terminate()
                bouncer.wait(5)
    shutil.rmtree(work, ignore_errors=True)
    summary = {k: median(v) for k, v in results.items() if v}
    print(f"\n== pgbench -S, {clients} clients, scale {scale}, {rounds} interleaved rounds of {seconds}s ==")
    for key, tps in summary.items():
        name, mode = key.split("/")
        ratio = tps / summary[f"direct/{mode}"]
        print(f"  -M {mode:<9} {name:<14} {tps:10.0f} TPS   {ratio:5.2f}x of direct   "
              f"(rounds: {', '.join(f'{x:.0f}' for x in results[key])})")
    return summary


if __name__ == "__main__":
    run()
