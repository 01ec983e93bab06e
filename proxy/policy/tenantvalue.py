"""The tenant value in its three forms: SQL literal, Bind parameter, COPY field.

* :func:`tenant_literal` quotes a tenant for SQL (``'acme'``; quotes doubled; the proxy
  refuses changing standard_conforming_strings, so backslashes are plain characters).
* :class:`TenantParamCheck` is the :class:`proxy.seam.ParamCheck` for a Bind value that goes
  into the tenant column (text and binary formats).
* :func:`field_matches` compares one decoded COPY field with the tenant.
"""

from __future__ import annotations

import struct
import uuid
from typing import Callable

from proxy.policy.errors import INVALID_AUTHORIZATION, PolicyRefusal
from proxy.policy.names import TENANT_GUC


def validate_tenant(tenant: str, type_: str) -> str:
    if not tenant or "\x00" in tenant or len(tenant) > 1000:
        raise PolicyRefusal(INVALID_AUTHORIZATION, "invalid tenant identifier", reason="tenant")
    if type_ == "uuid":
        try:
            return str(uuid.UUID(tenant))
        except ValueError:
            raise PolicyRefusal(INVALID_AUTHORIZATION, "tenant identifier is not a valid uuid", reason="tenant") from None
    if type_ in ("integer", "bigint"):
        if not tenant.lstrip("-").isdigit():
            raise PolicyRefusal(INVALID_AUTHORIZATION, "tenant identifier is not an integer", reason="tenant")
        return str(int(tenant))
    return tenant


def tenant_literal(tenant: str) -> str:
    return "'" + tenant.replace("'", "''") + "'"


_GUC_CASTS = {"text": "text", "varchar": "varchar", "uuid": "uuid", "integer": "int4", "bigint": "int8"}


def tenant_guc_reference(type_: str) -> str:
    """The session's tenant as the backend sees it: the GUC only the proxy sets, cast to the
    tenant column's type (for statements that outlive one execution in token sessions)."""
    return f"(pg_catalog.current_setting('{TENANT_GUC}')::pg_catalog.{_GUC_CASTS[type_]})"


def text_matches(value: bytes, tenant: str, type_: str) -> bool:
    try:
        s = value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if type_ == "uuid":
        try:
            return uuid.UUID(s.strip()) == uuid.UUID(tenant)
        except ValueError:
            return False
    if type_ in ("integer", "bigint"):
        s = s.strip()
        return s.lstrip("-").isdigit() and int(s) == int(tenant)
    return s == tenant


def binary_matches(value: bytes, tenant: str, type_: str) -> bool:
    if type_ == "uuid":
        return len(value) == 16 and value == uuid.UUID(tenant).bytes
    if type_ == "integer":
        return len(value) == 4 and struct.unpack("!i", value)[0] == int(tenant)
    if type_ == "bigint":
        return len(value) == 8 and struct.unpack("!q", value)[0] == int(tenant)
    return value == tenant.encode("utf-8")


# Parameter type OIDs a client may declare (in Parse) for a checked tenant parameter, besides 0
# (unspecified): other types would change the value after the check ("char" or name truncate,
# an int4 read as text becomes its decimal digits).
# 705 is "unknown" (psycopg declares str parameters so); integers keep their value across widths.
PARAM_TYPE_OIDS = {
    "text": frozenset({25, 1043, 705}),
    "varchar": frozenset({25, 1043, 705}),
    "uuid": frozenset({2950, 705}),
    "integer": frozenset({20, 21, 23, 705}),
    "bigint": frozenset({20, 21, 23, 705}),
}


class TenantParamCheck:
    """$n must carry exactly the session tenant (``tenant``: the tenant, or a callable giving the
    session's tenant at Bind time).  ``type_oids``: the parameter types a Parse may declare for it."""

    def __init__(self, index: int, tenant: "str | Callable[[], str | None]", type_: str, column: str):
        self.index = index
        self.tenant = tenant
        self.type_ = type_
        self.column = column
        self.type_oids = PARAM_TYPE_OIDS.get(type_, frozenset())

    def accepts(self, format_code: int, value: bytes | None) -> bool:
        tenant = self.tenant() if callable(self.tenant) else self.tenant
        if value is None or tenant is None:
            return False
        if format_code == 0:
            return text_matches(value, tenant, self.type_)
        if format_code == 1:
            return binary_matches(value, tenant, self.type_)
        return False

    def describe(self) -> str:
        return f"parameter ${self.index + 1} (tenant column {self.column}) must be the session's tenant"
