"""Per-tenant data keys for tenantgate backups, wrapped by a master key that is not in the database.

Every tenant gets one 256-bit *data key* the first time it is backed up
(``tenantgate tenant backup``).  The control schema's ``tenant_keys`` table
keeps it only wrapped (AES key wrap, RFC 3394, ``cryptography``'s
``aes_key_wrap``) by the *master key*, which lives outside the database: a
file (``lifecycle.backup_master_key_file``) or an environment variable
(``lifecycle.backup_master_key_env``) holding 32 random bytes in base64.  A
copy of the control database alone therefore decrypts nothing, and the master
key alone neither.

A purge *destroys* the tenant's data keys (:func:`destroy_tenant_keys`: the
wrapped key is overwritten with NULL, a trigger refuses any later change to a
destroyed row) and the deletion receipt lists them: from then on no backup made
by tenantgate for that tenant can be decrypted by anyone (crypto-shredding).
What this does not reach (database-level physical backups, WAL archives,
copies of the control database taken before the purge, exports) is in
docs/lifecycle.md.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from proxy.lifecycle.tables import INVALID_PARAMETER, OBJECT_NOT_IN_STATE, UNDEFINED_OBJECT, LifecycleError

KEY_BYTES = 32
KEY_DESTROYED = OBJECT_NOT_IN_STATE  # 55000: the backup exists, its key does not any more


@dataclass(frozen=True)
class MasterKey:
    key: bytes

    @property
    def key_id(self) -> str:
        """Names the master key (first 16 hex digits of SHA-256 over a domain-separated key)."""
        return hashlib.sha256(b"tenantgate-backup-master:" + self.key).hexdigest()[:16]


@dataclass(frozen=True)
class DataKey:
    key_id: str
    tenant: str
    key: bytes


def new_master_key_text() -> str:
    """A fresh master key as written to the key file (base64, one line)."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() + "\n"


def parse_master_key(text: str, where: str) -> MasterKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (ValueError, TypeError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise LifecycleError(INVALID_PARAMETER, f"{where}: the backup master key must be {KEY_BYTES} bytes in base64",
                             hint="create one with: tenantgate tenant backup-keygen --out FILE")
    return MasterKey(raw)


def master_key_from_config(lifecycle_cfg) -> MasterKey:
    """The master key from ``lifecycle.backup_master_key_file`` / ``_env``; a clear error without one."""
    if lifecycle_cfg.backup_master_key_file:
        path = lifecycle_cfg.backup_master_key_file
        try:
            return parse_master_key(Path(path).read_text(), path)
        except OSError as e:
            raise LifecycleError(INVALID_PARAMETER, f"cannot read the backup master key {path}: {e.strerror or e}")
    if lifecycle_cfg.backup_master_key_env:
        env = lifecycle_cfg.backup_master_key_env
        v = os.environ.get(env)
        if v is None:
            raise LifecycleError(INVALID_PARAMETER, f"lifecycle.backup_master_key_env: environment variable {env} is not set")
        return parse_master_key(v, f"${env}")
    raise LifecycleError(INVALID_PARAMETER, "no backup master key is configured",
                         hint="set lifecycle.backup_master_key_file (tenantgate tenant backup-keygen --out FILE "
                              "writes one) or lifecycle.backup_master_key_env")


async def tenant_data_key(conn, s: str, tenant: str, master: MasterKey, *, create: bool) -> DataKey:
    """The tenant's live data key (made and stored wrapped when ``create`` and there is none)."""
    row = await conn.fetchrow(
        f"SELECT * FROM {s}.tenant_keys WHERE tenant = $1 AND destroyed_at IS NULL", tenant)
    if row is None:
        if not create:
            raise LifecycleError(UNDEFINED_OBJECT, f'tenant "{tenant}" has no backup data key')
        key = secrets.token_bytes(KEY_BYTES)
        key_id = secrets.token_hex(8)
        row = await conn.fetchrow(
            f"INSERT INTO {s}.tenant_keys (key_id, tenant, wrapped_key, master_key_id) VALUES ($1, $2, $3, $4) "
            f"ON CONFLICT (tenant) WHERE destroyed_at IS NULL DO NOTHING RETURNING *",
            key_id, tenant, aes_key_wrap(master.key, key), master.key_id)
        if row is None:  # made concurrently: use that one
            row = await conn.fetchrow(
                f"SELECT * FROM {s}.tenant_keys WHERE tenant = $1 AND destroyed_at IS NULL", tenant)
    return _unwrap(row, master)


async def data_key_by_id(conn, s: str, key_id: str, tenant: str, master: MasterKey) -> DataKey:
    """The data key a backup names; a destroyed key is a clear 55000 error."""
    row = await conn.fetchrow(f"SELECT * FROM {s}.tenant_keys WHERE key_id = $1", key_id)
    if row is None or row["tenant"] != tenant:
        raise LifecycleError(UNDEFINED_OBJECT, f'backup data key {key_id} of tenant "{tenant}" does not exist here',
                             hint="a backup can only be restored with the control database that made it")
    if row["destroyed_at"] is not None:
        raise LifecycleError(
            KEY_DESTROYED,
            f'this backup of tenant "{tenant}" can no longer be decrypted: its data key {key_id} was destroyed '
            f'at {row["destroyed_at"].isoformat()} (by the purge of the tenant)',
            detail="tenant backups are crypto-shredded when the tenant is purged; see its deletion receipt",
            hint="nothing can restore it; a tenant's data comes back only from an export it kept (tenant import --reactivate)")
    return _unwrap(row, master)


def _unwrap(row, master: MasterKey) -> DataKey:
    if row["master_key_id"] != master.key_id:
        raise LifecycleError(INVALID_PARAMETER,
                             f"data key {row['key_id']} is wrapped by master key {row['master_key_id']}, "
                             f"not the configured one ({master.key_id})",
                             hint="configure the master key that was in use when the backup was made")
    try:
        return DataKey(row["key_id"], row["tenant"], aes_key_unwrap(master.key, bytes(row["wrapped_key"])))
    except InvalidUnwrap:
        raise LifecycleError(INVALID_PARAMETER, f"data key {row['key_id']} does not unwrap with the master key")


async def destroy_tenant_keys(conn, s: str, tenant: str, by: str | None) -> list[dict]:
    """Destroy every live data key of ``tenant``; returns every destroyed key of the tenant
    (``key_id``, ``destroyed_at``), those of earlier purges included, for the deletion receipt."""
    await conn.execute(
        f"UPDATE {s}.tenant_keys SET wrapped_key = NULL, destroyed_at = now(), destroyed_by = $2 "
        f"WHERE tenant = $1 AND destroyed_at IS NULL", tenant, by)
    rows = await conn.fetch(
        f"SELECT key_id, destroyed_at FROM {s}.tenant_keys WHERE tenant = $1 ORDER BY created_at, key_id", tenant)
    return [{"key_id": r["key_id"], "destroyed_at": _iso(r["destroyed_at"])} for r in rows]


def _iso(d: datetime) -> str:
    return d.isoformat()
