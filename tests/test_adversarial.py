"""Adversarial suite (issue 3): hand-written tenant-escape attempts must fail.

The corpus is tests/data/adversarial.yaml; the machinery is tests/support/adversarial.py.
Each attempt, made as tenant A, must be refused by the policy engine, or,
when what the engine forwards runs on a real database as a role WITHOUT
row-level security, show no other tenant's data (marker values of tenants B
and C in rows, COPY output, errors, notices, or copied into A's own rows),
change no other tenant's row, and (for most) give exactly what PostgreSQL RLS
gives for tenant A.

The first tests check the harness itself: the corpus is well formed, and an
"engine" that forwards everything unchanged is caught many times over.
"""

from __future__ import annotations

import collections

import pytest
import yaml

from support.adversarial import (
    BACKEND_PASSWORD,
    BACKEND_ROLE,
    CORPUS_PATH,
    install_adversarial_schema,
    leaked_markers,
    load_corpus,
    run_corpus_against_dsn,
    run_corpus_with_engine,
)
from support.rewrite_oracle import StatementRunner, build_engine

MIN_ATTEMPTS = 150


@pytest.fixture(scope="module")
def adv_db(pg, make_db):
    name, dsn = make_db("adversarial")
    install_adversarial_schema(dsn)
    return name, dsn, pg.dsn(BACKEND_ROLE, BACKEND_PASSWORD, name)


@pytest.fixture(scope="module")
def oracle_runner(adv_db):
    r = StatementRunner(adv_db[1])
    yield r
    r.close()


def test_corpus_is_well_formed():
    raw = yaml.safe_load(CORPUS_PATH.read_text())
    corpus = load_corpus()
    assert len(corpus) >= MIN_ATTEMPTS
    ids = [a.id for a in corpus]
    assert len(ids) == len(set(ids)), [i for i, n in collections.Counter(ids).items() if n > 1]
    for entry in raw:
        assert set(entry) <= {"id", "sql", "steps", "expect", "oracle", "note", "probe"}, entry
        if entry.get("probe"):
            assert entry.get("note"), f"a probe says what it probes: {entry}"
        assert ("sql" in entry) != ("steps" in entry), entry
        assert entry.get("expect", "safe") in ("safe", "refuse"), entry
    text = "\n".join(a.text.lower() for a in corpus)
    for topic in ("--", "/*", "$$", "u&", "e'", "with recursive", "public.", "all_orders", "query_to_xml",
                  "pg_stats", "nextval", "copy", "declare", "prepare", "; select", "set role", "do $$",
                  "explain analyze", "union", "on conflict", "merge", "lateral", "over (", "offset",
                  "table orders", "only orders", "ctid", "->>", "listen", "from program"):
        assert topic in text, f"corpus lacks {topic!r}"


def test_marker_detector():
    assert leaked_markers("('cust-B-2', 3)", "SELECT 1") == ["cust-B-2"]
    assert leaked_markers("<name>c1@c.example</name>", "") == ["c1@c.example"]
    assert leaked_markers("('cust-A-1',)", "") == []
    assert leaked_markers("Key (code)=(T-B-1) already exists", "VALUES ('T-B-1')") == []


class _ForwardEverything:
    """A deliberately broken 'engine': forwards every statement unchanged."""

    class _Analysis:
        def __init__(self, sql):
            from proxy.seam import Forward

            self.decision = Forward(sql)
            self.effects = None

    def analyze(self, sql, ctx, origin):
        return self._Analysis(sql)


def test_harness_catches_an_engine_that_filters_nothing(adv_db, oracle_runner):
    name, dsn, exec_dsn = adv_db
    report = run_corpus_with_engine(_ForwardEverything(), exec_dsn, dsn, name, oracle_runner)
    flagged = {r.attempt.id for r in report.results if r.findings}
    print("\n" + report.summary("forward-everything"))
    # leaks of every kind are noticed: rows, writes, counts (via RLS), COPY, errors, must-refuse
    for attempt_id in ("comment-line-hides-filter", "update-other-tenant", "count-all", "copy-table-out",
                       "insert-other-tenant", "query-to-xml", "backslash-is-not-escape",
                       "union-all-unfiltered", "division-by-zero-existence", "prepare-param-other-tenant",
                       "cursor-declare-fetch", "multi-select-then-table", "explain-analyze-update-other"):
        assert attempt_id in flagged, attempt_id
    # every attempt that is an attack (not a probe) must be caught when nothing filters: an
    # attack the harness cannot see failing proves nothing when the engine passes it
    blind = sorted(r.attempt.id for r in report.results if not r.findings and not r.attempt.probe)
    assert not blind, f"{len(blind)} attacks not flagged under forward-everything: {blind}"
    assert len(flagged) >= MIN_ATTEMPTS


@pytest.fixture(scope="module")
def engine_report(adv_db, oracle_runner):
    name, dsn, exec_dsn = adv_db
    engine = build_engine(dsn)  # no skip: a broken import fails the security tests
    report = run_corpus_with_engine(engine, exec_dsn, dsn, name, oracle_runner)
    print("\n" + report.summary("engine"))
    return report


def test_adversarial_corpus_leaks_nothing(engine_report):
    """Security: no attempt shows or changes another tenant's data; what must be refused is."""
    findings = engine_report.findings_of("LEAK", "CRASH")
    assert not findings, f"{len(findings)} findings:\n" + "\n".join(findings)


def test_adversarial_corpus_means_what_rls_means(engine_report):
    """Exactness: what runs gives the same rows and effects as under RLS (no count or error channels)."""
    findings = engine_report.findings_of("MISMATCH")
    assert not findings, f"{len(findings)} findings:\n" + "\n".join(findings)


# A few attempts that leak in every way when nothing filters (used to check the
# end-to-end runner itself against a proxy without any policy).
E2E_SELF_CHECK = {
    "union-all-unfiltered": True,        # rows of B and C
    "update-other-tenant": True,         # changes B's rows
    "copy-table-out": False,             # COPY output: no markers in orders, and COPY is not compared with RLS here
    "copy-binary": True,
    "cursor-declare-fetch": True,
    "prepare-param-other-tenant": True,
    "set-app-tenant": True,              # must be refused, but passthrough runs it
    "count-all": True,                   # no marker: caught by the comparison with RLS
}


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_end_to_end_runner_flags_a_proxy_without_policy(pg, adv_db, oracle_runner, protocol):
    """run_corpus_against_dsn works through a real tenantgate (here: passthrough, so it must complain).

    The lead hooks the same function up to a tenant session of the real policy.
    """
    from support.proxy_harness import make_config, start_proxy

    name, dsn, _ = adv_db
    config = make_config(pg, name, {"h4_app": "h4-app-pw"}, backend_user=BACKEND_ROLE,
                         backend_password=BACKEND_PASSWORD)
    proxy = start_proxy(config)
    try:
        report = run_corpus_against_dsn(proxy.dsn("h4_app", "h4-app-pw"), dsn, name, protocol, set(E2E_SELF_CHECK),
                                        oracle_runner=oracle_runner)
    finally:
        proxy.stop()
    flagged = {r.attempt.id for r in report.results if r.findings}
    expected = {i for i, leaks in E2E_SELF_CHECK.items() if leaks}
    assert expected <= flagged, (expected - flagged, report.findings)


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_adversarial_corpus_through_tenantgate(pg, adv_db, oracle_runner, tmp_path, protocol):
    """The whole corpus end to end: tenant A's session through a real tenantgate with the
    production gatekeeper (proxy.gatekeeper.build_gatekeeper), over the simple protocol and the
    extended protocol (every statement a Parse/Bind/Execute).  The backend role has BYPASSRLS,
    so only tenantgate separates the tenants."""
    from proxy.gatekeeper import build_gatekeeper  # no skip: a broken import fails
    from support.proxy_harness import make_config, start_proxy

    from support import rewrite_schema

    name, dsn, _ = adv_db
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump(rewrite_schema.rules_dict()))
    config = make_config(pg, name, [{"name": "h4_tenant_a", "password": "h4-a-pw", "tenant": "A"}],
                         backend_user=BACKEND_ROLE, backend_password=BACKEND_PASSWORD,
                         rules_file=str(rules_file))
    proxy = start_proxy(config, build_gatekeeper)
    try:
        report = run_corpus_against_dsn(proxy.dsn("h4_tenant_a", "h4-a-pw"), dsn, name, protocol,
                                        oracle_runner=oracle_runner)
    finally:
        proxy.stop()
    print("\n" + report.summary(f"tenantgate/{protocol}"))
    assert len(report.results) >= MIN_ATTEMPTS
    findings = report.findings
    assert not findings, f"{len(findings)} findings:\n" + "\n".join(findings)
