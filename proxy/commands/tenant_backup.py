"""`tenantgate tenant backup | restore-backup | backup-keygen`: encrypted, crypto-shreddable tenant backups.

    tenantgate tenant backup-keygen --out /etc/tenantgate/backup-master.key   # lifecycle.backup_master_key_file
    tenantgate tenant backup acme --out acme-2026-12.tgbk --as alice          # read grant on acme
    tenantgate tenant restore-backup acme-2026-12.tgbk --as alice             # write grant; acme must be empty

The backup is the tenant's export (signed manifest included), encrypted with
the tenant's data key (proxy/lifecycle/backup.py, keys.py).  Purging the
tenant destroys that key, so every such backup becomes unreadable; the
deletion receipt says so.  Both actions are in the audit chain (before and
after), refusals too.  See docs/lifecycle.md, "Backups that deletion reaches".
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from proxy.signing import signer_from_config, verify_keys_from_config
from proxy.lifecycle.tables import DUPLICATE_FILE, OBJECT_NOT_IN_STATE, LifecycleError

BACKUP = "tenant.backup"
RESTORE = "tenant.restore_backup"


def register(tsub, add, common, actor, granted) -> None:
    """Called from proxy.commands.tenant.register (one line there)."""
    sp = add("backup", _backup, "write an encrypted backup of a tenant (read grant)", [common, actor, granted])
    sp.add_argument("tenant")
    sp.add_argument("--out", required=True, help="the backup file to create")
    sp = add("restore-backup", _restore, "decrypt a tenant backup and load it into the empty tenant (write grant)",
             [common, actor, granted])
    sp.add_argument("file")
    sp = tsub.add_parser("backup-keygen", help="create a backup master key file (32 random bytes, base64)")
    sp.add_argument("--out", required=True, help="key file to create (mode 0600)")
    sp.set_defaults(func=_keygen)


def _keygen(args) -> int:
    import sys

    from proxy.lifecycle.keys import new_master_key_text

    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"ERROR:  {args.out} already exists (SQLSTATE {DUPLICATE_FILE})", file=sys.stderr)
        return 1
    with os.fdopen(fd, "w") as f:
        f.write(new_master_key_text())
    print(f"wrote {args.out}: set lifecycle.backup_master_key_file to it, and keep a copy outside the database host")
    return 0


async def _backup(args) -> int:
    from proxy.commands.tenant_context import DONE, FAILED, _context, _data, _print_json, _schema
    from proxy.lifecycle.backup import encrypt_file, open_new, private_workdir
    from proxy.lifecycle.export import export_tenant, manifest_sha256
    from proxy.lifecycle.keys import master_key_from_config, tenant_data_key

    out = Path(args.out)
    async with _context(args) as ctx:
        await ctx.authenticate("backup", args.tenant)
        from proxy.control.placement import tenant_config

        ctx.cfg = await tenant_config(ctx.plane, ctx.cfg, args.tenant)  # the server of the tenant's region
        t = await ctx.tenant(args.tenant, "backup")
        if t.status == "purged" or t.purge_started_at is not None:
            raise await ctx.refuse(LifecycleError(
                OBJECT_NOT_IN_STATE, f'tenant "{t.name}" has been {"purged" if t.status == "purged" else "or is being purged"}: '
                "nothing to back up"), t.name, "backup")
        g = await ctx.grant(t.name, "read", "backup")
        try:
            master = master_key_from_config(ctx.cfg.lifecycle)
        except LifecycleError as e:
            raise await ctx.refuse(e, t.name, "backup")
        if out.exists() or out.is_symlink():
            raise await ctx.refuse(LifecycleError(DUPLICATE_FILE, f'backup path "{out}" already exists'), t.name, "backup")
        await ensure_rights_schema(ctx.plane)
        async with ctx.plane.pool.acquire() as cconn:
            key = await tenant_data_key(cconn, ctx.plane.s, t.name, master, create=True)
        seq = await ctx.audit(BACKUP, grant_id=g.id, tenant=t.name,
                              detail={"out": os.path.abspath(out), "key_id": key.key_id})
        t0 = time.monotonic()
        work = private_workdir(out.resolve())
        partial = out.parent / f".{out.name}.partial-{os.getpid()}"
        try:
            plain = work / "export.tar.zst"
            async with _data(ctx.cfg) as conn:
                schema = await _schema(ctx.cfg, conn)
                manifest = await export_tenant(conn, schema, t.name, plain, signer=signer_from_config(ctx.cfg.audit))
            with open(plain, "rb") as src, open_new(partial) as dst:
                encrypt_file(src, dst, key, master, {"snapshot_time": manifest["snapshot_time"],
                                                     "total_rows": manifest["total_rows"]})
                dst.flush()
                os.fsync(dst.fileno())
            try:
                os.link(partial, out)  # never clobbers a file that appeared meanwhile
            except FileExistsError:
                raise LifecycleError(DUPLICATE_FILE, f'backup path "{out}" already exists')
        except Exception as e:
            await ctx.audit(BACKUP + FAILED, grant_id=g.id, tenant=t.name, ref_seq=seq,
                            sqlstate=getattr(e, "sqlstate", "XX000"), detail={"message": str(getattr(e, "message", e))})
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
            try:
                os.unlink(partial)
            except FileNotFoundError:
                pass
        await ctx.audit(BACKUP + DONE, grant_id=g.id, tenant=t.name, ref_seq=seq, rows=manifest["total_rows"],
                        duration_us=int((time.monotonic() - t0) * 1e6),
                        detail={"key_id": key.key_id, "manifest_sha256": manifest_sha256(manifest),
                                "snapshot_time": manifest["snapshot_time"]})
    _print_json({"tenant": t.name, "out": str(out), "key_id": key.key_id, "total_rows": manifest["total_rows"],
                 "snapshot_time": manifest["snapshot_time"]})
    return 0


async def _restore(args) -> int:
    from proxy.commands.receipt import read_limits
    from proxy.commands.tenant_context import DONE, FAILED, _context, _data, _print_json, _schema
    from proxy.lifecycle.backup import decrypt_records, private_workdir, read_header
    from proxy.lifecycle.importer import import_tenant
    from proxy.lifecycle.keys import data_key_by_id, master_key_from_config

    path = Path(args.file)
    with open(path, "rb") as f:
        header, _ = read_header(f, str(path))
    tenant = header["tenant"]
    async with _context(args) as ctx:
        await ctx.authenticate("restore-backup", tenant)
        from proxy.control.placement import tenant_config

        ctx.cfg = await tenant_config(ctx.plane, ctx.cfg, tenant)  # the server of the tenant's region
        t = await ctx.tenant(tenant, "restore-backup")
        g = await ctx.grant(t.name, "write", "restore-backup")
        await ensure_rights_schema(ctx.plane)
        try:
            master = master_key_from_config(ctx.cfg.lifecycle)
            async with ctx.plane.pool.acquire() as cconn:
                key = await data_key_by_id(cconn, ctx.plane.s, header["key_id"], t.name, master)
        except LifecycleError as e:
            raise await ctx.refuse(e, t.name, "restore-backup")
        if t.status != "active":
            raise await ctx.refuse(LifecycleError(
                OBJECT_NOT_IN_STATE, f'tenant "{t.name}" is {t.status}: a backup loads only into an active tenant with no rows'),
                t.name, "restore-backup")
        seq = await ctx.audit(RESTORE, grant_id=g.id, tenant=t.name,
                              detail={"path": os.path.abspath(path), "key_id": key.key_id})
        t0 = time.monotonic()
        work = private_workdir(path.resolve())
        try:
            plain = work / "export.tar.zst"
            with open(path, "rb") as f, open(plain, "xb") as dst:
                header, hb = read_header(f, str(path))
                for chunk in decrypt_records(f, key, header, hb, str(path)):
                    dst.write(chunk)
            async with _data(ctx.cfg) as conn:
                schema = await _schema(ctx.cfg, conn)
                result = await import_tenant(conn, schema, t.name, plain, limits=read_limits(ctx.cfg),
                                             keys=verify_keys_from_config(ctx.cfg.audit) or None)
        except Exception as e:
            await ctx.audit(RESTORE + FAILED, grant_id=g.id, tenant=t.name, ref_seq=seq,
                            sqlstate=getattr(e, "sqlstate", "XX000"), detail={"message": str(getattr(e, "message", e))})
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        await ctx.audit(RESTORE + DONE, grant_id=g.id, tenant=t.name, ref_seq=seq, rows=result["total_rows"],
                        duration_us=int((time.monotonic() - t0) * 1e6), detail={"tables": result["tables"]})
    _print_json({"tenant": t.name, "total_rows": result["total_rows"], "tables": result["tables"]})
    return 0


async def ensure_rights_schema(plane) -> None:
    from proxy.control.demands import ensure_schema

    await ensure_schema(plane)


def key_destroyer(ctx, tenant: str, operator: str | None):
    """For PurgeOptions.destroy_keys: destroy the tenant's backup data keys (and audit it) once the purge
    verified every row gone.  Needs no master key: destroying is overwriting the wrapped key."""
    async def destroy() -> list[dict]:
        from proxy.control.audit import AuditRecord
        from proxy.lifecycle.keys import destroy_tenant_keys

        await ensure_rights_schema(ctx.plane)
        async with ctx.plane._tx() as conn:
            keys = await destroy_tenant_keys(conn, ctx.plane.s, tenant, operator)
            await ctx.plane._in_tx_audit(conn, [AuditRecord(
                "tenant.keys_destroyed", operator=operator, tenant=tenant, detail={"keys": keys})])
        return keys

    return destroy
