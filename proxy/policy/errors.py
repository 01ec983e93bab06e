"""The one exception policy passes raise to refuse a statement."""

from __future__ import annotations

from proxy.seam import Refuse

INSUFFICIENT_PRIVILEGE = "42501"
FEATURE_NOT_SUPPORTED = "0A000"
SYNTAX_ERROR = "42601"
UNDEFINED_TABLE = "42P01"
READ_ONLY_TRANSACTION = "25006"
INVALID_AUTHORIZATION = "28000"


class PolicyRefusal(Exception):
    def __init__(self, sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.detail = detail
        self.hint = hint

    def to_refuse(self) -> Refuse:
        return Refuse(self.sqlstate, self.message, self.detail, self.hint)
