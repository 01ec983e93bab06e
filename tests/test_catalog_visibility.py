"""What a tenant sees of the catalogs that list the whole server (issue 14 items 5 and 9;
proxy/policy/catalog_views.py): psql's \\dn, \\l and \\du, pgjdbc's pg_settings read."""

from __future__ import annotations

import os
import subprocess
from urllib.parse import urlsplit

import psycopg
import pytest


def _psql(demo, tenant: str, command: str) -> str:
    url = urlsplit(demo.app(tenant))
    env = dict(os.environ, PGPASSWORD=url.password, PGSSLMODE="disable")
    out = subprocess.run(["psql", "-h", url.hostname, "-p", str(url.port), "-U", url.username, "-d", "app",
                          "-XAtc", command], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_psql_dn_does_not_list_tenantgates_schemas(demo):
    with psycopg.connect(demo.admin) as a:  # they exist on the server
        assert a.execute("SELECT count(*) FROM pg_namespace WHERE nspname ~ '^tenantgate_'").fetchone()[0] >= 2
    schemas = _psql(demo, "acme", r"\dn")
    assert "public" in schemas
    assert "tenantgate" not in schemas


def test_psql_l_lists_only_the_connected_database(demo):
    with psycopg.connect(demo.admin) as a:
        assert a.execute("SELECT count(*) FROM pg_database").fetchone()[0] > 1
    rows = [line.split("|")[0] for line in _psql(demo, "globex", r"\l").splitlines() if "|" in line]
    assert rows == ["app"]


def test_psql_du_and_pg_roles_show_only_the_sessions_role(demo):
    assert "tenantgate_control" not in _psql(demo, "acme", r"\du")
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        names = {r[0] for r in conn.execute("SELECT rolname FROM pg_roles")}
        assert "tenantgate_control" not in names and "postgres" not in names
        assert conn.execute("SELECT current_user").fetchone()[0] in names
        assert {r[0] for r in conn.execute("SELECT usename FROM pg_catalog.pg_user u")} <= names


def test_describe_still_works(demo):
    out = _psql(demo, "acme", r"\d customers")
    assert "tenant_id" in out and "customer_id" in out
    assert "customers" in _psql(demo, "acme", r"\dt")


def test_pg_settings_shows_client_visible_parameters_only(demo):
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        # pgjdbc DatabaseMetaData.getImportedKeys
        assert conn.execute("SELECT setting FROM pg_catalog.pg_settings WHERE name = 'max_index_keys'").fetchone() \
            == ("32",)
        names = {r[0] for r in conn.execute("SELECT s.name FROM pg_settings AS s")}
        assert {"server_version", "statement_timeout", "work_mem", "TimeZone"} <= names
        hidden = {"data_directory", "config_file", "hba_file", "archive_command", "restore_command", "ssl_cert_file",
                  "ssl_key_file", "listen_addresses", "port", "search_path", "log_directory", "tenantgate.tenant_id",
                  "primary_conninfo", "shared_preload_libraries", "dynamic_library_path"}
        assert not names & hidden
        assert not [n for n in names if "." in n]


@pytest.mark.parametrize("sql", [
    "UPDATE pg_settings SET setting = 'x' WHERE name = 'search_path'",
    "SHOW ALL", "SHOW archive_command", "SELECT current_setting('archive_command')",
    "SELECT current_setting('ssl_key_file', true)",
    "DELETE FROM pg_namespace",
    "SELECT * FROM pg_authid",
])
def test_writes_and_hidden_catalogs_stay_refused(demo, sql):
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(sql)


def test_per_role_settings_are_not_readable_through_the_role_catalogs(demo):
    """Review 2: ALTER ROLE ... SET app.jwt_secret was hidden from SHOW and current_setting(),
    and readable as pg_roles.rolconfig / pg_user.useconfig."""
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        role = conn.execute("SELECT current_user").fetchone()[0]
    with psycopg.connect(demo.admin, autocommit=True) as admin:
        admin.execute(f'ALTER ROLE "{role}" SET app.jwt_secret = \'sekrit-role\'')
    try:
        with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
            rows = conn.execute("SELECT rolname, rolconfig FROM pg_roles WHERE rolname = current_user").fetchall()
            assert rows == [(role, None)]
            assert conn.execute("SELECT r.* FROM pg_catalog.pg_roles r WHERE r.rolname = current_user") \
                .fetchone()[11] is None
            assert conn.execute("SELECT useconfig FROM pg_user WHERE usename = current_user").fetchone() == (None,)
        with psycopg.connect(demo.admin, autocommit=True) as admin:  # it is there
            assert admin.execute("SELECT rolconfig FROM pg_roles WHERE rolname = %s", [role]).fetchone()[0] \
                == ["app.jwt_secret=sekrit-role"]
    finally:
        with psycopg.connect(demo.admin, autocommit=True) as admin:
            admin.execute(f'ALTER ROLE "{role}" RESET app.jwt_secret')
