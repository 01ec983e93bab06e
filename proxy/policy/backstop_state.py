"""Does a tenant table carry the PostgreSQL backstop?  (Pure: no I/O.)

The backstop (deploy/postgres/bootstrap.sql, proxy/backstop.py) is in place on a table when:

* row-level security is enabled AND forced (the owner is subject to it too);
* the table is not owned by a role tenantgate's backend role is a member of (an owner can switch
  RLS off and drop policies);
* the restrictive policy ``tenantgate_tenant_isolation`` (all commands) compares the tenant
  column with ``tenantgate_guard.current_tenant()`` and checks new rows against
  ``tenantgate_guard.current_writer()``; the restrictive ``tenantgate_tenant_update`` /
  ``tenantgate_tenant_delete`` policies key UPDATE and DELETE on ``current_writer()``;
* no permissive policy other than ``tenantgate_tenant_access`` applies to the backend role
  (nothing beside tenantgate's policies widens or muddles access).

:func:`judge` returns ``None`` when all of this holds, else the first reason it does not.  The
catalog loader (proxy/catalog_sync.py) reads the inputs with :data:`POLICY_SQL`, and so does
``tenantgate doctor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

ACCESS = "tenantgate_tenant_access"
ISOLATION = "tenantgate_tenant_isolation"
UPDATE = "tenantgate_tenant_update"
DELETE = "tenantgate_tenant_delete"
TENANTGATE_POLICIES = (ACCESS, ISOLATION, UPDATE, DELETE)

#: one row per table oid: the RLS flags, ownership and the policies that apply to current_user
POLICY_SQL = """
SELECT c.oid, c.relrowsecurity AS rls, c.relforcerowsecurity AS forced,
       pg_has_role(current_user, c.relowner, 'MEMBER') AS owned,
       coalesce((SELECT json_agg(json_build_array(p.polname, p.polpermissive, p.polcmd::text,
                                                  coalesce(pg_get_expr(p.polqual, p.polrelid), ''),
                                                  coalesce(pg_get_expr(p.polwithcheck, p.polrelid), '')))
                   FROM pg_policy p
                  WHERE p.polrelid = c.oid
                    AND (0::oid = ANY (p.polroles) OR EXISTS (
                         SELECT 1 FROM unnest(p.polroles) r WHERE pg_has_role(current_user, r, 'MEMBER')))),
                '[]')::text AS policies
  FROM pg_class c WHERE c.oid = ANY ($1::oid[])
"""


@dataclass(frozen=True)
class Policy:
    name: str
    permissive: bool
    cmd: str  # '*', 'r', 'a', 'w', 'd'
    qual: str
    withcheck: str


def _keyed(expr: str, column: str, fn: str) -> bool:
    """``expr`` is ``(<column> = ( SELECT (tenantgate_guard.<fn>())::<type> ...))``."""
    e = " ".join(expr.split())
    for c in (column, '"' + column.replace('"', '""') + '"'):
        for call in (f"tenantgate_guard.{fn}()", f"(tenantgate_guard.{fn}())"):  # text: no cast shown
            if e.startswith(f"({c} = ( SELECT {call}"):
                return True
    return False


def judge(column: str, rls: bool, forced: bool, owned: bool, policies: Iterable[Policy]) -> str | None:
    """None if the table carries the backstop, else why not (one sentence)."""
    if not rls:
        return "row-level security is not enabled"
    if not forced:
        return "row-level security is not forced"
    if owned:
        return "the table is owned by (a role of) tenantgate's backend role, which can switch row-level security off"
    policies = list(policies)
    others = sorted(p.name for p in policies if p.permissive and p.name != ACCESS)
    if others:
        return f"permissive policy {', '.join(others)} stands beside tenantgate's"
    by_name = {p.name: p for p in policies}
    iso = by_name.get(ISOLATION)
    if iso is None or iso.permissive or iso.cmd != "*" or not _keyed(iso.qual, column, "current_tenant") \
            or not _keyed(iso.withcheck, column, "current_writer"):
        return f"policy {ISOLATION} is missing or not the backstop's (restrictive, keyed on tenantgate_guard)"
    for name, cmd in ((UPDATE, "w"), (DELETE, "d")):
        p = by_name.get(name)
        if p is None or p.permissive or p.cmd != cmd or not _keyed(p.qual, column, "current_writer"):
            return f"policy {name} is missing or not the backstop's"
    if ACCESS not in by_name or not by_name[ACCESS].permissive:
        return f"policy {ACCESS} is missing"
    return None


def policies_from_json(rows: list) -> list[Policy]:
    return [Policy(n, bool(perm), cmd, qual or "", wc or "") for n, perm, cmd, qual, wc in rows]
