"""Helpers for the admin console's end-to-end tests: wait until the console shows something,
and run a blocking call (a PAUSE, a held statement) in a thread."""

from __future__ import annotations

import threading
import time


def until(predicate, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Background(threading.Thread):
    """Run fn() in a thread; .result / .error once joined."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001
            self.error = e

    def value(self, timeout: float = 30):
        self.join(timeout)
        assert not self.is_alive(), "still running"
        if self.error is not None:
            raise self.error
        return self.result
