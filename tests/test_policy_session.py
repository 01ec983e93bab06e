"""TenantSessionGate: credential-bound tenants, signed tenant tokens, SET LOCAL, read-only."""

from __future__ import annotations

import time

import jwt
import pytest

from support.demo_policy import demo_engine
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
    assert d == Forward("SET tenantgate.tenant_id = 'globex'", statement_class="set", single_use=True)
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
    # EXECUTE takes the class of the statement it runs (issue 20 break 12)
    assert gate.check("EXECUTE p", Origin.SIMPLE) == Forward("EXECUTE p", statement_class="read")
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


# ---- prepared statements follow a tenant switch (token sessions) ------------------------------
GUC_REF = "(pg_catalog.current_setting('tenantgate.tenant_id')::pg_catalog.text)"


def _token_gate(engine, tenant="globex"):
    gate = open_tenant_session(engine, user(tokens=True), startup(), token_key=KEY)
    gate.check(f"SET tenantgate.tenant = '{make_token(tenant, KEY)}'", Origin.SIMPLE)
    gate.on_ready_for_query(b"I")
    return gate


def test_token_session_parse_references_the_backend_guc(engine):
    gate = _token_gate(engine)
    d = gate.check("SELECT tenant_id, count(*) FROM orders GROUP BY 1", Origin.PARSE)
    assert isinstance(d, Forward) and GUC_REF in d.sql and "'globex'" not in d.sql
    # no parameter is added: the client's parameter count and Describe stay the same
    assert "$" not in d.sql
    # simple queries run once: they keep the literal
    assert "'globex'" in gate.check("SELECT * FROM orders", Origin.SIMPLE).sql
    # credential-bound sessions never switch: literals everywhere
    bound = open_tenant_session(engine, user("acme"), startup())
    assert "'acme'" in bound.check("SELECT * FROM orders", Origin.PARSE).sql


def test_token_session_sql_prepare_body_references_the_guc(engine):
    gate = _token_gate(engine)
    d = gate.check("SELECT * FROM customers; PREPARE p AS SELECT * FROM orders", Origin.SIMPLE)
    assert isinstance(d, Forward)
    first, second = d.sql.split(";", 1)
    assert "'globex'" in first and GUC_REF not in first
    assert GUC_REF in second and "'globex'" not in second
    bound = open_tenant_session(engine, user("acme"), startup())
    assert "'acme'" in bound.check("PREPARE p AS SELECT * FROM orders", Origin.SIMPLE).sql


def test_param_checks_read_the_tenant_at_bind_time(engine):
    gate = _token_gate(engine, "globex")
    d = gate.check("INSERT INTO customers (tenant_id, customer_id, name) VALUES ($1, $2, $3)", Origin.PARSE)
    assert isinstance(d, Forward) and [i for i, _ in d.param_checks] == [0]
    check = d.param_checks[0][1]
    assert check.accepts(0, b"globex") and not check.accepts(0, b"acme")
    gate.check(f"SET tenantgate.tenant = '{make_token('acme', KEY)}'", Origin.SIMPLE)
    gate.on_ready_for_query(b"I")
    assert check.accepts(0, b"acme") and not check.accepts(0, b"globex")
    # checks are per session: another session's Parse of the same text is not affected
    other = _token_gate(engine, "globex")
    d2 = other.check("INSERT INTO customers (tenant_id, customer_id, name) VALUES ($1, $2, $3)", Origin.PARSE)
    assert d2.param_checks[0][1].accepts(0, b"globex") and check.accepts(0, b"acme")


def test_copy_in_check_reads_the_tenant_at_copy_time(engine):
    gate = _token_gate(engine, "globex")
    d = gate.check("COPY customers (tenant_id, customer_id) FROM STDIN", Origin.PARSE)
    gate.check(f"SET tenantgate.tenant = '{make_token('acme', KEY)}'", Origin.SIMPLE)
    gate.on_ready_for_query(b"I")
    c = d.copy_in_check()
    assert c.feed(b"acme\t1\n") is None
    assert "not the session's tenant" in c.feed(b"globex\t2\n")


def test_clients_cannot_move_the_tenant_guc():
    from proxy.policy.allowlist import FunctionChecker
    from support.demo_policy import demo_rules

    gate = _token_gate(demo_engine(FunctionChecker.from_rules(demo_rules())))
    for sql in ["SET tenantgate.tenant_id = 'acme'", "SET LOCAL tenantgate.tenant_id = 'acme'",
                'SET "tenantgate.tenant_id" = \'acme\'', "SET TenantGate.Tenant_Id TO 'acme'",
                "RESET tenantgate.tenant_id", "RESET ALL", "DISCARD ALL",
                "SELECT set_config('tenantgate.tenant_id', 'acme', false)",
                "SELECT pg_catalog.set_config('tenantgate.tenant_id', 'acme', true)"]:
        for origin in (Origin.SIMPLE, Origin.PARSE):
            assert isinstance(gate.check(sql, origin), Refuse), (sql, origin)


# ---- tenant lifecycle when a token switches the tenant ----------------------------------------
def _status(tenant):
    from proxy.policy.errors import PolicyRefusal

    if tenant == "gone":
        raise PolicyRefusal("28000", 'tenant "gone" has been purged')
    if tenant == "leaving":
        return True, 'tenant "leaving" is offboarded'
    return False, None


def test_token_switch_applies_the_new_tenants_lifecycle(engine):
    gate = open_tenant_session(engine, user(tokens=True), startup(), token_key=KEY, tenant_status=_status)
    gate.on_ready_for_query(b"I")
    assert isinstance(gate.check(f"SET tenantgate.tenant = '{make_token('leaving', KEY)}'", Origin.SIMPLE), Forward)
    gate.on_ready_for_query(b"I")
    assert isinstance(gate.check("SELECT * FROM orders", Origin.SIMPLE), Forward)
    assert gate.check("UPDATE orders SET status = 'x'", Origin.SIMPLE) == Refuse("25006", 'tenant "leaving" is offboarded')
    # a purged tenant's token is refused at SET time and nothing changes
    d = gate.check(f"SET tenantgate.tenant = '{make_token('gone', KEY)}'", Origin.SIMPLE)
    assert isinstance(d, Refuse) and d.sqlstate == "28000" and gate.tenant == "leaving"
    d = gate.check(f"SET tenantgate.tenant = '{make_token('acme', KEY)}'", Origin.SIMPLE)
    gate.on_ready_for_query(b"I")
    assert isinstance(gate.check("UPDATE orders SET status = 'x'", Origin.SIMPLE), Forward)
    # SET LOCAL: the offboarded tenant's read-only status ends with the transaction
    gate.check("BEGIN", Origin.SIMPLE)
    gate.on_ready_for_query(b"T")
    gate.check(f"SET LOCAL tenantgate.tenant = '{make_token('leaving', KEY)}'", Origin.SIMPLE)
    gate.on_ready_for_query(b"T")
    assert gate.check("DELETE FROM orders", Origin.SIMPLE).sqlstate == "25006"
    assert gate.check(f"SET LOCAL tenantgate.tenant = '{make_token('gone', KEY)}'", Origin.SIMPLE).sqlstate == "28000"
    gate.on_ready_for_query(b"I")
    assert gate.tenant == "acme" and isinstance(gate.check("DELETE FROM orders", Origin.SIMPLE), Forward)


@pytest.mark.allow_tracebacks("the status hook raises on purpose")
def test_a_failing_status_hook_refuses_the_switch(engine):
    def broken(tenant):
        raise RuntimeError("control plane down")

    gate = open_tenant_session(engine, user(tokens=True), startup(), token_key=KEY, tenant_status=broken)
    d = gate.check(f"SET tenantgate.tenant = '{make_token('acme', KEY)}'", Origin.SIMPLE)
    assert isinstance(d, Refuse) and d.sqlstate == "28000" and gate.tenant is None


def test_a_set_local_only_tenant_keeps_literals(engine):
    # without a session-level tenant the backend GUC falls back to '' when the transaction ends:
    # a statement parsed under SET LOCAL alone must not follow it (it keeps its literal)
    gate = open_tenant_session(engine, user(tokens=True), startup(), token_key=KEY)
    gate.on_ready_for_query(b"T")
    gate.check(f"SET LOCAL tenantgate.tenant = '{make_token('globex', KEY)}'", Origin.SIMPLE)
    d = gate.check("SELECT * FROM orders", Origin.PARSE)
    assert "'globex'" in d.sql and "current_setting" not in d.sql
    d = gate.check("INSERT INTO customers (tenant_id, customer_id) VALUES ($1, 1)", Origin.PARSE)
    gate.on_ready_for_query(b"I")
    assert gate.tenant is None and not d.param_checks[0][1].accepts(0, b"")
    assert d.param_checks[0][1].accepts(0, b"globex")
