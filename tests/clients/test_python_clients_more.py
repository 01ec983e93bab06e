"""More Python stacks in the client conformance suite (issue 14): psycopg2, SQLAlchemy on asyncpg
and on psycopg2, Django on psycopg 3 (server-side and client-side binding) and on psycopg2.

Each program runs directly against PostgreSQL as the RLS-bound role and through tenantgate as
acme's application user; the transcripts must be identical but for the documented differences
(``expected_differences.yaml``).  See test_clients.py for the frame.
"""

from __future__ import annotations

import sys
from importlib.metadata import version

import psycopg
import pytest

from .conformance import PROGRAMS, TENANT_TABLES, checked_run


def _versions(*dists: str) -> str:
    """``SQLAlchemy 2.1.9, asyncpg 0.32.0`` — the real versions this run used."""
    return ", ".join(f"{d} {version(d)}" for d in dists)


SA = "reflection, selectinload, savepoints, upserts, streaming, INSERT … SELECT, RETURNING"
DJ = "inspectdb, bulk_create/bulk_update, atomic savepoints, iterator, aggregation, window functions"
# id: (program, its arguments after the DSN, stack name for the "Works with" table, distributions)
RUNS = {
    "psycopg2": ("psycopg2_app.py", [],
                 "psycopg2 (execute_values, copy_from/copy_to/copy_expert, named and WITH HOLD cursors, "
                 "savepoints, read-only sessions)", ("psycopg2-binary",)),
    "sqlalchemy-asyncpg": ("sqlalchemy_variants_app.py", ["postgresql+asyncpg"],
                           f"SQLAlchemy 2 on asyncpg (AsyncSession; {SA})", ("SQLAlchemy", "asyncpg")),
    "sqlalchemy-psycopg2": ("sqlalchemy_variants_app.py", ["postgresql+psycopg2"],
                            f"SQLAlchemy 2 on psycopg2 ({SA})", ("SQLAlchemy", "psycopg2-binary")),
    "django-server-binding": ("django_app.py", ["server-binding"],
                              f"Django ORM on psycopg 3, server-side binding and prepared statements ({DJ})",
                              ("Django", "psycopg")),
    "django-client-binding": ("django_app.py", ["client-binding"],
                              f"Django ORM on psycopg 3, client-side binding ({DJ})", ("Django", "psycopg")),
    "django-psycopg2": ("django_app.py", ["psycopg2"], f"Django ORM on psycopg2 ({DJ})", ("Django", "psycopg2-binary")),
}


def _rows(admin_dsn: str) -> dict[str, list[tuple]]:
    """Every row of the tenant tables, per schema and table, as PostgreSQL's superuser sees them."""
    with psycopg.connect(admin_dsn) as a:
        return {f"{schema}.{t}": a.execute(f"SELECT * FROM {schema}.{t} ORDER BY 1, 2, 3").fetchall()
                for schema in ("public", "direct") for t in TENANT_TABLES}


@pytest.mark.parametrize("run_id", sorted(RUNS))
def test_python_program_behaves_the_same_direct_and_through_tenantgate(demo, direct_dsn, works_with, run_id):
    program, args, stack, dists = RUNS[run_id]
    before = _rows(demo.admin)
    checked_run(works_with, stack, "Python", _versions(*dists), program,
                [sys.executable, str(PROGRAMS / program), direct_dsn, *args],
                [sys.executable, str(PROGRAMS / program), demo.app("acme"), *args])
    # the program cleaned up after itself, and never touched globex's rows
    assert _rows(demo.admin) == before
    assert any(r[0] == "globex" for r in before["public.customers"])
