"""Session settings that follow a client from one pooled backend connection to the next.

In transaction pooling a client's transactions land on whichever backend
connection is free, so the settings the client's session depends on travel
with the client, not with the connection (PgBouncer calls this its varcache):

* the proxy-controlled ones (``tenantgate.tenant_id`` for the rewriter's
  prepared statements), given by the session's gate;
* the backstop binding (:data:`proxy.backstop.BINDING_SETTING`, value
  ``"<mode>:<tenant>"``): not a setting but a call of
  ``tenantgate_guard.bind(...)`` with a MAC for this very backend, built by
  the ``bind`` callback of :func:`apply_sql`; read back with
  ``tenantgate_guard.current_binding()``, so the proxy's view of what a
  connection is bound to stays true even after a rolled-back transaction;
* the client's startup parameters (application_name, TimeZone, DateStyle, ...);
* whatever the client changed with an allowed SET.  The proxy does not parse
  SET itself: after a transaction that ran one, it reads the real values back
  from the backend (:func:`probe_sql`), so rolled-back and ``SET LOCAL``
  changes are seen exactly as PostgreSQL applied them.

A *settings* dict maps lower-case parameter names to their text values.  Names
missing from a dict are at the connection's default (``baseline``).  This
module only builds the statements; it does no I/O.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

from proxy.backstop import BINDING_SETTING, CURRENT_BINDING_SQL

Settings = dict[str, str]


def quote_literal(value: str) -> str:
    """An escape-string literal that reads back as ``value`` whatever standard_conforming_strings is."""
    return "E'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _check_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "_." for c in name):
        raise ValueError(f"not a parameter name: {name!r}")
    return name


def changes(current: Mapping[str, str], wanted: Mapping[str, str], baseline: Mapping[str, str]) -> tuple[Settings, list[str]]:
    """What to run on a connection in state ``current`` so that it has ``wanted``:
    (values to set, names to reset to their default)."""
    to_set = {n: v for n, v in wanted.items() if current.get(n, baseline.get(n)) != v}
    to_reset = [n for n, v in current.items() if n not in wanted and v != baseline.get(n)]
    return to_set, to_reset


def apply_sql(to_set: Mapping[str, str], to_reset: Iterable[str],
              bind: Callable[[str], str] | None = None) -> str:
    """One simple-Query text applying the changes (set_config is not transactional-local: ``false``).

    The backstop binding runs first, as ``bind(value)`` (an SQL expression; ``"none:"`` to reset);
    without ``bind`` a binding change is an error (fail closed)."""
    parts = []
    calls = []
    to_reset = list(to_reset)
    if BINDING_SETTING in to_set or BINDING_SETTING in to_reset:
        if bind is None:
            raise ValueError("the backstop binding changes but no binder was given")
        calls.append(bind(to_set.get(BINDING_SETTING, "none:")))
    calls.extend(
        f"pg_catalog.set_config({quote_literal(_check_name(n))}, {quote_literal(v)}, false)"
        for n, v in to_set.items() if n != BINDING_SETTING
    )
    if calls:
        parts.append(f"SELECT {', '.join(calls)}")
    parts.extend(f"RESET {_check_name(n)}" for n in to_reset if n != BINDING_SETTING)
    return "; ".join(parts)


def _probe_column(name: str) -> str:
    if name == BINDING_SETTING:
        return CURRENT_BINDING_SQL
    return f"pg_catalog.current_setting({quote_literal(_check_name(name))}, true)"


def probe_sql(names: Iterable[str]) -> str:
    """A query returning one row: the current value of each parameter, in order (NULL if unknown)."""
    return f"SELECT {', '.join(_probe_column(n) for n in names)}"


def from_probe(names: Iterable[str], values: Iterable[str | None], baseline: Mapping[str, str]) -> Settings:
    """The non-default settings in a probe's answer."""
    return {n: v for n, v in zip(names, values) if v is not None and v != baseline.get(n)}
