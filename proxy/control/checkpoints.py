"""Signed checkpoints of the audit chain: when to sign, what is signed, where it goes.

A checkpoint is an Ed25519 signature over ``(seq, record_hash, signed_at,
key_id)`` of one record of the chain: it vouches for every record up to
``seq``, because each hash covers the previous one.  Only holders of the
signing key can make one; the control role (which can rewrite the tables)
cannot.

When (``chain_insert`` in :mod:`proxy.control.audit` calls :func:`due_seqs`):
    a writer with the key signs the record at which the unsigned stretch
    since the last checkpoint reaches ``audit.checkpoint_every`` records,
    inside the batch, so stretches never exceed it while a key holder writes.
    :class:`~proxy.control.audit.AuditWriter` also signs the head
    ``audit.checkpoint_interval_s`` after records were left unsigned, and on
    close.

Where: ``audit_checkpoints`` (same transaction as the records) and, after the
commit, the witness file (:mod:`proxy.control.witness`).

Coverage (checked by ``audit verify``): consecutive checkpoints may be at
most ``audit.checkpoint_window_records`` apart (default twice
``checkpoint_every``), and the head may stay unsigned for at most that many
records and ``audit.checkpoint_window_s`` seconds.  Deleting checkpoints to
hide a rewrite therefore leaves a stretch wider than the window.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Sequence

from proxy.signing import Signer
from .witness import WitnessEntry


def iso(at: datetime) -> str:
    return at.astimezone(timezone.utc).isoformat(timespec="microseconds")


def checkpoint_message(seq: int, rec_hash: str, signed_at: datetime | str, key_id: str) -> bytes:
    at = signed_at if isinstance(signed_at, str) else iso(signed_at)
    return json.dumps({"seq": seq, "record_hash": rec_hash, "signed_at": at, "key_id": key_id, "v": 1},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def due_seqs(first_seq: int, last_seq: int, last_checkpoint: int, every: int, *, force: bool) -> list[int]:
    """Seqs in ``first_seq+1 .. last_seq`` to sign: where the unsigned stretch reaches ``every``,
    and the head when ``force`` (unless already signed)."""
    out: list[int] = []
    cp = last_checkpoint
    nxt = max(cp + every, first_seq + 1)
    while nxt <= last_seq:
        out.append(nxt)
        cp = nxt
        nxt = cp + every
    if force and last_seq > cp:
        out.append(last_seq)
    return out


async def insert_checkpoints(conn, schema_q: str, signer: Signer, points: Sequence[tuple[int, str]],
                             now: datetime) -> list[WitnessEntry]:
    """Sign and store (seq, record_hash) points; returns them as witness entries."""
    if not points:
        return []
    entries = [WitnessEntry(seq, h, iso(now), signer.key_id,
                            signer.sign(checkpoint_message(seq, h, now, signer.key_id)))
               for seq, h in points]
    await conn.execute(
        f"INSERT INTO {schema_q}.audit_checkpoints (seq, record_hash, signed_at, key_id, signature) "
        f"SELECT * FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $4::text[], $5::text[]) "
        f"ON CONFLICT (seq) DO NOTHING",
        [e.seq for e in entries], [e.record_hash for e in entries], [now] * len(entries),
        [e.key_id for e in entries], [e.signature for e in entries],
    )
    return entries


def window_records(audit_cfg) -> int:
    v = getattr(audit_cfg, "checkpoint_window_records", None)
    return v if v is not None else 2 * audit_cfg.checkpoint_every
