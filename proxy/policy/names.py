"""Names tenantgate writes into SQL, defined once for the rewriter, the CLI's data paths, the
bootstrap and the doctor: :func:`quote_ident` and :data:`TENANT_GUC`."""

from __future__ import annotations

from proxy.seam import SqlStateError

#: the setting only the proxy sets: the session's tenant, read by the RLS backstop and by
#: statements that outlive one execution in token sessions (proxy.policy.tenantvalue)
TENANT_GUC = "tenantgate.tenant_id"

INVALID_PARAMETER_VALUE = "22023"


def quote_ident(name: str) -> str:
    """Quote an identifier as PostgreSQL's quote_ident would when in doubt (always quotes).

    A NUL cannot be sent to PostgreSQL (it would end the statement text): refused with 22023."""
    if "\x00" in name:
        raise SqlStateError(INVALID_PARAMETER_VALUE, "identifier contains a NUL character")
    return '"' + name.replace('"', '""') + '"'
