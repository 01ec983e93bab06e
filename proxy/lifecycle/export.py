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

:func:`verify_export` re-reads an export and checks each file's row count and
checksum against the manifest (and that no file is missing or extra).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import IO, Iterator

import zstandard

import proxy
from proxy.lifecycle.progress import Progress
from proxy.lifecycle.tables import (
    DATA_CORRUPTED,
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

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "tenantgate-tenant-export"
FORMAT_VERSION = 1
DATA_FORMATS = ("csv", "jsonl")
CHUNK = 1 << 16


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
) -> dict:
    """Export ``tenant`` to ``out`` (a directory, or a file ending in ``.tar.zst``).

    ``conn`` is an asyncpg connection allowed to read the tenant tables.
    Returns the manifest (also written as ``manifest.json``).
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
            await scope_session(conn, schema, tenant, local=True)  # RLS must not hide rows
            # The table definitions the manifest describes must be those of this snapshot.
            seen = await discover(conn, schema.tenant_column, tables=[(t.schema, t.name) for t in schema.tables.values()])
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
                    if progress.enabled:  # an estimate for the progress line; the count comes from COPY
                        counter.rows += data.count(b"\n")
                        progress.update(counter.rows, counter.nbytes)

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


# --------------------------------------------------------------------------- reading
class _HashingReader(io.RawIOBase):
    """A readable stream that hashes and counts what passes through it."""

    def __init__(self, inner: IO[bytes]):
        self.inner = inner
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.inner.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        self.nbytes += n
        return n


def count_records(stream: IO[bytes], data_format: str) -> int:
    """Data rows in a table file (CSV records minus the header, or JSON lines)."""
    if data_format == "jsonl":
        n = 0
        while chunk := stream.read(CHUNK):
            n += chunk.count(b"\n")
        return n
    text = io.TextIOWrapper(io.BufferedReader(stream, CHUNK), encoding="utf-8", newline="")
    reader = csv.reader(text, strict=True)
    n = -1  # header
    for _ in reader:
        n += 1
    return max(n, 0)


csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def _parse_manifest(raw: bytes, where: str) -> dict:
    try:
        m = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LifecycleError(DATA_CORRUPTED, f"{where}: manifest.json is not valid JSON: {e}")
    if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
        raise LifecycleError(DATA_CORRUPTED, f"{where}: manifest.json is not a tenantgate export manifest")
    if m.get("format_version") != FORMAT_VERSION:
        raise LifecycleError(DATA_CORRUPTED, f"{where}: unsupported export format version {m.get('format_version')!r}")
    if m.get("complete") is not True:
        raise LifecycleError(DATA_CORRUPTED, f"{where}: export is marked incomplete")
    try:
        for t in m["tables"]:
            for k in ("name", "file", "columns", "rows", "sha256"):
                t[k]
            if "/" in t["file"] or t["file"] in (MANIFEST_NAME, ".", ".."):
                raise LifecycleError(DATA_CORRUPTED, f"{where}: bad file name {t['file']!r} in manifest")
        m["tenant"], m["data_format"], m["foreign_key_order"]
    except (KeyError, TypeError) as e:
        raise LifecycleError(DATA_CORRUPTED, f"{where}: manifest.json lacks {e}")
    if m["data_format"] not in DATA_FORMATS:
        raise LifecycleError(DATA_CORRUPTED, f"{where}: unknown data format {m['data_format']!r}")
    return m


class ExportReader:
    """Read an export (directory or .tar.zst) member by member, in archive order."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise LifecycleError(IO_ERROR, f'export "{self.path}" does not exist')
        self.archive = self.path.is_file()

    def read_manifest_dir(self) -> dict:
        try:
            raw = (self.path / MANIFEST_NAME).read_bytes()
        except FileNotFoundError:
            raise LifecycleError(DATA_CORRUPTED, f'export "{self.path}" has no manifest.json (incomplete export?)')
        return _parse_manifest(raw, str(self.path))

    def members(self) -> Iterator[tuple[str, IO[bytes]]]:
        """Yield (name, stream) for each member; for directories, the manifest's files in order."""
        if not self.archive:
            manifest = self.read_manifest_dir()
            for t in manifest["tables"]:
                p = self.path / t["file"]
                try:
                    f = open(p, "rb")
                except FileNotFoundError:
                    raise LifecycleError(DATA_CORRUPTED, f'export file "{p}" is missing')
                with f:
                    yield t["file"], f
            return
        try:
            with open(self.path, "rb") as raw:
                zr = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
                with tarfile.open(fileobj=zr, mode="r|") as tar:
                    for info in tar:
                        if not info.isfile():
                            raise LifecycleError(DATA_CORRUPTED, f'archive "{self.path}": unexpected member {info.name!r}')
                        f = tar.extractfile(info)
                        yield info.name, f
        except (tarfile.TarError, zstandard.ZstdError, EOFError) as e:
            raise LifecycleError(DATA_CORRUPTED, f'archive "{self.path}" is truncated or corrupt: {e}')


def _check_member(manifest_table: dict, sha: str, rows: int, where: str) -> None:
    if sha != manifest_table["sha256"]:
        raise LifecycleError(
            DATA_CORRUPTED,
            f'checksum mismatch in export file "{where}"',
            detail=f"manifest says sha256 {manifest_table['sha256']}, file has {sha}",
        )
    if rows != manifest_table["rows"]:
        raise LifecycleError(
            DATA_CORRUPTED,
            f'row count mismatch in export file "{where}"',
            detail=f"manifest says {manifest_table['rows']} rows, file has {rows}",
        )


def verify_export(path: str | os.PathLike) -> dict:
    """Re-check every table file's row count and SHA-256 against the manifest.

    Returns the manifest; raises :class:`LifecycleError` (SQLSTATE XX001)
    naming the first missing, extra, truncated or modified file.
    """
    reader = ExportReader(path)
    seen: dict[str, tuple[str, int]] = {}
    manifest: dict | None = None
    data_format = None
    if not reader.archive:
        manifest = reader.read_manifest_dir()
        data_format = manifest["data_format"]
        listed = {t["file"] for t in manifest["tables"]} | {MANIFEST_NAME}
        extra = sorted(p.name for p in reader.path.iterdir() if p.name not in listed)
        if extra:
            raise LifecycleError(DATA_CORRUPTED, f'export "{reader.path}" holds a file not in the manifest: {extra[0]}')
    for name, stream in reader.members():
        if manifest is not None and name == MANIFEST_NAME:
            raise LifecycleError(DATA_CORRUPTED, f'archive "{reader.path}": duplicate manifest.json')
        if name == MANIFEST_NAME:
            manifest = _parse_manifest(stream.read(), str(reader.path))
            continue
        if name in seen:
            raise LifecycleError(DATA_CORRUPTED, f'archive "{reader.path}": duplicate member {name!r}')
        h = _HashingReader(stream)
        fmt = data_format or ("jsonl" if name.endswith(".jsonl") else "csv")
        where = str(reader.path / name) if not reader.archive else f"{reader.path}:{name}"
        try:
            rows = count_records(h, fmt)
        except (csv.Error, UnicodeDecodeError) as e:
            rows = -1  # unreadable: reported as a checksum mismatch below (or a parse error)
            while h.read(CHUNK):
                pass
        seen[name] = (h.sha.hexdigest(), rows)
    if manifest is None:
        raise LifecycleError(DATA_CORRUPTED, f'archive "{reader.path}" has no manifest.json (truncated or incomplete)')
    files = {t["file"]: t for t in manifest["tables"]}
    for name in seen:
        if name not in files:
            raise LifecycleError(DATA_CORRUPTED, f'export "{reader.path}" holds a file not in the manifest: {name}')
    for t in manifest["tables"]:
        where = f"{reader.path}:{t['file']}" if reader.archive else str(reader.path / t["file"])
        if t["file"] not in seen:
            raise LifecycleError(DATA_CORRUPTED, f'export file "{where}" is missing')
        sha, rows = seen[t["file"]]
        _check_member(t, sha, rows, where)
    return manifest


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest_sha256(manifest: dict) -> str:
    """Hash of a manifest's canonical JSON (recorded in the audit chain on export)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()
