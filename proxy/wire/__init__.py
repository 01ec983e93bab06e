"""Sans-IO PostgreSQL v3 wire codec: framing, messages, startup packets and state.

No module in this package touches a socket.  The only exception they raise
on bad input is :class:`~proxy.wire.errors.ProtocolError`.
"""

from proxy.wire.backend import BackendScanner
from proxy.wire.buffer import ReceiveBuffer
from proxy.wire.errors import ProtocolError
from proxy.wire.frontend import FrontendState, Phase

__all__ = ["BackendScanner", "ReceiveBuffer", "ProtocolError", "FrontendState", "Phase"]
