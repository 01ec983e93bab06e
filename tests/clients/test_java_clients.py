"""Java applications on pgjdbc (tests/clients/programs/JdbcApp.java, JdbcPoolingApp.java), run
directly against PostgreSQL as the RLS-bound role and through tenantgate; the transcripts must be
identical (issue 14's conformance suite, see tests/clients/README.md).

Each program is launched as a single source file (``java -cp postgresql.jar JdbcApp.java …``,
Java 11+), so there is no build step.  pgjdbc is Debian's ``libpostgresql-jdbc-java`` (``make test``
installs it when java is present).  Without java the test is skipped; with java but without the
driver jar it fails: the suite would otherwise silently stop covering JDBC.
"""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from .conformance import PROGRAMS, checked_run

LO = 975000  # the id range of JdbcApp.java (975000-975499) and JdbcPoolingApp.java (975500-975999)
PGJDBC_JAR = Path("/usr/share/java/postgresql.jar")
# program: (stack in the "Works with" table, lines its transcript must contain through tenantgate)
PROGRAMS_JAVA = {
    "JdbcApp.java": (
        "pgjdbc (server-prepared statements, batches, reWriteBatchedInserts, timeout and cancel, "
        "DatabaseMetaData, Hibernate-style SQL, savepoints, CopyManager, updatable result sets)",
        ("server prepared true", "rewritten batch [-2, -2, -2, -2]", "failing batch 23505", "timeout 57014",
         "cancel 57014", "savepoint error 23505", "update shared id 1", "other tenant by value []",
         "copy in ok 1", "large object 42501", "listen ERROR 42501", "currentSchema ok",
         "pg_authid 42501", "callable fixed arity ABC", "callable integer 4")),
    "JdbcPoolingApp.java": (
        "pgjdbc, 4 threads (server-prepared statements on pooled backends, interleaved portals, "
        "timeouts in transactions, generated keys)",
        ("thread 3 seen 24 [24|0|23]", "portals [order 1, products [3], order 2, customer 1, order 3, customer 2]",
         "timeout in transaction 57014", "aborted transaction 25P02", "server-prepared again [|42]",
         "rewritten on conflict [-2, -2, -2, -2]")),
}


def jar_version() -> str:
    """Implementation-Version of the driver jar's manifest (``42.5.5``)."""
    with zipfile.ZipFile(PGJDBC_JAR) as jar:
        manifest = jar.read("META-INF/MANIFEST.MF").decode()
    found = re.search(r"^Implementation-Version: (\S+)", manifest, re.M)
    assert found, manifest
    return found.group(1)


def jdbc(dsn: str) -> tuple[str, str, str]:
    """A libpq URL → (JDBC URL, user, password); the query string (sslmode, sslrootcert) carries over."""
    u = urlsplit(dsn)
    url = f"jdbc:postgresql://{u.hostname}:{u.port}{u.path}" + (f"?{u.query}" if u.query else "")
    return url, u.username, u.password


def command(program: str, dsn: str, schema: str) -> list[str]:
    url, user, password = jdbc(dsn)
    # C1 only and the serial collector: a short-lived program starts in half the CPU time on 2 cores
    return ["java", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-cp", str(PGJDBC_JAR), str(PROGRAMS / program),
            url, user, password, schema]


@pytest.mark.skipif(shutil.which("java") is None or shutil.which("javac") is None,
                    reason="no JDK (java and javac) on this machine: a single-file source launch needs both")
@pytest.mark.parametrize("program", sorted(PROGRAMS_JAVA))
def test_jdbc_program_behaves_the_same_direct_and_through_tenantgate(demo, direct_dsn, works_with, program):
    assert PGJDBC_JAR.exists(), (f"java is installed but {PGJDBC_JAR} is missing: "
                                 "apt-get install libpostgresql-jdbc-java (make test does)")
    stack, expected_lines = PROGRAMS_JAVA[program]
    version = jar_version()
    before = globex_rows(demo)
    assert before["customers"], "globex has customers in the demo"
    # the direct run's tables are in schema "direct" (the role's search_path), tenantgate's in "public"
    # (JdbcApp's metadata calls need it)
    direct, proxied = checked_run(works_with, stack, "Java", version, program,
                                  command(program, direct_dsn, "direct"), command(program, demo.app("acme"), "public"))
    # what the program covers really happened through tenantgate
    for line in expected_lines:
        assert line in proxied, line
    if program == "JdbcApp.java":  # the run used that driver
        assert f"driver PostgreSQL JDBC Driver {version}" in proxied, proxied[:300]
    # globex's rows, read as the backend's owner, are untouched (ids 1 and 2 exist in both tenants and
    # are updated and upserted by id through tenantgate), and the program left no rows behind
    assert globex_rows(demo) == before
    with psycopg.connect(demo.admin) as admin:
        assert admin.execute("SELECT count(*) FROM public.customers WHERE customer_id BETWEEN %s AND %s",
                             [LO, LO + 999]).fetchone()[0] == 0


def globex_rows(demo) -> dict:
    with psycopg.connect(demo.admin) as admin:
        return {t: admin.execute(f"SELECT * FROM public.{t} WHERE tenant_id = 'globex' ORDER BY 2, 3").fetchall()
                for t in ("customers", "orders", "order_items")}
