"""The adversarial corpus (tests/data/adversarial.yaml) and the machinery that checks it.

Every entry is a tenant-escape attempt made as tenant A.  It passes when it is
refused, or when running it shows no other tenant's data and changes no other
tenant's row (and, for entries with ``oracle``, gives exactly what PostgreSQL
RLS gives for tenant A).

Two ways to run the corpus:

* :func:`run_corpus_with_engine` — engine level: ``PolicyEngine.analyze`` for
  each statement; what it forwards runs on a real database as a login role
  WITHOUT row-level security (``adv_backend``, BYPASSRLS), inside a
  transaction that is rolled back.  So the rewriter alone is tested.
* :func:`run_corpus_against_dsn` — end to end through a running tenantgate:
  ``tenant_dsn`` is tenant A's connection string through the proxy,
  ``admin_dsn`` a direct superuser connection to the same database.  Over the
  simple protocol (``protocol="simple"``) or the extended one
  (``protocol="extended"``: every statement is a Parse/Bind/Execute).  Changes
  are committed and the seed data restored afterwards when anything changed.

Both return a :class:`CorpusReport`; ``report.findings`` lists the failures.
The database must be prepared with :func:`install_adversarial_schema`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import yaml

from support import rewrite_schema
from support.rewrite_oracle import _norm, leaked_markers  # noqa: F401  (leaked_markers is used and re-exported)
from support.rewrite_schema import ALL_TABLES, TENANT, TENANT_TABLES

CORPUS_PATH = Path(__file__).resolve().parents[1] / "data" / "adversarial.yaml"
BACKEND_ROLE = "adv_backend"
BACKEND_PASSWORD = "adv-backend-pw"
OTHER_TENANT_SETTING = "B"  # app.tenant of the backend role (see EXTRAS_SQL)
OTHER_TENANT_SNAPSHOT_TABLES = tuple(t.name for t in TENANT_TABLES) + ("events", "leads")

# Seed rows of the extra tables: the OTHER tenants' rows first, so a qual
# evaluated before the tenant filter meets another tenant's row first.
EXTRA_SEED_SQL = """
INSERT INTO events VALUES
  ('B', 1, '{"secret": "ev-B-1", "k": "b"}'), ('C', 1, '{"secret": "ev-C-1"}'),
  ('A', 1, '{"secret": "ev-A-1", "k": "a"}'), ('A', 2, '{"k": "x"}');
INSERT INTO leads VALUES ('B', 1, 'lead-B-1'), ('C', 1, 'lead-C-1'), ('B', 2, 'lead-B-2'), ('A', 1, '7'), ('A', 2, '8');
"""

# Objects the corpus attacks besides the rewrite schema.
EXTRAS_SQL = f"""
CREATE VIEW all_orders AS SELECT * FROM orders;
CREATE SEQUENCE invoice_seq;
CREATE FUNCTION all_customer_names() RETURNS SETOF text LANGUAGE sql AS $$SELECT name FROM customers$$;
CREATE TABLE events (
    tenant_id text NOT NULL DEFAULT current_setting('app.tenant', true),
    id int NOT NULL,
    payload jsonb,
    PRIMARY KEY (tenant_id, id)
) PARTITION BY LIST (tenant_id);
CREATE TABLE events_a PARTITION OF events FOR VALUES IN ('A');
CREATE TABLE events_b PARTITION OF events FOR VALUES IN ('B');
CREATE TABLE events_c PARTITION OF events FOR VALUES IN ('C');
CREATE TABLE leads (
    tenant_id text NOT NULL DEFAULT current_setting('app.tenant', true),
    id int NOT NULL,
    label text,
    PRIMARY KEY (tenant_id, id)
);
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{BACKEND_ROLE}') THEN
    CREATE ROLE {BACKEND_ROLE} LOGIN BYPASSRLS PASSWORD '{BACKEND_PASSWORD}';
  END IF;
END $$;
-- What runs as the backend role sees tenant B's setting: a statement that relies on the
-- column default instead of naming tenant A writes B's row, which the runner notices.
ALTER ROLE {BACKEND_ROLE} SET app.tenant = '{OTHER_TENANT_SETTING}';
GRANT USAGE ON SCHEMA public TO {BACKEND_ROLE};
GRANT SELECT ON products TO {BACKEND_ROLE};
GRANT SELECT, INSERT, UPDATE, DELETE ON customers, orders, order_items, tickets, events, events_a, events_b, events_c, leads
  TO {BACKEND_ROLE}, {rewrite_schema.ORACLE_ROLE};
GRANT SELECT ON all_orders TO {BACKEND_ROLE}, {rewrite_schema.ORACLE_ROLE};
GRANT USAGE, SELECT, UPDATE ON invoice_seq TO {BACKEND_ROLE}, {rewrite_schema.ORACLE_ROLE};
""" + "".join(
    f"""
ALTER TABLE {t} ENABLE ROW LEVEL SECURITY;
ALTER TABLE {t} FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON {t} TO {rewrite_schema.ORACLE_ROLE}
  USING (tenant_id = current_setting('app.tenant')) WITH CHECK (tenant_id = current_setting('app.tenant'));
"""
    for t in ("events", "events_a", "events_b", "events_c", "leads")
)


def install_adversarial_schema(superuser_dsn: str) -> None:
    """The rewrite schema plus the extras; run as superuser in an empty database."""
    rewrite_schema.install(superuser_dsn)
    with psycopg.connect(superuser_dsn, autocommit=True) as conn:
        conn.execute(EXTRAS_SQL)
        conn.execute(EXTRA_SEED_SQL)
        conn.execute("ANALYZE")  # so pg_stats really holds other tenants' values


@dataclass(frozen=True)
class Attempt:
    id: str
    steps: tuple[str, ...]
    expect: str = "safe"  # or "refuse"
    oracle: bool = True
    note: str = ""
    probe: bool = False  # a probe of behaviour, not an attack: forward-everything need not flag it

    @property
    def text(self) -> str:
        return "\n".join(self.steps)


def load_corpus(path: Path = CORPUS_PATH, dbname: str = "postgres") -> list[Attempt]:
    raw = yaml.safe_load(path.read_text())
    out = []
    for e in raw:
        steps = e.get("steps") or [e["sql"]]
        steps = tuple(s.replace("{db}", dbname) for s in steps)
        out.append(Attempt(e["id"], steps, e.get("expect", "safe"), e.get("oracle", True), e.get("note", ""),
                           e.get("probe", False)))
    return out


# ---- leak detection -------------------------------------------------------------

def _other_tenants_sql() -> str:
    parts = [
        f"SELECT '{t}' AS tbl, x::text AS row FROM public.{t} AS x WHERE x.tenant_id IS DISTINCT FROM '{TENANT}'"
        for t in OTHER_TENANT_SNAPSHOT_TABLES
    ]
    parts.append("SELECT 'products', x::text FROM public.products AS x")
    return " UNION ALL ".join(parts)


def _own_rows_sql() -> str:
    return " UNION ALL ".join(
        f"SELECT x::text FROM public.{t} AS x WHERE x.tenant_id = '{TENANT}'" for t in OTHER_TENANT_SNAPSHOT_TABLES
    )


OTHER_TENANTS_SQL = _other_tenants_sql()
OWN_ROWS_SQL = _own_rows_sql()
ALL_ROWS_SQL = " UNION ALL ".join(
    f"SELECT '{t}' AS tbl, x::text AS row FROM public.{t} AS x"
    for t in (*(t.name for t in ALL_TABLES), "events", "leads")
)


def reseed(admin: psycopg.Connection) -> None:
    """Put the seed data back (after an attempt committed changes)."""
    with admin.transaction():
        admin.execute("DELETE FROM order_items; DELETE FROM tickets; DELETE FROM orders; DELETE FROM customers;"
                      " DELETE FROM products; DELETE FROM events; DELETE FROM leads;")
        admin.execute(rewrite_schema.seed_sql())
        admin.execute(EXTRA_SEED_SQL)


# ---- running statements ---------------------------------------------------------


@dataclass
class StepOutcome:
    sql: str
    refused: str | None = None
    forwarded: str | None = None
    rows: list = field(default_factory=list)  # every row of every result set (and COPY data)
    last_rows: list | None = None  # the last result set only (what the oracle is compared with)
    error: str | None = None  # "SQLSTATE message detail"
    sqlstate: str | None = None


# Transaction control at the start of a statement (the RLS oracle cannot run those: COMMIT ends its role).
_TCL = re.compile(r"(?:^|;)\s*(?:commit|rollback|begin|end|abort|start\s+transaction|prepare\s+transaction)\b", re.I)
_COPY = re.compile(r"^\s*(?:(?:--[^\n]*\n)|(?:/\*.*?\*/)|\s)*copy\b", re.I | re.S)


def execute_capture(conn: psycopg.Connection, sql: str, prepare: bool = False) -> StepOutcome:
    """Run ``sql`` on ``conn``; capture rows of every result set, COPY output, or the error."""
    out = StepOutcome(sql)
    try:
        with conn.cursor() as cur:
            if _COPY.match(sql):
                with cur.copy(sql) as copy:
                    out.rows.append((b"".join(bytes(b) for b in copy).decode("latin-1"),))
                return out
            cur.execute(sql, prepare=prepare)
            while True:
                if cur.description is not None:
                    out.last_rows = [tuple(r) for r in cur.fetchall()]
                    out.rows.extend(out.last_rows)
                if not cur.nextset():
                    break
    except psycopg.Error as e:
        diag = getattr(e, "diag", None)
        out.sqlstate = getattr(e, "sqlstate", None) or "XX000"
        extra = " ".join(p for p in (diag.message_detail, diag.message_hint, diag.context) if p) if diag else ""
        out.error = f"{out.sqlstate} {str(e).strip()} {extra}".strip()  # every part is scanned for markers
    return out


@dataclass
class AttemptResult:
    attempt: Attempt
    steps: list[StepOutcome]
    findings: list[str] = field(default_factory=list)

    @property
    def refused(self) -> bool:
        return any(s.refused for s in self.steps)

    @property
    def ran(self) -> bool:
        return any(s.forwarded is not None and s.error is None for s in self.steps)


@dataclass
class CorpusReport:
    results: list[AttemptResult]

    @property
    def findings(self) -> list[str]:
        """Every finding: "LEAK: ..." (data of another tenant shown or changed, or a statement
        that must be refused was not), "CRASH: ..." (the engine raised), "MISMATCH: ..." (runs,
        but does not mean what it means under RLS: a rewrite bug, or a count/existence leak)."""
        return [f"{r.attempt.id}: {f}\n    SQL: {r.attempt.text}" for r in self.results for f in r.findings]

    def findings_of(self, *kinds: str) -> list[str]:
        return [f for f in self.findings if f.split(": ", 2)[1] in kinds]

    def summary(self, label: str) -> str:
        n = len(self.results)
        refused = sum(r.refused for r in self.results)
        ran = sum(r.ran and not r.refused for r in self.results)
        failed = sum(bool(r.findings) for r in self.results)
        return (
            f"[{label}] attempts={n} refused={refused} ran={ran} failed_in_postgres={n - refused - ran}"
            f" with_findings={failed}"
        )


def _scan(result: AttemptResult, text: str, where: str) -> None:
    leaks = leaked_markers(text, result.attempt.text)
    if leaks:
        result.findings.append(f"LEAK: other tenant's data in {where}: {leaks[:5]}")


def _rows_text(rows) -> str:
    return "\n".join("\t".join(str(v) for v in r) for r in rows)


def _scan_outcomes(result: AttemptResult) -> None:
    for s in result.steps:
        if s.rows:
            _scan(result, _rows_text(s.rows), f"result of {s.sql!r}")
        if s.error:
            _scan(result, s.error, f"error of {s.sql!r}")


def _check_expect(result: AttemptResult) -> bool:
    """For expect=refuse: record a finding when nothing was refused.  Returns True when it may run."""
    if result.attempt.expect == "refuse" and not result.refused:
        result.findings.append("LEAK: must be refused, but the engine forwarded it: " +
                               " | ".join(repr(s.forwarded) for s in result.steps))
        return False
    return True


# ---- engine level -----------------------------------------------------------------


class EngineCorpusRunner:
    """Runs attempts through ``PolicyEngine.analyze`` and executes what it forwards."""

    def __init__(self, engine, exec_dsn: str, admin_dsn: str, oracle_runner=None, tenant: str = TENANT):
        self.engine = engine
        self.tenant = tenant
        self.exec = psycopg.connect(exec_dsn, autocommit=True, options="-c statement_timeout=10000")
        self.notices: list[str] = []
        self.exec.add_notice_handler(lambda d: self.notices.append(f"{d.message_primary} {d.message_detail or ''}"))
        self.admin = psycopg.connect(admin_dsn, autocommit=True)
        self.oracle = oracle_runner
        self.baseline_other = self._other_rows(self.admin)
        self.baseline_all = self._all_rows(self.admin)

    def close(self) -> None:
        self.exec.close()
        self.admin.close()

    @staticmethod
    def _other_rows(conn) -> list:
        return sorted(conn.execute(OTHER_TENANTS_SQL).fetchall())

    @staticmethod
    def _all_rows(conn) -> list:
        return sorted(conn.execute(ALL_ROWS_SQL).fetchall())

    def _analyze(self, sql: str, prepared: set[str]):
        from proxy.seam import Forward, Origin, Refuse

        try:
            from proxy.policy.context import PolicyContext
        except ImportError:  # only the harness self-test's fake engine gets here
            from types import SimpleNamespace as PolicyContext

        ctx = PolicyContext(tenant=self.tenant, prepared_names=frozenset(prepared))
        analysis = self.engine.analyze(sql, ctx, Origin.SIMPLE)
        decision = analysis.decision
        if isinstance(decision, Refuse):
            return None, f"{decision.sqlstate} {decision.message}", analysis.effects
        assert isinstance(decision, Forward)
        if getattr(analysis.effects, "tenant_token", None):
            # SET tenantgate.tenant: the session gate verifies the signed token (28000 when
            # forged); that is tested end to end, not here.  Not forwarded at this level.
            return None, "delegated to the session gate: tenant token check", analysis.effects
        return decision.sql, None, analysis.effects

    def run(self, attempt: Attempt) -> AttemptResult:
        result = AttemptResult(attempt, [])
        prepared: set[str] = set()
        plan = []
        for sql in attempt.steps:
            try:
                forwarded, refused, effects = self._analyze(sql, prepared)
            except Exception as e:  # a crash is a bug (fail closed means Refuse, not an exception)
                result.findings.append(f"CRASH: engine raised {type(e).__name__}: {e}")
                forwarded, refused, effects = None, "crash", None
            step = StepOutcome(sql, refused=refused, forwarded=forwarded)
            result.steps.append(step)
            if forwarded is not None and effects is not None:
                prepared |= set(effects.prepared)
                prepared -= set(effects.deallocated)
                if effects.deallocate_all:
                    prepared.clear()
            plan.append(step)
        if not _check_expect(result):
            return result
        self.notices.clear()
        self.exec.execute("BEGIN")
        try:
            for step in plan:
                if step.forwarded is None:
                    continue
                done = execute_capture(self.exec, step.forwarded)
                step.rows, step.last_rows, step.error, step.sqlstate = done.rows, done.last_rows, done.error, done.sqlstate
                status = self.exec.info.transaction_status
                if status == psycopg.pq.TransactionStatus.INERROR:
                    self.exec.execute("ROLLBACK; BEGIN")  # an error voided the transaction's changes
                elif self._other_rows(self.exec) != self.baseline_other:
                    result.findings.append(f"LEAK: changed another tenant's rows (or a shared table) in {step.sql!r}")
            in_tx = self.exec.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
            if in_tx:
                own = "\n".join(r[0] for r in self.exec.execute(OWN_ROWS_SQL).fetchall())
                _scan(result, own, "the tenant's own rows afterwards")
                full_state = tuple(sorted(self.exec.execute(rewrite_schema.snapshot_sql(TENANT_TABLES)).fetchall()))
            else:
                full_state = None
        finally:
            if self.exec.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                self.exec.execute("ROLLBACK")
        _scan_outcomes(result)
        if self.notices:
            _scan(result, "\n".join(self.notices), "notices")
        if self._all_rows(self.admin) != self.baseline_all:
            if self._other_rows(self.admin) != self.baseline_other:
                result.findings.append("LEAK: committed a change to another tenant's rows")
            reseed(self.admin)
        if attempt.oracle and self.oracle is not None and len(attempt.steps) == 1 and not _TCL.search(attempt.text):
            self._compare_with_rls(result, full_state)
            if self._all_rows(self.admin) != self.baseline_all:  # the oracle itself committed something
                reseed(self.admin)
        return result

    def _compare_with_rls(self, result: AttemptResult, full_state) -> None:
        step = result.steps[0]
        if step.forwarded is None:
            return
        if _COPY.match(step.sql):
            self._compare_copy_with_rls(result, step)
            return
        oracle = self.oracle.oracle(step.sql)
        if oracle.sqlstate == "42501" and step.error is None and "row-level security" in (oracle.message or ""):
            result.findings.append(f"MISMATCH: RLS rejects it as a tenant violation ({oracle.message}) but the rewrite runs")
            return
        if not oracle.ok:
            return
        if step.error:
            result.findings.append(f"MISMATCH: fails ({step.error[:160]}) where RLS succeeds: an error channel or a rewrite bug")
            return
        import collections

        mine = [tuple(_norm(v) for v in r) for r in (step.last_rows or [])]
        if oracle.rows is not None and collections.Counter(oracle.rows) != collections.Counter(mine):
            result.findings.append(f"MISMATCH: rows differ from RLS: RLS {oracle.rows[:8]} rewritten {mine[:8]}")
        if full_state is not None and oracle.state is not None and oracle.state != full_state:
            result.findings.append("MISMATCH: database state afterwards differs from RLS")


    def _compare_copy_with_rls(self, result: AttemptResult, step: StepOutcome) -> None:
        conn = self.oracle.conn
        conn.execute(
            f"BEGIN; SET LOCAL ROLE {rewrite_schema.ORACLE_ROLE}; SET LOCAL app.tenant = '{self.tenant}'", prepare=False
        )
        try:
            oracle = execute_capture(conn, step.sql)
        finally:
            conn.execute("ROLLBACK")
        if oracle.error is not None or step.error is not None:
            return
        if sorted(_rows_text(oracle.rows).splitlines()) != sorted(_rows_text(step.rows).splitlines()):
            result.findings.append("MISMATCH: COPY output differs from RLS")


def run_corpus_with_engine(engine, exec_dsn: str, admin_dsn: str, dbname: str, oracle_runner=None) -> CorpusReport:
    runner = EngineCorpusRunner(engine, exec_dsn, admin_dsn, oracle_runner)
    try:
        return CorpusReport([runner.run(a) for a in load_corpus(dbname=dbname)])
    finally:
        runner.close()


# ---- end to end through the proxy -------------------------------------------------


def run_corpus_against_dsn(tenant_dsn: str, admin_dsn: str, dbname: str, protocol: str = "simple",
                           ids: set[str] | None = None, oracle_runner=None) -> CorpusReport:
    """Run the corpus as tenant A through a running tenantgate (see module docstring).

    ``tenant_dsn`` must be bound to tenant A of the schema from
    :func:`install_adversarial_schema`; ``ids`` limits the run to some attempts.
    With ``oracle_runner`` (a rewrite_oracle.StatementRunner on ``admin_dsn``), the rows
    of single-statement attempts are also compared with the original under RLS.
    An error returned by the proxy counts as a refusal (the client cannot tell
    a refusal from a PostgreSQL error, and neither has an effect).
    """
    assert protocol in ("simple", "extended")
    prepare = protocol == "extended"
    admin = psycopg.connect(admin_dsn, autocommit=True)
    baseline_other = EngineCorpusRunner._other_rows(admin)
    baseline_all = EngineCorpusRunner._all_rows(admin)
    results = []
    try:
        for attempt in load_corpus(dbname=dbname):
            if ids is not None and attempt.id not in ids:
                continue
            result = AttemptResult(attempt, [])
            expected = None
            if (oracle_runner is not None and attempt.oracle and len(attempt.steps) == 1
                    and not _TCL.search(attempt.text) and not _COPY.match(attempt.text)):
                expected = oracle_runner.oracle(attempt.steps[0])
            with psycopg.connect(tenant_dsn, autocommit=True) as conn:
                notices: list[str] = []
                conn.add_notice_handler(lambda d, notices=notices: notices.append(f"{d.message_primary} {d.message_detail or ''}"))
                execute_capture(conn, "BEGIN")
                for sql in attempt.steps:
                    step = execute_capture(conn, sql, prepare=prepare)
                    step.forwarded = None if step.error else sql
                    step.refused = step.error
                    result.steps.append(step)
                    if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
                        execute_capture(conn, "ROLLBACK")
                        execute_capture(conn, "BEGIN")
                execute_capture(conn, "COMMIT")
            if attempt.expect == "refuse" and not any(s.error for s in result.steps):
                result.findings.append("LEAK: must be refused, but it ran")
            step = result.steps[-1]
            if expected is not None and expected.ok and step.error is None and expected.rows is not None:
                import collections

                mine = [tuple(_norm(v) for v in r) for r in (step.last_rows or [])]
                if collections.Counter(mine) != collections.Counter(expected.rows):
                    result.findings.append(f"MISMATCH: rows differ from RLS: RLS {expected.rows[:8]} got {mine[:8]}")
            _scan_outcomes(result)
            if notices:
                _scan(result, "\n".join(notices), "notices")
            if EngineCorpusRunner._all_rows(admin) != baseline_all:
                if EngineCorpusRunner._other_rows(admin) != baseline_other:
                    result.findings.append("LEAK: changed another tenant's rows (or a shared table)")
                own = "\n".join(r[0] for r in admin.execute(OWN_ROWS_SQL).fetchall())
                _scan(result, own, "the tenant's own rows afterwards")
                reseed(admin)
            results.append(result)
    finally:
        admin.close()
    return CorpusReport(results)
