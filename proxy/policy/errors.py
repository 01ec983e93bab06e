"""The one exception policy passes raise to refuse a statement."""

from __future__ import annotations

from proxy.seam import Refuse, SqlStateError

INSUFFICIENT_PRIVILEGE = "42501"
FEATURE_NOT_SUPPORTED = "0A000"
SYNTAX_ERROR = "42601"
UNDEFINED_TABLE = "42P01"
READ_ONLY_TRANSACTION = "25006"
INVALID_AUTHORIZATION = "28000"


class PolicyRefusal(SqlStateError):
    """A statement is refused; the proxy answers with an ErrorResponse and the session stays usable.

    ``reason`` classifies the refusal for metrics and logs (see :mod:`proxy.policy.refusal_reason`);
    left empty, it is derived from the SQLSTATE and message.
    """

    def __init__(self, sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None,
                 reason: str = ""):
        super().__init__(sqlstate, message, detail=detail, hint=hint)
        self.reason = reason

    def to_refuse(self) -> Refuse:
        return Refuse(self.sqlstate, self.message, self.detail, self.hint, self.reason)

#: the refusal of the type void in a cast or a PREPARE type list: PostgreSQL drops void parameters
#: from a function call's arguments, so the call it runs would differ from the one checked
#: (a void-declared Parse parameter is handled: proxy/policy/void_params.py)
VOID_TYPE_REFUSAL = ("the type void is not supported by tenantgate in casts and PREPARE type lists "
                     "(PostgreSQL drops void parameters from function calls)")
