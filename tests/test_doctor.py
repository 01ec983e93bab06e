"""`tenantgate doctor`: break one property of a hardened database at a time and see doctor fail and name it.

Each test starts from a fresh, bootstrapped copy of the demo schema on which
doctor passes, breaks one thing, and checks the failing check ids and the
object named.  Role-level breaks are undone in ``finally`` (roles are
cluster-wide).
"""

from __future__ import annotations

import uuid

import pytest

from support.deploy import BACKSTOP_KEY, APP_PASSWORD, CONTROL_PASSWORD, DEMO_SCHEMA, hardened_cluster_with_relay, socket_admin_dsn
from proxy.bootstrap import apply_bootstrap, install_hba, scram_verifier
from proxy.doctor import diagnose


@pytest.fixture(scope="module")
def env():
    with hardened_cluster_with_relay("tenantgate-doctor-pg-", "doctor") as cluster_relay:
        yield cluster_relay


@pytest.fixture
def app_db(env):
    """A fresh database with the demo schema, bootstrapped; doctor passes on it."""
    cluster, _ = env
    name = f"app_{uuid.uuid4().hex[:8]}"
    cluster.psql(f"CREATE DATABASE {name}")
    cluster.psql(DEMO_SCHEMA, database=name)
    apply_bootstrap(socket_admin_dsn(cluster, name), APP_PASSWORD, CONTROL_PASSWORD, backstop_key=BACKSTOP_KEY)
    return name


async def run_doctor(env, db, admin=True, sslmode="require"):
    cluster, relay = env
    return await diagnose(
        relay.dsn("tenantgate_app", APP_PASSWORD, db, sslmode=sslmode),
        admin_dsn=socket_admin_dsn(cluster, db) if admin else None,
    )


def failing(report) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in report.failures:
        out.setdefault(f.check, []).append(f.subject or "")
    return out


async def test_baseline_passes(env, app_db):
    report = await run_doctor(env, app_db)
    assert report.ok, report.to_text()


async def test_superuser_role(env, app_db):
    cluster, _ = env
    cluster.psql("ALTER ROLE tenantgate_app SUPERUSER")
    try:
        report = await run_doctor(env, app_db)
    finally:
        cluster.psql("ALTER ROLE tenantgate_app NOSUPERUSER")
    fails = failing(report)
    assert fails["role.superuser"] == ["tenantgate_app"]
    assert "ALTER ROLE tenantgate_app NOSUPERUSER;" in report.by_check("role.superuser")[0].fix
    # as a superuser it also bypasses RLS and reaches server files: doctor says so
    assert "rls.effective" in fails and "function.server_access" in fails
    assert "FAIL  role.superuser" in report.to_text()


@pytest.mark.parametrize("attribute,check", [("BYPASSRLS", "role.bypassrls"), ("CREATEROLE", "role.createrole"),
                                             ("CREATEDB", "role.createdb"), ("REPLICATION", "role.replication")])
async def test_role_attributes(env, app_db, attribute, check):
    cluster, _ = env
    cluster.psql(f"ALTER ROLE tenantgate_app {attribute}")
    try:
        report = await run_doctor(env, app_db)
    finally:
        cluster.psql(f"ALTER ROLE tenantgate_app NO{attribute}")
    assert check in failing(report)


@pytest.mark.parametrize("role", ["pg_read_server_files", "pg_write_server_files", "pg_execute_server_program",
                                  "pg_read_all_data"])
async def test_dangerous_membership(env, app_db, role):
    cluster, _ = env
    cluster.psql(f"GRANT {role} TO tenantgate_app")
    try:
        report = await run_doctor(env, app_db)
    finally:
        cluster.psql(f"REVOKE {role} FROM tenantgate_app")
    assert f"role.member.{role}" in failing(report)


async def test_membership_through_an_intermediate_role(env, app_db):
    cluster, _ = env
    cluster.psql("CREATE ROLE files_group; GRANT pg_read_server_files TO files_group; GRANT files_group TO tenantgate_app")
    try:
        report = await run_doctor(env, app_db)
    finally:
        cluster.psql("DROP ROLE files_group")
    assert "role.member.pg_read_server_files" in failing(report)


async def test_dropped_rls_policies(env, app_db):
    cluster, _ = env
    cluster.psql("DROP POLICY tenantgate_tenant_access ON orders; DROP POLICY tenantgate_tenant_isolation ON orders",
                 database=app_db)
    report = await run_doctor(env, app_db)
    assert failing(report) == {"rls.policy": ["public.orders"]}


async def test_rls_not_forced(env, app_db):
    cluster, _ = env
    cluster.psql("ALTER TABLE orders NO FORCE ROW LEVEL SECURITY", database=app_db)
    report = await run_doctor(env, app_db)
    assert failing(report) == {"rls.forced": ["public.orders"]}
    assert report.failures[0].fix.startswith("ALTER TABLE public.orders FORCE ROW LEVEL SECURITY;")


async def test_rls_disabled(env, app_db):
    cluster, _ = env
    cluster.psql("ALTER TABLE customers DISABLE ROW LEVEL SECURITY", database=app_db)
    report = await run_doctor(env, app_db)
    assert failing(report) == {"rls.enabled": ["public.customers"], "rls.effective": ["public.customers"]}


async def test_widening_permissive_policy(env, app_db):
    cluster, _ = env
    # with the restrictive backstop in place an extra permissive policy cannot widen access, but the
    # backstop is only what tenantgate installed: nothing permissive may stand beside it (issue 13)
    cluster.psql("CREATE POLICY everyone ON customers USING (true)", database=app_db)
    report = await run_doctor(env, app_db)
    assert failing(report) == {"rls.policy": ["public.customers"]}
    assert "everyone" in report.by_check("rls.policy")[0].message or any(
        "everyone" in f.message for f in report.failures)
    # ...without it, it can
    cluster.psql("DROP POLICY tenantgate_tenant_isolation ON customers", database=app_db)
    report = await run_doctor(env, app_db)
    assert failing(report) == {"rls.policy": ["public.customers"], "rls.effective": ["public.customers"]}
    assert "everyone" in report.by_check("rls.policy")[0].message or any(
        "everyone" in f.message for f in report.failures)


async def test_unique_constraint_without_tenant_column(env, app_db):
    cluster, _ = env
    cluster.psql("ALTER TABLE customers ADD CONSTRAINT customers_name_key UNIQUE (name)", database=app_db)
    report = await run_doctor(env, app_db)
    assert failing(report) == {"unique.no_tenant": ["public.customers"]}
    finding = [f for f in report.failures if f.check == "unique.no_tenant"][0]
    assert "customers_name_key (name)" in finding.message
    assert finding.fix == ("ALTER TABLE public.customers DROP CONSTRAINT customers_name_key, "
                           "ADD CONSTRAINT customers_name_key UNIQUE (tenant_id, name);")


async def test_unique_index_without_tenant_column(env, app_db):
    cluster, _ = env
    cluster.psql("CREATE UNIQUE INDEX orders_id_uq ON orders (id)", database=app_db)
    report = await run_doctor(env, app_db)
    assert failing(report) == {"unique.no_tenant": ["public.orders"]}
    assert "unique index orders_id_uq (id)" in report.failures[0].message


async def test_identity_only_primary_key_is_a_warning(env):
    cluster, _ = env
    name = f"ident_{uuid.uuid4().hex[:8]}"
    cluster.psql(f"CREATE DATABASE {name}")
    cluster.psql("CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, tenant_id text NOT NULL);"
                 "CREATE INDEX ON events (tenant_id)", database=name)
    apply_bootstrap(socket_admin_dsn(cluster, name), APP_PASSWORD, CONTROL_PASSWORD)
    report = await run_doctor(env, name)
    assert report.ok, report.to_text()
    assert [f.subject for f in report.warnings if f.check == "unique.identity_only"] == ["public.events"]


async def test_missing_tenant_index(env):
    cluster, _ = env
    name = f"noidx_{uuid.uuid4().hex[:8]}"
    cluster.psql(f"CREATE DATABASE {name}")
    cluster.psql("CREATE TABLE notes (id int, tenant_id text, body text, PRIMARY KEY (id, tenant_id));"
                 "CREATE INDEX notes_tenant_idx ON notes (tenant_id)", database=name)
    apply_bootstrap(socket_admin_dsn(cluster, name), APP_PASSWORD, CONTROL_PASSWORD)
    assert (await run_doctor(env, name)).ok
    cluster.psql("DROP INDEX notes_tenant_idx", database=name)
    report = await run_doctor(env, name)
    assert failing(report) == {"index.tenant_leading": ["public.notes"]}
    assert report.failures[0].fix == "CREATE INDEX CONCURRENTLY ON public.notes (tenant_id);"


async def test_create_on_public(env, app_db):
    cluster, _ = env
    cluster.psql("GRANT CREATE ON SCHEMA public TO PUBLIC", database=app_db)
    report = await run_doctor(env, app_db)
    assert failing(report) == {"schema.create": ["public"]}


async def test_control_schema_privilege(env, app_db):
    cluster, _ = env
    cluster.psql("CREATE TABLE tenantgate_control.grants (id int); GRANT USAGE ON SCHEMA tenantgate_control TO tenantgate_app;"
                 "GRANT SELECT ON tenantgate_control.grants TO tenantgate_app", database=app_db)
    report = await run_doctor(env, app_db)
    assert failing(report) == {"control.privileges": ["tenantgate_control", "tenantgate_control"]}
    assert any("grants" in f.message for f in report.failures)


async def test_tenant_table_owned_by_app_role(env, app_db):
    cluster, _ = env
    cluster.psql("ALTER TABLE order_items OWNER TO tenantgate_app", database=app_db)
    report = await run_doctor(env, app_db)
    assert failing(report) == {"rls.owner": ["public.order_items"]}


async def test_reachable_dangerous_extension(env, app_db):
    cluster, _ = env
    cluster.psql("CREATE EXTENSION dblink", database=app_db)
    report = await run_doctor(env, app_db)
    assert failing(report) == {"extension.dblink": ["dblink"]}
    cluster.psql("DROP EXTENSION dblink; CREATE EXTENSION pg_buffercache", database=app_db)
    report = await run_doctor(env, app_db)  # installed, but its functions are superuser-only: a warning
    assert report.ok, report.to_text()
    assert "extension.pg_buffercache" in {f.check for f in report.warnings}
    cluster.psql("CREATE EXTENSION adminpack", database=app_db)  # pg_file_rename(text, text) is PUBLIC
    assert "extension.adminpack" in failing(await run_doctor(env, app_db))


async def test_server_file_function_granted(env, app_db):
    cluster, _ = env
    cluster.psql("GRANT EXECUTE ON FUNCTION pg_read_file(text) TO tenantgate_app", database=app_db)
    report = await run_doctor(env, app_db)
    assert failing(report) == {"function.server_access": ["pg_read_file(text)"]}


async def test_md5_password_storage(env, app_db):
    cluster, _ = env
    cluster.psql("SET password_encryption = 'md5'; ALTER ROLE tenantgate_control PASSWORD 'x'")
    try:
        report = await run_doctor(env, app_db)
    finally:
        cluster.psql(f"ALTER ROLE tenantgate_control PASSWORD '{scram_verifier(CONTROL_PASSWORD)}'")
    assert failing(report) == {"role.password": ["tenantgate_control"]}


async def test_wrong_tenant_column_finds_no_tables(env, app_db):
    cluster, relay = env
    report = await diagnose(relay.dsn("tenantgate_app", APP_PASSWORD, app_db), tenant_column="org_id")
    assert "tenant_tables" in failing(report)


def _hba_lines(cluster) -> list[str]:
    return (cluster.datadir / "pg_hba.conf").read_text().splitlines()


async def test_open_and_trust_hba_lines(env, app_db):
    cluster, _ = env
    original = (cluster.datadir / "pg_hba.conf").read_text()
    lines = _hba_lines(cluster)
    first_reject = next(i for i, ln in enumerate(lines) if ln.startswith("host ") and ln.endswith("reject"))
    lines[first_reject:first_reject] = [
        "host all all 10.0.0.0/8 trust",
        "hostssl all tenantgate_app 0.0.0.0/0 scram-sha-256",
        "host all all 192.168.0.0/16 password",
    ]
    try:
        (cluster.datadir / "pg_hba.conf").write_text("\n".join(lines) + "\n")
        cluster.reload()
        report = await run_doctor(env, app_db)
    finally:
        (cluster.datadir / "pg_hba.conf").write_text(original)
        cluster.reload()
    fails = failing(report)
    assert set(fails) == {"hba.trust", "hba.open", "hba.password"}
    assert any("line" in s for s in fails["hba.open"])
    # lines after the catch-all rejects are unreachable and not reported
    assert (await run_doctor(env, app_db)).ok


async def test_ssl_off(env, app_db):
    cluster, _ = env
    cluster.psql("ALTER SYSTEM SET ssl = off")
    cluster.reload()
    try:
        report = await run_doctor(env, app_db, admin=False, sslmode="disable")
    finally:
        cluster.psql("ALTER SYSTEM RESET ssl")
        cluster.reload()
    # without TLS pg_hba's hostssl line does not match: doctor cannot even connect
    assert "connect" in failing(report)
    install_hba(cluster, "127.0.0.2", database="all", local_auth="trust", require_ssl=False)
    cluster.psql("ALTER SYSTEM SET ssl = off")
    cluster.reload()
    try:
        report = await run_doctor(env, app_db, sslmode="disable")
    finally:
        cluster.psql("ALTER SYSTEM RESET ssl")
        cluster.reload()
        install_hba(cluster, "127.0.0.2", database="all", local_auth="trust")
    fails = failing(report)
    assert set(fails) == {"ssl"}
    assert {"hba.nossl", "hba.all_databases"} <= {f.check for f in report.warnings}
