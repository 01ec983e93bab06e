"""tenantgate's own BackendKeyData, and CancelRequests sent to tenantgate.

Clients never see PostgreSQL's process id and secret.  Each session gets a
random (pid, secret) pair here; a CancelRequest carrying exactly that pair
cancels that session's running backend query (via a real CancelRequest to
PostgreSQL) and nothing else.

With several worker processes (``workers`` in the config) a CancelRequest
may reach a different worker than the one holding the session.  The pid
therefore encodes the owning worker (``pid % worker_count == worker_index``);
a worker that receives a request for another worker's pid hands the raw
(pid, secret) to ``forward(owner_index, pid, secret)`` (see
:mod:`proxy.workers`), and the owner checks the secret as usual.
"""

from __future__ import annotations

import hmac
import secrets
import struct
from typing import Callable, Protocol

from proxy.metrics import CANCEL_REQUESTS_TOTAL

_PID_FLOOR = 1000
_PID_SPAN = 2**31 - 1 - _PID_FLOOR


class Cancellable(Protocol):
    key: tuple[int, int] | None  # what register() returned (the registry keeps no copy of it)

    def cancel_backend_query(self) -> None: ...


class CancelRegistry:
    """Cancel keys of one process.  ``worker_index``/``worker_count`` describe
    this process among the workers; ``forward`` routes keys owned by another worker."""

    def __init__(self, worker_index: int = 0, worker_count: int = 1,
                 forward: Callable[[int, int, int], None] | None = None) -> None:
        if not 0 <= worker_index < worker_count:
            raise ValueError("worker_index must be in [0, worker_count)")
        self.worker_index = worker_index
        self.worker_count = worker_count
        self.forward = forward
        self._by_pid: dict[int, Cancellable] = {}

    def owner_of(self, pid: int) -> int:
        """The worker index that handed out ``pid``."""
        return pid % self.worker_count

    def register(self, session: Cancellable) -> tuple[int, int]:
        """A fresh (pid, secret) for ``session``, which keeps it as ``session.key``; the pid
        names this worker."""
        n, i = self.worker_count, self.worker_index
        while True:
            pid = secrets.randbelow(_PID_SPAN) + _PID_FLOOR
            pid -= (pid - i) % n  # now pid % n == i
            if pid >= _PID_FLOOR and pid not in self._by_pid:
                break
        secret = struct.unpack("!i", secrets.token_bytes(4))[0]
        self._by_pid[pid] = session
        session.key = (pid, secret)
        return session.key

    def unregister(self, pid: int) -> None:
        self._by_pid.pop(pid, None)

    def cancel(self, pid: int, secret: int) -> bool:
        """Handle a CancelRequest that reached this process.  True when it was
        acted on here or handed to the owning worker."""
        owner = self.owner_of(pid)
        if owner != self.worker_index and self.forward is not None:
            CANCEL_REQUESTS_TOTAL.labels(result="routed").inc()
            self.forward(owner, pid, secret)
            return True
        return self.cancel_local(pid, secret)

    def cancel_local(self, pid: int, secret: int) -> bool:
        """Cancel a session of this process when (pid, secret) matches exactly."""
        session = self._by_pid.get(pid)
        key = session.key if session is not None else None
        ok = key is not None and hmac.compare_digest(struct.pack("!i", key[1]), struct.pack("!i", secret))
        if not ok:
            CANCEL_REQUESTS_TOTAL.labels(result="unknown_key").inc()
            return False
        CANCEL_REQUESTS_TOTAL.labels(result="forwarded").inc()
        session.cancel_backend_query()
        return True

    def __len__(self) -> int:
        return len(self._by_pid)
