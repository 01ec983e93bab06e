"""Apply tenantgate's hardened PostgreSQL bootstrap and pg_hba template.

The SQL lives in ``deploy/postgres/bootstrap.sql`` and the host-based
authentication template in ``deploy/postgres/pg_hba.conf.template``; platform
engineers apply them by hand with psql, and the demo and the tests apply them
through this module, so both paths run the very same files.

* :func:`apply_bootstrap` runs the bootstrap with ``psql`` against a database
  (as a superuser), passing the passwords as SCRAM verifiers on psql's stdin
  (never on a command line, where ``ps`` would show them).
* :func:`render_hba` fills in the template; :func:`install_hba` writes it into
  a :class:`~proxy.pgcluster.PgCluster` and reloads the server.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import scramp

# The deploy/ directory of the source tree; TENANTGATE_DEPLOY_DIR overrides it (the
# container image sets it, since a non-editable install has no deploy/ beside proxy/).
DEPLOY_DIR = Path(os.environ.get("TENANTGATE_DEPLOY_DIR") or Path(__file__).resolve().parent.parent / "deploy")
BOOTSTRAP_SQL = DEPLOY_DIR / "postgres" / "bootstrap.sql"
HBA_TEMPLATE = DEPLOY_DIR / "postgres" / "pg_hba.conf.template"

APP_ROLE = "tenantgate_app"
CONTROL_ROLE = "tenantgate_control"
CONTROL_SCHEMA = "tenantgate_control"
GUARD_ROLE = "tenantgate_guard"
GUARD_SCHEMA = "tenantgate_guard"
SCRAM_ITERATIONS = 4096


class BootstrapError(Exception):
    """The bootstrap could not be applied; the message carries psql's error."""


def scram_verifier(password: str, iterations: int = SCRAM_ITERATIONS) -> str:
    """A PostgreSQL SCRAM-SHA-256 verifier for ``password`` (what pg_authid stores).

    An already-made verifier is returned unchanged.
    """
    if password.startswith("SCRAM-SHA-256$"):
        return password
    salt, stored_key, server_key, iterations = scramp.ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=iterations
    )
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _psql_quote(value: str) -> str:
    """Quote a value for a psql meta-command argument (``\\set name 'value'``)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _split_password(dsn: str) -> tuple[str, str | None]:
    """Take the password out of a URL DSN so it travels in PGPASSWORD, not argv."""
    if not dsn.startswith(("postgres://", "postgresql://")):
        return dsn, None
    parts = urlsplit(dsn)
    password = unquote(parts.password) if parts.password is not None else None
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "password"]
    for k, v in parse_qsl(parts.query):
        if k == "password":
            password = v
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostinfo = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}@{hostinfo}"
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment)), password


def _psql() -> str:
    found = shutil.which("psql")
    if found:
        return found
    candidate = Path(os.environ.get("TENANTGATE_PG_BIN", "/usr/lib/postgresql/15/bin")) / "psql"
    if candidate.exists():
        return str(candidate)
    raise BootstrapError("psql not found: install the PostgreSQL client (postgresql-client-15)")


def apply_bootstrap(
    admin_dsn: str,
    app_password: str,
    control_password: str,
    tenant_column: str = "tenant_id",
    schemas: Sequence[str] = ("public",),
    backstop_key: str | None = None,
) -> str:
    """Apply ``deploy/postgres/bootstrap.sql`` to the database of ``admin_dsn``.

    ``admin_dsn`` must reach the application database as a superuser.  Creates
    or updates the roles ``tenantgate_app`` (password ``app_password``) and
    ``tenantgate_control`` (``control_password``), the control schema, the
    privileges, and RLS enabled and forced with the backstop policies on every
    table of ``schemas`` that has ``tenant_column``.  Idempotent: run it again
    after every migration.  Runs in one transaction; raises
    :class:`BootstrapError` (nothing changed) on failure.  Returns psql's
    notices (one line per tenant table put under RLS).

    ``backstop_key`` (hex, 32 to 64 bytes; the proxy's ``backstop.key``) is
    installed as the key of the PostgreSQL backstop (proxy/backstop.py); without
    it an installed key is kept, and with none installed no tenant can be bound.
    """
    if not app_password or not control_password:
        raise BootstrapError("apply_bootstrap: app_password and control_password are required")
    if isinstance(schemas, str):
        schemas = (schemas,)
    if not schemas or any(not s or "," in s for s in schemas):
        raise BootstrapError(f"apply_bootstrap: bad schema list {list(schemas)!r}")
    dsn, password = _split_password(admin_dsn)
    script = "\n".join([
        f"\\set app_password {_psql_quote(scram_verifier(app_password))}",
        f"\\set control_password {_psql_quote(scram_verifier(control_password))}",
        f"\\set tenant_column {_psql_quote(tenant_column)}",
        f"\\set app_schemas {_psql_quote(','.join(schemas))}",
        f"\\set backstop_key {_psql_quote(backstop_key or '')}",
        f"\\i {_psql_quote(str(BOOTSTRAP_SQL))}",
        "",
    ])
    env = dict(os.environ)
    if password is not None:
        env["PGPASSWORD"] = password
    env.setdefault("PGCONNECT_TIMEOUT", "10")
    proc = subprocess.run(
        [_psql(), "-X", "-q", "-1", "-v", "ON_ERROR_STOP=1", "-d", dsn, "-f", "-"],
        input=script, capture_output=True, text=True, env=env,
    )
    if proc.returncode != 0:
        raise BootstrapError(f"bootstrap failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stderr


def _as_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value)


def _cidr(addr: str) -> str:
    if "/" in addr or addr in ("all", "samehost", "samenet"):
        return addr
    return f"{addr}/128" if ":" in addr else f"{addr}/32"


def render_hba(
    tenantgate_addr: str | Iterable[str],
    database: str | Iterable[str] = "all",
    *,
    app_roles: Iterable[str] = (APP_ROLE, CONTROL_ROLE),
    admin_addr: str | Iterable[str] | None = None,
    local_auth: str = "peer",
    require_ssl: bool = True,
) -> str:
    """Fill in ``pg_hba.conf.template``.

    ``tenantgate_addr``: one address or several (a bare IP becomes /32 or /128).
    ``database``: the application database(s); ``"all"`` is accepted but
    ``doctor`` warns about it.  ``admin_addr``: addresses from which ``postgres``
    may log in with SCRAM (none by default).  ``local_auth``: method of the
    unix-socket line for ``postgres`` (``peer`` or ``trust``).
    """
    if local_auth not in ("peer", "trust", "scram-sha-256", "reject"):
        raise ValueError(f"local_auth must be peer, trust, scram-sha-256 or reject, not {local_auth!r}")
    values: dict[str, list[str]] = {
        "@HOST_TYPE@": ["hostssl" if require_ssl else "host"],
        "@APP_DATABASE@": [",".join(_as_list(database))],
        "@APP_ROLES@": [",".join(app_roles)],
        "@TENANTGATE_ADDR@": [_cidr(a) for a in _as_list(tenantgate_addr)],
        "@ADMIN_ADDR@": [_cidr(a) for a in _as_list(admin_addr)],
        "@LOCAL_AUTH@": [local_auth],
    }
    if not values["@TENANTGATE_ADDR@"]:
        raise ValueError("render_hba: at least one tenantgate address is needed")
    out: list[str] = []
    for line in HBA_TEMPLATE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            out.append(line)
            continue
        rendered = [line]
        for placeholder, options in values.items():
            if placeholder in line:
                rendered = [r.replace(placeholder, opt) for r in rendered for opt in options]
        out.extend(rendered)
    return "\n".join(out) + "\n"


def install_hba(cluster, tenantgate_addr: str | Iterable[str], **render_options) -> Path:
    """Write the rendered template as ``cluster``'s pg_hba.conf and reload it.

    ``cluster`` is a :class:`proxy.pgcluster.PgCluster`; ``render_options`` go
    to :func:`render_hba`.  Note: once installed, the cluster's TCP
    ``admin_dsn`` is refused unless its address is passed as ``admin_addr``;
    ``cluster.psql()`` (unix socket, OS user postgres) keeps working with
    ``local_auth`` peer or trust.
    """
    path = Path(cluster.datadir) / "pg_hba.conf"
    path.write_text(render_hba(tenantgate_addr, **render_options))
    os.chmod(path, 0o600)
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)
    cluster.reload()
    errors = cluster.psql("SELECT line_number || ': ' || error FROM pg_hba_file_rules WHERE error IS NOT NULL")
    if errors.strip():
        raise BootstrapError(f"pg_hba.conf has errors: {errors.strip()}")
    return path
