"""Capture the catalog queries real clients send, into ``tests/data/client_catalog_queries.sql``.

Usage (from the repository root; needs the PostgreSQL 15 binaries, run as root or postgres)::

    .venv/bin/python tests/data/capture_client_catalog_queries.py

It starts a throwaway cluster with ``log_statement = all``, creates a small
schema (tables with foreign keys, indexes, a check constraint, comments, an
enum, a composite type, a view), then drives:

* psql (``-c``): ``\\d``, ``\\d+``, ``\\dt``, ``\\dt+``, ``\\d <table>``, ``\\d+ <table>``,
  ``\\x``, ``\\l``, ``\\dn``, ``\\di``, ``\\dv``, ``\\ds``, ``\\dT``, ``\\df``;
* psql interactively through a pseudo-terminal, pressing TAB after partial
  table, column and schema names (tab completion);
* asyncpg: reading enum, composite, array and domain values (type introspection);
* SQLAlchemy 2 (psycopg 3): ``Inspector`` reflection of every kind and
  ``MetaData.reflect``.

Every statement the server logged is written, de-duplicated, with the client
that sent it.  tests/test_allowlist.py runs each one through the checker.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from proxy.pgcluster import make_cluster  # noqa: E402

OUT = Path(__file__).with_name("client_catalog_queries.sql")
PREFIX = "<<tg %a>> "

SCHEMA = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE money_pair AS (amount numeric, currency text);
CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0);
CREATE TABLE customers (
    id serial PRIMARY KEY, tenant_id text NOT NULL, name text NOT NULL, mood mood,
    tags text[], price money_pair, qty positive_int, UNIQUE (tenant_id, name));
COMMENT ON TABLE customers IS 'customers of a tenant';
COMMENT ON COLUMN customers.name IS 'display name';
CREATE TABLE orders (
    id bigserial PRIMARY KEY, tenant_id text NOT NULL,
    customer_id integer NOT NULL REFERENCES customers(id) ON DELETE CASCADE,
    total numeric(12,2) CHECK (total >= 0), created timestamptz DEFAULT now());
CREATE INDEX orders_tenant_customer ON orders (tenant_id, customer_id);
CREATE VIEW big_orders AS SELECT * FROM orders WHERE total > 100;
INSERT INTO customers (tenant_id, name, mood, tags, price, qty) VALUES ('acme', 'a', 'ok', '{x,y}', (1.5,'EUR'), 3);
"""

PSQL_COMMANDS = [r"\d", r"\d+", r"\dt", r"\dt+", r"\d customers", r"\d+ customers", r"\d+ orders", r"\d big_orders",
                 r"\x", r"\l", r"\dn", r"\di", r"\dv", r"\ds", r"\dT", r"\df"]
TAB_INPUTS = ["SELECT * FROM cust\t\t", "SELECT * FROM customers WHERE na\t\t", "\\d ord\t\t", "SELECT * FROM pub\t\t",
              "INSERT INTO orders (\t\t", "UPDATE cu\t\t", "SELECT * FROM \t\t"]
# Not captured: `SET <TAB>` completes from pg_settings, which rules/catalogs.yaml denies on purpose.


def run_psql(cluster, db: str, command: str) -> None:
    env = dict(os.environ, PGAPPNAME=f"psql {command}", PGPASSWORD=cluster.superuser_password)
    subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", "-d", db, "-c", command],
                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_psql_tab_completion(cluster, db: str) -> None:
    import pty
    import select

    env = dict(os.environ, PGAPPNAME="psql tab completion", PGPASSWORD=cluster.superuser_password, TERM="xterm")
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe("psql", ["psql", "-X", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres", "-d", db], env)

    def drain(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                try:
                    os.read(fd, 65536)
                except OSError:
                    return

    drain(1.0)
    for text in TAB_INPUTS:
        os.write(fd, text.encode())
        drain(0.8)
        os.write(fd, b"\x03")  # Ctrl-C: discard the line
        drain(0.3)
    os.write(fd, b"\\q\n")
    drain(0.5)
    os.waitpid(pid, 0)


async def run_asyncpg(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, server_settings={"application_name": "asyncpg type introspection"})
    try:
        await conn.fetch("SELECT mood, tags, price, qty FROM customers")
        await conn.fetch("SELECT $1::mood, $2::money_pair[]", "ok", [("1", "EUR")])
    finally:
        await conn.close()


def run_sqlalchemy(dsn: str) -> None:
    from sqlalchemy import MetaData, create_engine, inspect

    url = dsn.replace("postgresql://", "postgresql+psycopg://").replace("?sslmode=disable", "")
    engine = create_engine(url, connect_args={"application_name": "sqlalchemy reflection"})
    try:
        insp = inspect(engine)
        insp.get_schema_names()
        insp.get_table_names()
        insp.get_view_names()
        insp.get_sequence_names()
        insp.get_enums()
        insp.get_domains()
        insp.has_table("customers")
        for table in ("customers", "orders"):
            insp.get_columns(table)
            insp.get_pk_constraint(table)
            insp.get_foreign_keys(table)
            insp.get_indexes(table)
            insp.get_unique_constraints(table)
            insp.get_check_constraints(table)
            insp.get_table_comment(table)
        insp.get_view_definition("big_orders")
        MetaData().reflect(engine, views=True)
    finally:
        engine.dispose()


ENTRY = re.compile(r"^<<tg (?P<app>[^>]*)>> (?P<level>[A-Z]+):  (?P<body>.*)$")
STATEMENT = re.compile(r"^(?:statement|execute [^:]*|parse [^:]*|bind [^:]*): (?P<sql>.*)$", re.S)


def parse_log(text: str) -> list[tuple[str, str]]:
    entries: list[list[str]] = []
    for line in text.splitlines():
        m = ENTRY.match(line)
        if m:
            entries.append([m["app"], m["level"], m["body"]])
        elif entries:
            entries[-1][2] += "\n" + line
    out = []
    for app, level, body in entries:
        if level != "LOG" or not app or app.startswith("setup"):
            continue
        m = STATEMENT.match(body)
        if m:
            out.append((app, m["sql"].strip()))
    return out


def is_catalog_query(sql: str) -> bool:
    low = sql.lower()
    return any(k in low for k in ("pg_catalog", "pg_", "information_schema", "current_schema", "version()"))


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="tg-capture-") as d:
        os.chmod(d, 0o755)
        cluster = make_cluster(Path(d), "pg", extra_conf=f"log_statement = 'all'\nlog_line_prefix = '{PREFIX}'\n")
        try:
            db = "capture"
            cluster.psql(f"CREATE DATABASE {db}")
            cluster.psql(SCHEMA, database=db)
            dsn = cluster.dsn(database=db)
            for command in PSQL_COMMANDS:
                run_psql(cluster, db, command)
            run_psql_tab_completion(cluster, db)
            asyncio.run(run_asyncpg(dsn))
            run_sqlalchemy(dsn)
            time.sleep(0.5)
            log = (Path(d) / "pg.log").read_text()
        finally:
            cluster.destroy()
    seen: set[str] = set()
    lines = ["-- Catalog queries real clients send (captured by tests/data/capture_client_catalog_queries.py",
             "-- from PostgreSQL 15 with log_statement = all).  Each entry: a '-- client:' line, the statement,",
             "-- and a line holding only ';'.  tests/test_allowlist.py checks every one passes the checker.", ""]
    count = 0
    for app, sql in parse_log(log):
        if sql in seen or not is_catalog_query(sql):
            continue
        seen.add(sql)
        count += 1
        lines += [f"-- client: {app}", sql, ";", ""]
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}: {count} statements", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
