"""`tenantgate audit verify|export|checkpoint|keygen|sample|attest`: the tamper-evident audit trail.

    tenantgate audit verify --config tenantgate.yaml        # exit 1 and names the first problem
    tenantgate audit verify --witness /mnt/witness/audit-witness.jsonl
    tenantgate audit export --since 2026-11-01T00:00Z > audit.jsonl
    tenantgate audit export --since-seq 1200 --out siem.jsonl
    tenantgate audit keygen --out /etc/tenantgate/audit.key # Ed25519; set audit.signing_key_file
    tenantgate audit sample --grants 5 --seed 2026-Q4        # grants with their statements, to review
    tenantgate audit attest --grant 7 --verdict legitimate --note "matches TICKET-123" --as carol

verify re-walks the hash chain and checks the Ed25519 signatures of the
checkpoints (with the key from audit.signing_key_file/_env, or
audit.verify_key_files, or --key PUB).  It reports modified, deleted,
inserted and reordered records, bad checkpoints, stretches of records
without a checkpoint wider than audit.checkpoint_window_records/_s
(deleted checkpoints), and, with --witness (default: audit.witness_file),
any checkpoint of the witness file that the database lacks or contradicts.
Without a key it refuses to run unless --no-signatures is given.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from proxy.textsafe import safe_text

from .control_common import (EXIT_FAIL, EXIT_OK, UsageError, add_actor_args, add_config_arg, authenticate,
                             control_plane, emit, load, run)


def register(sub):
    p = sub.add_parser("audit", help="verify and export the audit trail",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ops = p.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    v = ops.add_parser("verify", help="re-walk the hash chain and check signed checkpoints")
    v.add_argument("--witness", metavar="FILE",
                   help="checkpoint witness file to check the database against (default: audit.witness_file)")
    v.add_argument("--key", action="append", default=[], metavar="PUB",
                   help="Ed25519 public key (PEM) accepted on checkpoints (repeatable; adds to the config's)")
    v.add_argument("--no-signatures", action="store_true",
                   help="check the hash chain only: signatures and checkpoint coverage are NOT checked")
    add_config_arg(v)
    v.set_defaults(func=lambda args: run(args, _verify))

    e = ops.add_parser("export", help="write records as JSON lines (for a SIEM)")
    e.add_argument("--since", help="ISO time (e.g. 2026-11-01T00:00Z); records at or after it")
    e.add_argument("--since-seq", type=int, help="records with seq >= N")
    e.add_argument("--out", help="file to write (default: standard output); must not exist")
    add_config_arg(e)
    e.set_defaults(func=lambda args: run(args, _export))

    c = ops.add_parser("checkpoint", help="sign the chain's head now")
    add_config_arg(c)
    c.set_defaults(func=lambda args: run(args, _checkpoint))

    sm = ops.add_parser("sample", help="draw a reproducible random sample of grants with their statements, to review")
    sm.add_argument("--grants", type=int, required=True, metavar="N", help="how many grants to draw")
    sm.add_argument("--seed", required=True, metavar="S", help="the same seed draws the same sample")
    sm.add_argument("--max-grant-id", type=int, metavar="ID",
                    help="draw among grants up to this id (default: the newest; printed, to reproduce the draw)")
    add_config_arg(sm)
    add_actor_args(sm, required=False)
    sm.set_defaults(func=lambda args: run(args, _sample))

    at = ops.add_parser("attest", help="record your review verdict on a grant (approver; not your own grant)")
    at.add_argument("--grant", type=int, required=True, metavar="ID")
    at.add_argument("--verdict", required=True, choices=["legitimate", "concern"])
    at.add_argument("--note", help="what you checked, or what is wrong (required with concern)")
    add_config_arg(at)
    add_actor_args(at)
    at.set_defaults(func=lambda args: run(args, _attest))

    k = ops.add_parser("keygen", help="create an Ed25519 signing key (PEM) and its public key (.pub)")
    k.add_argument("--out", required=True, help="private key file to create (mode 0600); public key: OUT.pub")
    k.set_defaults(func=_keygen)


async def _verify(args) -> int:
    from proxy.signing import keys_from_files, verify_keys_from_config
    from proxy.control.witness import WitnessError, read_witness

    cfg = load(args)
    keys = {**verify_keys_from_config(cfg.audit), **keys_from_files(args.key)}
    if args.no_signatures:
        keys = {}
    elif not keys:
        raise UsageError("no key to check checkpoint signatures with: set audit.signing_key_file or "
                         "audit.verify_key_files, pass --key PUB, or --no-signatures to check the hash chain only "
                         "(which cannot detect a rewritten log)")
    witness_path = args.witness or cfg.audit.witness_file
    witness = None
    if witness_path:
        try:
            witness = read_witness(witness_path)
        except WitnessError as e:
            if args.witness or os.path.exists(witness_path):
                raise UsageError(str(e))
            witness = None  # configured but never written yet (no checkpoint so far)
            print(f"tenantgate audit: warning: witness file {witness_path} does not exist: not checked "
                  "(use --witness FILE with the copy shipped off the host)", file=sys.stderr)
    async with control_plane(args) as plane:
        report = await plane.verify(witness=witness, public_keys=keys)

    def human() -> str:
        sig = ("signatures checked" if report.signatures_checked
               else "signatures and checkpoint coverage NOT checked (--no-signatures)")
        wit = "" if report.witness_entries is None else f", {report.witness_entries} witness entries"
        head = f"{report.records} records, head at {report.head_seq}, {report.checkpoints} checkpoints{wit}, {sig}"
        if report.ok:
            return f"audit chain OK: {head}"
        lines = [f"audit chain FAILED: {safe_text(report.first.message)}", f"  ({head})"]
        lines += [f"  - [{p.kind}] {safe_text(p.message)}" for p in report.problems[1:]]
        return "\n".join(lines)

    emit(args, report.to_json(), human)
    return EXIT_OK if report.ok else EXIT_FAIL


def _parse_since(text: str) -> datetime:
    try:
        d = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {text!r}: use an ISO time such as 2026-11-01T00:00Z")
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


async def _export(args) -> int:
    since = _parse_since(args.since) if args.since else None
    if args.out and os.path.exists(args.out):
        raise UsageError(f"--out {args.out}: the file exists")
    tmp = f"{args.out}.partial" if args.out else None
    out = open(tmp, "x", encoding="utf-8") if tmp else sys.stdout
    n = 0
    try:
        async with control_plane(args) as plane:
            async for line in plane.export(since=since, since_seq=args.since_seq):
                out.write(line + "\n")
                n += 1
        if tmp:
            out.close()
            os.replace(tmp, args.out)
    except BaseException:
        if tmp:
            out.close()
            os.unlink(tmp)
        raise
    if args.out:
        print(f"exported {n} records to {args.out}", file=sys.stderr)
    return EXIT_OK


async def _checkpoint(args) -> int:
    async with control_plane(args) as plane:
        seq = await plane.checkpoint()
    if seq is None:
        raise UsageError("no signing key configured (audit.signing_key_file or audit.signing_key_env)")
    emit(args, {"checkpoint_seq": seq}, f"signed checkpoint at record {seq}")
    return EXIT_OK


async def _sample(args) -> int:
    import json

    from proxy.control.sampling import sample_grants

    async with control_plane(args) as plane:
        actor = await authenticate(plane, args) if args.actor else None
        doc = await sample_grants(plane, args.grants, args.seed, max_grant_id=args.max_grant_id,
                                  drawn_by=actor.name if actor else None)

    def human() -> str:
        lines = [f"{len(doc['grant_ids'])} of {doc['population']} approved grants (ids <= {doc['max_grant_id']}), "
                 f"seed {safe_text(doc['seed'])}: {', '.join(map(str, doc['grant_ids'])) or '-'}",
                 f"reproduce: {safe_text(doc['reproduce'])}"]
        for g in doc["grants"]:
            lines.append(f"\ngrant {g['id']}: {g['access']} on {safe_text(g['tenant'])} by {safe_text(g['requester'])}, "
                         f"{g['state']}; reason: {safe_text(g['reason'])}; approved by "
                         + ", ".join(safe_text(a["approver"]) for a in g["approvals"] if a["decision"] == "approve"))
            for r in g["records"]:
                what = r.get("original_sql") or json.dumps(r.get("detail"), ensure_ascii=False, default=str)
                outcome = f" [{r['sqlstate']}]" if r.get("sqlstate") else ""
                lines.append(f"  #{r['seq']} {r['at'][:19]} {r['type']}{outcome}: {safe_text(what)}")
            lines.append(f"  attest: tenantgate audit attest --grant {g['id']} --verdict legitimate|concern --note ...")
        return "\n".join(lines)

    emit(args, doc, human)
    return EXIT_OK


async def _attest(args) -> int:
    from proxy.control.sampling import attest

    async with control_plane(args) as plane:
        actor = await authenticate(plane, args)
        doc = await attest(plane, actor, args.grant, args.verdict, args.note)
    emit(args, doc, f"grant {doc['grant_id']}: {doc['verdict']} (reviewed through audit record "
                    f"{doc['reviewed_through_seq']}), recorded in the audit chain")
    return EXIT_OK


def _keygen(args) -> int:
    from proxy.control.audit import key_id_of, load_private_key, new_signing_key_pem

    priv, pub = new_signing_key_pem()
    out = Path(args.out)
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"tenantgate audit keygen: {out} exists", file=sys.stderr)
        return 2
    with os.fdopen(fd, "wb") as fh:
        fh.write(priv)
    Path(str(out) + ".pub").write_bytes(pub)
    print(f"wrote {out} (key id {key_id_of(load_private_key(priv).public_key())}) and {out}.pub\n"
          f"set audit.signing_key_file: {out}")
    return EXIT_OK
