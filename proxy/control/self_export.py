"""The proxy side of the self-service export: a tenant exports its own rows, audited, no grant.

A client opens an *export session* by connecting with the connection option
``tenantgate.export`` (``options=-c tenantgate.export=1``, or a startup
parameter of that name; ``tenantgate export --dsn`` does it).  The gatekeeper
(:meth:`proxy.gatekeeper.PolicyGatekeeper.open_session`) then calls
:func:`open_export_session`, which:

* appends ``tenant.self_export`` to the audit chain *before* the session opens
  (user, tenant, client address, session id); if that fails, the connection is
  refused (audit before action), and so it is without a control plane or with
  ``lifecycle.self_export: false``;
* makes the session read-only and pins its tenant (a later tenant token is
  refused), so an export session can do nothing but read its own tenant;
* answers two statements of its own, nothing else (everything else goes
  through the tenant policy exactly as in any tenant session: every COPY is
  rewritten with the tenant predicate, no new bypass):

  - ``SHOW tenantgate.export_scope``: one row, one text column
    ``export_scope`` holding JSON: the session's tenant, the tenant column,
    the schemas and the tenant tables of the proxy's rules (a fixed list, or
    ``null`` when the rules discover tenant tables by their column).  These
    are names the tenant can already read through the proxy's filtered
    catalogs; no rows and no control tables;
  - ``SET tenantgate.export_done = '<base64url JSON>'``: the client's summary
    (table -> rows, manifest SHA-256, snapshot time), kept for the end record.

* when the session ends, appends ``tenant.self_export.done`` (the client's
  summary, marked as reported by the client, and the number of COPY
  statements the proxy let through) or ``tenant.self_export.incomplete`` when
  the client never reported a finished export.

The client side is :mod:`proxy.lifecycle.self_export`; see docs/lifecycle.md.
"""

from __future__ import annotations

import json
import logging
import re
import time

from proxy.lifecycle.self_export import (  # noqa: F401  (one definition for client and proxy)
    DONE_PARAMETER,
    EXPORT_OPTION,
    SCOPE_STATEMENT,
    decode_summary,
    encode_summary,
)
from proxy.seam import Forward, Origin, Refuse, SessionRefused, StartupInfo, UserRecord

log = logging.getLogger("tenantgate.self_export")


STARTED = "tenant.self_export"
DONE = "tenant.self_export.done"
INCOMPLETE = "tenant.self_export.incomplete"


_SCOPE_RE = re.compile(r"\s*SHOW\s+tenantgate\.export_scope\s*;?\s*", re.IGNORECASE | re.ASCII)
# base64url has no quote, backslash or whitespace: the literal is exactly what the regex captures
_DONE_RE = re.compile(r"\s*SET\s+tenantgate\.export_done\s*(?:=|TO)\s*'([A-Za-z0-9_=-]*)'\s*;?\s*",
                      re.IGNORECASE | re.ASCII)
_COPY_RE = re.compile(r"\s*COPY\b", re.IGNORECASE | re.ASCII)


def wants_export(startup: StartupInfo) -> bool:
    return any(k.lower() == EXPORT_OPTION for k in startup.options)


def quote_literal(text: str) -> str:
    """A standard-conforming string literal (the proxy's sessions keep standard_conforming_strings on)."""
    if "\x00" in text:
        raise ValueError("NUL in a literal")
    return "'" + text.replace("'", "''") + "'"


def scope_document(rules, tenant: str) -> dict:
    """What the export client needs to find the tenant tables, from the proxy's rules."""
    return {
        "tenant": tenant,
        "tenant_column": rules.tenant_column,
        "schemas": list(rules.schemas),
        "tables": None if rules.discover else [list(k) for k in sorted(rules.tenant_table_keys)],
    }


def _summary_fields(doc: dict) -> dict:
    """Only the fields we record, with plain types (a client could send anything)."""
    out: dict = {}
    tables = doc.get("tables")
    if isinstance(tables, dict):
        out["tables"] = {str(k)[:200]: v for k, v in list(tables.items())[:1000] if isinstance(v, int)}
    for key in ("manifest_sha256", "snapshot_time", "data_format", "schema_version"):
        v = doc.get(key)
        if isinstance(v, str):
            out[key] = v[:200]
    if isinstance(doc.get("total_rows"), int):
        out["total_rows"] = doc["total_rows"]
    return out


class ExportSession:
    """The interceptor and close hook of one export session (see the module docstring)."""

    def __init__(self, plane, gate, *, user: str, startup: StartupInfo, rules, started_seq: int | None):
        self.plane = plane
        self.gate = gate
        self.user = user
        self.startup = startup
        self.rules = rules
        self.tenant = gate.tenant
        self.started_seq = started_seq
        self.t0 = time.monotonic()
        self.summary: dict | None = None
        self.copies = 0

    def intercept(self, sql: str, origin: Origin):
        if _SCOPE_RE.fullmatch(sql):
            doc = json.dumps(scope_document(self.rules, self.tenant), sort_keys=True)
            return Forward(f"SELECT {quote_literal(doc)}::text AS export_scope", statement_class="read")
        m = _DONE_RE.fullmatch(sql)
        if m:
            doc = decode_summary(m.group(1))
            if doc is None:
                return Refuse("22023", f"{DONE_PARAMETER} needs base64url-encoded JSON")
            self.summary = _summary_fields(doc)
            return Forward("SELECT 'recorded'::text AS export_done", statement_class="read")
        if _COPY_RE.match(sql):
            self.copies += 1  # counted before the policy decides; the policy refuses what it must
        return None

    async def close(self) -> None:
        from proxy.control.audit import AuditRecord

        detail = {"user": self.user, "copy_statements": self.copies}
        if self.summary is not None:
            detail.update(self.summary)
            detail["reported_by"] = "client"
        rec = AuditRecord(
            DONE if self.summary is not None else INCOMPLETE, tenant=self.tenant, client_addr=self.startup.client_addr,
            session_id=self.startup.session_id, ref_seq=self.started_seq, statement_class="read",
            rows=(self.summary or {}).get("total_rows"), duration_us=int((time.monotonic() - self.t0) * 1e6),
            detail=detail)
        try:
            await self.plane.append(rec)
        except Exception as e:  # the start was recorded before any row was read
            log.error("could not record the end of a self-service export of %s: %s", self.tenant, e)


async def open_export_session(plane, gate, user: UserRecord, startup: StartupInfo, *, rules,
                              enabled: bool = True) -> ExportSession:
    """Turn ``gate`` (a tenant session gate) into an export session; raises SessionRefused."""
    if not enabled:
        raise SessionRefused("42501", "self-service export is disabled on this tenantgate",
                             hint="ask the platform to enable lifecycle.self_export, or to run an operator export")
    if plane is None:
        raise SessionRefused("0A000", "self-service export needs tenantgate's audit chain (control.dsn), which "
                                      "this tenantgate has not configured")
    if gate.tenant is None:
        raise SessionRefused("28000", "an export session needs its tenant at connect",
                             hint="pass the tenant token as a connection option: options=-c tenantgate.tenant=TOKEN")
    gate.pin_tenant()
    from proxy.control.audit import AuditRecord

    try:
        seq = await plane.append(AuditRecord(
            STARTED, tenant=gate.tenant, client_addr=startup.client_addr, session_id=startup.session_id,
            statement_class="read",
            detail={"user": user.name, "application_name": startup.application_name}))
    except Exception as e:
        log.error("could not record a self-service export of %s: %s", gate.tenant, e)
        raise SessionRefused("58030", "the export could not be recorded in the audit chain, so it does not start",
                             hint="try again later") from None
    session = ExportSession(plane, gate, user=user.name, startup=startup, rules=rules,
                            started_seq=seq if isinstance(seq, int) else None)
    gate.interceptor = session.intercept
    gate.close_hook = session.close
    return session
