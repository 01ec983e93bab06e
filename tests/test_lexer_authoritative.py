"""PostgreSQL's own scanner is authoritative (issue 12, part 1 of separation).

Engine-level tests of the class "tenantgate's lexer and PostgreSQL's disagree" (string
continuation, E'' escape mode, comments between pieces, \\r\\n, U& with UESCAPE, 0x1F, $1,$2
without spaces, EXPLAIN option spellings, COPY options that change stored values, settings that
change how PostgreSQL lexes), then the same breaks end to end through ``tenantgate demo`` with
real drivers (asyncpg, psycopg 3): acme never reads or changes globex's rows.
"""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from proxy.policy.allowlist import FunctionChecker
from support.demo_policy import demo_engine
from proxy.policy.context import PolicyContext
from proxy.seam import Forward, Origin, Refuse

ACME = PolicyContext(tenant="acme")

# the break found by the security review: PostgreSQL joins E'a' and the next piece into one
# escape-mode string, so \' does not end it and everything after the first $$c$$; runs
BREAK = ("SELECT 'x' WHERE 'b' BETWEEN E'a'\n'\\' AND ' AND $$c$$; BEGIN; "
         "SELECT set_config($$tenantgate.tenant_id$$,$$globex$$,true); "
         "SELECT tenant_id,name,email FROM customers; COMMIT; --'")
SET_CARRIER = "SET application_name = E'x'\n'\\' , '; SELECT tenant_id, name FROM customers --'"


@pytest.fixture(scope="module")
def engine():
    return demo_engine(FunctionChecker.default())


def check(engine, sql, origin=Origin.SIMPLE):
    return engine.check(sql, ACME, origin)


def refused(engine, sql, states=("42601", "0A000")) -> Refuse:
    d = check(engine, sql)
    assert isinstance(d, Refuse), (sql, d)
    assert d.sqlstate in states, (sql, d)
    return d


def forwarded(engine, sql, origin=Origin.SIMPLE) -> str:
    d = check(engine, sql, origin)
    assert isinstance(d, Forward), (sql, d)
    return d.sql


# ---- string continuation and its carriers ---------------------------------------------------
@pytest.mark.parametrize("gap", ["\n", "\r\n", "\r", " \n\t", "\n-- a comment\n", "  -- c\r\n  "])
def test_continued_strings_are_read_as_postgresql_reads_them(engine, gap):
    for sql in [
        BREAK.replace("E'a'\n'", "E'a'" + gap + "'"),
        SET_CARRIER.replace("E'x'\n'", "E'x'" + gap + "'"),
        f"SELECT 'x' WHERE 'b' BETWEEN 'a'{gap}'z' AND 'c'",
        f"SELECT * FROM products WHERE name = E'a'{gap}'\\' OR true OR name = '",
    ]:
        refused(engine, sql)


def test_the_break_and_the_set_carrier_are_refused(engine):
    assert "differently" in refused(engine, BREAK).message or refused(engine, BREAK)
    refused(engine, SET_CARRIER)
    # BETWEEN without AND: sqlglot accepts it, PostgreSQL's grammar does not
    d = refused(engine, "SELECT 1 WHERE 2 BETWEEN 1 3", states=("42601",))
    assert "syntax error" in d.message


def test_strings_without_a_continuation_still_work(engine):
    # block comments are not part of a continuation: two strings, a syntax error to PostgreSQL
    refused(engine, "SELECT 'a' /* c */\n'b'", states=("42601",))
    assert forwarded(engine, "SELECT E'a\\'b', 'it''s', $$x$$, $t$ $$ $t$, E'\\x41\\n'") \
        == "SELECT E'a\\'b', 'it''s', $$x$$, $t$ $$ $t$, E'\\x41\\n'"
    assert "tenant_id" in forwarded(engine, "SELECT name FROM customers WHERE name = E'Wile\\x20E. Coyote'")


def test_unicode_escapes_follow_postgresql(engine):
    assert forwarded(engine, "SELECT U&'d\\0061t\\+000061'") == "SELECT 'data'"
    assert forwarded(engine, "SELECT U&'d!0061t' UESCAPE '!'") == "SELECT 'dat'"
    # with UESCAPE '!' a backslash is a plain character
    assert forwarded(engine, "SELECT U&'d\\0061t' UESCAPE '!'") == "SELECT 'd\\0061t'"
    sql = forwarded(engine, 'SELECT U&"n\\0061me" FROM customers')
    assert sql.startswith('SELECT "name" FROM customers') and "'acme'" in sql
    refused(engine, "SELECT U&'a'\n'b'")


def test_numbers_as_postgresql_15_reads_them(engine):
    # PostgreSQL 15: 0x1F is 0 followed by the alias x1F; sqlglot reads a hex number
    refused(engine, "SELECT 0x1F")
    refused(engine, "SELECT * FROM customers WHERE customer_id = 0x1")
    # 1_000 is 1 followed by the alias _000 in PostgreSQL 15, and sqlglot reads it the same way
    assert forwarded(engine, "SELECT 1_000") == "SELECT 1_000"
    assert forwarded(engine, "SELECT 1.e3, 1e5, 1.5, 10") == "SELECT 1.e3, 1e5, 1.5, 10"


def test_parameters_next_to_other_tokens(engine):
    for sql in [
        "SELECT * FROM customers WHERE customer_id IN ($1,$2)",
        "INSERT INTO customers (customer_id, name, email) VALUES($1,$2,$3)",
        "UPDATE customers SET name=$1,email=$2 WHERE customer_id=$3",
        "SELECT $1::int+$2",
        "SELECT * FROM customers WHERE customer_id=$1 AND name<>$2",
    ]:
        out = forwarded(engine, sql, Origin.PARSE)
        # the original text is kept; only the tenant predicate or column is added
        for piece in ("$1,$2" if "$2" in sql and "$1,$2" in sql else "$1",):
            assert piece in out, out


def test_cache_hit_with_a_different_number_form_is_not_exact_and_misses(engine):
    ok = forwarded(engine, "SELECT * FROM customers WHERE customer_id = 1")
    assert ok.endswith("'acme' ")
    # the same shape with 0x1 (not one numeric token to PostgreSQL 15) must not reuse the template
    refused(engine, "SELECT * FROM customers WHERE customer_id = 0x1")
    assert "= 27" in forwarded(engine, "SELECT * FROM customers WHERE customer_id = 27")


# ---- settings that change how PostgreSQL lexes -------------------------------------------------
@pytest.mark.parametrize("sql", [
    "SET standard_conforming_strings = off",
    "SET standard_conforming_strings TO off",
    "SET SESSION standard_conforming_strings = 'off'",
    "SET LOCAL standard_conforming_strings = off",
    "SET backslash_quote = on",
    "SET client_encoding = 'SJIS'",
    "SET NAMES 'SJIS'",
    "SELECT set_config('standard_conforming_strings', 'off', false)",
    "SELECT set_config(E'standard\\137conforming_strings', 'off', false)",
    "SELECT set_config('client_encoding', 'GBK', false)",
    "SELECT set_config('backslash_quote', 'on', false)",
    "RESET standard_conforming_strings",
])
def test_clients_cannot_change_how_postgresql_lexes(engine, sql):
    d = check(engine, sql)
    assert isinstance(d, Refuse), (sql, d)


# ---- EXPLAIN options -----------------------------------------------------------------------------
@pytest.mark.parametrize("opts", [
    '("analyze")', "(analyze)", "(ANALYZE)", "(analyse true)", "(ANALYZE 1)", "(ANALYZE on)",
    "(ANALYZE 'true')", '(verbose, "analyse")', "(ANALYZE yes)", "ANALYZE", "ANALYSE", "analyze verbose",
])
def test_explain_analyze_in_every_spelling_is_refused(engine, opts):
    d = check(engine, f"EXPLAIN {opts} DELETE FROM customers")
    assert isinstance(d, Refuse), (opts, d)
    assert d.sqlstate in ("42501", "0A000")


def test_explain_without_analyze_works(engine):
    for opts in ["", "(costs off)", "(ANALYZE false, verbose)", '("verbose", format json)', "(analyze off)"]:
        out = forwarded(engine, f"EXPLAIN {opts} SELECT * FROM customers")
        assert "'acme'" in out


def test_explain_unknown_or_quoted_upper_case_option_refused(engine):
    # "ANALYZE" quoted in upper case is not the option analyze to PostgreSQL: unknown, refused
    refused(engine, 'EXPLAIN ("ANALYZE") SELECT 1', states=("0A000",))
    refused(engine, "EXPLAIN (bogus) SELECT 1", states=("0A000",))


# ---- COPY options that change stored values ---------------------------------------------------------
@pytest.mark.parametrize("opts", [
    "(FORMAT csv, NULL 'acme', FORCE_NULL (tenant_id))",
    '(FORMAT csv, FORCE_NULL ("tenant_id"))',
    "(FORMAT csv, FORCE_NOT_NULL (name, tenant_id))",
    "(FORMAT csv, FORCE_NULL (TENANT_ID))",
    "(ENCODING 'LATIN1')",
    "(ENCODING 'SJIS')",
    "(DEFAULT 'acme')",
    "CSV FORCE NOT NULL tenant_id",
])
def test_copy_options_that_change_the_tenant_value_are_refused(engine, opts):
    d = check(engine, f"COPY customers (tenant_id, customer_id, name) FROM STDIN {opts}")
    assert isinstance(d, Refuse) and d.sqlstate in ("0A000", "42601"), (opts, d)


def test_copy_options_on_other_columns_work(engine):
    d = check(engine, "COPY customers (tenant_id, customer_id, name) FROM STDIN (FORMAT csv, FORCE_NULL (name))")
    assert isinstance(d, Forward) and d.copy_in_check is not None


# ---- end to end through the demo, real drivers ----------------------------------------------------
def _admin_rows(demo, sql):  # noqa: F811
    with psycopg.connect(demo.admin, autocommit=True) as c:
        return c.execute(sql).fetchall()


def _simple_query_results(conn, sql):
    """Every result set of a simple-protocol Query (several statements), or the error."""
    cur = psycopg.ClientCursor(conn)
    try:
        cur.execute(sql)
    except psycopg.Error as e:
        conn.rollback()
        return e
    results = []
    while True:
        if cur.description is not None:
            results.append(cur.fetchall())
        if not cur.nextset():
            break
    conn.rollback()
    return results


def test_the_break_through_the_demo_reads_no_globex_rows(demo):  # noqa: F811
    globex = {r[0] for r in _admin_rows(demo, "SELECT name FROM customers WHERE tenant_id = 'globex'")}
    with psycopg.connect(demo.app("acme")) as conn:
        for sql in (BREAK, BREAK.replace("\n", "\r\n"), BREAK.replace("\n", "\n-- c\n"), SET_CARRIER):
            got = _simple_query_results(conn, sql)
            seen = {v for rows in (got if isinstance(got, list) else []) for row in rows for v in row}
            assert not seen & globex, f"acme read globex's rows: {seen & globex}"
            assert isinstance(got, psycopg.Error) and got.sqlstate in ("42601", "0A000"), got
        # the session is still usable and still acme's
        assert conn.execute("SELECT DISTINCT tenant_id FROM customers").fetchall() == [("acme",)]
        assert conn.execute("SELECT current_setting('tenantgate.tenant_id')").fetchone() == ("acme",)


def test_parameters_without_spaces_with_asyncpg(demo):  # noqa: F811
    async def run():
        conn = await asyncpg.connect(demo.app("acme"))
        try:
            rows = await conn.fetch("SELECT tenant_id, customer_id FROM customers WHERE customer_id IN ($1,$2) "
                                    "ORDER BY customer_id", 1, 2)
            assert [tuple(r) for r in rows] == [("acme", 1), ("acme", 2)]
            assert await conn.fetchval("SELECT $1::int+$2", 40, 2) == 42
        finally:
            await conn.close()

    asyncio.run(run())


def test_parameters_without_spaces_with_psycopg(demo):  # noqa: F811
    with psycopg.connect(demo.app("acme")) as c:
        rows = c.execute("SELECT tenant_id, name FROM customers WHERE customer_id IN (%s,%s) ORDER BY 2",
                         (1, 2)).fetchall()
        assert {r[0] for r in rows} == {"acme"} and len(rows) == 2
        c.execute("INSERT INTO customers (customer_id,name,email) VALUES(%s,%s,%s)", (9101, "Lex", "lex@acme.example"))
        c.execute("UPDATE customers SET name=%s,email=%s WHERE customer_id=%s", ("Lex2", "lex2@acme.example", 9101))
        c.rollback()
    assert _admin_rows(demo, "SELECT count(*) FROM customers WHERE customer_id = 9101") == [(0,)]


def test_explain_quoted_analyze_does_not_delete(demo):  # noqa: F811
    before = _admin_rows(demo, "SELECT count(*) FROM customers")
    with psycopg.connect(demo.app("acme"), autocommit=True) as c:
        for opts in ('("analyze")', "(analyse true)", "(ANALYZE 1)", "(ANALYZE on)", "ANALYSE"):
            with pytest.raises(psycopg.Error) as info:
                c.execute(f"EXPLAIN {opts} DELETE FROM customers")
            assert info.value.sqlstate in ("42501", "0A000")
    assert _admin_rows(demo, "SELECT count(*) FROM customers") == before


def test_copy_force_null_on_tenant_column_refused(demo):  # noqa: F811
    with psycopg.connect(demo.app("acme"), autocommit=True) as c:
        with pytest.raises(psycopg.Error) as info:
            with c.cursor().copy("COPY customers (tenant_id, customer_id, name) FROM STDIN "
                                 "(FORMAT csv, NULL 'acme', FORCE_NULL (tenant_id))") as cp:
                cp.write(b'"acme",9102,"x"\n')
        assert info.value.sqlstate == "0A000"
    assert _admin_rows(demo, "SELECT count(*) FROM customers WHERE customer_id = 9102") == [(0,)]


# ---- the lexer itself -------------------------------------------------------------------------
def test_token_offsets_are_characters_and_u_tokens_get_their_end():
    from proxy.policy.lexer import scan, split_statements, string_value

    sql = "SELECT 'ééé', U&'a\\0062'  /* x */, $1,$2; SELECT E'a'\r\n'\\'b' -- c\n"
    toks = [t for t in scan(sql) if t.name not in ("C_COMMENT", "SQL_COMMENT")]
    texts = [sql[t.start:t.end] for t in toks]
    assert texts[:8] == ["SELECT", "'ééé'", ",", "U&'a\\0062'", ",", "$1", ",", "$2"]
    cont = toks[-1]
    assert sql[cont.start:cont.end] == "E'a'\r\n'\\'b'" and string_value(sql, cont) == "a'b"
    assert [sql[s:e] for s, e in split_statements(sql)] == [sql[:sql.index(";")], "SELECT E'a'\r\n'\\'b'"]


def test_escape_string_values_follow_postgresql():
    from proxy.policy.errors import PolicyRefusal
    from proxy.policy.lexer import scan, string_value

    def value(lit):
        sql = "SELECT " + lit
        return string_value(sql, scan(sql)[1])

    assert value("E'\\x41\\101\\u00e9\\U0001F600\\q\\''") == "AAé😀q'"
    assert value("'a''b'\n'c'") == "a'bc"
    assert value("$t$ $$ $t$") == " $$ "
    for bad in ("E'\\0'", "E'\\xff'", "E'\\ud800'"):
        with pytest.raises(PolicyRefusal):
            value(bad)
