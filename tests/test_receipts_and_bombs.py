"""Signed receipts and manifests (forged, altered, valid), and decompression / field bombs.

Receipts and manifests are checked through the real CLI (`tenantgate receipt
verify`, `tenantgate tenant verify-export`) with only the public key, as a
tenant's admin would.  Bombs are crafted archives of a few kilobytes; each is
verified in a subprocess whose address space is capped (RLIMIT_AS 300 MB): it
must fail with a clear 54000 error instead of exhausting memory.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import asyncpg
import pytest
import zstandard

from support.lifecycle_fixtures import SCHEMA_SQL, data_sql
from proxy.signing import Signer, key_id_of, load_private_key, new_signing_key_pem, sign_document
from proxy.lifecycle.archive import ReadLimits, verify_export
from proxy.lifecycle.export import export_tenant
from proxy.lifecycle.purge import PurgeOptions, check_receipt, purge_tenant
from proxy.lifecycle.tables import LifecycleError, discover

REPO = Path(__file__).resolve().parent.parent


def _signer(tmp_path: Path, name: str = "audit.key") -> tuple[Signer, Path]:
    priv, pub = new_signing_key_pem()
    (tmp_path / name).write_bytes(priv)
    (tmp_path / f"{name}.pub").write_bytes(pub)
    key = load_private_key(priv)
    return Signer(key, key_id_of(key.public_key())), tmp_path / f"{name}.pub"


def tg(*args: str, limit_as: int | None = None) -> subprocess.CompletedProcess:
    pre = None
    if limit_as:
        def pre():  # noqa: E306
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (limit_as, limit_as))
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120, preexec_fn=pre)


@pytest.fixture
async def db(make_db):
    _, dsn = make_db("receipts")
    conn = await asyncpg.connect(dsn)
    await conn.execute(SCHEMA_SQL)
    await conn.execute(data_sql("acme", 6))
    await conn.execute(data_sql("globex", 4))
    yield conn
    await conn.close()


# --------------------------------------------------------------------------- receipts


async def test_valid_forged_and_altered_receipts(db, tmp_path):
    signer, pub = _signer(tmp_path)
    s = await discover(db, "tenant_id")
    receipt = await purge_tenant(db, s, "globex", PurgeOptions(batch_rows=3, operator="alice", signer=signer))
    assert receipt["signature"]["key_id"] == signer.key_id
    keys = {signer.key_id: signer.public_key}
    assert check_receipt(receipt, keys)
    good = tmp_path / "receipt.json"
    good.write_text(json.dumps(receipt))
    r = tg("receipt", "verify", str(good), "--key", str(pub))
    assert r.returncode == 0, r.stderr
    assert 'deletion receipt OK: tenant "globex"' in r.stdout and signer.key_id in r.stdout

    # forged: made up from scratch, with a correct receipt_sha256 but no signature
    body = {k: v for k, v in receipt.items() if k not in ("signature",)}
    from proxy.lifecycle.purge import seal_receipt

    forged = seal_receipt({**body, "tenant": "acme", "total_rows": 0})
    assert not check_receipt(forged, keys)
    (tmp_path / "forged.json").write_text(json.dumps(forged))
    r = tg("receipt", "verify", str(tmp_path / "forged.json"), "--key", str(pub))
    assert r.returncode == 1 and "not signed" in r.stderr, r.stderr

    # forged: signed, but with another key
    other, _ = _signer(tmp_path, "other.key")
    (tmp_path / "other.json").write_text(json.dumps(sign_document(forged, other)))
    r = tg("receipt", "verify", str(tmp_path / "other.json"), "--key", str(pub))
    assert r.returncode == 1 and "unknown key" in r.stderr, r.stderr

    # altered: one count changed, receipt_sha256 recomputed, the signature kept
    altered = seal_receipt({**{k: v for k, v in receipt.items() if k != "signature"}, "verified_remaining_rows": 0,
                            "total_rows": receipt["total_rows"] + 1})
    altered["signature"] = receipt["signature"]
    assert not check_receipt(altered, keys)
    (tmp_path / "altered.json").write_text(json.dumps(altered))
    r = tg("receipt", "verify", str(tmp_path / "altered.json"), "--key", str(pub))
    assert r.returncode == 1 and "forged or altered" in r.stderr, r.stderr
    # altered without recomputing the checksum
    (tmp_path / "altered2.json").write_text(json.dumps({**receipt, "tenant": "acme"}))
    r = tg("receipt", "verify", str(tmp_path / "altered2.json"), "--key", str(pub))
    assert r.returncode == 1 and "altered" in r.stderr, r.stderr

    # no key: a usage error, not a pass
    r = tg("receipt", "verify", str(good))
    assert r.returncode == 2 and "no public key" in r.stderr


# --------------------------------------------------------------------------- manifests


async def test_valid_forged_and_altered_manifests(db, tmp_path):
    signer, pub = _signer(tmp_path)
    s = await discover(db, "tenant_id")
    out = tmp_path / "acme.tar.zst"
    manifest = await export_tenant(db, s, "acme", out, signer=signer)
    assert manifest["signature"]["key_id"] == signer.key_id
    r = tg("tenant", "verify-export", str(out), "--key", str(pub), "--config", str(tmp_path / "none.yaml"))
    assert r.returncode == 0, r.stderr
    r = tg("receipt", "verify", str(out), "--key", str(pub))
    assert r.returncode == 0 and "export manifest OK" in r.stdout and "checksum" in r.stdout, r.stderr

    # the same export in a directory: an altered manifest (rows of one table changed, files to match)
    d = tmp_path / "acme.dir"
    await export_tenant(db, s, "acme", d, signer=signer)
    r = tg("receipt", "verify", str(d / "manifest.json"), "--key", str(pub))
    assert r.returncode == 0, r.stderr
    m = json.loads((d / "manifest.json").read_text())
    m["tenant"] = "globex"
    (d / "manifest.json").write_text(json.dumps(m))
    r = tg("tenant", "verify-export", str(d), "--key", str(pub), "--config", str(tmp_path / "none.yaml"))
    assert r.returncode == 1 and "XX001" in r.stderr and "forged or altered" in r.stderr, r.stderr
    r = tg("receipt", "verify", str(d / "manifest.json"), "--key", str(pub))
    assert r.returncode == 1 and "forged or altered" in r.stderr

    # forged: an unsigned export (as anyone could write) fails, checksums notwithstanding
    u = tmp_path / "unsigned"
    await export_tenant(db, s, "acme", u)
    r = tg("tenant", "verify-export", str(u), "--key", str(pub), "--config", str(tmp_path / "none.yaml"))
    assert r.returncode == 1 and "not signed" in r.stderr, r.stderr
    r = tg("tenant", "verify-export", str(u), "--no-signature", "--config", str(tmp_path / "none.yaml"))
    assert r.returncode == 0, r.stderr
    r = tg("tenant", "verify-export", str(u), "--config", str(tmp_path / "none.yaml"))
    assert r.returncode == 2 and "no public key" in r.stderr


# --------------------------------------------------------------------------- bombs


def _pack(path: Path, members: list[tuple[str, bytes | int]], *, pax: dict | None = None, level: int = 3) -> Path:
    """A .tar.zst; an int member is that many zero... bytes written in chunks (never held in memory)."""
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=level).stream_writer(f) as zw, \
            tarfile.open(fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if pax:
                info.pax_headers = pax
            if isinstance(data, int):  # negative: a quoted value of many short lines
                info.size = abs(data)
                tar.addfile(info, _Repeat(data))
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _pax_bomb(path: Path, n: int) -> Path:
    """A PAX extended header of ``n`` bytes (tarfile would read it whole into memory), then a member."""
    with open(path, "wb") as f, zstandard.ZstdCompressor(level=3).stream_writer(f) as zw:
        h = tarfile.TarInfo("././@PaxHeader")
        h.type, h.size = tarfile.XHDTYPE, n
        zw.write(h.tobuf(format=tarfile.USTAR_FORMAT))
        chunk = b"x" * (1 << 20)
        for _ in range(n // len(chunk)):
            zw.write(chunk)
        zw.write(b"\0" * (-n % 512))
        m = tarfile.TarInfo("public.t.csv")
        m.size = 8
        zw.write(m.tobuf(format=tarfile.USTAR_FORMAT) + b"id,note\n".ljust(512, b"\0") + b"\0" * 1024)
    return path


class _Repeat(io.RawIOBase):
    """``n`` bytes of one CSV row's worth of 'a' (a single enormous field), produced lazily."""

    def __init__(self, n: int):
        self.left = abs(n)
        self.prefix = b'id,note\n1,"' if n < 0 else b""
        self.unit = b"a\n" if n < 0 else b"a"

    def readable(self):
        return True

    def readinto(self, b):
        k = min(len(b), self.left)
        data = (self.prefix + self.unit * (k // len(self.unit) + 1))[:k]
        self.prefix = b""
        b[:k] = data
        self.left -= k
        return k


MANIFEST = {"format": "tenantgate-tenant-export", "format_version": 1, "complete": True, "tenant": "acme",
            "tenant_column": "tenant_id", "data_format": "csv", "foreign_key_order": ["public.t"],
            "tables": [{"name": "public.t", "file": "public.t.csv", "rows": 1, "sha256": "0" * 64,
                        "columns": [{"name": "id", "type": "integer"}, {"name": "note", "type": "character varying(20)"}]}]}


def _verify_in_subprocess(path: Path, *extra: str) -> subprocess.CompletedProcess:
    args = extra if extra else ("--config", "/nonexistent.yaml")
    return tg("tenant", "verify-export", str(path), "--no-signature", *args, limit_as=300 << 20)


@pytest.mark.parametrize("bomb", ["huge_field", "huge_multiline_field", "huge_manifest", "huge_pax_header", "ratio"])
def test_bombs_fail_clearly_with_bounded_memory(tmp_path, bomb):
    p = tmp_path / f"{bomb}.tar.zst"
    extra: tuple[str, ...] = ()
    if bomb == "huge_field":  # one CSV value of 1 GB, with the ratio check switched off by the config
        _pack(p, [("public.t.csv", 1 << 30)])
        (tmp_path / "noratio.yaml").write_text("lifecycle:\n  max_compression_ratio: 1.0e+12\n")
        extra = ("--config", str(tmp_path / "noratio.yaml"))
        expect = "has a line longer than 67108864 bytes"
    elif bomb == "huge_multiline_field":  # short lines, but one quoted value spanning all of them
        _pack(p, [("public.t.csv", -(64 << 20))])
        (tmp_path / "noratio.yaml").write_text("lifecycle:\n  max_compression_ratio: 1.0e+12\n")
        extra = ("--config", str(tmp_path / "noratio.yaml"))
        expect = "has a value longer than 16777216 characters"
    elif bomb == "huge_manifest":
        _pack(p, [("manifest.json", 1 << 30)])
        expect = "manifest.json of 1073741824 bytes is larger than"
    elif bomb == "huge_pax_header":
        _pax_bomb(p, 256 << 20)
        expect = "tar header of"
    else:
        _pack(p, [("public.t.csv", b"id,note\n" + b"1,x\n" * (16 << 20))])
        expect = "refused as a decompression bomb"
    assert p.stat().st_size < 200_000, p.stat().st_size
    r = _verify_in_subprocess(p, *extra)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "54000" in r.stderr and expect in r.stderr, r.stderr[-2000:]
    assert "MemoryError" not in r.stderr and "Traceback" not in r.stderr


def test_field_longer_than_its_column_type_allows(tmp_path):
    d = tmp_path / "exp"
    d.mkdir()
    (d / "public.t.csv").write_bytes(b"id,note\n1,short\n2," + b"n" * 100 + b"\n")
    (d / "manifest.json").write_text(json.dumps(MANIFEST))
    with pytest.raises(LifecycleError) as e:
        verify_export(d)
    assert e.value.sqlstate == "54000" and 'column "note"' in e.value.message and "(28)" in e.value.message
    (d / "public.t.csv").write_bytes(b"id,note\n1,short\n" + b"12345678901234567890,x\n")
    with pytest.raises(LifecycleError) as e:
        verify_export(d)
    assert 'column "id"' in e.value.message


def test_limits_are_configurable(tmp_path):
    p = _pack(tmp_path / "r.tar.zst", [("public.t.csv", b"id,note\n" + b"1,x\n" * (1 << 20))])
    with pytest.raises(LifecycleError) as e:
        verify_export(p, limits=ReadLimits(max_compression_ratio=10, ratio_floor_bytes=1 << 20))
    assert e.value.sqlstate == "54000" and "lifecycle.max_compression_ratio" in (e.value.hint or "")
    with pytest.raises(LifecycleError) as e:  # allowed by the ratio: then the missing manifest is the problem
        verify_export(p, limits=ReadLimits(max_compression_ratio=1e9))
    assert e.value.sqlstate == "XX001"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lifecycle:\n  max_compression_ratio: 10\n")
    p = _pack(tmp_path / "r2.tar.zst", [("public.t.csv", b"id,note\n" + b"1,x\n" * (3 << 20))])  # past the floor
    r = tg("tenant", "verify-export", str(p), "--no-signature", "--config", str(cfg))
    assert r.returncode == 1 and "54000" in r.stderr and "expands more than 10 times" in r.stderr, r.stderr


async def test_import_applies_the_same_limits(db, tmp_path):
    from proxy.lifecycle.importer import import_tenant

    s = await discover(db, "tenant_id")
    p = _pack(tmp_path / "bomb.tar.zst", [("public.customers.csv", 1 << 30)])
    with pytest.raises(LifecycleError) as e:
        await import_tenant(db, s, "newco", p)
    assert e.value.sqlstate == "54000"
