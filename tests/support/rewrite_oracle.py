"""Run a statement under the RLS oracle and its rewrite without RLS, and compare.

Used by ``test_rewrite_differential.py`` and ``test_adversarial.py``.

* :class:`StatementRunner` holds one superuser psycopg connection to a database
  made by :func:`rewrite_schema.install`.  :meth:`StatementRunner.run` runs SQL
  in a transaction as a given role, captures the result rows and (afterwards,
  as superuser) every row of every tenant table, then rolls back.
* Rewriters turn the original SQL into what the candidate runs:
  :class:`EngineRewriter` (the real policy engine), :class:`ViewRewriter` (a
  reference implementation with per-tenant auto-updatable views, used to check
  the harness itself) and :class:`IdentityRewriter` (no filtering at all: the
  harness must flag it).
* :func:`compare` classifies one case as equal / refused / mismatch.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg

from support.rewrite_schema import (
    CANDIDATE_APP_TENANT,
    CANDIDATE_ROLE,
    ORACLE_ROLE,
    TENANT,
    TENANT_TABLES,
    TENANTS,
    snapshot_sql,
)

STATEMENT_TIMEOUT = "10s"
_COPY_OUT = re.compile(r"^\s*copy\b", re.I)
RLS_VIOLATION = "42501"


def _norm(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_norm(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _norm(x)) for k, x in v.items()))
    if isinstance(v, memoryview):
        return bytes(v)
    return v


@dataclass
class RunResult:
    """What one run produced (error or rows + state)."""

    sqlstate: str | None = None
    message: str | None = None
    rows: list[tuple] | None = None  # None: statement returned no result set
    state: tuple | None = None  # sorted (table, row-text) of all tenant tables afterwards

    @property
    def ok(self) -> bool:
        return self.sqlstate is None


class StatementRunner:
    """One superuser connection; every run is a transaction that is rolled back."""

    def __init__(self, dsn: str, case_setup: str = "", tables=TENANT_TABLES, extra_snapshot: str = ""):
        self.dsn = dsn
        self.conn = psycopg.connect(dsn, autocommit=True)
        self._snapshot = snapshot_sql(tables) + (f" UNION ALL {extra_snapshot}" if extra_snapshot else "")
        self.case_setup = case_setup  # run at the start of every transaction (e.g. reset a sequence)

    def close(self) -> None:
        self.conn.close()

    def _begin(self, role: str, app_tenant: str, setup: str = "") -> None:
        self.conn.execute(
            f"BEGIN; SET LOCAL statement_timeout = '{STATEMENT_TIMEOUT}'; SET LOCAL ROLE {role};"
            f" SET LOCAL app.tenant = '{app_tenant}'; {self.case_setup} {setup}",
            prepare=False,
        )

    def state(self) -> tuple:
        rows = self.conn.execute(self._snapshot, prepare=False).fetchall()
        return tuple(sorted(rows))

    def run(self, sql: str, role: str, app_tenant: str, *, setup: str = "", with_state: bool = True,
            params: list[str | None] | None = None) -> RunResult:
        """Run ``sql`` as ``role``; with ``params`` over the extended protocol (Parse/Bind/Execute,
        text parameters of unspecified type, result values as text)."""
        res = RunResult()
        self._begin(role, app_tenant, setup)
        try:
            if params is not None:
                if not self._run_params(sql, params, res):
                    return res
                if with_state:
                    self.conn.execute("RESET ROLE", prepare=False)
                    res.state = self.state()
                return res
            try:
                if _COPY_OUT.match(sql):
                    with self.conn.cursor() as cur, cur.copy(sql) as copy:
                        data = b"".join(bytes(b) for b in copy).decode("utf-8", "replace")
                    res.rows = [(line,) for line in data.splitlines()]
                    if with_state:
                        self.conn.execute("RESET ROLE", prepare=False)
                        res.state = self.state()
                    return res
                cur = self.conn.execute(sql, prepare=False)
                rows = None
                # Several statements in one text: keep the last result set (like psql shows all; we only need one).
                while True:
                    if cur.description is not None:
                        rows = [tuple(_norm(v) for v in r) for r in cur.fetchall()]
                    if not cur.nextset():
                        break
                res.rows = rows
                if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS:
                    # The statement ended our transaction (COMMIT inside): role and rollback are gone.
                    res.sqlstate, res.message = "XXTCL", "statement ended the transaction; no valid result"
                    return res
            except psycopg.Error as e:
                res.sqlstate = e.sqlstate or "XX000"
                res.message = _full_message(e)
                return res
            if with_state:
                self.conn.execute("RESET ROLE", prepare=False)
                res.state = self.state()
            return res
        finally:
            if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                self.conn.execute("ROLLBACK", prepare=False)

    def _run_params(self, sql: str, params: list[str | None], res: RunResult) -> bool:
        """One Parse/Bind/Execute round trip; False when it failed (res holds the error)."""
        pq = psycopg.pq
        out = self.conn.pgconn.exec_params(sql.encode(), [None if p is None else p.encode() for p in params])
        if out.status == pq.ExecStatus.FATAL_ERROR:
            field = pq.DiagnosticField
            res.sqlstate = (out.error_field(field.SQLSTATE) or b"XX000").decode()
            parts = [out.error_field(f) for f in (field.MESSAGE_PRIMARY, field.MESSAGE_DETAIL, field.MESSAGE_HINT)]
            res.message = "\n".join(p.decode("utf-8", "replace") for p in parts if p)
            return False
        if out.status == pq.ExecStatus.TUPLES_OK:
            res.rows = [
                tuple(None if (v := out.get_value(i, j)) is None else v.decode("utf-8", "replace")
                      for j in range(out.nfields))
                for i in range(out.ntuples)
            ]
        return True

    def oracle(self, sql: str, tenant: str = TENANT, params: list[str | None] | None = None) -> RunResult:
        """The original statement under RLS for ``tenant``."""
        return self.run(sql, ORACLE_ROLE, tenant, params=params)

    def candidate(self, sql: str, setup: str = "", params: list[str | None] | None = None) -> RunResult:
        """A rewritten statement without RLS (BYPASSRLS role, app.tenant set to no tenant)."""
        return self.run(sql, CANDIDATE_ROLE, CANDIDATE_APP_TENANT, setup=setup, params=params)


def _full_message(e: psycopg.Error) -> str:
    """Primary message, DETAIL and HINT: every part a client sees (markers may hide in any)."""
    diag = getattr(e, "diag", None)
    parts = [diag.message_primary, diag.message_detail, diag.message_hint] if diag else []
    parts = [p for p in parts if p]
    return "\n".join(parts) if parts else (str(e) or type(e).__name__)


# Other tenants' marker values (see rewrite_schema: cust-B-2, ord-C-3, c1@b.example, T-B-1 ...).
def _marker_re(others: tuple[str, ...]) -> re.Pattern:
    up, low = "".join(others), "".join(o.lower() for o in others)
    return re.compile(rf"[A-Za-z0-9_.@]*-[{up}]-[A-Za-z0-9_.-]*|[A-Za-z0-9_.]*@[{low}]\.example")


_MARKERS = {t: _marker_re(tuple(o for o in TENANTS if o != t)) for t in TENANTS}


def leaked_markers(text: str, statement_text: str, tenant: str = TENANT) -> list[str]:
    """Marker values of tenants other than ``tenant`` in ``text`` that the statement itself
    did not contain (in any letter case: ``upper('cust-B-1')`` shows the statement's own value)."""
    folded = statement_text.lower()
    return sorted({m for m in _MARKERS[tenant].findall(text or "") if m and _core(m).lower() not in folded})


def _core(marker: str) -> str:
    """``cust-B-1`` of ``cust-B-1-x``: a value computed from a marker the statement itself holds
    ('cust-B-1' || '-x') is no leak."""
    found = re.match(r".*?-[A-Z]-[A-Za-z0-9]+", marker)
    return found.group(0) if found else marker


# ---- rewriters ----------------------------------------------------------------


@dataclass(frozen=True)
class Rewrite:
    """A rewriter's answer: SQL to run (plus per-transaction setup), or a refusal."""

    sql: str | None
    setup: str = ""
    refused: str | None = None  # "SQLSTATE: message" when refused


class Rewriter(Protocol):
    name: str

    def rewrite(self, sql: str) -> Rewrite: ...


class IdentityRewriter:
    """No tenant filtering at all (the harness must report mismatches for it)."""

    name = "identity"

    def rewrite(self, sql: str) -> Rewrite:
        return Rewrite(sql)


class ViewRewriter:
    """Reference rewriter: per-tenant security-barrier views with CHECK OPTION.

    Schema ``tenant_a`` holds a view per tenant table (``WHERE tenant_id = 'A'``,
    ``WITH CASCADED CHECK OPTION``, default tenant 'A'); the candidate runs
    with search_path ``tenant_a, public`` and explicit ``public.`` prefixes are
    redirected.  This is not what tenantgate does, but it is an independent
    implementation of the same meaning, so the harness must find no
    mismatches with it.
    """

    name = "views"
    SCHEMA = "tenant_a"

    @classmethod
    def install_sql(cls) -> str:
        out = [f"CREATE SCHEMA {cls.SCHEMA};", f"GRANT USAGE ON SCHEMA {cls.SCHEMA} TO {CANDIDATE_ROLE};"]
        for t in TENANT_TABLES:
            out += [
                f"CREATE VIEW {cls.SCHEMA}.{t.name} WITH (security_barrier) AS"
                f" SELECT * FROM public.{t.name} WHERE tenant_id = '{TENANT}' WITH CASCADED CHECK OPTION;",
                f"ALTER VIEW {cls.SCHEMA}.{t.name} ALTER COLUMN tenant_id SET DEFAULT '{TENANT}';",
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON {cls.SCHEMA}.{t.name} TO {CANDIDATE_ROLE};",
            ]
        return "\n".join(out)

    _public = re.compile(r"\bpublic\.(" + "|".join(t.name for t in TENANT_TABLES) + r")\b")

    def rewrite(self, sql: str) -> Rewrite:
        if sql.startswith("MERGE"):
            return Rewrite(None, refused="reference rewriter: PostgreSQL 15 cannot MERGE into a view")
        if "ON CONFLICT" in sql and re.search(r"'[BC]'", sql):
            # PostgreSQL does not apply a view's CHECK OPTION to INSERT ... ON CONFLICT DO
            # NOTHING, so this reference cannot stop another tenant's row there: it refuses.
            return Rewrite(None, refused="reference rewriter: ON CONFLICT with another tenant's literal")
        sql = self._public.sub(lambda m: f"{self.SCHEMA}.{m.group(1)}", sql)
        sql = re.sub(r"\bONLY\s+", "", sql)
        return Rewrite(sql, setup=f"SET LOCAL search_path = {self.SCHEMA}, public;")


class EngineRewriter:
    """The real thing: ``PolicyEngine.check(sql, PolicyContext(tenant), Origin.SIMPLE)``."""

    name = "engine"

    def __init__(self, engine, tenant: str = TENANT):
        from proxy.policy.context import PolicyContext

        self.engine = engine
        self.ctx = PolicyContext(tenant=tenant)

    def rewrite(self, sql: str) -> Rewrite:
        from proxy.seam import Forward, Origin, Refuse

        decision = self.engine.check(sql, self.ctx, Origin.SIMPLE)
        if isinstance(decision, Refuse):
            return Rewrite(None, refused=f"{decision.sqlstate}: {decision.message}")
        assert isinstance(decision, Forward), decision
        return Rewrite(decision.sql)


# ---- comparison -----------------------------------------------------------------


def _multiset(rows):
    return collections.Counter(rows) if rows is not None else None


@dataclass
class Verdict:
    outcome: str  # "equal", "both_error", "both_error_other_code", "refused", "refused_agree", "mismatch"
    reason: str = ""


def compare(oracle: RunResult, rewrite: Rewrite, candidate: RunResult | None, ordered: bool,
            sql: str = "", tenant: str = TENANT, rows: bool = True) -> Verdict:
    """``rows=False``: result rows are not compared (EXPLAIN: plans differ by design), only
    success, errors (and their markers) and the database state afterwards."""
    if rewrite.refused is not None:
        if not oracle.ok:
            return Verdict("refused_agree", f"oracle {oracle.sqlstate}; refused {rewrite.refused}")
        return Verdict("refused", rewrite.refused)
    assert candidate is not None
    if not oracle.ok or not candidate.ok:
        if oracle.ok:
            return Verdict("mismatch", f"candidate failed: {candidate.sqlstate} {candidate.message}")
        if candidate.ok:
            return Verdict("mismatch", f"oracle failed ({oracle.sqlstate} {oracle.message}) but candidate ran")
        # An error is a channel too: another tenant's value in the candidate's message, DETAIL
        # or HINT (a unique violation's key, a failed cast's input) that RLS does not show.
        leaked = [m for m in leaked_markers(candidate.message, sql, tenant) if m not in (oracle.message or "")]
        if leaked:
            return Verdict("mismatch", f"candidate error shows other tenants' values {leaked[:5]}:"
                                       f" {candidate.sqlstate} {candidate.message}")
        if oracle.sqlstate == candidate.sqlstate or oracle.sqlstate == RLS_VIOLATION:
            return Verdict("both_error", oracle.sqlstate)
        # Both failed, with different errors.  When a statement can fail in two ways (a
        # duplicate key in one row, a NULL key in another), which error comes first depends
        # on the plan's row order, and RLS plans differ from the rewritten ones.  Same kind
        # of outcome (no rows, no effect), so not a mismatch; counted for the report.
        # But a rewrite that PostgreSQL rejects as such (class 42: syntax, unknown column,
        # ambiguity...) is broken even when the original fails for a data reason.
        if candidate.sqlstate.startswith("42") and not oracle.sqlstate.startswith("42"):
            return Verdict("mismatch", f"rewrite rejected: candidate {candidate.sqlstate} {candidate.message};"
                                       f" oracle {oracle.sqlstate} {oracle.message}")
        return Verdict("both_error_other_code", f"oracle {oracle.sqlstate}; candidate {candidate.sqlstate}")
    if not rows:
        leaked = leaked_markers(repr(candidate.rows), sql, tenant)
        same_rows = not leaked
    elif ordered:
        same_rows = oracle.rows == candidate.rows
    else:
        same_rows = _multiset(oracle.rows) == _multiset(candidate.rows)
    if not same_rows:
        return Verdict("mismatch", f"rows differ: oracle {_short(oracle.rows)} candidate {_short(candidate.rows)}")
    if oracle.state != candidate.state:
        o, c = set(oracle.state), set(candidate.state)
        return Verdict("mismatch", f"state differs: only oracle {_short(sorted(o - c))} only candidate {_short(sorted(c - o))}")
    return Verdict("equal")


def _short(v, limit: int = 400) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[:limit] + "..."


@dataclass
class Tally:
    """Counts over many cases, plus the failing SQL."""

    counts: collections.Counter = field(default_factory=collections.Counter)
    kinds: collections.Counter = field(default_factory=collections.Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)
    refusals: collections.Counter = field(default_factory=collections.Counter)
    refusal_examples: dict = field(default_factory=dict)
    seen: set = field(default_factory=set)

    def add(self, sql: str, kind: str, verdict: Verdict, case: str = "") -> None:
        """``case``: how to reproduce this case (seed, case number), shown with a mismatch and
        a refusal example."""
        self.counts["cases"] += 1
        self.seen.add(sql)
        self.counts[verdict.outcome] += 1
        self.kinds[(kind, verdict.outcome)] += 1
        where = f"\n    case: {case}" if case else ""
        if verdict.outcome == "mismatch":
            self.failures.append((sql, verdict.reason + where))
        if verdict.outcome == "refused":
            self.refusals[verdict.reason[:120]] += 1
            self.refusal_examples.setdefault(verdict.reason[:120], sql[:300] + where)
        if verdict.outcome in ("refused", "refused_agree") and "not supported by tenantgate (" in verdict.reason:
            self.counts["engine_internal_error"] += 1  # the engine raised and failed closed: a bug

    @property
    def cases(self) -> int:
        return self.counts["cases"]

    @property
    def mismatches(self) -> int:
        return self.counts["mismatch"]

    @property
    def refusal_rate(self) -> float:
        return self.counts["refused"] / self.cases if self.cases else 0.0

    def kind_cases(self, kind: str) -> int:
        return sum(n for (k, _), n in self.kinds.items() if k == kind)

    def kind_refusal_rates(self) -> dict[str, float]:
        """Per statement kind: refusals of statements the oracle runs / cases of that kind."""
        kinds = sorted({k for k, _ in self.kinds})
        return {k: self.kinds[(k, "refused")] / self.kind_cases(k) for k in kinds if self.kind_cases(k)}

    def summary(self, label: str) -> str:
        c = self.counts
        lines = [
            f"[{label}] cases={c['cases']} distinct={len(self.seen)} equal={c['equal']} both_error={c['both_error']}"
            f" both_error_other_code={c['both_error_other_code']}"
            f" refused={c['refused']} refused_agree={c['refused_agree']} mismatches={c['mismatch']}"
            f" refusal_rate={self.refusal_rate:.1%} engine_internal_errors={c['engine_internal_error']}",
            "  by kind: " + ", ".join(f"{k}/{o}={n}" for (k, o), n in sorted(self.kinds.items())),
            "  refusal rate by kind: " + ", ".join(
                f"{k}={r:.1%} of {self.kind_cases(k)}" for k, r in self.kind_refusal_rates().items()),
        ]
        for reason, n in self.refusals.most_common(10):
            lines.append(f"  refused x{n}: {reason}\n    e.g. {self.refusal_examples[reason]}")
        for sql, reason in self.failures[:10]:
            lines.append(f"  MISMATCH: {sql}\n    -> {reason}")
        return "\n".join(lines)


def run_case(runner: StatementRunner, rewriter: Rewriter, sql: str, ordered: bool,
             params: list[str | None] | None = None, tenant: str = TENANT, rows: bool = True) -> Verdict:
    """One case: the original under RLS for ``tenant`` against the rewrite without RLS.
    With ``params`` both run over the extended protocol with those parameter values."""
    oracle = runner.oracle(sql, tenant, params=params)
    try:
        rw = rewriter.rewrite(sql)
    except Exception as e:  # an engine crash is a bug, not a refusal
        return Verdict("mismatch", f"rewriter raised {type(e).__name__}: {e}")
    cand = None if rw.refused is not None else runner.candidate(rw.sql, setup=rw.setup, params=params)
    verdict = compare(oracle, rw, cand, ordered, sql + "\n" + "\n".join(p or "" for p in params or ()), tenant, rows)
    if verdict.outcome == "mismatch" and rw.sql is not None and rw.sql != sql:
        verdict.reason += f"\n    rewritten: {rw.sql}"
    return verdict


# ---- the engine under test ---------------------------------------------------------


def build_engine(dsn: str, rules_overrides: dict | None = None):
    """A PolicyEngine for the rewrite schema, with the catalog read from ``dsn``.

    Uses the function allowlist of proxy.policy.allowlist like the proxy does.
    Raises ImportError while the engine is not built yet.
    """
    import asyncio
    import concurrent.futures

    from proxy.catalog_sync import CatalogManager
    from proxy.policy.engine import PolicyEngine
    from proxy.policy.rules import Rules

    from support.rewrite_schema import rules_dict

    rules = Rules.model_validate({**rules_dict(), **(rules_overrides or {})})

    async def load():
        mgr = await CatalogManager.from_dsn(dsn, rules)
        await mgr.close()
        return mgr

    # A private loop in a private thread: independent of pytest-asyncio's loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        catalog = pool.submit(asyncio.run, load()).result()
    return PolicyEngine(rules, catalog, function_checker=_function_checker(rules))


def _function_checker(rules):
    """The allowlist exactly as proxy.gatekeeper.build_gatekeeper builds it."""
    from proxy.policy.allowlist import FunctionChecker

    if hasattr(FunctionChecker, "from_rules"):
        return FunctionChecker.from_rules(rules)
    return FunctionChecker.default(declared_safe_functions=frozenset(rules.safe_functions))
