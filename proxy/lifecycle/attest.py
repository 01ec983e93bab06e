"""Signed deletion receipts, export manifests and demand records, verified offline: one implementation.

tenantgate vouches for two documents a tenant's admins keep: the *deletion
receipt* of a purge and the *manifest* of an export.  Both are signed with
the audit key (Ed25519, ``audit.signing_key_file``; :mod:`proxy.signing`)
when they are made, as a ``signature`` object over the canonical JSON of the
rest of the document.  A checksum alone proves nothing: anyone can write a
receipt and compute its SHA-256.

Verification needs only the document and the public key (``audit keygen``
writes it as ``KEY.pub``): ``tenantgate receipt verify FILE --key KEY.pub``
for a receipt, a ``manifest.json``, or a whole export (directory or
``.tar.zst``), and ``tenantgate tenant verify-export`` checks the manifest
signature before the files.  :func:`verify_document` is the one check both use.
Demand records (:mod:`proxy.control.demands`) are signed the same way and
checked by the same ``receipt verify``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from proxy.signing import SIGNATURE_FIELD, SignatureError, Signer, check_document, sign_document

RECEIPT_TYPE = "tenant_deletion_receipt"
DEMAND_TYPE = "tenant_demand_record"  # proxy.control.demands
MANIFEST_FORMAT = "tenantgate-tenant-export"
MAX_DOCUMENT_BYTES = 16 << 20  # a receipt or manifest larger than this is not one of ours


@dataclass(frozen=True)
class Attestation:
    kind: str  # "receipt" | "manifest"
    key_id: str
    doc: dict

    def summary(self) -> str:
        d = self.doc
        if self.kind == "receipt":
            return (f'deletion receipt OK: tenant "{d.get("tenant")}", {d.get("total_rows")} rows deleted, '
                    f'finished {d.get("finished_at")}, remaining rows verified {d.get("verified_remaining_rows")}; '
                    f"signed with key {self.key_id}")
        if self.kind == "demand":
            return (f'demand record OK: demand {d.get("demand_id")} for tenant "{d.get("tenant")}" by '
                    f'{d.get("authority")} (ref {d.get("reference")}), registered {d.get("registered_at")} by '
                    f'{d.get("registered_by")}, gag until {d.get("gag_until") or "-"}; signed with key {self.key_id}')
        return (f'export manifest OK: tenant "{d.get("tenant")}", {d.get("total_rows")} rows in '
                f'{len(d.get("tables") or [])} tables, snapshot {d.get("snapshot_time")}; signed with key {self.key_id}')


def _receipt_sha256(doc: dict) -> str:
    body = {k: v for k, v in doc.items() if k not in ("receipt_sha256", SIGNATURE_FIELD)}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def kind_of(doc: Any) -> str:
    if isinstance(doc, dict) and doc.get("type") == RECEIPT_TYPE:
        return "receipt"
    if isinstance(doc, dict) and doc.get("format") == MANIFEST_FORMAT:
        return "manifest"
    if isinstance(doc, dict) and doc.get("type") == DEMAND_TYPE:
        return "demand"
    raise SignatureError("not a tenantgate deletion receipt, export manifest or demand record")


def sign(doc: dict, signer: Signer | None) -> dict:
    """``doc`` signed (unchanged without a signer: it then fails verification, on purpose)."""
    return doc if signer is None else sign_document(doc, signer)


def verify_document(doc: Any, keys: dict) -> Attestation:
    """Check a receipt or manifest: its kind, its own checksum (receipts) and its signature.

    Raises :class:`SignatureError` with a message naming what is wrong."""
    kind = kind_of(doc)
    what = {"receipt": "deletion receipt", "manifest": "export manifest", "demand": "demand record"}[kind]
    if kind == "receipt" and doc.get("receipt_sha256") != _receipt_sha256(doc):
        raise SignatureError(f"the {what} was altered: receipt_sha256 does not match its contents")
    key_id = check_document(doc, keys, what)
    return Attestation(kind, key_id, doc)


def parse_document(raw: bytes, where: str) -> Any:
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise SignatureError(f"{where}: larger than {MAX_DOCUMENT_BYTES} bytes: not a receipt or manifest")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SignatureError(f"{where}: not valid JSON: {e}")


def read_document(path: str) -> Any:
    """A receipt or manifest from a JSON file, read with a size limit."""
    with open(path, "rb") as f:
        raw = f.read(MAX_DOCUMENT_BYTES + 1)
    return parse_document(raw, path)
