"""Real client programs, run directly against PostgreSQL (an RLS-bound role) and through
tenantgate; their transcripts must be identical (issue 14's conformance suite, first part).

The direct target is schema ``direct`` of the demo's database, made from the same schema file
and seed as the demo's own tables, with role ``rls_acme`` bound to tenant acme by plain
row-level security (and ``tenant_id`` defaulting to acme, as tenantgate fills it in).  Each
program uses a private id range and removes its rows, so both targets start from the seed.
"""

from __future__ import annotations

import difflib
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PROGRAMS = HERE / "programs"
DIRECT_ROLE, DIRECT_PW = "rls_acme", "rls-acme-pw"
TENANT_TABLES = ("customers", "orders", "order_items")


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


def _expected() -> list[dict]:
    return yaml.safe_load((HERE / "expected_differences.yaml").read_text()) or []


def _documented(program: str, line: str) -> bool:
    limitations = (ROOT / "docs" / "limitations.md").read_text()
    for e in _expected():
        if e["program"] == program and e["line"] in line:
            assert e["documented_by"] in limitations, e
            return True
    return False


def _run(cmd: list[str], env_extra: dict | None = None) -> str:
    import os

    env = dict(os.environ, PGCONNECT_TIMEOUT="10")
    env.update(env_extra or {})
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, f"{cmd[:3]} failed:\n{out.stderr[-3000:]}\n{out.stdout[-2000:]}"
    return out.stdout


def _compare(program: str, direct: str, proxied: str) -> None:
    diff = [ln for ln in difflib.unified_diff(direct.splitlines(), proxied.splitlines(), "direct", "tenantgate",
                                              lineterm="", n=0)
            if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    unexplained = [ln for ln in diff if not _documented(program, ln[1:])]
    assert not unexplained, "\n".join(difflib.unified_diff(direct.splitlines(), proxied.splitlines(),
                                                          "direct", "tenantgate", lineterm=""))


@pytest.mark.parametrize("program", ["psycopg3_app.py", "asyncpg_app.py", "sqlalchemy_app.py"])
def test_python_program_behaves_the_same_direct_and_through_tenantgate(demo, direct_dsn, program):
    direct = _run([sys.executable, str(PROGRAMS / program), direct_dsn])
    proxied = _run([sys.executable, str(PROGRAMS / program), demo.app("acme")])
    assert proxied.rstrip().endswith("done") and "Wile E. Coyote" in proxied  # it ran, on acme's rows
    assert "Hank Scorpio" not in proxied and "Homer Simpson" not in proxied  # never globex's
    _compare(program, direct, proxied)


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")
def test_psql_session_behaves_the_same_direct_and_through_tenantgate(demo, direct_dsn):
    script = str(PROGRAMS / "psql_session.sql")
    direct = _run(["psql", direct_dsn, "-X", "-v", "ON_ERROR_STOP=1", "-f", script])
    proxied = _run(["psql", demo.app("acme"), "-X", "-v", "ON_ERROR_STOP=1", "-f", script])
    assert "Wile E. Coyote" in proxied and "orders 3" in proxied
    # \dt and \di name the schema: direct's tables live in schema "direct"
    _compare("psql_session.sql", direct.replace("direct", "public"), proxied)


@pytest.mark.skipif(shutil.which("pgbench") is None, reason="pgbench is not installed")
@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_custom_script_with_unspaced_parameters(demo, tmp_path, mode):
    script = tmp_path / "bench.sql"
    script.write_text("\\set a random(1, 2)\n\\set b random(1, 3)\n"
                      "SELECT name FROM customers WHERE customer_id IN (:a,:b);\n"
                      "SELECT count(*) FROM orders WHERE order_id IN (:a,:b,:a) AND status IN ('open','shipped');\n")
    url = urlsplit(demo.app("acme"))
    out = _run(["pgbench", "-n", "-M", mode, "-c", "2", "-t", "20", "-f", str(script), "-h", url.hostname,
                "-p", str(url.port), "-U", url.username, "app"], {"PGPASSWORD": url.password, "PGSSLMODE": "disable"})
    assert "number of transactions actually processed: 40/40" in out, out
    assert "number of failed transactions: 0" in out, out
