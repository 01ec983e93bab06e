"""`tenantgate demand register|list|request|approve|deny|export|notify-due`: third-party demands.

    tenantgate demand register --tenant acme --authority "District Court X" \\
        --reference "2026-AB-123" --gag-until 2027-03-01 --as bob        # approver
    tenantgate demand request 1 --for 2h --reason "order 2026-AB-123" --as alice
    tenantgate demand approve 1 --as bob ; tenantgate demand approve 1 --as carol   # two others
    tenantgate demand export 1 --out acme-disclosure.tar.zst --as alice  # once, read-only
    tenantgate demand list
    tenantgate demand notify-due        # from cron: tenant notices whose time has come

A disclosure grant is read-only and export-only, bound to one demand, and
needs at least two approvers besides its requester, who must be distinct
persons (no account made by or for another of them within the grant
policy's account change window).  The demand record is signed with the
audit key (check it with `tenantgate receipt verify FILE --public-key PUB`);
the export's manifest names the demand.  The tenant is notified at
registration, or when the gag ends.  Everything is in the audit chain.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from proxy.textsafe import safe_text

from .control_common import EXIT_FAIL, EXIT_OK, add_actor_args, add_config_arg, authenticate, control_plane, emit, \
    load, run, table


def register(sub):
    p = sub.add_parser("demand", help="third-party demands for a tenant's data: register, approve, export, notify",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ops = p.add_subparsers(dest="demand_command", required=True, metavar="ACTION")

    r = ops.add_parser("register", help="record a demand (approver)")
    r.add_argument("--tenant", required=True)
    r.add_argument("--authority", required=True, help="who demands the data")
    r.add_argument("--reference", required=True, help="the authority's reference (order, case number)")
    r.add_argument("--gag-until", metavar="DATE", help="the tenant may not be told before this date (ISO, UTC)")
    add_config_arg(r)
    add_actor_args(r)
    r.set_defaults(func=lambda args: run(args, _register))

    q = ops.add_parser("request", help="request the disclosure grant of a demand")
    q.add_argument("demand", type=int, metavar="DEMAND_ID")
    q.add_argument("--for", dest="duration", required=True, metavar="DURATION")
    q.add_argument("--reason", required=True)
    add_config_arg(q)
    add_actor_args(q)
    q.set_defaults(func=lambda args: run(args, _request))

    for name in ("approve", "deny"):
        c = ops.add_parser(name, help=f"{name} a pending disclosure grant (approvers; not your own)")
        c.add_argument("id", type=int, metavar="GRANT_ID")
        c.add_argument("--comment")
        add_config_arg(c)
        add_actor_args(c)
        c.set_defaults(func=lambda args, _a=(name == "approve"): run(args, lambda a: _decide(a, _a)))

    e = ops.add_parser("export", help="export the tenant's data under the demand's approved disclosure grant")
    e.add_argument("demand", type=int, metavar="DEMAND_ID")
    e.add_argument("--out", required=True, help="a new directory, or a FILE.tar.zst")
    e.add_argument("--grant", type=int, metavar="GRANT_ID")
    e.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    add_config_arg(e)
    add_actor_args(e)
    e.set_defaults(func=lambda args: run(args, _export))

    ls = ops.add_parser("list", help="demands, their disclosure grants and tenant notices")
    ls.add_argument("--tenant")
    add_config_arg(ls)
    ls.set_defaults(func=lambda args: run(args, _list))

    n = ops.add_parser("notify-due", help="send the tenant notices whose time has come")
    add_config_arg(n)
    n.set_defaults(func=lambda args: run(args, _notify_due))


async def _audited(plane, actor, action: str, ref: dict, coro):
    """Await ``coro``; a refusal (ControlError) is recorded in the chain as ``demand.refused`` first."""
    from proxy.control.audit import AuditRecord
    from proxy.control.model import ControlError

    try:
        return await coro
    except ControlError as e:
        await plane.append(AuditRecord("demand.refused", operator=actor.name, sqlstate="42501",
                                       detail={"action": action, **ref, "message": str(e)}))
        raise


async def _register(args) -> int:
    from proxy.control.demands import deliver_due, parse_gag, register_demand
    from proxy.signing import signer_from_config

    cfg = load(args)
    gag = parse_gag(args.gag_until)
    async with control_plane(args) as plane:
        actor = await authenticate(plane, args)
        doc = await _audited(plane, actor, "register", {"tenant": args.tenant, "authority": args.authority,
                                                        "reference": args.reference},
                             register_demand(plane, actor, args.tenant, args.authority, args.reference, gag,
                                             signer_from_config(cfg.audit)))
        sent = []
        if gag is None and cfg.lifecycle.demand_notice_url:
            sent = await deliver_due(plane, url=cfg.lifecycle.demand_notice_url,
                                    secret=cfg.lifecycle.notices.resolved_secret())
    note = ("tenant notified" if any(s["sent"] and s["demand_id"] == doc["demand_id"] for s in sent)
            else f"tenant notice pending until {doc['gag_until'] or 'delivery (demand notify-due)'}")
    emit(args, doc, lambda: json.dumps(doc, indent=2, ensure_ascii=False) + f"\n{note}")
    return EXIT_OK


async def _request(args) -> int:
    from proxy.control.demands import request_disclosure

    async with control_plane(args) as plane:
        actor = await authenticate(plane, args)
        g = await _audited(plane, actor, "request", {"demand": args.demand},
                           request_disclosure(plane, actor, args.demand, args.duration, args.reason))
    emit(args, g, lambda: f"disclosure grant {g['id']} for demand {g['demand_id']} (tenant {safe_text(g['tenant'])}): "
                          f"pending, needs {g['approvals_required']} approvers other than {safe_text(g['requester'])}\n"
                          f"Ask them: tenantgate demand approve {g['id']}")
    return EXIT_OK


async def _decide(args, approve: bool) -> int:
    from proxy.control.demands import decide_disclosure

    async with control_plane(args) as plane:
        actor = await authenticate(plane, args)
        g = await _audited(plane, actor, "approve" if approve else "deny", {"disclosure_grant": args.id},
                           decide_disclosure(plane, actor, args.id, approve, args.comment))
    n = sum(1 for a in g["approvals"] if a["decision"] == "approve")
    emit(args, g, lambda: f"disclosure grant {g['id']}: {g['state']} ({n} of {g['approvals_required']} approvals)")
    return EXIT_OK


async def _export(args) -> int:
    from proxy.control.audit import AuditRecord
    from proxy.control.demands import EXPORT, disclosure_grant_for, mark_used
    from proxy.control.model import ControlError
    from proxy.signing import signer_from_config
    from proxy.control.tenant_discovery import data_connection, tenant_schema
    from proxy.lifecycle.export import export_tenant, manifest_sha256

    cfg = load(args)
    async with control_plane(args) as plane:
        actor = await authenticate(plane, args)
        try:
            found = await disclosure_grant_for(plane, actor, args.demand, args.grant)
            t = await plane.get_tenant(found["demand"]["tenant"])
            if t is None or t.status == "purged":
                from proxy.control.model import InvalidRequest

                raise InvalidRequest(f"tenant {found['demand']['tenant']!r} has been purged: nothing to disclose")
        except ControlError as e:
            await plane.append(AuditRecord("demand.refused", operator=actor.name, sqlstate="42501",
                                           detail={"action": "export", "demand": args.demand, "message": str(e)}))
            raise
        g, d = found["grant"], found["demand"]
        ref = {"disclosure_grant": g["id"], "demand": d["id"]}
        seq = await plane.append(AuditRecord(EXPORT, operator=actor.name, tenant=d["tenant"],
                                             detail={**ref, "out": os.path.abspath(args.out), "format": args.format}))
        t0 = time.monotonic()
        try:
            async with data_connection(cfg) as conn:
                schema = await tenant_schema(cfg, conn)
                manifest = await export_tenant(
                    conn, schema, d["tenant"], args.out, data_format=args.format, signer=signer_from_config(cfg.audit),
                    disclosure={"demand_id": d["id"], "authority": d["authority"], "reference": d["reference"],
                                "disclosure_grant": g["id"], "requester": actor.name})
        except Exception as e:
            await plane.append(AuditRecord(EXPORT + ".failed", operator=actor.name, tenant=d["tenant"], ref_seq=seq,
                                           sqlstate=getattr(e, "sqlstate", "XX000"),
                                           detail={**ref, "message": str(getattr(e, "message", e))}))
            raise
        await mark_used(plane, actor, g["id"], {"manifest_sha256": manifest_sha256(manifest), "ref_seq": seq,
                                                "total_rows": manifest["total_rows"],
                                                "duration_us": int((time.monotonic() - t0) * 1e6)})
    out = {"demand": d["id"], "tenant": d["tenant"], "out": args.out, "total_rows": manifest["total_rows"],
           "disclosure_grant": g["id"]}
    emit(args, out, lambda: json.dumps(out, indent=2, ensure_ascii=False))
    return EXIT_OK


async def _list(args) -> int:
    from proxy.control.demands import list_demands

    async with control_plane(args) as plane:
        demands = await list_demands(plane, args.tenant)

    def human() -> str:
        rows = []
        for d in demands:
            notice = ", ".join(f"{n['state']} (due {n['due_at'][:16]})" for n in d["notices"]) or "-"
            grants = ", ".join(f"#{g['id']} {g['state']}" for g in d["grants"]) or "-"
            rows.append([d["id"], d["tenant"], d["authority"], d["reference"], d["state"], grants,
                         d["gag_until"] or "-", notice])
        return table(["id", "tenant", "authority", "reference", "state", "grants", "gag_until", "notice"], rows)

    emit(args, demands, human)
    return EXIT_OK


async def _notify_due(args) -> int:
    from proxy.control.demands import deliver_due

    cfg = load(args)
    async with control_plane(args) as plane:
        results = await deliver_due(plane, url=cfg.lifecycle.demand_notice_url,
                                      secret=cfg.lifecycle.notices.resolved_secret())
    emit(args, results, lambda: "\n".join(
        f"notice {r['notice_id']} (demand {r['demand_id']}, tenant {r['tenant']}): "
        + ("sent" if r["sent"] else f"NOT sent: {r['error']}") for r in results) or "no notice is due")
    return EXIT_OK if all(r["sent"] for r in results) else EXIT_FAIL
