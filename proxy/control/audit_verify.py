"""Verification of the audit chain (``tenantgate audit verify``).

:func:`verify_chain` walks the chain in seq order in one REPEATABLE READ
snapshot and reports every problem (the first one first), each with a kind
and a message naming it:

* records: *modified* (contents do not match the hash), *deleted* (a gap in
  seq, a link to a vanished record, a tail shorter than the head or the
  checkpoints), *inserted* (a record outside the chain, beyond the head, or
  between two linked records), *reordered* (a record linking to a later one);
* checkpoints: *bad_signature*, *unknown_key*, *checkpoint_mismatch* (the
  signed hash is not the record's);
* coverage (when signatures are checked, see :mod:`proxy.control.checkpoints`):
  *checkpoints_missing* (a stretch of records wider than the window without a
  checkpoint: checkpoints were deleted, or written without the key) and
  *unsigned_head* (the head is not covered within the window of records or
  seconds);
* the witness (``--witness FILE``, :mod:`proxy.control.witness`):
  *witness_checkpoint_missing* (a checkpoint the witness holds is not in the
  database), *witness_mismatch* (the database's checkpoint or record
  contradicts the witness), *truncated* (the log is shorter than the
  witness's last checkpoint), *witness_bad_signature*.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Sequence

import asyncpg
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .audit import GENESIS_HASH, _q, record_from_row, record_hash
from .checkpoints import checkpoint_message
from proxy.signing import verify_signature
from .witness import WitnessEntry


@dataclass(frozen=True)
class Problem:
    kind: str
    seq: int | None
    message: str


@dataclass
class VerifyReport:
    records: int = 0
    head_seq: int = 0
    checkpoints: int = 0
    signatures_checked: bool = False
    coverage_checked: bool = False
    witness_entries: int | None = None  # None: no witness given
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
            "coverage_checked": self.coverage_checked,
            "witness_entries": self.witness_entries,
            "problems": [asdict(p) for p in self.problems],
        }


@dataclass(frozen=True)
class Coverage:
    """How far apart signed checkpoints may be (``audit.checkpoint_window_records`` / ``_s``)."""

    records: int
    seconds: float


async def verify_chain(
    conn: asyncpg.Connection,
    schema: str,
    public_keys: dict[str, Ed25519PublicKey] | None = None,
    *,
    coverage: Coverage | None = None,
    witness: Sequence[WitnessEntry] | None = None,
    now: datetime | None = None,
    max_problems: int = 50,
) -> VerifyReport:
    """Re-walk the whole chain; see the module docstring for what is reported.  ``coverage`` is
    checked only when ``public_keys`` are given (unsigned checkpoints prove nothing)."""
    s = _q(schema)
    report = VerifyReport()
    problems = report.problems

    def add(kind: str, seq: int | None, message: str) -> None:
        if len(problems) < max_problems:
            problems.append(Problem(kind, seq, message))

    witness_given = witness is not None
    witness = list(witness or [])
    wanted = {e.seq for e in witness}  # record hashes the witness vouches for
    hash_at: dict[int, str] = {}
    at_of: dict[int, datetime] = {}

    async with conn.transaction(isolation="repeatable_read", readonly=True):
        head = await conn.fetchrow(f"SELECT seq, hash FROM {s}.audit_head")
        head_seq, head_hash = (head["seq"], head["hash"]) if head else (0, GENESIS_HASH)
        report.head_seq = head_seq
        cps = await conn.fetch(f"SELECT * FROM {s}.audit_checkpoints ORDER BY seq")
        cp_by_seq = {cp["seq"]: cp for cp in cps}
        wanted.update(cp_by_seq)
        want_at = {1} | {q + 1 for q in cp_by_seq}  # where an unsigned stretch may start

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
                if seq in want_at:
                    at_of[seq] = row["at"]
                if seq in wanted:
                    hash_at[seq] = row["record_hash"]
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
    good: list[int] = []  # checkpoints present and validly signed (a mismatch is reported on its own)
    for cp in cps:
        seq = cp["seq"]
        if seq > last:
            add("deleted", seq, f"a signed checkpoint covers record {seq}, but the log ends at {last}: records deleted")
            continue
        if public_keys:
            key = public_keys.get(cp["key_id"])
            if key is None:
                add("unknown_key", seq, f"checkpoint {seq} is signed with unknown key {cp['key_id']}")
                continue
            if not verify_signature(key, cp["signature"],
                                    checkpoint_message(seq, cp["record_hash"], cp["signed_at"], cp["key_id"])):
                add("bad_signature", seq, f"checkpoint {seq} has a bad signature")
                continue
        good.append(seq)

    if public_keys and coverage is not None:
        report.coverage_checked = True
        _check_coverage(add, good, last, at_of, coverage, now or datetime.now(timezone.utc))
    if witness_given:
        report.witness_entries = len(witness)
        _check_witness(add, witness, cp_by_seq, hash_at, last, public_keys)
    problems.sort(key=lambda p: (p.seq if p.seq is not None else 0))
    return report


def _check_coverage(add, good: list[int], last: int, at_of: dict[int, datetime], cov: Coverage,
                    now: datetime) -> None:
    prev = 0
    for seq in good:
        if seq - prev > cov.records:
            if prev == 0:
                what = f"no signed checkpoint covers records 1..{seq - 1}"
            else:
                what = f"no signed checkpoint between records {prev} and {seq}"
            add("checkpoints_missing", prev + 1,
                f"checkpoints missing: {what} ({seq - prev} records, more than the window of {cov.records}, "
                f"audit.checkpoint_window_records): checkpoints were deleted, or records were written "
                f"without the signing key")
        prev = seq
    if last > prev:
        if last - prev > cov.records:
            kind = "checkpoints_missing" if prev == 0 else "unsigned_head"
            what = ("checkpoints missing: the log has no signed checkpoint" if prev == 0
                    else f"the head is not covered: no signed checkpoint after record {prev}")
            add(kind, prev + 1, f"{what}, and records {prev + 1}..{last} ({last - prev}, more than the window "
                                f"of {cov.records}, audit.checkpoint_window_records) are unsigned: "
                                f"they may have been rewritten")
            return
        oldest = at_of.get(prev + 1)
        if oldest is not None:
            age = (now - oldest).total_seconds()
            if age > cov.seconds:
                kind, what = (("checkpoints_missing", "checkpoints missing: the log has no signed checkpoint, and")
                              if prev == 0 else ("unsigned_head", "the head is not covered:"))
                add(kind, prev + 1,
                    f"{what} records {prev + 1}..{last} have had no signed checkpoint for "
                    f"{age:.0f} s (window {cov.seconds:.0f} s, audit.checkpoint_window_s): they may have been "
                    f"rewritten.  If a tenantgate process stopped abruptly, compare them with the JSONL sink, "
                    f"then sign them with `tenantgate audit checkpoint`")


def _check_witness(add, witness: Sequence[WitnessEntry], cp_by_seq, hash_at: dict[int, str], last: int,
                   public_keys) -> None:
    top = 0
    for e in witness:
        where = f"witness line {e.line}" if e.line else "witness"
        if public_keys:
            key = public_keys.get(e.key_id)
            if key is None or not verify_signature(key, e.signature,
                                                   checkpoint_message(e.seq, e.record_hash, e.signed_at, e.key_id)):
                add("witness_bad_signature", e.seq, f"the {where} holds a checkpoint at record {e.seq} whose "
                                                    "signature does not verify: the witness file was altered")
                continue
        top = max(top, e.seq)
        if e.seq > last:
            continue  # reported once below as truncated
        cp = cp_by_seq.get(e.seq)
        if cp is None:
            add("witness_checkpoint_missing", e.seq,
                f"checkpoint at record {e.seq} ({where}) is missing from the database: checkpoints were deleted")
        elif cp["record_hash"] != e.record_hash:
            add("witness_mismatch", e.seq, f"the database's checkpoint at record {e.seq} contradicts the {where}")
        if hash_at.get(e.seq) != e.record_hash:
            add("witness_mismatch", e.seq, f"record {e.seq} does not match the signed checkpoint in the {where}: "
                                           f"records up to {e.seq} were rewritten")
    if top > last:
        add("truncated", last + 1, f"the log is truncated: it ends at record {last}, but the witness holds a "
                                   f"signed checkpoint at record {top}: records {last + 1}..{top} were deleted")
