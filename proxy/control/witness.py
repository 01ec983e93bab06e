"""The checkpoint witness: signed checkpoints copied to a file outside the database.

Every signed checkpoint (seq, record_hash, signed_at, key_id, signature) is
appended, after its transaction commits, as one JSON line to
``audit.witness_file`` and fsynced.  Lines are written with one ``write()`` on
an ``O_APPEND`` descriptor, so several tenantgate processes on one host may
share the file.  Ship the file off the host (see docs/operator-access.md,
"Audit integrity and the witness file"): whoever controls the database can
delete checkpoints there, but not the copies the witness already holds.

``tenantgate audit verify --witness FILE`` then fails when a checkpoint in
the witness is missing from the database or contradicts it, or when the log
is shorter than the witness's last sequence.  A checkpoint the database has
and the witness lacks is normal (a crash between commit and append).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Iterable

log = logging.getLogger("tenantgate.audit")


@dataclass(frozen=True)
class WitnessEntry:
    seq: int
    record_hash: str
    signed_at: str  # ISO, exactly as signed
    key_id: str
    signature: str
    line: int = 0

    def to_json(self) -> dict:
        return {"v": 1, "seq": self.seq, "record_hash": self.record_hash, "signed_at": self.signed_at,
                "key_id": self.key_id, "signature": self.signature}


def append_witness(path: str, entries: Iterable[WitnessEntry]) -> None:
    """Append and fsync.  Raises OSError (the caller logs it: the database stays the record)."""
    data = "".join(json.dumps(e.to_json(), sort_keys=True) + "\n" for e in entries).encode()
    if not data:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


class WitnessError(Exception):
    pass


def read_witness(path: str) -> list[WitnessEntry]:
    """All entries, in file order.  Raises WitnessError naming the bad line."""
    out: list[WitnessEntry] = []
    try:
        fh = open(path, "r", encoding="utf-8")
    except OSError as e:
        raise WitnessError(f"cannot read the witness file {path}: {e.strerror or e}")
    with fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                entry = WitnessEntry(int(d["seq"]), str(d["record_hash"]), str(d["signed_at"]),
                                     str(d["key_id"]), str(d["signature"]), n)
            except (ValueError, KeyError, TypeError):
                if not line.endswith("\n"):  # a torn last line (crash mid-append): not evidence either way
                    log.warning("witness %s: ignoring the incomplete last line %d", path, n)
                    continue
                raise WitnessError(f"witness file {path}, line {n}: not a checkpoint entry")
            out.append(entry)
    return out
