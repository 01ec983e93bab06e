"""Differential test of the tenant rewriter against PostgreSQL row-level security.

For every generated statement (``sqlgen.statements``):

* oracle: the ORIGINAL statement runs as ``rls_user`` under RLS policies
  ``tenant_id = current_setting('app.tenant')`` with app.tenant = 'A';
* candidate: ``PolicyEngine.check(sql, PolicyContext(tenant='A'), Origin.SIMPLE)``
  rewrites it, and the rewritten SQL runs as ``rewrite_runner`` (BYPASSRLS),
  so only the rewriter's own predicates separate the tenants.

Both run in a transaction that is rolled back.  Result rows (as multisets,
or as lists when a top-level ORDER BY fixes the order) and the full state of
all tenant tables of all tenants afterwards must be equal; errors must agree
(both fail, same SQLSTATE, except that any error or refusal matches an RLS
violation).  A refusal of a statement the oracle runs is counted separately
and must stay under 10 %.

The number of cases comes from TENANTGATE_FUZZ_EXAMPLES (default 2000;
``make fuzz-rewrite`` runs 50000).  Generation is derandomized, so every run
checks the same statements.  Set TENANTGATE_FUZZ_REPORT=<path> to get the
summary and every failing statement written to a file.

Two harness self-checks run first: a reference rewriter built from
per-tenant views must give no mismatch, and "no rewriting at all" must give
many.
"""

from __future__ import annotations

import os

import psycopg
import pytest
from hypothesis import HealthCheck, Phase, given, settings

import rewrite_schema
from rewrite_oracle import (
    EngineRewriter,
    IdentityRewriter,
    StatementRunner,
    Tally,
    ViewRewriter,
    build_engine,
    run_case,
)
from sqlgen import statements

FUZZ_EXAMPLES = int(os.environ.get("TENANTGATE_FUZZ_EXAMPLES", "2000"))
MAX_REFUSAL_RATE = 0.10


@pytest.fixture(scope="module")
def diff_dsn(make_db):
    _, dsn = make_db("rewrite_diff")
    rewrite_schema.install(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(ViewRewriter.install_sql())
    return dsn


@pytest.fixture(scope="module")
def runner(diff_dsn):
    r = StatementRunner(diff_dsn)
    yield r
    r.close()


@pytest.fixture(scope="module")
def engine(diff_dsn):
    # No skip on ImportError: a broken import must fail the main security test, not hide it.
    return build_engine(diff_dsn)


def fuzz(runner: StatementRunner, rewriter, examples: int, **generator_options) -> Tally:
    """Run ``examples`` generated statements through oracle and rewriter."""
    tally = Tally()

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(statements(**generator_options))
    def one_case(stmt):
        tally.add(stmt.sql, stmt.kind, run_case(runner, rewriter, stmt.sql, stmt.ordered))

    one_case()
    return tally


def test_harness_accepts_an_independent_reference_rewriter(runner):
    tally = fuzz(runner, ViewRewriter(), 150, pk_group_by=False)
    print("\n" + tally.summary("views"))
    assert tally.mismatches == 0, tally.summary("views")
    assert tally.counts["equal"] >= 0.7 * tally.cases, "too few statements run successfully"
    # every statement kind is exercised and mostly valid
    for kind in ("select", "insert", "update", "delete", "cte_write"):
        assert tally.kinds[(kind, "equal")] > 0, kind


def test_harness_flags_missing_tenant_filters(runner):
    tally = fuzz(runner, IdentityRewriter(), 300)
    assert tally.mismatches >= 0.3 * tally.cases, tally.summary("identity")
    kinds = {k for (k, outcome), n in tally.kinds.items() if outcome == "mismatch"}
    assert {"select", "insert", "update", "delete"} <= kinds


def test_rewrite_equals_rls(runner, engine):
    tally = fuzz(runner, EngineRewriter(engine), FUZZ_EXAMPLES)
    summary = tally.summary("engine")
    print("\n" + summary)
    report = os.environ.get("TENANTGATE_FUZZ_REPORT")
    if report:
        with open(report, "w") as f:
            f.write(summary + "\n\n")
            for sql, reason in tally.failures:
                f.write(f"{sql}\n  -> {reason}\n\n")
    assert tally.cases >= min(FUZZ_EXAMPLES, 2000) * 0.9, f"only {tally.cases} cases ran"
    assert tally.mismatches == 0, summary
    assert tally.refusal_rate <= MAX_REFUSAL_RATE, summary
