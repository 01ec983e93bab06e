"""tenantgate's own user registry for application users, from the config's ``users:``."""

from __future__ import annotations

from proxy.config import Config, UserConfig
from proxy.seam import SessionKind, UserRecord


def record_from_config(u: UserConfig) -> UserRecord:
    return UserRecord(
        name=u.name,
        scram_verifier=u.scram_verifier,
        kind=SessionKind.PASSTHROUGH if u.passthrough else SessionKind.TENANT,
        tenant=u.tenant,
        token_tenants=u.token_tenants,
        admin=u.admin,
    )


class ConfigUserDirectory:
    """A :class:`proxy.seam.UserDirectory` over ``config.users`` (replaceable on reload)."""

    def __init__(self, users: list[UserConfig] | None = None):
        self._users: dict[str, UserRecord] = {}
        self.replace(users or [])

    @classmethod
    def from_config(cls, config: Config) -> "ConfigUserDirectory":
        return cls(config.users)

    def replace(self, users: list[UserConfig]) -> None:
        records: dict[str, UserRecord] = {}
        for u in users:
            if u.name in records:
                raise ValueError(f"users: duplicate user name {u.name!r}")
            records[u.name] = record_from_config(u)
        self._users = records

    async def lookup(self, name: str) -> UserRecord | None:
        return self._users.get(name)
