"""What a tenant session sees of the system catalogs that list the whole server.

Most catalogs describe the schema and are read as they are (rules/catalogs.yaml).  A few list
things outside the tenant's application: tenantgate's own schemas, the server's other databases
and roles, and the server's configuration.  Those are read through a row filter: the rewriter
replaces the relation with ``(SELECT * FROM pg_catalog.<it> WHERE <filter>)`` under the same
name or alias (proxy/policy/inject.py ``wrap_catalog``), so psql's ``\\dn``, ``\\l`` and ``\\du``,
drivers' metadata calls and ORMs' reflection keep working and simply do not show these rows.

| catalog | a tenant sees | why |
|---|---|---|
| ``pg_namespace`` | every schema except ``tenantgate_*`` (control, copy views, the backstop's guard) | tenantgate's machinery is not the application's |
| ``pg_database`` | the database it is connected to | other databases' names are other applications' (or other customers') |
| ``pg_roles``, ``pg_user`` | its backend role and PostgreSQL's built-in ``pg_*`` roles, with ``rolconfig`` / ``useconfig`` NULL | role names reveal who else uses the server; per-role settings may hold secrets that SHOW and current_setting() hide |
| ``pg_settings`` | preset (``internal``) and client-settable (``user``) parameters, without file and directory names, commands, libraries, connection strings, search paths or custom (dotted) settings | drivers read limits such as ``max_index_keys`` (pgjdbc); paths and commands are the server's business. PostgreSQL itself hides the superuser-only ones (``data_directory``, ``config_file``, ...) from the backend role |

Writes to these catalogs stay refused (they are not tenant or shared tables).  Functions that
name objects (``pg_get_userbyid``, ``has_database_privilege``, casts to ``regrole``) still
answer for any oid: they reveal a name only to a client that already has its oid.
"""

from __future__ import annotations

import re

#: (schema, relation) -> the SQL condition a row must meet to be visible in a tenant session
CATALOG_ROW_FILTERS: dict[tuple[str, str], str] = {
    ("pg_catalog", "pg_namespace"): "nspname !~ '^tenantgate_'",
    ("pg_catalog", "pg_database"): "datname = pg_catalog.current_database()",
    ("pg_catalog", "pg_roles"): "(rolname = CURRENT_USER OR rolname ~ '^pg_')",
    ("pg_catalog", "pg_user"): "(usename = CURRENT_USER OR usename ~ '^pg_')",
    ("pg_catalog", "pg_settings"): (
        "context IN ('internal', 'user') AND name !~ '(file|director|command|librar|conninfo|path|[.])'"
    ),
}

#: (schema, relation) -> the select list a tenant session reads it through (default ``*``): the
#: same columns in the same order, with per-role settings (``ALTER ROLE ... SET app.secret``,
#: which SHOW and current_setting() hide) as NULL
CATALOG_COLUMNS: dict[tuple[str, str], str] = {
    ("pg_catalog", "pg_roles"): (
        "rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin, rolreplication, rolconnlimit, "
        "rolpassword, rolvaliduntil, rolbypassrls, NULL::pg_catalog.text[] AS rolconfig, oid"
    ),
    ("pg_catalog", "pg_user"): (
        "usename, usesysid, usecreatedb, usesuper, userepl, usebypassrls, passwd, valuntil, "
        "NULL::pg_catalog.text[] AS useconfig"
    ),
}

#: settings a tenant may not read with SHOW or current_setting() either: file and directory names
#: (ssl_crl_dir, data_directory), commands (archive_command may carry credentials), libraries,
#: connection strings, and custom (dotted) settings, which deployments use for secrets
#: (``ALTER DATABASE ... SET app.jwt_secret``), as the pg_settings row filter above hides them
_HIDDEN_SETTING = re.compile(r"(file|dir|command|librar|conninfo|[.])")
#: the one custom setting a tenant session may read: its own tenant
_READABLE_CUSTOM = frozenset({"tenantgate.tenant_id"})


def setting_hidden(name: str) -> bool:
    """A server setting whose value a tenant session may not read (SHOW, current_setting())."""
    folded = name.lower()
    return _HIDDEN_SETTING.search(folded) is not None and folded not in _READABLE_CUSTOM


class SettingNameCheck:
    """The :class:`proxy.seam.ParamCheck` of ``current_setting($n)``: the bound name must not be a
    hidden setting.  A NULL name reads nothing (current_setting is strict); a name that is not
    UTF-8 is refused, since the proxy cannot tell which setting PostgreSQL would read."""

    #: text, varchar, name and unknown: types whose text and binary forms are the name's bytes
    type_oids = frozenset({25, 1043, 19, 705})

    def __init__(self, index: int):
        self.index = index

    def accepts(self, format_code: int, value: bytes | None) -> bool:
        if value is None:
            return True
        if format_code not in (0, 1):
            return False
        try:
            name = value.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return not setting_hidden(name)

    def describe(self) -> str:
        return (f"parameter ${self.index + 1} names the setting current_setting() reads, and server paths "
                "and commands are hidden from tenant sessions")
