"""Export one tenant's rows from one consistent snapshot, and verify an export.

:func:`export_tenant` runs a single ``REPEATABLE READ READ ONLY`` transaction
and streams every tenant table with ``COPY (SELECT … WHERE tenant_col = '<T>')
TO STDOUT`` straight into the output, hashing (SHA-256) and counting as it
writes, so memory stays constant whatever the tenant's size.  The output is
either a directory or a ``.tar.zst`` archive holding one file per table
(``<schema>.<table>.csv`` with a header, or ``.jsonl``) and ``manifest.json``.

Nothing incomplete is ever left under the requested name: everything is
written under a hidden ``.<name>.partial-<pid>`` name and renamed only after
the manifest is written; on any error (disk full included) the partial output
is removed.  An output path that already exists is refused.

:func:`verify_export` (in :mod:`proxy.lifecycle.archive`, with the limits that
make reading a hostile archive safe) re-reads an export and checks each file's
row count and checksum against the manifest (and that no file is missing or
extra), and the manifest's signature (:mod:`proxy.lifecycle.attest`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import IO

import zstandard

import proxy
from proxy.lifecycle import attest
from proxy.lifecycle.progress import Progress
from proxy.lifecycle.tables import (
    DATA_CORRUPTED,  # noqa: F401  (re-exported)
    DUPLICATE_FILE,
    INVALID_PARAMETER,
    IO_ERROR,
    OBJECT_NOT_IN_STATE,
    LifecycleError,
    TenantSchema,
    TenantTable,
    discover,
    scope_session,
)

from proxy.lifecycle.archive import (  # noqa: F401  (re-exported: reading and verifying exports)
    CHUNK,
    DATA_FORMATS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    ExportReader,
    HashingReader,
    ReadLimits,
    count_records,
    parse_manifest,
    verify_export,
)

_HashingReader = HashingReader
_parse_manifest = parse_manifest


def is_archive_path(path: str | os.PathLike) -> bool:
    return str(path).endswith(".tar.zst")


def table_file_name(table_key: str, data_format: str) -> str:
    """``schema.table.csv`` with anything but [A-Za-z0-9_-] in each part percent-encoded."""
    schema, _, name = table_key.partition(".")

    def enc(part: str) -> str:
        return "".join(
            ch if (ch.isascii() and (ch.isalnum() or ch in "_-")) else "".join(f"%{b:02X}" for b in ch.encode())
            for ch in part
        )

    return f"{enc(schema)}.{enc(name)}.{data_format}"


def copy_out_query(table: TenantTable, tenant: str, data_format: str) -> tuple[str, dict]:
    """The query and COPY options that stream one table's rows of ``tenant``.

    asyncpg wraps it as ``COPY (<query>) TO STDOUT (FORMAT csv, HEADER …)``.
    """
    select = f"SELECT {table.select_list()} FROM {table.qualified} WHERE {table.tenant_predicate(tenant)}"
    if data_format == "csv":
        return select, {"format": "csv", "header": True}
    # JSON Lines: row_to_json never emits raw control characters, so CSV with
    # \x01 as quote and \x02 as delimiter passes each JSON document through verbatim.
    return f"SELECT row_to_json(r) FROM ({select}) r", {"format": "csv", "quote": "\x01", "delimiter": "\x02"}


# --------------------------------------------------------------------------- sinks
class _DirSink:
    """Writes table files into a hidden temp directory renamed to ``out`` at the end."""

    def __init__(self, out: Path):
        self.out = out
        self.tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        self.tmp.mkdir()

    def open_member(self, name: str) -> IO[bytes]:
        return open(self.tmp / name, "wb")

    def close_member(self, name: str, f: IO[bytes], mtime: float) -> None:
        f.flush()
        os.fsync(f.fileno())
        f.close()

    def finish(self, manifest: bytes) -> None:
        with open(self.tmp / MANIFEST_NAME, "wb") as f:
            f.write(manifest)
            f.flush()
            os.fsync(f.fileno())
        if self.out.exists():
            raise LifecycleError(DUPLICATE_FILE, f'export path "{self.out}" already exists')
        os.rename(self.tmp, self.out)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class _TarZstSink:
    """Streams a tar inside a zstd frame.  Each table is spooled to an unnamed
    temporary file next to the output first (tar headers need the size up front),
    then appended, so memory stays constant; disk needs one table's size extra."""

    def __init__(self, out: Path, level: int = 3):
        self.out = out
        self.tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        self.raw = open(self.tmp, "xb")
        self.zw = zstandard.ZstdCompressor(level=level, threads=0).stream_writer(self.raw, closefd=False)
        self.tar = tarfile.open(fileobj=self.zw, mode="w|", format=tarfile.PAX_FORMAT)

    def open_member(self, name: str) -> IO[bytes]:
        return tempfile.TemporaryFile(dir=self.out.parent, prefix=f".{self.out.name}.spool-")

    def close_member(self, name: str, f: IO[bytes], mtime: float) -> None:
        size = f.tell()
        f.seek(0)
        info = tarfile.TarInfo(name)
        info.size = size
        info.mtime = int(mtime)
        info.mode = 0o644
        self.tar.addfile(info, f)
        f.close()

    def finish(self, manifest: bytes) -> None:
        info = tarfile.TarInfo(MANIFEST_NAME)
        info.size = len(manifest)
        info.mtime = int(time.time())
        info.mode = 0o644
        self.tar.addfile(info, io.BytesIO(manifest))
        self.tar.close()
        self.zw.flush(zstandard.FLUSH_FRAME)
        self.zw.close()
        self.raw.flush()
        os.fsync(self.raw.fileno())
        self.raw.close()
        try:
            os.link(self.tmp, self.out)  # fails if out appeared meanwhile: never clobber
        except FileExistsError:
            raise LifecycleError(DUPLICATE_FILE, f'export path "{self.out}" already exists')
        os.unlink(self.tmp)

    def abort(self) -> None:
        for closer in (self.tar.close, self.zw.close, self.raw.close):
            try:
                closer()
            except Exception:
                pass
        try:
            os.unlink(self.tmp)
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------- export
@dataclass
class _Counter:
    rows: int = 0
    nbytes: int = 0


async def export_tenant(
    conn,
    schema: TenantSchema,
    tenant: str,
    out: str | os.PathLike,
    *,
    data_format: str = "csv",
    progress: Progress | None = None,
    signer=None,
    through_proxy: bool = False,
    manifest_extra: dict | None = None,
    disclosure: dict | None = None,
) -> dict:
    """Export ``tenant`` to ``out`` (a directory, or a file ending in ``.tar.zst``).

    ``conn`` is an asyncpg connection allowed to read the tenant tables: the
    ``lifecycle.data_dsn`` role, or (``through_proxy``) a tenant's own session
    through tenantgate, where the tenant policy filters every COPY and row-level
    security is the proxy's business (:mod:`proxy.lifecycle.self_export`).
    ``manifest_extra`` adds keys to the manifest (never replaces one).
    ``disclosure``: the third-party demand and disclosure grant this export is made
    under (proxy.control.demands); kept in the signed manifest.
    Returns the manifest (also written as ``manifest.json``), signed with
    ``signer`` (the audit key, see :mod:`proxy.lifecycle.attest`) when given.
    """
    if data_format not in DATA_FORMATS:
        raise LifecycleError(INVALID_PARAMETER, f'unknown export format "{data_format}" (use csv or jsonl)')
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise LifecycleError(DUPLICATE_FILE, f'export path "{out}" already exists', hint="choose a new path")
    if not out.parent.is_dir():
        raise LifecycleError(IO_ERROR, f'directory "{out.parent}" does not exist')
    progress = progress or Progress()
    order = schema.import_order()
    try:
        sink = _TarZstSink(out) if is_archive_path(out) else _DirSink(out)
    except OSError as e:
        raise LifecycleError(IO_ERROR, f'cannot create export "{out}": {e.strerror or e}')
    open_files: list[IO[bytes]] = []
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            # The snapshot is taken by this first query of the transaction.
            snap = await conn.fetchrow(
                "SELECT clock_timestamp() AS t, pg_current_snapshot()::text AS snapshot, "
                "current_setting('server_version') AS server_version"
            )
            if not through_proxy:
                await scope_session(conn, schema, tenant, local=True)  # RLS must not hide rows
            # The table definitions the manifest describes must be those of this snapshot.
            seen = await discover(conn, schema.tenant_column, tables=[(t.schema, t.name) for t in schema.tables.values()])
            if through_proxy:  # the session's tenant is the proxy's: a different one is a misuse, not an export
                await _check_proxy_tenant(conn, tenant)
            if seen.schema_version() != schema.schema_version():
                raise LifecycleError(
                    OBJECT_NOT_IN_STATE, "the tenant tables changed while the export was starting", hint="run it again"
                )
            tables_doc = []
            for key in order:
                table = schema.tables[key]
                name = table_file_name(key, data_format)
                f = sink.open_member(name)
                open_files.append(f)
                sha = hashlib.sha256()
                counter = _Counter()
                progress.start(key)

                async def write(data: bytes, f=f, sha=sha, counter=counter) -> None:
                    f.write(data)
                    sha.update(data)
                    counter.nbytes += len(data)
                    if progress.enabled:  # bytes only: the row count comes from COPY at the end
                        progress.update(0, counter.nbytes)

                query, opts = copy_out_query(table, tenant, data_format)
                status = await conn.copy_from_query(query, output=write, **opts)
                rows = int(status.split()[-1])
                sink.close_member(name, f, snap["t"].timestamp())
                progress.done(rows, counter.nbytes)
                tables_doc.append(
                    {
                        "name": key,
                        "schema": table.schema,
                        "table": table.name,
                        "file": name,
                        "columns": [{"name": c.name, "type": c.type} for c in table.data_columns],
                        "rows": rows,
                        "bytes": counter.nbytes,
                        "sha256": sha.hexdigest(),
                    }
                )
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tenantgate_version": proxy.__version__,
            "schema_version": schema.schema_version(),
            "postgres_version": snap["server_version"],
            "tenant": tenant,
            "tenant_column": schema.tenant_column,
            "data_format": data_format,
            "snapshot_time": snap["t"].astimezone(timezone.utc).isoformat(),
            "snapshot": snap["snapshot"],
            "isolation": "REPEATABLE READ READ ONLY",
            "foreign_key_order": order,
            "foreign_keys": [
                {
                    "name": fk.name,
                    "table": fk.child,
                    "columns": list(fk.child_columns),
                    "references": fk.parent,
                    "referenced_columns": list(fk.parent_columns),
                }
                for fk in schema.foreign_keys
            ],
            "shared_tables": schema.shared_tables,
            "tables": tables_doc,
            "total_rows": sum(t["rows"] for t in tables_doc),
            "complete": True,
        }
        for k, v in (manifest_extra or {}).items():
            manifest.setdefault(k, v)
        if disclosure is not None:
            manifest["disclosure"] = disclosure
        manifest = attest.sign(manifest, signer)
        sink.finish(json.dumps(manifest, indent=2, ensure_ascii=False).encode() + b"\n")
    except BaseException as e:
        for f in open_files:
            try:
                f.close()
            except OSError:
                pass
        sink.abort()
        if isinstance(e, OSError):
            raise LifecycleError(
                IO_ERROR,
                f'could not write export "{out}": {e.strerror or e}',
                detail="the partial output was removed",
            ) from e
        raise
    return manifest


async def _check_proxy_tenant(conn, tenant: str) -> None:
    """Through tenantgate the tenant GUC is the proxy's binding; it must name the tenant exported."""
    bound = await conn.fetchval("SELECT current_setting('tenantgate.tenant_id', true)")
    if bound != tenant:
        raise LifecycleError(OBJECT_NOT_IN_STATE, f'the session is bound to tenant "{bound}", not "{tenant}"',
                             hint="connect through tenantgate with the tenant's own credential")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest_sha256(manifest: dict) -> str:
    """Hash of a manifest's canonical JSON (recorded in the audit chain on export)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()
