"""The grant policy: one row in the control schema, never a config file of whoever runs the CLI.

``grant_policy`` holds the maximum grant duration, the approvals a grant
needs, how long a request waits for an answer, the window in which an account
created or changed by (or at the request of) a person may not approve that
person's requests, and the authentication throttling limits.

It is read inside the transaction that creates or approves a grant, so a
request is checked against the policy of the database, and an approval
re-checks it (a grant requested under an older, looser policy is refused when
it exceeds the current one).  It changes only through a ``policy.set`` change
request that a second approver approves (:mod:`proxy.control.accounts`), or,
before two approvers exist, by the platform admin (bootstrap).  The config's
``grants.*`` keys only seed the row when the control schema is first
installed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime

from .durations import format_duration, parse_duration

# name on the command line / in JSON -> (column, is a duration)
SETTINGS: dict[str, tuple[str, bool]] = {
    "max_duration": ("max_duration_s", True),
    "approvals_required": ("approvals_required", False),
    "pending_ttl": ("pending_ttl_s", True),
    "account_change_window": ("account_change_window_s", True),
    "max_failures_account": ("max_failures_account", False),
    "max_failures_address": ("max_failures_address", False),
    "lockout_window": ("lockout_window_s", True),
    "lockout": ("lockout_s", True),
}


@dataclass(frozen=True)
class GrantPolicy:
    max_duration_s: int
    approvals_required: int
    pending_ttl_s: int
    account_change_window_s: int
    max_failures_account: int
    max_failures_address: int
    lockout_window_s: int
    lockout_s: int
    updated_at: datetime | None = None
    updated_by: str | None = None

    def to_json(self) -> dict:
        out: dict = {}
        for name, (col, is_duration) in SETTINGS.items():
            v = getattr(self, col)
            out[name] = format_duration(v) if is_duration else v
        out["updated_at"] = self.updated_at.isoformat() if self.updated_at else None
        out["updated_by"] = self.updated_by
        return out


class PolicyError(ValueError):
    pass


def parse_settings(values: dict[str, str | int]) -> dict[str, int]:
    """``{"max_duration": "8h", "approvals_required": "2"}`` -> ``{column: int}``; raises PolicyError."""
    out: dict[str, int] = {}
    for name, raw in values.items():
        if name not in SETTINGS:
            raise PolicyError(f"unknown grant policy setting {name!r}: settings are {', '.join(SETTINGS)}")
        col, is_duration = SETTINGS[name]
        try:
            if is_duration and str(raw).strip() == "0":
                v = 0
            elif is_duration:
                v = int(parse_duration(str(raw)).total_seconds()) if not isinstance(raw, int) else raw
            else:
                v = int(str(raw).strip())
        except (ValueError, OverflowError) as e:
            raise PolicyError(f"invalid value {raw!r} for {name}: {e}")
        if v < (0 if col == "account_change_window_s" else 1) or v > 2**31 - 1:
            raise PolicyError(f"invalid value {raw!r} for {name}: out of range")
        out[col] = v
    if not out:
        raise PolicyError("nothing to change: give at least one setting")
    return out


async def read_policy(conn, s: str, *, lock: bool = False) -> GrantPolicy:
    row = await conn.fetchrow(f"SELECT * FROM {s}.grant_policy" + (" FOR SHARE" if lock else ""))
    if row is None:  # installed before v2 without a row: the built-in defaults
        await conn.execute(
            f"INSERT INTO {s}.grant_policy (max_duration_s, approvals_required, pending_ttl_s) "
            f"VALUES (28800, 1, 86400) ON CONFLICT (one) DO NOTHING")
        row = await conn.fetchrow(f"SELECT * FROM {s}.grant_policy")
    return GrantPolicy(**{f.name: row[f.name] for f in fields(GrantPolicy)})


async def write_policy(conn, s: str, changes: dict[str, int], by: str) -> GrantPolicy:
    await read_policy(conn, s)  # make sure the row exists
    sets = ", ".join(f"{col} = ${i + 1}" for i, col in enumerate(changes))
    await conn.execute(
        f"UPDATE {s}.grant_policy SET {sets}, updated_at = now(), updated_by = ${len(changes) + 1}",
        *changes.values(), by)
    return await read_policy(conn, s)


async def seed_policy(conn, s: str, grants_cfg) -> None:
    """At first install: the row from the installer's ``grants.*`` config (never overwrites)."""
    await conn.execute(
        f"INSERT INTO {s}.grant_policy (max_duration_s, approvals_required, pending_ttl_s, updated_by) "
        f"VALUES ($1, $2, $3, 'install') ON CONFLICT (one) DO NOTHING",
        int(parse_duration(grants_cfg.max_duration).total_seconds()), int(grants_cfg.approvals_required),
        int(parse_duration(grants_cfg.pending_ttl).total_seconds()))
