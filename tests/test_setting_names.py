"""Which server setting a tenant reads with current_setting() (proxy/policy/allowlist.py,
``_check_current_setting``; issue: a name bound at Bind read ssl_cert_file and archive_command).

The class: the check judged the setting's name only when sqlglot saw a plain '...' literal, while
PostgreSQL reads the name at run time from whatever expression is there (a parameter, a cast, a
concatenation, a column, an E'' or dollar-quoted string).  Now any name the proxy cannot read off
the text is refused, and every spelling of a string constant is judged by its value.

The fuzz below builds argument expressions that PostgreSQL evaluates to a hidden setting's name
and requires that tenantgate never returns a row for one; readable settings written in any
string-constant spelling must still work and give PostgreSQL's answer.
"""

from __future__ import annotations

import os
import random

import psycopg
import pytest

from proxy.policy.allowlist import string_constant
from proxy.policy.catalog_views import setting_hidden
from proxy.policy.errors import PolicyRefusal
from proxy.policy.parse import parse_statements
from support.e2e import pq_call

SEED = int(os.environ.get("TENANTGATE_FUZZ_SEED", "20261205"))

#: readable settings a tenant may ask for, and hidden ones PostgreSQL shows to any role
READABLE = ["work_mem", "search_path", "server_version_num", "TimeZone", "statement_timeout"]


@pytest.fixture(scope="module")
def hidden_names(demo) -> list[str]:
    """The server's settings that tenant sessions may not read."""
    with psycopg.connect(demo.admin, autocommit=True) as admin:
        names = [r[0] for r in admin.execute("SELECT name FROM pg_settings ORDER BY name")]
    hidden = [n for n in names if setting_hidden(n)]
    assert {"ssl_cert_file", "archive_command", "ssl_key_file"} <= set(hidden)
    return hidden


# -- spellings of a string constant -------------------------------------------------------


def _e_string(text: str, rnd: random.Random) -> str:
    out = []
    for ch in text:
        pick = rnd.randrange(7)
        if pick == 0:  # octal escapes of the UTF-8 bytes, which PostgreSQL joins into one character
            out.append("".join(f"\\{b:o}" for b in ch.encode()))
        elif pick == 1:
            out.append("".join(f"\\x{b:x}" for b in ch.encode()))
        elif pick == 2:
            out.append(f"\\u{ord(ch):04x}")
        elif pick == 3:
            out.append(f"\\U{ord(ch):08X}")
        elif pick == 4 and ch.isalpha():
            out.append("\\" + ch if ch not in "bfnrtxuU01234567" else ch)
        else:
            out.append(ch)
    return "E'" + "".join(out) + "'"


def _u_string(text: str, rnd: random.Random) -> str:
    return "U&'" + "".join(f"\\{ord(c):04x}" if rnd.random() < 0.5 else c for c in text) + "'"


def _dollar(text: str, rnd: random.Random) -> str:
    tag = rnd.choice(["", "a", "tg", "x_1"])
    return f"${tag}${text}${tag}$"


def _case(text: str, rnd: random.Random) -> str:
    return "".join(c.upper() if rnd.random() < 0.5 else c for c in text)


SPELLINGS = [lambda t, r: f"'{t}'", _e_string, _u_string, _dollar]


def _constant(text: str, rnd: random.Random) -> str:
    return rnd.choice(SPELLINGS)(_case(text, rnd), rnd)


# -- expressions around it ------------------------------------------------------------------


def _expression(text: str, rnd: random.Random, depth: int = 0) -> str:
    """An SQL expression PostgreSQL evaluates to ``text`` (case aside)."""
    if depth > 2 or len(text) < 2 or rnd.random() < 0.3:
        return _constant(text, rnd)
    inner = _expression(text, rnd, depth + 1)
    cut = rnd.randrange(1, len(text))
    return rnd.choice([
        f"({inner})",
        f"{inner}::text",
        f"{inner}::varchar",
        f"CAST({inner} AS name)",
        f"text {_constant(text, rnd)}",
        f"lower({inner})",
        f"btrim({inner})",
        f"{_expression(text[:cut], rnd, depth + 1)} || {_expression(text[cut:], rnd, depth + 1)}",
        f"concat({_constant(text[:cut], rnd)}, {_constant(text[cut:], rnd)})",
        f"(SELECT {inner})",
        f"CASE WHEN true THEN {inner} END",
        f"COALESCE(NULL, {inner})",
        f"format('%s', {inner})",
        f"replace({_constant(text.replace('_', '#'), rnd)}, '#', '_')",
        f"ltrim({_constant(' ' + text, rnd)})",
    ])


def _cases(names: list[str], count: int, salt: str):
    for i in range(count):
        rnd = random.Random(f"{SEED}/{salt}/{i}")
        name = rnd.choice(names)
        yield i, name, _expression(name, rnd)


def _run(conn, sql: str, params=None):
    try:
        return conn.execute(sql, params).fetchall(), None
    except psycopg.Error as e:
        return None, e


# -- tests -----------------------------------------------------------------------------------


def test_a_name_bound_at_bind_is_checked(demo, hidden_names):
    """The reported case: the name is a parameter of the extended protocol.  It is checked when
    it is bound: a hidden setting is refused, a readable one answered."""
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        for name in ["ssl_cert_file", "archive_command", "work_mem"]:
            for sql in ["SELECT current_setting(%s)", "SELECT current_setting(%s, true)",
                        "SELECT * FROM current_setting(%s)"]:
                rows, err = _run(conn, sql, (name,))
                if name == "work_mem":  # a readable setting: the bound name is checked and allowed
                    assert err is None and rows == conn.execute("SHOW work_mem").fetchall(), (sql, err)
                    continue
                assert rows is None, (sql, name, rows)
                assert err.sqlstate == "42501" and "parameter $1 names the setting" in str(err), err
        # binary format: the text's bytes
        assert conn.execute("SELECT current_setting(%b)", ("work_mem",)).fetchone() \
            == conn.execute("SHOW work_mem").fetchone()
        rows, err = _run(conn, "SELECT current_setting(%b)", ("ssl_key_file",))
        assert rows is None and err.sqlstate == "42501"
        # SQLAlchemy's reflection sends current_setting($1::VARCHAR)
        assert conn.execute("SELECT current_setting(%s::VARCHAR)", ("default_table_access_method",)).fetchone() \
            == ("heap",)
        rows, err = _run(conn, "SELECT current_setting(CAST(%s AS text))", ("ssl_cert_file",))
        assert rows is None and err.sqlstate == "42501"
        # casts that would change the bound text, and SQL-level PREPARE, where nothing checks EXECUTE's value
        for sql in ["SELECT current_setting(%s::char(3))", "SELECT current_setting(%s::bytea::text)"]:
            rows, err = _run(conn, sql, ("ssl_cert_file",))
            assert rows is None and err.sqlstate == "42501" and "string literal" in str(err), (sql, err)
        rows, err = _run(conn, "PREPARE p(text) AS SELECT current_setting($1)")
        assert rows is None and err.sqlstate == "0A000", err
        # a parameter type whose value would be converted after the check
        with conn.cursor() as cur:
            rows, err = None, None
            try:
                cur.execute("SELECT current_setting(%s)", [b"ssl_cert_file"])  # bytea
                rows = cur.fetchall()
            except psycopg.Error as e:
                err = e
            assert rows is None and err.sqlstate == "42501", (rows, err)


def test_expressions_that_name_a_hidden_setting_never_return_it(demo, hidden_names):
    """Fuzz: 300 expressions PostgreSQL evaluates to a hidden setting's name."""
    failures, evaluated_count = [], 0
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn, \
            psycopg.connect(demo.admin, autocommit=True) as admin:
        for i, name, expr in _cases(hidden_names, 300, "hidden"):
            evaluated, err = _run(admin, f"SELECT {expr}")
            if err is not None:
                continue  # PostgreSQL itself does not read it (e.g. a case-changed E'' escape)
            assert evaluated[0][0].lower().strip() == name.lower(), (expr, evaluated)
            evaluated_count += 1
            rows, err = _run(conn, f"SELECT current_setting({expr}, true)")
            if rows is not None:
                failures.append((i, expr, rows))
            elif "superuser" in str(err) or "permission denied" in str(err):
                failures.append((i, expr, str(err)))  # PostgreSQL refused, not tenantgate
    assert not failures, f"seed {SEED}: {failures[:5]}"
    assert evaluated_count >= 200, evaluated_count  # the generator makes expressions PostgreSQL reads


def test_readable_settings_work_in_every_string_spelling(demo):
    """No over-refusal: each spelling of a string constant naming a readable setting is answered,
    with PostgreSQL's own answer."""
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        for i in range(120):
            rnd = random.Random(f"{SEED}/readable/{i}")
            name = rnd.choice(READABLE)
            const = _constant(name, rnd)
            rows, err = _run(conn, f"SELECT current_setting({const})")
            assert err is None, (const, err)
            assert rows == conn.execute(f"SHOW {name}").fetchall(), const


def test_set_config_accepts_the_same_spellings(demo):
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        for const in ["'work_mem'", "E'work\\137mem'", "$$work_mem$$", "$q$WORK_MEM$q$"]:
            assert conn.execute(f"SELECT set_config({const}, '7MB', false)").fetchone() == ("7MB",)
            assert conn.execute("SHOW work_mem").fetchone() == ("7MB",)
            conn.execute("RESET work_mem")
        for const in ["$$ssl_cert_file$$", "E'search\\137path'", "%s"]:
            rows, err = _run(conn, f"SELECT set_config({const}, 'x', false)", ("work_mem",) if "%s" in const else None)
            assert rows is None and err.sqlstate == "42501", (const, rows)


@pytest.mark.parametrize("sql", [
    "SELECT $$tenantgate_control.grants$$::regclass",
    "SELECT E'tenantgate\\137control.audit_log'::regclass",
    "SELECT pg_relation_size($t$tenantgate_control.audit_log$t$)",
])
def test_the_control_schema_is_refused_in_every_string_spelling(demo, sql):
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        rows, err = _run(conn, sql)
        assert rows is None and err.sqlstate == "42501"
        assert "tenantgate_control is tenantgate's control schema" in str(err)


def test_string_constant_values_match_postgresql(demo):
    """Differential: the value string_constant() reads off sqlglot's tree for E'' and dollar-quoted
    constants equals the value PostgreSQL gives the same text (or the proxy refuses the text)."""
    alphabet = "abc_XYZ019 .'\\é€"
    mismatches = []
    with psycopg.connect(demo.admin, autocommit=True) as admin:
        for i in range(400):
            rnd = random.Random(f"{SEED}/constant/{i}")
            text = "".join(rnd.choice(alphabet) for _ in range(rnd.randrange(1, 12)))
            if rnd.random() < 0.5:
                const = _e_string(text.replace("\\", "\\\\").replace("'", "''"), rnd)
            else:
                const = _dollar(text.replace("$", ""), rnd)
            pg, err = _run(admin, f"SELECT {const}")
            if err is not None:
                continue  # PostgreSQL refuses it: nothing runs
            try:
                [stmt] = parse_statements(f"SELECT {const}")
            except PolicyRefusal:
                continue  # the proxy refuses it too
            ours = string_constant(stmt.tree.expressions[0])
            if ours != pg[0][0]:
                mismatches.append((i, const, ours, pg[0][0]))
    assert not mismatches, f"seed {SEED}: {mismatches[:5]}"


# -- found by the review of the change (helper-34) ----------------------------------------------


def test_a_setting_parameter_used_elsewhere_is_refused(demo):
    """$1 typed bytea by another use: PostgreSQL prints '\\x73...' as the name; the Bind check saw hex."""
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        conn.execute("SELECT set_config('bytea_output', 'escape', false)")
        state, _ = pq_call(conn, lambda pg: pg.prepare(b"by1", b"SELECT $1::bytea AS x, current_setting($1::text)"))
        assert state == "42501"
        state, _ = pq_call(conn, lambda pg: pg.prepare(
            b"by2", b"DECLARE c CURSOR FOR SELECT $1::bytea, current_setting($1::varchar)"))
        assert state == "42501"
        # a parameter of its own is still checked at Bind, and works
        state, _ = pq_call(conn, lambda pg: pg.prepare(b"by3", b"SELECT $1::bytea AS x, current_setting($2)"))
        assert state is None
        state, rows = pq_call(conn, lambda pg: pg.exec_prepared(b"by3", [b"\\x00", b"work_mem"]))
        assert state is None and rows[0][1] == conn.execute("SHOW work_mem").fetchone()[0].encode()
        state, rows = pq_call(conn, lambda pg: pg.exec_prepared(b"by3", [b"\\x00", b"ssl_cert_file"]))
        assert state == "42501" and not rows


@pytest.mark.parametrize("sql", ['SHOW "all"', 'SHOW "ALL"', 'SHOW U&"all"', "SHOW all", "SHOW ssl_crl_dir",
                                 "SELECT current_setting('ssl_crl_dir')", "SHOW app.jwt_secret",
                                 "SELECT current_setting('app.jwt_secret', true)"])
def test_every_spelling_of_show_all_and_custom_settings_are_refused(demo, sql):
    with psycopg.connect(demo.admin, autocommit=True) as admin:
        admin.execute("ALTER DATABASE app SET app.jwt_secret = 's3cret'")
    try:
        with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql)
            # the session's own tenant stays readable
            assert conn.execute("SELECT current_setting('tenantgate.tenant_id', true)").fetchone()[0] == "acme"
    finally:
        with psycopg.connect(demo.admin, autocommit=True) as admin:
            admin.execute("ALTER DATABASE app RESET app.jwt_secret")


def test_backend_sessions_read_strings_as_the_proxy_does(demo, tmp_path):
    """A database or role setting standard_conforming_strings = off would make PostgreSQL read a
    backslash in '...' as an escape the proxy's lexer did not see: tenantgate pins it on."""
    from support.pool import serve_pooled

    with psycopg.connect(demo.admin, autocommit=True) as admin:
        admin.execute("ALTER DATABASE app SET standard_conforming_strings = off")
    try:
        with serve_pooled(demo, tmp_path, {"mode": "session"}) as proxy:  # fresh backend connections
            with psycopg.connect(proxy.dsn("acme"), autocommit=True) as conn:
                assert conn.execute("SHOW standard_conforming_strings").fetchone() == ("on",)
                assert conn.execute("SELECT length('a\\b')").fetchone() == (3,)
                rows, err = _run(conn, "SELECT current_setting('ssl_cert_fi\\le')")
                assert rows is None and err.sqlstate in ("42501", "42704"), (rows, err)
    finally:
        with psycopg.connect(demo.admin, autocommit=True) as admin:
            admin.execute("ALTER DATABASE app RESET standard_conforming_strings")


def test_backend_sessions_resolve_names_with_the_rules_schemas(demo):
    """Review 2: the backend ran with the role's default search_path ("$user", public), so a schema
    named like the backend role, or a role setting, could change what a name resolves to."""
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        assert conn.execute("SHOW search_path").fetchone()[0] in ("public", "\"public\"")
        assert conn.execute("SELECT current_schemas(true)").fetchone() == (["pg_catalog", "public"],)
