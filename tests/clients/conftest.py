"""Fixtures of the client conformance suite: the direct target (an RLS-bound role) and the
recorder of the "Works with" table (see ``works_with.py``)."""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest

from .conformance import DIRECT_PW, DIRECT_ROLE, ROOT, TENANT_TABLES, Recorder


@pytest.fixture(scope="module")
def direct_dsn(demo):
    """Schema ``direct`` with the demo schema and seed, and role rls_acme bound to acme by RLS."""
    schema_sql = (ROOT / "proxy" / "sql" / "demo_schema.sql").read_text()
    with psycopg.connect(demo.admin, autocommit=True) as a:
        a.execute("DROP SCHEMA IF EXISTS direct CASCADE")
        a.execute("CREATE SCHEMA direct")
        a.execute("SET search_path = direct")
        a.execute(schema_sql)
        if not a.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [DIRECT_ROLE]).fetchone():
            a.execute(f"CREATE ROLE {DIRECT_ROLE} LOGIN PASSWORD '{DIRECT_PW}'")
        a.execute(f"ALTER ROLE {DIRECT_ROLE} SET search_path = direct")
        a.execute(f"GRANT USAGE ON SCHEMA direct TO {DIRECT_ROLE}")
        a.execute(f"GRANT SELECT ON direct.products TO {DIRECT_ROLE}")
        a.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA direct TO {DIRECT_ROLE}")
        for t in TENANT_TABLES:
            a.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON direct.{t} TO {DIRECT_ROLE}")
            a.execute(f"ALTER TABLE direct.{t} ALTER COLUMN tenant_id SET DEFAULT 'acme'")
            a.execute(f"ALTER TABLE direct.{t} ENABLE ROW LEVEL SECURITY")
            a.execute(f"ALTER TABLE direct.{t} FORCE ROW LEVEL SECURITY")
            a.execute(f"CREATE POLICY acme_only ON direct.{t} TO {DIRECT_ROLE} "
                      "USING (tenant_id = 'acme') WITH CHECK (tenant_id = 'acme')")
    url = urlsplit(demo.admin)
    netloc = f"{DIRECT_ROLE}:{quote(DIRECT_PW, safe='')}@{url.hostname}:{url.port}"
    yield urlunsplit((url.scheme, netloc, url.path, url.query, url.fragment))
    with psycopg.connect(demo.admin, autocommit=True) as a:
        a.execute("DROP SCHEMA IF EXISTS direct CASCADE")
        a.execute(f"DROP OWNED BY {DIRECT_ROLE}")
        a.execute(f"DROP ROLE IF EXISTS {DIRECT_ROLE}")


@pytest.fixture(scope="session")
def works_with():
    """Collects one row per client stack for the README's "Works with" table."""
    recorder = Recorder()
    yield recorder
    recorder.save()
