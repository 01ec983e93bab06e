"""Delete every row of one tenant, children first, in short batches, with a receipt.

:func:`purge_tenant` deletes the tenant's rows table by table in
:meth:`TenantSchema.purge_components` order (children before the parents they
reference).  Each batch is its own short transaction::

    DELETE FROM t WHERE ctid = ANY(ARRAY(SELECT ctid FROM t WHERE tenant = 'T' LIMIT n)) AND tenant = 'T'

so other tenants' queries never wait long on it.

* **Self-referencing FKs**: batches take only rows that no other row still
  references (leaves first), so a tree empties from the bottom.  What is left
  when no leaf remains is a reference cycle inside the tenant; it is deleted in
  one statement (FKs are checked at the end of a statement).
* **Cycles across tables**: the tables of a cycle are deleted together in one
  statement (data-modifying CTEs), for the same reason.
* **Reported before anything is deleted**: rows of another tenant, or of a
  shared table, that reference the tenant's rows (23503, naming the FK); a
  role that may not delete, or an RLS policy that could hide rows (42501).
* **Checked again where it holds**: each delete transaction runs at
  REPEATABLE READ and re-checks, in the snapshot its DELETE uses, that no row
  outside the tenant references the rows it deletes.  A referencing row
  committed after that snapshot (or being inserted meanwhile: it holds a
  key-share lock on its parent row, so the DELETE waits for it) is not in the
  snapshot, and PostgreSQL's foreign-key actions then refuse to cascade to it
  (40001, their cross-check snapshot); the batch is rolled back and retried in
  a new snapshot, whose check finds the reference: 23503, nothing of that
  batch deleted, never cascaded away.  Needs no privilege beyond SELECT and
  DELETE (``FOR UPDATE`` would need UPDATE).
* **No session of the tenant runs during the purge**: every operator session
  of the tenant holds a shared advisory lock (:func:`sessions_lock_name`) on
  its backend connection; the purge takes it exclusively before deleting
  anything (waiting up to ``PurgeOptions.sessions_wait_s`` for the sessions
  the CLI ended, 55P03 otherwise) and keeps it until the receipt's
  verification is done.
* **Resumable and idempotent**: progress is journaled in the same transaction
  as each batch, in ``<journal schema>.purge_journal`` of the data database,
  so after a crash (even kill -9) a rerun continues and the receipt counts
  every row deleted across runs.  Running it on an already empty tenant is a
  no-op that still verifies and produces a receipt.
* **One at a time**: a session advisory lock per tenant makes a second
  concurrent purge of the same tenant fail at once (55P03).
* **Verification**: at the end, one snapshot checks that zero rows of the
  tenant remain in every tenant table; otherwise it fails.
* **Crypto-shredding**: once verified, ``PurgeOptions.destroy_keys`` (the CLI
  passes :func:`proxy.lifecycle.keys.destroy_tenant_keys`) destroys the
  tenant's backup data keys; the receipt lists them (``backup_keys_destroyed``),
  so every backup tenantgate made of the tenant is unreadable from then on.

The receipt (tenant, per-table counts, start, end, operator, grant, schema
version, and ``receipt_sha256``: the SHA-256 of the receipt's canonical JSON
without that field; with ``PurgeOptions.signer``, an Ed25519 ``signature`` by the
audit key, see :mod:`proxy.lifecycle.attest`) is handed to ``record_receipt`` (the CLI appends it to the
audit chain) before the journal is cleared, so a crash in between only means a
rerun records the same receipt again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Awaitable, Callable

import proxy
from proxy.policy.names import TENANT_GUC, quote_ident
from proxy.lifecycle.tables import (
    FK_VIOLATION,
    INSUFFICIENT_PRIVILEGE,
    OBJECT_NOT_IN_STATE,
    LifecycleError,
    TenantSchema,
    TenantTable,
    scope_session,
)

DEFAULT_JOURNAL_SCHEMA = "tenantgate_lifecycle"
LOCK_NOT_AVAILABLE = "55P03"


def canonical_json(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def seal_receipt(doc: dict) -> dict:
    """Add ``receipt_sha256`` = SHA-256 of the canonical JSON of everything else."""
    body = {k: v for k, v in doc.items() if k != "receipt_sha256"}
    return {**body, "receipt_sha256": hashlib.sha256(canonical_json(body)).hexdigest()}


def check_receipt(doc: dict, keys: dict) -> bool:
    """True when the receipt is intact and signed with one of ``keys`` (see proxy.lifecycle.attest)."""
    from proxy.lifecycle.attest import SignatureError, verify_document

    try:
        verify_document(doc, keys)
    except SignatureError:
        return False
    return True


log = logging.getLogger("tenantgate.lifecycle")

@dataclass
class PurgeOptions:
    batch_rows: int = 5000
    journal_schema: str = DEFAULT_JOURNAL_SCHEMA
    operator: str | None = None
    grant_id: str | None = None
    lock_timeout_ms: int = 5000  # a batch that cannot get its locks fails instead of queueing others
    sessions_wait_s: float = 30.0  # how long to wait for the tenant's operator sessions to end
    # test hook: awaited after the first external-reference check, before any delete transaction
    after_check: Callable[[], Awaitable[None]] | None = None
    signer: object | None = None  # proxy.signing.Signer: the receipt is signed with the audit key
    # Awaited once every row is verified gone, before the receipt is sealed: destroys the tenant's backup
    # data keys (proxy.lifecycle.keys.destroy_tenant_keys) and returns them; the receipt lists them.
    destroy_keys: Callable[[], Awaitable[list[dict]]] | None = None


def sessions_lock_name(tenant: str) -> str:
    """The advisory lock each operator session of ``tenant`` holds shared (proxy.control.operator_gate)."""
    return f"tenantgate.sessions:{tenant}"


def _raise_if_still_referenced(e: Exception, tenant: str, where: str) -> None:
    """Turn a foreign-key violation during a purge into a LifecycleError that says what to do."""
    if isinstance(e, LifecycleError):
        return  # already says it
    if getattr(e, "sqlstate", None) == FK_VIOLATION:
        raise LifecycleError(
            FK_VIOLATION,
            f'cannot purge tenant "{tenant}" from {where}: rows are still referenced',
            detail=str(e) + (f" ({e.detail})" if getattr(e, "detail", None) else ""),
            hint="another tenant's or a shared table's rows reference this tenant's rows; fix them, then rerun",
        ) from e


async def ensure_journal(conn, journal_schema: str = DEFAULT_JOURNAL_SCHEMA) -> None:
    js = quote_ident(journal_schema)
    await conn.execute(
        f"""
        CREATE SCHEMA IF NOT EXISTS {js};
        REVOKE ALL ON SCHEMA {js} FROM PUBLIC;
        CREATE TABLE IF NOT EXISTS {js}.purge_runs (
            tenant text PRIMARY KEY,
            started_at timestamptz NOT NULL,
            operator text,
            grant_id text,
            runs int NOT NULL DEFAULT 1
        );
        CREATE TABLE IF NOT EXISTS {js}.purge_journal (
            tenant text NOT NULL,
            table_name text NOT NULL,
            rows_deleted bigint NOT NULL,
            PRIMARY KEY (tenant, table_name)
        );
        """
    )


async def pending_purges(conn, journal_schema: str = DEFAULT_JOURNAL_SCHEMA) -> list[str]:
    """Tenants whose purge started but has not finished (to resume them)."""
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{quote_ident(journal_schema)}.purge_runs")
    if not exists:
        return []
    return [r["tenant"] for r in await conn.fetch(f"SELECT tenant FROM {quote_ident(journal_schema)}.purge_runs ORDER BY 1")]


class _Journal:
    def __init__(self, conn, schema: str, tenant: str):
        self.conn = conn
        self.js = quote_ident(schema)
        self.tenant = tenant

    async def begin(self, operator: str | None, grant_id: str | None) -> datetime:
        row = await self.conn.fetchrow(
            f"""INSERT INTO {self.js}.purge_runs (tenant, started_at, operator, grant_id)
                VALUES ($1, clock_timestamp(), $2, $3)
                ON CONFLICT (tenant) DO UPDATE SET runs = purge_runs.runs + 1
                RETURNING started_at""",
            self.tenant, operator, grant_id,
        )
        return row["started_at"]

    async def add(self, table: str, n: int) -> None:
        await self.conn.execute(
            f"""INSERT INTO {self.js}.purge_journal (tenant, table_name, rows_deleted) VALUES ($1, $2, $3)
                ON CONFLICT (tenant, table_name) DO UPDATE SET rows_deleted = purge_journal.rows_deleted + EXCLUDED.rows_deleted""",
            self.tenant, table, n,
        )

    async def totals(self) -> dict[str, int]:
        rows = await self.conn.fetch(
            f"SELECT table_name, rows_deleted FROM {self.js}.purge_journal WHERE tenant = $1", self.tenant
        )
        return {r["table_name"]: r["rows_deleted"] for r in rows}

    async def clear(self) -> None:
        async with self.conn.transaction():
            await self.conn.execute(f"DELETE FROM {self.js}.purge_journal WHERE tenant = $1", self.tenant)
            await self.conn.execute(f"DELETE FROM {self.js}.purge_runs WHERE tenant = $1", self.tenant)


def _n(status: str) -> int:
    return int(status.split()[-1])


def _leaf_condition(table: TenantTable, schema: TenantSchema) -> str:
    """SQL (over alias c) true when no other row of the table references row c."""
    parts = []
    for fk in schema.self_references(table.key):
        ref = " AND ".join(
            f"r.{quote_ident(cc)} = c.{quote_ident(pc)}" for cc, pc in zip(fk.child_columns, fk.parent_columns)
        )
        parts.append(f"NOT EXISTS (SELECT 1 FROM {table.qualified} r WHERE {ref} AND r.ctid <> c.ctid)")
    return " AND ".join(parts) if parts else "true"


SERIALIZATION_FAILURE = "40001"
SNAPSHOT_RETRIES = 5


async def _in_snapshot(conn, body):
    """Run ``body()`` in a REPEATABLE READ transaction; retry when a cascade met a newer row (40001)."""
    for attempt in range(SNAPSHOT_RETRIES):
        try:
            async with conn.transaction(isolation="repeatable_read"):
                return await body()
        except Exception as e:
            if getattr(e, "sqlstate", None) != SERIALIZATION_FAILURE or attempt == SNAPSHOT_RETRIES - 1:
                raise


async def _delete_batch(conn, schema: TenantSchema, table: TenantTable, tenant: str, limit: int, leaf: str,
                        journal: _Journal) -> int:
    pred = table.tenant_predicate(tenant)

    async def body() -> int:
        ctids = await conn.fetchval(
            f"SELECT coalesce(array_agg(ctid), '{{}}') FROM (SELECT c.ctid FROM {table.qualified} c "
            f"WHERE {table.tenant_predicate(tenant, 'c')} AND {leaf} LIMIT {int(limit)}) b")
        if not ctids:
            return 0
        # same snapshot as the DELETE below: what it finds is what the cascade would reach
        await _external_references(conn, schema, tenant, only=(table.key, ctids))
        n = _n(await conn.execute(f"DELETE FROM {table.qualified} WHERE ctid = ANY($1::tid[]) AND {pred}", ctids))
        if n:
            await journal.add(table.key, n)
        return n

    return await _in_snapshot(conn, body)


async def _delete_rest(conn, schema: TenantSchema, tables: list[TenantTable], tenant: str,
                       journal: _Journal) -> dict[str, int]:
    """Delete all remaining rows of ``tables`` in ONE statement (cycles)."""
    ctes = [
        f"d{i} AS (DELETE FROM {t.qualified} WHERE {t.tenant_predicate(tenant)} RETURNING 1)"
        for i, t in enumerate(tables)
    ]
    counts = ", ".join(f"(SELECT count(*) FROM d{i})" for i in range(len(tables)))
    sql = f"WITH {', '.join(ctes)} SELECT ARRAY[{counts}]"
    async def body():
        # re-check in the DELETE's own snapshot (see the module doc)
        await _external_references(conn, schema, tenant, only_tables={t.key for t in tables})
        try:
            got = await conn.fetchval(sql)
        except Exception as e:
            _raise_if_still_referenced(e, tenant, ", ".join(t.key for t in tables))
            raise
        for t, n in zip(tables, got):
            if n:
                await journal.add(t.key, int(n))
        return got

    got = await _in_snapshot(conn, body)
    return {t.key: int(n) for t, n in zip(tables, got)}


async def _preflight(conn, schema: TenantSchema) -> None:
    """Before deleting anything: every tenant table must be readable and deletable."""
    for key, t in sorted(schema.tables.items()):
        if not await conn.fetchval("SELECT has_table_privilege($1::regclass, 'SELECT') AND has_table_privilege($1::regclass, 'DELETE')", t.qualified):
            raise LifecycleError(
                INSUFFICIENT_PRIVILEGE, f"the lifecycle role may not delete from {key}",
                hint="lifecycle.data_dsn needs SELECT and DELETE on every tenant table")


async def _external_references(conn, schema: TenantSchema, tenant: str, *,
                               only: tuple[str, list] | None = None, only_tables: set[str] | None = None) -> None:
    """Refuse (23503) when rows outside the tenant reference its rows.

    Checks every FK into a tenant table: from another tenant's rows of a tenant
    table, and from any row of a non-tenant (shared) table.  ``only=(table, ctids)``
    limits the check to references to those rows of that table (inside a delete
    transaction, after locking them); ``only_tables`` to references into those tables.
    """
    for fk in schema.foreign_keys + schema.blockers:
        if only is not None and fk.parent != only[0]:
            continue
        if only_tables is not None and fk.parent not in only_tables:
            continue
        parent = schema.tables[fk.parent]
        child_t = schema.tables.get(fk.child)
        child = child_t.qualified if child_t else ".".join(quote_ident(p) for p in fk.child.split(".", 1))
        on = " AND ".join(f"c.{quote_ident(cc)} = p.{quote_ident(pc)}" for cc, pc in zip(fk.child_columns, fk.parent_columns))
        outside = f" AND NOT coalesce({child_t.tenant_predicate(tenant, 'c')}, false)" if child_t else ""
        rows = " AND p.ctid = ANY($1::tid[])" if only is not None else ""
        found = await conn.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {parent.qualified} p JOIN {child} c ON {on} "
            f"WHERE {parent.tenant_predicate(tenant, 'p')}{rows}{outside})", *([only[1]] if only is not None else [])
        )
        if found:
            raise LifecycleError(
                FK_VIOLATION,
                f'cannot purge tenant "{tenant}": rows of {fk.child} outside the tenant reference its rows in {fk.parent}',
                detail=f"foreign key {fk.name}; nothing was deleted",
                hint="remove or re-point those references, then run the purge again",
            )


async def remaining_rows(conn, schema: TenantSchema, tenant: str) -> dict[str, int]:
    """Rows of ``tenant`` per tenant table, from one snapshot."""
    out: dict[str, int] = {}
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        for key, t in sorted(schema.tables.items()):
            out[key] = await conn.fetchval(f"SELECT count(*) FROM {t.qualified} WHERE {t.tenant_predicate(tenant)}")
    return out


async def purge_tenant(
    conn,
    schema: TenantSchema,
    tenant: str,
    options: PurgeOptions | None = None,
    *,
    record_receipt: Callable[[dict], Awaitable[None]] | None = None,
    on_batch: Callable[[str, int], None] | None = None,
) -> dict:
    """Delete every row of ``tenant`` from every tenant table; return the sealed receipt."""
    options = options or PurgeOptions()
    lock_key = f"tenantgate.purge:{tenant}"
    if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", lock_key):
        raise LifecycleError(LOCK_NOT_AVAILABLE, f'a purge of tenant "{tenant}" is already running')
    sessions_key = sessions_lock_name(tenant)
    try:
        await _wait_for_sessions(conn, tenant, sessions_key, options.sessions_wait_s)
        await _end_tenant_backends(conn, tenant, options.sessions_wait_s)
        # RLS must not let DELETE or the final count silently skip rows
        await scope_session(conn, schema, tenant, local=False)
        return await _purge(conn, schema, tenant, options, record_receipt, on_batch)
    finally:
        if not conn.is_closed():
            try:
                await conn.execute("RESET row_security; RESET standard_conforming_strings; RESET lock_timeout")
                await conn.fetchval("SELECT set_config($1, '', false)", TENANT_GUC)
                await conn.fetchval("SELECT pg_advisory_unlock(hashtext($1))", sessions_key)
                await conn.fetchval("SELECT pg_advisory_unlock(hashtext($1))", lock_key)
            except Exception:
                pass


async def _wait_for_sessions(conn, tenant: str, key: str, wait_s: float) -> None:
    """Take the tenant's sessions lock exclusively: every operator session of the tenant has ended."""
    deadline = time.monotonic() + wait_s
    while not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
        if time.monotonic() >= deadline:
            raise LifecycleError(
                LOCK_NOT_AVAILABLE, f'operator sessions of tenant "{tenant}" are still open: nothing was deleted',
                hint="the purge ended them through the proxies; a proxy that did not hear it still holds one. "
                     "Run the purge again, or end the session (pg_terminate_backend) first")
        await asyncio.sleep(0.1)


async def _end_tenant_backends(conn, tenant: str, wait_s: float) -> None:
    """End every backend the PostgreSQL backstop has bound to ``tenant`` (bootstrap section 8),
    and wait until each is gone: on every proxy, a statement already running rolls back instead
    of committing after the purge counted zero rows.  Without the backstop there is no such
    function, and the proxies' own session ends (and the sessions lock) are what holds."""
    exists = await conn.fetchval(
        "SELECT to_regprocedure('tenantgate_guard.end_tenant_backends(text, integer)') IS NOT NULL")
    if not exists:
        return
    try:
        n = await conn.fetchval("SELECT tenantgate_guard.end_tenant_backends($1, $2)", tenant,
                                int(max(wait_s, 1) * 1000))
    except Exception as e:
        raise LifecycleError(
            getattr(e, "sqlstate", None) or "42501",
            f'could not end the database sessions bound to tenant "{tenant}": nothing was deleted',
            detail=str(e),
            hint="GRANT EXECUTE ON FUNCTION tenantgate_guard.end_tenant_backends(text, integer) to the purge's "
                 "role (lifecycle.data_dsn), or rerun deploy/postgres/bootstrap.sql") from e
    if n:
        log.info("purge of %s: ended %d database session(s) bound to the tenant", tenant, n)


async def _purge(conn, schema, tenant, options, record_receipt, on_batch) -> dict:
    await conn.execute(f"SET lock_timeout = {int(options.lock_timeout_ms)}")
    await _preflight(conn, schema)
    await _external_references(conn, schema, tenant)
    if options.after_check is not None:
        await options.after_check()
    await ensure_journal(conn, options.journal_schema)
    journal = _Journal(conn, options.journal_schema, tenant)
    started = await journal.begin(options.operator, options.grant_id)

    for comp in schema.purge_components():
        tables = [schema.tables[k] for k in comp.tables]
        if comp.is_cycle:
            for key, n in (await _delete_rest(conn, schema, tables, tenant, journal)).items():
                if on_batch and n:
                    on_batch(key, n)
            continue
        table = tables[0]
        leaf = _leaf_condition(table, schema)
        while True:
            try:
                n = await _delete_batch(conn, schema, table, tenant, options.batch_rows, leaf, journal)
            except Exception as e:
                _raise_if_still_referenced(e, tenant, table.key)
                raise
            if on_batch and n:
                on_batch(table.key, n)
            if n:
                continue
            if leaf != "true":
                # no leaf left: whatever remains is a cycle of self-references
                got = await _delete_rest(conn, schema, [table], tenant, journal)
                if on_batch and got[table.key]:
                    on_batch(table.key, got[table.key])
            break

    left = await remaining_rows(conn, schema, tenant)
    leftover = {k: v for k, v in left.items() if v}
    if leftover:
        raise LifecycleError(
            OBJECT_NOT_IN_STATE,
            f'purge of tenant "{tenant}" did not finish: rows remain in {", ".join(sorted(leftover))}',
            detail=json.dumps(leftover),
            hint="rows were added while purging; run the purge again",
        )
    totals = await journal.totals()
    destroyed = await options.destroy_keys() if options.destroy_keys is not None else None
    finished = await conn.fetchval("SELECT clock_timestamp()")
    not_reached = ["backups taken outside tenantgate", "WAL archives", "replicas until they replay the deletes",
                   "exports already taken"]
    if destroyed is None:
        not_reached[0] = "backups"
    doc = {
        "type": "tenant_deletion_receipt",
        "tenant": tenant,
        "tenant_column": schema.tenant_column,
        "tables": {k: int(totals.get(k, 0)) for k in schema.purge_order()},
        "total_rows": int(sum(totals.values())),
        "started_at": started.astimezone(timezone.utc).isoformat(),
        "finished_at": finished.astimezone(timezone.utc).isoformat(),
        "operator": options.operator,
        "grant_id": options.grant_id,
        "verified_remaining_rows": 0,
        "schema_version": schema.schema_version(),
        "tenantgate_version": proxy.__version__,
        "not_reached": not_reached,
    }
    if destroyed is not None:
        # crypto-shredding: every tenantgate backup of the tenant was encrypted with one of these keys
        doc["backup_keys_destroyed"] = destroyed
    receipt = seal_receipt(doc)
    if options.signer is not None:
        from proxy.lifecycle.attest import sign

        receipt = sign(receipt, options.signer)
    if record_receipt is not None:
        await record_receipt(receipt)
    await journal.clear()
    return receipt
