"""Encrypted tenant backups: a tenant export sealed with the tenant's data key (AES-256-GCM, chunked).

``tenantgate tenant backup acme --out FILE`` exports the tenant (the same
``.tar.zst`` export as ``tenant export``, signed manifest included) into a
private temporary directory, and encrypts it into FILE with the tenant's data
key (:mod:`proxy.lifecycle.keys`); ``tenant restore-backup FILE`` decrypts it
into a private temporary file and loads it with the importer
(:mod:`proxy.lifecycle.importer`).  Memory stays bounded: the plaintext is
processed in ``CHUNK`` pieces.

File layout::

    b"TGBACKUP1\\n"
    u32 big-endian header length, header (JSON: format, tenant, key_id, master_key_id, nonce_prefix, ...)
    records: u8 flag (0 = more follow, 1 = last) | u32 ciphertext length | ciphertext (with its 16-byte tag)

Each record is AES-256-GCM with nonce ``nonce_prefix (8 random bytes) || u32
counter``, and as associated data the SHA-256 of the header, the counter and
the flag: a changed header, reordered, dropped or appended records, or a file
cut short (no record flagged last) all fail to decrypt.  Only the data key
decrypts; once a purge destroyed it, nothing does.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from pathlib import Path
from typing import IO, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from proxy.lifecycle.keys import DataKey, MasterKey
from proxy.lifecycle.tables import DATA_CORRUPTED, DUPLICATE_FILE, IO_ERROR, LifecycleError

MAGIC = b"TGBACKUP1\n"
FORMAT = "tenantgate-tenant-backup"
CHUNK = 1 << 20
MAX_HEADER = 64 << 10
MAX_RECORD = CHUNK + 16


def encrypt_file(src: IO[bytes], out: IO[bytes], key: DataKey, master: MasterKey, meta: dict) -> dict:
    """Encrypt ``src`` into ``out``; returns the header written."""
    header = {"format": FORMAT, "version": 1, "cipher": "AES-256-GCM", "chunk_bytes": CHUNK,
              "tenant": key.tenant, "key_id": key.key_id, "master_key_id": master.key_id,
              "nonce_prefix": secrets.token_bytes(8).hex(), **meta}
    hb = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    out.write(MAGIC + struct.pack(">I", len(hb)) + hb)
    aead, prefix, hh = AESGCM(key.key), bytes.fromhex(header["nonce_prefix"]), hashlib.sha256(hb).digest()
    counter = 0
    chunk = src.read(CHUNK)
    while True:
        nxt = src.read(CHUNK) if chunk else b""
        last = not nxt
        ct = aead.encrypt(prefix + struct.pack(">I", counter), chunk, _aad(hh, counter, last))
        out.write(struct.pack(">BI", 1 if last else 0, len(ct)) + ct)
        if last:
            return header
        counter += 1
        if counter >= 2**32:
            raise LifecycleError(IO_ERROR, "backup too large for one file")
        chunk = nxt


def _aad(header_hash: bytes, counter: int, last: bool) -> bytes:
    return header_hash + struct.pack(">IB", counter, 1 if last else 0)


def read_header(f: IO[bytes], where: str) -> tuple[dict, bytes]:
    """The header of a backup file (and its bytes); a clear error when it is not one."""
    if f.read(len(MAGIC)) != MAGIC:
        raise LifecycleError(DATA_CORRUPTED, f"{where} is not a tenantgate backup")
    raw = f.read(4)
    if len(raw) != 4 or struct.unpack(">I", raw)[0] > MAX_HEADER:
        raise LifecycleError(DATA_CORRUPTED, f"{where}: damaged backup header")
    hb = f.read(struct.unpack(">I", raw)[0])
    try:
        header = json.loads(hb)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LifecycleError(DATA_CORRUPTED, f"{where}: damaged backup header")
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != 1 \
            or not all(isinstance(header.get(k), str) for k in ("tenant", "key_id", "nonce_prefix")):
        raise LifecycleError(DATA_CORRUPTED, f"{where}: not a version 1 tenantgate backup")
    return header, hb


def decrypt_records(f: IO[bytes], key: DataKey, header: dict, hb: bytes, where: str) -> Iterator[bytes]:
    """The plaintext chunks of a backup, each authenticated before it is yielded."""
    aead, prefix, hh = AESGCM(key.key), bytes.fromhex(header["nonce_prefix"]), hashlib.sha256(hb).digest()
    counter = 0
    while True:
        raw = f.read(5)
        if len(raw) != 5:
            raise LifecycleError(DATA_CORRUPTED, f"{where}: the backup is truncated")
        flag, n = struct.unpack(">BI", raw)
        if flag not in (0, 1) or n > MAX_RECORD:
            raise LifecycleError(DATA_CORRUPTED, f"{where}: damaged backup record {counter}")
        ct = f.read(n)
        if len(ct) != n:
            raise LifecycleError(DATA_CORRUPTED, f"{where}: the backup is truncated")
        try:
            yield aead.decrypt(prefix + struct.pack(">I", counter), ct, _aad(hh, counter, flag == 1))
        except InvalidTag:
            raise LifecycleError(DATA_CORRUPTED, f"{where}: backup record {counter} fails authentication "
                                                 "(altered, reordered, or another key)")
        if flag == 1:
            if f.read(1):
                raise LifecycleError(DATA_CORRUPTED, f"{where}: data after the last backup record")
            return
        counter += 1


def private_workdir(near: Path) -> Path:
    """A fresh mode-0700 directory next to ``near`` for plaintext that must not be left around."""
    d = near.parent / f".tenantgate-backup-{os.getpid()}-{secrets.token_hex(4)}"
    d.mkdir(mode=0o700)
    return d


def open_new(path: Path) -> IO[bytes]:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise LifecycleError(DUPLICATE_FILE, f'backup path "{path}" already exists', hint="choose a new path")
    return os.fdopen(fd, "wb")
