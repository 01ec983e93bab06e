"""The codec's single exception type."""

from __future__ import annotations

PROTOCOL_VIOLATION = "08P01"
FEATURE_NOT_SUPPORTED = "0A000"


class ProtocolError(Exception):
    """The peer broke the PostgreSQL v3 protocol.

    ``sqlstate`` is what the client is told (08P01 unless a more specific code
    fits, e.g. 0A000 for an unsupported protocol version); ``reason`` is a short
    label for the ``tenantgate_protocol_errors_total`` metric.
    """

    def __init__(self, message: str, sqlstate: str = PROTOCOL_VIOLATION, reason: str = "malformed"):
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.reason = reason
