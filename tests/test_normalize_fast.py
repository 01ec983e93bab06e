"""The one-pass numeric-literal key of the rewrite cache's hot path (proxy/policy/normalize.py).

``literals_key`` must give exactly what ``number_literals`` gives (the key the cache entries were
stored under at the cold rewrite), or None where it gives None: a different key could only make
a statement hit another statement's template.  And a normalised hit must put this session's
tenant into the text, never the tenant that primed the template.
"""

from __future__ import annotations

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from proxy.policy.context import PolicyContext
from proxy.policy.errors import PolicyRefusal
from proxy.policy.lexer import scan, single_numbers
from proxy.policy.normalize import literals_key, number_literals
from proxy.seam import Forward, Origin
from support.demo_policy import demo_engine

# characters that matter to either scanner: digits, dots, exponent letters, identifier characters,
# quotes, comment starts, dollar, backslash, ampersand, NUL, non-ASCII letters
_ALPHABET = list("0123456789.eExa_ $'\"-/*\\&\x00\n=,()") + ["\u00e9", "\U0001F600"]


def _expected(sql: str):
    norm = number_literals(sql)
    return None if norm is None else (norm[0], [sql[s:e] for s, e in norm[1]])


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=40))
@example("SELECT abalance FROM pgbench_accounts WHERE aid = 4711;")
@example("SELECT 1.5e3, .5, 1., 1e, 12abc, x1, $1, 1.2.3, a.5")
@example("SELECT 1 -- 2\n, 3")
@example("SELECT '1', \"2\", 3")
def test_literals_key_is_number_literals(sql):
    assert literals_key(sql) == _expected(sql)


def test_literals_key_of_a_pgbench_statement():
    key, lits = literals_key("SELECT abalance FROM pgbench_accounts WHERE aid = 4711;")
    assert key == "SELECT abalance FROM pgbench_accounts WHERE aid = \x00;" and lits == ["4711"]


def test_normalised_hit_uses_the_sessions_tenant():
    engine = demo_engine()
    acme, globex = PolicyContext(tenant="acme"), PolicyContext(tenant="globex")
    cold = engine.check("SELECT status FROM orders WHERE order_id = 4711", acme)
    misses = engine.cache.misses
    hit_acme = engine.check("SELECT status FROM orders WHERE order_id = 815", acme)
    hit_globex = engine.check("SELECT status FROM orders WHERE order_id = 816", globex)
    hit_parse = engine.check("SELECT status FROM orders WHERE order_id = 817", globex, Origin.PARSE)
    assert engine.cache.misses == misses + 1  # the Parse is a cold rewrite of its own; the others hit
    assert all(isinstance(d, Forward) for d in (cold, hit_acme, hit_globex, hit_parse))
    assert hit_acme.sql == cold.sql.replace("4711", "815")
    assert "'globex'" in hit_globex.sql and "'acme'" not in hit_globex.sql
    assert hit_globex.sql == cold.sql.replace("4711", "816").replace("'acme'", "'globex'")
    assert "'globex'" in hit_parse.sql and "817" in hit_parse.sql
    # the decision's other fields are the cold rewrite's
    assert (hit_globex.statement_class, hit_globex.param_checks, hit_globex.copy_in_check) == (
        cold.statement_class, (), None)


def test_normalised_hit_in_a_tenant_token_session_follows_the_session():
    """A statement that outlives one execution (Parse) in a session whose tenant can change names
    the tenant through the proxy-set GUC, on a normalised hit as on a cold rewrite; a simple
    Query gets the tenant literal."""
    engine = demo_engine()
    ctx = PolicyContext(tenant="acme", tenant_source=lambda: "acme")
    cold = engine.check("SELECT status FROM orders WHERE order_id = 4711", ctx, Origin.PARSE)
    hit = engine.check("SELECT status FROM orders WHERE order_id = 815", ctx, Origin.PARSE)
    assert isinstance(cold, Forward) and isinstance(hit, Forward)
    assert hit.sql == cold.sql.replace("4711", "815")
    assert "current_setting('tenantgate.tenant_id'" in hit.sql and "'acme'" not in hit.sql
    simple_cold = engine.check("SELECT status FROM orders WHERE order_id = 1", ctx)
    simple_hit = engine.check("SELECT status FROM orders WHERE order_id = 2", ctx)
    assert "'acme'" in simple_hit.sql and simple_hit.sql == simple_cold.sql.replace("= 1", "= 2")


# Python's \d and \w (and str.isdigit) know every script's digits; PostgreSQL's scanner knows only
# 0-9 and reads any non-ASCII character as part of an identifier: "id = ٣" compares with a column
# named ٣.  Digits of other scripts are in the alphabet so that disagreement is generated.
_UNICODE_DIGITS = ["\u0663", "\uff15", "\u0967", "\U0001D7D9", "\u00b2"]
_ALPHABET_PG = list("0123456789.eE_ $'\"-+\n=,()a") + _UNICODE_DIGITS


def _scans(sql: str) -> bool:
    try:
        scan(sql)
    except PolicyRefusal:
        return False
    return True


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=_ALPHABET_PG, max_size=30), st.data())
@example("SELECT id FROM orders WHERE id = 5", None)
def test_a_normalised_hit_puts_only_numeric_constants_where_the_template_had_them(sql, data):
    """The soundness of a cache hit, against PostgreSQL's scanner: a template is made only from a
    text whose normalised spans PostgreSQL reads as single numeric constants (pipeline.build);
    any other text with the same key (a hit) must again have only single numeric constants there."""
    cold = number_literals(sql)
    assume(cold is not None and _scans(sql) and single_numbers(sql, cold[1]))
    pieces, pos = [], 0
    for s, e in cold[1]:
        pieces.append(sql[pos:s])
        if data is None:
            pieces.append("\u0663")  # the example: a digit of another script where 5 was
        else:
            pieces.append(data.draw(st.text(alphabet=list("0123456789.eE-+") + _UNICODE_DIGITS, min_size=1,
                                             max_size=6)))
        pos = e
    pieces.append(sql[pos:])
    other = "".join(pieces)
    fast = literals_key(other)
    if fast is None or fast[0] != cold[0]:
        return  # not a hit
    spans = number_literals(other)[1]
    assert _scans(other) and single_numbers(other, spans), (other, fast[1])
    assert all(lit.isascii() for lit in fast[1])


def test_digits_of_other_scripts_never_hit_a_normalised_template():
    """A hit substitutes only what PostgreSQL reads as a number: with ``٣`` (an identifier to
    PostgreSQL) the statement is rewritten cold, never spliced into the template of ``= 4711``."""
    engine = demo_engine()
    acme = PolicyContext(tenant="acme")
    engine.check("SELECT status FROM orders WHERE order_id = 4711", acme)
    for digits in ("\u0663", "\uff15\uff15", "4\u0663"):
        misses = engine.cache.misses
        decision = engine.check(f"SELECT status FROM orders WHERE order_id = {digits}", acme)
        assert engine.cache.misses == misses + 1, digits  # a cold rewrite, not a template hit
        assert literals_key(f"SELECT status FROM orders WHERE order_id = {digits}") is None
        # whatever the cold path decides, the text keeps the client's characters as they were
        if isinstance(decision, Forward):
            assert digits in decision.sql and "'acme'" in decision.sql


# The normalised hit's shortcut (Pipeline.analyze, _HOT: the plan of the tenant the template was
# last filled in for) against the full path, over interleaved sessions: another tenant, no tenant,
# a read-only session, a tenant-token session, and Parse as well as simple Query.
_HOT_STATEMENTS = [
    "SELECT status FROM orders WHERE order_id = {n}",
    "UPDATE orders SET status = 'x' WHERE order_id = {n}",
    "SELECT name FROM products WHERE product_id = {n}",
    "DELETE FROM order_items WHERE order_id = {n} AND product_id = {m}",
]
_HOT_CONTEXTS = [
    PolicyContext(tenant="acme"),
    PolicyContext(tenant="globex"),
    PolicyContext(tenant=None),
    PolicyContext(tenant="acme", read_only=True),
    PolicyContext(tenant="globex", tenant_source=lambda: "globex"),
]


def _outcome(decision):
    if isinstance(decision, Forward):
        return ("forward", decision.sql, decision.statement_class, decision.param_checks, decision.changes_settings)
    return ("refuse", decision.sqlstate, decision.message)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_HOT_STATEMENTS) - 1), st.integers(0, len(_HOT_CONTEXTS) - 1),
                          st.sampled_from([Origin.SIMPLE, Origin.PARSE]), st.integers(0, 10**6)),
                min_size=1, max_size=12))
def test_the_normalised_shortcut_decides_as_the_full_path(steps):
    warm, reference = _HOT_ENGINES
    for i, c, origin, n in steps:
        sql = _HOT_STATEMENTS[i].format(n=n, m=n + 1)
        ctx = _HOT_CONTEXTS[c]
        got = warm.analyze(sql, ctx, origin)
        for tpl in list(reference.cache.entries.values()):  # the reference never takes the shortcut
            tpl = tpl[0] if isinstance(tpl, tuple) else tpl
            tpl.done.clear()
        want = reference.analyze(sql, ctx, origin)
        assert _outcome(got.decision) == _outcome(want.decision), (sql, ctx, origin)
        assert got.effects == want.effects


_HOT_ENGINES = (demo_engine(), demo_engine())
