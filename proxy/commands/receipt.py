"""`tenantgate receipt verify FILE`: check a deletion receipt or an export offline.

    tenantgate receipt verify receipt.json --key audit.key.pub
    tenantgate receipt verify acme-2026-11.tar.zst --key audit.key.pub   # a whole export
    tenantgate receipt verify manifest.json --config tenantgate.yaml    # keys from audit.*

FILE is a deletion receipt (the JSON `tenant purge` prints and the audit
chain keeps), a demand record (`demand register` prints it; --public-key is
the same as --key), an export manifest, or a whole export (directory or .tar.zst:
then every file's checksum and row count is checked as well).  The check is
the Ed25519 signature by tenantgate's audit key, so it needs only the public
key (`audit keygen` writes KEY.pub): a made-up or altered receipt fails.
Exit status: 0 valid, 1 invalid, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from proxy.textsafe import safe_text

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def add_key_args(p, *, optional_flag: str = "--no-signature") -> None:
    p.add_argument("--key", "--public-key", dest="key", action="append", default=[], metavar="PUB",
                   help="Ed25519 public key (PEM) of tenantgate's audit key (repeatable)")
    p.add_argument(optional_flag, dest="no_signature", action="store_true",
                   help="skip the signature check (checksums only: proves nothing about who made it)")


class KeyUsageError(Exception):
    pass


def public_keys(args, cfg=None) -> dict | None:
    """The keys to check signatures with: --key files plus the config's audit keys.  None with
    --no-signature; an error when there is none."""
    from proxy.signing import keys_from_files, verify_keys_from_config

    if getattr(args, "no_signature", False):
        return None
    keys = dict(keys_from_files(args.key or []))
    if cfg is not None:
        keys.update(verify_keys_from_config(cfg.audit))
    if not keys:
        raise KeyUsageError("no public key to check the signature with: pass --key KEY.pub (written by "
                            "`tenantgate audit keygen`), configure audit.signing_key_file or audit.verify_key_files, "
                            "or --no-signature to check checksums only")
    return keys


def optional_config(args):
    """The config named by --config if that file exists (an offline verifier may have none)."""
    from proxy.config import load_config

    path = getattr(args, "config", None)
    return load_config(path) if path and os.path.exists(path) else None


def read_limits(cfg):
    from proxy.lifecycle.archive import ReadLimits

    return ReadLimits.from_config(cfg.lifecycle) if cfg is not None else ReadLimits()


def register(sub):
    p = sub.add_parser("receipt", help="verify deletion receipts and exports offline",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ops = p.add_subparsers(dest="receipt_command", required=True, metavar="ACTION")
    v = ops.add_parser("verify", help="check a receipt's or export's signature (and an export's files)")
    v.add_argument("file", metavar="FILE")
    add_key_args(v)
    v.add_argument("--config", default=os.environ.get("TENANTGATE_CONFIG"), metavar="FILE",
                   help="optional: take the public keys and read limits from this config")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=_verify)


def _verify(args) -> int:
    from proxy.config import ConfigError
    from proxy.signing import SignatureError
    from proxy.lifecycle.archive import MANIFEST_NAME, verify_export
    from proxy.lifecycle.attest import Attestation, read_document, verify_document
    from proxy.lifecycle.tables import LifecycleError

    def fail(msg: str, code: int = EXIT_FAIL) -> int:
        if args.json:
            print(json.dumps({"ok": False, "file": args.file, "error": msg}))
        else:
            print(f"tenantgate receipt verify: {msg}", file=sys.stderr)
        return code

    try:
        cfg = optional_config(args)
        keys = public_keys(args, cfg)
    except (KeyUsageError, ConfigError, ValueError, OSError) as e:
        return fail(str(e), EXIT_USAGE)
    path = Path(args.file)
    try:
        if path.is_dir() or (path.is_file() and path.name != MANIFEST_NAME and not _looks_like_json(path)):
            manifest = verify_export(path, keys=keys, limits=read_limits(cfg))
            att = Attestation("manifest", manifest.get("signature", {}).get("key_id", "-") if keys else "-", manifest)
            files = True
        else:
            doc = read_document(str(path))
            att = verify_document(doc, keys) if keys is not None else None
            files = False
            if att is None:
                return fail("--no-signature: a receipt or manifest alone has nothing else to check", EXIT_USAGE)
    except FileNotFoundError:
        return fail(f"{args.file}: no such file", EXIT_USAGE)
    except SignatureError as e:
        return fail(f"{args.file}: INVALID: {e}")
    except LifecycleError as e:
        return fail(f"{args.file}: INVALID: {e}")
    summary = att.summary() + ("; every file's checksum and row count match" if files else "")
    if keys is None:
        summary += " (signature NOT checked: --no-signature)"
    if args.json:
        print(json.dumps({"ok": True, "file": args.file, "kind": att.kind, "key_id": att.key_id,
                          "signature_checked": keys is not None, "tenant": att.doc.get("tenant"),
                          "total_rows": att.doc.get("total_rows")}, sort_keys=True))
    else:
        print(safe_text(summary))
    return EXIT_OK


def _looks_like_json(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return head.startswith(b"{")
