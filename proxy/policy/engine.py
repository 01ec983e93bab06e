"""The policy engine for tenant sessions: one statement text in, Forward or Refuse out.

Pure Python, no sockets, no I/O.  The passes, one module each, run in order:

    lexer.split_statements    -> exact statement boundaries from PostgreSQL's own scanner (pglast);
                                 U&"..." identifiers and strings decoded (lexer.decode_unicode_escapes);
                                 the text must parse with PostgreSQL's grammar (lexer.statement_count)
    parse.parse_tokens        -> sqlglot tree with token positions; sqlglot's tokens are cross-checked
                                 against PostgreSQL's (crosscheck.py), exp.Command/parse errors refused
    utility_statements.command_piece    -> SET/SHOW/RESET, transactions, PREPARE/EXECUTE/DEALLOCATE, EXPLAIN,
                                 DECLARE/FETCH/CLOSE, COPY (copy.py): the proxy's own small parser
    classify.classify         -> statement kind (read/write), refuses DDL and everything else
    resolve.resolve_table     -> every relation resolved as PostgreSQL would (search_path, case
                                 folding, quoting, CTE shadowing); unknown -> 42P01 + catalog refresh
    inject.inject_tenant      -> text edits that add the tenant predicates, spliced into the
                                 original text so everything else stays byte-identical
    pg_verify.pg_verify       -> the second opinion: parse the result with PostgreSQL's own parser
                                 (libpg_query) and check, on that tree, that it is one statement of
                                 a modelled kind and every tenant relation is filtered or bound
    pipeline.Pipeline         -> composes them; cache.RewriteCache keeps tenant-independent templates

Public API (stable)::

    engine = PolicyEngine(rules, catalog_manager, function_checker=None)
    decision = engine.check(sql, PolicyContext(tenant="acme"), Origin.SIMPLE)   # Forward | Refuse
    result = engine.analyze(sql, ctx, origin)   # Analysis: decision + session effects

``Forward.sql`` is the statement to send; ``Forward.param_checks`` (Parse only) are
``(index, ParamCheck)`` for parameters that go into the tenant column; ``Forward.copy_in_check``
is a factory of :class:`~proxy.policy.copy.TenantCopyInCheck` for COPY ... FROM STDIN;
``Forward.statement_class`` is read / write / tcl / set / other.

``PolicyContext(tenant, read_only=False, read_only_message=..., prepared_names=frozenset())``:
``tenant=None`` is a tenant-less session, which may only run statements that touch no tenant
data.  ``prepared_names`` are the statement names this session PREPAREd through the engine
(EXECUTE/DEALLOCATE of any other name is refused).  ``tenant_source`` (sessions that switch
tenant with tokens) returns the session's current tenant: then Parse'd statements and SQL
PREPARE bodies name the tenant as ``current_setting('tenantgate.tenant_id')`` cast to the tenant
column's type (the proxy keeps that GUC equal to the session's tenant; clients cannot set it),
and Bind/COPY checks read the tenant at Bind/COPY time, so prepared statements follow a switch.
"""

from __future__ import annotations

import logging

from proxy.policy.context import Analysis, FunctionCheckerLike, PolicyContext
from proxy.policy.errors import (
    FEATURE_NOT_SUPPORTED,
    PolicyRefusal,
)
from proxy.policy.pipeline import Pipeline
from proxy.policy.rules import Rules
from proxy.seam import Forward, Origin, Refuse

log = logging.getLogger(__name__)


class PolicyEngine:
    def __init__(self, rules: Rules, catalog_manager, function_checker: FunctionCheckerLike | None = None,
                 *, cache_size: int = 20000):
        self.rules = rules
        self.catalog_manager = catalog_manager
        self.function_checker = function_checker
        self._pipeline = Pipeline(rules, catalog_manager, function_checker, cache_size=cache_size)

    @property
    def cache(self):
        return self._pipeline.cache

    def replace_rules(self, rules: Rules, function_checker: FunctionCheckerLike | None) -> None:
        """Swap in new rules (a reload): a new pipeline, so the rewrite cache starts empty.
        Sessions see the new rules from their next statement."""
        self._pipeline = Pipeline(rules, self.catalog_manager, function_checker,
                                  cache_size=self._pipeline.cache.maxsize)
        self.rules = rules
        self.function_checker = function_checker

    def analyze(self, sql: str, ctx: PolicyContext, origin: Origin = Origin.SIMPLE) -> Analysis:
        """The decision plus the session effects (PREPARE/DEALLOCATE names, tenant token SET).

        Never raises: anything unexpected is a refusal (fail closed)."""
        try:
            return self._pipeline.analyze(sql, ctx, origin)
        except PolicyRefusal as e:
            return Analysis(e.to_refuse())
        except Exception as e:  # pragma: no cover - defensive
            log.exception("policy engine failed; refusing the statement")
            return Analysis(Refuse(FEATURE_NOT_SUPPORTED, f"statement not supported by tenantgate ({type(e).__name__})",
                                   reason="internal"))

    def warm_up(self, sql: str, origin: Origin = Origin.SIMPLE):
        """For a long statement (the session analyses it off the event loop): ``(compute, adopt)``.
        ``compute()`` is the cold rewrite, a pure function of the text, the rules and the catalog
        snapshot; it may run in a forked child and returns a picklable template (without the
        normalised-literal parts, which are as large as the statement).  ``adopt(result)`` puts it
        in this process's cache, so the next ``analyze`` of the same text is a cache hit."""
        import dataclasses

        pipeline = self._pipeline
        key = (*pipeline.key(sql, origin), pipeline.catalog_manager.snapshot.version)

        def compute():
            tpl = pipeline.build(sql, origin)
            return dataclasses.replace(tpl, norm_parts=None) if tpl.norm_parts is not None else tpl

        def adopt(tpl) -> None:
            pipeline.cache.put(key, (tpl, None))

        return compute, adopt

    def check(self, sql: str, ctx: PolicyContext, origin: Origin = Origin.SIMPLE) -> Forward | Refuse:
        """Forward (the SQL to send, Bind/COPY checks, statement class) or Refuse."""
        return self.analyze(sql, ctx, origin)[0]  # .decision (Analysis is a named tuple)
