"""Issue 5, "Must show": operator access under just-in-time grants, end to end, with real psql.

Everything runs against ``tenantgate demo`` (the session-wide ``demo``
fixture): the CLI as a subprocess (``--as NAME --password-stdin``), psql as
a subprocess (one-shot or kept open through a pipe, see
:class:`support.operators.LivePsql`), and the backend superuser to look at
rows and the control schema directly.

Accounts: alice (operator), bob (approver).  Every test revokes its own
grants; the tamper test runs last and restores the audit rows it touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import time
from datetime import datetime

import asyncpg
import psycopg
import pyotp
import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict

from support.operators import CONTROL, Admin, LivePsql, Tenantgate, demo_tenantgate, conninfo, pg_options, psql_once
from proxy.pgcluster import free_port
from support.proxy_harness import wait_until
from support.serve import serve

# Issue 5: live sessions end within 2 seconds of revocation/expiry (the product's target, printed
# with every measurement).  The assertions allow TENANTGATE_TEST_SLACK_S more (default 3 s): a test
# on a loaded 2-core machine measures its own scheduling too, and a session that outlives its grant
# by more than target + slack is a failure whatever the machine.
END_TARGET_S = 2.0
END_WITHIN_S = END_TARGET_S + float(os.environ.get("TENANTGATE_TEST_SLACK_S", "3"))
REQUEST_HINT = "tenantgate grant request"


@pytest.fixture(scope="module")
def tg(demo):  # noqa: F811
    return demo_tenantgate(demo)


@pytest.fixture(scope="module")
def admin(demo):  # noqa: F811
    return Admin(demo.admin)


def _sqlstate_of_connect(dsn: str, options: str) -> tuple[str | None, str]:
    """(SQLSTATE, message) of a refused connection (asyncpg exposes the startup error's SQLSTATE; libpq does not)."""
    async def attempt():
        params = {} if "://" in dsn else conninfo_to_dict(dsn)
        try:
            conn = await asyncpg.connect(dsn if "://" in dsn else None, host=params.get("host"),
                                         port=params.get("port"), user=params.get("user"),
                                         password=params.get("password"), database=params.get("dbname"),
                                         ssl=False, server_settings={"options": options} if options else None)
        except asyncpg.PostgresError as e:
            return e.sqlstate, str(e)
        await conn.close()
        return None, ""

    return asyncio.run(attempt())


def _backend_pid(session: LivePsql) -> int:
    out = session.run("\\pset tuples_only on\nSELECT 'pid=' || pg_backend_pid();\n\\pset tuples_only off")
    return int(re.search(r"pid=(\d+)", out).group(1))


def _unaligned(session: LivePsql, sql: str) -> list[list[str]]:
    """Rows of one query, read from psql's unaligned, tuples-only output."""
    out = session.run(f"\\pset format unaligned\n\\pset tuples_only on\n{sql}\n"
                      "\\pset tuples_only off\n\\pset format aligned")
    lines = [ln for ln in out.splitlines() if ln and not ln.startswith(("Output format", "Tuples only"))]
    return [ln.split("|") for ln in lines]


def _wait_for(condition, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# --------------------------------------------------------------------------- 1. the main story


def test_operator_story_request_approve_query_revoke(demo, tg, admin):  # noqa: F811
    start_seq = admin.head_seq()
    before = admin.snapshot()
    acme = [list(map(str, r)) for r in admin.rows(
        "SELECT customer_id, name, coalesce(email, '') FROM customers WHERE tenant_id = 'acme' ORDER BY 1")]
    globex_names = [r[0] for r in admin.rows("SELECT name FROM customers WHERE tenant_id = 'globex'")]
    assert acme and globex_names

    # alice requests read access to acme: pending, until someone else approves.
    reason = f"TICKET-1: missing invoices {secrets.token_hex(3)}"
    g = tg.request("alice", "acme", "read", "1h", reason)
    gid = g["id"]
    assert (g["state"], g["requester"], g["tenant"], g["access"], g["reason"]) == (
        "pending", "alice", "acme", "read", reason)
    r = psql_once(demo.operator("alice"), "-c", "SELECT 1", options=pg_options(gid))
    assert r.returncode != 0 and "FATAL" in r.stderr, "a pending grant gives no access"
    # pending, not missing: the message points to an approver, not to a new request
    assert f"grant {gid} is pending" in r.stderr and f"tenantgate grant approve {gid}" in r.stderr, r.stderr
    assert REQUEST_HINT not in r.stderr, r.stderr

    # Self-approval is refused; alice is not an approver either.
    r = tg.run("grant", "approve", str(gid), actor="alice")
    assert r.returncode == 1 and "self-approval is not allowed" in r.stderr, (r.stdout, r.stderr)
    bobs = tg.request("bob", "globex", "read", "30m", "TICKET-2: bob's own request")
    r = tg.run("grant", "approve", str(bobs["id"]), actor="alice")
    assert r.returncode == 1 and "does not have the approver role" in r.stderr, (r.stdout, r.stderr)
    assert tg.show(bobs["id"])["state"] == "pending"
    assert tg.revoke(bobs["id"], actor="bob").returncode == 0
    assert tg.show(gid)["state"] == "pending", "the refused approvals changed nothing"

    # bob approves.
    g = tg.approve(gid)
    assert g["state"] == "approved" and [a["approver"] for a in g["approvals"]] == ["bob"]

    stack = contextlib.ExitStack()
    try:
        with LivePsql(demo.operator("alice"), pg_options(gid)) as s:
            # Only acme's rows, exactly as the backend holds them.
            rows = _unaligned(s, "SELECT customer_id, name, coalesce(email, '') FROM customers ORDER BY 1;")
            assert rows == acme
            assert _unaligned(s, "SELECT DISTINCT tenant_id FROM orders;") == [["acme"]]
            assert _unaligned(s, "SELECT count(*) FROM customers WHERE tenant_id = 'globex';") == [["0"]]
            n_orders = admin.one("SELECT count(*) FROM orders WHERE tenant_id = 'acme'")
            assert _unaligned(s, "SELECT count(*) FROM orders o JOIN customers c USING (customer_id);") == [
                [str(admin.one("SELECT count(*) FROM orders o JOIN customers c USING (tenant_id, customer_id) "
                               "WHERE o.tenant_id = 'acme'"))]]
            assert n_orders > 0

            # psql stays usable: \d, \dt, \x, \timing.
            out = s.run("\\dt")
            for table in ("customers", "orders", "order_items", "products"):
                assert re.search(rf"\|\s*{table}\s*\|\s*table", out), out
            out = s.run("\\d customers")
            assert 'Table "public.customers"' in out and "tenant_id" in out and "customers_pkey" in out, out
            out = s.run("\\d")
            assert "customers" in out and "List of relations" in out, out
            out = s.run("\\x\nSELECT customer_id, name FROM customers ORDER BY 1 LIMIT 1;\n\\x")
            assert "Expanded display is on." in out and "-[ RECORD 1 ]" in out, out
            assert f"name        | {acme[0][1]}" in out, out
            out = s.run("\\timing on\nSELECT 1 AS one;\n\\timing off")
            assert "Timing is on." in out and re.search(r"Time: \d+[.,]\d+ ms", out), out

            # Writes under a read grant are refused (25006), and nothing changed anywhere.
            out = s.run("\\set VERBOSITY verbose\n"
                        "UPDATE customers SET name = 'pwned' WHERE customer_id = 1;\n"
                        "INSERT INTO customers (customer_id, name) VALUES (99, 'intruder');\n"
                        "DELETE FROM order_items;\n"
                        "UPDATE customers SET name = 'pwned' WHERE tenant_id = 'globex';")
            assert len(re.findall(r"ERROR:\s+25006:", out)) == 4, out
            assert not re.search(r"^(UPDATE|INSERT|DELETE) \d", out, re.M), out
            assert admin.snapshot() == before
            assert sorted(r[0] for r in admin.rows("SELECT name FROM customers WHERE tenant_id = 'globex'")) == \
                sorted(globex_names)

            # A second live session, from a driver, with bound parameters (extended protocol).
            driver = psycopg.connect(demo.operator("alice"), options=pg_options(gid), autocommit=True)
            stack.callback(driver.close)
            assert driver.execute("SELECT name FROM customers WHERE email = %s", (acme[0][2],)).fetchall() == [
                (acme[0][1],)]

            # Audit before action: the statement record is committed while the statement cannot have
            # run yet: it waits for a lock this test holds (no race against the clock).
            marker = f"h9-pre-exec-{secrets.token_hex(4)}"
            with psycopg.connect(demo.admin) as locker:
                locker.execute("LOCK TABLE customers IN ACCESS EXCLUSIVE MODE")
                s.start(f"SELECT '{marker}' AS marker, count(*) FROM customers;")
                wait_until(lambda: admin.rows("SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                              "AND strpos(query, %s) > 0", (marker,)),
                           30.0, 0.05, "the operator's statement blocked on the test's lock")
                seen = admin.rows(f"SELECT seq, type FROM {CONTROL}.audit_log WHERE original_sql LIKE %s "
                                  f"ORDER BY seq", (f"%{marker}%",))
                assert seen and seen[0][1] == "statement", \
                    "the statement record must be committed before the statement runs"
                assert s.proc.poll() is None and s.lines.empty()  # still blocked: no output yet
                locker.rollback()  # release the lock: the statement runs now
            out = s.collect()
            assert marker in out
            pre_seq = seen[0][0]
            assert admin.one(f"SELECT count(*) FROM {CONTROL}.audit_log WHERE type = 'statement.outcome' "
                             f"AND ref_seq = %s AND seq < %s", (pre_seq, pre_seq)) == 0

            # Revocation ends the live session within 2 s.
            pid = _backend_pid(s)
            assert admin.backend_alive(pid)
            r = tg.revoke(gid, actor="bob")
            revoked_at = time.monotonic()
            assert r.returncode == 0 and "revoked" in r.stdout, r.stderr
            waited, out = s.wait_closed(END_WITHIN_S)
            closed_after = time.monotonic() - revoked_at
            assert "FATAL" in out and f"tenantgate grant {gid}" in out and "revoked" in out, out
            print(f"[story] psql session closed {closed_after:.2f}s after `grant revoke` returned "
                  f"(target {END_TARGET_S}s):\n{out}")
            assert closed_after <= END_WITHIN_S, f"session still usable {closed_after:.2f}s after revoke"
            assert s.proc.returncode != 0
            gone_after = admin.wait_backend_gone(pid, END_WITHIN_S) + (time.monotonic() - revoked_at)
            assert gone_after <= END_WITHIN_S + 0.5, f"backend connection {pid} lived {gone_after:.2f}s"
            # The driver's session ended too: its next query fails with the grant's FATAL.
            with pytest.raises(psycopg.OperationalError) as err:
                driver.execute("SELECT 1")
            assert f"tenantgate grant {gid}" in str(err.value) and "revoked" in str(err.value)
            assert time.monotonic() - revoked_at <= END_WITHIN_S + 1
    finally:
        stack.close()
        tg.revoke(gid)

    # Reconnecting is refused: FATAL 28000 saying how to request a grant.  Without tenantgate.grant the
    # session binds to alice's only active grant, so that case holds only if no other module left her one.
    others = admin.one(f"SELECT count(*) FROM {CONTROL}.grants WHERE requester = 'alice' AND state = 'approved' "
                       f"AND expires_at > now()")
    for opts in (pg_options(gid), "") if others == 0 else (pg_options(gid),):
        r = psql_once(demo.operator("alice"), "-c", "SELECT 1", options=opts)
        assert r.returncode == 2 and "FATAL" in r.stderr and REQUEST_HINT in r.stderr, r.stderr
        state, msg = _sqlstate_of_connect(demo.operator("alice"), opts)
        assert state == "28000" and REQUEST_HINT in msg, (state, msg)
    r = psql_once(demo.operator("alice"), "-c", "SELECT 1", options=pg_options(gid))
    assert f"grant {gid} is revoked" in r.stderr, r.stderr

    # The audit chain verifies.
    r = tg.verify()
    assert r.returncode == 0 and "audit chain OK" in r.stdout, (r.stdout, r.stderr)

    # The export holds the story: grant lifecycle, statements with original and rewritten SQL, outcomes.
    records = tg.export(start_seq + 1)
    mine = [x for x in records if x["grant_id"] == gid]
    types = [x["type"] for x in mine]
    for t in ("grant.requested", "grant.approved", "session.opened", "statement", "statement.outcome",
              "statement.refused", "grant.revoked", "session.ended"):
        assert t in types, (t, types)
    assert types.index("grant.requested") < types.index("grant.approved") < types.index("session.opened") \
        < types.index("grant.revoked")
    by_seq = {x["seq"]: x for x in records}
    stmt = next(x for x in mine if x["type"] == "statement"
                and x["original_sql"].startswith("SELECT customer_id, name, coalesce(email, '') FROM customers"))
    assert stmt["operator"] == "alice" and stmt["tenant"] == "acme" and stmt["grant_id"] == gid
    assert stmt["session_id"] and stmt["client_addr"] and stmt["at"]
    assert stmt["rewritten_sql"] != stmt["original_sql"] and "acme" in stmt["rewritten_sql"], stmt
    outcome = next(x for x in mine if x["type"] == "statement.outcome" and x["ref_seq"] == stmt["seq"])
    assert outcome["seq"] > stmt["seq"] and outcome["sqlstate"] is None and outcome["rows"] == len(acme)
    assert outcome["duration_us"] is not None and outcome["duration_us"] >= 0
    for x in mine:  # every outcome follows its statement record
        if x["type"] == "statement.outcome":
            assert by_seq[x["ref_seq"]]["type"] == "statement" and x["ref_seq"] < x["seq"]
    bound = next(x for x in mine if x["type"] == "statement" and x["original_sql"] ==
                 "SELECT name FROM customers WHERE email = $1")
    assert bound["params"] == [acme[0][2]] and "acme" in bound["rewritten_sql"], bound
    refused = [x for x in mine if x["type"] == "statement.refused"]
    assert {x["sqlstate"] for x in refused} == {"25006"} and len(refused) >= 4
    assert any("'pwned'" in (x["original_sql"] or "") for x in refused)
    pre = by_seq[pre_seq]
    assert pre["grant_id"] == gid and marker in pre["original_sql"]
    assert any(x["type"] == "statement.outcome" and x["ref_seq"] == pre_seq for x in mine)
    ended = [x for x in mine if x["type"] == "session.ended"]
    assert any("revoked" in json.dumps(x["detail"]) for x in ended), ended
    revoked_seq = next(x["seq"] for x in mine if x["type"] == "grant.revoked")
    refusals = [x for x in records if x["type"] == "connection.refused" and x["seq"] > revoked_seq
                and x["operator"] == "alice"]
    assert len(refusals) >= 2 and all(x["sqlstate"] == "28000" for x in refusals), refusals


# --------------------------------------------------------------------------- 3. audit unwritable


def test_unwritable_audit_log_refuses_the_next_statement_and_runs_nothing(demo, tg, admin):  # noqa: F811
    g = tg.active_grant("alice", "acme", "write")
    probe_before = admin.rows("SELECT name, email FROM customers WHERE tenant_id = 'acme' AND customer_id = 1")
    restored = False
    try:
        with LivePsql(demo.operator("alice"), pg_options(g["id"])) as s:
            out = s.run("\\set VERBOSITY verbose\nUPDATE customers SET email = email WHERE customer_id = 1;")
            assert "UPDATE 1" in out, "a write grant may write"
            _wait_for(lambda: admin.one(f"SELECT count(*) FROM {CONTROL}.audit_log WHERE grant_id = %s "
                                        f"AND type = 'statement.outcome'", (g["id"],)) >= 1)
            admin.execute(f"REVOKE INSERT ON {CONTROL}.audit_log FROM tenantgate_control")
            try:
                out = s.run("UPDATE customers SET name = 'probe: ran unaudited' WHERE customer_id = 1;\n"
                            "INSERT INTO customers (customer_id, name) VALUES (4242, 'probe: ran unaudited');")
            finally:
                admin.execute(f"GRANT INSERT ON {CONTROL}.audit_log TO tenantgate_control")
                restored = True
            assert len(re.findall(r"ERROR:\s+58000:", out)) == 2 and "audit log could not be written" in out, out
            assert "UPDATE 1" not in out and "INSERT 0 1" not in out
            # Side-effect probes: nothing ran on the backend.
            assert admin.rows("SELECT name, email FROM customers WHERE tenant_id = 'acme' AND customer_id = 1") \
                == probe_before
            assert admin.one("SELECT count(*) FROM customers WHERE customer_id = 4242 OR name LIKE 'probe:%'") == 0
            # Once the audit log is writable again, statements are audited and run again.
            out = s.run("SELECT count(*) AS n FROM customers;")
            assert "(1 row)" in out, out
    finally:
        if not restored:
            admin.execute(f"GRANT INSERT ON {CONTROL}.audit_log TO tenantgate_control")
        tg.revoke(g["id"])
    assert admin.one(f"SELECT has_table_privilege('tenantgate_control', '{CONTROL}.audit_log', 'INSERT')")


# --------------------------------------------------------------------------- 4. two instances


@pytest.fixture
def second_instance(demo, tmp_path):  # noqa: F811
    cfg = yaml.safe_load(demo.config_path.read_text())
    port = free_port()
    cfg["listen"]["port"] = port
    if cfg.get("metrics"):
        cfg["metrics"]["port"] = None
    path = tmp_path / "tenantgate-2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with serve(path, log_path=tmp_path / "serve-2.log"):
        yield port


def test_revoke_ends_a_session_held_on_another_instance(demo, tg, admin, second_instance):  # noqa: F811
    g = tg.active_grant("alice", "acme", "read")
    dsn2 = conninfo("127.0.0.1", second_instance, "alice", demo.password("operator:alice"))
    try:
        with LivePsql(dsn2, pg_options(g["id"])) as s:
            out = s.run("SELECT DISTINCT tenant_id FROM customers;")
            assert "acme" in out and "globex" not in out, out
            pid = _backend_pid(s)
            r = tg.revoke(g["id"], actor="alice")  # the requester gives the access up, via the control schema
            t0 = time.monotonic()
            assert r.returncode == 0, r.stderr
            _, out = s.wait_closed(END_WITHIN_S)
            closed_after = time.monotonic() - t0
            assert "FATAL" in out and f"tenantgate grant {g['id']}" in out and "revoked" in out, out
            print(f"[two instances] session on instance 2 closed {closed_after:.2f}s after revoke:\n{out}")
            assert closed_after <= END_WITHIN_S, f"instance 2 kept the session {closed_after:.2f}s"
            admin.wait_backend_gone(pid, END_WITHIN_S)
    finally:
        tg.revoke(g["id"])
    r = psql_once(dsn2, "-c", "SELECT 1", options=pg_options(g["id"]))
    assert r.returncode == 2 and f"grant {g['id']} is revoked" in r.stderr, r.stderr


# --------------------------------------------------------------------------- 5. TOTP


def _invalid_code(secret: str) -> str:
    totp = pyotp.TOTP(secret)
    code = (int(totp.now()) + 500_000) % 1_000_000
    while totp.verify(f"{code:06d}", valid_window=1):
        code = (code + 1) % 1_000_000
    return f"{code:06d}"


def _fresh_totp_step() -> float:
    """Now, or the start of the next 30 s step when this one is nearly over (codes of the previous,
    current and next step are accepted, each once: the test uses three of them in a row)."""
    t = time.time()
    if t % 30 > 18:
        time.sleep(30 - t % 30 + 0.2)
    return time.time()


def test_totp_enrolled_operator_needs_a_current_code_to_connect(demo, tg, admin):  # noqa: F811
    name = f"carol_{secrets.token_hex(3)}"
    password = secrets.token_urlsafe(12)
    # An approver requests the account, a second approver approves it, the person enrols with
    # the one-time token: they choose their password and get their own TOTP secret.
    req = tg.ok("operator", "add", name, "--role", "operator", actor="bob")
    approved = tg.ok("operator", "approve", str(req["id"]), actor="carol")
    r = tg.run("operator", "enrol", "--token", approved["enrolment_token"], "--password-stdin", json_out=True,
               extra_lines=(password,))
    assert r.returncode == 0, r.stderr
    enrol = json.loads(r.stdout)
    tg.passwords[name] = password
    gid = None
    try:
        secret = enrol["secret"]
        assert enrol["name"] == name and enrol["uri"].startswith("otpauth://totp/")
        ops = {o["name"]: o for o in tg.ok("operator", "list")}
        assert ops[name]["totp_enrolled"] is True
        totp = pyotp.TOTP(secret)
        now = _fresh_totp_step()
        code = lambda step: totp.at(now + 30 * step)  # noqa: E731

        # Requesting needs a code now, too.
        r = tg.run("grant", "request", "--tenant", "acme", "--access", "read", "--for", "10m",
                   "--reason", "TICKET-5: totp", actor=name)
        assert r.returncode == 1 and "--totp" in r.stderr, r.stderr
        gid = tg.request(name, "acme", "read", "10m", "TICKET-5: totp", totp=code(-1))["id"]
        assert tg.approve(gid)["state"] == "approved"

        dsn = conninfo("127.0.0.1", demo.port, name, password)
        # No code, a wrong code, a used code: the same FATAL as a wrong password (28P01).
        r = psql_once(dsn, "-c", "SELECT 1", options=pg_options(gid))
        assert r.returncode == 2 and "FATAL" in r.stderr and "password authentication failed" in r.stderr, r.stderr
        assert _sqlstate_of_connect(dsn, pg_options(gid))[0] == "28P01"
        bad = _invalid_code(secret)
        r = psql_once(dsn, "-c", "SELECT 1", options=pg_options(gid, bad))
        assert r.returncode == 2 and "password authentication failed" in r.stderr, r.stderr
        assert _sqlstate_of_connect(dsn, pg_options(gid, code(-1)))[0] == "28P01"  # used for the request
        # A current code: connected, scoped to the grant's tenant.
        r = psql_once(dsn, "-A", "-t", "-c", "SELECT DISTINCT tenant_id FROM customers",
                      options=pg_options(gid, code(0)))
        assert r.returncode == 0 and r.stdout.split() == ["acme"], (r.stdout, r.stderr)
        # The code also works in the conninfo's options (the next one: each code works once).
        opts = pg_options(gid, code(1)).replace(" ", "\\ ")
        r = psql_once(f"{dsn} options='{opts}'", "-A", "-t", "-c", "SELECT count(*) FROM orders")
        assert r.returncode == 0 and r.stdout.strip() == str(
            admin.one("SELECT count(*) FROM orders WHERE tenant_id = 'acme'")), (r.stdout, r.stderr)
    finally:
        if gid is not None:
            tg.revoke(gid)
        r = tg.run("operator", "remove", name, actor="bob")
        assert r.returncode == 0, r.stderr
    assert name not in {o["name"] for o in tg.ok("operator", "list")}


# --------------------------------------------------------------------------- 6. expiry


def test_grant_expiry_ends_a_live_session_and_rolls_back_its_transaction(demo, tg, admin):  # noqa: F811
    duration_s = 12  # room for a loaded machine to open the session and start the transaction
    g = tg.active_grant("alice", "acme", "write", f"{duration_s}s")
    expires_at = datetime.fromisoformat(g["expires_at"]).timestamp()
    before = admin.rows("SELECT name FROM customers WHERE tenant_id = 'acme' AND customer_id = 2")
    try:
        with LivePsql(demo.operator("alice"), pg_options(g["id"])) as s:
            pid = _backend_pid(s)
            out = s.run("BEGIN;\nUPDATE customers SET name = 'in flight at expiry' WHERE customer_id = 2;")
            # "UPDATE 1" proves the transaction is in flight under the grant (after expiry it is refused)
            assert "UPDATE 1" in out, out
            time.sleep(max(0.0, expires_at - time.time() - 0.5))
            _, out = s.wait_closed(END_WITHIN_S + 1)
            closed_late = time.time() - expires_at
            print(f"[expiry] psql session closed {closed_late:.2f}s after expires_at (target {END_TARGET_S}s):\n{out}")
            assert "FATAL" in out and f"tenantgate grant {g['id']}" in out and "has expired" in out, out
            assert closed_late <= END_WITHIN_S, f"session outlived its grant by {closed_late:.2f}s"
            admin.wait_backend_gone(pid, END_WITHIN_S)
        # The grant's state follows (the watcher expires elapsed grants every second).
        deadline = time.monotonic() + 5
        while (state := tg.show(g["id"])["state"]) != "expired":
            assert time.monotonic() < deadline, state
            time.sleep(0.3)
    finally:
        tg.revoke(g["id"])  # cleanup if the test failed early (refused once the grant expired)
    # The transaction in flight was rolled back.
    assert admin.rows("SELECT name FROM customers WHERE tenant_id = 'acme' AND customer_id = 2") == before
    r = psql_once(demo.operator("alice"), "-c", "SELECT 1", options=pg_options(g["id"]))
    assert r.returncode == 2 and f"grant {g['id']} is expired" in r.stderr and REQUEST_HINT in r.stderr, r.stderr


# --------------------------------------------------------------------------- 2. tampering (last: it touches the chain)


def _columns(admin: Admin) -> list[str]:
    return [r[0] for r in admin.rows(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = 'audit_log' "
        "AND column_name <> 'seq' ORDER BY ordinal_position", (CONTROL,))]


def _tamper(admin: Admin, *statements: str, params: tuple | dict = ()) -> None:
    """Run statements as the superuser with the append-only triggers bypassed (replica role)."""
    with psycopg.connect(admin.dsn, autocommit=False) as c:
        c.execute("SET LOCAL session_replication_role = replica")
        for st in statements:
            c.execute(st, params)
        c.commit()


_PHRASE = {"modified": "was modified", "deleted": "deleted", "reordered": "is out of order"}


def _verify_fails(tg: Tenantgate, kind: str, seq: int) -> str:
    """`audit verify` exits 1, and its first line names the record and what happened to it."""
    r = tg.verify()
    assert r.returncode == 1, (r.stdout, r.stderr)
    first = r.stdout.splitlines()[0]
    assert first.startswith("audit chain FAILED") and f"record {seq} " in first and _PHRASE[kind] in first, r.stdout
    report = json.loads(tg.run("audit", "verify", json_out=True).stdout)
    assert report["ok"] is False and report["problems"][0]["seq"] == seq and report["problems"][0]["kind"] == kind
    return first


def test_tampering_with_the_audit_log_is_detected_and_named(demo, tg, admin):  # noqa: F811
    # Make a few fresh operator statements to tamper with.
    g = tg.active_grant("alice", "acme", "read")
    try:
        r = psql_once(demo.operator("alice"), "-c", "SELECT count(*) FROM customers", "-c", "SELECT 1 AS second",
                      options=pg_options(g["id"]))
        assert r.returncode == 0, r.stderr
    finally:
        tg.revoke(g["id"])
    assert tg.verify().returncode == 0
    seq = admin.one(f"SELECT seq FROM {CONTROL}.audit_log WHERE grant_id = %s AND type = 'statement' "
                    f"AND original_sql = 'SELECT count(*) FROM customers' ORDER BY seq LIMIT 1", (g["id"],))
    assert seq is not None
    cols = _columns(admin)
    col_list = ", ".join(cols)
    originals = {k: admin.rows(f"SELECT {col_list} FROM {CONTROL}.audit_log WHERE seq = %s", (k,))[0]
                 for k in (seq, seq + 1)}
    original = originals[seq]
    insert = (f"INSERT INTO {CONTROL}.audit_log (seq, {col_list}) VALUES (%s, {', '.join(['%s'] * len(cols))})")
    try:
        # Modified: the SQL text of one record.
        _tamper(admin, f"UPDATE {CONTROL}.audit_log SET original_sql = 'SELECT 1' WHERE seq = %s", params=(seq,))
        _verify_fails(tg, "modified", seq)
        _tamper(admin, f"UPDATE {CONTROL}.audit_log SET original_sql = %s WHERE seq = %s",
                params=(original[cols.index("original_sql")], seq))
        assert tg.verify().returncode == 0, "restored"

        # Deleted.
        _tamper(admin, f"DELETE FROM {CONTROL}.audit_log WHERE seq = %s", params=(seq,))
        _verify_fails(tg, "deleted", seq)
        _tamper(admin, insert, params=(seq, *original))
        assert tg.verify().returncode == 0, "restored"

        # Reordered: swap the contents of two neighbouring records.
        _tamper(admin, f"UPDATE {CONTROL}.audit_log a SET ({col_list}) = "
                       f"(SELECT {', '.join('b.' + c for c in cols)} FROM {CONTROL}.audit_log b "
                       f" WHERE b.seq = CASE a.seq WHEN %(k)s THEN %(k)s + 1 ELSE %(k)s END) "
                       f"WHERE a.seq IN (%(k)s, %(k)s + 1)", params={"k": seq})
        _verify_fails(tg, "reordered", seq)
    finally:
        # Whatever happened above, put the original records back.
        with psycopg.connect(admin.dsn) as c:
            c.execute("SET LOCAL session_replication_role = replica")
            for k, row in originals.items():
                c.execute(f"DELETE FROM {CONTROL}.audit_log WHERE seq = %s", (k,))
                c.execute(insert, (k, *row))
    r = tg.verify()
    assert r.returncode == 0 and "audit chain OK" in r.stdout, r.stdout
