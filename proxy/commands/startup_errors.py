"""One line, with the fix, for each way `tenantgate serve` can fail to start (never a traceback).

``describe(exc, config)`` turns an exception raised while starting into ``tenantgate: <what>:
<fix>``; ``serve`` prints it to stderr and exits 1.  ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import errno
from typing import Any


def _pg_error_name(exc: BaseException) -> str:
    return type(exc).__name__


def describe(exc: BaseException, config: Any) -> str:
    b = config.backend
    backend = f"{b.host}:{b.port}"
    listen = f"{config.listen.host}:{config.listen.port}"
    name = _pg_error_name(exc)
    sqlstate = getattr(exc, "sqlstate", None)
    msg = str(exc).splitlines()[0] if str(exc) else name
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return (f"tenantgate: cannot listen on {listen}: address already in use; stop the other process "
                "or change listen.port")
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EADDRNOTAVAIL) and "bind" in msg.lower():
        return f"tenantgate: cannot listen on {listen}: {msg}; change listen.host / listen.port"
    if isinstance(exc, FileNotFoundError):
        return f"tenantgate: file not found: {exc.filename or msg}; fix the path in the config"
    if isinstance(exc, (ConnectionRefusedError, TimeoutError)) or name in ("CannotConnectNowError",
                                                                            "ConnectionDoesNotExistError"):
        return (f"tenantgate: cannot reach PostgreSQL at {backend} ({msg}); start it, or fix backend.host / "
                "backend.port (and control.dsn)")
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"tenantgate: cannot reach PostgreSQL at {backend} ({msg}); start it, or fix backend.host / backend.port"
    if name == "InvalidPasswordError" or sqlstate == "28P01":
        return f"tenantgate: PostgreSQL refused the password ({msg}); check backend.password and control.dsn"
    if name == "InvalidAuthorizationSpecificationError" or sqlstate == "28000":
        return f"tenantgate: PostgreSQL refused the connection ({msg}); check pg_hba.conf and the role names"
    if name == "InvalidCatalogNameError" or sqlstate == "3D000":
        return f"tenantgate: {msg}; fix backend.database (the application database)"
    if "is not installed" in msg:  # the control plane says how to install it
        return f"tenantgate: {msg}"
    if sqlstate in ("42P01", "3F000") or "tenantgate_control" in msg:
        return (f"tenantgate: the control schema is not installed ({msg}); run deploy/postgres/bootstrap.sql "
                "as a superuser (deploy/README.md)")
    if sqlstate == "42501":
        return (f"tenantgate: permission denied at PostgreSQL ({msg}); rerun deploy/postgres/bootstrap.sql and "
                "check the backend and control roles")
    if name in ("RulesError", "AllowlistError", "ConfigError", "BackstopError"):
        return f"tenantgate: {msg}"
    return f"tenantgate: startup failed: {name}: {msg} (run with --verbose for details)"
