"""Real client programs, run directly against PostgreSQL (an RLS-bound role) and through
tenantgate; their transcripts must be identical (issue 14's conformance suite).

The direct target is schema ``direct`` of the demo's database, made from the same schema file
and seed as the demo's own tables, with role ``rls_acme`` bound to tenant acme by plain
row-level security (and ``tenant_id`` defaulting to acme, as tenantgate fills it in).  Each
program uses a private id range and removes its rows, so both targets start from the seed.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib.metadata import version
from urllib.parse import urlsplit

import pytest

from .conformance import PROGRAMS, checked_run, run

PYTHON_PROGRAMS = {
    "psycopg3_app.py": ("psycopg 3 (sync, async, pipeline, COPY, psycopg_pool)", "psycopg"),
    "asyncpg_app.py": ("asyncpg (create_pool, prepare, executemany, COPY, cursors)", "asyncpg"),
    "sqlalchemy_app.py": ("SQLAlchemy 2 ORM on psycopg 3", "sqlalchemy"),
}


@pytest.mark.parametrize("program", sorted(PYTHON_PROGRAMS))
def test_python_program_behaves_the_same_direct_and_through_tenantgate(demo, direct_dsn, works_with, program):
    stack, dist = PYTHON_PROGRAMS[program]
    checked_run(works_with, stack, "Python", version(dist), program,
                [sys.executable, str(PROGRAMS / program), direct_dsn],
                [sys.executable, str(PROGRAMS / program), demo.app("acme")])


def _tool_version(tool: str) -> str:
    """``psql (PostgreSQL) 15.18 (Debian …)`` → ``15.18``."""
    return subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.split()[2]


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")
def test_psql_session_behaves_the_same_direct_and_through_tenantgate(demo, direct_dsn, works_with):
    script = str(PROGRAMS / "psql_session.sql")
    direct = run(["psql", direct_dsn, "-X", "-v", "ON_ERROR_STOP=1", "-f", script])
    proxied = run(["psql", demo.app("acme"), "-X", "-v", "ON_ERROR_STOP=1", "-f", script])
    assert "Wile E. Coyote" in proxied and "orders 3" in proxied
    assert "Hank Scorpio" not in proxied
    # \dt and \di name the schema: direct's tables live in schema "direct"
    from .conformance import compare
    direct = direct.replace("direct", "public")
    try:
        compare("psql_session.sql", direct, proxied)
    except AssertionError:
        works_with.failed("psql (\\d, \\dt, \\d+, \\di, \\x, \\copy, \\gset)", "command line", _tool_version("psql"))
        raise
    works_with.record("psql (\\d, \\dt, \\d+, \\di, \\x, \\copy, \\gset)", "command line", _tool_version("psql"),
                      direct, proxied)


@pytest.mark.skipif(shutil.which("pgbench") is None, reason="pgbench is not installed")
@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_custom_script_with_unspaced_parameters(demo, tmp_path, works_with, mode):
    script = tmp_path / "bench.sql"
    script.write_text("\\set a random(1, 2)\n\\set b random(1, 3)\n"
                      "SELECT name FROM customers WHERE customer_id IN (:a,:b);\n"
                      "SELECT count(*) FROM orders WHERE order_id IN (:a,:b,:a) AND status IN ('open','shipped');\n")
    url = urlsplit(demo.app("acme"))
    out = run(["pgbench", "-n", "-M", mode, "-c", "2", "-t", "20", "-f", str(script), "-h", url.hostname,
               "-p", str(url.port), "-U", url.username, "app"], {"PGPASSWORD": url.password, "PGSSLMODE": "disable"})
    assert "number of transactions actually processed: 40/40" in out, out
    assert "number of failed transactions: 0" in out, out
    works_with.record(f"pgbench -M {mode} (custom script, unspaced parameters)", "command line",
                      _tool_version("pgbench"))
