"""The state of tenant moves in the control schema: one ``tenant_moves`` row per move (its step, regions,
publication/subscription names, timestamps, error, details), so a killed move is resumed or rolled back.
The engine is :mod:`proxy.lifecycle.move`; the table is in ``proxy/control/schema.sql``."""

from __future__ import annotations

import json
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime

from proxy.lifecycle.tables import INSUFFICIENT_PRIVILEGE, OBJECT_NOT_IN_STATE, LifecycleError

STEPS = ("requested", "approved", "checked", "copying", "synced", "cutover", "flipped", "cleaned", "done")
BEFORE_FLIP = ("requested", "approved", "checked", "copying", "synced", "cutover", "aborting")
FINISHED = ("done", "aborted")
LOCK_NOT_AVAILABLE = "55P03"


@dataclass
class Move:
    id: int
    tenant: str
    source_region: str
    target_region: str
    step: str
    publication: str
    subscription: str
    requested_by: str
    approved_by: str | None
    created_at: datetime
    updated_at: datetime
    flipped_at: datetime | None
    finished_at: datetime | None
    error: str | None
    detail: dict

    @classmethod
    def from_row(cls, r) -> "Move":
        d = dict(r)
        d["detail"] = json.loads(d["detail"]) if isinstance(d["detail"], str) else (d["detail"] or {})
        return cls(**d)

    @property
    def flipped(self) -> bool:
        return self.step not in BEFORE_FLIP and self.step != "aborted"

    def to_json(self) -> dict:
        return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in self.__dict__.items()}


class MoveStore:
    """The ``tenant_moves`` rows, over the control plane's pool (``plane.pool``, ``plane.s``)."""

    def __init__(self, pool, schema_sql: str):
        self.pool = pool
        self.t = f"{schema_sql}.tenant_moves"

    async def create(self, tenant: str, source: str, target: str, requested_by: str, detail: dict) -> Move:
        async with self.pool.acquire() as conn:
            try:
                r = await conn.fetchrow(
                    f"INSERT INTO {self.t} (tenant, source_region, target_region, requested_by, publication,"
                    f" subscription, detail) VALUES ($1, $2, $3, $4, '', '', $5::jsonb) RETURNING id",
                    tenant, source, target, requested_by, json.dumps(detail))
            except Exception as e:
                if getattr(e, "sqlstate", None) == "23505":
                    raise LifecycleError(OBJECT_NOT_IN_STATE, f'a move of tenant "{tenant}" is already under way',
                                         hint="tenantgate tenant move TENANT --resume, or --abort") from e
                raise
            # replication slot names are per cluster: a random part keeps two control schemas apart
            name = f"tg_move_{r['id']}_{uuid.uuid4().hex[:8]}"
            row = await conn.fetchrow(f"UPDATE {self.t} SET publication = $2, subscription = $2 WHERE id = $1 "
                                      "RETURNING *", r["id"], name)
        return Move.from_row(row)

    async def get(self, move_id: int) -> Move | None:
        r = await self.pool.fetchrow(f"SELECT * FROM {self.t} WHERE id = $1", move_id)
        return Move.from_row(r) if r else None

    async def open_for(self, tenant: str) -> Move | None:
        r = await self.pool.fetchrow(f"SELECT * FROM {self.t} WHERE tenant = $1 AND step NOT IN ('done', 'aborted')",
                                     tenant)
        return Move.from_row(r) if r else None

    async def approve(self, move_id: int, approver: str) -> Move:
        r = await self.pool.fetchrow(
            f"UPDATE {self.t} SET step = 'approved', approved_by = $2, updated_at = now() "
            "WHERE id = $1 AND step = 'requested' AND requested_by <> $2 RETURNING *", move_id, approver)
        if r is None:
            m = await self.get(move_id)
            if m is None:
                raise LifecycleError("42704", f"no tenant move {move_id}")
            if m.requested_by == approver:
                raise LifecycleError(INSUFFICIENT_PRIVILEGE,
                                     f"{approver} requested move {move_id}: a second approver must confirm it")
            raise LifecycleError(OBJECT_NOT_IN_STATE, f"move {move_id} is {m.step}, not awaiting approval")
        return Move.from_row(r)

    async def set_step(self, move: Move, step: str, *, error: str | None = None, detail: dict | None = None,
                       conn=None) -> Move:
        sql = (f"UPDATE {self.t} SET step = $2, error = $3, updated_at = now(), detail = detail || $4::jsonb,"
               " flipped_at = CASE WHEN $2 = 'flipped' THEN now() ELSE flipped_at END,"
               " finished_at = CASE WHEN $2 IN ('done', 'aborted') THEN now() ELSE finished_at END"
               " WHERE id = $1 RETURNING *")
        args = (move.id, step, error, json.dumps(detail or {}))
        r = await (conn.fetchrow(sql, *args) if conn is not None else self.pool.fetchrow(sql, *args))
        new = Move.from_row(r)
        move.__dict__.update(new.__dict__)
        return move

    @asynccontextmanager
    async def running(self, move: Move):
        """One process at a time runs a move: a session advisory lock on a control-schema connection held
        while it runs (a killed process loses it with its connection); a second one is refused (55P03)."""
        async with self.pool.acquire() as conn:
            key = f"tenantgate.move:{move.id}"
            if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
                raise LifecycleError(LOCK_NOT_AVAILABLE, f"move {move.id} is being run by another process",
                                     hint="wait for it, or stop it; a killed process releases the move at once")
            try:
                fresh = await self.get(move.id)  # what the other process may have done before it ended
                move.__dict__.update(fresh.__dict__)
                yield move
            finally:
                await conn.fetchval("SELECT pg_advisory_unlock(hashtext($1))", key)

    async def set_error(self, move: Move, error: str | None) -> None:
        await self.pool.execute(f"UPDATE {self.t} SET error = $2, updated_at = now() WHERE id = $1", move.id, error)
        move.error = error


