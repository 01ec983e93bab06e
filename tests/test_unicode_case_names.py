"""Names that Python's Unicode case mapping reads differently from PostgreSQL.

sqlglot looks keywords and built-in function names up with ``str.upper()`` (quoted names too);
PostgreSQL folds only the ASCII letters of an unquoted name and leaves a quoted one exact.  So
``ſum(x)`` (U+017F LATIN SMALL LETTER LONG S) and ``"SUM"(x)`` were sqlglot's built-in SUM,
allowed by the function allowlist, while PostgreSQL calls a function named ``ſum`` / ``SUM``: a
user-defined function that is not declared safe ran past the allowlist.  The cross-check
(proxy.policy.crosscheck) now refuses a non-ASCII unquoted word whose case mapping is an ASCII
word, and a quoted name called as a function that sqlglot maps to a built-in of another name.
"""

from __future__ import annotations

import pytest

from proxy.policy.allowlist import FunctionChecker
from proxy.policy.context import PolicyContext
from proxy.policy.errors import PolicyRefusal
from proxy.policy.lexer import first_word
from proxy.policy.parse import DIALECT, tokenize_span
from proxy.seam import Forward, Refuse
from support.demo_policy import demo_engine

# ASCII letters (upper case) -> a non-ASCII character whose Python case mapping gives them
_ALIASES = {"FFI": "\ufb03", "FFL": "\ufb04", "FF": "\ufb00", "FI": "\ufb01", "FL": "\ufb02", "ST": "\ufb06",
            "SS": "\u00df", "S": "\u017f", "I": "\u0131", "K": "\u212a"}


def _aliased(name: str) -> str | None:
    """``name`` (upper-case ASCII) in lower case with its first aliasable letters replaced."""
    for letters, alias in _ALIASES.items():
        k = name.find(letters)
        if k >= 0:
            return name[:k].lower() + alias + name[k + len(letters):].lower()
    return None


@pytest.fixture(scope="module")
def engine():
    return demo_engine(FunctionChecker.default())


def _decide(engine, sql):
    return engine.check(sql, PolicyContext(tenant="acme"))


@pytest.mark.parametrize("sql", [
    "SELECT ſum(quantity) FROM order_items",            # sqlglot: SUM; PostgreSQL: function "ſum"
    'SELECT "ſum"(quantity) FROM order_items',
    'SELECT "SUM"(quantity) FROM order_items',          # quoted: PostgreSQL calls "SUM", not sum
    'SELECT "Lower"(name) FROM customers',
    'SELECT pg_catalog."SUM"(quantity) FROM order_items',
    "SELECT * FROM unneſt(ARRAY[1, 2]) AS u(x)",        # UNNEST keyword to sqlglot
    "SELECT order_id FROM orders WHERE rıght(status, 2) = 'id'",
    "DELETE FROM orders WHERE falſe",                   # FALSE to sqlglot, a column to PostgreSQL
    "SELECT order_id FROM orders WHERE status ıs NULL",
    "SELECT $1::ınt",
    "ſET application_name = 'x'",                       # SET to Python, a name to PostgreSQL
    "SELECT \u212aey FROM orders",                      # KELVIN SIGN: "key" in lower case
])
def test_case_mapped_names_are_refused(engine, sql):
    decision = _decide(engine, sql)
    assert isinstance(decision, Refuse), decision


@pytest.mark.parametrize("sql", [
    'SELECT "lower"(name) FROM customers',               # the built-in's own name, quoted
    "SELECT LOWER(name), Sum(quantity) FROM order_items JOIN customers USING (tenant_id)",
    "SELECT größe FROM orders",                           # non-ASCII, but no ASCII reading
    'SELECT "ſum" FROM orders',                           # quoted, not a call
])
def test_names_that_read_the_same_still_pass_the_cross_check(engine, sql):
    decision = _decide(engine, sql)
    assert isinstance(decision, Forward) or "differently" not in decision.message, decision


def test_every_sqlglot_keyword_and_function_name_with_a_case_alias_is_refused():
    """The class, not examples: every name sqlglot recognises by ``upper()``, written with a
    character whose case mapping gives its ASCII letters, is refused by the cross-check, called
    or not; its quoted mixed-case form is refused where it is called."""
    p = DIALECT.parser_class
    names = {n for n in set(p.FUNCTIONS) | set(p.FUNCTION_PARSERS) | set(p.NO_PAREN_FUNCTION_PARSERS)
             | {k for k in DIALECT.tokenizer_class.KEYWORDS if k.replace("_", "").isalnum()}
             if n.isascii() and n.replace("_", "A")[0].isalpha() and n.replace("_", "A").isalnum()}
    checked = 0
    for name in sorted(names):
        variant = _aliased(name)
        if variant is None:
            continue
        assert name in (variant.upper(), variant.lower().upper())
        for sql in (f"SELECT {variant}(1)", f"SELECT 1 FROM t WHERE {variant}"):
            with pytest.raises(PolicyRefusal):
                tokenize_span(sql, 0, len(sql))
        checked += 1
    assert checked > 300
    for name in sorted(set(p.FUNCTIONS) | set(p.FUNCTION_PARSERS)):
        if not name.replace("_", "A").isalnum() or name.lower() == name:
            continue
        sql = f'SELECT "{name}"(1)'
        with pytest.raises(PolicyRefusal):
            tokenize_span(sql, 0, len(sql))
        ok = f'SELECT "{name.lower()}"(1)'
        tokenize_span(ok, 0, len(ok))


def test_statement_routing_upper_cases_ascii_keywords_only():
    assert first_word("set x = 1", 0) == "SET"
    assert first_word("ſet x = 1", 0) == "ſet"
    assert first_word("ſhow all", 0) == "ſhow"
