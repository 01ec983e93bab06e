"""Why a statement was refused, as one word for metrics and logs.

``tenantgate_statements_refused_total{reason=...}`` and the refusal log lines
use :func:`refusal_reason`.  A refusal may carry its reason explicitly
(``Refuse.reason``, ``PolicyRefusal(..., reason=...)``: set by the pass that
refused it); otherwise the reason is derived from the SQLSTATE and message.
The result is always one of :data:`REASONS`, so the label's cardinality is
bounded whatever a pass writes.

=============  ===========================================================
reason         meaning
=============  ===========================================================
parse          the statement does not lex or parse (42601)
unsupported    a statement kind or form tenantgate does not support (0A000, DDL, SET ROLE, ...)
storage        a path to the server's storage: server files, COPY ... PROGRAM, large objects
catalog        a system catalog or view that is not allowlisted, or the control schema
function       a function (or procedure, operator, FunctionCall message) not on the allowlist
tenant         tenant scoping: unknown relation, another tenant's value, no tenant selected
grant          an operator's grant ended or does not allow this
read_only      a write in a read-only session (offboarded tenant, read grant; 25006)
auth           tenant tokens and tenant identifiers (28000)
audit          the audit record could not be written first (operator sessions)
internal       tenantgate failed while checking (fail closed; XX000)
other          anything else
=============  ===========================================================
"""

from __future__ import annotations

from proxy.seam import Refuse

REASONS: tuple[str, ...] = (
    "parse", "unsupported", "storage", "catalog", "function", "tenant", "grant", "read_only", "auth", "audit",
    "internal", "other",
)
_KNOWN = frozenset(REASONS)

_BY_SQLSTATE = {
    "42601": "parse",
    "0A000": "unsupported",
    "25006": "read_only",
    "28000": "auth",
    "28P01": "auth",
    "42P01": "tenant",
    "58000": "audit",
    "XX000": "internal",
}

# For 42501 (insufficient_privilege) and unknown SQLSTATEs: (words in the message, reason), in order.
_BY_MESSAGE: tuple[tuple[tuple[str, ...], str], ...] = (
    (("grant",), "grant"),
    (("audit",), "audit"),
    (("server file", "program", "large object", "lo_import", "lo_export", "copy to or from a file"), "storage"),
    (("catalog", "control schema"), "catalog"),
    (("functioncall", "function", "procedure", "operator("), "function"),
    (("tenant", "bound parameter", "relation"), "tenant"),
    (("read-only", "read only"), "read_only"),
)


def derive_reason(sqlstate: str, message: str) -> str:
    """The reason of a refusal that does not name one."""
    by_state = _BY_SQLSTATE.get(sqlstate)
    if by_state is not None:
        return by_state
    lowered = message.lower()
    for words, reason in _BY_MESSAGE:
        if any(w in lowered for w in words):
            return reason
    return "other"


def refusal_reason(refusal: Refuse) -> str:
    """One of :data:`REASONS` for ``refusal`` (its explicit reason when it has a known one)."""
    reason = getattr(refusal, "reason", "")
    if reason:
        return reason if reason in _KNOWN else "other"
    return derive_reason(refusal.sqlstate, refusal.message or "")
