"""Self-service export, client side: a tenant exports all of its rows through tenantgate.

``tenantgate export --dsn <tenant DSN> --out DIR|FILE.tar.zst`` runs
:func:`self_export` from any machine that reaches tenantgate, with the
tenant's own application credential (or a token user and its tenant token).
No operator, no grant, no config file.

1. It connects with the connection option ``tenantgate.export=1``: the proxy
   records the export in its audit chain before the session opens and makes
   the session read-only (:mod:`proxy.control.self_export`).
2. ``SHOW tenantgate.export_scope`` tells it the session's tenant, the tenant
   column and the tenant tables of the proxy's rules; :func:`discover` then
   reads their columns and foreign keys from the catalogs, as the proxy
   filters them for this tenant.
3. :func:`proxy.lifecycle.export.export_tenant` does the rest exactly as for
   the operator export (one ``REPEATABLE READ READ ONLY`` snapshot, ``COPY
   (SELECT …) TO STDOUT`` per table, which the tenant policy rewrites), so
   the files and ``manifest.json`` are the same format, checked by
   ``tenantgate tenant verify-export``.  The manifest says
   ``"exported_by": "tenant"`` and is not signed: the key stays with the
   platform (the audit chain keeps the manifest's SHA-256 instead).
4. ``SET tenantgate.export_done = '<summary>'`` reports the tables, row
   counts and manifest hash, which the proxy records when the session ends.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path

from proxy.lifecycle.export import export_tenant, manifest_sha256
from proxy.lifecycle.progress import Progress
from proxy.lifecycle.tables import DUPLICATE_FILE, INVALID_PARAMETER, LifecycleError, discover

EXPORT_OPTION = "tenantgate.export"
TOKEN_OPTION = "tenantgate.tenant"
SCOPE_STATEMENT = "SHOW tenantgate.export_scope"


DONE_PARAMETER = "tenantgate.export_done"
MAX_SUMMARY_BYTES = 256 << 10


def encode_summary(summary: dict) -> str:
    """The export's summary as base64url JSON: no quote or backslash can appear in the SET literal."""
    raw = json.dumps(summary, sort_keys=True, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_summary(text: str) -> dict | None:
    if len(text) > MAX_SUMMARY_BYTES:
        return None
    try:
        doc = json.loads(base64.urlsafe_b64decode(text.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


async def connect(dsn: str, *, token: str | None = None):
    import asyncpg

    settings = {EXPORT_OPTION: "1", "application_name": "tenantgate-export"}
    if token:
        settings[TOKEN_OPTION] = token
    # no prepared-statement cache: every statement is one round trip through the proxy anyway
    return await asyncpg.connect(dsn, server_settings=settings, statement_cache_size=0)


async def read_scope(conn) -> dict:
    raw = await conn.fetchval(SCOPE_STATEMENT)
    try:
        scope = json.loads(raw)
        scope["tenant"], scope["tenant_column"], scope["schemas"]
    except (TypeError, ValueError, KeyError):
        raise LifecycleError(INVALID_PARAMETER, "the server did not answer as tenantgate does to an export",
                             hint="connect to tenantgate (not straight to PostgreSQL), version with self-service export")
    return scope


async def self_export(dsn: str, out: str | os.PathLike, *, data_format: str = "csv", token: str | None = None,
                      progress: Progress | None = None) -> dict:
    """Export the tenant of ``dsn``'s session to ``out``; returns the manifest."""
    if Path(out).exists() or Path(out).is_symlink():  # before the proxy records an export that cannot happen
        raise LifecycleError(DUPLICATE_FILE, f'export path "{out}" already exists', hint="choose a new path")
    conn = await connect(dsn, token=token)
    try:
        scope = await read_scope(conn)
        tables = scope.get("tables")
        schema = await discover(conn, scope["tenant_column"], scope["schemas"],
                                None if tables is None else [tuple(t) for t in tables])
        manifest = await export_tenant(conn, schema, scope["tenant"], out, data_format=data_format,
                                       progress=progress, through_proxy=True,
                                       manifest_extra={"exported_by": "tenant"})
        summary = {
            "tables": {t["name"]: t["rows"] for t in manifest["tables"]},
            "total_rows": manifest["total_rows"],
            "manifest_sha256": manifest_sha256(manifest),
            "snapshot_time": manifest["snapshot_time"],
            "schema_version": manifest["schema_version"],
            "data_format": data_format,
        }
        await conn.execute(f"SET {DONE_PARAMETER} = '{encode_summary(summary)}'")
        return manifest
    finally:
        await conn.close()
