"""What doctor's checks share (proxy/doctor.py, doctor_admin.py, doctor_backstop.py): the verdicts of
a finding, and identifier quoting for the fix lines a finding suggests."""

from __future__ import annotations

import re

from proxy.policy.names import quote_ident

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"

_SAFE_IDENT = re.compile(r"^[a-z_][a-z0-9_$]*$")
_KEYWORDS: set[str] = set()  # PostgreSQL keywords that need quoting (doctor fills it from pg_get_keywords())


def qi(name: str) -> str:
    """Quote an identifier for a fix line, only when PostgreSQL needs it (like quote_ident)."""
    if _SAFE_IDENT.match(name) and name not in _KEYWORDS:
        return name
    return quote_ident(name)
