"""What the proxy records about client sessions: connection and refusal metrics and log lines.

:mod:`proxy.session.protocol` calls three functions here, so the relay itself
stays free of label lookups and formatting:

* :func:`note_connection` once per connection attempt (accepted, refused,
  timed out, cancel request ...): counts
  ``tenantgate_client_connection_attempts_total{kind,outcome}`` and logs one
  ``connection`` event;
* :func:`note_refusal` once per refused statement: counts
  ``tenantgate_statements_refused_total{kind,reason,sqlstate}`` and logs one
  ``refusal`` event (statement text truncated, its literals replaced by ``?``
  unless ``logging.statement_literals``; bound parameter values are never logged:
  the proxy does not pass them here);
* :func:`count_tenant_statements` wraps the session's pre-bound forwarded
  statements counter when ``metrics.tenant_labels`` is ``top`` or ``all``.

Events go to the ``tenantgate.events`` logger at INFO (see
:mod:`proxy.logformat` for the text and JSON formats and ``logging.events``).
Each record carries its fields as ``record.event`` (a dict) for the JSON
formatter; the text message has the same fields as ``key=value``.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from proxy import logformat
from proxy.metrics import CLIENT_CONNECTIONS_TOTAL, STATEMENTS_REFUSED_TOTAL, TENANT_STATEMENTS_TOTAL
from proxy.policy.refusal_reason import refusal_reason
from proxy.seam import Refuse

events_log = logging.getLogger(logformat.EVENTS_LOGGER)

_connection_children: dict[tuple[str, str], Any] = {}
_refusal_children: dict[tuple[str, str, str], Any] = {}


def session_tenant(gate: Any) -> str | None:
    """The tenant a session's gate is bound to right now (operators: their grant's tenant)."""
    if gate is None:
        return None
    tenant = getattr(gate, "tenant", None)
    if tenant is None:
        grant = getattr(gate, "grant", None)
        tenant = getattr(grant, "tenant", None)
    return tenant if isinstance(tenant, str) else None


def _client_addr(session: Any) -> str:
    transport = getattr(session, "transport", None)
    try:
        peer = transport.get_extra_info("peername") if transport is not None else None
    except Exception:  # noqa: BLE001 - a closed transport
        peer = None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "unix" if peer is not None else "unknown"


_LITERALS = re.compile(
    r"""(?P<q>"(?:[^"]|"")*")"""  # "quoted identifier": kept
    r"""|(?P<e>(?<![\w$])[Ee]'(?:[^'\\]|\\.|'')*(?:'|$))"""  # E'...' (backslash escapes)
    r"""|(?P<d>\$(?P<tag>[A-Za-z_][A-Za-z_0-9]*)?\$.*?(?:\$(?P=tag)\$|$))"""  # $tag$...$tag$
    r"""|(?P<s>'(?:[^']|'')*(?:'|$))"""  # '...'
    r"""|(?P<n>(?<![\w$.])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)""",  # numbers (not $1 placeholders)
    re.S,
)


def redact_literals(sql: str) -> str:
    """Statement text with string and numeric literals replaced by ``?`` (they may be values a
    client inlined instead of binding them).  Identifiers, keywords and $n placeholders stay."""
    return _LITERALS.sub(lambda m: m.group("q") or ("'?'" if m.group("n") is None else "?"), sql)


def _format(event: dict[str, Any]) -> str:
    parts = [event["event"]]
    for k, v in event.items():
        if k == "event" or v is None:
            continue
        text = str(v)
        if not text or any(c in text for c in ' "=\n\t'):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        parts.append(f"{k}={text}")
    return " ".join(parts)


def emit(event: dict[str, Any], level: int = logging.INFO) -> None:
    """Log one event (a dict with at least ``event``) on ``tenantgate.events``."""
    if events_log.isEnabledFor(level):
        events_log.log(level, "%s", _format(event), extra={"event": event})


def note_connection(session: Any, outcome: str, sqlstate: str | None = None, message: str | None = None) -> None:
    """Count and log one connection attempt's outcome ("accepted", "auth_failed", "refused", ...)."""
    kind = getattr(session, "kind_label", "unknown")
    key = (kind, outcome)
    child = _connection_children.get(key)
    if child is None:
        child = _connection_children[key] = CLIENT_CONNECTIONS_TOTAL.labels(kind=kind, outcome=outcome)
    child.inc()
    if events_log.isEnabledFor(logging.INFO):
        emit({
            "event": "connection", "outcome": outcome, "user": getattr(session, "user", None), "kind": kind,
            "tenant": session_tenant(getattr(session, "gate", None)), "client_addr": _client_addr(session),
            "tls": bool(getattr(session, "tls", False)), "session_id": getattr(session, "session_id", None),
            "sqlstate": sqlstate, "message": message,
        })


def note_refusal(session: Any, sql: str, refusal: Refuse) -> str:
    """Count and log one refused statement; returns its reason."""
    kind = getattr(session, "kind_label", "unknown")
    reason = refusal_reason(refusal)
    key = (kind, reason, refusal.sqlstate)
    child = _refusal_children.get(key)
    if child is None:
        if len(_refusal_children) > 4096:  # sqlstates come from a closed set; guard anyway
            _refusal_children.clear()
        child = _refusal_children[key] = STATEMENTS_REFUSED_TOTAL.labels(
            kind=kind, reason=reason, sqlstate=refusal.sqlstate)
    child.inc()
    if events_log.isEnabledFor(logging.INFO):
        if not logformat.statement_literals:
            sql = redact_literals(sql)
        limit = logformat.statement_max_chars
        text = sql if len(sql) <= limit else sql[:limit] + "..."
        emit({
            "event": "refusal", "sqlstate": refusal.sqlstate, "reason": reason, "message": refusal.message,
            "user": getattr(session, "user", None), "kind": kind,
            "tenant": session_tenant(getattr(session, "gate", None)),
            "session_id": getattr(session, "session_id", None), "statement": text,
        })
    return reason


# ----------------------------------------------------------------------------- per-tenant labels


class TenantLabels:
    """Which ``tenant`` label value a tenant's statements are counted under.

    ``off``: none (the per-tenant counter is not used).  ``all``: the tenant's
    name.  ``top``: the tenant's name while it is among the ``top_n`` tenants
    with the most statements this process has counted, else ``other``; a
    tenant keeps its label once it has one, and at most ``2 * top_n`` tenants
    ever get one, so the series count stays bounded (``2 * top_n + 1``).
    """

    def __init__(self, mode: str = "off", top_n: int = 10):
        self.mode = mode
        self.top_n = max(1, top_n)
        self._counts: dict[str, int] = {}
        self._labelled: set[str] = set()
        self._children: dict[str, Any] = {}

    def configure(self, mode: str, top_n: int) -> None:
        self.mode = mode
        self.top_n = max(1, top_n)

    def child(self, label: str):
        c = self._children.get(label)
        if c is None:
            c = self._children[label] = TENANT_STATEMENTS_TOTAL.labels(tenant=label)
        return c

    def add(self, tenant: str | None, n: int) -> None:
        if self.mode == "off" or not n:
            return
        if tenant is None:
            self.child("none").inc(n)
            return
        if self.mode == "all":
            self.child(tenant).inc(n)
            return
        counts = self._counts
        total = counts.get(tenant, 0) + n
        if tenant in counts or len(counts) < 100_000:
            counts[tenant] = total
        if tenant not in self._labelled and len(self._labelled) < 2 * self.top_n:
            ranked = sorted(counts.values(), reverse=True)
            if len(ranked) <= self.top_n or total >= ranked[self.top_n - 1]:
                self._labelled.add(tenant)
        self.child(tenant if tenant in self._labelled else "other").inc(n)


#: the process-wide label policy; serve/workers/demo call ``TENANT_LABELS.configure(...)`` from the config
TENANT_LABELS = TenantLabels()


class _TenantCountingChild:
    """Stands in for a session's pre-bound ``statements_total`` child: ``inc(n)`` adds ``n`` to
    it and to the session's current tenant (looked up once per flush, not per statement)."""

    __slots__ = ("base", "session")

    def __init__(self, base, session):
        self.base = base
        self.session = session

    def inc(self, amount: float = 1) -> None:
        self.base.inc(amount)
        TENANT_LABELS.add(session_tenant(getattr(self.session, "gate", None)), int(amount))


def count_tenant_statements(child, session):
    """``child`` itself when per-tenant labels are off, else a wrapper that also counts per tenant."""
    if TENANT_LABELS.mode == "off" or getattr(session, "kind_label", "") == "passthrough":
        return child
    return _TenantCountingChild(child, session)
