"""`tenantgate demo`: an embedded PostgreSQL, the demo SaaS schema and tenantgate in front of it.

What it sets up (first run; later runs reuse the state directory):

* a PostgreSQL 15 cluster in ``<state dir>/pg`` on a free loopback port;
* database ``app`` with the demo schema (``proxy/sql/demo_schema.sql``): shared
  ``products``; tenant tables ``customers``, ``orders``, ``order_items``;
  tenants ``acme`` and ``globex``;
* the hardened bootstrap (``deploy/postgres/bootstrap.sql``): the
  least-privileged ``tenantgate_app`` role, RLS backstop policies, the control
  schema owned by ``tenantgate_control``;
* application users ``acme_app`` and ``globex_app`` (credential-bound),
  ``pool_app`` (chooses its tenant with a signed token), operator ``alice``
  and approver ``bob``;
* ``<state dir>/tenantgate.yaml`` (the config it runs with) and
  ``<state dir>/dsns.json`` (the demo contract:
  ``{"app": {tenant: dsn}, "operator": {name: dsn}, "backend_admin": dsn}``).

With ``--regions cn-east,cn-north``: one cluster per region (``pg`` for the first, ``pg-<region>``
for the others; wal_level=logical), each with the same schema and bootstrap; acme is placed in the
first region and globex in the second (each tenant's seed rows only on its region's server), the
config has a ``regions:`` map, and dsns.json adds ``backend_admin_by_region`` (docs/scale-out.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import sys
from pathlib import Path

import yaml

from proxy.pgcluster import PgCluster, ensure_traversable, free_port

DEMO_DB = "app"
TENANTS = ("acme", "globex")
# alice requests access; bob and carol approve (two approvers: account changes need a second one,
# see proxy/control/accounts.py).  The demo, as the database owner, adds them at bootstrap.
OPERATORS = {"alice": ("operator",), "bob": ("approver",), "carol": ("approver",)}
ADMIN_USER = "tg_admin"  # the admin console's user (dsns.json: admin_console)
SCHEMA_SQL = Path(__file__).resolve().parent / "sql" / "demo_schema.sql"
RULES_FILE = Path(__file__).resolve().parent.parent / "rules" / "tenancy.yaml"


def _parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--listen must be HOST:PORT, not {listen!r}")
    return host.strip("[]"), int(port)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class DemoState:
    """Passwords, keys and ports of one demo state directory (``demo.json``)."""

    def __init__(self, state_dir: Path):
        self.dir = state_dir
        self.file = state_dir / "demo.json"
        self.data: dict = json.loads(self.file.read_text()) if self.file.exists() else {}

    def secret(self, name: str, nbytes: int = 18) -> str:
        secrets_ = self.data.setdefault("secrets", {})
        if name not in secrets_:
            secrets_[name] = secrets.token_urlsafe(nbytes)
        return secrets_[name]

    def backstop_key(self) -> str:
        """The backstop key (hex, 32 bytes) shared by the proxy config and the bootstrap."""
        secrets_ = self.data.setdefault("secrets", {})
        if "backstop_key" not in secrets_:
            secrets_["backstop_key"] = secrets.token_hex(32)
        return secrets_["backstop_key"]

    def save(self) -> None:
        self.file.write_text(json.dumps(self.data, indent=2))
        os.chmod(self.file, 0o600)


def ensure_cluster(state: DemoState, name: str = "pg", logical: bool = False) -> PgCluster:
    """The cluster in ``<state dir>/<name>`` (``pg``: the first one; ``pg-<region>`` for the other regions
    of ``--regions``), started.  ``logical``: wal_level=logical (tenant moves use logical replication)."""
    datadir = state.dir / name
    port_key = "pg_port" if name == "pg" else f"pg_port:{name}"
    if (datadir / "PG_VERSION").exists() and port_key in state.data:
        cluster = PgCluster(datadir=datadir, port=state.data[port_key],
                            superuser_password=state.secret("postgres"))
        if not _port_free(cluster.port):
            cluster.port = free_port()
            with (datadir / "postgresql.conf").open("a") as f:
                f.write(f"port = {cluster.port}\n")
        if logical:
            _logical(datadir)
        cluster.stop("immediate")  # a stale postmaster.pid from a killed run
        cluster.start()
        state.data[port_key] = cluster.port
        harden(cluster)  # a state dir from before TLS gets it now
        return cluster
    os.chmod(state.dir, 0o755)
    ensure_traversable(state.dir)
    cluster = PgCluster(datadir=datadir, port=free_port(), superuser_password=state.secret("postgres"))
    cluster.initdb()
    if logical:
        _logical(datadir)
    cluster.start()
    state.data[port_key] = cluster.port
    if name == "pg":
        state.data.pop("initialized", None)
    harden(cluster)
    return cluster


def _logical(datadir: Path) -> None:
    conf = datadir / "postgresql.conf"
    if "wal_level = logical" not in conf.read_text():
        with conf.open("a") as f:
            f.write("\n# tenantgate demo --regions: tenant moves use logical replication\n"
                    "wal_level = logical\nmax_replication_slots = 20\nmax_wal_senders = 20\n")


def harden(cluster: PgCluster) -> None:
    """The posture docs/security.md recommends, so `tenantgate doctor` passes: TLS with a
    self-signed certificate (clients verify it: sslmode=verify-full), and a pg_hba.conf from
    deploy/postgres/pg_hba.conf.template: hostssl + scram-sha-256 only, the application roles
    from tenantgate's address only, the superuser from loopback, everything else rejected."""
    from proxy.bootstrap import install_hba

    cluster.enable_tls()
    # the unix socket: peer for the postgres OS user when we are root (cluster.psql runs as it),
    # else trust (the OS user is not "postgres"); doctor counts local trust as a warning, not a failure
    # every role of the demo database from loopback (tenantgate's address here): the backend and
    # control roles, and the dedicated lifecycle or variant backend roles an operator adds
    install_hba(cluster, cluster.host, database=DEMO_DB, admin_addr=cluster.host, app_roles=("all",),
                local_auth="peer" if os.geteuid() == 0 else "trust")


def _create_app_db(cluster: PgCluster, keep: tuple[str, ...] | None) -> None:
    """Database ``app`` with the demo schema; ``keep``: only these tenants' seed rows stay (--regions)."""
    cluster.psql(f"CREATE DATABASE {DEMO_DB}")
    cluster.psql(SCHEMA_SQL.read_text(), database=DEMO_DB)
    if keep is not None:
        kept = "ARRAY[" + ",".join(f"'{t}'" for t in keep) + "]::text[]"
        cluster.psql("".join(f"DELETE FROM {t} WHERE tenant_id <> ALL ({kept});"
                             for t in ("order_items", "orders", "customers")), database=DEMO_DB)


async def initialize_region(cluster: PgCluster, state: DemoState, region: str, keep: tuple[str, ...]) -> None:
    """Another region's server (--regions): the same schema and bootstrap, only its tenants' rows (once)."""
    from proxy.bootstrap import apply_bootstrap

    if region in state.data.get("regions_initialized", []):
        return
    if not cluster.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DEMO_DB}'").strip():
        _create_app_db(cluster, keep)
    apply_bootstrap(cluster.dsn(database=DEMO_DB), state.secret("tenantgate_app"), state.secret("tenantgate_control"),
                    backstop_key=state.backstop_key())
    state.data.setdefault("regions_initialized", []).append(region)
    state.save()


def placed_tenants(regions: list[str]) -> dict[str, str]:
    """acme in the first region, globex in the second (both in the first when there is one)."""
    return {t: regions[min(i, len(regions) - 1)] for i, t in enumerate(TENANTS)}


async def place_tenants(cluster: PgCluster, state: DemoState, regions: list[str]) -> None:
    """Record the demo's placements in the control schema (audited as tenant.place; once)."""
    from proxy.control.placement import get_placement, set_placement
    from proxy.control.plane import ControlPlane

    plane = ControlPlane(control_dsn(cluster, state), audit=_audit_cfg(state))
    await plane.start()
    try:
        for tenant, region in placed_tenants(regions).items():
            p = await get_placement(plane, tenant)
            if p is None or p.region != region:
                await set_placement(plane, plane.platform_admin(), tenant, region,
                                    reason="tenantgate demo --regions")
    finally:
        await plane.close()


def _audit_cfg(state: DemoState):
    from proxy.config import AuditConfig

    return AuditConfig(signing_key_file=str(signing_key(state)), witness_file=str(witness_file(state)))


async def initialize(cluster: PgCluster, state: DemoState, keep: tuple[str, ...] | None = None) -> None:
    """Create the demo database, schema, roles, control schema and accounts (once).  ``keep``: with
    --regions, the tenants whose seed rows stay on this (the first region's) server."""
    from proxy.bootstrap import apply_bootstrap
    from proxy.control.plane import ControlPlane

    if state.data.get("initialized"):
        if not state.data.get("backstop"):  # a state dir from before the backstop: bootstrap again
            apply_bootstrap(cluster.dsn(database=DEMO_DB), state.secret("tenantgate_app"),
                            state.secret("tenantgate_control"), backstop_key=state.backstop_key())
            state.data["backstop"] = True
            state.save()
        return
    exists = cluster.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DEMO_DB}'").strip()
    if not exists:
        _create_app_db(cluster, keep)
    apply_bootstrap(cluster.dsn(database=DEMO_DB), state.secret("tenantgate_app"), state.secret("tenantgate_control"),
                    backstop_key=state.backstop_key())
    state.data["backstop"] = True
    plane = ControlPlane(control_dsn(cluster, state), audit=_audit_cfg(state))
    await plane.start(install=True)
    try:
        admin = plane.platform_admin()
        for tenant in TENANTS:
            await plane.register_tenant(tenant, admin)
        for name, roles in OPERATORS.items():
            if await plane.get_operator(name) is None:
                await plane.add_operator(admin, name, state.secret(f"operator:{name}"), roles)
    finally:
        await plane.close()
    state.data["initialized"] = True
    state.save()


def control_dsn(cluster: PgCluster, state: DemoState) -> str:
    return cluster.dsn("tenantgate_control", state.secret("tenantgate_control"), DEMO_DB)


def witness_file(state: DemoState) -> Path:
    """The demo's audit witness (JSON lines of signed checkpoints, beside the state)."""
    return state.dir / "audit-witness.jsonl"


def signing_key(state: DemoState) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = state.dir / "audit-ed25519.pem"
    if not path.exists():
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        path.write_bytes(pem)
        os.chmod(path, 0o600)
    return path


def _backend_entry(cluster: PgCluster, state: DemoState) -> dict:
    return {"host": "127.0.0.1", "port": cluster.port, "database": DEMO_DB, "user": "tenantgate_app",
            "password": state.secret("tenantgate_app"), "sslmode": cluster.sslmode,
            "sslrootcert": cluster.sslrootcert}


def demo_config(cluster: PgCluster, state: DemoState, host: str, port: int, metrics_port: int | None,
                regions: dict[str, PgCluster] | None = None) -> dict:
    """The demo's config; with ``regions`` (name -> cluster, the first is ``cluster``) a ``regions:`` map
    instead of ``backend:``, each region with its lifecycle role (export, import, purge act there)."""
    from proxy.scram import make_verifier

    users = [
        {"name": f"{t}_app", "scram_verifier": make_verifier(state.secret(f"app:{t}")), "tenant": t} for t in TENANTS
    ]
    users.append({"name": "pool_app", "scram_verifier": make_verifier(state.secret("app:pool")), "token_tenants": True})
    # the admin console (SHOW POOLS, PAUSE, ...: docs/admin-console.md); it reaches no data
    users.append({"name": ADMIN_USER, "scram_verifier": make_verifier(state.secret("admin_console")), "admin": True})
    cfg = {
        "listen": {"host": host, "port": port},
        "backend": _backend_entry(cluster, state),
        "users": users,
        "rules_file": str(RULES_FILE),
        "tokens": {"hmac_key": state.secret("token_key", 32)},  # HS256 wants a key of at least 32 bytes
        "control": {"dsn": control_dsn(cluster, state)},
        # checkpoints also go to a witness file outside the database (docs/operator-access.md)
        "audit": {"signing_key_file": str(signing_key(state)), "witness_file": str(witness_file(state))},
        "backstop": {"key": state.backstop_key()},  # the PostgreSQL backstop's key (proxy/backstop.py)
        # export/import/purge read and delete tenant rows and keep a purge journal; in the demo
        # they run as the cluster's superuser (production: a dedicated role, see docs/lifecycle.md)
        "lifecycle": {"data_dsn": cluster.dsn(database=DEMO_DB)},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
    }
    if regions:
        del cfg["backend"]
        cfg["regions"] = {name: dict(_backend_entry(c, state), data_dsn=c.dsn(database=DEMO_DB))
                          for name, c in regions.items()}
        cfg["placement"] = {"default_region": next(iter(regions))}
    return cfg


def dsns(cluster: PgCluster, state: DemoState, host: str, port: int, metrics_port: int | None = None,
         admin_database: str = "tenantgate", regions: dict[str, PgCluster] | None = None) -> dict:
    """The demo contract (dsns.json).  ``app``, ``operator`` and ``backend_admin`` never change;
    ``metrics`` (with a metrics port) and ``admin_console`` are additions."""
    h = f"[{host}]" if ":" in host else host

    def url(user: str, password: str, database: str = DEMO_DB) -> str:
        from urllib.parse import quote

        return f"postgresql://{quote(user)}:{quote(password, safe='')}@{h}:{port}/{database}?sslmode=disable"

    out = {
        "app": {t: url(f"{t}_app", state.secret(f"app:{t}")) for t in TENANTS},
        "operator": {name: url(name, state.secret(f"operator:{name}")) for name in OPERATORS},
        "backend_admin": cluster.dsn(database=DEMO_DB),
        "admin_console": url(ADMIN_USER, state.secret("admin_console"), admin_database),
    }
    if metrics_port:
        out["metrics"] = f"http://127.0.0.1:{metrics_port}/metrics"
    if regions:  # --regions: each region's server (backend_admin stays the first region's)
        out["backend_admin_by_region"] = {name: c.dsn(database=DEMO_DB) for name, c in regions.items()}
    return out


def resolve_metrics_port(state: DemoState, requested: str | int | None) -> int | None:
    """``--metrics-port``: ``auto`` (the default) keeps the port of the last run when it is free,
    else takes a free one; ``off`` serves no metrics; a number is that port."""
    if requested is None or requested == "off":
        return None
    if requested != "auto":
        return int(requested)
    last = state.data.get("metrics_port")
    port = last if isinstance(last, int) and _port_free(last) else free_port()
    state.data["metrics_port"] = port
    return port


def cli_command() -> str:
    """How to run this very tenantgate from a shell: bare ``tenantgate`` only when that is what the
    PATH finds; else the script beside this Python (``/path/to/.venv/bin/tenantgate`` after ``make run``)."""
    import shutil

    beside = Path(sys.executable).parent / "tenantgate"
    found = shutil.which("tenantgate")
    if found and beside.exists() and Path(found).resolve() == beside.resolve():
        return "tenantgate"
    if beside.exists():
        return str(beside)
    return f"{sys.executable} -m proxy"


def banner(state_dir: Path, d: dict, metrics_port: int | None) -> str:
    lines = [
        "",
        "tenantgate demo is running.",
        f"  state directory : {state_dir}",
        f"  connection strings: {state_dir / 'dsns.json'}",
        "",
        "Tenant sessions (each sees only its own rows):",
    ]
    for dsn in d["app"].values():
        lines.append(f"  psql '{dsn}'")
    lines += ["", "Operator sessions need an approved grant (two-person rule):"]
    cfg = state_dir / "tenantgate.yaml"
    pw = state_dir / "demo.json"
    tg = cli_command()
    lines += [
        f"  # passwords are in {pw} (secrets.operator:alice / operator:bob / operator:carol)",
        f"  {tg} grant request --config {cfg} --as alice --tenant acme --access read --for 1h --reason 'TICKET-1: demo'",
        f"  {tg} grant approve --config {cfg} --as bob ID",
        f"  psql '{d['operator']['alice']}'",
        "",
        f"Backend (superuser, direct; for administration only): psql '{d['backend_admin']}'",
        *[f"  region {r}: psql '{dsn}'" for r, dsn in d.get("backend_admin_by_region", {}).items()],
        f"Admin console (SHOW POOLS, SHOW TENANTS, PAUSE, ...): psql '{d['admin_console']}'",
    ]
    if d.get("metrics"):
        lines.append(f"Prometheus metrics: {d['metrics']}")
    lines += ["", "Ctrl-C stops tenantgate and PostgreSQL.", ""]
    return "\n".join(lines)


def parse_regions(text: str | None) -> list[str]:
    """``--regions cn-east,cn-north`` -> the region names (at least one, distinct, valid)."""
    import re

    from proxy.config import REGION_NAME

    if text is None:
        return []
    names = [r.strip() for r in text.split(",") if r.strip()]
    if not names or len(set(names)) != len(names) or not all(re.match(REGION_NAME, r) for r in names):
        raise SystemExit(f"--regions must be distinct region names (a-z, 0-9, - and _), comma-separated, not {text!r}")
    return names


async def run_demo(state_dir: Path, listen: str, metrics_port: str | int | None = "auto",
                   pool_mode: str = "transaction", regions: list[str] | None = None) -> int:
    from proxy.config import Config
    from proxy.gatekeeper import build_gatekeeper
    from proxy.server import ProxyServer

    host, port = _parse_listen(listen)
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    state = DemoState(state_dir)
    regions = list(regions or [])
    if state.data.get("regions", []) != regions and state.data.get("initialized"):
        raise SystemExit(f"the state directory {state_dir} was made with --regions "
                         f"{','.join(state.data.get('regions', [])) or '(none)'}: use another --state-dir")
    state.data["regions"] = regions
    cluster = ensure_cluster(state, logical=bool(regions))
    clusters = {regions[0]: cluster} if regions else {}
    metrics_port = resolve_metrics_port(state, metrics_port)
    state.save()
    server = None
    gatekeeper = None
    try:
        for name in regions[1:]:
            clusters[name] = ensure_cluster(state, f"pg-{name}", logical=True)
            state.save()
        placed = placed_tenants(regions) if regions else {}
        keep = lambda region: tuple(t for t, r in placed.items() if r == region)  # noqa: E731
        await initialize(cluster, state, keep(regions[0]) if regions else None)
        for name in regions[1:]:
            await initialize_region(clusters[name], state, name, keep(name))
        if regions:
            await place_tenants(cluster, state, regions)
        raw = demo_config(cluster, state, host, port, metrics_port, clusters or None)
        raw["pool"] = {"mode": pool_mode, "size": 20}
        raw["limits"] = {"max_clients": 20000}
        state.save()  # demo_config created the app passwords and the token key: keep them in demo.json
        cfg_path = state_dir / "tenantgate.yaml"
        cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
        os.chmod(cfg_path, 0o600)
        config = Config.model_validate(raw)
        gatekeeper = await build_gatekeeper(config)
        server = ProxyServer(config, gatekeeper, config_path=cfg_path)
        await server.start()
        if metrics_port:  # /metrics, /healthz, /readyz (proxy.admin_http)
            from proxy.admin_http import start_metrics_endpoint

            _admin = await start_metrics_endpoint(config, server, gatekeeper)  # serves until the demo exits
        d = dsns(cluster, state, host, server.port, metrics_port, config.admin.database, clusters or None)
        (state_dir / "dsns.json").write_text(json.dumps(d, indent=2))
        print(banner(state_dir, d, metrics_port), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, server.reload_from_file)
        # stop on a signal, or when the server has stopped (the admin console's SHUTDOWN drains it)
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(server.serve_forever())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        print("stopping tenantgate demo ...", flush=True)
        return 0
    finally:
        if server is not None:
            await server.close()
        if gatekeeper is not None and hasattr(gatekeeper, "close"):
            await gatekeeper.close()
        for c in clusters.values():
            if c is not cluster:
                c.stop()
        cluster.stop()
