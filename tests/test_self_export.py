"""Self-service export (issue 18), end to end through the demo: the tenant's own credential exports
all of its rows through tenantgate with ``tenantgate export --dsn``, no operator, no grant.

* the export holds exactly the tenant's rows (as the backend superuser sees them), none of another
  tenant's; the manifest is the operator export's format (same schema_version as the lifecycle
  discovery over the data role) and ``tenant verify-export`` accepts it;
* the audit chain records the export before it starts and its end with the table row counts;
* an export session is read-only and keeps its tenant (a token for another tenant is refused);
* the export statements are answered only in export sessions;
* an offboarded tenant can still export; a purged one is refused at connect (28000, "purged").
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import secrets
import tarfile
import time

import asyncpg
import psycopg
import pytest
import yaml
import zstandard

from support.e2e import RawClient, RawServerError, admin_execute, admin_rows, pool_dsn, token

pytestmark = pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")

TABLES = ("customers", "orders", "order_items")


def export(demo, dsn: str, out, *extra: str):
    return demo.cli("export", "--dsn", dsn, "--out", str(out), *extra)


def ok(result) -> str:
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    return result.stdout


def read_tables(out) -> tuple[dict, dict[str, list[dict]]]:
    """(manifest, {table: rows as dicts}) from an export directory or .tar.zst."""
    files: dict[str, bytes] = {}
    if str(out).endswith(".tar.zst"):
        with open(out, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as zr, \
                tarfile.open(fileobj=zr, mode="r|") as tar:
            for info in tar:
                files[info.name] = tar.extractfile(info).read()
    else:
        for p in out.iterdir():
            files[p.name] = p.read_bytes()
    manifest = json.loads(files.pop("manifest.json"))
    tables = {}
    for t in manifest["tables"]:
        tables[t["table"]] = list(csv.DictReader(io.StringIO(files[t["file"]].decode())))
    return manifest, tables


def audit_records(demo, tenant: str, since: int = 0, want: int = 2) -> list[dict]:
    """The self-export records of ``tenant`` after ``since``; waits (up to 10 s) for ``want`` of them:
    the end record is written when the proxy closes the session, after the client has gone."""
    for _ in range(100):
        with psycopg.connect(demo.admin, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT seq, type, tenant, ref_seq, rows, detail FROM tenantgate_control.audit_log "
                "WHERE tenant = %s AND type LIKE 'tenant.self_export%%' AND seq > %s ORDER BY seq", [tenant, since]
            ).fetchall()
        if len(rows) >= want:
            break
        time.sleep(0.1)
    recs = [dict(zip(("seq", "type", "tenant", "ref_seq", "rows", "detail"), r)) for r in rows]
    for r in recs:
        if isinstance(r["detail"], str):
            r["detail"] = json.loads(r["detail"])
    return recs


def last_seq(demo) -> int:
    with psycopg.connect(demo.admin, autocommit=True) as conn:
        return conn.execute("SELECT coalesce(max(seq), 0) FROM tenantgate_control.audit_log").fetchone()[0]


def backend_key_columns(demo, table: str, tenant: str) -> list[tuple]:
    """(tenant_id, first key) of every row of ``tenant``, as text, straight from PostgreSQL."""
    return sorted((str(r[0]), str(r[1])) for r in admin_rows(demo, table, tenant))


# ------------------------------------------------------------------------------ export as the tenant


@pytest.mark.parametrize("kind", ["dir", "tar.zst"])
def test_tenant_exports_exactly_its_own_rows(demo, tmp_path, kind):
    out = tmp_path / ("acme-export" if kind == "dir" else "acme.tar.zst")
    since = last_seq(demo)
    summary = json.loads(ok(export(demo, demo.app("acme"), out)))
    manifest, tables = read_tables(out)
    assert summary["tenant"] == manifest["tenant"] == "acme"
    assert manifest["exported_by"] == "tenant" and manifest["isolation"] == "REPEATABLE READ READ ONLY"
    for t in TABLES:
        exported = sorted((r["tenant_id"], list(r.values())[1]) for r in tables[t])
        assert exported == backend_key_columns(demo, t, "acme"), t
        assert exported, f"acme has rows in {t} in the demo"
    globex_names = {str(r[2]) for r in admin_rows(demo, "customers", "globex")}
    assert globex_names and not globex_names & {r["name"] for r in tables["customers"]}
    # the format the operator export writes, checked by verify-export (checksums; not signed)
    verified = json.loads(ok(demo.cli("tenant", "verify-export", str(out), "--no-signature")))
    assert verified["ok"] and verified["total_rows"] == manifest["total_rows"]
    # audited: started before, finished with the counts
    recs = audit_records(demo, "acme", since)
    assert [r["type"] for r in recs] == ["tenant.self_export", "tenant.self_export.done"], recs
    start, done = recs
    assert done["ref_seq"] == start["seq"] and done["rows"] == manifest["total_rows"]
    assert done["detail"]["tables"] == {x["name"]: x["rows"] for x in manifest["tables"]}
    assert start["detail"]["user"] == "acme_app"


async def test_manifest_describes_the_tables_as_the_operator_export_does(demo, tmp_path):
    from proxy.lifecycle.tables import discover

    out = tmp_path / "globex"
    ok(export(demo, demo.app("globex"), out))
    manifest, tables = read_tables(out)
    assert {r["tenant_id"] for t in TABLES for r in tables[t]} == {"globex"}
    conn = await asyncpg.connect(demo.admin)
    try:
        direct = await discover(conn, "tenant_id", ["public"])
    finally:
        await conn.close()
    assert manifest["schema_version"] == direct.schema_version()
    assert manifest["foreign_key_order"] == direct.import_order()


def test_a_changed_export_file_fails_verification(demo, tmp_path):
    out = tmp_path / "acme"
    ok(export(demo, demo.app("acme"), out))
    f = out / "public.orders.csv"
    f.write_text(f.read_text().replace("acme", "acmf", 1))
    r = demo.cli("tenant", "verify-export", str(out), "--no-signature")
    assert r.returncode == 1 and "checksum mismatch" in r.stderr and "XX001" in r.stderr


# ------------------------------------------------------------------------------ the export session


async def test_export_session_is_read_only_and_keeps_its_tenant(demo):
    conn = await asyncpg.connect(pool_dsn(demo), statement_cache_size=0,
                                 server_settings={"tenantgate.export": "1", "tenantgate.tenant": token(demo, "acme")})
    try:
        before = admin_rows(demo, "customers", "acme")
        with pytest.raises(asyncpg.PostgresError) as e:
            await conn.execute("INSERT INTO customers (customer_id, name) VALUES (99123, 'x')")
        assert e.value.sqlstate == "25006"
        with pytest.raises(asyncpg.PostgresError) as e:
            await conn.execute(f"SET tenantgate.tenant = '{token(demo, 'globex')}'")
        assert e.value.sqlstate == "42501" and "keeps the tenant" in str(e.value)
        assert {r["tenant_id"] for r in await conn.fetch("SELECT tenant_id FROM customers")} == {"acme"}
        scope = json.loads(await conn.fetchval("SHOW tenantgate.export_scope"))
        assert scope["tenant"] == "acme" and scope["tenant_column"] == "tenant_id"
        assert "tenantgate_control" not in json.dumps(scope)
        assert admin_rows(demo, "customers", "acme") == before
    finally:
        await conn.close()


async def test_export_statements_are_refused_outside_an_export_session(demo):
    conn = await asyncpg.connect(demo.app("acme"), statement_cache_size=0)
    try:
        for sql in ("SHOW tenantgate.export_scope", "SET tenantgate.export_done = 'e30='"):
            with pytest.raises(asyncpg.PostgresError) as e:
                await conn.execute(sql)
            assert e.value.sqlstate in ("42501", "42704"), (sql, e.value.sqlstate, str(e.value))
    finally:
        await conn.close()


async def test_a_session_that_never_reports_the_end_is_recorded_incomplete(demo):
    since = last_seq(demo)
    conn = await asyncpg.connect(demo.app("globex"), server_settings={"tenantgate.export": "1"})
    await conn.fetchval("SELECT count(*) FROM orders")
    await conn.close()
    recs = await asyncio.to_thread(audit_records, demo, "globex", since)
    assert [r["type"] for r in recs] == ["tenant.self_export", "tenant.self_export.incomplete"]


def test_summary_decoding_refuses_garbage():
    from proxy.control.self_export import _DONE_RE, decode_summary, encode_summary  # noqa: F401

    assert decode_summary(encode_summary({"total_rows": 3})) == {"total_rows": 3}
    assert decode_summary("!!!") is None and decode_summary("WzFd") is None  # not base64 / not an object
    assert _DONE_RE.fullmatch("SET tenantgate.export_done = 'abc'; DROP TABLE x") is None
    assert _DONE_RE.fullmatch("SET tenantgate.export_done = 'a''b'") is None


# ------------------------------------------------------------------------------ offboarded, purged


def cli_as(demo, who: str, *args: str, config=None):
    argv = [*args, "--config", str(config or demo.config_path), "--as", who, "--password-stdin"]
    return demo.cli(*argv, password=demo.password(f"operator:{who}") + "\n")


def seed(demo, tenant: str) -> None:
    admin_execute(demo, "INSERT INTO customers (tenant_id, customer_id, name) VALUES (%s, 1, 'one'), (%s, 2, 'two')",
                  [tenant, tenant])
    admin_execute(demo, "INSERT INTO orders (tenant_id, order_id, customer_id) VALUES (%s, 1, 1)", [tenant])


def drop_rows(demo, tenant: str) -> None:
    for t in ("order_items", "orders", "customers"):
        admin_execute(demo, f"DELETE FROM {t} WHERE tenant_id = %s", [tenant])


def test_offboarded_tenant_exports_and_purged_tenant_is_refused(demo, tmp_path):
    tenant = f"e2e_selfexp_{secrets.token_hex(3)}"
    seed(demo, tenant)
    cfg = yaml.safe_load(demo.config_path.read_text())
    cfg["lifecycle"] = {"data_dsn": demo.admin}  # the purge needs a data role that may create its journal
    purge_config = tmp_path / "tenantgate.yaml"
    purge_config.write_text(yaml.safe_dump(cfg))
    purge_config.chmod(0o600)
    grant_id = None
    try:
        ok(cli_as(demo, "bob", "tenant", "register", tenant))
        ok(cli_as(demo, "bob", "tenant", "offboard", tenant))
        out = tmp_path / "offboarded.tar.zst"
        ok(export(demo, pool_dsn(demo), out, "--token", token(demo, tenant)))
        manifest, tables = read_tables(out)
        assert manifest["tenant"] == tenant
        assert sorted(r["customer_id"] for r in tables["customers"]) == ["1", "2"]
        assert len(tables["orders"]) == 1 and tables["order_items"] == []
        # purge it (alice under a write grant approved by bob), then the export is refused at connect
        r = cli_as(demo, "alice", "grant", "request", "--tenant", tenant, "--access", "write", "--for", "15m",
                   "--reason", "E2E: self-export purge", "--json")
        grant_id = json.loads(ok(r))["id"]
        ok(cli_as(demo, "bob", "grant", "approve", str(grant_id)))
        ok(cli_as(demo, "alice", "tenant", "purge", tenant, "--now", "--confirm", tenant, "--grant", str(grant_id),
                  config=purge_config))
        r = None
        for _ in range(50):  # the status change reaches the proxy through NOTIFY
            r = export(demo, pool_dsn(demo), tmp_path / f"purged-{_}", "--token", token(demo, tenant))
            if r.returncode != 0:
                break
        assert r.returncode == 1, r.stdout
        assert "28000" in r.stderr and "purged" in r.stderr, r.stderr
        assert not any(p.name.startswith("purged") for p in tmp_path.iterdir())
    finally:
        drop_rows(demo, tenant)
        if grant_id is not None:
            cli_as(demo, "alice", "grant", "revoke", str(grant_id), "--comment", "E2E: done")


def test_raw_client_export_option_without_a_tenant_is_refused(demo):
    with pytest.raises(RawServerError) as e:
        RawClient(pool_dsn(demo), options={"tenantgate.export": "1"})
    assert "tenant" in str(e.value)


# ------------------------------------------------------------------------------ refusals at open (no network)


class _Gate:
    """Just what open_export_session touches of a tenant session gate."""

    def __init__(self, tenant):
        self.tenant = tenant
        self.pinned = False
        self.interceptor = self.close_hook = None

    def pin_tenant(self):
        self.pinned = True


class _Plane:
    def __init__(self, fail: bool):
        self.fail = fail
        self.records = []

    async def append(self, rec):
        if self.fail:
            raise OSError("control database unreachable")
        self.records.append(rec)
        return len(self.records)


def _startup():
    from proxy.seam import StartupInfo

    return StartupInfo(user="acme_app", database="app", client_addr="127.0.0.1:1", options={"tenantgate.export": "1"},
                       application_name=None, session_id="s1", tls=False)


def _user():
    from proxy.seam import SessionKind, UserRecord

    return UserRecord(name="acme_app", scram_verifier="", kind=SessionKind.TENANT, tenant="acme")


async def test_export_session_refused_without_audit_or_when_disabled():
    from proxy.control.self_export import open_export_session
    from proxy.policy.rules import Rules
    from proxy.seam import SessionRefused

    rules = Rules()
    cases = [(_Plane(False), _Gate("acme"), False, "42501"),  # lifecycle.self_export: false
             (None, _Gate("acme"), True, "0A000"),  # no control plane: nothing to audit into
             (_Plane(True), _Gate("acme"), True, "58030"),  # the audit record cannot be written
             (_Plane(False), _Gate(None), True, "28000")]  # a token user without its token
    for plane, gate, enabled, sqlstate in cases:
        with pytest.raises(SessionRefused) as e:
            await open_export_session(plane, gate, _user(), _startup(), rules=rules, enabled=enabled)
        assert e.value.sqlstate == sqlstate, (sqlstate, e.value.message)
        assert gate.interceptor is None  # nothing is answered: the session never opens
    plane, gate = _Plane(False), _Gate("acme")
    await open_export_session(plane, gate, _user(), _startup(), rules=rules)
    assert gate.pinned and gate.interceptor is not None and [r.type for r in plane.records] == ["tenant.self_export"]


def test_verify_export_with_a_key_says_a_self_service_export_is_unsigned(demo, tmp_path):
    from proxy.signing import new_signing_key_pem

    _, pub = new_signing_key_pem()
    (tmp_path / "audit.key.pub").write_bytes(pub)
    out = tmp_path / "acme.tar.zst"
    ok(export(demo, demo.app("acme"), out))
    r = demo.cli("tenant", "verify-export", str(out), "--key", str(tmp_path / "audit.key.pub"))
    assert r.returncode == 1 and "XX001" in r.stderr and "--no-signature" in r.stderr, r.stderr
