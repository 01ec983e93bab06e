"""Operator accounts, proven identities and the operators' user directory: the part of :class:`~proxy.control.plane.ControlPlane`
that knows who is acting.

* :meth:`authenticate_actor` (CLI): password, TOTP used once, throttled per
  account (and address), the same error for either being wrong, failures
  audited (:mod:`proxy.control.throttle`).
* :meth:`auth_attempt` / :meth:`auth_succeeded` (proxy, through
  :mod:`proxy.control.auth_guard`): the same throttle around the SCRAM
  exchange.
* Account methods: bootstrap creation by the platform admin
  (:meth:`add_operator`, only while fewer than two approvers exist), removal
  and disabling (one approver), a person's own password and TOTP.  Everything
  that gives access is a change request: :mod:`proxy.control.accounts`.

Mixed into ControlPlane, which provides ``pool``, ``s``, ``_tx`` and
``_in_tx_audit``.
"""

from __future__ import annotations

import getpass
import logging
from typing import Iterable

from proxy.seam import SessionKind, UserRecord

from . import accounts as AC
from . import audit as A
from . import throttle as TH
from .credentials import check_password, make_verifier, new_totp_secret, totp_uri
from .grant_policy import GrantPolicy, read_policy
from .model import (
    PLATFORM_ADMIN,
    ROLES,
    Actor,
    AuthenticationFailed,
    InvalidRequest,
    NotFound,
    Operator,
    PermissionDenied,
    _dummy_verifier,
    _operator,
)

log = logging.getLogger("tenantgate.control")


class OperatorMethods:

    def platform_admin(self) -> Actor:
        """The holder of the control DSN (bootstrap and account management).  Audited with the OS user."""
        return Actor(f"{PLATFORM_ADMIN}:{getpass.getuser()}", frozenset({"approver"}), platform_admin=True)

    async def _op_row(self, conn, name: str):
        return await conn.fetchrow(f"SELECT * FROM {self.s}.operators WHERE name = $1", name)

    async def get_operator(self, name: str) -> Operator | None:
        async with self.pool.acquire() as conn:
            row = await self._op_row(conn, name)
        return _operator(row) if row else None

    async def list_operators(self) -> list[Operator]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(f"SELECT * FROM {self.s}.operators ORDER BY name")
        return [_operator(r) for r in rows]

    async def has_approver(self) -> bool:
        async with self.pool.acquire() as conn:
            return await conn.fetchval(
                f"SELECT EXISTS (SELECT 1 FROM {self.s}.operators WHERE enabled AND 'approver' = ANY (roles))"
            )

    def _require_account_admin(self, actor: Actor) -> None:
        if not (actor.platform_admin or actor.is_approver):
            raise PermissionDenied(f"{actor.name} may not manage operator accounts (needs the approver role)")

    async def add_operator(self, actor: Actor, name: str, password: str, roles: Iterable[str] = ("operator",)) -> Operator:
        """Bootstrap only: the platform admin adds an account while fewer than two approvers exist.

        Afterwards accounts are created by a change request that another approver approves
        (:func:`proxy.control.accounts.request_change`, ``account.create``)."""
        roles = sorted(set(roles))
        bad = [r for r in roles if r not in ROLES]
        if bad or not roles:
            raise InvalidRequest(f"invalid role(s) {bad or roles}: roles are {', '.join(ROLES)}")
        if not actor.platform_admin:
            raise PermissionDenied(
                f"accounts are created through a change request that another approver approves: "
                f"tenantgate operator add {name} --as {actor.name} (then: tenantgate operator approve ID --as OTHER)")
        return _operator(await AC.bootstrap_add(self, actor, name, password, roles))

    async def remove_operator(self, actor: Actor, name: str) -> None:
        """Delete the account and revoke its pending and approved grants."""
        self._require_account_admin(actor)
        async with self._tx() as conn:
            deleted = await conn.fetchval(f"DELETE FROM {self.s}.operators WHERE name = $1 RETURNING name", name)
            if deleted is None:
                raise NotFound(f"operator {name!r} does not exist")
            revoked = await conn.fetch(
                f"UPDATE {self.s}.grants SET state = 'revoked', ended_at = now(), ended_by = $2, "
                f"end_reason = 'operator account removed' "
                f"WHERE requester = $1 AND state IN ('pending', 'approved') RETURNING id, tenant", name, actor.name,
            )
            recs = [A.AuditRecord(A.OPERATOR_REMOVED, operator=actor.name, detail={"account": name})]
            recs += [A.AuditRecord(A.GRANT_REVOKED, operator=actor.name, grant_id=r["id"], tenant=r["tenant"],
                                   detail={"reason": "operator account removed"}) for r in revoked]
            await self._in_tx_audit(conn, recs)

    def _own_account_only(self, actor: Actor, name: str, what: str) -> None:
        if actor.name != name or actor.platform_admin:
            raise PermissionDenied(
                f"nobody sets another person's {what}: request a reset (tenantgate operator reset {name} "
                f"--as APPROVER), which another approver approves; {name} then enrols with the one-time token")

    async def set_password(self, actor: Actor, name: str, password: str) -> None:
        """A person changes their own password (proven by the old one)."""
        self._own_account_only(actor, name, "password")
        async with self._tx() as conn:
            n = await conn.execute(
                f"UPDATE {self.s}.operators SET scram_verifier = $2, updated_at = now() WHERE name = $1",
                name, make_verifier(password),
            )
            if n.endswith(" 0"):
                raise NotFound(f"operator {name!r} does not exist")
            await self._in_tx_audit(conn, [A.AuditRecord(A.OPERATOR_CHANGED, operator=actor.name,
                                                         detail={"account": name, "change": "password"})])

    async def enrol_totp(self, actor: Actor, name: str) -> tuple[str, str]:
        """A person enrols (or replaces) their own TOTP secret; returns (secret, otpauth:// URI)."""
        self._own_account_only(actor, name, "TOTP secret")
        secret = new_totp_secret()
        async with self._tx() as conn:
            n = await conn.execute(
                f"UPDATE {self.s}.operators SET totp_secret = $2, totp_last_step = NULL, updated_at = now() "
                f"WHERE name = $1", name, secret
            )
            if n.endswith(" 0"):
                raise NotFound(f"operator {name!r} does not exist")
            await self._in_tx_audit(conn, [A.AuditRecord(A.OPERATOR_CHANGED, operator=actor.name,
                                                         detail={"account": name, "change": "totp enrolled"})])
        return secret, totp_uri(secret, name)

    async def set_enabled(self, actor: Actor, name: str, enabled: bool) -> None:
        """Disabling takes access away (one approver); enabling gives it back: a change request
        (``account.enable``) unless in bootstrap by the platform admin."""
        self._require_account_admin(actor)
        async with self._tx() as conn:
            if enabled and not (actor.platform_admin and await AC.in_bootstrap(conn, self.s)):
                raise PermissionDenied(f"enabling an account is a change request another approver approves: "
                                       f"tenantgate operator enable {name} --as {actor.name}")
            n = await conn.execute(
                f"UPDATE {self.s}.operators SET enabled = $2, updated_at = now() WHERE name = $1", name, enabled)
            if n.endswith(" 0"):
                raise NotFound(f"operator {name!r} does not exist")
            await self._in_tx_audit(conn, [A.AuditRecord(
                A.OPERATOR_CHANGED, operator=actor.name,
                detail={"account": name, "change": "enabled" if enabled else "disabled"})])

    async def verify_password(self, name: str, password: str) -> bool:
        async with self.pool.acquire() as conn:
            row = await self._op_row(conn, name)
        return bool(row and row["enabled"] and check_password(row["scram_verifier"], password))

    async def verify_totp(self, name: str, code: str | None) -> bool:
        """True when the account has no TOTP enrolled or ``code`` is valid and not used before (consumes it)."""
        async with self.pool.acquire() as conn:
            row = await self._op_row(conn, name)
            if row is None:
                return False
            return row["totp_secret"] is None or await TH.consume_totp(conn, self.s, name, row["totp_secret"], code)

    async def policy(self) -> GrantPolicy:
        async with self.pool.acquire() as conn:
            return await read_policy(conn, self.s)

    async def auth_attempt(self, name: str | None, client_addr: str | None) -> None:
        """Count an authentication attempt before checking it; raises :class:`throttle.Locked`."""
        keys = TH.keys_for(name, client_addr)
        if not keys:
            return
        async with self.pool.acquire() as conn:
            await TH.begin_attempt(conn, self.s, await read_policy(conn, self.s), keys)

    async def auth_succeeded(self, name: str | None, client_addr: str | None) -> None:
        """Give back the attempt counted by :meth:`auth_attempt` (the person proved who they are)."""
        keys = TH.keys_for(name, client_addr)
        if keys:
            async with self.pool.acquire() as conn:
                await TH.attempt_succeeded(conn, self.s, keys)

    async def authenticate_actor(self, name: str, password: str, totp_code: str | None = None,
                                 client_addr: str | None = None) -> Actor:
        """Prove who is acting: password, plus a TOTP code when enrolled (each code works once).

        Throttled per account (and per address when given); a wrong password and a wrong or
        reused TOTP code give the same error; every failure is audited.  Raises AuthenticationFailed.
        """
        failed = AuthenticationFailed(
            f"authentication failed for {name!r}: wrong password or TOTP code "
            "(with TOTP enrolled, give a current code with --totp CODE; each code works once)")
        try:
            await self.auth_attempt(name, client_addr)
        except TH.Locked as e:
            await self._audit_quietly(A.AuditRecord(A.AUTH_FAILED, operator=name, client_addr=client_addr,
                                                    detail={"why": "locked", "via": "cli"}))
            raise AuthenticationFailed(e.message())
        async with self.pool.acquire() as conn:
            row = await self._op_row(conn, name)
            verifier = row["scram_verifier"] if row is not None else _dummy_verifier()  # same work for unknown names
            why = None
            if not check_password(verifier, password or "") or row is None or not row["enabled"]:
                why = "password"
            elif row["totp_secret"] is not None and not await TH.consume_totp(
                    conn, self.s, name, row["totp_secret"], totp_code):
                why = "totp"
        if why is not None:
            await self._audit_quietly(A.AuditRecord(A.AUTH_FAILED, operator=name, client_addr=client_addr,
                                                    detail={"why": why, "via": "cli"}))
            raise failed
        await self.auth_succeeded(name, client_addr)
        return Actor(name, frozenset(row["roles"]))

    async def _audit_quietly(self, record: A.AuditRecord) -> None:
        try:
            await self.append(record)
        except Exception as e:  # the refusal stands either way
            log.error("could not audit %s: %s", record.type, e)

    async def user_record(self, name: str) -> UserRecord | None:
        """The operator as a :class:`proxy.seam.UserRecord` (for the proxy's SCRAM exchange)."""
        async with self.pool.acquire() as conn:
            row = await self._op_row(conn, name)
        if row is None or not row["enabled"]:
            return None
        return UserRecord(name=row["name"], scram_verifier=row["scram_verifier"], kind=SessionKind.OPERATOR,
                          totp_secret=row["totp_secret"], roles=frozenset(row["roles"]))


class OperatorDirectory:
    """:class:`proxy.seam.UserDirectory` over the control schema's operator accounts."""

    def __init__(self, plane: OperatorMethods):
        self.plane = plane

    async def lookup(self, name: str) -> UserRecord | None:
        return await self.plane.user_record(name)
