"""The :class:`proxy.seam.SessionGate` of tenant sessions.

Who the tenant is:

1. credential-bound — the user record's ``tenant`` (fixed for the session);
2. signed tenant token — for users with ``token_tenants``: ``SET tenantgate.tenant = '<token>'``
   (session), ``SET LOCAL tenantgate.tenant = '<token>'`` (until the transaction ends), or the
   startup option ``-c tenantgate.tenant=<token>``.  The token is an HS256 JWT with claims
   ``tenant`` and ``exp`` (see :func:`make_token`); forged, expired or malformed tokens are
   refused with 28000.  A successful token SET is forwarded as ``SET [LOCAL]
   tenantgate.tenant_id = '<tenant>'`` so the backend's RLS backstop follows the proxy.

A ``read_only`` session (operator read grants, offboarded tenants) refuses writes with 25006
and the caller's message.  When a token switches the tenant, the ``tenant_status`` hook (the
gatekeeper's lifecycle lookup) gives the new tenant's ``(read_only, read_only_message)`` or
raises :class:`PolicyRefusal` (28000, e.g. a purged tenant: the SET is refused and nothing
changes); a SET LOCAL's status ends with its transaction.

Public API (stable)::

    gate = open_tenant_session(engine, user, startup, token_key=None, read_only=False,
                               read_only_message=None, tenant_status=None)  # raises SessionRefused
    gate = TenantSessionGate(engine, tenant="acme", token_key=None, allow_tokens=False, ...)
    token = make_token("acme", key, ttl_s=3600)
    tenant = verify_token(token, key)                             # raises PolicyRefusal 28000
"""

from __future__ import annotations

import dataclasses
import functools

import logging
import time
from typing import Any, Callable, Sequence

import jwt

from proxy.policy.utility_statements import SAFE_PARAMETERS
from proxy.policy.context import DEFAULT_READ_ONLY_MESSAGE, PolicyContext
from proxy.policy.engine import PolicyEngine
from proxy.policy.errors import FEATURE_NOT_SUPPORTED, INSUFFICIENT_PRIVILEGE, INVALID_AUTHORIZATION, PolicyRefusal
from proxy.policy.names import TENANT_GUC
from proxy.policy.tenantvalue import tenant_literal, validate_tenant
from proxy.seam import Decision, Forward, Origin, Outcome, Refuse, SessionKind, SessionRefused, StartupInfo, UserRecord

log = logging.getLogger(__name__)

_NONE_PREPARED: frozenset[str] = frozenset()
#: protocol statement names a session notes (policy/session.py protocol_statement); past that, a
#: marker that no name can equal (names hold no NUL) refuses every SQL PREPARE
_MAX_PROTOCOL_NAMES = 4096
_PROTOCOL_NAMES_FULL = "\0full"
_NO_CLASSES: dict[str, str] = {}  # never written: replaced by a dict of its own at the first PREPARE
_WRITABLE = (False, DEFAULT_READ_ONLY_MESSAGE)  # the status of most sessions, shared


@functools.lru_cache(maxsize=4096)
def _setup_sql(tenant: str | None) -> tuple[str, ...]:
    """The statements that give a session's first backend connection its tenant (one tuple per tenant)."""
    lit = tenant_literal(tenant) if tenant is not None else "''"
    return (f"SET {TENANT_GUC} = {lit}",)

TOKEN_OPTION = "tenantgate.tenant"


def make_token(tenant: str, key: str, ttl_s: float = 3600) -> str:
    """A signed tenant token (HS256 JWT with ``tenant`` and ``exp``)."""
    return jwt.encode({"tenant": tenant, "exp": int(time.time() + ttl_s)}, key, algorithm="HS256")


def verify_token(token: str, key: str | None) -> str:
    if not key:
        raise PolicyRefusal(INVALID_AUTHORIZATION, "tenant tokens are not configured on this proxy")
    try:
        claims = jwt.decode(token, key, algorithms=["HS256"], options={"require": ["exp", "tenant"]})
    except jwt.ExpiredSignatureError:
        raise PolicyRefusal(INVALID_AUTHORIZATION, "tenant token has expired") from None
    except jwt.InvalidTokenError as e:
        raise PolicyRefusal(INVALID_AUTHORIZATION, f"invalid tenant token ({type(e).__name__})") from None
    tenant = claims.get("tenant")
    if not isinstance(tenant, str) or not tenant:
        raise PolicyRefusal(INVALID_AUTHORIZATION, "invalid tenant token (no tenant claim)")
    return tenant


#: the class an EXECUTE of several prepared statements takes: the strongest
_CLASS_ORDER = ("ddl", "write", "read", "tcl", "set")


class TenantSessionGate:
    kind = SessionKind.TENANT
    audited = False
    #: set by the proxy when the session uses transaction pooling: then a RESET ALL / DISCARD ALL
    #: is followed by the settings read-back that puts the tenant GUC back (proxy.policy.resets)
    pooled = False

    def __init__(
        self,
        engine: PolicyEngine,
        tenant: str | None,
        *,
        token_key: str | None = None,
        allow_tokens: bool = False,
        read_only: bool = False,
        read_only_message: str | None = None,
        tenant_status: Callable[[str], tuple[bool, str | None]] | None = None,
    ):
        self.engine = engine
        # asked when a tenant token chooses the tenant (a bound session's tenant was checked at
        # connect, by open_tenant_session: its gate keeps no hook)
        self._tenant_status = tenant_status if allow_tokens else None
        type_ = engine.rules.tenant_column_type
        self._type = type_
        self._bound = tenant is not None and not allow_tokens
        self._tenant = validate_tenant(tenant, type_) if tenant is not None else None
        self._local_tenant: str | None = None
        self._token_key = token_key
        self._allow_tokens = allow_tokens
        # (read_only, message) of the session tenant, and of a SET LOCAL tenant while it lasts
        self._status: tuple[bool, str] = (
            _WRITABLE if not read_only and read_only_message is None
            else (read_only, read_only_message or DEFAULT_READ_ONLY_MESSAGE))
        self._local_status: tuple[bool, str] | None = None
        # SQL PREPAREd names and their statements' classes; shared empty ones until the first
        # PREPARE (most sessions never use one: an idle session stays small)
        self._prepared: set[str] | frozenset[str] = _NONE_PREPARED
        self._prepared_class: dict[str, str] = _NO_CLASSES
        # names of protocol-level (Parse) statements PostgreSQL holds in this session's namespace
        # (session mode; pooled sessions' are renamed tg_...): SQL PREPARE and EXECUTE share it
        self._protocol_names: set[str] | frozenset[str] = _NONE_PREPARED
        self._tx_status = b"I"
        self._ctx: PolicyContext | None = None
        self._terminate: Callable[[str, str], None] | None = None
        # Called with (sql, refusal) for every refused statement (e.g. the audit chain's auditor).
        self.refusal_hook: Callable[[str, Refuse], None] | None = None
        # Incremented whenever the effective tenant changes (informational: in token sessions
        # Parse'd statements reference the backend GUC and follow the switch by themselves).
        self.tenant_epoch = 0
        self._epoch_tenant = self.tenant
        self.backend_setup_sql: Sequence[str] = _setup_sql(self._tenant)
        # Set by the proxy when the PostgreSQL backstop is configured (proxy/backstop.py):
        # (tenant, mode, local) -> the SQL expression binding the current backend connection, or
        # None when the proxy rebinds by itself (a session-level switch under transaction pooling).
        self.backstop_bind: Callable[[str | None, str, bool], str | None] | None = None
        # Set by the gatekeeper for a self-service export session (proxy/control/self_export.py):
        # answers the export's own statements first (None: not one of them, the policy decides),
        # and records the export's end when the session closes.
        self.interceptor: Callable[[str, Origin], Decision | None] | None = None
        self.close_hook: Callable[[], Any] | None = None

    #: settings a transaction-pooled session carries from one backend connection to the next
    #: (the SET-able parameters minus the per-transaction ones; the tenant GUC comes from
    #: backend_settings())
    tracked_parameters: tuple[str, ...] = tuple(sorted(
        p for p in SAFE_PARAMETERS if not p.startswith("transaction_")))

    def backstop_binding(self) -> tuple[str | None, str]:
        """(tenant, mode) the backend connection must be bound to at the PostgreSQL backstop
        (proxy/backstop.py): ``write``, ``read`` for read-only sessions, ``none`` without a tenant."""
        tenant = self.tenant
        if tenant is None:
            return None, "none"
        return tenant, "read" if self.read_only else "write"

    def backend_settings(self) -> dict[str, str]:
        """Proxy-controlled settings the backend connection must have for this session's next
        transaction (transaction pooling applies them when they differ)."""
        return {TENANT_GUC: self._tenant or ""}

    # ---- state -------------------------------------------------------------------------
    @property
    def tenant(self) -> str | None:
        return self._local_tenant if self._local_tenant is not None else self._tenant

    @property
    def read_only(self) -> bool:
        return (self._local_status or self._status)[0]

    @property
    def read_only_message(self) -> str:
        return (self._local_status or self._status)[1]

    @property
    def context(self) -> PolicyContext:
        ctx = self._ctx
        if ctx is None:
            ctx = self._ctx = PolicyContext(
                tenant=self.tenant,
                read_only=self.read_only,
                read_only_message=self.read_only_message,
                prepared_names=frozenset(self._prepared),
                # only with a session-level tenant: the backend GUC then never falls back to ''
                # (a statement parsed under a SET LOCAL alone keeps its literal; RLS fails it closed)
                tenant_source=self._current_tenant if self._allow_tokens and self._tenant is not None else None,
            )
        return ctx

    def _current_tenant(self) -> str | None:
        return self.tenant

    def _changed(self) -> None:
        tenant = self.tenant
        if tenant != self._epoch_tenant:
            self._epoch_tenant = tenant
            self.tenant_epoch += 1
        self._ctx = None

    # ---- SessionGate ----------------------------------------------------------------------
    def warm_up(self, sql: str, origin: Origin):
        """(compute, adopt) for analysing a long statement off the event loop (PolicyEngine.warm_up)."""
        return self.engine.warm_up(sql, origin)

    def pin_tenant(self) -> None:
        """Keep the session's tenant for its whole life: a later tenant token is refused."""
        self._allow_tokens = False
        self._pinned = True
        self._changed()

    def check(self, sql: str, origin: Origin) -> Decision:
        if self.interceptor is not None:
            answer = self.interceptor(sql, origin)
            if answer is not None:
                return answer
        analysis = self.engine.analyze(sql, self.context, origin)
        decision = analysis.decision
        if isinstance(decision, Refuse):
            return decision
        if decision.resets_settings and self._allow_tokens and not self.pooled:
            # in session mode nothing would put the tenant GUC back that this session's prepared
            # statements read (tenant tokens): refuse rather than run them against no tenant
            return Refuse(FEATURE_NOT_SUPPORTED,
                          "RESET ALL / DISCARD ALL are not supported in a session-mode tenant-token session",
                          hint="RESET the parameters you changed one by one, or use pool mode transaction")
        eff = analysis.effects
        if eff.tenant_token is not None:
            return self._set_token(*eff.tenant_token)
        names = self._protocol_names
        if eff.prepared and names and (_PROTOCOL_NAMES_FULL in names or any(n in names for n in eff.prepared)):
            # the protocol statement may still exist (a Close or DEALLOCATE of it may have failed or
            # been skipped): PostgreSQL would then refuse the PREPARE (42P05), and recording it would
            # let EXECUTE run the protocol statement with values no Bind check saw
            name = eff.prepared[0]
            return Refuse("42P05", f'prepared statement "{name}" already exists, or was a protocol-level '
                                   "prepared statement in this session",
                          hint="give SQL PREPARE a name no Parse message of this session used")
        if eff.prepared or eff.deallocated or eff.deallocate_all:
            if self._prepared is _NONE_PREPARED:
                self._prepared, self._prepared_class = set(), {}
            if eff.deallocate_all:
                self._prepared.clear()
            self._prepared.difference_update(eff.deallocated)
            self._prepared.update(eff.prepared)
            self._changed()
            self._prepared_class.update((n, decision.statement_class) for n in eff.prepared)
        if eff.executed and decision.statement_class == "other":
            # EXECUTE runs a PREPAREd statement: audit and read-only checks see that statement's class
            classes = {self._prepared_class.get(n, "other") for n in eff.executed}
            cls = next((c for c in _CLASS_ORDER if c in classes), "other")
            if cls != "other":
                decision = dataclasses.replace(decision, statement_class=cls)
        return decision

    def protocol_statement(self, name: str, exists: bool) -> None:
        """The relay sent a Parse (``exists``) or a Close of the protocol-level statement ``name``
        as PostgreSQL names it.  Either way an SQL PREPAREd statement of that name may be gone or
        replaced, so EXECUTE of the name is refused from now on.  The name stays noted after a
        Close: the message may fail or be skipped (an error earlier in the pipeline), and the
        gate learns statements when they are sent, not when PostgreSQL carries them out."""
        if self._prepared and name in self._prepared:
            self._prepared.discard(name)
            self._changed()
        if self._protocol_names is _NONE_PREPARED:
            self._protocol_names = set()
        if len(self._protocol_names) < _MAX_PROTOCOL_NAMES:
            self._protocol_names.add(name)
        else:  # bounded memory: from here on, no SQL PREPARE in this session
            self._protocol_names.add(_PROTOCOL_NAMES_FULL)

    def _set_token(self, token: str, local: bool) -> Decision:
        if not self._allow_tokens:
            return Refuse(
                INSUFFICIENT_PRIVILEGE,
                "this session keeps the tenant it was opened with (an export session)"
                if getattr(self, "_pinned", False) else
                "this user is bound to one tenant; tenant tokens are not enabled for it",
            )
        try:
            tenant = validate_tenant(verify_token(token, self._token_key), self._type)
            status = self._status_of(tenant)
        except PolicyRefusal as e:
            return e.to_refuse()
        except Exception:  # a broken status hook fails closed
            log.exception("tenant status lookup failed")
            return Refuse(INVALID_AUTHORIZATION, "could not check the tenant's status; try again")
        if not local and self._tx_status != b"I":
            return Refuse(
                FEATURE_NOT_SUPPORTED,
                "SET tenantgate.tenant inside a transaction block must be SET LOCAL",
            )
        if local:
            if self._tx_status == b"I":
                # like PostgreSQL: SET LOCAL outside a transaction has no lasting effect
                return Forward(f"SET LOCAL {TENANT_GUC} = {tenant_literal(tenant)}", statement_class="set",
                               single_use=True)
            self._local_tenant = tenant
            self._local_status = status
        else:
            self._tenant = tenant
            self._local_tenant = None
            self._local_status = None
            self._status = status
        self._changed()
        bind = self.backstop_bind
        call = bind(*self.backstop_binding(), local) if bind is not None else None
        if call is not None:  # the switch binds the backend connection at the backstop too
            return Forward(_bind_block(call, tenant, local), statement_class="set", single_use=True)
        kw = "SET LOCAL" if local else "SET"
        return Forward(f"{kw} {TENANT_GUC} = {tenant_literal(tenant)}", statement_class="set", single_use=True)

    def _status_of(self, tenant: str) -> tuple[bool, str]:
        """The lifecycle status of a tenant chosen by token; PolicyRefusal if it may not be used."""
        if self._tenant_status is None:
            return self._status
        read_only, message = self._tenant_status(tenant)
        return bool(read_only), message or DEFAULT_READ_ONLY_MESSAGE

    def on_ready_for_query(self, tx_status: bytes) -> None:
        self._tx_status = tx_status
        if tx_status == b"I" and self._local_tenant is not None:
            self._local_tenant = None
            self._local_status = None
            self._changed()

    async def audit_before(self, decision: Forward, params: Sequence[bytes | None] | None) -> Any:
        return None

    async def audit_after(self, handle: Any, outcome: Outcome) -> None:
        return None

    def on_refused(self, sql: str, refusal: Refuse) -> None:
        log.info("tenant %s: refused (%s) %s: %.200s", self.tenant, refusal.sqlstate, refusal.message, sql)
        if self.refusal_hook is not None:
            self.refusal_hook(sql, refusal)

    def set_terminator(self, terminate: Callable[[str, str], None]) -> None:
        self._terminate = terminate

    def terminate(self, sqlstate: str, message: str) -> None:
        """End the session (FATAL to the client) through the proxy's terminator, once it is set."""
        if self._terminate is not None:
            self._terminate(sqlstate, message)

    async def close(self) -> None:
        if self.close_hook is not None:
            await self.close_hook()


def _bind_block(call: str, tenant: str, local: bool) -> str:
    """A DO block that binds the backend connection and sets the tenant GUC (one statement)."""
    lit = "E'" + tenant.replace("\\", "\\\\").replace("'", "\\'") + "'"
    body = (f"BEGIN PERFORM {call}; PERFORM pg_catalog.set_config('{TENANT_GUC}', {lit}, "
            f"{'true' if local else 'false'}); END")
    n = 0
    while f"$tg{n}$" in body:
        n += 1
    return f"DO $tg{n}${body}$tg{n}$"


def open_tenant_session(
    engine: PolicyEngine,
    user: UserRecord,
    startup: StartupInfo,
    *,
    token_key: str | None = None,
    read_only: bool = False,
    read_only_message: str | None = None,
    tenant_status: Callable[[str], tuple[bool, str | None]] | None = None,
) -> TenantSessionGate:
    """Open the gate for an application user; a bad startup token is a FATAL 28000.

    ``tenant_status(tenant) -> (read_only, message)`` (raising PolicyRefusal when the tenant may
    not be used) applies to the tenant known at connect and to every tenant chosen later.
    """
    tenant = user.tenant
    token = startup.options.get(TOKEN_OPTION)
    if token is not None:
        if not user.token_tenants:
            raise SessionRefused(INVALID_AUTHORIZATION, "tenant tokens are not enabled for this user")
        try:
            tenant = verify_token(token, token_key)
        except PolicyRefusal as e:
            raise SessionRefused(e.sqlstate, e.message) from None
    if tenant is None and not user.token_tenants:
        raise SessionRefused(INVALID_AUTHORIZATION, f'user "{user.name}" is bound to no tenant')
    try:
        if tenant is not None and tenant_status is not None:
            status_ro, status_message = tenant_status(tenant)
            read_only = read_only or status_ro
            read_only_message = read_only_message or status_message
        return TenantSessionGate(
            engine, tenant, token_key=token_key, allow_tokens=user.token_tenants,
            read_only=read_only, read_only_message=read_only_message, tenant_status=tenant_status,
        )
    except PolicyRefusal as e:
        raise SessionRefused(e.sqlstate, e.message) from None
