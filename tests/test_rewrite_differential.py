"""Differential test of the tenant rewriter against PostgreSQL row-level security.

For every generated statement (``sqlgen.generate``):

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

Every statement kind has its own refusal cap too (MAX_KIND_REFUSAL_RATE), and errors
are scanned (message, DETAIL, HINT) for other tenants' marker values.  Besides the
simple protocol, statements reach the engine as the extended protocol with ``$n``
parameters, in a tenant-token session (``current_setting`` form) and as a cached
template reused by a second tenant (see rewrite_modes).

The number of cases comes from TENANTGATE_FUZZ_EXAMPLES (default 20000, spread over
the modes by MODE_SHARE; ``make fuzz-rewrite`` runs 200000).  Set TENANTGATE_FUZZ_REPORT=<path> to get the
summary and every failing statement written to a file.

Reproducible: case ``i`` of a test has the seed ``case_seed(i, salt, TENANTGATE_FUZZ_SEED)``
(the salt from its mode and chunk, see :func:`plan`), a pure function, so every run and every
process (whatever PYTHONHASHSEED, test selection or modules loaded) checks the same
statements; test_plan_is_the_same_in_every_process holds this.  A mismatch, a refusal example
and a harness error name the case (mode, chunk, case number, seed; in the params and token
modes also the text sent and its parameters); ``support.sqlgen.generate(seed)`` gives the
statement again, and ``plan(...)`` the whole case.  To explore other statements set
TENANTGATE_FUZZ_SEED to another value (default "0"), e.g.
``TENANTGATE_FUZZ_SEED=$RANDOM make fuzz-rewrite``; keep that value to reproduce a failure.

Two harness self-checks run first: a reference rewriter built from
per-tenant views must give no mismatch, and "no rewriting at all" must give
many.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from support import rewrite_schema
from support.rewrite_oracle import (
    EngineRewriter,
    IdentityRewriter,
    StatementRunner,
    Tally,
    ViewRewriter,
    Rewrite,
    RunResult,
    build_engine,
    compare,
    run_case,
)
from support.rewrite_modes import SECOND_TENANT, CrossTenantRewriter, ParamRewriter, parametrize
from support.sqlgen import GeneratedStatement, case_seed, generate

FUZZ_EXAMPLES = int(os.environ.get("TENANTGATE_FUZZ_EXAMPLES", "20000"))
# Which statements: the same for every run with the same value (see case_seed); another value
# explores other statements.
FUZZ_SEED = os.environ.get("TENANTGATE_FUZZ_SEED", "0")
# How the cases are spread over the modes of rewrite_modes (fractions of FUZZ_EXAMPLES).
MODE_SHARE = {"simple": 0.6, "params": 0.2, "token": 0.1, "cache_b": 0.1}
CHUNK = 2000  # cases per test (see _chunks)
MAX_REFUSAL_RATE = 0.10
# Per statement kind (so refusing every MERGE cannot hide under the global rate); applied to
# kinds with at least MIN_KIND_CASES cases.
MAX_KIND_REFUSAL_RATE = 0.15
MIN_KIND_CASES = 50


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


def _case_rng(sql: str) -> random.Random:
    return random.Random(zlib.crc32(sql.encode()))


@dataclass(frozen=True)
class Case:
    """One planned case: which statement (from its seed) reaches the engine in which form."""

    mode: str
    chunk: int
    index: int  # position in its sequence
    seed: int  # generate(seed) gives the statement
    stmt: GeneratedStatement
    sql: str  # what is sent: the statement, or its parametrized text (params, token)
    params: tuple[str, ...] | None = None
    options: tuple[tuple[str, object], ...] = ()  # generator options besides the seed

    def label(self) -> str:
        """Everything needed to reproduce the case (see the module docstring)."""
        call = ", ".join([str(self.seed), *(f"{k}={v!r}" for k, v in self.options)])
        sent = "" if self.params is None else f"\n    sent: {self.sql}\n    params: {list(self.params)}"
        return (f"mode={self.mode} chunk={self.chunk} case={self.index} seed={self.seed}"
                f" (TENANTGATE_FUZZ_SEED={FUZZ_SEED}; statement: support.sqlgen.generate({call})){sent}")

    def record(self) -> tuple:
        return (self.mode, self.chunk, self.index, self.seed, self.stmt.sql, self.stmt.kind, self.sql, self.params)


def _salt(mode: str, chunk: int) -> int:
    # each mode and chunk its own statements (salted seeds), so they add coverage, not repeat it
    return 0 if (mode, chunk) == ("simple", 0) else zlib.crc32(f"{mode}/{chunk}".encode())


def plan(examples: int, mode: str = "simple", chunk: int = 0, **generator_options) -> list[Case]:
    """The cases of one test: a pure function of its arguments and TENANTGATE_FUZZ_SEED."""
    salt = _salt(mode, chunk)
    cases = []
    for index in range(examples):
        seed = case_seed(index, salt, FUZZ_SEED)
        stmt = generate(seed, **generator_options)
        sql, params = stmt.sql, None
        if mode in ("params", "token"):
            p = parametrize(stmt.sql, _case_rng(stmt.sql))
            if p is not None:
                sql, params = p[0], tuple(p[1])
        cases.append(Case(mode, chunk, index, seed, stmt, sql, params, tuple(sorted(generator_options.items()))))
    return cases


def fuzz(runner: StatementRunner, rewriter, examples: int, mode: str = "simple", tally: Tally | None = None,
         chunk: int = 0, **generator_options) -> Tally:
    """Run ``examples`` generated statements through oracle and rewriter in ``mode``
    (see rewrite_modes; ``rewriter`` is the engine itself for every mode but "simple")."""
    tally = tally if tally is not None else Tally()
    for case in plan(examples, mode, chunk, **generator_options):
        try:
            verdict = run_mode(runner, rewriter, case)
        except Exception as e:
            raise AssertionError(f"harness error in {case.label()}\n    statement: {case.stmt.sql}") from e
        tally.add(case.stmt.sql, case.stmt.kind, verdict, case=case.label())
    return tally


def run_mode(runner: StatementRunner, rewriter, case: Case):
    mode, sql, ordered = case.mode, case.stmt.sql, case.stmt.ordered
    if mode == "simple":
        return run_case(runner, rewriter, sql, ordered)
    if mode in ("params", "token"):
        params = list(case.params or ())
        return run_case(runner, ParamRewriter(rewriter, params, token=mode == "token"), case.sql, ordered,
                        params=params)
    assert mode == "cache_b", mode
    return run_case(runner, CrossTenantRewriter(rewriter), sql, ordered, tenant=SECOND_TENANT)


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


def check_tally(tally: Tally, label: str, min_cases: int) -> None:
    summary = tally.summary(label)
    print("\n" + summary)
    report = os.environ.get("TENANTGATE_FUZZ_REPORT")
    if report:
        with open(report, "a") as f:
            f.write(summary + "\n\n")
            for sql, reason in tally.failures:
                f.write(f"{sql}\n  -> {reason}\n\n")
    assert tally.cases >= min_cases, f"only {tally.cases} cases ran"
    assert tally.mismatches == 0, summary
    assert tally.counts["engine_internal_error"] == 0, summary
    assert tally.refusal_rate <= MAX_REFUSAL_RATE, summary
    for kind, rate in tally.kind_refusal_rates().items():
        if tally.kind_cases(kind) >= MIN_KIND_CASES:
            assert rate <= MAX_KIND_REFUSAL_RATE, f"{kind}: {rate:.1%} refused\n{summary}"


def _chunks() -> list[tuple[str, int, int]]:
    """(mode, chunk index, cases): each test at most CHUNK cases, so one test stays well inside
    pytest's per-test timeout even on a loaded machine (and a failure names a smaller slice)."""
    out = []
    for mode, share in MODE_SHARE.items():
        total = max(1, int(FUZZ_EXAMPLES * share))
        n = -(-total // CHUNK)
        out += [(mode, i, total // n + (1 if i < total % n else 0)) for i in range(n)]
    return out


@pytest.mark.parametrize("mode,chunk,examples", _chunks(), ids=lambda v: str(v))
def test_rewrite_equals_rls(runner, engine, mode, chunk, examples):
    """The engine's rewrite means what RLS means, in every mode a statement reaches it."""
    rewriter = EngineRewriter(engine) if mode == "simple" else engine
    tally = fuzz(runner, rewriter, examples, mode, chunk=chunk)
    check_tally(tally, f"engine/{mode}/{chunk}", int(examples * 0.9))


def test_token_mode_names_the_tenant_through_the_backend_setting(engine):
    """The token mode really is another form: no tenant literal, the session's binding instead."""
    plain = EngineRewriter(engine).rewrite("SELECT * FROM orders WHERE id = $1").sql
    token = ParamRewriter(engine, ["1"], token=True).rewrite("SELECT * FROM orders WHERE id = $1")
    assert "'A'" in plain and "'A'" not in token.sql and token.sql != plain, (plain, token)


def test_parametrize_makes_parameters():
    """The params mode really binds parameters (else it would only repeat the simple mode)."""
    rng = random.Random(1)
    sql, params = parametrize("SELECT name FROM customers WHERE id = 2 AND name <> 'x' ORDER BY 1 LIMIT 3",
                              rng, share=1.0)
    assert sql == "SELECT name FROM customers WHERE id = $1::int AND name <> $2::text ORDER BY 1 LIMIT $3::int"
    assert params == ["2", "x", "3"]


def test_harness_flags_a_cache_that_keeps_the_first_tenant(runner, engine):
    """cache_b mode must notice a rewriter that answers tenant B with tenant A's rewrite."""

    class Sticky:
        name = "sticky"

        def __init__(self):
            self.first = {}

        def rewrite(self, sql):
            return self.first.setdefault(sql, EngineRewriter(engine).rewrite(sql))

    tally = Tally()
    sticky = Sticky()
    for seed in range(200):
        stmt = generate(seed)
        sticky.rewrite(stmt.sql)
        tally.add(stmt.sql, stmt.kind, run_case(runner, sticky, stmt.sql, stmt.ordered, tenant=SECOND_TENANT))
    assert tally.mismatches >= 0.3 * tally.cases, tally.summary("sticky")


def test_harness_flags_missing_filters_over_the_extended_protocol(runner):
    tally = Tally()
    for seed in range(200):
        stmt = generate(seed)
        p = parametrize(stmt.sql, random.Random(seed))
        if p is None:
            continue
        tally.add(p[0], stmt.kind, run_case(runner, IdentityRewriter(), p[0], stmt.ordered, params=p[1]))
    assert tally.cases >= 100 and tally.mismatches >= 0.3 * tally.cases, tally.summary("identity/params")


def test_an_error_that_shows_another_tenants_value_is_a_mismatch():
    oracle = RunResult(sqlstate="23505", message='duplicate key value violates unique constraint "tickets_code_key"')
    leaky = RunResult(sqlstate="23505", message='duplicate key value violates unique constraint "tickets_code_key"\n'
                                                 "Key (code)=(T-B-4) already exists.")
    assert compare(oracle, Rewrite("x"), leaky, False, "UPDATE tickets SET code = code").outcome == "mismatch"
    # the statement's own value is no leak
    assert compare(oracle, Rewrite("x"), leaky, False, "INSERT ... 'T-B-4'").outcome == "both_error"


def full_plan() -> list[Case]:
    """Every case test_rewrite_equals_rls runs, in order (each harness test runs a prefix of
    the simple/0 sequence)."""
    return [case for mode, chunk, examples in _chunks() for case in plan(examples, mode, chunk)]


# Run in a fresh interpreter by test_plan_is_the_same_in_every_process: prints the full plan.
_PLAN_SCRIPT = """
import importlib, json, sys
import test_rewrite_differential as t
for name in sys.argv[1:]:  # more of the project loaded, as later in a session or in a whole-suite run
    importlib.import_module(name)
json.dump([c.record() for c in t.full_plan()], sys.stdout)
"""


def _plan_in_subprocess(hash_seed: str, *imports: str) -> list[list]:
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONHASHSEED": hash_seed,
           "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _PLAN_SCRIPT, *imports], env=env, cwd=tests,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def test_plan_is_the_same_in_every_process():
    """Two fresh processes with different hash seeds (and different modules of the project
    loaded) plan exactly the same statements, so a failure reported with its seed reproduces."""
    first = _plan_in_subprocess("1")
    second = _plan_in_subprocess("2", "proxy.policy.engine", "proxy.catalog_sync", "proxy.server")
    assert len(first) == len(second) == sum(n for _, _, n in _chunks())
    for a, b in zip(first, second):
        assert a == b, f"the plan differs between two processes, first at\n  {a}\n  {b}"
    assert len({r[4] for r in first}) > 0.95 * len(first), "planned statements repeat"


def test_a_case_is_reproduced_from_what_its_label_names():
    for case in plan(40, "params", 1)[::7] + plan(20, "simple", 0, pk_group_by=False)[::5]:
        label = case.label()
        assert f"mode={case.mode} chunk={case.chunk} case={case.index} seed={case.seed}" in label
        assert case_seed(case.index, _salt(case.mode, case.chunk), FUZZ_SEED) == case.seed
        assert generate(case.seed, **dict(case.options)) == case.stmt
        assert case.params is None or (case.sql in label and str(list(case.params)) in label)
