"""Two people for every path to access: account and policy changes as change requests.

An approver cannot give themselves a second identity.  Everything that could
create access goes through a *change request* that a different approver
approves:

* ``account.create`` (name, roles), ``account.roles`` (new roles),
  ``account.reset`` (the password and TOTP are wiped; the person enrols again)
  and ``account.enable``; ``policy.set`` (the grant policy,
  :mod:`proxy.control.grant_policy`).
* Changes that only take access away stay single-person: ``operator remove``,
  ``operator disable``, ``operator unlock`` (an approver), and a person's own
  password and TOTP (``operator passwd``, ``operator enrol-totp`` on oneself).

Nobody sees another person's secrets.  Approving ``account.create`` or
``account.reset`` returns a one-time enrolment token (stored as a SHA-256
hash, valid for the policy's ``pending_ttl``), which the approver hands to the
person; they run ``tenantgate operator enrol --token TOKEN``, choose their own
password and receive their own TOTP secret.  Until then the account has a
random password nobody knows.

Every change records who was involved (the requester and the approver) and
who received the enrolment token in ``account_events``.  Within
``grant_policy.account_change_window_s`` an approval, of a grant or of a
change request, is refused when the approver's account was created or
changed by or at the request of the requester, or when the approver received
the enrolment token of the requester's account: so the two people of the
rule are never one person behind two accounts.

Bootstrap: while fewer than two enabled approvers exist, the platform admin
(the holder of the control DSN, i.e. the database owner) adds accounts with a
password directly and may set the policy; this is audited as
``account.bootstrap``.  After that, the platform admin is refused.

Every step is an audit record in the same transaction as the change.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg

from . import audit as A
from .credentials import make_verifier, new_totp_secret, totp_uri
from .grant_policy import GrantPolicy, PolicyError, parse_settings, read_policy, write_policy

from .model import ROLES, Actor, AuthenticationFailed, InvalidRequest, NotFound, PermissionDenied

if TYPE_CHECKING:
    from .plane import ControlPlane

BOOTSTRAP_APPROVERS = 2
KINDS = ("account.create", "account.roles", "account.reset", "account.enable", "policy.set")

CHANGE_REQUESTED = "change.requested"
CHANGE_APPROVED = "change.approved"
CHANGE_DENIED = "change.denied"
ACCOUNT_BOOTSTRAP = "account.bootstrap"
ACCOUNT_ENROLLED = "account.enrolled"
ACCOUNT_UNLOCKED = "account.unlocked"
POLICY_CHANGED = "grant_policy.changed"


@dataclass(frozen=True)
class ChangeRequest:
    id: int
    kind: str
    account: str | None
    payload: dict
    requested_by: str
    reason: str | None
    state: str
    created_at: datetime
    pending_until: datetime
    decided_by: str | None
    decided_at: datetime | None

    def to_json(self) -> dict:
        iso = lambda d: d.isoformat() if d else None  # noqa: E731
        return {"id": self.id, "kind": self.kind, "account": self.account, "payload": self.payload,
                "requested_by": self.requested_by, "reason": self.reason, "state": self.state,
                "created_at": iso(self.created_at), "pending_until": iso(self.pending_until),
                "decided_by": self.decided_by, "decided_at": iso(self.decided_at)}


def _request(row) -> ChangeRequest:
    payload = row["payload"]
    if isinstance(payload, str):
        payload = json.loads(payload)
    return ChangeRequest(row["id"], row["kind"], row["account"], payload, row["requested_by"], row["reason"],
                         row["state"], row["created_at"], row["pending_until"], row["decided_by"],
                         row["decided_at"])


def token_hash(token: str) -> str:
    return hashlib.sha256(token.strip().encode()).hexdigest()


def _errors():
    return InvalidRequest, NotFound, PermissionDenied


async def enabled_approvers(conn, s: str) -> int:
    return await conn.fetchval(f"SELECT count(*) FROM {s}.operators WHERE enabled AND 'approver' = ANY (roles)")


async def in_bootstrap(conn, s: str) -> bool:
    return await enabled_approvers(conn, s) < BOOTSTRAP_APPROVERS


async def record_event(conn, s: str, account: str, change: str, involved: list[str],
                       token_to: str | None = None) -> None:
    await conn.execute(f"INSERT INTO {s}.account_events (account, change, involved, token_to) "
                       f"VALUES ($1, $2, $3, $4)", account, change, sorted(set(involved)), token_to)


async def entangled(conn, s: str, policy: GrantPolicy, approver: str, requester: str) -> str | None:
    """Why ``approver`` may not approve for ``requester``, or None.

    Refused within the window: the approver's account was created or changed by, or at the
    request of, the requester; or the approver received the enrolment token of the
    requester's account (and so could have enrolled it themselves).
    """
    if policy.account_change_window_s <= 0:
        return None
    row = await conn.fetchrow(
        f"SELECT account, change, at FROM {s}.account_events "
        f"WHERE at > now() - make_interval(secs => $3) AND ((account = $1 AND $2 = ANY (involved)) "
        f"OR (account = $2 AND token_to = $1)) ORDER BY at DESC LIMIT 1",
        approver, requester, policy.account_change_window_s)
    if row is None:
        return None
    other = requester if row["account"] == approver else approver
    return (f"account {row['account']!r} was {row['change']} with {other} involved at "
            f"{row['at'].strftime('%Y-%m-%d %H:%M UTC')}: within the grant policy's account change window "
            f"an approval between these two people is refused; another approver must decide")


# --------------------------------------------------------------------------- bootstrap


async def bootstrap_add(plane: "ControlPlane", actor: "Actor", name: str, password: str, roles: list[str]):
    """The platform admin adds an account with a password, only while fewer than two approvers exist."""
    InvalidRequest, _, PermissionDenied = _errors()
    async with plane._tx() as conn:
        # one bootstrap at a time: two racing admins must not both see "fewer than two"
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"tenantgate-bootstrap:{plane.schema}")
        if not await in_bootstrap(conn, plane.s):
            raise PermissionDenied(
                f"{BOOTSTRAP_APPROVERS} approvers exist, so accounts are no longer added by the platform admin: "
                f"an approver requests it (tenantgate operator add {name} --as APPROVER) and another approves it")
        try:
            row = await conn.fetchrow(
                f"INSERT INTO {plane.s}.operators (name, scram_verifier, roles) VALUES ($1, $2, $3) RETURNING *",
                name, make_verifier(password), roles)
        except asyncpg.UniqueViolationError:
            raise InvalidRequest(f"operator {name!r} already exists")
        except asyncpg.CheckViolationError:
            raise InvalidRequest(f"invalid operator name {name!r}: use letters, digits and _ . @ - (max 63)")
        await record_event(conn, plane.s, name, "created", [actor.name])
        await plane._in_tx_audit(conn, [A.AuditRecord(ACCOUNT_BOOTSTRAP, operator=actor.name,
                                                      detail={"account": name, "roles": roles})])
    return row


async def bootstrap_policy(plane: "ControlPlane", actor: "Actor", settings: dict) -> GrantPolicy:
    _, _, PermissionDenied = _errors()
    changes = _settings(settings)
    async with plane._tx() as conn:
        if not await in_bootstrap(conn, plane.s):
            raise PermissionDenied("approvers exist: the grant policy changes through a request "
                                   "(tenantgate grant policy set ... --as APPROVER) that another approver approves")
        policy = await write_policy(conn, plane.s, changes, actor.name)
        await plane._in_tx_audit(conn, [A.AuditRecord(POLICY_CHANGED, operator=actor.name,
                                                      detail={"changes": changes, "bootstrap": True})])
    return policy


def _settings(settings: dict) -> dict[str, int]:
    InvalidRequest, _, _ = _errors()
    try:
        return parse_settings(settings)
    except PolicyError as e:
        raise InvalidRequest(str(e))


# --------------------------------------------------------------------------- requests


async def request_change(plane: "ControlPlane", actor: "Actor", kind: str, account: str | None = None,
                         payload: dict | None = None, reason: str | None = None) -> ChangeRequest:

    InvalidRequest, NotFound, PermissionDenied = _errors()
    if kind not in KINDS:
        raise InvalidRequest(f"unknown change {kind!r}")
    if actor.platform_admin or not actor.is_approver:
        raise PermissionDenied(f"{actor.name} may not request account or policy changes (needs the approver role)")
    payload = dict(payload or {})
    if kind in ("account.create", "account.roles"):
        roles = sorted(set(payload.get("roles") or ["operator"]))
        bad = [r for r in roles if r not in ROLES]
        if bad:
            raise InvalidRequest(f"invalid role(s) {bad}: roles are {', '.join(ROLES)}")
        payload["roles"] = roles
    if kind == "policy.set":
        _settings(payload.get("settings") or {})
    async with plane._tx() as conn:
        policy = await read_policy(conn, plane.s)
        if kind.startswith("account."):
            exists = await conn.fetchval(f"SELECT 1 FROM {plane.s}.operators WHERE name = $1", account)
            if kind == "account.create" and exists:
                raise InvalidRequest(f"operator {account!r} already exists")
            if kind == "account.create" and not _valid_name(account):
                raise InvalidRequest(f"invalid operator name {account!r}: use letters, digits and _ . @ - (max 63)")
            if kind != "account.create" and not exists:
                raise NotFound(f"operator {account!r} does not exist")
        row = await conn.fetchrow(
            f"INSERT INTO {plane.s}.change_requests (kind, account, payload, requested_by, reason, pending_until) "
            f"VALUES ($1, $2, $3::jsonb, $4, $5, now() + make_interval(secs => $6)) RETURNING *",
            kind, account, json.dumps(payload), actor.name, reason, policy.pending_ttl_s)
        await plane._in_tx_audit(conn, [A.AuditRecord(CHANGE_REQUESTED, operator=actor.name, detail={
            "request": row["id"], "kind": kind, "account": account, "payload": payload, "reason": reason})])
    return _request(row)


def _valid_name(name: str | None) -> bool:
    import re

    return bool(name) and re.fullmatch(r"[A-Za-z0-9_.@-]{1,63}", name) is not None


async def list_changes(plane: "ControlPlane", state: str | None = None, limit: int = 100) -> list[ChangeRequest]:
    async with plane.pool.acquire() as conn:
        await conn.execute(f"UPDATE {plane.s}.change_requests SET state = 'expired' "
                           f"WHERE state = 'pending' AND pending_until <= now()")
        rows = await conn.fetch(f"SELECT * FROM {plane.s}.change_requests WHERE ($1::text IS NULL OR state = $1) "
                                f"ORDER BY id DESC LIMIT $2", state, limit)
    return [_request(r) for r in rows]


async def decide_change(plane: "ControlPlane", actor: "Actor", request_id: int, approve: bool,
                        comment: str | None = None) -> tuple[ChangeRequest, str | None]:
    """Approve (apply) or deny a pending change request.  Returns (request, enrolment token or None)."""
    InvalidRequest, NotFound, PermissionDenied = _errors()
    token = None
    async with plane._tx() as conn:
        row = await conn.fetchrow(f"SELECT * FROM {plane.s}.change_requests WHERE id = $1 FOR UPDATE", request_id)
        if row is None:
            raise NotFound(f"change request {request_id} does not exist")
        if row["state"] == "pending" and row["pending_until"] <= await conn.fetchval("SELECT now()"):
            await conn.execute(f"UPDATE {plane.s}.change_requests SET state = 'expired' WHERE id = $1", request_id)
            row = await conn.fetchrow(f"SELECT * FROM {plane.s}.change_requests WHERE id = $1", request_id)
        if row["state"] != "pending":
            raise InvalidRequest(f"change request {request_id} is {row['state']}, not pending")
        if actor.platform_admin or not actor.is_approver:
            raise PermissionDenied(f"{actor.name} does not have the approver role")
        if actor.name == row["requested_by"]:
            raise PermissionDenied(f"change request {request_id} was requested by {actor.name}: "
                                   "another approver must decide")
        if row["account"] is not None and actor.name == row["account"]:
            raise PermissionDenied(f"change request {request_id} is about {actor.name}'s own account: "
                                   "another approver must decide")
        policy = await read_policy(conn, plane.s)
        why = await entangled(conn, plane.s, policy, actor.name, row["requested_by"])
        if why and approve:
            raise PermissionDenied(why)
        state = "approved" if approve else "denied"
        row = await conn.fetchrow(
            f"UPDATE {plane.s}.change_requests SET state = $2, decided_by = $3, decided_at = now() "
            f"WHERE id = $1 RETURNING *", request_id, state, actor.name)
        req = _request(row)
        recs = [A.AuditRecord(CHANGE_APPROVED if approve else CHANGE_DENIED, operator=actor.name, detail={
            "request": request_id, "kind": req.kind, "account": req.account, "requested_by": req.requested_by,
            "comment": comment})]
        if approve:
            token, more = await _apply(plane, conn, req, actor, policy)
            recs += more
        await plane._in_tx_audit(conn, recs)
    return req, token


async def _apply(plane, conn, req: ChangeRequest, actor: "Actor", policy: GrantPolicy):
    s = plane.s
    involved = [req.requested_by, actor.name]
    recs: list[A.AuditRecord] = []
    token = None
    if req.kind in ("account.create", "account.reset"):
        token = secrets.token_hex(24)  # never starts with "-" (a CLI argument)
        unusable = make_verifier(secrets.token_urlsafe(32))  # nobody knows it: the person enrols
        if req.kind == "account.create":
            try:
                await conn.execute(
                    f"INSERT INTO {s}.operators (name, scram_verifier, roles, enrol_token_hash, enrol_expires_at) "
                    f"VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))",
                    req.account, unusable, req.payload["roles"], token_hash(token), policy.pending_ttl_s)
            except asyncpg.UniqueViolationError:
                InvalidRequest, _, _ = _errors()
                raise InvalidRequest(f"operator {req.account!r} already exists")
        else:
            await conn.execute(
                f"UPDATE {s}.operators SET scram_verifier = $2, totp_secret = NULL, totp_last_step = NULL, "
                f"enrol_token_hash = $3, enrol_expires_at = now() + make_interval(secs => $4), updated_at = now() "
                f"WHERE name = $1", req.account, unusable, token_hash(token), policy.pending_ttl_s)
        await record_event(conn, s, req.account, "created" if req.kind == "account.create" else "reset", involved,
                           token_to=actor.name)
        recs.append(A.AuditRecord(A.OPERATOR_ADDED if req.kind == "account.create" else A.OPERATOR_CHANGED,
                                  operator=actor.name, detail={
                                      "account": req.account, "request": req.id, "requested_by": req.requested_by,
                                      "change": req.kind, "roles": req.payload.get("roles"),
                                      "enrolment_token_issued": True}))
    elif req.kind == "account.roles":
        await conn.execute(f"UPDATE {s}.operators SET roles = $2, updated_at = now() WHERE name = $1",
                           req.account, req.payload["roles"])
        await record_event(conn, s, req.account, "given roles " + ",".join(req.payload["roles"]), involved)
        recs.append(A.AuditRecord(A.OPERATOR_CHANGED, operator=actor.name, detail={
            "account": req.account, "request": req.id, "change": "roles", "roles": req.payload["roles"]}))
    elif req.kind == "account.enable":
        await conn.execute(f"UPDATE {s}.operators SET enabled = true, updated_at = now() WHERE name = $1", req.account)
        await record_event(conn, s, req.account, "enabled", involved)
        recs.append(A.AuditRecord(A.OPERATOR_CHANGED, operator=actor.name, detail={
            "account": req.account, "request": req.id, "change": "enabled"}))
    elif req.kind == "policy.set":
        changes = parse_settings(req.payload["settings"])
        await write_policy(conn, s, changes, actor.name)
        recs.append(A.AuditRecord(POLICY_CHANGED, operator=actor.name, detail={
            "request": req.id, "requested_by": req.requested_by, "changes": changes}))
    return token, recs


# --------------------------------------------------------------------------- enrolment, unlock


async def enrol(plane: "ControlPlane", token: str, password: str) -> tuple[str, str, str]:
    """The person sets their own password and gets their own TOTP secret: (name, secret, otpauth URI)."""

    if not password:
        InvalidRequest, _, _ = _errors()
        raise InvalidRequest("the password must not be empty")
    secret = new_totp_secret()
    async with plane._tx() as conn:
        row = await conn.fetchrow(
            f"SELECT name FROM {plane.s}.operators WHERE enrol_token_hash = $1 AND enrol_expires_at > now() "
            f"FOR UPDATE", token_hash(token or ""))
        if row is None:
            raise AuthenticationFailed("the enrolment token is not valid (unknown, used or expired): "
                                       "ask an approver for a new one (tenantgate operator reset NAME)")
        name = row["name"]
        await conn.execute(
            f"UPDATE {plane.s}.operators SET scram_verifier = $2, totp_secret = $3, totp_last_step = NULL, "
            f"enrol_token_hash = NULL, enrol_expires_at = NULL, updated_at = now() WHERE name = $1",
            name, make_verifier(password), secret)
        await plane._in_tx_audit(conn, [A.AuditRecord(ACCOUNT_ENROLLED, operator=name,
                                                      detail={"account": name, "totp": "enrolled"})])
    return name, secret, totp_uri(secret, name)


async def unlock_account(plane: "ControlPlane", actor: "Actor", name: str | None = None,
                         address: str | None = None) -> bool:
    """Lift the lockout of an account (or of a client address) after failed authentications."""
    from . import throttle

    InvalidRequest, _, PermissionDenied = _errors()
    if not (actor.is_approver or actor.platform_admin):
        raise PermissionDenied(f"{actor.name} may not unlock accounts (needs the approver role)")
    if (name is None) == (address is None):
        raise InvalidRequest("give an account name or --address IP")
    key = f"account:{name}" if name is not None else f"address:{address}"
    async with plane._tx() as conn:
        done = await throttle.unlock(conn, plane.s, key)
        await plane._in_tx_audit(conn, [A.AuditRecord(ACCOUNT_UNLOCKED, operator=actor.name,
                                                      detail={"unlocked": key, "was_locked": done})])
    return done
