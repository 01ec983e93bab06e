"""Authentication throttling and TOTP replay protection, shared by every instance and the CLI.

State lives in the control schema (``auth_throttle``, ``operators.totp_last_step``)
so several proxies and CLI invocations agree.  Limits come from the grant
policy (:mod:`proxy.control.grant_policy`): ``max_failures_account`` per
account and ``max_failures_address`` per client address within
``lockout_window_s``; reaching one locks that key for ``lockout_s``.  An
approver can lift an account's lock (``tenantgate operator unlock NAME``).

Attempts are counted *before* the credentials are checked
(:func:`begin_attempt`, one row-locked upsert per key), and a success gives
the count back (:func:`attempt_succeeded`).  So a burst of parallel guesses
cannot all slip in between a check and the recording of their failures: at
most ``max_failures`` attempts per window get as far as the password check.

:func:`consume_totp` accepts a code for the previous, current or next 30 s
step only if that step is later than the last step used by the account (an
atomic compare-and-set), so a code is good once.
"""

from __future__ import annotations

import hmac
import re
import time
from dataclasses import dataclass
from datetime import datetime

import pyotp

from .grant_policy import GrantPolicy

LOCKED_SQLSTATE = "28000"
TOTP_STEP_S = 30


@dataclass(frozen=True)
class Locked(Exception):
    key: str
    until: datetime

    def message(self) -> str:
        what = self.key.split(":", 1)
        subject = f"account {what[1]!r}" if what[0] == "account" else f"client address {what[1]}"
        return (f"too many failed authentication attempts: {subject} is locked until "
                f"{self.until.strftime('%Y-%m-%d %H:%M:%S UTC')}; an approver can unlock an account with: "
                f"tenantgate operator unlock NAME --as APPROVER")


def address_of(client_addr: str | None) -> str | None:
    """'10.0.0.5:53122' -> '10.0.0.5'; 'unix' / None -> None (local socket: not throttled by address)."""
    if not client_addr or client_addr == "unix" or ":" not in client_addr:
        return None
    return client_addr.rsplit(":", 1)[0].strip("[]") or None


def keys_for(account: str | None, client_addr: str | None) -> list[tuple[str, str]]:
    """[(key, kind)] where kind picks the limit: 'account' or 'address'."""
    out = []
    if account:
        out.append((f"account:{account}", "account"))
    addr = address_of(client_addr)
    if addr:
        out.append((f"address:{addr}", "address"))
    return out


async def begin_attempt(conn, s: str, policy: GrantPolicy, keys: list[tuple[str, str]]) -> None:
    """Count one attempt on each key; raise :class:`Locked` if a key is (or now becomes) locked."""
    for key, kind in keys:
        limit = policy.max_failures_account if kind == "account" else policy.max_failures_address
        row = await conn.fetchrow(
            f"""INSERT INTO {s}.auth_throttle AS t (key, failures, window_start) VALUES ($1, 1, now())
                ON CONFLICT (key) DO UPDATE SET
                  failures = CASE WHEN t.locked_until > now() THEN t.failures
                                  WHEN t.locked_until IS NOT NULL
                                       OR t.window_start < now() - make_interval(secs => $2) THEN 1
                                  ELSE t.failures + 1 END,
                  window_start = CASE WHEN t.locked_until > now() THEN t.window_start
                                      WHEN t.locked_until IS NOT NULL
                                           OR t.window_start < now() - make_interval(secs => $2) THEN now()
                                      ELSE t.window_start END,
                  locked_until = CASE WHEN t.locked_until > now() THEN t.locked_until END
                RETURNING failures, locked_until, now() AS now""",
            key, policy.lockout_window_s)
        if row["locked_until"] is not None and row["locked_until"] > row["now"]:
            raise Locked(key, row["locked_until"])
        if row["failures"] > limit:
            until = await conn.fetchval(
                f"UPDATE {s}.auth_throttle SET locked_until = now() + make_interval(secs => $2) "
                f"WHERE key = $1 RETURNING locked_until", key, policy.lockout_s)
            raise Locked(key, until)


async def attempt_succeeded(conn, s: str, keys: list[tuple[str, str]]) -> None:
    """Give back the attempt counted by :func:`begin_attempt`; an account's count starts over."""
    for key, kind in keys:
        if kind == "account":
            await conn.execute(f"DELETE FROM {s}.auth_throttle WHERE key = $1 AND NOT coalesce(locked_until > now(), false)", key)
        else:
            await conn.execute(
                f"UPDATE {s}.auth_throttle SET failures = greatest(failures - 1, 0) WHERE key = $1", key)


async def unlock(conn, s: str, key: str) -> bool:
    return (await conn.execute(f"DELETE FROM {s}.auth_throttle WHERE key = $1", key)) != "DELETE 0"


def totp_step(secret: str, code: str | None, now: float | None = None) -> int | None:
    """The 30 s step (previous, current or next) whose code is ``code``, or None."""
    if not code:
        return None
    code = code.strip().replace(" ", "")
    if not re.fullmatch(r"[0-9]{6}", code):  # ASCII only: compare_digest raises on other text
        return None
    totp = pyotp.TOTP(secret)
    current = int((time.time() if now is None else now) // TOTP_STEP_S)
    found = None
    for step in (current - 1, current, current + 1):  # compare all three: no early exit on a match
        if hmac.compare_digest(totp.at(step * TOTP_STEP_S), code):
            found = step
    return found


async def consume_totp(conn, s: str, account: str, secret: str, code: str | None) -> bool:
    """True once per step: the code is valid and no later-or-equal step was used by this account."""
    step = totp_step(secret, code)
    if step is None:
        return False
    got = await conn.fetchval(
        f"UPDATE {s}.operators SET totp_last_step = $2 WHERE name = $1 "
        f"AND (totp_last_step IS NULL OR totp_last_step < $2) RETURNING name", account, step)
    return got is not None
