"""Regenerate ``rules/functions.yaml``, the allowlist of built-in functions, from a live PostgreSQL 15.

Usage (from the repository root)::

    # against a throwaway embedded cluster (needs the PostgreSQL 15 binaries; run as root or postgres)
    .venv/bin/python rules/generate_functions.py --embedded

    # against an existing server (any database; only built-in functions are read)
    .venv/bin/python rules/generate_functions.py --dsn postgresql://postgres:pw@127.0.0.1:5432/postgres

    # write somewhere else / just print
    .venv/bin/python rules/generate_functions.py --embedded -o /tmp/functions.yaml
    .venv/bin/python rules/generate_functions.py --embedded -o -

How the list is derived (review THIS file, then review the diff of the YAML):

1. Every function in ``pg_proc`` of the schemas ``pg_catalog`` and
   ``information_schema`` is classified, overload by overload.
2. :data:`EXCLUDE` rules come first.  Each is a named group with a reason and
   glob patterns; a name that matches any of them is excluded, all overloads.
   The patterns are also written to the YAML, so they catch functions that are
   not in this server (extensions such as dblink, adminpack,
   pg_stat_statements) and new ones in later releases.
3. Then structural categories that need no review per name: IMMUTABLE
   functions (pure functions of their arguments), the functions behind built-in
   operators, type input/output functions, aggregates and window functions.
4. STABLE and VOLATILE functions are allowed only when :data:`REVIEWED` lists
   them (by category).  Anything else is excluded as "not reviewed": a new
   release's new functions are refused until somebody looks at them.
5. Functions that take type ``internal`` or return a handler/trigger type are
   support functions PostgreSQL calls itself; they are excluded.

Decisions are made per *name*, because a SQL call names a function, not an
overload: a name is allowed only if every overload callable from SQL is
allowed.

The test ``tests/test_allowlist_catalog.py`` checks that every function of the
test cluster is either allowed or excluded, so an upgrade shows up as a test
failure until this script is re-run and the diff reviewed.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import textwrap
from collections import defaultdict
from pathlib import Path

# ----------------------------------------------------------------------------- exclusions
# (group id, reason, patterns).  Order matters only for which reason is shown.
EXCLUDE: list[tuple[str, str, list[str]]] = [
    ("server_files",
     "server file and directory access: reads server files, lists server directories or reveals server file paths",
     ["pg_read_file", "pg_read_file_old", "pg_read_binary_file", "pg_ls_*", "pg_stat_file",
      "pg_relation_filepath", "pg_relation_filenode", "pg_filenode_relation", "pg_tablespace_location",
      "pg_current_logfile"]),
    ("adminpack_writers",
     "adminpack-style server file access: writes, renames or deletes server files, lists the log directory",
     ["pg_file_*", "pg_logdir_ls", "pg_logfile_rotate"]),
    ("large_objects",
     "large objects: server-side storage outside the tenant tables; lo_import/lo_export read and write server files",
     ["lo_*", "loread", "lowrite", "be_lo_*"]),
    ("sql_as_text",
     "runs SQL given as text, which the rewriter cannot see",
     ["query_to_xml", "query_to_xml_and_xmlschema", "query_to_xmlschema",
      "cursor_to_xml", "cursor_to_xmlschema",
      "table_to_xml", "table_to_xml_and_xmlschema", "table_to_xmlschema",
      "schema_to_xml", "schema_to_xml_and_xmlschema", "schema_to_xmlschema",
      "database_to_xml", "database_to_xml_and_xmlschema", "database_to_xmlschema",
      "ts_stat", "ts_rewrite", "dblink*", "pg_cursor"]),
    ("server_reconfiguration",
     "reconfigures or controls the server, or signals other backends",
     ["pg_reload_conf", "pg_terminate_backend", "pg_cancel_backend", "pg_rotate_logfile*", "pg_promote",
      "pg_log_backend_memory_contexts", "pg_switch_wal", "pg_create_restore_point", "pg_backup_*",
      "pg_start_backup", "pg_stop_backup", "pg_wal_replay_*", "pg_import_system_collations",
      "pg_stat_reset*", "pg_stat_clear_snapshot", "pg_stat_force_next_flush", "pg_nextoid",
      "pg_stop_making_pinned_objects", "binary_upgrade_*", "pg_extension_config_dump",
      "brin_summarize_*", "brin_desummarize_range", "gin_clean_pending_list", "pg_wal_*",
      "pg_walfile_name*", "pg_get_wal_*"]),
    ("replication",
     "replication, logical decoding and WAL control: server-wide state and other tenants' changes",
     ["*replication_slot*", "pg_logical_*", "pg_replication_origin*", "pg_show_replication_origin_status",
      "pg_export_snapshot", "pg_current_wal_*", "pg_last_wal_*", "pg_last_xact_replay_timestamp",
      "pg_get_publication_tables"]),
    ("other_sessions_and_server_state",
     "reveals other sessions, statistics or server internals (may carry other tenants' queries and values)",
     ["pg_stat_get_*", "pg_stat_have_stats", "pg_stat_statements*", "pg_lock_status", "pg_blocking_pids",
      "pg_safe_snapshot_blocking_pids", "pg_isolation_test_session_is_blocked",
      "pg_get_backend_memory_contexts", "pg_get_shmem_allocations", "pg_prepared_xact",
      "pg_show_all_file_settings", "pg_hba_file_rules", "pg_ident_file_mappings", "pg_config",
      "pg_control_*", "pg_show_all_settings", "pg_notification_queue_usage", "pg_get_multixact_members",
      "pg_mcv_list_items", "pg_last_committed_xact", "pg_xact_commit_timestamp*", "pg_xact_status",
      "txid_status", "pg_get_replication_slots",
      "pg_sequence_last_value", "pg_stat_*",
      # transaction pooling: a pooled connection holds other clients' prepared statements
      "pg_prepared_statement"]),
    ("set_config",
     "changes a server setting; allowed only as set_config('<safe parameter>', ...) with a string literal "
     "naming a parameter of the safe SET list (special-cased by the checker)",
     ["set_config"]),
    ("shared_namespaces",
     "advisory locks and NOTIFY channels are database-wide namespaces shared by all tenants: one tenant "
     "could block or observe another",
     ["pg_advisory_*", "pg_try_advisory_*", "pg_notify"]),
    ("pooled_session_state",
     "leaves state in the backend session that outlives the statement and is not reset when a pooled "
     "connection is lent to another client: setseed() makes the next client's random() predictable",
     ["setseed"]),
    ("sequence_control",
     "setval moves a sequence that all tenants share (nextval/currval/lastval stay allowed: ORMs need them)",
     ["setval"]),
    ("support_functions",
     "support functions PostgreSQL calls itself (triggers, language handlers and validators, "
     "event triggers, index AM validation): never called by clients",
     ["RI_FKey_*", "plpgsql_*", "fmgr_*_validator", "postgresql_fdw_validator", "pg_event_trigger_*",
      "amvalidate", "currtid2", "unique_key_recheck", "suppress_redundant_updates_trigger",
      "tsvector_update_trigger*", "pg_ddl_command_*", "pg_get_object_address"]),
]

# ----------------------------------------------------------------------------- reviewed stable/volatile
REVIEWED: dict[str, tuple[str, list[str]]] = {
    "datetime": ("date and time functions (STABLE because they depend on TimeZone/DateStyle or the clock)",
                 ["now", "clock_timestamp", "statement_timestamp", "transaction_timestamp", "timeofday",
                  "age", "mxid_age", "date", "date_part", "date_trunc", "extract", "make_timestamptz",
                  "timestamp", "timestamptz", "time", "timetz", "timezone", "overlaps", "to_char",
                  "to_date", "to_number", "to_timestamp", "date_cmp_timestamptz",
                  "timestamp_cmp_timestamptz", "timestamptz_cmp_date", "timestamptz_cmp_timestamp",
                  "in_range", "money", "numeric", "pg_sleep", "pg_sleep_for", "pg_sleep_until"]),
    "strings_and_formatting": ("string and formatting functions (STABLE because output functions may depend on settings)",
                               ["concat", "concat_ws", "format", "length", "convert", "convert_from",
                                "convert_to", "quote_literal", "quote_nullable", "array_to_string", "xml",
                                "xml_is_well_formed", "regclass"]),
    "json": ("JSON construction and conversion",
             ["array_to_json", "row_to_json", "to_json", "to_jsonb", "json_build_array", "json_build_object",
              "jsonb_build_array", "jsonb_build_object", "json_populate_record", "json_populate_recordset",
              "json_to_record", "json_to_recordset", "jsonb_populate_record", "jsonb_populate_recordset",
              "jsonb_to_record", "jsonb_to_recordset", "jsonb_path_exists_tz", "jsonb_path_match_tz",
              "jsonb_path_query_array_tz", "jsonb_path_query_first_tz", "jsonb_path_query_tz",
              "json_to_tsvector", "jsonb_to_tsvector"]),
    "text_search": ("text search with the session's configuration",
                    ["to_tsvector", "to_tsquery", "plainto_tsquery", "phraseto_tsquery", "websearch_to_tsquery",
                     "ts_headline", "ts_debug", "ts_parse", "ts_token_type", "get_current_ts_config"]),
    "random_and_series": ("random values, UUIDs, series and enums",
                          ["random", "gen_random_uuid", "generate_series", "enum_first", "enum_last",
                           "enum_range", "enum_in", "enum_out", "enum_send"]),
    "session_info": ("the session's own state (its user, database, settings, transaction, prepared statements)",
                     ["current_database", "current_schema", "current_schemas", "current_setting", "current_user",
                      "session_user", "getpgusername", "current_query", "version", "pg_backend_pid",
                      "pg_trigger_depth", "pg_my_temp_schema", "pg_is_other_temp_schema", "pg_jit_available",
                      "pg_is_in_recovery", "inet_client_addr", "inet_client_port",
                      # the server's own address and port on the proxy's backend connection (NULL over a
                      # Unix socket): infrastructure, no tenant data; GUI clients and HA checks call them
                      "inet_server_addr", "inet_server_port", "pg_client_encoding",
                      "getdatabaseencoding", "pg_encoding_to_char", "pg_char_to_encoding", "pg_listening_channels",
                      "pg_conf_load_time", "pg_postmaster_start_time",
                      "row_security_active", "pg_typeof", "pg_collation_for", "pg_column_size",
                      "pg_column_compression", "txid_current", "txid_current_if_assigned", "txid_current_snapshot",
                      "pg_current_xact_id", "pg_current_xact_id_if_assigned", "pg_current_snapshot",
                      "nextval", "currval", "lastval"]),
    "catalog_introspection": ("catalog helpers that drivers, ORMs and psql call (schema, not data)",
                              ["pg_get_constraintdef", "pg_get_expr", "pg_get_indexdef", "pg_get_viewdef",
                               "pg_get_triggerdef", "pg_get_ruledef", "pg_get_functiondef",
                               "pg_get_function_arguments", "pg_get_function_identity_arguments",
                               "pg_get_function_result", "pg_get_function_arg_default", "pg_get_function_sqlbody",
                               "pg_get_userbyid", "pg_get_serial_sequence", "pg_get_partkeydef",
                               "pg_get_partition_constraintdef", "pg_get_statisticsobjdef",
                               "pg_get_statisticsobjdef_columns", "pg_get_statisticsobjdef_expressions",
                               "pg_get_keywords", "pg_get_replica_identity_index", "pg_get_catalog_foreign_keys",
                               "*_is_visible", "has_*_privilege", "pg_has_role", "format_type", "obj_description",
                               "col_description", "shobj_description", "pg_describe_object", "pg_identify_object",
                               "pg_identify_object_as_address", "to_reg*", "pg_relation_is_updatable",
                               "pg_column_is_updatable", "pg_index_column_has_property", "pg_index_has_property",
                               "pg_indexam_has_property", "pg_options_to_table", "pg_partition_tree",
                               "pg_partition_ancestors", "pg_partition_root", "pg_tablespace_databases",
                               "pg_timezone_names", "pg_timezone_abbrevs", "aclexplode", "pg_settings_get_flags",
                               "pg_available_extensions", "pg_available_extension_versions",
                               "pg_extension_update_paths", "oidvectortypes", "pg_collation_actual_version",
                               "pg_database_collation_actual_version", "pg_sequence_parameters",
                               "pg_relation_is_publishable", "_pg_*"]),
    "sizes": ("relation and database sizes (psql \\d+, \\dt+ and \\l+ show them; aggregate size only)",
              ["pg_relation_size", "pg_table_size", "pg_total_relation_size", "pg_indexes_size",
               "pg_database_size", "pg_tablespace_size"]),
}

# Parameters set_config() may change: the part of the safe SET list whose change the proxy need not see.
# Not here, on purpose: client_encoding and standard_conforming_strings (the proxy lexes SQL text and
# must agree with the server on encoding and string escapes; a plain SET of these is tracked by the
# engine, set_config inside a query is not), transaction_read_only / default_transaction_read_only
# (read-only sessions), search_path, role, session_authorization, row_security and every tenantgate.*.
SAFE_SET_PARAMETERS = [
    "application_name", "datestyle", "timezone", "extra_float_digits", "statement_timeout", "lock_timeout",
    "idle_in_transaction_session_timeout", "idle_session_timeout", "intervalstyle", "bytea_output",
    "client_min_messages", "default_transaction_isolation", "work_mem", "jit", "plan_cache_mode",
]

HANDLER_RETURN_TYPES = {"trigger", "event_trigger", "language_handler", "fdw_handler", "index_am_handler",
                        "table_am_handler", "tsm_handler"}

TYPE_CATEGORY_LABELS = {
    "A": "arrays", "B": "booleans", "C": "composite types and records", "D": "date and time",
    "E": "enums", "G": "geometric types", "I": "network addresses", "N": "numbers and object identifiers",
    "P": "pseudo-types (polymorphic)", "R": "ranges and multiranges", "S": "strings", "T": "intervals",
    "U": "other types (json, uuid, bytea, text search, xml, ...)", "V": "bit strings", "X": "unknown",
    "Z": "internal-use types",
}

QUERY = """
SELECT p.proname, n.nspname, p.prokind, p.provolatile,
       EXISTS (SELECT 1 FROM pg_operator o WHERE o.oprcode = p.oid) AS is_operator,
       EXISTS (SELECT 1 FROM pg_type t WHERE p.oid IN (t.typinput, t.typoutput, t.typreceive, t.typsend,
                                                        t.typmodin, t.typmodout)) AS is_type_io,
       EXISTS (SELECT 1 FROM pg_cast c WHERE c.castfunc = p.oid) AS is_cast,
       'internal'::regtype = ANY (p.proargtypes::oid[]) AS takes_internal,
       p.prorettype::regtype::text AS rettype,
       COALESCE((SELECT t.typcategory FROM pg_type t
                 WHERE t.oid = COALESCE(p.proargtypes[0], p.prorettype)), 'X') AS typcategory
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname IN ('pg_catalog', 'information_schema')
ORDER BY 1
"""


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def exclusion_for(name: str) -> str | None:
    for group, _reason, patterns in EXCLUDE:
        if _matches(name, patterns):
            return group
    return None


def reviewed_category(name: str) -> str | None:
    for cat, (_why, patterns) in REVIEWED.items():
        if _matches(name, patterns):
            return cat
    return None


def classify(rows: list[dict]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """rows -> (allowed: category -> names, excluded: group -> names)."""
    by_name: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_name[r["proname"]].append(r)
    allowed: dict[str, set[str]] = defaultdict(set)
    excluded: dict[str, set[str]] = defaultdict(set)
    for name, overloads in sorted(by_name.items()):
        group = exclusion_for(name)
        if group:
            excluded[group].add(name)
            continue
        callable_ = [o for o in overloads if not o["takes_internal"] and o["rettype"] not in HANDLER_RETURN_TYPES]
        if not callable_:
            excluded["support_functions"].add(name)
            continue
        categories = []
        unreviewed = False
        for o in callable_:
            if o["prokind"] == "a":
                categories.append("aggregates")
            elif o["prokind"] == "w":
                categories.append("window functions")
            elif o["is_operator"]:
                categories.append("operator implementations")
            elif o["is_type_io"] or o["is_cast"]:
                categories.append("type input/output and casts")
            elif reviewed_category(name):
                categories.append(reviewed_category(name))
            elif o["provolatile"] == "i":
                categories.append("immutable: " + TYPE_CATEGORY_LABELS.get(o["typcategory"], "other types"))
            else:
                unreviewed = True
        if unreviewed:
            excluded["not_reviewed"].add(name)
        else:
            allowed[sorted(categories)[0]].add(name)
    return allowed, excluded


def _flow_list(names: list[str], indent: int) -> str:
    body = ", ".join(_yaml_str(n) for n in names)
    wrapped = textwrap.wrap(body, width=110 - indent, break_long_words=False, break_on_hyphens=False)
    pad = " " * indent
    return "[\n" + "\n".join(pad + "  " + line for line in wrapped) + "\n" + pad + "]"


def _yaml_str(s: str) -> str:
    if s.replace("_", "a").isalnum() and s[0].isalpha() and s.islower() and s not in ("yes", "no", "on", "off", "null", "true", "false"):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


REVIEW_WHY = {cat: why for cat, (why, _p) in REVIEWED.items()}
STRUCTURAL_WHY = {
    "aggregates": "built-in aggregates",
    "window functions": "built-in window functions",
    "operator implementations": "functions behind built-in operators (the operators are allowed anyway)",
    "type input/output and casts": "type input/output, typmod and cast functions of built-in types",
}
NOT_REVIEWED_REASON = ("STABLE or VOLATILE built-in not reviewed as safe (may read server or session state or have "
                       "side effects); add it to REVIEWED in rules/generate_functions.py after review")


def render(allowed: dict[str, set[str]], excluded: dict[str, set[str]], server_version: str) -> str:
    out = [
        "# tenantgate: the allowlist of built-in functions for tenant and operator sessions.",
        "#",
        f"# GENERATED by rules/generate_functions.py from {server_version}.",
        "# Do not edit by hand: change the rules in generate_functions.py, re-run it and review the diff.",
        "#",
        "# A function call is allowed only when its name is listed under `allowed` (built-ins, unqualified or",
        "# qualified with pg_catalog / information_schema) or declared safe in the tenancy rules",
        "# (`safe_functions`).  A name matching any `excluded` pattern is refused with that group's reason,",
        "# even if it is not in this server (extensions, later releases).  Everything else is refused as",
        "# unknown (user-defined or new).  Operators: every built-in operator is allowed, because the",
        "# function behind each one is on the allowed list (category `operator implementations`);",
        "# OPERATOR(schema.op) syntax is allowed only with schema pg_catalog.  (Operators that extensions",
        "# install are not visible to a syntax check: install only extensions whose operators are harmless.)",
        "#",
        "# Decisions worth knowing (details in the reasons below):",
        "# - sequences: nextval/currval/lastval allowed (ORMs call them; they reveal only a shared counter),",
        "#   setval refused (it moves a sequence every tenant shares);",
        "# - transaction ids: the session's own (txid_current, pg_current_xact_id, snapshots) allowed; the status",
        "#   or commit time of arbitrary transactions (txid_status, pg_xact_status, ...) refused;",
        "# - advisory locks and pg_notify refused (database-wide namespaces shared by all tenants);",
        "# - pg_sleep allowed (bounded by statement_timeout; touches no data);",
        "# - relation sizes allowed (psql \\d+ and \\l+ show them; aggregate size only);",
        "# - set_config: special-cased, see set_config_safe_parameters.",
        "",
        "version: 1",
        "",
        "# set_config(name, value, is_local) is allowed only when `name` is a string literal naming one of these",
        "# (see SAFE_SET_PARAMETERS in generate_functions.py for what is left out and why).",
        "set_config_safe_parameters: " + _flow_list(sorted(SAFE_SET_PARAMETERS), 0),
        "",
        "excluded:",
    ]
    groups = [g for g, _r, _p in EXCLUDE] + ["not_reviewed"]
    reasons = {g: r for g, r, _p in EXCLUDE}
    reasons["not_reviewed"] = NOT_REVIEWED_REASON
    patterns = {g: p for g, _r, p in EXCLUDE}
    for g in groups:
        out.append(f"  {g}:")
        out.append(f"    reason: {_yaml_str(reasons[g])}")
        if patterns.get(g):
            out.append("    patterns: " + _flow_list(patterns[g], 4))
        out.append("    # functions of this server that the group excludes")
        out.append("    functions: " + _flow_list(sorted(excluded.get(g, ())), 4))
    out.append("")
    out.append("allowed:")
    for cat in sorted(allowed):
        why = REVIEW_WHY.get(cat) or STRUCTURAL_WHY.get(cat) or (
            "IMMUTABLE built-ins (pure functions of their arguments), by the type of their first argument")
        out.append(f"  {_yaml_str(cat)}:")
        out.append(f"    why: {_yaml_str(why)}")
        out.append("    functions: " + _flow_list(sorted(allowed[cat]), 4))
    return "\n".join(out) + "\n"


def fetch_rows(dsn: str) -> tuple[list[dict], str]:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(dsn, row_factory=dict_row) as conn:
        rows = conn.execute(QUERY).fetchall()
        version = conn.execute("SELECT version() AS v").fetchone()["v"].split(" on ")[0]
    return rows, version


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--dsn", help="libpq URI of a PostgreSQL 15 server")
    src.add_argument("--embedded", action="store_true", help="start a throwaway embedded cluster")
    ap.add_argument("-o", "--output", default=str(Path(__file__).with_name("functions.yaml")),
                    help="output file, '-' for stdout (default: rules/functions.yaml)")
    args = ap.parse_args(argv)
    if args.embedded:
        import tempfile

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from proxy.pgcluster import make_cluster

        with tempfile.TemporaryDirectory(prefix="tg-genfuncs-") as d:
            import os

            os.chmod(d, 0o755)
            cluster = make_cluster(Path(d), "pg")
            try:
                rows, version = fetch_rows(cluster.admin_dsn)
            finally:
                cluster.destroy()
    else:
        rows, version = fetch_rows(args.dsn)
    allowed, excluded = classify(rows)
    text = render(allowed, excluded, version)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        n_allowed = sum(len(v) for v in allowed.values())
        n_excluded = sum(len(v) for v in excluded.values())
        print(f"wrote {args.output}: {n_allowed} names allowed, {n_excluded} excluded", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
