"""Log output: plain text or one JSON object per line (``logging.format``).

:func:`configure_logging` is called once by ``tenantgate serve``, by each
worker process and by the demo.  It installs one stderr handler with either
the text format (``2026-01-01 12:00:00,000 INFO tenantgate.session: ...``) or
:class:`JsonFormatter`, sets the level (``logging.level``; warning by
default, info with ``--verbose``) and turns the per-connection and
per-refusal event lines of :mod:`proxy.session_events` on or off
(``logging.events``), whatever the level.  It imports nothing of
prometheus_client, so the worker supervisor can call it before it sets
``PROMETHEUS_MULTIPROC_DIR``.

JSON lines have ``ts`` (UTC, RFC 3339 with milliseconds), ``level``,
``logger``, ``message``, ``worker`` when set, ``exc`` for exceptions, and
for event lines every field of the event (``event``, ``outcome``, ``user``,
``kind``, ``tenant``, ``client_addr``, ``sqlstate``, ``reason``,
``statement`` ...).  Bound parameter values are never part of an event.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

#: the logger of proxy.session_events' connection and refusal lines
EVENTS_LOGGER = "tenantgate.events"
#: refusal lines cut statement text to this many characters (``logging.statement_max_chars``)
statement_max_chars = 200
#: refusal lines keep the statement's literals (``logging.statement_literals``; default: replaced by ?)
statement_literals = False

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(worker_tag)s: %(message)s"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; event records (``record.event``) add their fields."""

    def __init__(self, worker: int | None = None):
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            out["worker"] = self.worker
        event = getattr(record, "event", None)
        if isinstance(event, dict):
            for k, v in event.items():
                if v is not None and k not in out:
                    out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class _TextFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None):
        super().__init__(TEXT_FORMAT)
        self.tag = f"[worker {worker}]" if worker is not None else ""

    def format(self, record: logging.LogRecord) -> str:
        record.worker_tag = self.tag
        return super().format(record)


def configure_logging(settings=None, *, verbose: bool = False, worker: int | None = None, stream=None) -> None:
    """Install tenantgate's log handler on the root logger (replacing earlier handlers).

    ``settings`` is a :class:`proxy.config.LoggingConfig` (None: defaults).
    """
    global statement_max_chars, statement_literals
    fmt = getattr(settings, "format", "text")
    level_name = getattr(settings, "level", None)
    level = _LEVELS[level_name] if level_name else (logging.INFO if verbose else logging.WARNING)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(worker) if fmt == "json" else _TextFormatter(worker))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    events = getattr(settings, "events", True)
    logging.getLogger(EVENTS_LOGGER).setLevel(logging.INFO if events else logging.WARNING)
    max_chars = getattr(settings, "statement_max_chars", None)
    if max_chars is not None:
        statement_max_chars = max_chars
    statement_literals = bool(getattr(settings, "statement_literals", False))
