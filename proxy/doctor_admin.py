"""doctor's checks as the database superuser: pg_hba.conf rules and stored passwords.

``tenantgate doctor --admin-dsn`` connects as a superuser to read ``pg_hba_file_rules`` and
``pg_authid`` (which rules admit the backend and control roles, and how their passwords are
stored).  Part of :mod:`proxy.doctor`, which calls :func:`check_as_admin`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg

from proxy.doctor_common import FAIL, PASS, SKIP, WARN, qi

if TYPE_CHECKING:  # pragma: no cover
    from proxy.doctor import Report

async def check_as_admin(report: Report, admin_dsn: str, role: str, database: str, timeout: float) -> None:
    try:
        conn = await asyncpg.connect(admin_dsn, timeout=timeout)
    except Exception as e:  # noqa: BLE001
        report.add("admin.connect", FAIL, f"cannot connect with the admin DSN: {e}", "check --admin-dsn")
        return
    try:
        if not await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
            report.add("hba", SKIP, "the admin DSN is not a superuser: pg_hba rules not checked",
                       "pass a superuser DSN as --admin-dsn")
            return
        rules = await conn.fetch(
            """SELECT line_number, type, database, user_name, address, netmask, auth_method, error
                 FROM pg_hba_file_rules ORDER BY line_number"""
        )
        groups = {r["rolname"] for r in await conn.fetch(
            "SELECT g.rolname FROM pg_roles g WHERE pg_has_role($1, g.oid, 'MEMBER')", role)}
        _check_hba_rules(report, rules, role, database, groups)
        stored = await conn.fetch(
            """SELECT rolname, rolpassword IS NULL AS nopass, rolpassword LIKE 'SCRAM-SHA-256$%' AS scram
                 FROM pg_authid WHERE rolname IN ($1, 'tenantgate_control') ORDER BY 1""",
            role,
        )
        for s in stored:
            if s["nopass"]:
                continue
            if s["scram"]:
                report.add("role.password", PASS, f"role {s['rolname']}'s password is stored as a SCRAM-SHA-256 verifier",
                           subject=s["rolname"])
            else:
                report.add("role.password", FAIL,
                           f"role {s['rolname']}'s password is stored as an MD5 hash (replayable, and allows md5 auth)",
                           f"SET password_encryption = 'scram-sha-256'; ALTER ROLE {qi(s['rolname'])} PASSWORD '...';",
                           s["rolname"])
    finally:
        await conn.close()


def _admits(values: list[str] | None, wanted: set[str]) -> bool:
    return any(v in wanted for v in (values or []))


def _check_hba_rules(report: Report, rules, role: str, database: str, groups: set[str]) -> None:
    before = len(report.findings)
    db_names = {"all", database, "sameuser" if database == role else ""}
    user_names = {"all", role} | {f"+{g}" for g in groups}
    closed = {"v4": False, "v6": False}
    admitted = False
    for rule in rules:
        line = f"pg_hba.conf line {rule['line_number']}"
        if rule["error"]:
            report.add("hba.error", FAIL, f"{line}: {rule['error']}", "fix the line and reload", line)
            continue
        method, kind = rule["auth_method"], rule["type"]
        if kind == "local":
            if method == "trust":
                report.add("hba.local_trust", WARN,
                           f"{line}: local trust for {','.join(rule['user_name'] or [])}: any OS user on the "
                           "database host can log in",
                           "use peer for local maintenance, with a private unix_socket_directories", line)
            continue
        address, netmask = rule["address"], rule["netmask"]
        family = "v6" if address and ":" in address else "v4"
        whole_world = address == "all" or netmask in ("0.0.0.0", "::")
        if (address == "all" and all(closed.values())) or (address != "all" and closed[family]):
            continue  # shadowed by an earlier catch-all reject
        if method == "reject":
            if whole_world and rule["database"] == ["all"] and rule["user_name"] == ["all"]:
                if address == "all":
                    closed = {"v4": True, "v6": True}
                else:
                    closed[family] = True
            continue
        if method == "trust":
            report.add("hba.trust", FAIL, f"{line}: {kind} ... trust lets anyone who can reach the port log in "
                       "without a password", f"change line {rule['line_number']} to scram-sha-256 or reject", line)
        elif method == "password":
            report.add("hba.password", FAIL, f"{line}: method password sends passwords in clear text",
                       f"change line {rule['line_number']} to scram-sha-256", line)
        elif method in ("ident", "peer"):
            report.add("hba.ident", FAIL, f"{line}: ident over TCP trusts the client host's identd",
                       f"change line {rule['line_number']} to scram-sha-256", line)
        elif method == "md5":
            report.add("hba.md5", WARN, f"{line}: md5 also accepts MD5-hashed passwords",
                       f"change line {rule['line_number']} to scram-sha-256", line)
        if not (_admits(rule["database"], db_names) and _admits(rule["user_name"], user_names)):
            continue
        admitted = True
        if whole_world or address in ("samenet",):
            report.add("hba.open", FAIL,
                       f"{line}: admits role {role} to database {database} from any address ({address}"
                       f"{'/' + netmask if netmask else ''}), not only from tenantgate",
                       f"restrict line {rule['line_number']} to tenantgate's address(es) (deploy/postgres/pg_hba.conf.template)",
                       line)
        elif netmask not in (None, "255.255.255.255", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff") or address == "samehost":
            report.add("hba.network", WARN,
                       f"{line}: admits role {role} from the network {address}/{netmask}, not a single address",
                       "list each tenantgate instance's address (or rely on a NetworkPolicy in Kubernetes)", line)
        if kind in ("host", "hostnossl"):
            report.add("hba.nossl", WARN, f"{line}: admits role {role} without TLS ({kind})",
                       f"use hostssl on line {rule['line_number']}", line)
        if "all" in (rule["database"] or []):
            report.add("hba.all_databases", WARN, f"{line}: admits role {role} to every database, not only {database}",
                       f"name the application database on line {rule['line_number']}", line)
    if not admitted:
        report.add("hba.no_entry", WARN, f"no pg_hba.conf host line admits role {role} to database {database}",
                   "add a hostssl line for tenantgate's address with scram-sha-256")
    if not any(f.status == FAIL for f in report.findings[before:]):
        report.add("hba", PASS, f"pg_hba.conf admits role {role} only from listed addresses, with scram-sha-256")
