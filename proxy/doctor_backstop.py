"""`tenantgate doctor`, the backstop part: the guard, the policies' shape, the closed channels.

Called by :func:`proxy.doctor.diagnose` on its connection as tenantgate's backend role.

* ``backstop.guard``: role ``tenantgate_guard`` exists, cannot log in, is no superuser, and the
  backend role cannot act as it; it owns schema ``tenantgate_guard``, its key and binding tables
  (no privilege on them for the backend role) and the SECURITY DEFINER functions.
* ``backstop.key``: a key is installed (else nothing can be bound: warn); when the caller knows
  the proxy's key, its id must match (else every bind is refused: fail).
* ``backstop.policy`` (per tenant table, :func:`proxy.policy.backstop_state.judge`): RLS enabled
  and forced, tenantgate's policies present and keyed on the guard, nothing permissive beside.
* ``channel.<name>``: each cross-tenant channel PostgreSQL opens to PUBLIC that
  ``deploy/postgres/bootstrap.sql`` closes (section 6) is still closed for the backend role.
  docs/security.md lists them with the mechanism that closes each.
"""

from __future__ import annotations

import asyncpg

from proxy.doctor_common import FAIL, PASS, WARN
RERUN = "rerun deploy/postgres/bootstrap.sql (it is idempotent)"

# check id -> (what it is, SQL answering TRUE when the channel is open to the backend role)
_FN = "has_function_privilege(current_user, {sig!r}, 'EXECUTE')"
_TB = "has_table_privilege(current_user, {rel!r}, 'SELECT')"


def _any_fn(pattern: str, exclude: tuple[str, ...] = ()) -> str:
    excl = "".join(f" AND p.proname NOT LIKE '{e}'" for e in exclude)
    return ("EXISTS (SELECT 1 FROM pg_proc p WHERE p.pronamespace = 'pg_catalog'::regnamespace "
            f"AND p.proname LIKE '{pattern}'{excl} AND has_function_privilege(current_user, p.oid, 'EXECUTE'))")


CHANNELS: dict[str, tuple[str, str]] = {
    "channel.activity": ("other sessions' query text and state (pg_stat_activity, pg_stat_get_activity)",
                         f"{_TB.format(rel='pg_catalog.pg_stat_activity')} OR "
                         f"{_FN.format(sig='pg_catalog.pg_stat_get_activity(integer)')} OR "
                         f"{_FN.format(sig='pg_catalog.pg_stat_get_backend_activity(integer)')}"),
    "channel.stats_counters": ("per-table activity counters (pg_stat_*_tables, pg_statio_*, pg_stat_get_*)",
                               f"{_TB.format(rel='pg_catalog.pg_stat_user_tables')} OR "
                               f"{_TB.format(rel='pg_catalog.pg_statio_user_tables')} OR "
                               + _any_fn(r"pg\_stat\_get\_%", ("pg_stat_get_activity",
                                                                   r"pg\_stat\_get\_backend\_%"))),
    "channel.locks": ("other sessions' locks (pg_locks, pg_lock_status, pg_blocking_pids)",
                      f"{_TB.format(rel='pg_catalog.pg_locks')} OR "
                      f"{_FN.format(sig='pg_catalog.pg_lock_status()')} OR "
                      f"{_FN.format(sig='pg_catalog.pg_blocking_pids(integer)')}"),
    "channel.column_stats": ("most common values and histograms of tenant tables (pg_stats, pg_stats_ext, "
                             "pg_statistic, pg_statistic_ext_data)",
                             f"{_TB.format(rel='pg_catalog.pg_stats')} OR {_TB.format(rel='pg_catalog.pg_stats_ext')} "
                             f"OR {_TB.format(rel='pg_catalog.pg_stats_ext_exprs')} OR "
                             f"{_TB.format(rel='pg_catalog.pg_statistic')} OR "
                             f"{_TB.format(rel='pg_catalog.pg_statistic_ext_data')}"),
    "channel.large_objects": ("large objects (lo_*, loread/lowrite, pg_largeobject, pg_largeobject_metadata)",
                              _any_fn(r"lo\_%") + " OR "
                              f"{_FN.format(sig='pg_catalog.loread(integer, integer)')} OR "
                              f"{_TB.format(rel='pg_catalog.pg_largeobject')} OR "
                              f"{_TB.format(rel='pg_catalog.pg_largeobject_metadata')} OR "
                              "current_setting('lo_compat_privileges') = 'on'"),
    "channel.temp": ("TEMP on the database (temporary tables, views and functions)",
                     "has_database_privilege(current_user, current_database(), 'TEMP')"),
    "channel.advisory_locks": ("advisory locks (one lock space per database)",
                               _any_fn(r"pg\_advisory%", ("pg_advisory_unlock_all",)) + " OR "
                               + _any_fn(r"pg\_try\_advisory%")),
    "channel.notify": ("pg_notify() (one notification space per database)",
                       f"{_FN.format(sig='pg_catalog.pg_notify(text, text)')}"),
    "channel.prepared_xacts": ("prepared transactions of other sessions (pg_prepared_xacts) and PREPARE "
                               "TRANSACTION",
                               f"{_TB.format(rel='pg_catalog.pg_prepared_xacts')} OR "
                               f"{_FN.format(sig='pg_catalog.pg_prepared_xact()')} OR "
                               "current_setting('max_prepared_transactions')::int > 0"),
    "channel.setseed": ("setseed() (the random() state of a pooled backend outlives the transaction)",
                        f"{_FN.format(sig='pg_catalog.setseed(double precision)')}"),
    "channel.signal": ("cancelling or terminating other sessions of the same role",
                       f"{_FN.format(sig='pg_catalog.pg_cancel_backend(integer)')} OR "
                       f"{_FN.format(sig='pg_catalog.pg_terminate_backend(integer, bigint)')}"),
    "channel.sequences": ("sequences' last values (SELECT on sequences, pg_sequence_last_value, pg_sequences)",
                          f"{_FN.format(sig='pg_catalog.pg_sequence_last_value(regclass)')} OR "
                          f"{_TB.format(rel='pg_catalog.pg_sequences')} OR EXISTS ("
                          "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                          "WHERE c.relkind = 'S' AND n.nspname = ANY($1::text[]) "
                          "AND (has_sequence_privilege(current_user, c.oid, 'SELECT') "
                          "OR has_sequence_privilege(current_user, c.oid, 'UPDATE')))"),
    "channel.truncate": ("TRUNCATE on tenant tables (it ignores row-level security)",
                         "EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                         "WHERE c.relkind IN ('r', 'p') AND n.nspname = ANY($1::text[]) "
                         "AND has_table_privilege(current_user, c.oid, 'TRUNCATE') "
                         "AND NOT pg_has_role(current_user, c.relowner, 'MEMBER'))"),  # owners: rls.owner
    "channel.pg_stat_statements": ("pg_stat_statements (other sessions' statements), when installed",
                                   "EXISTS (SELECT 1 FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass "
                                   "AND d.objid = p.oid AND d.deptype = 'e' JOIN pg_extension e ON e.oid = d.refobjid "
                                   "WHERE e.extname = 'pg_stat_statements' "
                                   "AND has_function_privilege(current_user, p.oid, 'EXECUTE'))"),
    "channel.foreign_data": ("foreign data wrappers (dblink_fdw, postgres_fdw, file_fdw) usable",
                             "EXISTS (SELECT 1 FROM pg_foreign_data_wrapper w "
                             "WHERE has_foreign_data_wrapper_privilege(current_user, w.oid, 'USAGE'))"),
}


async def check_channels(conn: asyncpg.Connection, report, schemas: list[str]) -> None:
    for check, (what, sql) in CHANNELS.items():
        try:
            args = [schemas] if "$1" in sql else []
            is_open = await conn.fetchval(f"SELECT {sql}", *args)
        except asyncpg.PostgresError as e:
            report.add(check, WARN, f"could not check {what}: {e}", RERUN)
            continue
        if is_open:
            report.add(check, FAIL, f"open to the backend role: {what}", RERUN)
        else:
            report.add(check, PASS, f"closed: {what}")


async def check_guard(conn: asyncpg.Connection, report, backstop_key: bytes | None = None) -> None:
    row = await conn.fetchrow(
        """SELECT r.rolcanlogin, r.rolsuper, r.rolbypassrls,
                  pg_has_role(current_user, r.oid, 'MEMBER') AS member,
                  (SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = 'tenantgate_guard') AS owner,
                  has_table_privilege(current_user, 'tenantgate_guard.key', 'SELECT,INSERT,UPDATE,DELETE,TRUNCATE')
                    AS key_access,
                  has_table_privilege(current_user, 'tenantgate_guard.binding', 'SELECT,INSERT,UPDATE,DELETE,TRUNCATE')
                    AS binding_access,
                  (SELECT bool_and(p.prosecdef AND pg_get_userbyid(p.proowner) = 'tenantgate_guard')
                     FROM pg_proc p WHERE p.pronamespace = 'tenantgate_guard'::regnamespace) AS functions_ok,
                  (SELECT count(*) FROM pg_proc p WHERE p.pronamespace = 'tenantgate_guard'::regnamespace
                     AND has_function_privilege(current_user, p.oid, 'EXECUTE')) AS callable
             FROM pg_roles r WHERE r.rolname = 'tenantgate_guard'"""
    ) if await conn.fetchval("SELECT to_regclass('tenantgate_guard.binding') IS NOT NULL") else None
    if row is None:
        report.add("backstop.guard", FAIL, "the backstop guard (role and schema tenantgate_guard) is not installed: "
                   "the row-level security policies cannot tell which tenant tenantgate bound", RERUN)
        return
    problems = []
    if row["rolcanlogin"] or row["rolsuper"] or row["rolbypassrls"]:
        problems.append("tenantgate_guard can log in, is superuser or bypasses RLS")
    if row["member"]:
        problems.append("the backend role can act as tenantgate_guard (forge any binding)")
    if row["owner"] != "tenantgate_guard":
        problems.append(f"schema tenantgate_guard is owned by {row['owner']}")
    if row["key_access"] or row["binding_access"]:
        problems.append("the backend role has privileges on the guard's key or binding table")
    if not row["functions_ok"]:
        problems.append("a function in schema tenantgate_guard is not SECURITY DEFINER owned by tenantgate_guard")
    if problems:
        report.add("backstop.guard", FAIL, "; ".join(problems), f"REVOKE tenantgate_guard FROM <role>; {RERUN}")
    else:
        report.add("backstop.guard", PASS, "tenantgate_guard holds the key and the bindings; the backend role "
                   "can only call its functions")
    installed = await conn.fetchval("SELECT tenantgate_guard.key_id()")
    if installed is None:
        report.add("backstop.key", WARN, "no backstop key installed: tenantgate cannot bind any tenant, so tenant "
                   "tables show no rows through it",
                   "rerun deploy/postgres/bootstrap.sql with -v backstop_key=<tenantgate's backstop.key>")
    elif backstop_key is not None:
        from proxy.backstop import key_id

        if key_id(backstop_key) != installed:
            report.add("backstop.key", FAIL, f"the installed backstop key ({installed}) is not tenantgate's "
                       f"({key_id(backstop_key)}): every binding is refused",
                       "rerun deploy/postgres/bootstrap.sql with -v backstop_key=<tenantgate's backstop.key>")
        else:
            report.add("backstop.key", PASS, f"backstop key {installed} installed, the same as tenantgate's")
    else:
        report.add("backstop.key", PASS, f"backstop key {installed} installed")
