"""Online tenant move: one tenant's rows from one PostgreSQL server to another, with PostgreSQL 15's
own logical replication (row-filtered publications), while the tenant keeps working.

The engine is a resumable state machine.  Its state is one row of ``<control>.tenant_moves``
(:class:`proxy.lifecycle.move_state.MoveStore`); every step is recorded before and after it runs, so a move killed at any point
(kill -9 included) is resumed (:meth:`TenantMove.run`) or rolled back (:meth:`TenantMove.abort`).
The core needs two DSNs (a role on each server that may create publications / subscriptions: the
tables' owner or a superuser on the source, a superuser on the target) and :class:`MoveHooks` (hold,
release, flip the placement, audit); ``proxy/commands/tenant_move.py`` wires it to the control
plane, the placement and the admin consoles.

Steps (``step`` is the last one completed)::

    requested --(second approver)--> approved
    approved  --check-->   checked    schemas match (columns, types, keys), source wal_level=logical,
                                      replica identity covers the tenant column, target has no rows
    checked   --publish--> copying    CREATE PUBLICATION tg_move_<id>_<r> FOR TABLE t WHERE (tenant = 'T'), ...
                                      CREATE SUBSCRIPTION tg_move_<id>_<r> ... WITH (copy_data = true)
    copying   --sync-->    synced     every pg_subscription_rel state 'r', lag under a bound, checksums equal
    synced    --cutover--> cutover    hold the tenant at every instance, in-flight transactions end (bounded),
                                      target confirms the source's current LSN (the slot's confirmed_flush_lsn),
                                      a snapshot on each side, the tenant's row counts equal in them
    cutover   --flip-->    flipped    sequences on the target raised above the source's, a fence on the source
                                      (triggers refuse the tenant's writes there: 40001), still held; the
                                      placement -> target (same control transaction as the step), release;
                                      then the checksums are compared in the two snapshots (what both sides
                                      held at the flip): a difference stops the move, the source is kept
    flipped   --clean-->   cleaned    DROP SUBSCRIPTION, DROP PUBLICATION
    cleaned   --purge-->   done       the existing purge deletes the tenant from the source, with its receipt;
                                      the fence is dropped

A failure before ``flipped`` leaves the tenant on the source, intact (the hold is released, the
step stays where it was; ``abort`` drops the subscription and publication and deletes the copied rows
on the target).  From ``flipped`` on, the tenant is on the target; ``abort`` then finishes forward.

The subscription is always dropped before the source is purged: the purge's DELETEs must never be
replicated to the target.

Checksums: per table, ``count(*)`` and the sum of the first 60 bits of ``md5(row::text)`` over the
tenant's rows (order-independent; both sides have the same column order, checked first).  Reading every
row costs about 1 s per 200,000 rows on each side, so the hold covers only the LSN confirmation and the
counts; the checksums run right after the release in REPEATABLE READ snapshots taken under the hold, and
the source is purged only once they are equal (or with ``purge_unverified``, an operator's decision).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from proxy.lifecycle.move_checks import checksums, identity_problems, key_columns, row_counts, schema_diff
from proxy.lifecycle.move_fence import Fence
from proxy.lifecycle.move_options import MoveHooks, MoveOptions, TableSpec
from proxy.lifecycle.move_state import FINISHED, LOCK_NOT_AVAILABLE, Move, MoveStore
from proxy.lifecycle.purge import purge_tenant
from proxy.lifecycle.tables import (
    INSUFFICIENT_PRIVILEGE,
    OBJECT_NOT_IN_STATE,
    LifecycleError,
    TenantSchema,
    discover,
    quote_literal,
)
from proxy.policy.names import quote_ident

log = logging.getLogger("tenantgate.move")

SCHEMA_MISMATCH = "55000"


def _conninfo_literal(dsn: str) -> str:
    return quote_literal(dsn)


async def _scoped(conn) -> None:
    """This connection sees every row (a superuser or BYPASSRLS role; RLS must not hide rows)."""
    if not await conn.fetchval("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user"):
        raise LifecycleError(INSUFFICIENT_PRIVILEGE, "the move's database roles must see every row",
                             hint="use a superuser (or the tables' owner with BYPASSRLS) on both servers")
    await conn.execute("SET row_security = off; SET standard_conforming_strings = on")


# --------------------------------------------------------------------------- the engine
class _CutoverFailed(LifecycleError):
    """The cutover gave up before the flip: the hold is released, the tenant is on the source."""


class TenantMove:
    """One move: ``await TenantMove(...).run()`` from wherever its row says it is."""

    def __init__(self, store: MoveStore, move: Move, source_dsn: str, target_dsn: str, spec: TableSpec,
                 hooks: MoveHooks | None = None, options: MoveOptions | None = None, *, control_tx=None):
        self.store = store
        self.move = move
        self.source_dsn = source_dsn
        self.target_dsn = target_dsn
        self.spec = spec
        self.hooks = hooks or MoveHooks()
        self.opts = options or MoveOptions()
        self.control_tx = control_tx  # async context manager: a control-plane transaction (flip + step)
        self.src = self.tgt = None
        self.schema: TenantSchema | None = None

    # ---- plumbing
    async def _connect(self):
        import asyncpg

        self.src = await asyncpg.connect(self.source_dsn, server_settings={"application_name": "tenantgate-move"})
        self.tgt = await asyncpg.connect(self.target_dsn, server_settings={"application_name": "tenantgate-move"})
        await _scoped(self.src)
        await _scoped(self.tgt)

    async def _close(self) -> None:
        await self._close_snapshots()
        for c in (self.src, self.tgt):
            if c is not None and not c.is_closed():
                await c.close()

    async def _step(self, step: str, **detail) -> None:
        await self.store.set_step(self.move, step, detail=detail or None)
        await self.hooks.audit("tenant.move.step", {"move_id": self.move.id, "step": step, **detail})
        self.hooks.progress(f"move {self.move.id}: {step}")
        await self.hooks.after_step(step)

    async def _discover(self, conn) -> TenantSchema:
        return await discover(conn, self.spec.tenant_column, self.spec.schemas, self.spec.tables)

    # ---- entry points
    async def run(self) -> Move:
        """Carry the move from its recorded step to ``done`` (one process at a time)."""
        async with self.store.running(self.move):
            return await self._run()

    async def abort(self) -> Move:
        """Roll a move back before its flip (after the flip it finishes forward); one process at a time."""
        async with self.store.running(self.move):
            return await self._abort()

    async def _run(self) -> Move:
        if self.move.step == "requested":
            raise LifecycleError(OBJECT_NOT_IN_STATE, f"move {self.move.id} awaits a second approver",
                                 hint=f"tenantgate tenant move --approve {self.move.id} --as OTHER_APPROVER")
        if self.move.step in FINISHED:
            return self.move
        if self.move.step == "aborting":
            return await self._abort()
        await self._connect()
        try:
            if self.move.flipped:  # the tenant is on the target already: finish forward, whatever changed
                self.schema = await self._discover(self.src)
                if "cutover" not in self.move.detail:
                    # killed between the flip and the release: the tenant is still held everywhere, so
                    # both sides are still as they were at the flip: compare them now, then release
                    if "verified" not in self.move.detail and "verify_failed" not in self.move.detail:
                        t0 = time.monotonic()
                        src, tgt = await asyncio.gather(checksums(self.src, self.schema, self.move.tenant),
                                                        checksums(self.tgt, self.schema, self.move.tenant))
                        try:
                            await self._judge(src, tgt, t0, still_held=True)
                        finally:
                            await self.hooks.release()
                    else:
                        await self.hooks.release()
            else:
                await self.check()
            if self.move.step == "approved":
                await self._require_empty_target()
                await self._step("checked")
            if self.move.step == "checked":
                await self.publish()
                await self._step("copying")
            if self.move.step == "copying":
                await self.wait_synced()
                await self._step("synced")
            if self.move.step in ("synced", "cutover"):
                await self.cutover()
            if self.move.step == "flipped":
                await self.clean_up()
                await self._step("cleaned")
            if self.move.step == "cleaned":
                await self.purge_source()
                await self._step("done")
            await self.store.set_error(self.move, None)
            return self.move
        except BaseException as e:
            if not isinstance(e, asyncio.CancelledError):
                try:
                    await self.store.set_error(self.move, str(getattr(e, "message", e)))
                except Exception:
                    pass
            raise
        finally:
            await self._close()

    async def _abort(self) -> Move:
        if self.move.step in FINISHED:
            return self.move
        if self.move.flipped:
            self.hooks.progress(f"move {self.move.id} was flipped already: finishing it forward")
            return await self._run()
        was = self.move.step
        await self.store.set_step(self.move, "aborting", detail={"aborted_at_step": was})
        await self.hooks.audit("tenant.move.step", {"move_id": self.move.id, "step": "aborting", "from": was})
        await self.hooks.release()
        await self._connect()
        try:
            self.schema = await self._discover(self.src)
            await self.unfence_source()
            await self._drop_replication()
            if self.move.detail.get("target_checked_empty"):  # every row of the tenant there is a copied one
                self.schema = await self._discover(self.tgt)
                self.hooks.progress(f"move {self.move.id}: deleting the copied rows on the target")
                await purge_tenant(self.tgt, self.schema, self.move.tenant, self.opts.purge,
                                   record_receipt=self._target_receipt)
            await self.store.set_step(self.move, "aborted", error=None)
            await self.hooks.audit("tenant.move.aborted", {"move_id": self.move.id, "from": was})
            self.hooks.progress(f"move {self.move.id}: aborted; the tenant stays on {self.move.source_region}")
            return self.move
        finally:
            await self._close()

    async def _target_receipt(self, receipt: dict) -> None:
        await self.hooks.audit("tenant.move.abort.receipt", {"move_id": self.move.id, "receipt": receipt})

    # ---- step 1: check
    async def check(self) -> None:
        src = await self._discover(self.src)
        tgt = await self._discover(self.tgt)
        skeys, tkeys = await key_columns(self.src, src), await key_columns(self.tgt, tgt)
        diff = schema_diff(src, skeys, tgt, tkeys)
        if diff:
            raise LifecycleError(
                SCHEMA_MISMATCH, f'the target schema does not match the source for tenant "{self.move.tenant}": '
                f"{len(diff)} difference(s); nothing was moved",
                detail="\n".join(diff), hint="create the same tenant tables on the target, then run the move again")
        if self.move.step in ("approved", "checked"):  # before the publication exists
            problems = identity_problems(src, skeys)
            if problems:
                raise LifecycleError(SCHEMA_MISMATCH, "tenant tables cannot be published with a tenant row filter",
                                     detail="\n".join(problems),
                                     hint="give each tenant table a primary key that includes the tenant column "
                                          "(or ALTER TABLE ... REPLICA IDENTITY FULL)")
            wal = await self.src.fetchval("SHOW wal_level")
            if wal != "logical":
                raise LifecycleError(
                    SCHEMA_MISMATCH, f"the source server runs with wal_level = {wal}: a move needs logical replication",
                    hint="ALTER SYSTEM SET wal_level = logical on the source and restart it, then run the move again")
        self.schema = src

    async def _require_empty_target(self) -> None:
        counts = await checksums(self.tgt, self.schema, self.move.tenant)
        present = {k: n for k, (n, _) in counts.items() if n}
        if present:
            raise LifecycleError(
                OBJECT_NOT_IN_STATE, f'the target already holds rows of tenant "{self.move.tenant}"; nothing was moved',
                detail=json.dumps(present), hint="a move needs a target without the tenant's rows")
        await self.store.set_step(self.move, self.move.step, detail={"target_checked_empty": True})

    # ---- step 2: publication and subscription
    async def publish(self) -> None:
        pub, sub, tenant = self.move.publication, self.move.subscription, self.move.tenant
        if not await self.src.fetchval("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)", pub):
            tables = ", ".join(f"{t.qualified} WHERE ({t.tenant_predicate(tenant)})"
                               for _, t in sorted(self.schema.tables.items()))
            await self.src.execute(f"CREATE PUBLICATION {quote_ident(pub)} FOR TABLE {tables} "
                                   "WITH (publish = 'insert, update, delete', publish_via_partition_root = true)")
            # no TRUNCATE: PostgreSQL replicates it whatever the row filter, and on the target it would empty
            # the table of every tenant there
        if not await self.tgt.fetchval("SELECT EXISTS (SELECT 1 FROM pg_subscription WHERE subname = $1)", sub):
            conninfo = self.opts.source_conninfo or self.source_dsn
            await self.tgt.execute(f"CREATE SUBSCRIPTION {quote_ident(sub)} CONNECTION {_conninfo_literal(conninfo)} "
                                   f"PUBLICATION {quote_ident(pub)} WITH (copy_data = true)")
        oid = await self.tgt.fetchval("SELECT oid FROM pg_subscription WHERE subname = $1", sub)
        await self.store.set_step(self.move, self.move.step, detail={"subscription_oid": int(oid)})

    # ---- step 3: copy and catch-up
    async def _sub_state(self) -> tuple[int, int, int]:
        """(tables, tables ready, errors) of the subscription."""
        r = await self.tgt.fetchrow(
            "SELECT count(*) AS n, count(*) FILTER (WHERE r.srsubstate = 'r') AS ready,"
            " coalesce((SELECT apply_error_count + sync_error_count FROM pg_stat_subscription_stats st"
            "           WHERE st.subid = s.oid), 0) AS errors"
            " FROM pg_subscription s LEFT JOIN pg_subscription_rel r ON r.srsubid = s.oid"
            " WHERE s.subname = $1 GROUP BY s.oid", self.move.subscription)
        if r is None:
            raise LifecycleError(OBJECT_NOT_IN_STATE, f"subscription {self.move.subscription} is missing on the target",
                                 hint="abort the move (tenant move TENANT --abort) and start it again")
        return r["n"], r["ready"], r["errors"]

    async def _lag(self) -> int:
        """Bytes of source WAL the target has not confirmed yet."""
        cur = await self.src.fetchval("SELECT pg_current_wal_lsn()")
        return await self._behind(cur)

    async def _behind(self, lsn) -> int:
        """Bytes between ``lsn`` and what the subscriber confirmed as flushed (the slot's confirmed_flush_lsn
        on the source: its apply worker's feedback).  Not pg_stat_subscription.latest_end_lsn: that is the
        sender's WAL end as the last keepalive announced it, not what was applied."""
        confirmed = await self.src.fetchval(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1", self.move.subscription)
        if confirmed is None:
            return 1 << 62
        return max(0, int(lsn) - int(confirmed))  # asyncpg gives pg_lsn as an int

    async def wait_synced(self) -> None:
        deadline = time.monotonic() + self.opts.sync_timeout_s
        last = None
        n_tables = len(self.schema.tables)
        errors0 = (await self._sub_state())[2]
        while True:
            n, ready, errors = await self._sub_state()
            if errors > errors0:
                raise LifecycleError(
                    "XX000", f"the subscription of move {self.move.id} reports replication errors; the tenant stays "
                    "on the source", hint="see the target server's log; then --resume, or --abort")
            lag = await self._lag() if ready == n == n_tables else None
            msg = f"move {self.move.id}: {ready}/{n_tables} tables copied" + (f", {lag} bytes behind" if lag is not None
                                                                               else "")
            if msg != last:
                self.hooks.progress(msg)
                last = msg
            if lag is not None and lag <= self.opts.sync_lag_bytes:
                # the copied tables get their visibility map and statistics now, so the row counts under the
                # cutover's hold are index-only scans rather than full reads
                for _, t in sorted(self.schema.tables.items()):
                    await self.tgt.execute(f"VACUUM (ANALYZE) {t.qualified}")
                return
            if time.monotonic() > deadline:
                raise LifecycleError(LOCK_NOT_AVAILABLE, f"move {self.move.id}: the initial copy did not finish within "
                                     f"{self.opts.sync_timeout_s:.0f} s", hint="--resume waits again")
            await asyncio.sleep(self.opts.poll_s)

    # ---- step 4 and 5: cutover and flip
    async def cutover(self) -> None:
        await self.install_fence()
        if self.move.step != "cutover":
            await self._step("cutover")  # recorded before the hold: a killed cutover is released by --resume/--abort
        self._vconns = await self._verify_connections()
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(self.hooks.hold(), self.opts.hold_timeout_s)
        except asyncio.TimeoutError:
            await self._close_snapshots()
            await self._fail_cutover(t0, f"in-flight transactions of tenant \"{self.move.tenant}\" did not end within "
                                         f"{self.opts.hold_timeout_s:.0f} s")
        except BaseException as e:
            await self._close_snapshots()
            if isinstance(e, asyncio.CancelledError):
                raise
            await self._fail_cutover(t0, f"the tenant could not be held: {e}")
        held = time.monotonic()
        snaps = None
        try:
            counts, lsn, snaps = await self._verify_caught_up(t0)
            sequences = await self.raise_sequences()
            await self.fence_source()
        except _CutoverFailed:
            await self._close_snapshots(snaps)
            raise
        except BaseException as e:
            await self._close_snapshots(snaps)
            if not isinstance(e, asyncio.CancelledError):
                await self._fail_cutover(t0, f"cutover failed: {e}")
            raise
        verified = time.monotonic()
        detail = {"sequences": sequences, "lsn": f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}", "rows": counts}
        try:
            async with self.control_tx() as conn:
                await self.hooks.flip(conn)
                await self.store.set_step(self.move, "flipped", detail={"at_flip": detail}, conn=conn)
        except BaseException as e:
            await self._close_snapshots(snaps)
            if not isinstance(e, asyncio.CancelledError):
                await self._fail_cutover(t0, f"the placement could not be flipped: {getattr(e, 'message', e)}")
            raise
        try:  # flipped: from here on the tenant is on the target, whatever fails
            await self._end_source_backends()
        finally:
            await self.hooks.release()
        pause_ms = int((time.monotonic() - t0) * 1000)
        timing = {"pause_ms": pause_ms, "hold_wait_ms": int((held - t0) * 1000),
                  "verify_ms": int((verified - held) * 1000)}
        await self.store.set_step(self.move, "flipped", detail={"cutover": timing})
        await self.hooks.audit("tenant.move.step", {"move_id": self.move.id, "step": "flipped",
                                                    "to": self.move.target_region, **detail, **timing})
        try:
            self.hooks.progress(f"move {self.move.id}: flipped to {self.move.target_region}; the tenant was held "
                                f"{pause_ms} ms")
        except BaseException:
            await self._close_snapshots(snaps)
            raise
        await self.compare_snapshots(snaps)
        await self.hooks.after_step("flipped")

    async def _close_snapshots(self, snaps=None) -> None:
        """Close the verification connections (their snapshots end with them)."""
        conns, self._vconns = getattr(self, "_vconns", None) or [], None
        for conn in conns:
            if not conn.is_closed():
                await conn.close()

    async def _verify_connections(self) -> list:
        """Before the hold: one more connection to each side, for the snapshots (connecting is not free)."""
        import asyncpg

        conns = []
        try:
            for dsn in (self.source_dsn, self.target_dsn):
                conns.append(await asyncpg.connect(dsn, server_settings={"application_name": "tenantgate-move-verify"}))
                await _scoped(conns[-1])
        except BaseException:
            for c in conns:
                await c.close()
            raise
        return conns

    @staticmethod
    async def _snapshot(conn):
        """``conn`` in a REPEATABLE READ transaction (its snapshot is taken by its first query)."""
        tx = conn.transaction(isolation="repeatable_read", readonly=True)
        await tx.start()
        return conn, tx

    async def compare_snapshots(self, snaps) -> None:
        """After the release: per-table counts and checksums of the tenant in the source's and the target's
        snapshots taken under the hold (what the target had at the flip, before any new write).  A
        difference stops the move before anything is dropped or purged: the source keeps its copy."""
        try:
            (sc, _), (tc, _) = snaps
            t0 = time.monotonic()
            src, tgt = await asyncio.gather(checksums(sc, self.schema, self.move.tenant, own_tx=False),
                                            checksums(tc, self.schema, self.move.tenant, own_tx=False))
        finally:
            await self._close_snapshots(snaps)
        await self._judge(src, tgt, t0)

    async def _judge(self, src: dict, tgt: dict, t0: float, **extra) -> None:
        """Record the comparison of the checksums at the flip; a difference stops the move (XX001)."""
        if src != tgt:
            diff = {k: {"source": src[k], "target": tgt.get(k)} for k in src if src[k] != tgt.get(k)}
            await self.store.set_step(self.move, "flipped", error="checksums differ", detail={"verify_failed": diff})
            await self.hooks.audit("tenant.move.verify.failed", {"move_id": self.move.id, "diff": diff})
            raise LifecycleError(
                "XX001", f"move {self.move.id}: the tenant's rows on the target differ from the source at the flip",
                detail=json.dumps(diff), hint="the tenant is on the target; the source keeps its copy (nothing is "
                "purged). Compare the rows, repair the target, then --resume with --purge-unverified")
        checks = {"checksums": {k: v for k, (_, v) in src.items()}, "ms": int((time.monotonic() - t0) * 1000),
                  **extra}
        await self.store.set_step(self.move, "flipped", detail={"verified": checks})
        self.hooks.progress(f"move {self.move.id}: counts and checksums at the flip are equal on both sides")

    async def _verify_caught_up(self, t0: float):
        """Under the hold: the target confirmed the source's current LSN, and the tenant's row counts agree.
        Returns (counts, lsn, the two snapshots) — the checksums are compared in those snapshots after the
        release (:meth:`compare_snapshots`), so the hold does not last a full read of the tenant."""
        lsn = await self.src.fetchval("SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + self.opts.catchup_timeout_s
        while await self._behind(lsn) > 0:
            if time.monotonic() > deadline:
                await self._fail_cutover(t0, f"the target did not confirm the source's LSN {lsn} within "
                                             f"{self.opts.catchup_timeout_s:.0f} s")
            await asyncio.sleep(0.01)
        confirmed = time.monotonic()
        while True:
            snaps = [await self._snapshot(c) for c in self._vconns]
            src, tgt = await asyncio.gather(row_counts(snaps[0][0], self.schema, self.move.tenant),
                                            row_counts(snaps[1][0], self.schema, self.move.tenant))
            if src == tgt:
                log.info("move %s: under the hold, LSN confirmed in %.3f s, counts in %.3f s", self.move.id,
                         confirmed - t0, time.monotonic() - confirmed)
                return src, lsn, snaps
            for _, tx in snaps:
                await tx.rollback()
            if time.monotonic() > deadline:
                diff = {k: {"source": src[k], "target": tgt.get(k)} for k in src if src[k] != tgt.get(k)}
                await self._fail_cutover(t0, "row counts differ between source and target: " + json.dumps(diff))
            await asyncio.sleep(0.01)

    async def _fail_cutover(self, t0: float, why: str) -> None:
        """Before the flip: release the hold, go back to 'synced' (the tenant stays on the source)."""
        try:
            if self.schema is not None and self.src is not None and not self.src.is_closed():
                await self.unfence_source(drop_triggers=False)  # inactive triggers: --resume reuses them
            await self.hooks.release()
        finally:
            await self.store.set_step(self.move, "synced", error=why,
                                      detail={"cutover_failed_after_ms": int((time.monotonic() - t0) * 1000)})
            await self.hooks.audit("tenant.move.cutover.failed", {"move_id": self.move.id, "message": why})
        raise _CutoverFailed(LOCK_NOT_AVAILABLE, f"move {self.move.id} was not cut over: {why}",
                             detail=f'tenant "{self.move.tenant}" stays on {self.move.source_region}, intact',
                             hint="--resume tries the cutover again; --abort rolls the move back")

    async def _end_source_backends(self) -> None:
        """Sessions still bound to the tenant on the source (session pooling) end now, so nothing the
        tenant does after the flip can land on the source (the PostgreSQL backstop's function)."""
        if await self.src.fetchval(
                "SELECT to_regprocedure('tenantgate_guard.end_tenant_backends(text, integer)') IS NOT NULL"):
            await self.src.fetchval("SELECT tenantgate_guard.end_tenant_backends($1, $2)", self.move.tenant, 5000)

    # ---- the fence (proxy/lifecycle/move_fence.py)
    def _fence(self) -> Fence:
        return Fence(self.src, self.schema, self.move.tenant, self.move.id, self.opts.purge.journal_schema)

    async def install_fence(self) -> None:
        await self._fence().install()

    async def fence_source(self) -> None:
        await self._fence().raise_()

    async def unfence_source(self, *, drop_triggers: bool = True) -> None:
        await self._fence().lower(drop_triggers=drop_triggers)

    # ---- step 6: clean up and purge the source
    async def _drop_replication(self) -> None:
        sub, pub = self.move.subscription, self.move.publication
        if await self.tgt.fetchval("SELECT EXISTS (SELECT 1 FROM pg_subscription WHERE subname = $1)", sub):
            await self.tgt.execute(f"ALTER SUBSCRIPTION {quote_ident(sub)} DISABLE")
            try:
                await self.tgt.execute(f"DROP SUBSCRIPTION {quote_ident(sub)}")
            except Exception as e:  # the source cannot be reached to drop the slot: drop it without
                log.warning("DROP SUBSCRIPTION %s: %s; dropping it without its slot", sub, e)
                await self.tgt.execute(f"ALTER SUBSCRIPTION {quote_ident(sub)} SET (slot_name = NONE)")
                await self.tgt.execute(f"DROP SUBSCRIPTION {quote_ident(sub)}")
        for slot in await self.src.fetch(
                "SELECT slot_name FROM pg_replication_slots WHERE slot_name = $1 OR slot_name LIKE $2",
                sub, "pg_%_sync_%"):
            if slot["slot_name"] == sub or await self._sync_slot_of_ours(slot["slot_name"]):
                await self.src.fetchval("SELECT pg_drop_replication_slot($1)", slot["slot_name"])
        await self.src.execute(f"DROP PUBLICATION IF EXISTS {quote_ident(pub)}")

    async def _sync_slot_of_ours(self, name: str) -> bool:
        """A table-sync slot left behind by our subscription (pg_<suboid>_sync_<relid>_<sysid>), inactive."""
        sub_oid = self.move.detail.get("subscription_oid")
        return bool(sub_oid) and name.startswith(f"pg_{sub_oid}_sync_") and not await self.src.fetchval(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1", name)

    async def clean_up(self) -> None:
        await self._drop_replication()

    async def raise_sequences(self) -> dict:
        """Under the hold, before the flip: every sequence (serial, identity) of a tenant table on the target
        is raised above the source's value and the rows there, so the tenant's first insert on the target
        cannot reuse a key.  Only ever raised: the target's sequences also serve its other tenants."""
        raised = {}
        for key, t in sorted(self.schema.tables.items()):
            for c in t.columns:
                seq = await self.src.fetchval("SELECT pg_get_serial_sequence($1, $2)", t.qualified, c.name)
                tseq = await self.tgt.fetchval("SELECT pg_get_serial_sequence($1, $2)", t.qualified, c.name)
                if seq is None or tseq is None:
                    continue
                last = await self.src.fetchval(f"SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END"
                                               f" FROM {seq}")
                raised[f"{key}.{c.name}"] = await self.tgt.fetchval(
                    f"SELECT setval($1::regclass, greatest($2::bigint, (SELECT CASE WHEN is_called THEN last_value "
                    f"ELSE last_value - 1 END FROM {tseq}), (SELECT coalesce(max({quote_ident(c.name)}), 0) FROM "
                    f"{t.qualified})::bigint, 1))", tseq, last)
        return raised

    async def purge_source(self) -> None:
        # the purge's DELETEs must never reach the target: the subscription is gone
        if await self.tgt.fetchval("SELECT EXISTS (SELECT 1 FROM pg_subscription WHERE subname = $1)",
                                   self.move.subscription):
            raise LifecycleError(OBJECT_NOT_IN_STATE, f"subscription {self.move.subscription} still exists on the "
                                 "target: the source is not purged")
        if self.move.detail.get("verify_failed") or not self.move.detail.get("verified"):
            if not self.opts.purge_unverified:
                why = ("its checksums at the flip differed" if self.move.detail.get("verify_failed") else
                       "the checksums taken at the flip were never compared (the move was interrupted)")
                raise LifecycleError(
                    OBJECT_NOT_IN_STATE, f"move {self.move.id}: the source is not purged: {why}",
                    detail=f'tenant "{self.move.tenant}" is on {self.move.target_region}; {self.move.source_region} '
                           "keeps its copy",
                    hint="compare the tenant's rows on both servers; then --resume --purge-unverified purges the "
                         "source")
            await self.hooks.audit("tenant.move.purge_unverified", {"move_id": self.move.id})
        self.schema = self.schema or await self._discover(self.src)
        self.hooks.progress(f"move {self.move.id}: purging the tenant from {self.move.source_region}")
        await self.src.fetchval("SELECT set_config('tenantgate.move_unfence', $1, false)", self.move.tenant)
        try:
            receipt = await purge_tenant(self.src, self.schema, self.move.tenant, self.opts.purge,
                                         record_receipt=self.hooks.record_receipt)
        finally:
            await self.src.execute("RESET tenantgate.move_unfence")
        await self.unfence_source()
        await self.store.set_step(self.move, self.move.step, detail={
            "source_purge": {"total_rows": receipt["total_rows"], "receipt_sha256": receipt["receipt_sha256"]}})

