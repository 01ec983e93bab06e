"""The RLS differential over the statement families of sqlgen_families.

Same oracle and comparison as test_rewrite_differential.py (original under RLS for tenant A
against the engine's rewrite run without RLS), one test per family.  Each family must give
no mismatch, no refusal of a statement RLS runs, and at least FLOOR of its cases "equal" (run by both, same rows and effects): a
family the engine refuses wholesale fails here instead of passing as "refused".

Cases per family: TENANTGATE_FAMILY_EXAMPLES (default 40; ``make fuzz-rewrite`` runs more
through TENANTGATE_FUZZ_EXAMPLES / 200).  A family that fails because of a known engine
limitation is marked ``xfail(strict=True)`` with what the engine gets wrong, so it turns
into a failure the day it is fixed (and the mark must go).
"""

from __future__ import annotations

import os

import psycopg
import pytest

from support import rewrite_schema
from support.rewrite_oracle import EngineRewriter, StatementRunner, Tally, build_engine, run_case
from support.sqlgen_families import CASE_SETUP, FAMILIES, FAMILY_RULES, FAMILY_SCHEMA_SQL, family_case

EXAMPLES = int(os.environ.get("TENANTGATE_FAMILY_EXAMPLES",
                              max(40, int(os.environ.get("TENANTGATE_FUZZ_EXAMPLES", "0")) // 200)))
FLOOR = 0.5  # share of a family's cases that must run and agree
# Families whose "equal" share is bounded by design (documented here, not hidden).
FLOORS = {
    "sequences": 0.5,
}
# Known engine limitations (over-refusals, never wrong rows): strict xfail, reported to the lead.
KNOWN_LIMITS: dict[str, str] = {
}

EXTRA_SNAPSHOT = ("SELECT 'notes', x::text FROM public.notes AS x UNION ALL "
                  "SELECT 'events', x::text FROM public.events AS x")


@pytest.fixture(scope="module")
def fam_dsn(make_db):
    _, dsn = make_db("rewrite_fam")
    rewrite_schema.install(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(FAMILY_SCHEMA_SQL)
    return dsn


@pytest.fixture(scope="module")
def fam_runner(fam_dsn):
    r = StatementRunner(fam_dsn, case_setup=CASE_SETUP, extra_snapshot=EXTRA_SNAPSHOT)
    yield r
    r.close()


@pytest.fixture(scope="module")
def fam_engine(fam_dsn):
    return build_engine(fam_dsn, FAMILY_RULES)


def _params(name):
    marks = [pytest.mark.xfail(strict=True, reason=KNOWN_LIMITS[name])] if name in KNOWN_LIMITS else []
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("family", [_params(n) for n in FAMILIES])
def test_family_equals_rls(fam_runner, fam_engine, family):
    from support.rewrite_modes import ParamRewriter

    tally = Tally()
    for seed in range(EXAMPLES):
        case = family_case(family, seed)
        if case.params is not None:
            rewriter = ParamRewriter(fam_engine, list(case.params))
            verdict = run_case(fam_runner, rewriter, case.sql, case.ordered, params=list(case.params), rows=case.rows)
        else:
            verdict = run_case(fam_runner, EngineRewriter(fam_engine), case.sql, case.ordered, rows=case.rows)
        tally.add(case.sql, family, verdict)
    summary = tally.summary(f"family {family}")
    print("\n" + summary)
    assert tally.mismatches == 0, summary
    assert tally.counts["engine_internal_error"] == 0, summary
    # a statement PostgreSQL runs under RLS must not be refused in these families
    assert tally.counts["refused"] == 0, summary
    floor = FLOORS.get(family, FLOOR)
    assert tally.counts["equal"] >= floor * tally.cases, f"only {tally.counts['equal']} of {tally.cases} equal\n{summary}"


def test_family_harness_flags_missing_filters(fam_runner):
    """Forwarding the families unchanged is caught (a family the harness cannot fail proves nothing)."""
    from support.rewrite_oracle import IdentityRewriter

    blind = []
    for family in FAMILIES:
        tally = Tally()
        for seed in range(min(EXAMPLES, 40)):  # one test over every family: bounded
            case = family_case(family, seed)
            params = list(case.params) if case.params is not None else None
            tally.add(case.sql, family, run_case(fam_runner, IdentityRewriter(), case.sql, case.ordered,
                                                 params=params, rows=case.rows))
        if tally.mismatches == 0:
            blind.append(family)
    # explain (plans are not compared) reads rows only in ANALYZE, which tenant sessions may not run
    assert set(blind) <= {"explain"}, blind



@pytest.mark.parametrize("sep", ["\n", " \n ", "\r\n", "\r", "\t\n\t", " -- a comment\n", "\n-- a comment\n", " --\r"])
def test_string_continuation_is_refused_not_misread(fam_dsn, fam_engine, sep):
    """'a'<newline>'b' is one string to PostgreSQL and two to sqlglot (and across a -- comment,
    libpg_query's scanner disagrees with the server too).  The proxy must not reason about a
    reading PostgreSQL will not run: the family of continued strings is refused with 42601
    (docs/limitations.md), while PostgreSQL itself reads one string."""
    sql = f"SELECT id FROM customers WHERE name = 'cust-'{sep}'A-1' ORDER BY id"
    rewrite = EngineRewriter(fam_engine).rewrite(sql)
    assert rewrite.sql is None and rewrite.refused.startswith("42601"), rewrite
    with psycopg.connect(fam_dsn) as conn:
        assert conn.execute(f"SELECT 'cust-'{sep}'A-1'").fetchall() == [("cust-A-1",)]
