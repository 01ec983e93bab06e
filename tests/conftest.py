"""Test harness: one throwaway PostgreSQL 15 cluster for the whole test session.

Each test module that needs a database creates its own database in it (see the
``fresh_db`` fixture factory) so modules do not see each other's tables.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from proxy.pgcluster import PG_BIN, PgCluster, make_cluster


def _require_pg() -> None:
    if not (PG_BIN / "postgres").exists():
        pytest.exit(f"PostgreSQL 15 server binaries missing at {PG_BIN} (make test installs them)", returncode=3)


@pytest.fixture(scope="session")
def pg_base_dir():
    d = Path(tempfile.mkdtemp(prefix="tenantgate-test-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def pg(pg_base_dir) -> PgCluster:
    """The session's PostgreSQL cluster (superuser: cluster.admin_dsn)."""
    _require_pg()
    cluster = make_cluster(pg_base_dir, "main")
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def make_db(pg):
    """Factory: make_db(prefix) -> (dbname, superuser dsn) of a fresh, empty database."""

    def _make(prefix: str = "t") -> tuple[str, str]:
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        pg.psql(f'CREATE DATABASE "{name}"')
        return name, pg.dsn(database=name)

    return _make


# One `tenantgate demo` for the whole session (end-to-end tests use it).
from support.demo import demo  # noqa: E402,F401

import logging  # noqa: E402

from support import crash_watch  # noqa: E402

logging.getLogger().addHandler(crash_watch.TracebackRecorder())


def pytest_configure(config):
    config.addinivalue_line("markers", "allow_tracebacks(reason): the test provokes an internal error on purpose")


@pytest.fixture(autouse=True)
def no_unhandled_exceptions(request):
    """Fail the test when the proxy had an unhandled exception or logged a traceback meanwhile
    (see crash_watch): an invisible crash is a bug, not a pass."""
    start = crash_watch.mark()
    yield
    problems = crash_watch.new_problems(start)
    if problems and request.node.get_closest_marker("allow_tracebacks") is None:
        pytest.fail("unhandled exception or traceback in the proxy during this test:\n" + "\n---\n".join(
            p[:4000] for p in problems[:5]), pytrace=False)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the skip count and each skip's reason, so a skip never goes unnoticed."""
    skipped = terminalreporter.stats.get("skipped", [])
    terminalreporter.write_line(f"tenantgate: skipped: {len(skipped)}")
    for rep in skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        terminalreporter.write_line(f"  skipped {rep.nodeid}: {reason}")
