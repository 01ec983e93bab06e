"""Load a tenant export back into a tenant that has no rows.

:func:`import_tenant` first verifies the whole export (counts and SHA-256 of
every file, see :func:`proxy.lifecycle.export.verify_export`), checks that it
belongs to the target tenant and matches the current tables, then in ONE
``REPEATABLE READ`` transaction:

1. refuses if any tenant table already holds a row of the tenant;
2. loads the tables parents first with ``COPY … FROM STDIN`` (CSV) or, for
   JSON Lines, through a temporary staging table and ``json_populate_record``,
   hashing the bytes as they stream and aborting on any difference from the
   manifest (the file may change between the check and the load);
3. checks that every loaded row carries the target tenant: the number of the
   tenant's rows visible in the transaction must equal the number of rows
   copied (the tenant had none before, and REPEATABLE READ hides concurrent
   inserts), otherwise the whole import is rolled back.

Any error rolls the transaction back: nothing is half-loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, AsyncIterator

from proxy.lifecycle.archive import CHUNK, MANIFEST_NAME, ExportReader, ReadLimits, verify_export
from proxy.lifecycle.archive import HashingReader as _HashingReader
from proxy.lifecycle.progress import Progress
from proxy.lifecycle.tables import (
    CHECK_VIOLATION,
    DATA_CORRUPTED,
    INVALID_PARAMETER,
    OBJECT_NOT_IN_STATE,
    UNDEFINED_TABLE,
    LifecycleError,
    TenantSchema,
    TenantTable,
    scope_session,
)
from proxy.policy.names import quote_ident


def _check_compatible(manifest: dict, schema: TenantSchema, tenant: str, path: Path) -> None:
    if manifest["tenant"] != tenant:
        raise LifecycleError(
            CHECK_VIOLATION,
            f'export "{path}" holds tenant "{manifest["tenant"]}", not "{tenant}"',
            hint="an export can only be loaded back into the tenant it was taken from",
        )
    if manifest.get("tenant_column") != schema.tenant_column:
        raise LifecycleError(
            INVALID_PARAMETER,
            f'export "{path}" uses tenant column "{manifest.get("tenant_column")}", this database "{schema.tenant_column}"',
        )
    for t in manifest["tables"]:
        table = schema.tables.get(t["name"])
        if table is None:
            raise LifecycleError(UNDEFINED_TABLE, f'export table {t["name"]} is not a tenant table in this database')
        have = [(c.name, c.type) for c in table.data_columns]
        want = [(c["name"], c["type"]) for c in t["columns"]]
        if sorted(have) != sorted(want):
            raise LifecycleError(
                INVALID_PARAMETER,
                f"table {t['name']} has changed since the export (columns differ)",
                detail=f"export: {want}; database: {have}",
            )


async def _chunks(reader: _HashingReader) -> AsyncIterator[bytes]:
    while chunk := reader.read(CHUNK):
        yield chunk


async def _load_table(
    conn, table: TenantTable, entry: dict, stream: IO[bytes], data_format: str, where: str, *, direct: bool
) -> int:
    """Load one table file.  ``direct``: COPY straight into the table (the role bypasses RLS);
    otherwise COPY into a temporary staging table and INSERT … SELECT, since PostgreSQL
    refuses COPY FROM into a table under row-level security (and the policies' WITH
    CHECK then vets every row as well)."""
    h = _HashingReader(stream)
    columns = [c["name"] for c in entry["columns"]]
    cols = ", ".join(quote_ident(c) for c in columns)
    if data_format == "csv" and not direct:
        await conn.execute("DROP TABLE IF EXISTS pg_temp.tenantgate_import_rows")
        await conn.execute(
            f"CREATE TEMP TABLE tenantgate_import_rows ON COMMIT DROP AS SELECT {cols} FROM {table.qualified} WITH NO DATA"
        )
        await conn.copy_to_table(
            "tenantgate_import_rows", schema_name="pg_temp", source=_chunks(h), columns=columns, format="csv", header=True
        )
        status = await conn.execute(
            f"INSERT INTO {table.qualified} ({cols}) OVERRIDING SYSTEM VALUE SELECT {cols} FROM pg_temp.tenantgate_import_rows"
        )
        copied = int(status.split()[-1])
    elif data_format == "csv":
        status = await conn.copy_to_table(
            table.name, schema_name=table.schema, source=_chunks(h), columns=columns, format="csv", header=True
        )
        copied = int(status.split()[-1])
    else:
        await conn.execute("CREATE TEMP TABLE IF NOT EXISTS tenantgate_import_stage (doc json) ON COMMIT DROP")
        await conn.execute("TRUNCATE pg_temp.tenantgate_import_stage")
        await conn.copy_to_table(
            "tenantgate_import_stage", schema_name="pg_temp", source=_chunks(h), format="csv", quote="\x01", delimiter="\x02"
        )
        status = await conn.execute(
            f"INSERT INTO {table.qualified} ({cols}) OVERRIDING SYSTEM VALUE "
            f"SELECT {', '.join('r.' + quote_ident(c) for c in columns)} "
            f"FROM pg_temp.tenantgate_import_stage s, json_populate_record(NULL::{table.qualified}, s.doc) r"
        )
        copied = int(status.split()[-1])
    if h.sha.hexdigest() != entry["sha256"]:
        raise LifecycleError(DATA_CORRUPTED, f'checksum mismatch in export file "{where}" while loading it')
    if copied != entry["rows"]:
        raise LifecycleError(
            DATA_CORRUPTED, f'row count mismatch in export file "{where}": manifest {entry["rows"]}, loaded {copied}'
        )
    return copied


async def import_tenant(
    conn,
    schema: TenantSchema,
    tenant: str,
    path: str | os.PathLike,
    *,
    progress: Progress | None = None,
    keys: dict | None = None,
    limits: ReadLimits | None = None,
) -> dict:
    """Load the export at ``path`` into ``tenant`` (which must have no rows).

    The export is read within ``limits`` (decompression ratio, manifest size,
    field sizes: :mod:`proxy.lifecycle.archive`), during the check and the
    load alike; with ``keys``, its manifest must carry a valid signature.

    Returns ``{"tenant", "tables": {table: rows}, "total_rows", "manifest"}``.
    """
    path = Path(path)
    progress = progress or Progress()
    limits = limits or ReadLimits()
    manifest = verify_export(path, keys=keys, limits=limits)
    _check_compatible(manifest, schema, tenant, path)
    by_file = {t["file"]: t for t in manifest["tables"]}
    order = [t["name"] for t in manifest["tables"]]
    loaded: dict[str, int] = {}
    async with conn.transaction(isolation="repeatable_read"):
        direct = await scope_session(conn, schema, tenant, local=True)  # RLS must not hide rows from the checks
        await conn.execute("SET CONSTRAINTS ALL DEFERRED")  # only affects DEFERRABLE FKs (cycles)
        for key, table in sorted(schema.tables.items()):
            n = await conn.fetchval(f"SELECT count(*) FROM (SELECT 1 FROM {table.qualified} WHERE {table.tenant_predicate(tenant)} LIMIT 1) x")
            if n:
                raise LifecycleError(
                    OBJECT_NOT_IN_STATE,
                    f'tenant "{tenant}" is not empty: table {key} already holds its rows',
                    hint="import loads only into a tenant with no rows; to replace them: offboard, purge, then "
                    "tenant import --reactivate (docs/lifecycle.md)",
                )
        reader = ExportReader(path, limits)
        for name, stream in reader.members():
            if name == MANIFEST_NAME:
                continue
            entry = by_file.get(name)
            if entry is None:
                raise LifecycleError(DATA_CORRUPTED, f'export "{path}" holds a file not in the manifest: {name}')
            table = schema.tables[entry["name"]]
            where = f"{path}:{name}" if reader.archive else str(path / name)
            progress.start(entry["name"])
            loaded[entry["name"]] = await _load_table(
                conn, table, entry, stream, manifest["data_format"], where, direct=direct
            )
            progress.done(loaded[entry["name"]], entry.get("bytes", 0))
        if sorted(loaded) != sorted(order):
            raise LifecycleError(DATA_CORRUPTED, f'export "{path}" changed while loading (files missing)')
        for key, rows in loaded.items():
            table = schema.tables[key]
            have = await conn.fetchval(f"SELECT count(*) FROM {table.qualified} WHERE {table.tenant_predicate(tenant)}")
            if have != rows:
                raise LifecycleError(
                    CHECK_VIOLATION,
                    f'export file for table {key} holds {rows - have} row(s) whose tenant column is not "{tenant}"',
                    detail="the import was rolled back; nothing was loaded",
                )
    return {"tenant": tenant, "tables": loaded, "total_rows": sum(loaded.values()), "manifest": manifest}
