"""Connection-time settings: the startup packet's parameters and ``options=-c name=value``.

PostgreSQL applies every parameter of the startup packet (and of its ``options`` string) as a
session setting whose reset value it becomes.  tenantgate does the same for exactly the
parameters a tenant session may ``SET`` (:data:`proxy.policy.utility_statements.SAFE_PARAMETERS`, one list
for both), and refuses the connection, naming the parameter, for any other: a setting is never
dropped silently.

* ``tenantgate.*`` names are tenantgate's own connection options (a tenant token, an operator's
  grant) and go to the gatekeeper, as do PostgreSQL's protocol options (``_pq_.*``).
* The per-transaction parameters (``transaction_isolation`` ...) have no meaning at connect time
  in PostgreSQL either; they are refused like any other.

Entry point: :func:`split_startup` -> :class:`StartupSettings`.  Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from proxy.policy.resolve import fold_identifier, truncate_identifier

from proxy.policy.utility_statements import SAFE_PARAMETERS
from proxy.seam import client_encoding_is_safe

#: the startup packet's own keys (not settings)
PROTOCOL_KEYS = frozenset({"user", "database", "options", "replication"})
#: what a connection may set at connect time: the SET-able parameters that last a session
CONNECT_SETTABLE = frozenset(p for p in SAFE_PARAMETERS if not p.startswith("transaction_"))


class StartupRefusal(Exception):
    """The connection must be refused (FATAL) because of one of its settings."""

    def __init__(self, sqlstate: str, message: str, hint: str | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint


@dataclass
class StartupSettings:
    #: settings for the backend session (lower-case names), applied as PostgreSQL would
    settings: dict[str, str] = field(default_factory=dict)
    #: tenantgate's own connection options for the gatekeeper (``tenantgate.grant`` ...)
    gate_options: dict[str, str] = field(default_factory=dict)


def same_search_path(value: str, fixed: Sequence[str]) -> bool:
    """Whether a ``search_path`` value names exactly the proxy's fixed path (``rules.schemas``):
    comma-separated identifiers, unquoted ones folded to lower case and every one truncated to
    NAMEDATALEN, by the same folding the rewriter resolves names with (proxy/policy/resolve.py)."""
    names = []
    for part in value.split(","):
        part = part.strip(" \t\n\r\f\v")  # PostgreSQL's scanner_isspace: ASCII white space only
        if len(part) >= 2 and part[0] == part[-1] == '"':
            name = truncate_identifier(part[1:-1].replace('""', '"'))
        elif part and '"' not in part:
            name = fold_identifier(part)  # ASCII letters only, as PostgreSQL's downcase_identifier
        else:
            return False
        names.append(name)
    return names == list(fixed)


def split_startup(params: Mapping[str, str], options: Mapping[str, str], *, strict: bool = True,
                  fixed_search_path: Sequence[str] | None = None) -> StartupSettings:
    """Sort the startup packet's parameters and the parsed ``options`` (``-c`` pairs).  As in
    PostgreSQL, ``options`` is applied first and the packet's own keys win over it.
    ``strict=False`` (passthrough users, which have no policy) forwards every setting.
    ``fixed_search_path``: the proxy's search_path (``rules.schemas``); a ``search_path`` that names
    exactly it (pgjdbc's ``currentSchema=public``) is accepted and changes nothing."""
    out = StartupSettings()
    pairs = list(options.items())
    pairs += [(k, v) for k, v in params.items() if k.lower() not in PROTOCOL_KEYS]
    for key, value in pairs:
        name = key.lower()
        if name.startswith("tenantgate.") or name.startswith("_pq_."):
            out.gate_options[key] = value
            continue
        if (name == "search_path" and strict and fixed_search_path is not None
                and same_search_path(value, fixed_search_path)):
            continue  # already the path every statement is resolved with
        if name not in CONNECT_SETTABLE and strict:
            raise StartupRefusal(
                "42501",
                f'parameter "{name}" cannot be set at connection time through tenantgate',
                hint="remove it from the connection string or options (PGOPTIONS); "
                     "a tenant session may set: " + ", ".join(sorted(CONNECT_SETTABLE)),
            )
        if name == "client_encoding" and not client_encoding_is_safe(value):
            # statement text is read as UTF-8; this encoding would make PostgreSQL see other SQL
            raise StartupRefusal("0A000", f"client_encoding {value!r} is not supported through tenantgate",
                                 hint="set client_encoding=UTF8 (PGCLIENTENCODING=UTF8)")
        out.settings[name] = value
    return out
