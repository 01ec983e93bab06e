"""Make unhandled exceptions in the proxy visible: a test fails when one happens during it.

Three sources are watched (checked by the autouse fixture ``no_unhandled_exceptions`` in
conftest.py after every test):

* the event loop of every in-process proxy (proxy_harness.RunningProxy installs
  :func:`loop_exception_handler`): "Task exception was never retrieved", "Exception in
  callback", ... are recorded;
* log records of the ``proxy`` loggers (and asyncio's) that carry a traceback (``exc_info``),
  caught by :class:`TracebackRecorder` on the root logger;
* the log files of proxies run as processes (``tenantgate demo``, ``tenantgate serve``),
  registered with :func:`register_log`: new lines with a Python traceback or an asyncio
  "exception was never retrieved" fail the test that was running.

A test that provokes an internal error on purpose marks itself
``@pytest.mark.allow_tracebacks("why")``.
"""

from __future__ import annotations

import logging
import threading
import traceback
from pathlib import Path

_lock = threading.Lock()
_events: list[str] = []
_logs: dict[Path, int] = {}

PATTERNS = ("Traceback (most recent call last)", "exception was never retrieved", "Exception in callback",
            "Unhandled exception", "Task was destroyed but it is pending")


def record(text: str) -> None:
    with _lock:
        _events.append(text)


def loop_exception_handler(loop, context: dict) -> None:
    """asyncio exception handler: record, then let the default handler log it."""
    exc = context.get("exception")
    detail = "".join(traceback.format_exception(exc)) if exc is not None else ""
    record(f"event loop: {context.get('message', '')}\n{detail}")
    loop.default_exception_handler(context)


class TracebackRecorder(logging.Handler):
    """Records log records with a traceback from the proxy's (and asyncio's) loggers."""

    def __init__(self):
        super().__init__(level=logging.ERROR)

    def emit(self, rec: logging.LogRecord) -> None:
        if not (rec.name.startswith(("proxy", "tenantgate", "asyncio"))):
            return
        if rec.exc_info or rec.name == "asyncio":
            try:
                msg = rec.getMessage()
            except Exception:  # noqa: BLE001
                msg = str(rec.msg)
            tb = "".join(traceback.format_exception(*rec.exc_info)) if rec.exc_info else ""
            record(f"log {rec.name}: {msg}\n{tb}")


def register_log(path: Path) -> None:
    """Watch a proxy process's log file from its current end."""
    path = Path(path)
    with _lock:
        _logs.setdefault(path, path.stat().st_size if path.exists() else 0)


def mark() -> int:
    with _lock:
        return len(_events)


def new_problems(since: int) -> list[str]:
    """Events recorded since ``since`` plus traceback lines new in the watched log files."""
    with _lock:
        found = list(_events[since:])
        for path, offset in list(_logs.items()):
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                continue
            _logs[path] = offset + len(data)
            text = data.decode("utf-8", "replace")
            if any(p in text for p in PATTERNS):
                found.append(f"{path}:\n{_excerpt(text)}")
    return found


def skip_logs() -> None:
    """Forget what the watched logs hold so far (used when a test may provoke tracebacks)."""
    with _lock:
        for path in list(_logs):
            try:
                _logs[path] = path.stat().st_size
            except FileNotFoundError:
                pass


def _excerpt(text: str, limit: int = 3000) -> str:
    for p in PATTERNS:
        i = text.find(p)
        if i >= 0:
            return text[max(0, i - 500):i + limit]
    return text[:limit]
