"""Lexer differential fuzz (issue 12): 5,000 token soups through the policy engine.

Every soup tenantgate forwards must read the same to tenantgate and to PostgreSQL: the fast
judge compares tenantgate's sqlglot tree with PostgreSQL's own parse tree (pglast) for every
case, and every forwarded single SELECT of literals is executed on a real PostgreSQL 15 whose
column count and values must be what tenantgate's tree said.  The generator and judges are in
tests/support/lexer_fuzz.py; ``make fuzz-lexer`` runs 1,000,000 cases with the same generator.

``TENANTGATE_LEXER_FUZZ_CASES`` changes the number of hypothesis examples.
"""

from __future__ import annotations

import os
import random

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.lexer_fuzz import Judge, compare_views, pglast_view, run_in_postgres, soup, sqlglot_view

CASES = int(os.environ.get("TENANTGATE_LEXER_FUZZ_CASES", "5000"))

soups = st.randoms(use_true_random=False).map(soup)


@pytest.fixture(scope="module")
def conn(pg):
    with psycopg.connect(pg.dsn(), autocommit=True) as c:
        yield c


@pytest.fixture(scope="module")
def judge():
    return Judge()


def test_generator_covers_the_forms_that_disagree():
    rnd = random.Random(7)
    texts = "\x00".join(soup(rnd) for _ in range(3000))
    for form in ["E'", "U&'", "UESCAPE", 'U&"', "$$", "$a$", "'\n'", "'\r\n'", "-- c\n", "/* a /* nested */ b */",
                 "0x1F", ".5", "1.e3", "1e5", "1_000", ",$", "X'1F'", "B'101'", "\\'"]:
        assert form in texts, form


def test_the_judges_catch_a_lexer_that_disagrees(conn):
    """Plain sqlglot (no cross-check) reads these differently from PostgreSQL: both judges see it."""
    for sql in ["SELECT 'a'\n'b'", "SELECT 0x1F", "SELECT 'a'\n'b' AS y, 1", "SELECT 'a'\r\n'b', 2"]:
        sg = sqlglot_view(sql, checked=False)
        assert compare_views(sg, pglast_view(sql)) is not None, sql
    # PostgreSQL as judge: a reading that differs in a value or in the column count is reported
    assert run_in_postgres(conn, "SELECT 'a'\n'b'", [((("str", "a"), None),)]) is not None
    assert run_in_postgres(conn, "SELECT 'a'\n'b'", [((("str", "a"), None), (("str", "b"), None))]) is not None
    assert run_in_postgres(conn, "SELECT 'a'\n'b'", [((("str", "ab"), None),)]) is None


@settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(sql=soups)
def test_forwarded_soups_read_the_same_to_tenantgate_and_postgresql(judge, conn, sql):
    before = len(judge.disagreements)
    out, sg = judge(sql)
    assert len(judge.disagreements) == before, judge.disagreements[-1]
    if out is not None and sg is not None:
        why = run_in_postgres(conn, out, sg)
        assert why is None, (sql, out, why)


def test_enough_soups_were_forwarded_and_refused(judge):
    # the property above is only meaningful if both outcomes are common
    assert judge.cases >= min(CASES, 1000)
    assert 0.1 < judge.forwarded / judge.cases < 0.9, (judge.forwarded, judge.cases)
