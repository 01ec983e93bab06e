"""Throttling and auditing of operator authentication at the proxy.

The proxy's session code calls, around its SCRAM exchange (the gatekeeper
exposes one :class:`AuthGuard` as ``gatekeeper.auth_guard``)::

    await guard.before(user_name, record, client_addr)   # SessionRefused(28000) when locked
    ... SCRAM ...
    await guard.failed(user_name, record, client_addr)   # wrong password: audited

Operators (and names nobody has: those count per client address only) are
throttled through :mod:`proxy.control.throttle`: the attempt is counted
before the password is checked and given back by
:func:`proxy.control.operator_gate.open_operator_session` once the session is
bound (password and TOTP proven).  Application users from the config are
not throttled here (their own connection pools would lock themselves out).
"""

from __future__ import annotations

import logging

from proxy.seam import SessionKind, SessionRefused

from . import audit as A
from . import throttle as TH

log = logging.getLogger("tenantgate.auth")


class AuthGuard:
    def __init__(self, plane):
        self.plane = plane

    @staticmethod
    def _account(name: str, record) -> str | None | bool:
        """The account key to throttle: the name for operators, None for unknown names, False: skip."""
        if record is None:
            return None
        return name if record.kind is SessionKind.OPERATOR else False

    async def before(self, name: str, record, client_addr: str | None) -> None:
        account = self._account(name, record)
        if account is False:
            return
        try:
            await self.plane.auth_attempt(account, client_addr)
        except TH.Locked as e:
            await self.plane._audit_quietly(A.AuditRecord(
                A.AUTH_FAILED, operator=name, client_addr=client_addr, detail={"why": "locked", "via": "proxy"}))
            raise SessionRefused(TH.LOCKED_SQLSTATE, e.message())
        except Exception as e:  # fail closed: no throttle state, no operator login
            log.error("authentication throttle unavailable: %s", e)
            raise SessionRefused("58000", "tenantgate cannot check its authentication throttle; try again later")

    async def failed(self, name: str, record, client_addr: str | None, why: str = "password") -> None:
        if self._account(name, record) is False:
            return
        await self.plane._audit_quietly(A.AuditRecord(
            A.AUTH_FAILED, operator=name, client_addr=client_addr,
            detail={"why": why if record is not None else "unknown user", "via": "proxy"}))
