"""`tenantgate doctor`: is the PostgreSQL behind tenantgate locked behind the gate?

Connects as tenantgate's backend role (and, optionally, with a privileged DSN)
and checks the out-of-band posture that the proxy itself cannot enforce:

* the backend role's attributes and role memberships, CREATE privileges, and
  ownership of the database or of tenant tables;
* row-level security enabled AND forced on every tenant table, with the
  backstop policies keyed on the guard (proxy/policy/backstop_state.py), and
  that it is effective (an unbound connection sees no rows, whatever the
  tenant GUC says);
* the backstop guard and key, and every cross-tenant channel PostgreSQL opens
  to PUBLIC closed (proxy/doctor_backstop.py);
* unique constraints/indexes on tenant tables that lack the tenant column
  (their error messages leak other tenants' values, and ON CONFLICT can hit
  another tenant's row) and tenant tables with no index leading with it;
* no privilege on the control schema;
* server-side file/program functions and dangerous extensions out of reach;
* ``ssl`` on;
* with ``admin_dsn``: the ``pg_hba.conf`` rules (through pg_hba_file_rules) and
  that the roles' passwords are stored as SCRAM verifiers.

Every finding has a stable ``check`` id, a status (pass, warn, fail, skip), a
message naming the object, and a fix.  :func:`diagnose` returns a
:class:`Report`; ``proxy/commands/doctor.py`` prints it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import asyncpg

from proxy import doctor_backstop
from proxy.policy import backstop_state as BS
from proxy.policy.names import TENANT_GUC


from proxy.doctor_admin import check_as_admin
from proxy.doctor_common import _KEYWORDS, FAIL, PASS, SKIP, WARN, qi

# Predefined roles the backend role must not be a member of, and why.
DANGEROUS_ROLES = {
    "pg_read_server_files": "reads any file the server can read (COPY FROM 'file', pg_read_file)",
    "pg_write_server_files": "writes files as the server (COPY TO 'file')",
    "pg_execute_server_program": "runs programs on the database host (COPY ... PROGRAM)",
    "pg_read_all_data": "reads every table regardless of grants, the control schema included",
    "pg_write_all_data": "writes every table regardless of grants, the control schema included",
    "pg_read_all_stats": "sees other sessions' SQL text in pg_stat_activity and pg_stat_statements",
    "pg_monitor": "sees other sessions' SQL text and server settings",
    "pg_read_all_settings": "reads every server setting, file locations included",
    "pg_signal_backend": "cancels or terminates other sessions",
    "pg_checkpoint": "forces checkpoints",
}

ROLE_ATTRIBUTES = {
    "rolsuper": ("superuser", "SUPERUSER", "bypasses row-level security and every privilege check, files and programs included"),
    "rolcreaterole": ("createrole", "CREATEROLE", "can create roles and grant itself predefined roles"),
    "rolcreatedb": ("createdb", "CREATEDB", "can create databases outside the gate's schema"),
    "rolreplication": ("replication", "REPLICATION", "can stream the whole cluster's WAL, every tenant's data included"),
    "rolbypassrls": ("bypassrls", "BYPASSRLS", "bypasses the row-level security backstop"),
}

# Server-side functions that touch files, programs or the server; none may be executable.
SERVER_FUNCTIONS = [
    "pg_read_file(text)", "pg_read_file(text,bigint,bigint)", "pg_read_file(text,bigint,bigint,boolean)",
    "pg_read_binary_file(text)", "pg_read_binary_file(text,bigint,bigint)",
    "pg_read_binary_file(text,bigint,bigint,boolean)",
    "pg_ls_dir(text)", "pg_ls_dir(text,boolean,boolean)", "pg_stat_file(text)", "pg_stat_file(text,boolean)",
    "pg_ls_logdir()", "pg_ls_waldir()", "pg_ls_tmpdir()", "pg_ls_archive_statusdir()",
    "lo_import(text)", "lo_import(text,oid)", "lo_export(oid,text)",
    "pg_reload_conf()", "pg_rotate_logfile()", "pg_promote(boolean,integer)",
]

# Extensions that open a path to files, other servers, raw pages or untrusted code.
DANGEROUS_EXTENSIONS = {
    "adminpack": "writes and deletes server files",
    "dblink": "runs SQL given as text, on this or another server, unseen by the rewriter",
    "postgres_fdw": "reaches other servers with SQL the rewriter cannot see",
    "file_fdw": "reads server files and program output as tables",
    "lo": "large-object helpers",
    "pageinspect": "reads raw table pages, every tenant's rows included",
    "pg_buffercache": "exposes shared-buffer contents",
    "pg_surgery": "rewrites raw tuples",
    "pgrowlocks": "shows other sessions' row locks",
    "pgstattuple": "reads raw table statistics",
    "pg_stat_statements": "exposes other sessions' SQL text",
    "plpython3u": "untrusted language: runs code as the server's OS user",
    "plperlu": "untrusted language: runs code as the server's OS user",
    "pltclu": "untrusted language: runs code as the server's OS user",
}


@dataclass(frozen=True)
class Finding:
    check: str  # stable id, e.g. "rls.forced"
    status: str  # pass | warn | fail | skip
    message: str
    fix: str | None = None
    subject: str | None = None  # the object concerned, e.g. "public.orders"


@dataclass
class Report:
    target: str
    findings: list[Finding] = field(default_factory=list)

    def add(self, check: str, status: str, message: str, fix: str | None = None, subject: str | None = None) -> None:
        self.findings.append(Finding(check, status, message, fix, subject))

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.status == FAIL]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.status == WARN]

    @property
    def ok(self) -> bool:
        return not self.failures

    def by_check(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "ok": self.ok,
            "summary": {s: sum(1 for f in self.findings if f.status == s) for s in (PASS, WARN, FAIL, SKIP)},
            "findings": [asdict(f) for f in self.findings],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        lines = [f"tenantgate doctor: {self.target}", ""]
        order = {FAIL: 0, WARN: 1, SKIP: 2, PASS: 3}
        for f in sorted(self.findings, key=lambda f: order[f.status]):
            lines.append(f"{f.status.upper():<5} {f.check:<24} {f.message}")
            if f.fix and f.status in (FAIL, WARN):
                for i, fix_line in enumerate(f.fix.splitlines()):
                    lines.append(f"{'':<6}{'fix: ' if i == 0 else '     '}{fix_line}")
        n_fail, n_warn = len(self.failures), len(self.warnings)
        n_pass = sum(1 for f in self.findings if f.status == PASS)
        verdict = "OK" if self.ok else "FAIL"
        lines += ["", f"result: {verdict}: {n_fail} failed, {n_warn} warnings, {n_pass} passed"]
        return "\n".join(lines)




async def diagnose(
    backend_dsn: str,
    admin_dsn: str | None = None,
    tenant_column: str = "tenant_id",
    schemas: Sequence[str] = ("public",),
    control_schema: str = "tenantgate_control",
    timeout: float = 10.0,
    backstop_key: bytes | None = None,
) -> Report:
    """Check the posture of the PostgreSQL behind ``backend_dsn`` (tenantgate's backend role)."""
    schemas = [schemas] if isinstance(schemas, str) else list(schemas)
    try:
        conn = await asyncpg.connect(backend_dsn, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - any connect failure is a finding
        report = Report(target="(not connected)")
        report.add("connect", FAIL, f"cannot connect with the backend DSN: {e}",
                   "check --backend (host, port, user, password, database) and pg_hba.conf")
        return report
    try:
        who = await conn.fetchrow(
            "SELECT current_user AS role, current_database() AS db, current_setting('server_version') AS version"
        )
        if not _KEYWORDS:
            _KEYWORDS.update(await conn.fetchval("SELECT array_agg(word) FROM pg_get_keywords() WHERE catcode <> 'U'"))
        report = Report(target=f"role {who['role']} on database {who['db']} (PostgreSQL {who['version']})")
        ctx = _Context(conn, who["role"], who["db"], tenant_column, schemas, control_schema, report)
        await _check_role(ctx)
        await _check_create_privileges(ctx)
        tables = await _tenant_tables(ctx)
        await _check_rls(ctx, tables)
        await _check_rls_effective(ctx, tables)
        await _check_indexes(ctx, tables)
        await _check_control_schema(ctx)
        await _check_catalog_notify(ctx)
        await _check_functions_and_extensions(ctx)
        await _check_ssl(ctx)
        await doctor_backstop.check_guard(conn, report, backstop_key)
        await doctor_backstop.check_channels(conn, report, schemas)
    finally:
        await conn.close()
    if admin_dsn:
        await check_as_admin(report, admin_dsn, who["role"], who["db"], timeout)
    else:
        report.add("hba", SKIP, "pg_hba.conf rules and password storage not checked",
                   "pass --admin-dsn with a superuser DSN to check them")
    return report


@dataclass
class _Context:
    conn: asyncpg.Connection
    role: str
    database: str
    tenant_column: str
    schemas: list[str]
    control_schema: str
    report: Report


async def _check_role(ctx: _Context) -> None:
    r = ctx.report
    attrs = await ctx.conn.fetchrow(
        "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls FROM pg_roles WHERE rolname = current_user"
    )
    bad = False
    for column, (check, keyword, why) in ROLE_ATTRIBUTES.items():
        if attrs[column]:
            bad = True
            r.add(f"role.{check}", FAIL, f"role {ctx.role} has {keyword}: it {why}",
                  f"ALTER ROLE {qi(ctx.role)} NO{keyword};", ctx.role)
    if not bad:
        r.add("role.attributes", PASS,
              f"role {ctx.role} has no SUPERUSER, CREATEROLE, CREATEDB, REPLICATION or BYPASSRLS", subject=ctx.role)

    memberships = await ctx.conn.fetch(
        """SELECT r.rolname, r.rolsuper, r.rolbypassrls, r.rolcreaterole, r.rolreplication, r.rolcreatedb
             FROM pg_roles r
            WHERE r.rolname NOT IN (current_user, 'pg_database_owner')
              AND pg_has_role(current_user, r.oid, 'MEMBER')
            ORDER BY r.rolname"""
    )
    bad = False
    for m in memberships:
        name = m["rolname"]
        grant_fix = f"REVOKE {qi(name)} FROM {qi(ctx.role)};  -- (or from the role that passes it on)"
        if name in DANGEROUS_ROLES:
            bad = True
            r.add(f"role.member.{name}", FAIL, f"role {ctx.role} is a member of {name}, which {DANGEROUS_ROLES[name]}",
                  grant_fix, ctx.role)
        elif name.startswith("pg_"):
            bad = True
            r.add(f"role.member.{name}", FAIL, f"role {ctx.role} is a member of the predefined role {name}",
                  grant_fix, ctx.role)
        elif m["rolsuper"] or m["rolbypassrls"] or m["rolcreaterole"] or m["rolreplication"] or m["rolcreatedb"]:
            bad = True
            r.add("role.member.privileged", FAIL,
                  f"role {ctx.role} is a member of {name}, which has SUPERUSER, BYPASSRLS, CREATEROLE, "
                  "REPLICATION or CREATEDB; the role can SET ROLE to it", grant_fix, ctx.role)
        else:
            r.add("role.member.other", WARN, f"role {ctx.role} is a member of role {name}; it gets that role's privileges",
                  grant_fix, ctx.role)
    if not bad:
        r.add("role.memberships", PASS,
              f"role {ctx.role} is in none of pg_read_server_files, pg_write_server_files, "
              "pg_execute_server_program, pg_read_all_data, pg_write_all_data, pg_monitor, ... or any privileged role",
              subject=ctx.role)

    owner = await ctx.conn.fetchval(
        "SELECT pg_has_role(current_user, datdba, 'MEMBER') FROM pg_database WHERE datname = current_database()"
    )
    if owner:
        r.add("role.owns_database", FAIL,
              f"role {ctx.role} owns database {ctx.database} (and so its public schema): it can create schemas "
              "and change database-wide settings",
              f"ALTER DATABASE {qi(ctx.database)} OWNER TO postgres;", ctx.database)
    else:
        r.add("role.owns_database", PASS, f"role {ctx.role} does not own database {ctx.database}", subject=ctx.database)


async def _check_create_privileges(ctx: _Context) -> None:
    r = ctx.report
    schemas = sorted(set(ctx.schemas) | {"public"})
    rows = await ctx.conn.fetch(
        """SELECT nspname, has_schema_privilege(current_user, oid, 'CREATE') AS can_create
             FROM pg_namespace WHERE nspname = ANY($1::text[]) ORDER BY nspname""",
        schemas,
    )
    for row in rows:
        if row["can_create"]:
            r.add("schema.create", FAIL,
                  f"role {ctx.role} may CREATE in schema {row['nspname']}: it can plant functions, views and "
                  "operators that run SQL unrewritten",
                  f"REVOKE CREATE ON SCHEMA {qi(row['nspname'])} FROM PUBLIC, {qi(ctx.role)};", row["nspname"])
        else:
            r.add("schema.create", PASS, f"no CREATE on schema {row['nspname']}", subject=row["nspname"])
    if await ctx.conn.fetchval("SELECT has_database_privilege(current_database(), 'CREATE')"):
        r.add("database.create", FAIL, f"role {ctx.role} may create schemas in database {ctx.database}",
              f"REVOKE CREATE ON DATABASE {qi(ctx.database)} FROM PUBLIC, {qi(ctx.role)};", ctx.database)
    else:
        r.add("database.create", PASS, f"no CREATE on database {ctx.database}", subject=ctx.database)


@dataclass
class _Table:
    oid: int
    schema: str
    name: str
    rls: bool
    forced: bool
    owner: str
    owned: bool
    tenant_attnum: int

    @property
    def qualified(self) -> str:
        return f"{qi(self.schema)}.{qi(self.name)}"


async def _tenant_tables(ctx: _Context) -> list[_Table]:
    rows = await ctx.conn.fetch(
        """SELECT c.oid, n.nspname, c.relname, c.relrowsecurity, c.relforcerowsecurity,
                  pg_get_userbyid(c.relowner) AS owner,
                  pg_has_role(current_user, c.relowner, 'MEMBER') AS owned, a.attnum
             FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = $1 AND a.attnum > 0 AND NOT a.attisdropped
            WHERE n.nspname = ANY($2::text[]) AND c.relkind IN ('r', 'p')
            ORDER BY n.nspname, c.relname""",
        ctx.tenant_column, ctx.schemas,
    )
    tables = [_Table(r["oid"], r["nspname"], r["relname"], r["relrowsecurity"], r["relforcerowsecurity"],
                     r["owner"], r["owned"], r["attnum"]) for r in rows]
    if not tables:
        ctx.report.add("tenant_tables", FAIL,
                       f"no table in schema(s) {', '.join(ctx.schemas)} has the tenant column {ctx.tenant_column}",
                       "check --tenant-column and --schema, or that the role can see the application schema")
    else:
        ctx.report.add("tenant_tables", PASS,
                       f"{len(tables)} tenant tables: " + ", ".join(t.qualified for t in tables))
    return tables


async def _check_rls(ctx: _Context, tables: list[_Table]) -> None:
    r = ctx.report
    if not tables:
        return
    rows = {r["oid"]: r for r in await ctx.conn.fetch(BS.POLICY_SQL, [t.oid for t in tables])}
    rerun = "or rerun deploy/postgres/bootstrap.sql"
    for t in tables:
        q = t.qualified
        if not t.rls:
            r.add("rls.enabled", FAIL, f"{q}: row-level security is not enabled",
                  f"ALTER TABLE {q} ENABLE ROW LEVEL SECURITY;  ({rerun})", q)
        else:
            r.add("rls.enabled", PASS, f"{q}: row-level security enabled", subject=q)
        if not t.forced:
            r.add("rls.forced", FAIL, f"{q}: row-level security is not forced (its owner {t.owner} bypasses it)",
                  f"ALTER TABLE {q} FORCE ROW LEVEL SECURITY;  ({rerun})", q)
        else:
            r.add("rls.forced", PASS, f"{q}: row-level security forced", subject=q)
        if t.owned:
            r.add("rls.owner", FAIL,
                  f"{q} is owned by {t.owner}, and role {ctx.role} is (or can become) that role: it can switch "
                  "row-level security off and drop the policies",
                  f"ALTER TABLE {q} OWNER TO <migrations role>;", q)
        row = rows.get(t.oid)
        policies = BS.policies_from_json(json.loads(row["policies"])) if row else []
        # enabled/forced/owner are reported above; judge the policies as if those held
        reason = BS.judge(ctx.tenant_column, True, True, False, policies)
        if reason is not None:
            r.add("rls.policy", FAIL, f"{q}: {reason} (the PostgreSQL backstop is not in place)",
                  "rerun deploy/postgres/bootstrap.sql; drop any other permissive policy on the table "
                  "(or declare the table `backstop: off` with a reason in the rules)", q)
        else:
            r.add("rls.policy", PASS, f"{q}: backstop policies keyed on tenantgate_guard", subject=q)


async def _check_rls_effective(ctx: _Context, tables: list[_Table]) -> None:
    """With no tenant set, the backend role must see no row of any tenant table."""
    r = ctx.report
    for t in tables:
        if not await ctx.conn.fetchval("SELECT has_table_privilege($1::oid, 'SELECT')", t.oid):
            continue
        try:
            async with ctx.conn.transaction(readonly=True):
                # a tenant GUC must not matter: the doctor's connection was never bound
                await ctx.conn.execute(f"SELECT set_config('{TENANT_GUC}', 'tenantgate-doctor-probe', true)")
                visible = await ctx.conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {qi(t.schema)}.{qi(t.name)})")
        except asyncpg.PostgresError as e:
            r.add("rls.effective", WARN, f"{t.qualified}: could not probe row visibility: {e}", subject=t.qualified)
            continue
        if visible:
            r.add("rls.effective", FAIL,
                  f"{t.qualified}: with no tenant set, role {ctx.role} still sees rows (row-level security is "
                  "not in effect for it)",
                  "fix the role attributes and policies reported above", t.qualified)
        else:
            r.add("rls.effective", PASS, f"{t.qualified}: no rows visible without a tenant", subject=t.qualified)


async def _check_indexes(ctx: _Context, tables: list[_Table]) -> None:
    r = ctx.report
    if not tables:
        return
    indexes = await ctx.conn.fetch(
        """SELECT i.indrelid, ic.relname AS index_name, i.indisunique, i.indisprimary, i.indisvalid,
                  i.indkey::int2[] AS keys, i.indnkeyatts, con.conname,
                  pg_get_indexdef(i.indexrelid) AS indexdef,
                  ARRAY(SELECT a.attname::text FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
                          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                         WHERE k.ord <= i.indnkeyatts ORDER BY k.ord) AS key_columns,
                  (SELECT bool_and(a.attidentity = 'a') FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                    WHERE k.ord <= i.indnkeyatts) AS all_identity,
                  0 = ANY(i.indkey::int2[]) AS has_expression
             FROM pg_index i
             JOIN pg_class ic ON ic.oid = i.indexrelid
             LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
                                        AND con.contype IN ('p', 'u')
            WHERE i.indrelid = ANY($1::oid[])
            ORDER BY ic.relname""",
        [t.oid for t in tables],
    )
    by_table: dict[int, list] = {}
    for ix in indexes:
        by_table.setdefault(ix["indrelid"], []).append(ix)
    col = qi(ctx.tenant_column)
    for t in tables:
        q = t.qualified
        leaky = []
        for ix in by_table.get(t.oid, []):
            if not ix["indisunique"]:
                continue
            key_attnums = list(ix["keys"])[: ix["indnkeyatts"]]
            if t.tenant_attnum in key_attnums:
                continue
            what = f"constraint {ix['conname']}" if ix["conname"] else f"unique index {ix['index_name']}"
            cols = ", ".join(ix["key_columns"]) or "an expression"
            if ix["all_identity"] and not ix["has_expression"]:
                r.add("unique.identity_only", WARN,
                      f"{q}: {what} ({cols}) lacks {ctx.tenant_column}; its columns are GENERATED ALWAYS identities, "
                      "so clients cannot pick colliding values unless they use OVERRIDING SYSTEM VALUE",
                      f"make it UNIQUE ({ctx.tenant_column}, {cols})", q)
                continue
            leaky.append(ix)
            if ix["conname"]:
                kind = "PRIMARY KEY" if ix["indisprimary"] else "UNIQUE"
                fix = (f"ALTER TABLE {q} DROP CONSTRAINT {qi(ix['conname'])}, "
                       f"ADD CONSTRAINT {qi(ix['conname'])} {kind} ({col}, {cols});")
            else:
                fix = f"DROP INDEX {qi(t.schema)}.{qi(ix['index_name'])}; then recreate it with {col} as its first column"
            r.add("unique.no_tenant", FAIL,
                  f"{q}: {what} ({cols}) does not include {ctx.tenant_column}: its unique-violation errors echo "
                  "other tenants' values, and ON CONFLICT can reach other tenants' rows",
                  fix, q)
        if not leaky:
            r.add("unique.no_tenant", PASS, f"{q}: every unique key includes {ctx.tenant_column}", subject=q)
        leading = [ix for ix in by_table.get(t.oid, []) if ix["indisvalid"] and list(ix["keys"])[:1] == [t.tenant_attnum]]
        if leading:
            r.add("index.tenant_leading", PASS, f"{q}: index {leading[0]['index_name']} leads with {ctx.tenant_column}",
                  subject=q)
        else:
            r.add("index.tenant_leading", FAIL,
                  f"{q}: no index leads with {ctx.tenant_column}; every tenant-scoped query scans the whole table",
                  f"CREATE INDEX CONCURRENTLY ON {q} ({col});", q)


async def _check_control_schema(ctx: _Context) -> None:
    r = ctx.report
    ns = await ctx.conn.fetchrow(
        """SELECT oid, pg_get_userbyid(nspowner) AS owner, pg_has_role(current_user, nspowner, 'MEMBER') AS owned,
                  has_schema_privilege(current_user, oid, 'USAGE') AS usage,
                  has_schema_privilege(current_user, oid, 'CREATE') AS can_create
             FROM pg_namespace WHERE nspname = $1""",
        ctx.control_schema,
    )
    s = ctx.control_schema
    if ns is None:
        r.add("control.schema", WARN, f"control schema {s} does not exist yet in database {ctx.database}",
              "run deploy/postgres/bootstrap.sql (creates it, owned by tenantgate_control)", s)
        return
    bad = False
    if ns["owned"]:
        bad = True
        r.add("control.privileges", FAIL,
              f"role {ctx.role} owns (or can become the owner {ns['owner']} of) the control schema {s}: "
              "it could rewrite grants and audit records",
              f"ALTER SCHEMA {qi(s)} OWNER TO tenantgate_control;", s)
    elif ns["usage"] or ns["can_create"]:
        bad = True
        r.add("control.privileges", FAIL, f"role {ctx.role} has USAGE or CREATE on the control schema {s}",
              f"REVOKE ALL ON SCHEMA {qi(s)} FROM PUBLIC, {qi(ctx.role)};", s)
    tables = await ctx.conn.fetch(
        """SELECT c.relname FROM pg_class c
            WHERE c.relnamespace = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
              AND has_table_privilege(current_user, c.oid, 'SELECT,INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER')
            ORDER BY 1""",
        ns["oid"],
    )
    if tables:
        bad = True
        names = ", ".join(t["relname"] for t in tables)
        r.add("control.privileges", FAIL, f"role {ctx.role} has privileges on control tables: {names}",
              f"REVOKE ALL ON ALL TABLES IN SCHEMA {qi(s)} FROM PUBLIC, {qi(ctx.role)};", s)
    if not bad:
        r.add("control.privileges", PASS, f"role {ctx.role} has no privilege on the control schema {s}", subject=s)


async def _check_catalog_notify(ctx: _Context) -> None:
    """The bootstrap's DDL event trigger (tables created by migrations reach tenantgate at once)."""
    n = await ctx.conn.fetchval(
        "SELECT count(*) FROM pg_event_trigger WHERE evtname IN "
        "('tenantgate_catalog_notify', 'tenantgate_catalog_notify_drop') AND evtenabled <> 'D'")
    if n == 2:
        ctx.report.add("catalog.notify", PASS, "DDL notifies tenantgate (event triggers tenantgate_catalog_notify*)")
    else:
        ctx.report.add("catalog.notify", WARN,
                       "no DDL event trigger notifies tenantgate: new tables are seen at the next periodic "
                       "catalog refresh, or when a statement first names them",
                       "rerun deploy/postgres/bootstrap.sql (section 7) as a superuser")


async def _check_functions_and_extensions(ctx: _Context) -> None:
    r = ctx.report
    reachable = await ctx.conn.fetch(
        """SELECT f FROM unnest($1::text[]) f
            WHERE to_regprocedure(f) IS NOT NULL AND has_function_privilege(to_regprocedure(f), 'EXECUTE')""",
        SERVER_FUNCTIONS,
    )
    if reachable:
        for row in reachable:
            r.add("function.server_access", FAIL,
                  f"role {ctx.role} may execute {row['f']} (server files, programs or configuration)",
                  f"REVOKE EXECUTE ON FUNCTION {row['f']} FROM PUBLIC, {qi(ctx.role)};", row["f"])
    else:
        r.add("function.server_access", PASS,
              "no server file, large-object import/export or configuration function is executable")
    exts = await ctx.conn.fetch(
        """SELECT e.extname,
                  EXISTS (SELECT 1 FROM pg_depend d JOIN pg_proc p ON p.oid = d.objid
                           WHERE d.classid = 'pg_proc'::regclass AND d.refclassid = 'pg_extension'::regclass
                             AND d.refobjid = e.oid AND d.deptype = 'e'
                             AND has_function_privilege(p.oid, 'EXECUTE')) AS reachable
             FROM pg_extension e WHERE e.extname = ANY($1::text[]) ORDER BY 1""",
        list(DANGEROUS_EXTENSIONS),
    )
    for e in exts:
        name = e["extname"]
        if e["reachable"]:
            r.add(f"extension.{name}", FAIL,
                  f"extension {name} is installed and role {ctx.role} can call its functions: {DANGEROUS_EXTENSIONS[name]}",
                  f"DROP EXTENSION {qi(name)};  (or REVOKE EXECUTE on its functions FROM PUBLIC)", name)
        else:
            r.add(f"extension.{name}", WARN,
                  f"extension {name} is installed ({DANGEROUS_EXTENSIONS[name]}); role {ctx.role} cannot call it",
                  f"DROP EXTENSION {qi(name)}; if nothing needs it", name)
    if not exts:
        r.add("extensions", PASS, "no dangerous extension installed (" + ", ".join(sorted(DANGEROUS_EXTENSIONS)) + ")")


async def _check_ssl(ctx: _Context) -> None:
    r = ctx.report
    if await ctx.conn.fetchval("SELECT current_setting('ssl')") != "on":
        r.add("ssl", FAIL, "the server has ssl = off: tenant data crosses the network in clear text",
              "set ssl = on, ssl_cert_file and ssl_key_file in postgresql.conf, reload, and use hostssl lines in pg_hba.conf")
        return
    r.add("ssl", PASS, "the server has ssl = on")
    # (pg_stat_ssl is closed to the backend role: ask the connection itself)
    transport = getattr(ctx.conn, "_transport", None)
    encrypted = transport is not None and transport.get_extra_info("sslcontext") is not None
    if not encrypted:
        r.add("ssl.connection", WARN, "this connection to PostgreSQL is not encrypted",
              "set backend.sslmode: verify-full (and backend.sslrootcert) in tenantgate's config")
