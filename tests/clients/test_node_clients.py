"""Node.js client stacks in the conformance suite (issue 14): node-postgres (``pg`` with
``pg-cursor`` and ``pg-copy-streams``) and Postgres.js (porsager's ``postgres``).

Each program runs directly against PostgreSQL as the RLS-bound role and through tenantgate as
acme's application user (``node program.js DSN``); the transcripts must match (see
conformance.py).  The modules are pinned in tests/clients/node/package-lock.json and installed
by ``make install``/``make test`` (``npm ci --prefix tests/clients/node``) when node and npm
exist.  Without node the tests are skipped; with node but without the installed modules they
fail, since that is a broken install, not a missing platform.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import psycopg
import pytest

from .conformance import HERE, PROGRAMS, TENANT_TABLES, checked_run

NODE_DIR = HERE / "node"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node (Node.js) is not installed")

# Lines each program must print through tenantgate: the features it exists to exercise worked.
MUST_SEE = {
    "node_pg_app.js": ["params unspaced [[1],[3]]", 'after tx [[973001,"shipped"]]',
                       "cursor batches [[1,2,3],[4,5,6],[7,8,9]]", "copy in ok 2",
                       'copy in rows [[20,"copied","copy@pg.example"],[21,"copied too",null]]',
                       '"0:Wile E. Coyote","0:Road Runner","0:pg one","1:Wile E. Coyote"',
                       "unique violation 23505 customers_pkey", "aborted 25P02", "statement_timeout 57014",
                       'multi-statement [[[2]],[["open"],["shipped"],["open"]]]', "big parameter [[300000]]",
                       'set local [["1min"]]', 'after timeout [["300ms","node_pg_app"]]',
                       'binary [[1,"Wile E. Coyote",2.5,true],[2,"Road Runner",2.5,true]]',
                       'settings [["1234ms","Asia/Tokyo"]] [["1234ms",'],
    "postgres_js_app.js": ["in list [[1,\"open\"],[3,\"open\"]]", "multi-row insert 3 [2,3,4]",
                           "in savepoint [[974001],[974002]]", 'after begin [[974001,"shipped"]]',
                           "begin failed 22012", 'not committed [["pjs one"]]',
                           "unique violation 23505 customers_pkey", 'unprepared [["Road Runner"],["pjs 4"]]',
                           "deleted 4", 'update from values [[2,"pjs two"],[3,"pjs three"]]',
                           "read only write 25006", 'reserved [["4321ms"]]', "describe [23]",
                           "cursor iterator [[1],[2]]", "canceled 57014", "listen ERROR 42501",
                           'copy in ok [[500,"copied"],[501,"copied too"]]',
                           "pipelined " + ",".join(["Wile,Road"] * 20),
                           'pipelined with error [[{"a":1}],"22012",[{"customerId":2,"orderId":3}]]'],
}

# program -> (stack, the modules whose versions the run reports)
NODE_PROGRAMS = {
    "node_pg_app.js": ("node-postgres pg (Pool, options, statement_timeout, savepoints, named prepared statements, "
                       "binary) with pg-cursor and pg-copy-streams", ("pg", "pg-cursor", "pg-copy-streams")),
    "postgres_js_app.js": ("Postgres.js (sql helpers, begin/savepoint, cursor, COPY streams, pipelining, cancel, "
                           "prepare on and off)", ("postgres",)),
}


def installed_version(module: str) -> str:
    """The version in the installed module's package.json; a missing module fails the test."""
    manifest = NODE_DIR / "node_modules" / module / "package.json"
    if not manifest.exists():
        pytest.fail(f"node is installed but the Node.js module {module!r} is not ({manifest} is missing): "
                    f"run `npm ci --prefix {NODE_DIR.relative_to(HERE.parents[1])}` (make install does)")
    return json.loads(manifest.read_text())["version"]


def test_installed_versions_are_the_pinned_ones():
    """package-lock.json pins every module; node_modules must hold exactly those versions."""
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    pinned = json.loads((NODE_DIR / "package.json").read_text())["dependencies"]
    for module, version in pinned.items():
        assert lock["packages"][f"node_modules/{module}"]["version"] == version
        assert installed_version(module) == version, f"{module}: run npm ci --prefix tests/clients/node"


@pytest.mark.parametrize("program", sorted(NODE_PROGRAMS))
def test_node_program_behaves_the_same_direct_and_through_tenantgate(demo, direct_dsn, works_with, program):
    stack, modules = NODE_PROGRAMS[program]
    versions = [installed_version(m) for m in modules]
    version = versions[0] if len(modules) == 1 else ", ".join(f"{m} {v}" for m, v in zip(modules, versions))
    node_version = subprocess.run([NODE, "--version"], capture_output=True, text=True).stdout.strip()
    before = _other_tenants_rows(demo)
    direct, proxied = checked_run(works_with, stack, "Node.js", f"{version} (node {node_version})", program,
                                  [NODE, str(PROGRAMS / program), direct_dsn],
                                  [NODE, str(PROGRAMS / program), demo.app("acme")])
    for line in MUST_SEE[program]:
        assert line in proxied, f"{line!r} missing through tenantgate:\n{proxied}"
    # the program's inserts, updates, COPY and deletes never reached another tenant's rows
    assert _other_tenants_rows(demo) == before
    assert before["customers"], "globex's seed rows are missing: the check above would prove nothing"


def _other_tenants_rows(demo) -> dict[str, list[tuple]]:
    """Every row of the demo's tenant tables that is not acme's, read as the backend admin."""
    with psycopg.connect(demo.admin) as c:
        return {t: c.execute(f"SELECT * FROM public.{t} WHERE tenant_id <> 'acme' ORDER BY 1, 2, 3").fetchall()
                for t in TENANT_TABLES}
