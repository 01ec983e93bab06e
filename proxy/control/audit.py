"""The tamper-evident audit trail: a hash chain in the control schema.

Records
    Every record is one row of ``audit_log`` with a dense sequence number
    ``seq`` (1, 2, 3, ...), ``prev_hash`` (the previous record's hash; 64 zeros
    for the first) and ``record_hash`` = SHA-256 of the canonical JSON (sorted
    keys, no spaces, UTF-8) of the record's fields *plus* ``prev_hash``.  The
    position is not hashed: order is given by the links, so a moved record is
    recognised as *reordered* rather than *modified*.  Rows are never
    updated: the outcome of a statement is its own record (``ref_seq`` points
    at the statement record).  A trigger makes the table append-only.

Concurrency: one short critical section, batched (group commit)
    ``audit_head`` is a one-row table holding the chain's tail (seq, hash).
    Appending takes its row lock (``SELECT ... FOR UPDATE``), computes the new
    hashes in Python, inserts the rows, moves the head and commits.  That lock
    is the only serialisation point and is held for a few loopback round trips
    plus the commit's WAL flush.  To keep that from collapsing throughput,
    each process funnels its appends through one :class:`AuditWriter` task:
    all records queued while a batch is being committed go into the next
    batch, in one transaction and one WAL flush.  Under load the batch grows
    with the number of concurrent sessions, so throughput scales with
    concurrency instead of being capped at one fsync per statement.  Several
    tenantgate instances share the chain and simply take turns on the head
    row.  Per-session chains were considered: they avoid the lock but make a
    deleted *whole* session chain undetectable without extra bookkeeping,
    and verification and export need a global order anyway.

    ``append()`` returns only after the batch's COMMIT (with
    ``synchronous_commit = on`` forced on the writer's connections), so the
    record is durable before the caller forwards the statement.  Any failure
    raises :class:`AuditWriteError`; when a batch fails, its records are
    retried one by one so that one bad record only fails its own caller.

Checkpoints (:mod:`proxy.control.checkpoints`, :mod:`proxy.control.witness`)
    A writer holding the Ed25519 key (``audit.signing_key_file`` /
    ``signing_key_env``) signs the record at which the unsigned stretch
    reaches ``audit.checkpoint_every``, the head ``audit.checkpoint_interval_s``
    after records were left unsigned, and the head on close.  Checkpoints are
    stored in ``audit_checkpoints`` in the same transaction and, after the
    commit, appended to the witness file outside the database.

Verification (:mod:`proxy.control.audit_verify`, ``tenantgate audit verify``)
    Reports modified, deleted, inserted and reordered records, bad or
    mismatching checkpoints, stretches without checkpoints wider than the
    window, and contradictions with the witness file.

Tampering in tests: the append-only trigger must be bypassed first, e.g.
``SET session_replication_role = replica`` as a superuser, or
``ALTER TABLE ... DISABLE TRIGGER audit_log_append_only``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Sequence

import asyncpg

from proxy import metrics
from proxy.textsafe import json_line_safe

from .checkpoints import checkpoint_message, due_seqs, insert_checkpoints  # noqa: F401  (re-exported)
from proxy.signing import (  # noqa: F401  (re-exported: the audit key's API)
    Signer,
    key_id_of,
    load_private_key,
    load_public_key,
    new_signing_key_pem,
    signer_from_config,
    verify_keys_from_config,
)
from .witness import WitnessEntry, append_witness

log = logging.getLogger("tenantgate.audit")

GENESIS_HASH = "0" * 64
MAX_BATCH = 512

# Record types.
STATEMENT = "statement"  # pre-execution record of an operator statement
OUTCOME = "statement.outcome"  # its outcome (ref_seq -> the statement record)
STATEMENT_REFUSED = "statement.refused"  # refused by policy (operator and tenant sessions)
CONNECTION_REFUSED = "connection.refused"
SESSION_OPENED = "session.opened"
SESSION_ENDED = "session.ended"
AUTH_FAILED = "auth.failed"
GRANT_REQUESTED = "grant.requested"
GRANT_APPROVAL = "grant.approval"  # one approver's approval (grant may still need more)
GRANT_APPROVED = "grant.approved"
GRANT_DENIED = "grant.denied"
GRANT_REVOKED = "grant.revoked"
GRANT_EXPIRED = "grant.expired"
OPERATOR_ADDED = "operator.added"
OPERATOR_REMOVED = "operator.removed"
OPERATOR_CHANGED = "operator.changed"
TENANT_STATUS = "tenant.status"


class AuditWriteError(Exception):
    """An audit record could not be durably written (the action must not proceed)."""


@dataclass(frozen=True)
class AuditRecord:
    """One audit event.  ``at`` is filled in when the record is appended."""

    type: str
    operator: str | None = None
    grant_id: int | None = None
    tenant: str | None = None
    client_addr: str | None = None
    session_id: str | None = None
    statement_class: str | None = None
    original_sql: str | None = None
    rewritten_sql: str | None = None
    params: list | None = None  # JSON-able (see encode_params)
    ref_seq: int | None = None
    sqlstate: str | None = None
    command_tag: str | None = None
    rows: int | None = None
    duration_us: int | None = None
    detail: dict | None = None
    at: datetime | None = None


RECORD_FIELDS = tuple(f.name for f in fields(AuditRecord))
_COLUMNS = ("seq", "prev_hash", "record_hash") + RECORD_FIELDS
_COLUMN_TYPES = {"seq": "bigint", "at": "timestamptz", "grant_id": "bigint", "ref_seq": "bigint",
                 "rows": "bigint", "duration_us": "bigint"}


def _json_default(value: Any) -> Any:
    """Values JSON lacks, as what they will read back as (so hashes stay reproducible)."""
    if isinstance(value, datetime):
        return _iso(value) if value.tzinfo else value.isoformat()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, bytes):
        return {"hex": value.hex()}
    return str(value)  # Decimal, UUID, Path, ...


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=_json_default).encode()


def _iso(at: datetime) -> str:
    return at.astimezone(timezone.utc).isoformat(timespec="microseconds")


def hashed_fields(record: AuditRecord, prev_hash: str) -> dict:
    d = {name: getattr(record, name) for name in RECORD_FIELDS}
    d["at"] = _iso(record.at) if record.at is not None else None
    d["prev_hash"] = prev_hash
    return d


def record_hash(record: AuditRecord, prev_hash: str) -> str:
    return hashlib.sha256(canonical_json(hashed_fields(record, prev_hash))).hexdigest()


def encode_params(params: Sequence[bytes | None] | None, *, redact: bool) -> list | None:
    """Bound parameters as JSON: text when printable UTF-8, else {"hex": ...}; or all redacted."""
    if params is None:
        return None
    out: list = []
    for p in params:
        if p is None:
            out.append(None)
        elif redact:
            out.append("<redacted>")
        else:
            try:
                s = p.decode("utf-8")
            except UnicodeDecodeError:
                s = None
            out.append(s if s is not None and "\x00" not in s else {"hex": p.hex()})
    return out


def record_from_row(row: asyncpg.Record) -> AuditRecord:
    values = {name: row[name] for name in RECORD_FIELDS}
    for name in ("params", "detail"):
        if values[name] is not None:
            values[name] = json.loads(values[name])
    return AuditRecord(**values)


def row_to_json(row: asyncpg.Record) -> dict:
    """An audit row as a JSON-able dict (the export format)."""
    rec = record_from_row(row)
    d = {"seq": row["seq"], "prev_hash": row["prev_hash"], "record_hash": row["record_hash"]}
    d.update({k: v for k, v in asdict(rec).items()})
    d["at"] = _iso(rec.at)
    return d


# --------------------------------------------------------------------------- appending


def _q(schema: str) -> str:
    return f'"{schema}"'


async def chain_insert(
    conn: asyncpg.Connection,
    schema: str,
    records: Sequence[AuditRecord],
    *,
    signer: Signer | None = None,
    checkpoint_every: int = 100,
    force_checkpoint: bool = False,
    checkpoints_out: list[WitnessEntry] | None = None,
) -> list[tuple[int, AuditRecord, str, str]]:
    """Append ``records`` to the chain.  Must run inside a transaction on ``conn``.

    Returns (seq, record, prev_hash, record_hash) per record.  Usable from any
    control-plane transaction (e.g. a grant approval and its audit record
    commit together).  With a ``signer``, the checkpoints due (see
    :mod:`proxy.control.checkpoints`) are stored in the same transaction and
    appended to ``checkpoints_out`` for the witness (written after COMMIT).
    """
    s = _q(schema)
    if signer is not None:
        head = await conn.fetchrow(
            f"SELECT seq, hash, (SELECT coalesce(max(seq), 0) FROM {s}.audit_checkpoints) AS cp "
            f"FROM {s}.audit_head FOR UPDATE")
    else:
        head = await conn.fetchrow(f"SELECT seq, hash FROM {s}.audit_head FOR UPDATE")
    if head is None:
        raise AuditWriteError("the audit chain head is missing (control schema damaged)")
    first_seq, prev = head["seq"], head["hash"]
    seq = first_seq
    now = datetime.now(timezone.utc)
    out: list[tuple[int, AuditRecord, str, str]] = []
    rows = []
    for rec in records:
        if rec.at is None:
            rec = replace(rec, at=now)
        elif rec.at.tzinfo is None:
            rec = replace(rec, at=rec.at.replace(tzinfo=timezone.utc))
        for name in ("params", "detail"):  # store and hash exactly what reads back
            value = getattr(rec, name)
            if value is not None:
                rec = replace(rec, **{name: json.loads(canonical_json(value))})
        seq += 1
        h = record_hash(rec, prev)
        out.append((seq, rec, prev, h))
        values = [getattr(rec, n) for n in RECORD_FIELDS]
        for i, n in enumerate(RECORD_FIELDS):
            if n in ("params", "detail") and values[i] is not None:
                values[i] = canonical_json(values[i]).decode()
        rows.append((seq, prev, h, *values))
        prev = h
    if rows:
        # One statement (one round trip) inserts the batch and moves the head.
        n = len(_COLUMNS)
        arrays = ", ".join(f"${i + 1}::{_COLUMN_TYPES.get(c, 'text')}[]" for i, c in enumerate(_COLUMNS))
        await conn.execute(
            f"WITH ins AS (INSERT INTO {s}.audit_log ({', '.join(_COLUMNS)}) SELECT * FROM unnest({arrays})) "
            f"UPDATE {s}.audit_head SET seq = ${n + 1}, hash = ${n + 2}",
            *[list(col) for col in zip(*rows)], seq, prev,
        )
    if signer is not None and seq > 0:
        hashes = {sq: h for sq, _, _, h in out}
        hashes[first_seq] = head["hash"]
        due = due_seqs(first_seq, seq, head["cp"], checkpoint_every, force=force_checkpoint)
        entries = await insert_checkpoints(conn, s, signer, [(q, hashes[q]) for q in due], now)
        if checkpoints_out is not None:
            checkpoints_out.extend(entries)
    return out


class JsonlSink:
    """Optional copy of every committed record as one JSON line (``audit.jsonl_path``)."""

    def __init__(self, path: str):
        self.path = path
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, committed: Sequence[tuple[int, AuditRecord, str, str]]) -> None:
        try:
            for seq, rec, prev, h in committed:
                d = {"seq": seq, "prev_hash": prev, "record_hash": h, **asdict(rec)}
                d["at"] = _iso(rec.at)
                self._fh.write(json_line_safe(json.dumps(d, sort_keys=True, ensure_ascii=False)) + "\n")
            self._fh.flush()
        except OSError as e:  # the database is the record of truth; the sink is a copy
            log.error("audit JSONL sink %s: %s", self.path, e)

    def close(self) -> None:
        self._fh.close()


class AuditWriter:
    """Group-commits appends from all sessions of this process (see module docstring)."""

    def __init__(self, pool: asyncpg.Pool, schema: str, *, signer: Signer | None, checkpoint_every: int,
                 sink: JsonlSink | None = None, witness_file: str | None = None,
                 checkpoint_interval_s: float | None = None):
        self.pool = pool
        self.schema = schema
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.sink = sink
        self.witness_file = witness_file
        self.checkpoint_interval_s = checkpoint_interval_s
        self._timer: asyncio.TimerHandle | None = None
        self._timed: asyncio.Task | None = None
        self._unsigned = False  # this process appended records that no checkpoint covers yet
        self._pending: list[tuple[AuditRecord, asyncio.Future]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._busy = False  # a batch is being committed
        self._closed = False

    async def append(self, record: AuditRecord) -> int:
        """Append and wait until the record is committed; returns its seq."""
        return await self.enqueue(record)

    def enqueue(self, record: AuditRecord) -> asyncio.Future:
        """Queue ``record`` now (its place in the chain follows everything queued before it) and return
        a future that resolves to its seq once committed, or fails with AuditWriteError."""
        if self._closed:
            raise AuditWriteError("the audit writer is closed")
        if record.at is None:
            record = replace(record, at=datetime.now(timezone.utc))
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((record, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="tenantgate-audit-writer")
        self._wake.set()
        return fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                self._busy = True
                try:
                    await self._write(batch)
                except BaseException as e:  # never leave a caller waiting
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(AuditWriteError(f"audit write failed: {e}"))
                    if isinstance(e, asyncio.CancelledError):
                        raise
                finally:
                    self._busy = False

    async def _commit(self, records: list[AuditRecord], *, force_checkpoint: bool = False):
        t0 = time.perf_counter()
        signed: list[WitnessEntry] = []
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                committed = await chain_insert(
                    conn, self.schema, records, signer=self.signer,
                    checkpoint_every=self.checkpoint_every, force_checkpoint=force_checkpoint,
                    checkpoints_out=signed,
                )
        metrics.AUDIT_WRITE_SECONDS.observe(time.perf_counter() - t0)
        for _, rec, _, _ in committed:
            metrics.AUDIT_RECORDS_TOTAL.labels(rec.type).inc()
        if self.sink is not None:
            self.sink.write(committed)
        self.after_commit(committed, signed)
        return committed

    def after_commit(self, committed, signed: Sequence[WitnessEntry]) -> None:
        """After a COMMIT (of this writer or of a control-plane transaction): copy new checkpoints to the
        witness, and arrange for a timed checkpoint when records were left unsigned."""
        if signed:
            write_witness(self.witness_file, signed)
        if self.signer is None:
            return
        if committed:
            self._unsigned = not signed or signed[-1].seq < committed[-1][0]
        elif signed:
            self._unsigned = False
        if self._unsigned and self.checkpoint_interval_s and self._timer is None and not self._closed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timer = loop.call_later(self.checkpoint_interval_s, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        if self._unsigned and not self._closed:
            self._timed = asyncio.ensure_future(self._timed_checkpoint())

    async def _timed_checkpoint(self) -> None:
        try:
            await self._commit([], force_checkpoint=True)
        except Exception as e:  # retried at the next append's timer; verify names the unsigned tail meanwhile
            log.error("timed audit checkpoint failed: %s", e)

    async def _write(self, batch: list[tuple[AuditRecord, asyncio.Future]]) -> None:
        try:
            committed = await self._commit([r for r, _ in batch])
        except Exception as e:
            if len(batch) > 1:  # isolate the bad record(s)
                for item in batch:
                    await self._write([item])
                return
            metrics.AUDIT_FAILURES_TOTAL.inc()
            log.error("audit write failed: %s", e)
            fut = batch[0][1]
            if not fut.done():
                fut.set_exception(AuditWriteError(f"audit write failed: {e}"))
            return
        for (seq, _, _, _), (_, fut) in zip(committed, batch):
            if not fut.done():
                fut.set_result(seq)

    async def checkpoint(self) -> int | None:
        """Sign the current head now (no-op without a signing key).  Returns its seq."""
        if self.signer is None:
            return None
        await self._commit([], force_checkpoint=True)
        async with self.pool.acquire() as conn:
            return await conn.fetchval(f"SELECT seq FROM {_q(self.schema)}.audit_head")

    async def close(self) -> None:
        self._closed = True
        while (self._pending or self._busy) and self._task is not None and not self._task.done():
            await asyncio.sleep(0.01)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._timed is not None and not self._timed.done():
            await asyncio.gather(self._timed, return_exceptions=True)
        if self.signer is not None and self._unsigned:  # leave nothing of ours unsigned
            try:
                await self._commit([], force_checkpoint=True)
            except Exception as e:
                log.error("closing audit checkpoint failed: %s", e)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self.sink is not None:
            self.sink.close()


def write_witness(path: str | None, entries: Sequence[WitnessEntry]) -> None:
    """Append checkpoints to the witness file (after their COMMIT).  A failure is logged and
    counted: the checkpoint is in the database, and ``audit verify`` reports the stretch the witness
    misses only if the database loses it too."""
    if not path or not entries:
        return
    try:
        append_witness(path, entries)
    except OSError as e:
        log.error("audit witness %s: %s", path, e)


async def export_records(
    conn: asyncpg.Connection, schema: str, *, since: datetime | None = None, since_seq: int | None = None
) -> AsyncIterator[str]:
    """Yield audit records as JSON lines (no trailing newline), in seq order.  Each is one line for
    any line-based reader: U+2028, U+2029, U+0085 and other controls are ``\\uXXXX`` escapes."""
    s = _q(schema)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        cur = await conn.cursor(
            f"SELECT * FROM {s}.audit_log WHERE ($1::timestamptz IS NULL OR at >= $1) "
            f"AND ($2::bigint IS NULL OR seq >= $2) ORDER BY seq",
            since, since_seq,
        )
        while True:
            batch = await cur.fetch(1000)
            if not batch:
                break
            for row in batch:
                yield json_line_safe(json.dumps(row_to_json(row), sort_keys=True, ensure_ascii=False))
