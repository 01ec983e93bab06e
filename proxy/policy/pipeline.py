"""Composes the passes (parse -> classify -> resolve/inject -> pg_verify) and the cache.

A statement text is turned once into a tenant-independent :class:`Template`; each use
then only checks the session context and joins the template's segments with the quoted
tenant literal.  See :mod:`proxy.policy.engine` for the public API.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from proxy.metrics import REWRITE_SECONDS
from proxy.policy.cache import HIT_PUBLISH_EVERY, RewriteCache
from proxy.policy.catalog import CatalogSnapshot
from proxy.policy.classify import classify, refuse_keyword
from proxy.policy.utility_statements import command_piece
from proxy.policy.context import Analysis, Effects
from proxy.policy.copy_fill import copy_in_check
from proxy.policy.errors import (
    FEATURE_NOT_SUPPORTED,
    INSUFFICIENT_PRIVILEGE,
    READ_ONLY_TRANSACTION,
    SYNTAX_ERROR,
    PolicyRefusal,
)
from proxy.policy.edits import TENANT, TENANT_LASTING, Edit
from proxy.policy.inject import inject_tenant
from proxy.policy.resets import advisory_unlock_all_piece
from proxy.policy.lexer import decode_unicode_escapes, first_word, single_numbers, split_statements, statement_count
from proxy.policy.parse import COMMAND_KEYWORDS, parse_tokens, tokenize_span, _UESC, _refuse_unicode_escapes
from proxy.policy.normalize import QUERY_KEYWORDS, literal_parts, literals_key, number_literals, render_plan
from proxy.policy.pg_syntax import reduce_tokens
from proxy.policy.pg_verify import MARKER_SQL, marker_offsets, pg_verify
from proxy.policy.statement_result import CopyInSpec, Piece
from proxy.policy.resolve import UnknownRelation
from proxy.policy.rules import Rules
from proxy.policy.catalog_views import SettingNameCheck
from proxy.policy.tenantvalue import TenantParamCheck, tenant_guc_reference, tenant_literal, text_matches, validate_tenant
from proxy.seam import Forward, Origin, Refuse

log = logging.getLogger(__name__)

_CLASS_RANK = {"write": 4, "read": 3, "set": 2, "tcl": 1, "other": 0}


@dataclass(frozen=True)
class Template:
    parts: tuple[str, ...]
    # per gap between parts: True where the tenant sits in a statement that outlives this
    # execution (SQL PREPARE body); empty when there is none
    lasting: tuple[bool, ...] = ()
    statement_class: str = "other"
    touches_tenant: bool = False
    writes: bool = False
    read_write_request: bool = False
    param_checks: tuple[int, ...] = ()
    setting_params: tuple[int, ...] = ()  # current_setting($n): checked at Bind
    required_literals: tuple[str, ...] = ()
    copy_in: CopyInSpec | None = None
    prepared: tuple[str, ...] = ()
    deallocated: tuple[str, ...] = ()
    deallocate_all: bool = False
    requires_prepared: tuple[str, ...] = ()
    tenant_token: tuple[str, bool] | None = None
    pins_session: bool = False
    changes_settings: bool = False
    resets_settings: bool = False
    refusal: Refuse | None = None
    unknown_relation: bool = False
    # for the numeric-literal-normalised cache: segments with TENANT and Literal markers
    norm_parts: tuple | None = None
    # per-tenant finished Analysis objects (hot path of cache hits); bounded in analyze()
    done: dict = field(default_factory=dict, compare=False, repr=False)


def _effects(tpl: Template) -> Effects:
    """What running a template's statement changes in the session (prepared names, tenant token)."""
    if tpl.prepared or tpl.deallocated or tpl.deallocate_all or tpl.tenant_token or tpl.requires_prepared:
        return Effects(prepared=tpl.prepared, deallocated=tpl.deallocated, deallocate_all=tpl.deallocate_all,
                       tenant_token=tpl.tenant_token, executed=tpl.requires_prepared)
    return _NO_EFFECTS


def _with_sql(proto: Forward, sql: str) -> Forward:
    """``proto`` with another text: ``dataclasses.replace`` without its cost (a frozen dataclass's
    __init__ sets each field through object.__setattr__); every field comes from a valid Forward."""
    f = _new(Forward)
    d = f.__dict__
    d.update(proto.__dict__)
    d["sql"] = sql
    return f


_new = object.__new__
_HOT = object()  # key in Template.done: (tenant, segments, slots, Forward, Effects) of the last normalised hit


def splice(sql: str, edits: list[Edit], start: int = 0, end: int | None = None) -> list:
    """Apply edits to ``sql[start:end]``; returns a list of strings and TENANT markers."""
    end = len(sql) if end is None else end
    out: list = []
    pos = start
    for e in sorted(edits, key=lambda e: (e.start, e.end)):
        if e.start < pos:
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "overlapping rewrites (internal error)")
        out.append(sql[pos : e.start])
        out.extend(e.parts)
        pos = e.end
    out.append(sql[pos:end])
    return out


def _segments(pieces: list) -> tuple[tuple[str, ...], tuple[bool, ...]]:
    """(text segments between tenant markers, which gaps are TENANT_LASTING or () if none)."""
    segs: list[str] = []
    lasting: list[bool] = []
    cur: list[str] = []
    for p in pieces:
        if p is TENANT or p is TENANT_LASTING:
            segs.append("".join(cur))
            lasting.append(p is TENANT_LASTING)
            cur = []
        else:
            cur.append(p)
    segs.append("".join(cur))
    return tuple(segs), (tuple(lasting) if any(lasting) else ())


def _unprepared_requirements(pieces: list[Piece]) -> tuple[str, ...]:
    """EXECUTE names not PREPAREd by an earlier statement of the same query string."""
    prepared: set[str] = set()
    needed: list[str] = []
    for p in pieces:
        needed.extend(n for n in p.requires_prepared if n not in prepared)
        prepared.update(p.prepared)
        prepared.difference_update(p.deallocated)
    return tuple(needed)


class _StatementHandler:
    """Callable (sql, start, end) -> Piece for one statement; also used for inner statements."""

    def __init__(self, rules: Rules, snapshot: CatalogSnapshot, function_checker):
        self.rules = rules
        self.snapshot = snapshot
        self.function_checker = function_checker

    def __call__(self, sql: str, start: int, end: int) -> Piece:
        # ``stage`` names the pass running, so a refusal without an explicit reason gets that
        # pass's reason (proxy.policy.refusal_reason) on its way out.
        stage = "unsupported"
        try:
            kw = first_word(sql, start)
            refuse_keyword(kw)
            if kw == "SELECT":  # a driver's reset: SELECT pg_advisory_unlock_all() (resets.py)
                reset = advisory_unlock_all_piece(sql, start, end)
                if reset is not None:
                    return reset
            if kw in COMMAND_KEYWORDS:
                return command_piece(sql, start, end, kw, self)
            stage = "parse"
            tokens = tokenize_span(sql, start, end)
            if not tokens:
                raise PolicyRefusal(SYNTAX_ERROR, "empty statement")
            if _UESC.search(sql, start, end):
                _refuse_unicode_escapes(tokens)
            tokens = reduce_tokens(tokens)  # PostgreSQL-only syntax, for sqlglot's eyes (text unchanged)
            tree = parse_tokens(sql, tokens)
            stage = "unsupported"
            cls, writes = classify(tree, kw)
            setting_params = frozenset()
            if self.function_checker is not None:
                stage = "function"
                setting_params = self.function_checker.check(tree)
            stage = "tenant"
            inj = inject_tenant(tree, tokens, sql, self.snapshot, self.rules)
            # the second opinion, on PostgreSQL's own parse tree (every statement, tenant tables or not):
            # sqlglot decided the edits, libpg_query checks what PostgreSQL will run
            checked, markers = marker_offsets(splice(sql, inj.edits, start, end), MARKER_SQL, TENANT)
            pg_verify(checked, markers, self.snapshot, self.rules,
                      param_checks=inj.param_checks, required_literals=inj.required_literals,
                      function_checker=self.function_checker, setting_params=setting_params)
        except PolicyRefusal as e:
            if not e.reason:
                e.reason = stage
            raise
        return Piece(
            edits=inj.edits, statement_class=cls, touches_tenant=inj.touches_tenant, writes=writes or inj.writes,
            param_checks=set(inj.param_checks), required_literals=list(inj.required_literals),
            setting_params=set(setting_params),
        )


_NO_EFFECTS = Effects()


class Pipeline:
    def __init__(self, rules: Rules, catalog_manager, function_checker, *, cache_size: int = 20000):
        self.rules = rules
        self.catalog_manager = catalog_manager
        self.function_checker = function_checker
        self.cache = RewriteCache(cache_size)
        self._tenant_cache: dict[str, str] = {}

    # ---- building templates (cache misses) ---------------------------------------------
    def build(self, sql: str, origin) -> Template:
        snapshot = self.catalog_manager.snapshot
        original = sql
        try:
            # PostgreSQL's own scanner and grammar first (proxy.policy.lexer): statement
            # boundaries from its tokens, and a text its grammar rejects is refused here
            sql = decode_unicode_escapes(sql)
            spans = split_statements(sql)
            if statement_count(sql) != len(spans):
                raise PolicyRefusal(SYNTAX_ERROR, "statement boundaries could not be determined exactly")
            if origin == Origin.PARSE and len(spans) > 1:
                raise PolicyRefusal(SYNTAX_ERROR, "cannot insert multiple commands into a prepared statement")
            if not spans:
                # only whitespace and comments: forward nothing the parser has not seen
                return Template(parts=("",))
            handler = _StatementHandler(self.rules, snapshot, self.function_checker)
            pieces = [handler(sql, s, e) for s, e in spans]
        except UnknownRelation as e:
            return Template(parts=(), refusal=e.to_refuse(), unknown_relation=True)
        except PolicyRefusal as e:
            return Template(parts=(), refusal=e.to_refuse())
        except Exception as e:  # fail closed on anything unexpected (e.g. a sqlglot bug)
            log.exception("policy engine failed on a statement; refusing it")
            return Template(parts=(), refusal=Refuse(
                FEATURE_NOT_SUPPORTED, f"statement not supported by tenantgate ({type(e).__name__})", reason="internal"))
        if len(pieces) > 1 and any(p.tenant_token or p.copy_in for p in pieces):
            what = "SET tenantgate.tenant" if any(p.tenant_token for p in pieces) else "COPY FROM STDIN"
            return Template(parts=(), refusal=Refuse(FEATURE_NOT_SUPPORTED, f"{what} must be sent as its own statement"))
        edits = [e for p in pieces for e in p.edits]
        try:
            parts, lasting = _segments(splice(sql, edits))
        except PolicyRefusal as e:
            return Template(parts=(), refusal=e.to_refuse())
        cls = max((p.statement_class for p in pieces), key=lambda c: _CLASS_RANK.get(c, 0))
        param_checks: set[int] = set()
        setting_params: set[int] = set()
        for p in pieces:
            param_checks |= p.param_checks
            setting_params |= p.setting_params
        norm_parts = None
        if (
            sql == original
            and not any(p.required_literals or p.tenant_token or p.copy_in for p in pieces)
            and all(first_word(sql, s) in QUERY_KEYWORDS for s, _ in spans)
        ):
            norm = number_literals(sql)
            # a normalised template only where PostgreSQL's scanner confirms that every
            # normalised span is exactly one numeric constant (see normalize.py)
            if norm is not None and single_numbers(sql, norm[1]):
                norm_parts = literal_parts(sql, edits, norm[1])
        return Template(
            norm_parts=norm_parts,
            parts=parts,
            lasting=lasting,
            statement_class=cls,
            touches_tenant=any(p.touches_tenant for p in pieces),
            writes=any(p.writes for p in pieces),
            read_write_request=any(p.read_write_request for p in pieces),
            param_checks=tuple(sorted(param_checks)),
            setting_params=tuple(sorted(setting_params)),
            required_literals=tuple(lit for p in pieces for lit in p.required_literals),
            copy_in=pieces[0].copy_in if len(pieces) == 1 else None,
            prepared=tuple(n for p in pieces for n in p.prepared),
            deallocated=tuple(n for p in pieces for n in p.deallocated),
            deallocate_all=any(p.deallocate_all for p in pieces),
            pins_session=any(p.pins_session for p in pieces),
            changes_settings="set_config" in sql.lower() or any(p.statement_class == "set" for p in pieces),
            resets_settings=any(p.resets_settings for p in pieces),
            requires_prepared=_unprepared_requirements(pieces),
            tenant_token=pieces[0].tenant_token if len(pieces) == 1 else None,
        )

    @staticmethod
    def key(sql: str, origin) -> tuple:
        """The exact-text cache key (without the catalog version).  The origin enters as its
        value: an Enum member hashes in Python code, a str in C (this is the hot path)."""
        return (sql, origin._value_)

    def template(self, sql: str, origin) -> tuple[Template, list[str] | None, bool]:
        """(template, numeric literals to substitute or None, cache hit)."""
        # Exact text first (value: the template and, for a normalised template, this text's
        # numeric literals), so a repeated statement skips normalisation; then the
        # numeric-literal-normalised text; then a cold rewrite.
        # (the cache's mapping is read here directly and hits counted inline: the hot path)
        version = self.catalog_manager.snapshot.version
        o = origin._value_
        key = (sql, o, version)
        cache = self.cache
        entries = cache.entries
        hit = entries.get(key)
        if hit is not None:
            entries.move_to_end(key)
            cache.unpublished_hits += 1
            if cache.unpublished_hits >= HIT_PUBLISH_EVERY:
                cache.publish()
            return hit[0], hit[1], True
        norm = literals_key(sql)
        if norm is not None:
            nkey = ("#", norm[0], o, version)
            ntpl = entries.get(nkey)
            if ntpl is not None:  # (not cached by exact text: literals mostly differ each time)
                entries.move_to_end(nkey)
                cache.unpublished_hits += 1
                if cache.unpublished_hits >= HIT_PUBLISH_EVERY:
                    cache.publish()
                return ntpl, norm[1], True
        cache.count(False)
        t0 = time.perf_counter()
        tpl = self.build(sql, origin)
        REWRITE_SECONDS.observe(time.perf_counter() - t0)
        if norm is not None and tpl.norm_parts is not None:
            cache.put(("#", norm[0], o, version), tpl)
        cache.put(key, (tpl, None))
        return tpl, None, False

    # ---- applying a template to a session -------------------------------------------------
    def literal(self, tenant: str) -> str:
        lit = self._tenant_cache.get(tenant)
        if lit is None:
            lit = tenant_literal(validate_tenant(tenant, self.rules.tenant_column_type))
            if len(self._tenant_cache) > 10000:
                self._tenant_cache.clear()
            self._tenant_cache[tenant] = lit
        return lit

    def analyze(self, sql: str, ctx, origin):
        tpl, literals, cached = self.template(sql, origin)
        if literals is not None:
            # the hot path (pgbench -S, most applications): a normalised hit for the tenant the
            # template was last filled in for; kept under _HOT by the normalised branch below only
            # when nothing but the context's tenant, tenant source and read-only flag can change it
            hot = tpl.done.get(_HOT)
            if hot is not None and hot[0] == ctx.tenant and ctx.tenant_source is None and not ctx.read_only:
                buf = hot[1].copy()
                for i, k in hot[2]:
                    buf[i] = literals[k]
                return Analysis(_with_sql(hot[3], "".join(buf)), hot[4], True)
        if tpl.refusal is not None:
            if tpl.unknown_relation:
                self.catalog_manager.request_refresh("unknown_relation")
            return Analysis(tpl.refusal, cached=cached)
        tenant = ctx.tenant
        if tpl.touches_tenant and tenant is None:
            return Analysis(Refuse(
                INSUFFICIENT_PRIVILEGE,
                "no tenant is selected for this session: this statement reads or writes tenant data",
                hint="SET tenantgate.tenant = '<signed token>' first", reason="tenant",
            ), cached=cached)
        if ctx.read_only and (tpl.writes or tpl.read_write_request):
            return Analysis(Refuse(READ_ONLY_TRANSACTION, ctx.read_only_message, reason="read_only"), cached=cached)
        for name in tpl.requires_prepared:
            if name not in ctx.prepared_names:
                return Analysis(Refuse(
                    INSUFFICIENT_PRIVILEGE,
                    f'EXECUTE of "{name}" refused: only statements PREPAREd through tenantgate in this session '
                    "can be executed", reason="unsupported",
                ), cached=cached)
        type_ = self.rules.tenant_column_type
        for lit in tpl.required_literals:
            if tenant is None or not text_matches(lit.encode("utf-8"), tenant, type_):
                return Analysis(Refuse(
                    INSUFFICIENT_PRIVILEGE,
                    f"the value {lit!r} of the tenant column {self.rules.tenant_column} is not this session's tenant",
                    reason="tenant",
                ), cached=cached)
        # Sessions whose tenant can change (tenant tokens) reference the tenant through the backend
        # GUC in statements that outlive this execution (Parse, SQL PREPARE), and their Bind and
        # COPY checks read the tenant current at that time, so a prepared statement follows a
        # tenant switch.  The proxy alone sets tenantgate.tenant_id, always to the session's tenant.
        source = ctx.tenant_source
        dynamic = source is not None and tenant is not None
        per_session = dynamic and bool(tpl.param_checks or tpl.copy_in is not None)
        done_key = (tenant, True) if dynamic else tenant
        if literals is None and not per_session:
            done = tpl.done.get(done_key)
            if done is not None:
                return done if cached else Analysis(done.decision, done.effects, cached=False)
        if literals is not None and not tpl.param_checks and not tpl.setting_params and tpl.copy_in is None:
            # a normalised hit (a cache hit: new numbers in a known statement), the hot path of
            # pgbench -S and most applications: the tenant-filled segments and the decision's
            # other fields are kept per template and tenant, only the text is new
            lit = (self._tenant_cache.get(tenant) or self.literal(tenant)) if tenant is not None else ""
            if dynamic and origin == Origin.PARSE:
                lit = tenant_guc_reference(type_)
            plan = tpl.done.get(("#", lit))
            if plan is None:
                if len(tpl.done) >= 64:
                    tpl.done.clear()
                base, slots = render_plan(tpl.norm_parts, lit)
                proto = Forward("", statement_class=tpl.statement_class, pins_session=tpl.pins_session,
                                changes_settings=tpl.changes_settings, resets_settings=tpl.resets_settings)
                plan = tpl.done[("#", lit)] = (base, slots, proto, _effects(tpl))
            if not dynamic and not tpl.requires_prepared and not tpl.required_literals and tpl.refusal is None:
                tpl.done[_HOT] = (tenant, *plan)  # (tenant None: a statement without tenant tables)
            buf = plan[0].copy()
            for i, k in plan[1]:
                buf[i] = literals[k]
            return Analysis(_with_sql(plan[2], "".join(buf)), plan[3], True)
        effects = _effects(tpl)
        lit = self.literal(tenant) if tenant is not None else ""
        if dynamic and origin == Origin.PARSE:
            lit = tenant_guc_reference(type_)
        if literals is not None:  # with parameter or COPY checks (made per execution below)
            base, slots = render_plan(tpl.norm_parts, lit)
            for i, k in slots:
                base[i] = literals[k]
            out = "".join(base)
        elif len(tpl.parts) == 1:
            out = tpl.parts[0]
        elif dynamic and tpl.lasting and origin != Origin.PARSE:
            ref = tenant_guc_reference(type_)
            out = "".join(
                seg if k == 0 else (ref if tpl.lasting[k - 1] else lit) + seg for k, seg in enumerate(tpl.parts)
            )
        else:
            out = lit.join(tpl.parts)
        param_checks = ()
        if tpl.param_checks:
            if tenant is None:
                return Analysis(Refuse(INSUFFICIENT_PRIVILEGE, "no tenant is selected for this session", reason="tenant"),
                                cached=cached)
            checked = source if dynamic else tenant
            param_checks = tuple(
                (i, TenantParamCheck(i, checked, type_, self.rules.tenant_column)) for i in tpl.param_checks
            )
        if tpl.setting_params:
            param_checks += tuple((i, SettingNameCheck(i)) for i in tpl.setting_params)
        copy_factory = None
        if tpl.copy_in is not None:
            spec = tpl.copy_in
            if dynamic:
                copy_factory = lambda: copy_in_check(spec, source(), type_)  # noqa: E731
            else:
                copy_factory = lambda: copy_in_check(spec, tenant, type_)  # noqa: E731
        result = Analysis(
            Forward(out, param_checks=param_checks, copy_in_check=copy_factory, statement_class=tpl.statement_class,
                    pins_session=tpl.pins_session, changes_settings=tpl.changes_settings,
                    resets_settings=tpl.resets_settings),
            effects,
            cached=True,
        )
        if literals is None and not per_session:
            if len(tpl.done) >= 64:
                tpl.done.clear()
            tpl.done[done_key] = result
        return result if cached else Analysis(result.decision, effects, cached=False)
