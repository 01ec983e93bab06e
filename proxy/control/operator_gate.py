"""The SessionGate of operator sessions: tenant rewriting + grant binding + audit before action.

Wiring (for the proxy's Gatekeeper, when the user is an operator)::

    from proxy.control.operator_gate import open_operator_session
    gate = await open_operator_session(
        plane, user, startup,
        make_inner=lambda grant: TenantSessionGate(..., tenant=grant.tenant, read_only=grant.read_only),
    )

``open_operator_session`` reads the startup options ``tenantgate.grant``
(optional grant id) and ``tenantgate.totp`` (TOTP code, required when the
operator enrolled one) — psql: ``PGOPTIONS='-c tenantgate.grant=7 -c
tenantgate.totp=123456' psql ...`` or ``options=...`` in the conninfo —, binds
the session to the grant (:meth:`ControlPlane.bind_grant`; refusals are
audited as ``connection.refused`` and raised as SessionRefused, SQLSTATE
28000, with a hint on how to request a grant), builds the inner tenant gate
for the grant's tenant and access, audits ``session.opened`` and registers
with the watcher.

:class:`OperatorSessionGate` (``audited = True``):

* ``check`` delegates to the inner gate; a Forward gets ``audit`` =
  :class:`StatementNote` carrying the SQL the client sent.  Under a read grant
  writes/DDL and attempts to switch the transaction to READ WRITE are
  refused with 25006 (the inner gate refuses writes too, and the backend
  runs ``SET default_transaction_read_only = on``).
* ``audit_before`` durably appends the ``statement`` record (original SQL,
  rewritten SQL, bound parameters — redacted when ``audit.redact_params`` —,
  operator, grant, tenant, client address, session id, statement class)
  and returns its seq.  If the write fails it raises
  :class:`~proxy.policy.errors.PolicyRefusal` with SQLSTATE 58000 and the
  proxy must forward nothing.  It also refuses (57P01) once the grant ended.
* ``audit_after`` appends the ``statement.outcome`` record (ok or SQLSTATE,
  command tag, rows, duration) linked by ``ref_seq``.  It queues the record
  and returns at once (``wait_for_outcome=False``, the default): the queue
  is ordered, so the outcome commits before or with the session's next
  statement record, and a single session pays one WAL flush per statement
  instead of two.  ``close()`` waits for queued outcomes.
* ``on_refused`` appends ``statement.refused`` in the background.
* When the grant expires or is revoked (on any instance), the terminator
  given to ``set_terminator`` is called with SQLSTATE **57P01**
  (admin_shutdown, what ``pg_terminate_backend`` sends; clients treat it as
  "the server ended this session") and a message naming the grant and why
  it ended.  The proxy should send that as FATAL, and close the backend
  connection without committing, so an open transaction is rolled back.
  A reconnect is then refused by ``bind_grant`` (28000).
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from proxy import metrics
from proxy.policy.errors import PolicyRefusal
from proxy.seam import Decision, Forward, Origin, Outcome, Refuse, SessionGate, SessionKind, SessionRefused, \
    StartupInfo, UserRecord

from . import audit as A
from proxy.lifecycle.purge import sessions_lock_name

from .model import AUTH_FAILED_SQLSTATE, ActiveGrant
from .plane import ControlPlane

log = logging.getLogger("tenantgate.operator")

GRANT_ENDED_SQLSTATE = "57P01"  # admin_shutdown
AUDIT_UNAVAILABLE_SQLSTATE = "58000"  # system_error: the audit log could not be written
READ_ONLY_SQLSTATE = "25006"
GRANT_OPTION = "tenantgate.grant"
TOTP_OPTION = "tenantgate.totp"

# Ways to leave read-only mode under a read grant (the backend session starts with
# default_transaction_read_only = on): READ WRITE transactions, the GUCs, RESET ALL, DISCARD ALL.
_READ_WRITE_SWITCH = re.compile(
    r"read\s+write|\b(?:set|reset)\b[^;]*transaction_read_only|\breset\s+all\b|\bdiscard\b", re.I)


@dataclass(frozen=True)
class StatementNote:
    """What the operator gate puts in ``Forward.audit``: the client's SQL and the inner gate's own note."""

    original_sql: str
    inner: Any = None


class OperatorSessionGate:
    kind = SessionKind.OPERATOR
    audited = True
    # proxy.seam.BackstopBound: the session sets it, but an operator session never switches tenants
    # (its grant's tenant is bound when the connection opens), so it is never called
    backstop_bind = None

    def __init__(self, plane: ControlPlane, inner: SessionGate, grant: ActiveGrant, startup: StartupInfo, *,
                 hold_session_lock: bool = False,
                 redact_params: bool | None = None, wait_for_outcome: bool = False):
        self.plane = plane
        self.inner = inner
        self.grant = grant
        self.startup = startup
        self.redact_params = plane.audit_cfg.redact_params if redact_params is None else redact_params
        setup = list(inner.backend_setup_sql)
        if grant.read_only or getattr(inner, "read_only", False):
            setup.append("SET default_transaction_read_only = on")
        # Held for the life of the backend connection (the client can neither call advisory-lock
        # functions nor DISCARD): a purge takes the lock exclusively, so it starts only once every
        # operator session of the tenant has gone, and verifies with none left (lifecycle/purge.py).
        # Only where the backend role may take advisory locks (the hardened bootstrap revokes them:
        # then the purge relies on the purge mark, re-read before every statement, and NOTIFY).
        if hold_session_lock:
            setup.append(f"SELECT pg_try_advisory_lock_shared(hashtext({_literal(sessions_lock_name(grant.tenant))}))")
        self.backend_setup_sql: Sequence[str] = tuple(setup)
        self.context = A.AuditRecord(
            type=A.STATEMENT, operator=grant.operator, grant_id=grant.id, tenant=grant.tenant,
            client_addr=startup.client_addr, session_id=startup.session_id)
        self.ended: tuple[str, str] | None = None  # (sqlstate, message) once the grant ended
        self._terminate: Callable[[str, str], None] | None = None
        self._watch = None
        self.wait_for_outcome = wait_for_outcome
        self._tasks: set[asyncio.Task] = set()
        self._outcomes: set[asyncio.Future] = set()
        self._closed = False
        self._tenant_state = None  # (status, purge_started_at) at start; a change ends the session

    def backstop_binding(self) -> tuple[str | None, str]:
        """The PostgreSQL backstop binding: the grant's tenant, read-only under a read grant."""
        tenant, mode = self.inner.backstop_binding()
        return tenant, ("read" if self.grant.read_only and mode == "write" else mode)

    async def start(self) -> None:
        """Audit the session's start and watch the grant.  Raises SessionRefused if the audit fails."""
        try:
            await self.plane.append(replace(self.context, type=A.SESSION_OPENED, detail={
                "access": self.grant.access, "expires_at": self.grant.expires_at.isoformat(),
                "application_name": self.startup.application_name, "database": self.startup.database}))
        except Exception as e:
            raise SessionRefused(AUDIT_UNAVAILABLE_SQLSTATE,
                                 "the tenantgate audit log cannot be written, so operator sessions are refused",
                                 detail=str(e))
        self._watch = await self.plane.watch_grant(self.grant, self._grant_ended)
        self._tenant_state = await self.plane.tenant_state(self.grant.tenant)

    # ---- SessionGate

    def check(self, sql: str, origin: Origin) -> Decision:
        if self.ended is not None:
            return Refuse(self.ended[0], self.ended[1], reason="grant")
        decision = self.inner.check(sql, origin)
        if isinstance(decision, Refuse):
            return _operator_wording(decision, self.grant)
        if (self.grant.read_only or getattr(self.inner, "read_only", False)) and (
                decision.statement_class in ("write", "ddl") or (
                decision.statement_class != "read" and _READ_WRITE_SWITCH.search(sql))):
            return Refuse(READ_ONLY_SQLSTATE, f"grant {self.grant.id} is read-only: this statement is not allowed",
                          hint="Request a write grant: tenantgate grant request --access write ...", reason="read_only")
        return replace(decision, audit=StatementNote(sql, decision.audit))

    def on_ready_for_query(self, tx_status: bytes) -> None:
        self.inner.on_ready_for_query(tx_status)

    def protocol_statement(self, name: str, exists: bool) -> None:
        note = getattr(self.inner, "protocol_statement", None)
        if note is not None:
            note(name, exists)

    def warm_up(self, sql: str, origin: Origin):
        warm = getattr(self.inner, "warm_up", None)
        return warm(sql, origin) if warm is not None else None

    async def audit_before(self, decision: Forward, params: Sequence[bytes | None] | None) -> Any:
        if self.ended is None and self.grant.expires_at <= datetime.now(timezone.utc):
            self._grant_ended(self.grant.id, "expired")
        if self.ended is not None:
            raise PolicyRefusal(self.ended[0], self.ended[1], reason="grant")
        # The tenant's status is read now, after whatever the client waited for: an offboard or
        # a purge committed before this statement ends the session even if its NOTIFY is late.
        try:
            state = await self.plane.tenant_state(self.grant.tenant)
        except Exception as e:
            raise PolicyRefusal(AUDIT_UNAVAILABLE_SQLSTATE, "statement refused: the control schema cannot be read, "
                                "nothing was run", detail=str(e), reason="audit")
        if state != self._tenant_state:
            status = "being purged" if state and state[1] is not None else f"now {state[0] if state else 'gone'}"
            self.terminate(GRANT_ENDED_SQLSTATE, f'terminating connection: tenant "{self.grant.tenant}" is {status}; '
                                                 "this operator session was ended, nothing was run")
            raise PolicyRefusal(self.ended[0], self.ended[1], reason="tenant_status")
        note = decision.audit if isinstance(decision.audit, StatementNote) else None
        rec = replace(
            self.context, type=A.STATEMENT, statement_class=decision.statement_class,
            original_sql=note.original_sql if note else decision.sql, rewritten_sql=decision.sql,
            params=A.encode_params(params, redact=self.redact_params))
        try:
            return await self.plane.append(rec)
        except Exception as e:
            log.error("operator %s: audit write failed, statement refused: %s", self.grant.operator, e)
            raise PolicyRefusal(AUDIT_UNAVAILABLE_SQLSTATE,
                                "statement refused: the audit log could not be written, nothing was run",
                                detail=str(e), reason="audit")

    async def audit_after(self, handle: Any, outcome: Outcome) -> None:
        try:
            fut = self.plane.complete_nowait(handle, outcome, self.context)
        except Exception as e:
            self._outcome_failed(handle, e)
            return
        if self.wait_for_outcome:
            try:
                await fut
            except Exception as e:
                self._outcome_failed(handle, e)
            return
        # Do not hold the client up: the outcome is queued ahead of the session's next
        # statement record, so it is committed before (or with) that statement.
        self._outcomes.add(fut)
        fut.add_done_callback(lambda f, h=handle: self._outcome_done(f, h))

    def _outcome_done(self, fut: asyncio.Future, handle: Any) -> None:
        self._outcomes.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            self._outcome_failed(handle, fut.exception())

    def _outcome_failed(self, handle: Any, e: BaseException) -> None:
        # The statement ran; the next one's audit_before refuses if the log stays unwritable.
        log.error("operator %s: could not append the outcome of audit record %s: %s", self.grant.operator, handle, e)

    def on_refused(self, sql: str, refusal: Refuse) -> None:
        self._background(replace(self.context, type=A.STATEMENT_REFUSED, original_sql=sql,
                                 sqlstate=refusal.sqlstate, detail={"message": refusal.message}))

    def set_terminator(self, terminate: Callable[[str, str], None]) -> None:
        self._terminate = terminate
        if self.ended is not None:
            terminate(*self.ended)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()
        if self.ended is None:
            self._background(replace(self.context, type=A.SESSION_ENDED, detail={"reason": "client disconnected"}))
        pending = [*self._tasks, *self._outcomes]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await self.inner.close()

    def terminate(self, sqlstate: str, message: str) -> None:
        """End the session (FATAL 57P01), e.g. when its tenant's status changes (the gatekeeper calls it)."""
        if self.ended is not None:
            return
        self.ended = (sqlstate, message)
        metrics.OPERATOR_SESSIONS_TERMINATED_TOTAL.labels("tenant_status").inc()
        self._background(replace(self.context, type=A.SESSION_ENDED, detail={"reason": message}))
        if self._terminate is not None:
            try:
                self._terminate(sqlstate, message)
            except Exception:
                log.exception("terminator failed")

    # ---- internals

    def _grant_ended(self, grant_id: int, reason: str) -> None:
        if self.ended is not None:
            return
        message = (f"terminating connection: tenantgate grant {grant_id} for tenant \"{self.grant.tenant}\" "
                   f"{'has expired' if reason == 'expired' else 'was ' + reason}")
        self.ended = (GRANT_ENDED_SQLSTATE, message)
        metrics.OPERATOR_SESSIONS_TERMINATED_TOTAL.labels(reason).inc()
        self._background(replace(self.context, type=A.SESSION_ENDED, detail={"reason": f"grant {reason}"}))
        if self._terminate is not None:
            try:
                self._terminate(GRANT_ENDED_SQLSTATE, message)
            except Exception:
                log.exception("terminator failed")

    def _background(self, record: A.AuditRecord) -> None:
        async def run():
            try:
                await self.plane.append(record)
            except Exception as e:
                log.error("could not audit %s: %s", record.type, e)

        t = asyncio.get_running_loop().create_task(run())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _operator_wording(refusal: Refuse, grant: ActiveGrant) -> Refuse:
    """The policy engine speaks of "a tenant session"; here it is an operator session under a grant."""
    if "tenant session" not in refusal.message:
        return refusal
    where = f'an operator session (grant {grant.id}, {grant.access} access to tenant "{grant.tenant}")'
    msg = refusal.message.replace("in a tenant session", f"in {where}").replace("a tenant session", where)
    return replace(refusal, message=msg)


_GRANT_ID = re.compile(r"[0-9]{1,19}")
MAX_GRANT_ID = 2**63 - 1  # grants.id is a bigint


def _grant_id_option(startup: StartupInfo) -> int | None:
    """``tenantgate.grant`` as a grant number, or SessionRefused 28000 naming the problem.

    Only ASCII digits are accepted (Python's int() would also take "1_0", " +7" or
    Arabic-Indic digits), and the number must fit a bigint: anything else is refused
    here, before it reaches a query.
    """
    raw = startup.options.get(GRANT_OPTION)
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip()
    if not _GRANT_ID.fullmatch(text) or int(text) <= 0 or int(text) > MAX_GRANT_ID:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise SessionRefused("28000", f"invalid {GRANT_OPTION} value {shown!r}: it must be a grant number "
                                      f"between 1 and {MAX_GRANT_ID}, e.g. PGOPTIONS='-c tenantgate.grant=7'")
    return int(text)


async def open_operator_session(
    plane: ControlPlane,
    user: UserRecord,
    startup: StartupInfo,
    make_inner: Callable[[ActiveGrant], SessionGate],
    *,
    redact_params: bool | None = None,
    wait_for_outcome: bool = False,
    hold_session_lock: bool = False,
) -> OperatorSessionGate:
    """Bind the session to a grant and return its gate; raises SessionRefused (audited)."""
    try:
        grant_id = _grant_id_option(startup)
        grant = await plane.bind_grant(user.name, grant_id, startup.options.get(TOTP_OPTION))
    except SessionRefused as e:
        if e.sqlstate == AUTH_FAILED_SQLSTATE:  # wrong or reused TOTP code: the counted attempt stays
            await plane._audit_quietly(A.AuditRecord(
                A.AUTH_FAILED, operator=user.name, client_addr=startup.client_addr,
                session_id=startup.session_id, detail={"why": "totp", "via": "proxy"}))
        else:
            await _give_back(plane, user.name, startup.client_addr)
        await plane._audit_quietly(A.AuditRecord(
            A.CONNECTION_REFUSED, operator=user.name, client_addr=startup.client_addr,
            session_id=startup.session_id, sqlstate=e.sqlstate,
            detail={"message": e.message, "grant_option": startup.options.get(GRANT_OPTION)}))
        raise
    await _give_back(plane, user.name, startup.client_addr)
    gate = OperatorSessionGate(plane, make_inner(grant), grant, startup, hold_session_lock=hold_session_lock,
                               redact_params=redact_params,
                               wait_for_outcome=wait_for_outcome)
    await gate.start()
    return gate


async def _give_back(plane: ControlPlane, name: str, client_addr: str | None) -> None:
    """The person proved who they are: undo the attempt counted by the proxy's AuthGuard."""
    try:
        await plane.auth_succeeded(name, client_addr)
    except Exception as e:  # the session may go on; the count decays with the lockout window
        log.error("could not reset the authentication throttle of %s: %s", name, e)


class RefusalAuditor:
    """For tenant sessions: ``on_refused`` -> a background ``statement.refused`` audit record.

    ``RefusalAuditor(plane, kind="tenant", user=..., tenant=..., startup=startup)(sql, refusal)``
    """

    def __init__(self, plane: ControlPlane, *, user: str, tenant: str | None, startup: StartupInfo,
                 kind: str = "tenant"):
        self.plane = plane
        self.record = A.AuditRecord(type=A.STATEMENT_REFUSED, operator=None, tenant=tenant,
                                    client_addr=startup.client_addr, session_id=startup.session_id,
                                    detail={"session_kind": kind, "user": user})
        self._tasks: set[asyncio.Task] | None = None

    def __call__(self, sql: str, refusal: Refuse) -> None:
        rec = replace(self.record, original_sql=sql, sqlstate=refusal.sqlstate,
                      detail={**(self.record.detail or {}), "message": refusal.message})

        async def run():
            try:
                await self.plane.append(rec)
            except Exception as e:
                log.error("could not audit a refused statement: %s", e)

        t = asyncio.get_running_loop().create_task(run())
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
