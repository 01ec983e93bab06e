"""Ed25519 keys and signatures: audit checkpoints, deletion receipts and export manifests.

One key (``audit.signing_key_file`` / ``audit.signing_key_env``) signs
everything tenantgate vouches for; its public half (``audit keygen`` writes
``OUT.pub``, ``audit.verify_key_files`` lists older ones after a rotation)
verifies offline.  A key is named by its *key id*: the first 16 hex digits of
the SHA-256 of the raw public key.

Signed documents (receipts, manifests) carry a ``signature`` object
``{"alg": "ed25519", "key_id": ..., "sig": base64}`` over the canonical JSON
(sorted keys, no spaces, UTF-8) of the document without that object, so a
verifier needs nothing but the document and the public key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_FIELD = "signature"


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
    """A public key from PEM; a private key PEM is accepted too (its public half is used)."""
    if b"PRIVATE KEY" in pem:
        return load_private_key(pem).public_key()
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the audit verify key must be an Ed25519 public key (PEM)")
    return key


def signer_from_config(audit_cfg) -> Signer | None:
    """The signer from ``audit.signing_key_file`` / ``audit.signing_key_env`` (or None)."""
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
    """Public keys accepted on signatures: the signing key's and ``audit.verify_key_files``."""
    keys: dict[str, Ed25519PublicKey] = {}
    signer = signer_from_config(audit_cfg)
    if signer is not None:
        keys[signer.key_id] = signer.public_key
    for path in getattr(audit_cfg, "verify_key_files", None) or []:
        pub = load_public_key(Path(path).read_bytes())
        keys[key_id_of(pub)] = pub
    return keys


def keys_from_files(paths) -> dict[str, Ed25519PublicKey]:
    keys: dict[str, Ed25519PublicKey] = {}
    for path in paths:
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


def verify_signature(key: Ed25519PublicKey, signature_b64: str, message: bytes) -> bool:
    try:
        key.verify(base64.b64decode(signature_b64, validate=True), message)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


# --------------------------------------------------------------------------- signed JSON documents


def document_bytes(doc: dict) -> bytes:
    """What a document signature covers: canonical JSON of the document without its signature."""
    body = {k: v for k, v in doc.items() if k != SIGNATURE_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sign_document(doc: dict, signer: Signer) -> dict:
    """``doc`` plus its ``signature`` object."""
    body = {k: v for k, v in doc.items() if k != SIGNATURE_FIELD}
    return {**body, SIGNATURE_FIELD: {"alg": "ed25519", "key_id": signer.key_id,
                                      "sig": signer.sign(document_bytes(body))}}


class SignatureError(Exception):
    """A signed document does not verify (the message says why)."""


def check_document(doc: Any, keys: dict[str, Ed25519PublicKey], what: str = "document") -> str:
    """Verify a signed document; returns the key id.  Raises :class:`SignatureError`."""
    if not isinstance(doc, dict):
        raise SignatureError(f"the {what} is not a JSON object")
    sig = doc.get(SIGNATURE_FIELD)
    if sig is None:
        raise SignatureError(f"the {what} is not signed (no \"signature\"): it cannot be trusted")
    if not isinstance(sig, dict) or sig.get("alg") != "ed25519" or not isinstance(sig.get("sig"), str) \
            or not isinstance(sig.get("key_id"), str):
        raise SignatureError(f"the {what}'s signature is malformed")
    if not keys:
        raise SignatureError(f"no public key to check the {what}'s signature with")
    key = keys.get(sig["key_id"])
    if key is None:
        raise SignatureError(f"the {what} is signed with unknown key {sig['key_id']!r} "
                             f"(known: {', '.join(sorted(keys))})")
    try:
        message = document_bytes(doc)
    except (TypeError, ValueError) as e:
        raise SignatureError(f"the {what} cannot be canonicalised: {e}")
    if not verify_signature(key, sig["sig"], message):
        raise SignatureError(f"the {what}'s signature does not match its contents (forged or altered)")
    return sig["key_id"]
