"""Pure units of the observability code: refusal reasons, per-tenant label policy, log formats."""

from __future__ import annotations

import io
import json
import logging

import pytest

from proxy.logformat import JsonFormatter, configure_logging
from proxy.policy.errors import PolicyRefusal
from proxy.policy.refusal_reason import REASONS, derive_reason, refusal_reason
from proxy.seam import Refuse
from proxy.session_events import TenantLabels, emit, note_refusal


@pytest.mark.parametrize("sqlstate, message, want", [
    ("42601", "syntax error", "parse"),
    ("0A000", "LISTEN is not supported", "unsupported"),
    ("25006", "cannot execute UPDATE in a read-only transaction", "read_only"),
    ("28000", "invalid tenant token", "auth"),
    ("42P01", 'relation "x" does not exist', "tenant"),
    ("58000", "statement not run: the audit log could not be written", "audit"),
    ("XX000", "internal error in tenantgate while checking the statement", "internal"),
    ("42501", "FunctionCall messages are not allowed", "function"),
    ("42501", "bound parameter $1 is not allowed: must be this tenant", "tenant"),
    ("42501", "reading system catalog pg_catalog.pg_authid is not allowed", "catalog"),
    ("42501", "COPY to or from a server file is not allowed", "storage"),
    ("57P01", "terminating connection: tenantgate grant 3 for tenant acme expired", "grant"),
    ("42501", "nothing recognisable", "other"),
])
def test_derived_reasons(sqlstate, message, want):
    assert derive_reason(sqlstate, message) == want
    assert want in REASONS


def test_explicit_reason_wins_and_is_bounded():
    assert refusal_reason(Refuse("42501", "function pg_read_file is not allowed", reason="storage")) == "storage"
    assert refusal_reason(Refuse("42501", "x", reason="made-up")) == "other"
    assert PolicyRefusal("42501", "x", reason="catalog").to_refuse().reason == "catalog"
    # the reason is metadata: refusals compare equal without it
    assert Refuse("42501", "x", reason="catalog") == Refuse("42501", "x")


def test_top_n_tenant_labels_are_bounded():
    labels = TenantLabels("top", top_n=2)
    seen: dict[str, float] = {}

    class Child:
        def __init__(self, label):
            self.label = label

        def inc(self, n):
            seen[self.label] = seen.get(self.label, 0) + n

    labels.child = lambda label: Child(label)  # record instead of touching the real counter
    for i in range(20):
        labels.add(f"t{i}", 1)
    labels.add("big", 1000)
    labels.add(None, 2)
    named = {k for k in seen if k not in ("other", "none")}
    assert len(named) <= 4  # at most 2 * top_n tenants ever get their own label
    assert seen["none"] == 2
    assert sum(seen.values()) == 20 + 1000 + 2
    off = TenantLabels("off")
    off.add("x", 5)  # no-op


def test_json_formatter_merges_event_fields():
    rec = logging.LogRecord("tenantgate.events", logging.INFO, __file__, 1, "%s", ("refusal x",), None)
    rec.event = {"event": "refusal", "reason": "storage", "sqlstate": "42501", "tenant": None}
    line = json.loads(JsonFormatter(worker=1).format(rec))
    assert line["event"] == "refusal" and line["reason"] == "storage" and line["worker"] == 1
    assert "tenant" not in line and line["level"] == "info" and line["ts"].endswith("Z")


def test_text_and_json_event_lines_and_levels():
    for fmt in ("text", "json"):
        stream = io.StringIO()
        settings = type("S", (), {"format": fmt, "level": None, "events": True, "statement_max_chars": 10})()
        configure_logging(settings, stream=stream)
        session = type("Session", (), {"kind_label": "tenant", "user": "acme_app", "gate": None,
                                       "session_id": "abc"})()
        assert note_refusal(session, "SELECT pg_read_file('/etc/passwd')", Refuse("42501", "no", reason="storage")) \
            == "storage"
        logging.getLogger("tenantgate.session").info("not shown at the default level")
        out = stream.getvalue()
        assert "not shown" not in out
        if fmt == "json":
            line = json.loads(out.strip().splitlines()[-1])
            assert line["statement"] == "SELECT pg_..." and line["user"] == "acme_app"
        else:
            assert "refusal sqlstate=42501 reason=storage" in out and 'statement="SELECT pg_..."' in out
    off = type("S", (), {"format": "text", "level": "info", "events": False, "statement_max_chars": 200})()
    stream = io.StringIO()
    configure_logging(off, stream=stream)
    emit({"event": "connection", "outcome": "accepted"})
    assert "connection" not in stream.getvalue()
    logging.getLogger().handlers.clear()
    logging.getLogger("tenantgate.events").setLevel(logging.NOTSET)
    logging.getLogger().setLevel(logging.WARNING)


def test_logged_statement_literals_are_redacted():
    from proxy.session_events import redact_literals

    sql = ("SELECT \"it's\", t1.a FROM t1 WHERE id = 42 AND x = $1 AND y = 'it''s' AND z = E'a\\'b' "
           "AND w = $q$secret$q$ AND v = 1.5e3")
    assert redact_literals(sql) == ("SELECT \"it's\", t1.a FROM t1 WHERE id = ? AND x = $1 AND y = '?' "
                                    "AND z = '?' AND w = '?' AND v = ?")
    assert redact_literals("SELECT 'never closed secret") == "SELECT '?'"


# ---- the policy passes set the reason of their refusals ----------------------------------------

@pytest.fixture(scope="module")
def engine():
    from proxy.policy.allowlist import FunctionChecker
    from support.demo_policy import demo_engine

    return demo_engine(FunctionChecker.default())


@pytest.mark.parametrize("sql, reason", [
    ("SELECT pg_read_file('/etc/passwd')", "storage"),
    ("SELECT lo_import('/etc/passwd')", "storage"),
    ("COPY orders TO PROGRAM 'id'", "storage"),
    ("COPY orders FROM '/tmp/x'", "storage"),
    ("SELECT * FROM pg_authid", "catalog"),
    ("SELECT * FROM pg_stats", "catalog"),
    ("SELECT * FROM tenantgate_control.grants", "catalog"),
    ("SELECT query_to_xml('select 1', true, true, '')", "function"),
    ("SELECT dblink('x', 'select 1')", "function"),
    ("CREATE TABLE t (a int)", "unsupported"),
    ("DO $$ BEGIN END $$", "unsupported"),
    ("SET ROLE postgres", "unsupported"),
    ("LISTEN ch", "unsupported"),
    ("SELECT FROM WHERE (((", "parse"),
    ("SELECT * FROM no_such_table", "tenant"),
    ("INSERT INTO orders (tenant_id, order_id, customer_id) VALUES ('globex', 1, 1)", "tenant"),
])
def test_policy_refusals_carry_their_reason(engine, sql, reason):
    from proxy.policy.context import PolicyContext
    from proxy.seam import Origin

    d = engine.check(sql, PolicyContext(tenant="acme"), Origin.SIMPLE)
    assert isinstance(d, Refuse), d
    assert refusal_reason(d) == reason, d


def test_read_only_and_missing_tenant_reasons(engine):
    from proxy.policy.context import PolicyContext
    from proxy.seam import Origin

    d = engine.check("DELETE FROM orders", PolicyContext(tenant="acme", read_only=True), Origin.SIMPLE)
    assert isinstance(d, Refuse) and d.reason == "read_only" and refusal_reason(d) == "read_only"
    d = engine.check("SELECT * FROM orders", PolicyContext(tenant=None), Origin.SIMPLE)
    assert isinstance(d, Refuse) and refusal_reason(d) == "tenant"
