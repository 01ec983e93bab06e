"""tenantgate's own BackendKeyData, and CancelRequests sent to tenantgate.

Clients never see PostgreSQL's process id and secret.  Each session gets a
random (pid, secret) pair here; a CancelRequest carrying exactly that pair
cancels that session's running backend query (via a real CancelRequest to
PostgreSQL) and nothing else.
"""

from __future__ import annotations

import hmac
import secrets
import struct
from typing import Protocol

from proxy.metrics import CANCEL_REQUESTS_TOTAL


class Cancellable(Protocol):
    def cancel_backend_query(self) -> None: ...


class CancelRegistry:
    def __init__(self) -> None:
        self._by_pid: dict[int, tuple[int, Cancellable]] = {}

    def register(self, session: Cancellable) -> tuple[int, int]:
        """A fresh (pid, secret) for ``session``."""
        while True:
            pid = secrets.randbelow(2**31 - 1000) + 1000
            if pid not in self._by_pid:
                break
        secret = struct.unpack("!i", secrets.token_bytes(4))[0]
        self._by_pid[pid] = (secret, session)
        return pid, secret

    def unregister(self, pid: int) -> None:
        self._by_pid.pop(pid, None)

    def cancel(self, pid: int, secret: int) -> bool:
        entry = self._by_pid.get(pid)
        ok = entry is not None and hmac.compare_digest(struct.pack("!i", entry[0]), struct.pack("!i", secret))
        if not ok:
            CANCEL_REQUESTS_TOTAL.labels(result="unknown_key").inc()
            return False
        CANCEL_REQUESTS_TOTAL.labels(result="forwarded").inc()
        entry[1].cancel_backend_query()
        return True

    def __len__(self) -> int:
        return len(self._by_pid)
