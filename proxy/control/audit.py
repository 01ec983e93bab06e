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

Checkpoints
    When the chain passes a multiple of ``audit.checkpoint_every`` (and on
    :meth:`AuditLog.checkpoint`), the head (seq, record_hash) is signed with
    the Ed25519 key from ``audit.signing_key_file`` / ``signing_key_env`` and
    stored in ``audit_checkpoints`` in the same transaction.  Signed
    checkpoints are what a database owner cannot forge: rewriting history
    up to a checkpoint changes the hash that was signed.

Verification (:func:`verify_chain`, ``tenantgate audit verify``)
    Walks the chain in seq order in one REPEATABLE READ snapshot and reports
    every problem (the first one first): *modified* (contents do not match
    the hash), *deleted* (a gap in seq, a link to a vanished record, or a
    tail shorter than the head/checkpoints), *inserted* (a record outside
    the chain, beyond the head, or between two linked records), *reordered*
    (a record that links to a later one), and checkpoint problems (bad
    signature, unknown key, hash mismatch).

Tampering in tests: the append-only trigger must be bypassed first, e.g.
``SET session_replication_role = replica`` as a superuser, or
``ALTER TABLE ... DISABLE TRIGGER audit_log_append_only``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

import asyncpg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from proxy import metrics

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


# --------------------------------------------------------------------------- signing


@dataclass(frozen=True)
class Signer:
    private_key: Ed25519PrivateKey
    key_id: str

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self.private_key.sign(message)).decode()


def key_id_of(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the audit signing key must be an Ed25519 private key (PEM)")
    return key


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the audit verify key must be an Ed25519 public key (PEM)")
    return key


def signer_from_config(audit_cfg) -> Signer | None:
    """The checkpoint signer from ``audit.signing_key_file`` / ``audit.signing_key_env`` (or None)."""
    pem: bytes | None = None
    if audit_cfg.signing_key_file:
        pem = Path(audit_cfg.signing_key_file).read_bytes()
    elif audit_cfg.signing_key_env:
        v = os.environ.get(audit_cfg.signing_key_env)
        if v is None:
            raise ValueError(f"audit.signing_key_env: environment variable {audit_cfg.signing_key_env} is not set")
        pem = v.encode()
    if pem is None:
        return None
    key = load_private_key(pem)
    return Signer(key, key_id_of(key.public_key()))


def verify_keys_from_config(audit_cfg) -> dict[str, Ed25519PublicKey]:
    """Public keys that checkpoints may be signed with: the signing key's and ``audit.verify_key_files``."""
    keys: dict[str, Ed25519PublicKey] = {}
    signer = signer_from_config(audit_cfg)
    if signer is not None:
        keys[signer.key_id] = signer.public_key
    for path in getattr(audit_cfg, "verify_key_files", None) or []:
        pub = load_public_key(Path(path).read_bytes())
        keys[key_id_of(pub)] = pub
    return keys


def new_signing_key_pem() -> tuple[bytes, bytes]:
    """(private PEM, public PEM) of a fresh Ed25519 key (``tenantgate audit keygen``)."""
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return priv, pub


def checkpoint_message(seq: int, rec_hash: str, signed_at: datetime, key_id: str) -> bytes:
    return canonical_json(
        {"seq": seq, "record_hash": rec_hash, "signed_at": _iso(signed_at), "key_id": key_id, "v": 1}
    )


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
) -> list[tuple[int, AuditRecord, str, str]]:
    """Append ``records`` to the chain.  Must run inside a transaction on ``conn``.

    Returns (seq, record, prev_hash, record_hash) per record.  Usable from any
    control-plane transaction (e.g. a grant approval and its audit record
    commit together).
    """
    s = _q(schema)
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
    crossed = seq // checkpoint_every > first_seq // checkpoint_every
    if signer is not None and seq > 0 and (crossed or force_checkpoint):
        await conn.execute(
            f"INSERT INTO {s}.audit_checkpoints (seq, record_hash, signed_at, key_id, signature) "
            f"VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO NOTHING",
            seq, prev, now, signer.key_id, signer.sign(checkpoint_message(seq, prev, now, signer.key_id)),
        )
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
                self._fh.write(json.dumps(d, sort_keys=True, ensure_ascii=False) + "\n")
            self._fh.flush()
        except OSError as e:  # the database is the record of truth; the sink is a copy
            log.error("audit JSONL sink %s: %s", self.path, e)

    def close(self) -> None:
        self._fh.close()


class AuditWriter:
    """Group-commits appends from all sessions of this process (see module docstring)."""

    def __init__(self, pool: asyncpg.Pool, schema: str, *, signer: Signer | None, checkpoint_every: int,
                 sink: JsonlSink | None = None):
        self.pool = pool
        self.schema = schema
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.sink = sink
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
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                committed = await chain_insert(
                    conn, self.schema, records, signer=self.signer,
                    checkpoint_every=self.checkpoint_every, force_checkpoint=force_checkpoint,
                )
        metrics.AUDIT_WRITE_SECONDS.observe(time.perf_counter() - t0)
        for _, rec, _, _ in committed:
            metrics.AUDIT_RECORDS_TOTAL.labels(rec.type).inc()
        if self.sink is not None:
            self.sink.write(committed)
        return committed

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
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self.sink is not None:
            self.sink.close()


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class Problem:
    kind: str  # modified | deleted | inserted | reordered | bad_signature | checkpoint_mismatch | unknown_key
    seq: int | None
    message: str


@dataclass
class VerifyReport:
    records: int = 0
    head_seq: int = 0
    checkpoints: int = 0
    signatures_checked: bool = False
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "records": self.records,
            "head_seq": self.head_seq,
            "checkpoints": self.checkpoints,
            "signatures_checked": self.signatures_checked,
            "problems": [asdict(p) for p in self.problems],
        }


async def verify_chain(
    conn: asyncpg.Connection,
    schema: str,
    public_keys: dict[str, Ed25519PublicKey] | None = None,
    *,
    max_problems: int = 50,
) -> VerifyReport:
    """Re-walk the whole chain; see the module docstring for what is reported."""
    s = _q(schema)
    report = VerifyReport()
    problems = report.problems

    def add(kind: str, seq: int | None, message: str) -> None:
        if len(problems) < max_problems:
            problems.append(Problem(kind, seq, message))

    async with conn.transaction(isolation="repeatable_read", readonly=True):
        head = await conn.fetchrow(f"SELECT seq, hash FROM {s}.audit_head")
        head_seq, head_hash = (head["seq"], head["hash"]) if head else (0, GENESIS_HASH)
        report.head_seq = head_seq
        cps = await conn.fetch(f"SELECT * FROM {s}.audit_checkpoints ORDER BY seq")
        cp_by_seq = {cp["seq"]: cp for cp in cps}

        async def seq_with_hash(h: str) -> int | None:
            return await conn.fetchval(
                f"SELECT seq FROM {s}.audit_log WHERE record_hash = $1 ORDER BY seq LIMIT 1", h
            )

        expected_seq, expected_prev = 1, GENESIS_HASH
        moved: set[int] = set()  # records found out of order (to name their neighbours' breaks alike)
        cur = await conn.cursor(f"SELECT * FROM {s}.audit_log ORDER BY seq")
        while True:
            batch = await cur.fetch(1000)
            if not batch:
                break
            for row in batch:
                report.records += 1
                seq = row["seq"]
                if seq < expected_seq:
                    add("inserted", seq, f"record {seq} is not part of the chain (inserted; the chain starts at 1)")
                    continue
                if seq > head_seq:
                    add("inserted", seq, f"record {seq} lies beyond the chain head {head_seq}: "
                                         "it was inserted outside tenantgate")
                gap = seq > expected_seq
                if gap:
                    what = f"record {expected_seq}" if seq == expected_seq + 1 else f"records {expected_seq}..{seq - 1}"
                    add("deleted", expected_seq, f"{what} deleted: the sequence jumps from {expected_seq - 1} to {seq}")
                rec = record_from_row(row)
                if record_hash(rec, row["prev_hash"]) != row["record_hash"]:
                    add("modified", seq, f"record {seq} was modified: its contents do not match its hash")
                elif not gap and row["prev_hash"] != expected_prev:
                    pred = await seq_with_hash(row["prev_hash"])
                    if pred is None:
                        add("deleted", seq, f"record {seq} does not follow record {seq - 1}: the record it followed "
                                            f"is gone (deleted, or record {seq - 1} was rewritten)")
                    elif pred >= seq or seq in moved or pred in moved:
                        moved.update((seq, pred))
                        add("reordered", seq, f"record {seq} is out of order: it belongs after record {pred}")
                    else:
                        what = f"record {pred + 1} was" if pred + 1 == seq - 1 else f"records {pred + 1}..{seq - 1} were"
                        add("inserted", pred + 1, f"{what} inserted: record {seq} follows record {pred}")
                cp = cp_by_seq.get(seq)
                if cp is not None and cp["record_hash"] != row["record_hash"]:
                    add("checkpoint_mismatch", seq, f"signed checkpoint at record {seq} does not match it: "
                                                    f"records up to {seq} were rewritten")
                expected_seq, expected_prev = seq + 1, row["record_hash"]
        last = expected_seq - 1
        if head_seq > last:
            add("deleted", last + 1, f"records {last + 1}..{head_seq} deleted: the chain head is at {head_seq} "
                                     f"but the log ends at {last}")
        elif head_seq == last and head_hash != expected_prev:
            add("modified", last, f"record {last} does not match the chain head (modified or replaced)")

    report.checkpoints = len(cps)
    report.signatures_checked = bool(public_keys)
    for cp in cps:
        seq = cp["seq"]
        if seq > last:
            add("deleted", seq, f"a signed checkpoint covers record {seq}, but the log ends at {last}: records deleted")
        if public_keys:
            key = public_keys.get(cp["key_id"])
            if key is None:
                add("unknown_key", seq, f"checkpoint {seq} is signed with unknown key {cp['key_id']}")
                continue
            try:
                key.verify(base64.b64decode(cp["signature"]),
                           checkpoint_message(seq, cp["record_hash"], cp["signed_at"], cp["key_id"]))
            except Exception:
                add("bad_signature", seq, f"checkpoint {seq} has a bad signature")
    problems.sort(key=lambda p: (p.seq if p.seq is not None else 0))
    return report


async def export_records(
    conn: asyncpg.Connection, schema: str, *, since: datetime | None = None, since_seq: int | None = None
) -> AsyncIterator[str]:
    """Yield audit records as JSON lines (no trailing newline), in seq order."""
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
                yield json.dumps(row_to_json(row), sort_keys=True, ensure_ascii=False)
