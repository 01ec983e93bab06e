"""deploy/postgres: the hardened bootstrap and the pg_hba template, applied to a real cluster.

The cluster is this module's own (ssl on with a self-signed certificate, and
pg_hba.conf replaced by the template that admits the application database only
from 127.0.0.2, tenantgate's address here).  A relay bound to 127.0.0.2 plays
tenantgate's network position; everything else connects from 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
import socket
import ssl
import struct
import subprocess
import sys

import asyncpg
import pytest

from proxy.backstop import IDENTITY_SQL, BackendBinder

from support.deploy import (
    BACKSTOP_KEY,
    APP_PASSWORD, CONTROL_PASSWORD, DEMO_SCHEMA, Relay, make_hardened_cluster, socket_admin_dsn,
)
from proxy.bootstrap import BOOTSTRAP_SQL, BootstrapError, apply_bootstrap, install_hba, render_hba, scram_verifier
from proxy.doctor import diagnose

APP_DB = "app"
TENANT_TABLES = ["customers", "order_items", "orders"]


@pytest.fixture(scope="module")
def hardened():
    # not under pytest's basetemp: concurrent pytest runs reset /tmp/pytest-of-<user> to 0700,
    # and the postgres OS user must reach the cluster directory
    base = Path(tempfile.mkdtemp(prefix="tenantgate-deploy-pg-"))
    os.chmod(base, 0o755)
    cluster = make_hardened_cluster(base, "hardened")
    relay = None
    try:
        cluster.psql(f"CREATE DATABASE {APP_DB}")
        cluster.psql(DEMO_SCHEMA, database=APP_DB)
        apply_bootstrap(cluster.dsn(database=APP_DB), APP_PASSWORD, CONTROL_PASSWORD, backstop_key=BACKSTOP_KEY)
        install_hba(cluster, "127.0.0.2", database=APP_DB, local_auth="trust")
        relay = Relay(cluster.host, cluster.port, source="127.0.0.2").start()
        yield cluster, relay
    finally:
        if relay:
            relay.stop()
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)


def app_dsn(relay, **kw):
    return relay.dsn("tenantgate_app", APP_PASSWORD, kw.pop("database", APP_DB), **kw)


# --- bootstrap -----------------------------------------------------------------------------


def test_app_role_is_least_privileged(hardened):
    cluster, _ = hardened
    row = cluster.psql(
        "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
        "FROM pg_roles WHERE rolname = 'tenantgate_app'", database=APP_DB)
    assert row.strip() == "t|f|f|f|f|f"
    memberships = cluster.psql(
        "SELECT count(*) FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member"
        " WHERE r.rolname IN ('tenantgate_app', 'tenantgate_control')")
    assert memberships.strip() == "0"
    # the backstop guard reads backend start times and ends a purged tenant's backends (bootstrap
    # section 8), nothing else; nobody is a member of it
    guard = cluster.psql(
        "SELECT string_agg(g.rolname, ',' ORDER BY g.rolname) FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
        " WHERE m.member = 'tenantgate_guard'::regrole")
    assert guard.strip() == "pg_read_all_stats,pg_signal_backend"
    assert cluster.psql("SELECT count(*) FROM pg_auth_members WHERE roleid = 'tenantgate_guard'::regrole").strip() == "0"
    assert cluster.psql("SELECT rolcanlogin FROM pg_roles WHERE rolname = 'tenantgate_guard'").strip() == "f"
    privs = cluster.psql(
        "SELECT has_schema_privilege('tenantgate_app', 'public', 'CREATE'),"
        "       has_schema_privilege('tenantgate_app', 'tenantgate_control', 'USAGE'),"
        "       has_table_privilege('tenantgate_app', 'public.orders', 'TRUNCATE'),"
        "       has_table_privilege('tenantgate_app', 'public.orders', 'SELECT,INSERT,UPDATE,DELETE'),"
        "       (SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'tenantgate_control'),"
        "       (SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'tenantgate_app')",
        database=APP_DB)
    assert privs.strip() == "f|f|f|t|tenantgate_control|t"


def test_rls_enabled_and_forced_with_backstop_policies(hardened):
    cluster, _ = hardened
    rows = cluster.psql(
        "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity,"
        "       string_agg(p.polname || ':' || p.polpermissive, ',' ORDER BY p.polname)"
        "  FROM pg_class c LEFT JOIN pg_policy p ON p.polrelid = c.oid"
        " WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r'"
        " GROUP BY 1, 2, 3 ORDER BY 1", database=APP_DB).split()
    both = ("tenantgate_tenant_access:true,tenantgate_tenant_delete:false,tenantgate_tenant_isolation:false,"
            "tenantgate_tenant_update:false")
    assert rows == [
        f"customers|t|t|{both}", f"order_items|t|t|{both}", f"orders|t|t|{both}", "products|f|f|",
    ]


def test_bootstrap_is_idempotent(hardened):
    cluster, _ = hardened
    before = cluster.psql("SELECT count(*) FROM pg_policy", database=APP_DB)
    apply_bootstrap(socket_admin_dsn(cluster, APP_DB), APP_PASSWORD, CONTROL_PASSWORD)
    apply_bootstrap(socket_admin_dsn(cluster, APP_DB), APP_PASSWORD, CONTROL_PASSWORD)
    assert cluster.psql("SELECT count(*) FROM pg_policy", database=APP_DB) == before == "12\n"


def test_bootstrap_by_hand_with_psql(hardened):
    """The documented command line works, with plaintext passwords, and stores SCRAM."""
    cluster, _ = hardened
    cluster.psql("CREATE DATABASE byhand")
    cluster.psql("CREATE TABLE notes (tenant_id int NOT NULL, body text); CREATE INDEX ON notes (tenant_id)",
                 database="byhand")
    base = ["psql", "-X", "-q", "-1", "-v", "ON_ERROR_STOP=1", "-h", str(cluster.sockdir), "-p", str(cluster.port),
            "-U", "postgres", "-d", "byhand"]
    missing = subprocess.run([*base, "-f", str(BOOTSTRAP_SQL)], capture_output=True, text=True)
    assert missing.returncode != 0
    assert "pass -v app_password" in missing.stderr
    done = subprocess.run(
        [*base, "-v", f"app_password={APP_PASSWORD}", "-v", f"control_password={CONTROL_PASSWORD}",
         "-f", str(BOOTSTRAP_SQL)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "row-level security on public.notes (tenant column tenant_id, integer)" in done.stderr
    assert cluster.psql("SELECT relforcerowsecurity FROM pg_class WHERE relname = 'notes'", database="byhand") == "t\n"
    stored = cluster.psql("SELECT rolpassword LIKE 'SCRAM-SHA-256$%' FROM pg_authid WHERE rolname = 'tenantgate_app'")
    assert stored == "t\n"


def test_bootstrap_refuses_tenant_table_owned_by_app_role(hardened):
    cluster, _ = hardened
    cluster.psql("CREATE DATABASE owned")
    cluster.psql("CREATE TABLE t (tenant_id text); ALTER TABLE t OWNER TO tenantgate_app", database="owned")
    with pytest.raises(BootstrapError, match=r"tenant table public\.t is owned by tenantgate_app"):
        apply_bootstrap(socket_admin_dsn(cluster, "owned"), APP_PASSWORD, CONTROL_PASSWORD)
    # one transaction: nothing was changed
    assert cluster.psql("SELECT count(*) FROM pg_namespace WHERE nspname = 'tenantgate_control'", database="owned") == "0\n"


def test_bootstrap_rejects_bad_arguments(hardened):
    cluster, _ = hardened
    with pytest.raises(BootstrapError, match="required"):
        apply_bootstrap(socket_admin_dsn(cluster, APP_DB), "", CONTROL_PASSWORD)
    with pytest.raises(BootstrapError, match='schema "nosuch" does not exist'):
        apply_bootstrap(socket_admin_dsn(cluster, APP_DB), APP_PASSWORD, CONTROL_PASSWORD, schemas=("nosuch",))


async def test_backstop_policies_scope_the_app_role(hardened):
    _, relay = hardened
    conn = await asyncpg.connect(app_dsn(relay))
    try:
        assert await conn.fetchval("SELECT count(*) FROM customers") == 0  # no tenant bound: nothing
        await conn.execute("SELECT set_config('tenantgate.tenant_id', 'acme', false)")
        assert await conn.fetchval("SELECT count(*) FROM customers") == 0  # the GUC binds nothing
        binder = BackendBinder.from_identity_row(bytes.fromhex(BACKSTOP_KEY), await conn.fetchrow(IDENTITY_SQL))
        await conn.execute(binder.sql("acme", "write"))  # what tenantgate does for acme
        assert await conn.fetch("SELECT tenant_id, id FROM orders") == [("acme", 10)]
        assert await conn.fetchval("SELECT count(*) FROM products") == 2  # shared table
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await conn.execute("INSERT INTO customers VALUES ('globex', 2, 'sneaky')")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("TRUNCATE order_items")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE TABLE public.evil (x int)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("SELECT * FROM pg_read_file('postgresql.conf')")
        assert await conn.execute("UPDATE customers SET name = name") == "UPDATE 1"
    finally:
        await conn.close()


# --- pg_hba template ----------------------------------------------------------------------


def test_render_hba_repeats_and_drops_lines():
    text = render_hba(["10.0.0.5", "10.0.0.6/32"], "app")
    lines = [ln.split() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert ["hostssl", "app", "tenantgate_app,tenantgate_control", "10.0.0.5/32", "scram-sha-256"] in lines
    assert ["hostssl", "app", "tenantgate_app,tenantgate_control", "10.0.0.6/32", "scram-sha-256"] in lines
    assert not any("@" in tok for ln in lines for tok in ln)  # no placeholder left, admin line dropped
    assert lines[-2:] == [["host", "all", "all", "0.0.0.0/0", "reject"], ["host", "all", "all", "::/0", "reject"]]
    assert {ln[-1] for ln in lines if ln[0].startswith("host")} == {"scram-sha-256", "reject"}


async def test_allowed_address_with_scram_and_tls_connects(hardened):
    _, relay = hardened
    conn = await asyncpg.connect(app_dsn(relay))
    try:
        assert await conn.fetchval("SELECT inet_client_addr()::text") == "127.0.0.2/32"
        assert conn._transport.get_extra_info("sslcontext") is not None  # pg_stat_ssl is closed to the app role
    finally:
        await conn.close()


async def test_app_role_from_other_address_is_refused_by_postgres(hardened):
    cluster, _ = hardened
    dsn = f"postgresql://tenantgate_app:{APP_PASSWORD}@127.0.0.1:{cluster.port}/{APP_DB}?sslmode=require"
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match='rejects connection for host "127.0.0.1"') as e:
        await asyncpg.connect(dsn)
    assert e.value.sqlstate == "28000"


async def test_app_role_without_tls_or_to_other_database_is_refused(hardened):
    _, relay = hardened
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(app_dsn(relay, sslmode="disable"))
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match='database "postgres"'):
        await asyncpg.connect(app_dsn(relay, database="postgres"))


def _read_message(tls: ssl.SSLSocket) -> tuple[bytes, bytes]:
    head = b""
    while len(head) < 5:
        head += tls.recv(5 - len(head))
    length = struct.unpack("!I", head[1:5])[0] - 4
    body = b""
    while len(body) < length:
        body += tls.recv(length - len(body))
    return head[:1], body


def test_server_offers_only_scram_to_the_app_role(hardened):
    """From tenantgate's address the server's first auth request is SASL with SCRAM mechanisms only
    (never cleartext password = 3 or md5 = 5)."""
    _, relay = hardened
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as raw:
        raw.sendall(struct.pack("!II", 8, 80877103))  # SSLRequest
        assert raw.recv(1) == b"S"
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        with ctx.wrap_socket(raw) as tls:
            params = b"user\0tenantgate_app\0database\0app\0\0"
            tls.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
            kind, body = _read_message(tls)
    assert kind == b"R"
    assert struct.unpack("!I", body[:4])[0] == 10  # AuthenticationSASL
    mechanisms = [m for m in body[4:].split(b"\0") if m]
    assert mechanisms and set(mechanisms) <= {b"SCRAM-SHA-256", b"SCRAM-SHA-256-PLUS"}


async def test_md5_stored_password_is_refused(hardened):
    """A role whose password is stored as MD5 cannot log in: the server insists on SCRAM."""
    cluster, relay = hardened
    cluster.psql("SET password_encryption = 'md5'; ALTER ROLE tenantgate_app PASSWORD 'md5-secret'")
    try:
        with pytest.raises(asyncpg.InvalidPasswordError) as e:
            await asyncpg.connect(relay.dsn("tenantgate_app", "md5-secret", APP_DB))
        assert e.value.sqlstate == "28P01"
    finally:
        cluster.psql(f"ALTER ROLE tenantgate_app PASSWORD '{scram_verifier(APP_PASSWORD)}'")


# --- doctor on the hardened cluster --------------------------------------------------------


async def test_doctor_passes_on_the_hardened_cluster(hardened):
    cluster, relay = hardened
    report = await diagnose(app_dsn(relay), admin_dsn=socket_admin_dsn(cluster, APP_DB))
    assert report.ok, report.to_text()
    passed = {f.check for f in report.findings if f.status == "pass"}
    assert {"role.attributes", "role.memberships", "schema.create", "rls.enabled", "rls.forced", "rls.policy",
            "rls.effective", "unique.no_tenant", "index.tenant_leading", "control.privileges", "ssl", "hba",
            "role.password", "function.server_access"} <= passed
    # the only warning is the test cluster's local trust line
    assert {f.check for f in report.warnings} == {"hba.local_trust"}


def test_doctor_command_line(hardened):
    cluster, relay = hardened
    base = [sys.executable, "-m", "proxy", "doctor", "--backend", app_dsn(relay)]
    out = subprocess.run([*base, "--admin-dsn", socket_admin_dsn(cluster, APP_DB), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    data = json.loads(out.stdout)
    assert data["ok"] is True and data["summary"]["fail"] == 0
    text = subprocess.run(base, capture_output=True, text=True, timeout=60)
    assert text.returncode == 0
    assert "SKIP  hba" in text.stdout and "result: OK" in text.stdout
    refused = subprocess.run([sys.executable, "-m", "proxy", "doctor", "--backend",
                              f"postgresql://tenantgate_app:{APP_PASSWORD}@127.0.0.1:{cluster.port}/{APP_DB}"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "FAIL  connect" in refused.stdout


def test_doctor_takes_the_backend_from_a_tenantgate_config(hardened, tmp_path):
    cluster, relay = hardened
    config = tmp_path / "tenantgate.yaml"
    config.write_text(
        "backend:\n"
        f"  host: 127.0.0.1\n  port: {relay.port}\n  database: {APP_DB}\n"
        "  user: tenantgate_app\n  password_env: H7_BACKEND_PASSWORD\n  sslmode: require\n"
    )
    env = dict(os.environ, H7_BACKEND_PASSWORD=APP_PASSWORD)
    out = subprocess.run([sys.executable, "-m", "proxy", "doctor", "--config", str(config)],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"role tenantgate_app on database {APP_DB}" in out.stdout
    missing = subprocess.run([sys.executable, "-m", "proxy", "doctor", "--config", str(config)],
                             capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items() if k != "H7_BACKEND_PASSWORD"})
    assert missing.returncode == 2 and "H7_BACKEND_PASSWORD is not set" in missing.stderr
