"""TenantSessionGate: credential-bound tenants, signed tenant tokens, SET LOCAL, read-only."""

from __future__ import annotations

import time

import jwt
import pytest

from proxy.policy.demo import demo_engine
from proxy.policy.session import TenantSessionGate, make_token, open_tenant_session, verify_token
from proxy.seam import Forward, Origin, Refuse, SessionKind, SessionRefused, StartupInfo, UserRecord

KEY = "k" * 64


@pytest.fixture(scope="module")
def engine():
    return demo_engine()


def startup(**options):
    return StartupInfo("app", "db", "127.0.0.1:1", options, None, "s1", False)


def user(tenant=None, tokens=False):
    return UserRecord("app", "SCRAM-SHA-256$x", SessionKind.TENANT, tenant=tenant, token_tenants=tokens)


def test_credential_bound_gate(engine):
    gate = open_tenant_session(engine, user("acme"), startup())
    assert gate.kind == SessionKind.TENANT and gate.audited is False
    assert gate.backend_setup_sql == ("SET tenantgate.tenant_id = 'acme'",)
    d = gate.check("SELECT * FROM orders", Origin.SIMPLE)
    assert isinstance(d, Forward) and "'acme'" in d.sql
    # a bound user cannot switch tenants with a token
    d = gate.check(f"SET tenantgate.tenant = '{make_token('globex', KEY)}'", Origin.SIMPLE)
    assert isinstance(d, Refuse) and d.sqlstate == "42501"


def test_token_set_switches_tenant_and_backstop(engine):
    gate = open_tenant_session(engine, user(tokens=True), startup(), token_key=KEY)
    assert gate.check("SELECT * FROM orders", Origin.SIMPLE).sqlstate == "42501"  # no tenant yet
    assert isinstance(gate.check("SELECT 1", Origin.SIMPLE), Forward)
    d = gate.check(f"SET tenantgate.tenant = '{make_token('globex', KEY)}'", Origin.SIMPLE)
    assert d == Forward("SET tenantgate.tenant_id = 'globex'", statement_class="set")
    assert "'globex'" in gate.check("SELECT * FROM orders", Origin.SIMPLE).sql


@pytest.mark.parametrize(
    "token",
    [
        make_token("globex", "wrong-key-wrong-key-wrong-key-123"),
        jwt.encode({"tenant": "globex", "exp": int(time.time()) - 10}, KEY, algorithm="HS256"),
        jwt.encode({"tenant": "globex"}, KEY, algorithm="HS256"),
        jwt.encode({"exp": int(time.time()) + 60}, KEY, algorithm="HS256"),
        jwt.encode({"tenant": "globex", "exp": int(time.time()) + 60}, KEY, algorithm="HS512"),
        "not-a-token",
        "",
    ],
)
def test_bad_tokens_refused_28000(engine, token):
    gate = open_tenant_session(engine, user(tokens=True), startup(), token_key=KEY)
    d = gate.check(f"SET tenantgate.tenant = '{token}'", Origin.SIMPLE)
    assert isinstance(d, Refuse) and d.sqlstate == "28000", d
    assert gate.tenant is None
    with pytest.raises(SessionRefused) as e:
        open_tenant_session(engine, user(tokens=True), startup(**{"tenantgate.tenant": token}), token_key=KEY)
    assert e.value.sqlstate == "28000"


def test_token_in_startup_options(engine):
    gate = open_tenant_session(
        engine, user(tokens=True), startup(**{"tenantgate.tenant": make_token("acme", KEY)}), token_key=KEY
    )
    assert gate.tenant == "acme" and gate.backend_setup_sql == ("SET tenantgate.tenant_id = 'acme'",)


def test_set_local_reverts_at_transaction_end(engine):
    gate = open_tenant_session(engine, user(tokens=True), startup(), token_key=KEY)
    gate.check(f"SET tenantgate.tenant = '{make_token('acme', KEY)}'", Origin.SIMPLE)
    gate.on_ready_for_query(b"I")
    gate.check("BEGIN", Origin.SIMPLE)
    gate.on_ready_for_query(b"T")
    d = gate.check(f"SET LOCAL tenantgate.tenant = '{make_token('globex', KEY)}'", Origin.SIMPLE)
    assert d.sql == "SET LOCAL tenantgate.tenant_id = 'globex'"
    gate.on_ready_for_query(b"T")
    assert "'globex'" in gate.check("SELECT * FROM orders", Origin.SIMPLE).sql
    # a session-level SET inside a transaction would be undone by ROLLBACK: refused
    d = gate.check(f"SET tenantgate.tenant = '{make_token('globex', KEY)}'", Origin.SIMPLE)
    assert isinstance(d, Refuse)
    epoch = gate.tenant_epoch
    gate.on_ready_for_query(b"I")
    assert gate.tenant_epoch == epoch + 1  # back from globex to acme
    assert "'acme'" in gate.check("SELECT * FROM orders", Origin.SIMPLE).sql


def test_token_set_must_be_alone(engine):
    gate = open_tenant_session(engine, user(tokens=True), startup(), token_key=KEY)
    d = gate.check(f"SET tenantgate.tenant = '{make_token('acme', KEY)}'; SELECT * FROM orders", Origin.SIMPLE)
    assert isinstance(d, Refuse) and d.sqlstate == "0A000"


def test_prepared_names_tracked(engine):
    gate = open_tenant_session(engine, user("acme"), startup())
    assert gate.check("EXECUTE p", Origin.SIMPLE).sqlstate == "42501"
    assert isinstance(gate.check("PREPARE p AS SELECT * FROM orders", Origin.SIMPLE), Forward)
    assert gate.check("EXECUTE p", Origin.SIMPLE) == Forward("EXECUTE p", statement_class="other")
    gate.check("DEALLOCATE p", Origin.SIMPLE)
    assert gate.check("EXECUTE p", Origin.SIMPLE).sqlstate == "42501"


def test_read_only_gate(engine):
    gate = TenantSessionGate(engine, "acme", read_only=True, read_only_message="grant is read-only")
    d = gate.check("UPDATE orders SET status = 'x'", Origin.SIMPLE)
    assert d == Refuse("25006", "grant is read-only")
    assert isinstance(gate.check("SELECT * FROM orders", Origin.SIMPLE), Forward)


def test_user_without_tenant_or_tokens_refused(engine):
    with pytest.raises(SessionRefused):
        open_tenant_session(engine, user(), startup())


def test_verify_token_roundtrip():
    assert verify_token(make_token("acme", KEY, ttl_s=60), KEY) == "acme"
