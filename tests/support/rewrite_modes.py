"""The ways a statement reaches the policy engine, for the RLS differential.

``test_rewrite_differential.py`` checks each generated statement in several modes:

* ``simple``: a Query message, ``Origin.SIMPLE``, tenant A (the original mode);
* ``params``: the extended protocol.  Literals next to an operator are turned into
  ``$n`` parameters (``$n::int`` / ``$n::text``, so their types stay what the literal's
  were); the engine sees the text at ``Origin.PARSE``, its ``param_checks`` judge the
  bound values (a rejected value is a refusal, as the proxy refuses that Bind), and
  oracle and candidate both run with Parse/Bind/Execute and the same values;
* ``token``: a session whose tenant comes from a tenant token (``tenant_source``
  given): the engine names the tenant as ``current_setting('tenantgate.tenant_id')``,
  which the candidate's transaction sets to A (as the proxy does), with parameters;
* ``cache_b``: the same text first checked for tenant A (filling the template cache),
  then for tenant B, compared with RLS for tenant B: a cached template must carry no
  trace of the tenant it was first built for.

:func:`parametrize` uses PostgreSQL's own scanner (pglast) to find the literals.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from pglast import parser as pg_parser

from support.rewrite_oracle import EngineRewriter, Rewrite
from support.rewrite_schema import TENANT

MODES = ("simple", "params", "token", "cache_b")
SECOND_TENANT = "B"

# Tokens after which a literal is a value (not an ORDER BY / GROUP BY position).
_VALUE_CONTEXT = {
    "ASCII_61", "NOT_EQUALS", "LESS_EQUALS", "GREATER_EQUALS", "ASCII_60", "ASCII_62", "ASCII_43",
    "LIKE", "THEN", "ELSE", "BETWEEN", "AND", "LIMIT", "OFFSET", "Op",
}
_TEXT_CONTEXT = _VALUE_CONTEXT | {"ASCII_44", "ASCII_40", "FROM"}  # a text literal is never a position


def parametrize(sql: str, rng: random.Random, share: float = 0.7) -> tuple[str, list[str]] | None:
    """``sql`` with some literals replaced by ``$n`` parameters, and the parameter values.

    None when the text has no literal to replace (or already uses parameters)."""
    try:
        tokens = pg_parser.scan(sql)
    except Exception:
        return None
    if any(t.name == "PARAM" for t in tokens):
        return None
    out, params, pos = [], [], 0
    prev = None
    for t in tokens:
        text = sql[t.start:t.end + 1]
        replace = None
        if t.name == "SCONST" and prev in _TEXT_CONTEXT and text.startswith("'") and rng.random() < share:
            replace = ("text", text[1:-1].replace("''", "'"))
        elif t.name == "ICONST" and prev in _VALUE_CONTEXT and rng.random() < share:
            replace = ("int", text)
        if replace is not None:
            params.append(replace[1])
            out.append(sql[pos:t.start])
            out.append(f"${len(params)}::{replace[0]}")
            pos = t.end + 1
        prev = t.name
    if not params:
        return None
    out.append(sql[pos:])
    return "".join(out), params


class ParamRewriter:
    """The engine at ``Origin.PARSE`` for a statement with parameters; the Bind values are
    judged by the decision's ``param_checks`` like the proxy does."""

    name = "engine-params"

    def __init__(self, engine, params: list[str], tenant: str = TENANT, token: bool = False):
        from proxy.policy.context import PolicyContext

        self.engine = engine
        self.params = params
        self.tenant = tenant
        self.token = token
        self.ctx = PolicyContext(tenant=tenant, tenant_source=(lambda: tenant) if token else None)

    def rewrite(self, sql: str) -> Rewrite:
        from proxy.seam import Forward, Origin, Refuse

        decision = self.engine.check(sql, self.ctx, Origin.PARSE)
        if isinstance(decision, Refuse):
            return Rewrite(None, refused=f"{decision.sqlstate}: {decision.message}")
        assert isinstance(decision, Forward), decision
        for index, check in decision.param_checks:
            value = self.params[index] if index < len(self.params) else None
            if not check.accepts(0, None if value is None else value.encode()):
                return Rewrite(None, refused=f"42501: Bind refused: ${index + 1} {check.describe()}")
        setup = ""
        if self.token:
            # What the proxy keeps on a token session's backend connection: the session's tenant.
            setup = f"SET LOCAL tenantgate.tenant_id = '{self.tenant}';"
        return Rewrite(decision.sql, setup=setup)


@dataclass
class CrossTenantRewriter:
    """Checks the text for tenant A first (the cache now holds its template), then returns
    the decision for ``tenant``."""

    engine: object
    tenant: str = SECOND_TENANT
    name: str = "engine-cache-b"

    def rewrite(self, sql: str) -> Rewrite:
        EngineRewriter(self.engine, TENANT).rewrite(sql)
        return EngineRewriter(self.engine, self.tenant).rewrite(sql)
