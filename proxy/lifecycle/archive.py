"""Reading an export safely: the format, the reader, verification, and the limits against bombs.

An export comes from outside (a tenant's admin keeps it; import loads it
back), so reading one must not let a few kilobytes cost gigabytes.  Every
read goes through :class:`ExportReader` under :class:`ReadLimits`:

* **Compression ratio** (``lifecycle.max_compression_ratio``): decompressed
  bytes may not exceed ``ratio x compressed bytes`` (after a floor of
  ``ratio_floor_bytes``); checked on every read of the zstd stream, so a tar
  header or member that expands without bound is refused while it expands.
  The zstd window is capped too (``max_window_bytes``), so a frame cannot
  demand a huge decoding buffer.
* **Tar headers**: PAX and GNU long-name headers are held in memory by
  :mod:`tarfile`; one larger than ``max_header_bytes`` is refused before it is
  read.
* **The manifest** is read with a size limit (``lifecycle.max_manifest_bytes``)
  and parsed from at most that many bytes; nesting is bounded by the parser.
* **CSV fields** are capped at the column type's limit (``varchar(n)``: n
  characters; numbers, dates, uuid, ...: their longest text form) and never
  beyond ``lifecycle.max_field_bytes``; JSON Lines rows at that limit times
  the number of columns.  The CSV parser's buffer is bounded by the cap.

A limit that is hit raises :class:`~proxy.lifecycle.tables.LifecycleError`
with SQLSTATE 54000 (program_limit_exceeded), naming the file, the limit and
the config key to raise it.  Checksum and count mismatches are XX001.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import zstandard

from proxy.lifecycle.tables import DATA_CORRUPTED, IO_ERROR, LifecycleError

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "tenantgate-tenant-export"
FORMAT_VERSION = 1
DATA_FORMATS = ("csv", "jsonl")
CHUNK = 1 << 16
PROGRAM_LIMIT_EXCEEDED = "54000"


@dataclass(frozen=True)
class ReadLimits:
    max_compression_ratio: float = 1000.0
    ratio_floor_bytes: int = 8 << 20  # below this much output the ratio is not checked
    max_manifest_bytes: int = 16 << 20
    max_field_bytes: int = 16 << 20  # the csv parser holds a value as UCS-4: 64 MB at most
    max_header_bytes: int = 1 << 20  # one PAX / GNU long-name header
    max_window_bytes: int = 1 << 27  # zstd window (our exports use far less)
    max_members: int = 100_000

    @classmethod
    def from_config(cls, lifecycle_cfg) -> "ReadLimits":
        kw = {}
        for name in ("max_compression_ratio", "max_manifest_bytes", "max_field_bytes"):
            v = getattr(lifecycle_cfg, name, None)
            if v is not None:
                kw[name] = v
        return cls(**kw)


def _limit_error(what: str, hint: str) -> LifecycleError:
    return LifecycleError(PROGRAM_LIMIT_EXCEEDED, what, hint=hint)


# --------------------------------------------------------------------------- column limits
_FIXED = {  # longest text form of fixed-size types (with slack)
    "smallint": 8, "integer": 16, "bigint": 24, "boolean": 8, "real": 64, "double precision": 64,
    "uuid": 40, "date": 32, "time without time zone": 32, "time with time zone": 40,
    "timestamp without time zone": 64, "timestamp with time zone": 64, "interval": 128,
    "money": 64, "oid": 16, "inet": 64, "cidr": 64, "macaddr": 32, "macaddr8": 32,
    "numeric": 131072 + 16383 + 8,
}
_SIZED = re.compile(r"^(?:character varying|varchar|character|char|bpchar|bit varying|bit)\((\d+)\)$")


def field_limit(type_name: str, cap: int) -> int:
    """The longest CSV field a column of ``type_name`` can hold (characters), at most ``cap``."""
    t = (type_name or "").strip().lower()
    if t.endswith("[]"):
        return cap
    m = _SIZED.match(t)
    if m:
        return min(cap, int(m.group(1)) + 8)
    base = re.sub(r"\(.*\)", "", t).strip()
    if base in _FIXED:
        return min(cap, _FIXED[base])
    return cap


# --------------------------------------------------------------------------- bounded streams
class _CountingReader(io.RawIOBase):
    """The compressed file, counting what the decompressor consumes."""

    def __init__(self, inner: IO[bytes]):
        self.inner = inner
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.inner.read(len(b))
        n = len(data)
        b[:n] = data
        self.nbytes += n
        return n


class _RatioGuard(io.RawIOBase):
    """Decompressed bytes, refused once they exceed ratio x compressed bytes (after a floor)."""

    def __init__(self, decompressed: IO[bytes], compressed: _CountingReader, limits: ReadLimits, where: str):
        self.inner = decompressed
        self.compressed = compressed
        self.limits = limits
        self.where = where
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.inner.read(min(len(b), CHUNK))
        n = len(data)
        b[:n] = data
        self.nbytes += n
        lim = self.limits
        if self.nbytes > lim.ratio_floor_bytes and self.nbytes > lim.max_compression_ratio * max(self.compressed.nbytes, 1):
            raise _limit_error(
                f'archive "{self.where}" expands more than {lim.max_compression_ratio:g} times '
                f"({self.compressed.nbytes} compressed bytes gave {self.nbytes}): refused as a decompression bomb",
                "raise lifecycle.max_compression_ratio if this export is genuine")
        return n


def _limited_tarinfo(limits: ReadLimits, where: str):
    class LimitedTarInfo(tarfile.TarInfo):
        """Refuses a PAX or GNU long-name header too large to hold in memory (tarfile reads it whole)."""

        def _check(self):
            if self.size > limits.max_header_bytes:
                raise _limit_error(f'archive "{where}": a tar header of {self.size} bytes exceeds the limit of '
                                   f"{limits.max_header_bytes}", "this is not an export tenantgate writes")

        def _proc_pax(self, tf):
            self._check()
            return super()._proc_pax(tf)

        def _proc_gnulong(self, tf):
            self._check()
            return super()._proc_gnulong(tf)

        def _proc_sparse(self, tf):
            raise tarfile.HeaderError("sparse members are not part of an export")

    return LimitedTarInfo


def _read_limited(stream: IO[bytes], limit: int, what: str) -> bytes:
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise _limit_error(f"{what} is larger than {limit} bytes", "raise lifecycle.max_manifest_bytes if genuine")
    return data


# --------------------------------------------------------------------------- reading
class HashingReader(io.RawIOBase):
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


@dataclass
class FileScan:
    """What one pass over a table file found: rows, the CSV header and the longest value per column
    (CSV) or the longest line (JSON Lines)."""

    rows: int
    header: list[str]
    longest: list[int]


def scan_records(stream: IO[bytes], data_format: str, *, limits: ReadLimits, where: str) -> FileScan:
    """Count the rows of a table file; no value may exceed ``limits.max_field_bytes`` (which bounds the
    parser's memory).  Per-column type limits are checked by :func:`check_field_limits`."""
    cap = limits.max_field_bytes
    if data_format == "jsonl":
        line_cap = cap * 64  # a row holds many values; the exact bound needs the columns (check_field_limits)
        n, line, longest = 0, 0, 0
        while chunk := stream.read(CHUNK):
            start = 0
            while (i := chunk.find(b"\n", start)) >= 0:
                line += i - start
                longest = max(longest, line)
                n, line, start = n + 1, 0, i + 1
            line += len(chunk) - start
            longest = max(longest, line)
            if longest > line_cap:
                raise _limit_error(f'row {n + 1} of "{where}" is longer than {line_cap} bytes',
                                   "raise lifecycle.max_field_bytes if this export is genuine")
        return FileScan(n, [], [longest])
    # The line reader must not buffer an endless line either: lines are capped below it.
    text = io.TextIOWrapper(io.BufferedReader(_LineCap(stream, 4 * cap, where), CHUNK), encoding="utf-8", newline="")
    old = csv.field_size_limit(cap)  # bounds the parser's buffer (the CLI is single-threaded)
    n = 0
    try:
        reader = csv.reader(text, strict=True)
        header = next(reader, None)
        if header is None:
            return FileScan(0, [], [])
        longest = [0] * len(header)
        width = len(header)
        for row in reader:
            n += 1
            for i, value in enumerate(row[:width]):
                if len(value) > longest[i]:
                    longest[i] = len(value)
        return FileScan(n, header, longest)
    except csv.Error as e:
        if "field larger than field limit" in str(e):
            raise _limit_error(f'row {n + 1} of "{where}" has a value longer than {cap} characters',
                               "raise lifecycle.max_field_bytes if this export is genuine")
        raise
    finally:
        csv.field_size_limit(old)


class _LineCap(io.RawIOBase):
    """Passes bytes through, refusing a line longer than ``cap`` (a line reader would buffer it whole)."""

    def __init__(self, inner: IO[bytes], cap: int, where: str):
        self.inner, self.cap, self.where = inner, cap, where
        self.run = 0  # bytes since the last newline

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.inner.read(min(len(b), CHUNK))
        n = len(data)
        b[:n] = data
        i = data.rfind(b"\n")
        self.run = self.run + n if i < 0 else n - i - 1
        if self.run > self.cap:
            raise _limit_error(f'"{self.where}" has a line longer than {self.cap} bytes',
                               "raise lifecycle.max_field_bytes if this export is genuine")
        return n


def check_field_limits(scan: FileScan, columns: list[dict], data_format: str, limits: ReadLimits, where: str) -> None:
    """Refuse values longer than their column's type allows (see :func:`field_limit`)."""
    cap = limits.max_field_bytes
    if data_format == "jsonl":
        line_cap = cap * max(1, len(columns)) + 1024
        if scan.longest and scan.longest[0] > line_cap:
            raise _limit_error(f'"{where}" has a row of {scan.longest[0]} bytes, more than {line_cap} for '
                               f"{len(columns)} columns", "raise lifecycle.max_field_bytes if this export is genuine")
        return
    types = {c.get("name"): c.get("type", "") for c in columns}
    for name, length in zip(scan.header, scan.longest):
        lim = field_limit(types.get(name, ""), cap)
        if length > lim:
            raise _limit_error(f'"{where}": column "{name}" holds a value of {length} characters, more than its '
                               f"type {types.get(name)!r} allows ({lim})",
                               "the file was not written by tenantgate export, or was altered")


def count_records(stream: IO[bytes], data_format: str, *, columns: list[dict] | None = None,
                  limits: ReadLimits | None = None, where: str = "export file") -> int:
    """Data rows in a table file (CSV records minus the header, or JSON lines), within the limits."""
    limits = limits or ReadLimits()
    scan = scan_records(stream, data_format, limits=limits, where=where)
    if columns is not None:
        check_field_limits(scan, columns, data_format, limits, where)
    return scan.rows


def parse_manifest(raw: bytes, where: str) -> dict:
    try:
        m = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise LifecycleError(DATA_CORRUPTED, f"{where}: manifest.json is not valid JSON: {str(e)[:200]}")
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
            if not isinstance(t["file"], str) or "/" in t["file"] or t["file"] in (MANIFEST_NAME, ".", ".."):
                raise LifecycleError(DATA_CORRUPTED, f"{where}: bad file name {t['file']!r} in manifest")
            if not isinstance(t["columns"], list) or not all(isinstance(c, dict) for c in t["columns"]):
                raise LifecycleError(DATA_CORRUPTED, f"{where}: bad column list for {t['file']!r} in manifest")
        m["tenant"], m["data_format"], m["foreign_key_order"]
    except (KeyError, TypeError) as e:
        raise LifecycleError(DATA_CORRUPTED, f"{where}: manifest.json lacks {e}")
    if m["data_format"] not in DATA_FORMATS:
        raise LifecycleError(DATA_CORRUPTED, f"{where}: unknown data format {m['data_format']!r}")
    return m


class ExportReader:
    """Read an export (directory or .tar.zst) member by member, in archive order, within ``limits``."""

    def __init__(self, path: str | os.PathLike, limits: ReadLimits | None = None):
        self.path = Path(path)
        self.limits = limits or ReadLimits()
        if not self.path.exists():
            raise LifecycleError(IO_ERROR, f'export "{self.path}" does not exist')
        self.archive = self.path.is_file()

    def read_manifest_dir(self) -> dict:
        try:
            with open(self.path / MANIFEST_NAME, "rb") as f:
                raw = _read_limited(f, self.limits.max_manifest_bytes, f'"{self.path / MANIFEST_NAME}"')
        except FileNotFoundError:
            raise LifecycleError(DATA_CORRUPTED, f'export "{self.path}" has no manifest.json (incomplete export?)')
        return parse_manifest(raw, str(self.path))

    def read_manifest_member(self, info: tarfile.TarInfo, stream: IO[bytes]) -> dict:
        if info.size > self.limits.max_manifest_bytes:
            raise _limit_error(f'archive "{self.path}": manifest.json of {info.size} bytes is larger than '
                               f"{self.limits.max_manifest_bytes}", "raise lifecycle.max_manifest_bytes if genuine")
        return parse_manifest(_read_limited(stream, self.limits.max_manifest_bytes, "manifest.json"), str(self.path))

    def members(self) -> Iterator[tuple[str, IO[bytes]]]:
        """Yield (name, stream) for each member; for directories, the manifest's files in order.
        For archives, ``self.current`` is the member's TarInfo."""
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
                counted = _CountingReader(raw)
                dctx = zstandard.ZstdDecompressor(max_window_size=self.limits.max_window_bytes)
                zr = dctx.stream_reader(counted, read_across_frames=True)
                guarded = _RatioGuard(zr, counted, self.limits, str(self.path))
                with tarfile.open(fileobj=guarded, mode="r|",
                                  tarinfo=_limited_tarinfo(self.limits, str(self.path))) as tar:
                    for n, info in enumerate(tar):
                        if n >= self.limits.max_members:
                            raise _limit_error(f'archive "{self.path}" has more than {self.limits.max_members} '
                                               "members", "this is not an export tenantgate writes")
                        if not info.isfile():
                            raise LifecycleError(DATA_CORRUPTED, f'archive "{self.path}": unexpected member {info.name!r}')
                        self.current = info
                        yield info.name, tar.extractfile(info)
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


def check_manifest_signature(manifest: dict, keys: dict | None, where) -> None:
    """The manifest's Ed25519 signature (proxy.lifecycle.attest), when ``keys`` is given."""
    if keys is None:
        return
    from proxy.signing import SignatureError
    from proxy.lifecycle.attest import verify_document

    try:
        verify_document(manifest, keys)
    except SignatureError as e:
        hint = "only an export whose manifest carries tenantgate's signature can be trusted"
        if manifest.get("exported_by") == "tenant" and "signature" not in manifest:
            hint = ("a self-service export (tenantgate export --dsn) is not signed: check its checksums with "
                    "--no-signature; the audit chain holds its manifest's SHA-256")
        raise LifecycleError(DATA_CORRUPTED, f'export "{where}": {e}', hint=hint)


def verify_export(path: str | os.PathLike, *, keys: dict | None = None, limits: ReadLimits | None = None) -> dict:
    """Re-check every table file's row count and SHA-256 against the manifest, and, with ``keys``,
    the manifest's signature.

    Returns the manifest; raises :class:`LifecycleError` (SQLSTATE XX001)
    naming the first missing, extra, truncated or modified file, or 54000
    when the export exceeds a :class:`ReadLimits` limit.
    """
    reader = ExportReader(path, limits)
    seen: dict[str, tuple[str, int]] = {}
    scans: dict[str, tuple[FileScan, str, str]] = {}  # field limits are checked once the manifest is known
    manifest: dict | None = None
    if not reader.archive:
        manifest = reader.read_manifest_dir()
        check_manifest_signature(manifest, keys, reader.path)
        listed = {t["file"] for t in manifest["tables"]} | {MANIFEST_NAME}
        extra = sorted(p.name for p in reader.path.iterdir() if p.name not in listed)
        if extra:
            raise LifecycleError(DATA_CORRUPTED, f'export "{reader.path}" holds a file not in the manifest: {extra[0]}')
    for name, stream in reader.members():
        if manifest is not None and name == MANIFEST_NAME:
            raise LifecycleError(DATA_CORRUPTED, f'archive "{reader.path}": duplicate manifest.json')
        if name == MANIFEST_NAME:
            manifest = reader.read_manifest_member(reader.current, stream)
            continue
        if name in seen:
            raise LifecycleError(DATA_CORRUPTED, f'archive "{reader.path}": duplicate member {name!r}')
        h = HashingReader(stream)
        fmt = manifest["data_format"] if manifest else ("jsonl" if name.endswith(".jsonl") else "csv")
        where = str(reader.path / name) if not reader.archive else f"{reader.path}:{name}"
        try:
            scan = scan_records(h, fmt, limits=reader.limits, where=where)
            rows = scan.rows
            scans[name] = (scan, fmt, where)
        except (csv.Error, UnicodeDecodeError):
            rows = -1  # unreadable: reported as a checksum mismatch below (or a parse error)
            while h.read(CHUNK):
                pass
        seen[name] = (h.sha.hexdigest(), rows)
    if manifest is None:
        raise LifecycleError(DATA_CORRUPTED, f'archive "{reader.path}" has no manifest.json (truncated or incomplete)')
    if reader.archive:
        check_manifest_signature(manifest, keys, reader.path)
    files = {t["file"]: t for t in manifest["tables"]}
    for name in seen:
        if name not in files:
            raise LifecycleError(DATA_CORRUPTED, f'export "{reader.path}" holds a file not in the manifest: {name}')
    for t in manifest["tables"]:
        where = f"{reader.path}:{t['file']}" if reader.archive else str(reader.path / t["file"])
        if t["file"] not in seen:
            raise LifecycleError(DATA_CORRUPTED, f'export file "{where}" is missing')
        if t["file"] in scans:
            scan, fmt, where = scans[t["file"]]
            check_field_limits(scan, t["columns"], manifest["data_format"], reader.limits, where)
        sha, rows = seen[t["file"]]
        _check_member(t, sha, rows, where)
    return manifest
