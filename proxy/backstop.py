"""The PostgreSQL backstop: binding a backend connection to a tenant in a way SQL cannot forge.

The RLS policies made by ``deploy/postgres/bootstrap.sql`` do not trust any setting: they call
``tenantgate_guard.current_tenant()`` / ``current_writer()``, SECURITY DEFINER functions of the
NOLOGIN role ``tenantgate_guard``, which return the tenant recorded for *this backend* by
``tenantgate_guard.bind(tenant, mode, nonce, mac)``.  ``bind`` accepts a binding only with

    mac = hex(HMAC-SHA256(key, f"{len(tenant)}:{tenant}|{mode}|{pid}|{backend_start_us}|{nonce}"))

for the backend it runs on (pid and start time: a binding captured on another backend, or on an
earlier backend with the same pid, is refused) and a nonce greater than the last one accepted on
this backend (an earlier binding of the same backend is refused).  The key is shared by the
proxy (config ``backstop.key`` / ``key_env`` / ``key_file``) and the guard's table, which only the
guard can read.  Modes: ``write`` (the tenant's rows, read and write), ``read`` (read only: operator
read grants, offboarded tenants), ``none`` (no tenant: no rows).

This module builds the SQL and computes MACs; it does no I/O.  :class:`BackendBinder` is the
per-backend-connection state (identity and nonce counter) the proxy keeps beside the connection.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Iterable

#: pseudo-setting name under which a transaction-pooled session carries its binding
#: (``"<mode>:<tenant>"``), see :mod:`proxy.varcache`
BINDING_SETTING = "tenantgate.backstop"
MODES = ("read", "write", "none")

#: one round trip when a backend connection is first used: its pid and start time (µs)
IDENTITY_SQL = "SELECT pg_catalog.pg_backend_pid(), tenantgate_guard.backend_start()"
#: what the connection is bound to now: ``"<mode>:<tenant>"`` or NULL
CURRENT_BINDING_SQL = "tenantgate_guard.current_binding()"


class BackstopError(Exception):
    """The backstop key is missing or malformed."""


def parse_key(text: str) -> bytes:
    """The key as bytes from its hex form (32 to 64 bytes, as the bootstrap requires)."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise BackstopError("backstop key must be hexadecimal") from None
    if not 32 <= len(key) <= 64:
        raise BackstopError("backstop key must be 32 to 64 bytes (64 to 128 hex digits)")
    return key


def key_id(key: bytes) -> str:
    """What ``tenantgate_guard.key_id()`` answers when this key is installed."""
    return hashlib.sha256(key).hexdigest()[:16]


def binding_value(tenant: str | None, mode: str) -> str:
    """The ``"<mode>:<tenant>"`` form of a binding (what ``current_binding()`` returns)."""
    if mode not in MODES:
        raise ValueError(f"backstop mode must be one of {MODES}, not {mode!r}")
    if mode == "none":
        tenant = None
    return f"{mode}:{tenant or ''}"


def split_value(value: str) -> tuple[str | None, str]:
    mode, _, tenant = value.partition(":")
    return (tenant or None), mode


def mac(key: bytes, tenant: str | None, mode: str, pid: int, backend_start: int, nonce: int,
        local: bool = False) -> str:
    t = tenant or ""
    msg = f"{len(t)}:{t}|{mode}|{pid}|{backend_start}|{nonce}{'|local' if local else ''}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def _lit(value: str) -> str:
    return "E'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def bind_call(key: bytes, tenant: str | None, mode: str, pid: int, backend_start: int, nonce: int,
              local: bool = False) -> str:
    """The SQL expression binding backend ``(pid, backend_start)`` to ``tenant`` in ``mode``
    (``local``: for the current transaction only, like SET LOCAL)."""
    if mode == "none":
        tenant = None
    elif not tenant:
        raise ValueError("a read or write binding needs a tenant")
    m = mac(key, tenant, mode, pid, backend_start, nonce, local)
    t = "NULL" if tenant is None else _lit(tenant)
    return f"tenantgate_guard.bind({t}, {_lit(mode)}, {int(nonce)}, {_lit(m)}{', true' if local else ''})"


class BackendBinder:
    """Binding state of one backend connection: its identity and the last nonce used.

    ``sql(tenant, mode)`` gives a ``SELECT tenantgate_guard.bind(...)`` statement with a fresh
    nonce.  The identity comes from :data:`IDENTITY_SQL` run once on the connection.
    """

    __slots__ = ("key", "pid", "backend_start", "nonce")

    def __init__(self, key: bytes, pid: int, backend_start: int):
        self.key = key
        self.pid = int(pid)
        self.backend_start = int(backend_start)
        self.nonce = 0

    @classmethod
    def from_identity_row(cls, key: bytes, row: Iterable) -> "BackendBinder":
        pid, start = [v.decode() if isinstance(v, (bytes, bytearray)) else v for v in row]
        if pid is None or start is None:
            raise BackstopError("the database server did not tell this connection's identity "
                                "(is deploy/postgres/bootstrap.sql applied?)")
        return cls(key, int(pid), int(start))

    def call(self, tenant: str | None, mode: str, local: bool = False) -> str:
        self.nonce += 1
        return bind_call(self.key, tenant, mode, self.pid, self.backend_start, self.nonce, local)

    def sql(self, tenant: str | None, mode: str) -> str:
        return f"SELECT {self.call(tenant, mode)}"

    def call_value(self, value: str) -> str:
        """:meth:`call` for a ``"<mode>:<tenant>"`` value (the varcache form)."""
        tenant, mode = split_value(value)
        return self.call(tenant, mode)


_KEYS: dict[int, tuple[object, bytes | None]] = {}


def key_for(config) -> bytes | None:
    """The backstop key of a loaded :class:`proxy.config.Config` (resolved once per config object)."""
    hit = _KEYS.get(id(config))
    if hit is not None and hit[0] is config:
        return hit[1]
    key = config.backstop.resolved_key()
    if len(_KEYS) > 16:
        _KEYS.clear()
    _KEYS[id(config)] = (config, key)
    return key
